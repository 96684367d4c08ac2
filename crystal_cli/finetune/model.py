"""The model side of `crystal finetune`: what is trained (a LoRA adapter or every weight), on which device
and precision, and the completion loss (optionally over the grammar's crystal vocabulary only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from crystal_cli.errors import CrystalError
from crystal_cli.finetune.config import RunConfig, TrainSection
from crystal_cli.finetune.data import IGNORE, Example
from crystal_cli.runtime import cpu_has_amx, cpu_has_bf16, has_cxx_compiler


def device_and_dtype(train: TrainSection, local_rank: int) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """(device, dtype the base is loaded in, autocast dtype or None) for a run's device and precision."""
    if train.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(train.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CrystalError(f"device {train.device!r} requested but CUDA is not available")
    bf16 = train.precision == "bf16" or (train.precision == "auto" and (device.type == "cuda" or cpu_has_bf16()))
    # CUDA bf16 holds the frozen base in bf16 (LoRA weights stay fp32); CPU bf16 is autocast over fp32.
    weights = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    return device, weights, (torch.bfloat16 if bf16 else None)


@contextmanager
def compute_context(device: torch.device, autocast_dtype: torch.dtype | None,
                    math_attention: bool | None = None) -> Iterator[None]:
    """The context every forward of a run runs in: autocast where the run computes in bf16 and, on a CPU without
    AMX, the math path of scaled_dot_product_attention. There torch's CPU flash-attention kernel took 29 % of a
    bf16 LoRA step of SmolLM2-135M on 8 × 320 tokens (torch.profiler, 2-core Zen 4 EPYC), for attention that is
    ~2 % of the step's FLOPs; the math path computes the same attention as batched matmuls, 1.10× faster on the
    shipped default's recipe (bench/train_throughput.py, `scratch-384x8 full + math attention`). On an AMX Xeon
    the fused kernel is the fast one (the math path 0.70× on that recipe, 0.83× on the LoRA one), so it stays
    there, as on CUDA. The math path holds the B × heads × L × L weights for the backward: peak RSS 4.7 → 5.8 GB
    on that batch, ~3 GB more at 8 × 512 tokens, which a CPU run can afford. `math_attention` forces the choice
    (the benchmark's rows); None is the rule above."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with ExitStack() as stack:
        if autocast_dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype))
        if math_attention is None:
            math_attention = device.type == "cpu" and not cpu_has_amx()
        if math_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def compiles(setting: str, device: torch.device) -> bool:
    """Does a run with train.compile = `setting` put its decoder under torch.compile on `device`? On a CPU
    inductor builds C++ kernels, so "on" there needs a compiler and "auto" needs one as well as AMX, the CPU
    where the bench measured the gain (1.39x on scratch-384x8, 1.56x on SmolLM2-135M LoRA without dropout):
    on a Zen 5 without AMX compiling the LoRA step was 0.82x. CUDA is left to "on" until a device run measures it."""
    if setting == "off":
        return False
    has_compiler = device.type != "cpu" or has_cxx_compiler()
    if setting == "on":
        if not has_compiler:
            raise CrystalError("train.compile = \"on\": torch.compile on a CPU needs a C++ compiler (g++, c++ or "
                               "clang++) on PATH; install one or set train.compile = \"off\"")
        return True
    return device.type == "cpu" and cpu_has_amx() and has_compiler


def compile_decoder(net, device: torch.device, attention: Literal["matmul", "sdpa"] = "matmul") -> None:
    """Put the network's decoder under torch.compile (inductor, dynamic shapes: batch widths vary), in place,
    so its state dict keeps its keys and checkpoints and saved weights read the same either way.

    On a CPU the compiled attention is the model's plain one (transformers' "eager" implementation: two batched
    matmuls around an fp32 softmax), which inductor fuses, instead of torch's CPU flash-attention kernel: that
    kernel's backward took 41-44 % of a compiled scratch-384x8 step on an AMX Xeon (bench/trainer_profile.py, three
    runs; 42-57 ms a layer for a forward of 4 ms), and the compiled step went from 0.81-0.95 to 0.62-0.71 s. The
    implementation is a runtime setting that save_pretrained does not write, so saved weights are unchanged.
    `attention="sdpa"` keeps scaled_dot_product_attention (the benchmark's row for the old way)."""
    if device.type == "cpu" and attention == "matmul":
        net.set_attn_implementation("eager")
    net.get_decoder().compile(dynamic=True)


def trainable(config: RunConfig, base, weights_dtype: torch.dtype):
    """(model to save, network to train): the base itself (train.method = full, weights in fp32: bf16 comes
    from autocast) or the base wrapped with LoRA layers (injected in place, so the base network trains them)."""
    if config.train.method == "full":
        return (base.float() if weights_dtype != torch.float32 else base), base
    from peft import LoraConfig, get_peft_model

    missing = [m for m in config.lora.target_modules if not any(n.endswith(f".{m}") for n, _ in base.named_modules())]
    if missing:
        raise CrystalError(f"lora.target_modules {missing} do not exist in base {config.base!r}")
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    if base.device.type == "cpu":
        use_cpu_dropout(model)
    return model, model.get_base_model()


DROP_LEVELS = 65536  # CpuDropout draws one uint16 per element: p is rounded to a multiple of 1 / DROP_LEVELS


@torch.library.custom_op("crystal::keep_mask", mutates_args=())
def keep_mask(seed: torch.Tensor, shape: list[int], drop_below: int) -> torch.Tensor:
    """A bool mask of `shape`, each element False with probability drop_below / DROP_LEVELS, from numpy's PCG64
    seeded by `seed` (a one-element int64 tensor). An opaque op, so torch.compile calls it as it is; the seed is
    an input, so two masks of one shape in a graph (q, k and v read the same input) stay two draws."""
    generator = np.random.Generator(np.random.PCG64(int(seed.item())))
    uniform = generator.integers(0, DROP_LEVELS, int(np.prod(shape)), dtype=np.uint16)
    return torch.from_numpy(uniform >= drop_below).view(shape)


@keep_mask.register_fake
def _(seed: torch.Tensor, shape: list[int], drop_below: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bool)


class CpuDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from keep_mask: the same regulariser as nn.Dropout(p) (each element
    zeroed independently, the rest scaled so the expectation is the input), at ~1 ns an element for the mask
    where torch's CPU generator takes 3.4-4.7 ns (torch.rand, bernoulli_; 2-core AMX Xeon) and inductor's
    compiled one more. LoRA drops each adapted layer's input separately: ~150 k draws a token for SmolLM2-135M,
    which made dropout over half of a compiled CPU LoRA step (bench/train_throughput.py, "+ compile (torch dropout)").
    The drop probability is p rounded to 1 / 65,536 (within 7.6e-6 of p) and the scale is exact for it. Seeds
    come from torch's generator, so torch.manual_seed and a checkpoint's saved RNG state reproduce the masks."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.drop_below = round(p * DROP_LEVELS)
        self.scale = DROP_LEVELS / (DROP_LEVELS - self.drop_below)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_below == 0:
            return x
        seed = torch.randint(0, 2**62, (1,), device="cpu")
        return x * keep_mask(seed, list(x.shape), self.drop_below).to(x.device) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cpu_dropout(model) -> None:
    """Swap every LoRA dropout of a peft model (nn.Dropout with p > 0) for a CpuDropout of the same p, in place.
    Dropout holds no weights, so saved adapters and checkpoints are the same either way."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    dropouts[name] = CpuDropout(dropout.p)


@dataclass(frozen=True)
class LossVocab:
    """The token ids a loss normalises over, and the map from a token id to its row (-1: not in it)."""

    ids: torch.Tensor
    row: torch.Tensor

    @classmethod
    def of(cls, ids: set[int], vocab_size: int, device) -> LossVocab:
        ordered = torch.tensor(sorted(ids), dtype=torch.long)
        row = torch.full((vocab_size,), -1, dtype=torch.long)
        row[ordered] = torch.arange(len(ordered))
        return cls(ordered.to(device), row.to(device))


def crystal_vocab(tokenizer, examples: list[Example]) -> set[int]:
    """Token ids the sampling grammar can ever emit (grammar.crystal_shortlist, end of text included) and
    every completion token of `examples`, so the restricted loss is defined on every training target.

    Sampling with the grammar draws only from that shortlist, renormalised, so a softmax over it is the
    distribution the model is used with; and the lm_head shrinks from 49,152 rows to a few hundred.
    """
    from crystal_cli.grammar import crystal_shortlist

    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = set(crystal_shortlist(pieces, [tokenizer.eos_token_id]).tolist())
    for example in examples:
        ids.update(example.completion_ids)
    return ids


def completion_nll(model, batch: dict, vocab: LossVocab | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled (completion) tokens and each token's batch row.

    The lm_head runs only on labelled positions: with a 49k vocabulary the full logits tensor is the
    largest activation of a small model, and prompt/padding positions would be thrown away anyway. With
    `vocab`, only its rows of the lm_head are computed and the softmax is over them alone; every target
    must be in it (crystal_vocab makes sure).
    """
    nll, rows, _ = completion_losses(model, batch, vocab)
    return nll, rows


def completion_losses(model, batch: dict, vocab: LossVocab | None = None, digit_ids: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """completion_nll, and with `digit_ids` and the batch's `avoid` (data.with_overlaps) the probability mass
    the model puts on the digits that would stack two atoms, at each position that has any (else empty).

    That mass is what the unlikelihood term -log(1 - mass) (Welleck et al., 2019) pushes down: a model that
    copies an earlier site's coordinates writes a structurally invalid crystal, and maximum likelihood alone
    never says so (the true continuation is always a valid one, so those digits only lose mass indirectly).
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    picked, wanted = hidden[:, :-1][mask], targets[mask]
    head = model.get_output_embeddings()
    columns = digit_ids
    if vocab is None:
        logits = head(picked).float()
    else:
        logits = F.linear(picked, head.weight[vocab.ids]).float()
        wanted = vocab.row[wanted]
        columns = None if digit_ids is None else vocab.row[digit_ids]
    rows = mask.nonzero()[:, 0]
    nll = F.cross_entropy(logits, wanted, reduction="none")
    if "imitate" in batch:  # the model's own samples (data.negatives) add only the unlikelihood term
        keep = batch["imitate"][:, 1:][mask]
        nll, rows = nll[keep], rows[keep]
    mass = logits.new_zeros(0)
    if columns is not None and "avoid" in batch:
        avoid = batch["avoid"][:, 1:][mask]
        marked = avoid.any(dim=1)
        if marked.any():
            probs = logits[marked].log_softmax(dim=-1)[:, columns].exp()
            mass = (probs * avoid[marked]).sum(dim=1)
    return nll, rows, mass


class CompletionNLL(torch.nn.Module):
    """completion_losses as a module, so DistributedDataParallel's forward hooks see every training call."""

    def __init__(self, model, vocab: LossVocab | None, digit_ids: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.vocab = vocab
        self.digit_ids = digit_ids

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return completion_losses(self.model, batch, self.vocab, self.digit_ids)
