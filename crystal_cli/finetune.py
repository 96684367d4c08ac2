"""Fine-tuning on crystal text records (LoRA, or every weight): `crystal finetune`.

A run directory holds everything needed to reproduce, resume or use a run::

    RUN/config.json          fully resolved config ("base": resolved HF dir, "base_spec": what was asked)
    RUN/metrics.jsonl        one line per log step (loss, lr, tokens/s) and per evaluation (val_loss)
    RUN/checkpoints/step-N/  trainable weights, optimizer, scheduler, RNG state (atomically renamed in)
    RUN/adapter/             the final PEFT adapter (no embedding or lm_head weights), train.method = lora
    RUN/model/               the whole trained model (transformers directory + tokenizer), train.method = full
    RUN/summary.json         data counts, steps, final losses, wall time

Exact resume: batch order and augmentation are pure functions of (seed, epoch, position), and the
checkpoint carries optimizer, scheduler and torch RNG state, so a resumed run replays the same steps.
Several GPUs/nodes: launched under torchrun/accelerate (WORLD_SIZE > 1) the same code runs DDP.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crystal_cli import codec
from crystal_cli.errors import CrystalError
from crystal_cli.files import read_toml
from crystal_cli.models import load_base

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NON_CRYSTAL_TASKS = frozenset({"infill"})  # tasks whose completion is not a crystal (no translation)
IGNORE = -100
BUCKET_BATCHES = 64  # length-bucketing window, in batches: sorts within it, shuffles batch order across it


# ---------------------------------------------------------------------------------------------- config


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class DataSection:
    records: str = ""  # directory with train.jsonl (and val.jsonl) from `crystal encode`
    tasks: list[str] = field(default_factory=list)  # keep only these tasks; empty = all
    max_length: int = 512  # longer examples are skipped and counted, never truncated
    translate: float = 0.0  # probability of a random translation each time a crystal is drawn
    max_train_records: int = 0  # 0 = all
    val_records: int = 256  # val examples scored at each evaluation; 0 = no evaluation


@dataclass
class TrainSection:
    seed: int = 0
    max_steps: int = 1000  # optimizer steps; replaced by the epochs' count when epochs > 0
    epochs: float = 0.0
    max_minutes: float = 0.0  # > 0: stop (evaluate, checkpoint, save weights) after this much training time
    batch_size: int = 8  # examples per micro-batch (per process)
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    max_grad_norm: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16
    threads: int = 0  # CPU threads for torch; 0 = torch's default (use 1 on a busy shared host)
    method: str = "lora"  # lora: train a LoRA adapter on the frozen base | full: train every weight
    # Softmax of the loss over: "full" vocabulary (runs made before this key existed) or "crystal": the
    # tokens the sampling grammar can ever emit plus every completion token of the data (CRYSTAL_VOCAB).
    loss_vocab: str = "full"


@dataclass
class RunConfig:
    base: str = "smollm2-135m"  # a base name, a .gguf file or an HF directory (see bases.resolve_base)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


SECTIONS = {"lora": LoraSection, "data": DataSection, "train": TrainSection}
RESUME_OVERRIDABLE = {"train.max_steps", "train.max_minutes", "train.threads", "train.eval_every", "train.checkpoint_every", "train.log_every",
                      "train.keep_checkpoints"}
CHOICES = {"train.precision": ("auto", "fp32", "bf16"), "train.method": ("lora", "full"),
           "train.loss_vocab": ("full", "crystal")}


def _check_type(value: object, annotation: str, where: str) -> object:
    """TOML value -> field value of the declared type; CrystalError naming the key otherwise."""
    if annotation == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation == "str" and isinstance(value, str):
        return value
    if annotation == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise CrystalError(f"{where}: expected {annotation}, got {type(value).__name__} {value!r}")


def _apply(config: RunConfig, key: str, value: object, where: str) -> None:
    """Set dotted `key` ("train.batch_size" or "base") on config after checking name and type."""
    section_name, _, name = key.rpartition(".")
    target = getattr(config, section_name) if section_name in SECTIONS else config if not section_name else None
    fields = {f.name: f for f in dataclasses.fields(target)} if target is not None else {}
    if name not in fields or dataclasses.is_dataclass(getattr(target, name, None)):
        known = ["base"] + [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
        raise CrystalError(f"{where}: unknown key {key!r}; known: {', '.join(known)}")
    value = _check_type(value, str(fields[name].type), f"{where}: {key}")
    if key in CHOICES and value not in CHOICES[key]:
        raise CrystalError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    setattr(target, name, value)


def load_recipe(path: str | Path) -> dict[str, object]:
    """A training recipe (TOML) flattened to dotted keys, every key and type checked."""
    path = Path(path)
    recipe = read_toml(path)
    flat: dict[str, object] = {}
    for key, value in recipe.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    _build(flat, str(path))  # validate now: the recipe is wrong on its own, whatever overrides follow
    return flat


def _build(settings: dict[str, object], where: str, start: RunConfig | None = None) -> RunConfig:
    config = RunConfig() if start is None else _from_dict(asdict(start))
    for key, value in settings.items():
        _apply(config, key, value, where)
    _check_ranges(config, where)
    return config


def _check_ranges(config: RunConfig, where: str) -> None:
    t, d, lora = config.train, config.data, config.lora
    positive = {"lora.r": lora.r, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "data.max_length": d.max_length, "train.eval_every": t.eval_every,
                "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                "train.keep_checkpoints": t.keep_checkpoints}
    for key, value in positive.items():
        if value < 1:
            raise CrystalError(f"{where}: {key} must be >= 1, got {value}")
    if t.max_steps < 1 and t.epochs <= 0:
        raise CrystalError(f"{where}: give train.max_steps >= 1 or train.epochs > 0")
    if not 0.0 <= d.translate <= 1.0 or not 0.0 <= lora.dropout < 1.0:
        raise CrystalError(f"{where}: data.translate must be in [0, 1] and lora.dropout in [0, 1)")
    if t.learning_rate <= 0 or not 0.0 <= t.min_lr_ratio <= 1.0:
        raise CrystalError(f"{where}: train.learning_rate must be > 0 and train.min_lr_ratio in [0, 1]")
    if not lora.target_modules:
        raise CrystalError(f"{where}: lora.target_modules is empty")


def _from_dict(saved: dict) -> RunConfig:
    return RunConfig(
        base=saved["base"],
        **{name: cls(**saved[name]) for name, cls in SECTIONS.items()},
    )


def resolve_config(
    run_dir: str | Path,
    recipe: str | Path | None = None,
    overrides: dict[str, object] | None = None,
    resume: bool = False,
) -> RunConfig:
    """Recipe, then CLI overrides (dotted keys); with resume, the run's saved config plus a few safe overrides."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    run_dir = Path(run_dir)
    if not resume:
        if (run_dir / "config.json").exists():
            raise CrystalError(f"{run_dir} already holds a run: pass --resume to continue it or choose another -o")
        settings = load_recipe(recipe) if recipe is not None else {}
        return _build(settings | overrides, "overrides" if recipe is None else str(recipe))
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise CrystalError(f"{run_dir}: nothing to resume (no config.json); start it without --resume")
    raw = json.loads(saved.read_text())
    config = _from_dict(raw | {"base": raw["base_spec"]})
    settings = (load_recipe(recipe) if recipe is not None else {}) | overrides
    changed = {k: v for k, v in settings.items() if not _same(k, _get(config, k), v)}
    frozen = sorted(set(changed) - RESUME_OVERRIDABLE)
    if frozen:
        raise CrystalError(f"--resume continues {saved} as saved and cannot change {', '.join(frozen)} "
                           f"(only {', '.join(sorted(RESUME_OVERRIDABLE))})")
    return _build(changed, "overrides", start=config)


def _same(key: str, saved: object, given: object) -> bool:
    if key == "data.records" and isinstance(given, str):
        return Path(given).expanduser().resolve() == Path(str(saved)).expanduser().resolve()
    return saved == given


def _get(config: RunConfig, key: str) -> object:
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name, None)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Example:
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]  # completion tokens followed by EOS
    crystal: bool  # completion is a crystal: eligible for random translation

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def read_records(path: Path, tasks: list[str] | None = None) -> list[dict]:
    """Records of one jsonl split; a line that is not a record with prompt and completion is an error."""
    records = []
    with path.open() as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CrystalError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise CrystalError(f"{path}:{lineno}: record has no prompt")
            if not isinstance(record.get("completion"), str) or not record["completion"].strip():
                raise CrystalError(f"{path}:{lineno}: record has no completion")
            if not tasks or record.get("task") in tasks:
                records.append(record)
    return records


def load_splits(records_dir: str | Path, tasks: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, val) records of a `crystal encode` output directory; val is empty without val.jsonl."""
    records_dir = Path(records_dir)
    if not str(records_dir) or not records_dir.is_dir():
        raise CrystalError(f"records directory {str(records_dir) or '(none given)'!r} does not exist (make one with crystal encode)")
    train_file = records_dir / "train.jsonl"
    if not train_file.is_file():
        raise CrystalError(f"{records_dir}: no train.jsonl (make one with crystal encode)")
    train = read_records(train_file, tasks)
    if not train:
        raise CrystalError(f"{train_file}: no records" + (f" for tasks {', '.join(tasks)}" if tasks else ""))
    val_file = records_dir / "val.jsonl"
    return train, read_records(val_file, tasks) if val_file.is_file() else []


def tokenize_completion(tokenizer, completion: str) -> list[int]:
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def make_examples(tokenizer, records: list[dict], max_length: int) -> tuple[list[Example], int]:
    """Tokenized examples (prompt as the model sees it at generation, completion + EOS) and the too-long count."""
    if not records:
        return [], 0
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    completions = tokenizer([r["completion"] for r in records], add_special_tokens=False)["input_ids"]
    examples, too_long = [], 0
    for record, prompt_ids, completion_ids in zip(records, prompts, completions):
        example = Example(prompt_ids, record["completion"], completion_ids + [tokenizer.eos_token_id],
                          record.get("task") not in NON_CRYSTAL_TASKS)
        if example.length > max_length:
            too_long += 1
        else:
            examples.append(example)
    return examples, too_long


def translated(example: Example, tokenizer, rng: np.random.Generator) -> Example:
    """The same example with its crystal shifted by a random fractional translation (unparseable: unchanged)."""
    parsed = codec.parse_crystal(example.completion)
    if not parsed.ok:
        return example
    text = codec.encode_structure(codec.translate(parsed.structure, rng))
    return dataclasses.replace(example, completion=text, completion_ids=tokenize_completion(tokenizer, text))


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of example indices, a pure function of (seed, epoch): shuffle, sort within
    windows of BUCKET_BATCHES batches (little padding), then shuffle the batch order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window].tolist(), key=lambda i: lengths[i])
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask / labels (prompt and padding ignored by the loss)."""
    width = max(e.length for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = e.prompt_ids + e.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(e.prompt_ids): len(ids)] = torch.tensor(e.completion_ids)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


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
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    picked, wanted = hidden[:, :-1][mask], targets[mask]
    head = model.get_output_embeddings()
    if vocab is None:
        logits = head(picked).float()
    else:
        logits = F.linear(picked, head.weight[vocab.ids]).float()
        wanted = vocab.row[wanted]
    rows = mask.nonzero()[:, 0]
    return F.cross_entropy(logits, wanted, reduction="none"), rows


class CompletionNLL(torch.nn.Module):
    """completion_nll as a module, so DistributedDataParallel's forward hooks see every training call."""

    def __init__(self, model, vocab: LossVocab | None):
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_nll(self.model, batch, self.vocab)


# ----------------------------------------------------------------------------------------------- model


# -------------------------------------------------------------------------------------------- training


@dataclass
class StepEvent:
    """Sent to the caller's callback after every optimizer step (and after each evaluation)."""

    step: int
    max_steps: int
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    val_loss: float | None = None


@dataclass
class FinetuneResult:
    run_dir: Path
    steps: int
    interrupted: bool
    train_loss: float | None
    val_loss: float | None
    first_val_loss: float | None
    tokens: int
    wall_s: float
    counts: dict


def _device_and_dtype(train: TrainSection, local_rank: int):
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


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Elsewhere bf16 autocast is emulated and
    slower than fp32, so precision "auto" keeps fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _schedule(train: TrainSection, max_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, max_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


class _Stopper:
    """First Ctrl-C asks the loop to stop after the current step (and checkpoint); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextmanager
def _distributed() -> Iterator[tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun/accelerate's environment; a process group if > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, 0
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), world, local_rank
    finally:
        dist.destroy_process_group()


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        if (path / "trainer_state.json").is_file() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def finetune(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    on_event: Callable[[StepEvent], None] | None = None,
) -> FinetuneResult:
    """Train on config.data.records into run_dir (resuming from its last checkpoint): a LoRA adapter, or
    with train.method = "full" every weight of the base (saved whole as RUN/model/)."""
    with _distributed() as (rank, world, local_rank):
        return _Trainer(config, Path(run_dir), rank, world, local_rank).run(resume, on_event or (lambda event: None))


class _Trainer:
    def __init__(self, config: RunConfig, run_dir: Path, rank: int, world: int, local_rank: int):
        from peft import LoraConfig, get_peft_model

        from crystal_cli.bases import resolve_base

        self.config, self.run_dir, self.rank, self.world = config, run_dir, rank, world
        train, data = config.train, config.data
        records_dir = Path(data.records).expanduser()
        train_records, val_records = load_splits(records_dir, data.tasks)
        if data.max_train_records:
            train_records = train_records[: data.max_train_records]
        self.base_dir = resolve_base(config.base)
        self.device, weights_dtype, self.autocast_dtype = _device_and_dtype(train, local_rank)
        if train.threads > 0:
            torch.set_num_threads(train.threads)
        torch.manual_seed(train.seed + rank)
        base, self.tokenizer = load_base(self.base_dir, self.device, weights_dtype)
        if train.method == "full":
            self.model = self.net = base
            if weights_dtype != torch.float32:  # trained weights stay fp32; bf16 comes from autocast
                self.model.float()
        else:
            missing = [m for m in config.lora.target_modules if not any(n.endswith(f".{m}") for n, _ in base.named_modules())]
            if missing:
                raise CrystalError(f"lora.target_modules {missing} do not exist in base {config.base!r}")
            lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
            self.model = get_peft_model(base, lora)
            self.net = self.model.get_base_model()  # LoRA layers are injected in place: this trains them
        self.train_examples, too_long = make_examples(self.tokenizer, train_records, data.max_length)
        if not self.train_examples:
            raise CrystalError(f"{records_dir}: every train example is longer than data.max_length={data.max_length}")
        val_fitting, val_too_long = make_examples(self.tokenizer, val_records, data.max_length)
        val_pick = np.random.default_rng([train.seed, 7]).permutation(len(val_fitting))[: data.val_records]
        self.val_examples = [val_fitting[i] for i in sorted(val_pick)]
        self.loss_vocab = None
        if train.loss_vocab == "crystal":
            ids = crystal_vocab(self.tokenizer, self.train_examples + self.val_examples)
            self.loss_vocab = LossVocab.of(ids, base.get_output_embeddings().weight.shape[0], self.device)
        self.lengths = [e.length for e in self.train_examples]
        self.batches_per_epoch = len(epoch_batches(self.lengths, train.batch_size, train.seed, 0))
        micro_per_step = train.grad_accum * world
        self.max_steps = (math.ceil(train.epochs * self.batches_per_epoch / micro_per_step)
                          if train.epochs > 0 else train.max_steps)
        self.counts = {"train_records": len(train_records), "train_examples": len(self.train_examples),
                       "train_too_long": too_long, "val_records": len(val_records),
                       "val_examples": len(self.val_examples), "val_too_long": val_too_long,
                       "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                       "loss_vocab_size": len(self.loss_vocab.ids) if self.loss_vocab is not None
                       else base.get_output_embeddings().weight.shape[0],
                       "world_size": world}
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=train.learning_rate,
                                           weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(train, self.max_steps))
        self.forward = CompletionNLL(self.net, self.loss_vocab)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.forward, device_ids=[local_rank] if self.device.type == "cuda" else None)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    # ---------------------------------------------------------------------------------------- pieces

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _micro_batch(self, index: int) -> list[Example]:
        """Global micro-batch `index` (across epochs), with its seeded per-draw translations applied."""
        train = self.config.train
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(self.lengths, train.batch_size, train.seed, epoch))
        examples = []
        for i in self._epoch_cache[1][position]:
            example = self.train_examples[i]
            rng = np.random.default_rng([train.seed, 11, epoch, i])
            if example.crystal and self.config.data.translate > 0 and rng.random() < self.config.data.translate:
                example = translated(example, self.tokenizer, rng)
            examples.append(example)
        return examples

    def _batch(self, examples: list[Example]) -> dict:
        return {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}

    def _step(self, step: int) -> tuple[float, int, int]:
        """One optimizer step: (mean completion loss, completion tokens, input tokens) over all processes."""
        train = self.config.train
        per_step = train.grad_accum * self.world
        mine = [self._batch(self._micro_batch(step * per_step + k))
                for k in range(self.rank, per_step, self.world)]
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in mine),
                               sum(int(b["attention_mask"].sum()) for b in mine)], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(counts)
        label_tokens, input_tokens = int(counts[0]), int(counts[1])
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for k, batch in enumerate(mine):
            sync = self.forward.no_sync() if self.world > 1 and k < len(mine) - 1 else nullcontext()
            with sync, self._autocast():
                nll, _ = self.forward(batch)
                # DDP averages gradients over processes; scale so the result is the global token mean.
                loss = nll.sum() * (self.world / label_tokens)
            loss.backward()
            loss_sum += float(nll.detach().sum())
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            total = torch.tensor([float(loss_sum)], dtype=torch.float64)
            torch.distributed.all_reduce(total)
            loss_sum = total[0]
        return float(loss_sum) / label_tokens, label_tokens, input_tokens

    def _all_agree(self, requested: bool) -> bool:
        """A stop request on any process stops all of them at the same step."""
        if self.world == 1:
            return requested
        flag = torch.tensor([int(requested)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def evaluate(self) -> float | None:
        """Token-weighted mean completion loss over the fixed val subset (no augmentation, no dropout)."""
        if not self.val_examples:
            return None
        self.model.eval()
        order = sorted(range(len(self.val_examples)), key=lambda i: self.val_examples[i].length)
        size = self.config.train.batch_size
        total, tokens = 0.0, 0
        with torch.no_grad(), self._autocast():
            for start in range(0, len(order), size):
                batch = self._batch([self.val_examples[i] for i in order[start:start + size]])
                nll, _ = completion_nll(self.net, batch, self.loss_vocab)
                total += float(nll.sum())
                tokens += nll.numel()
        return total / tokens

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int, state: dict) -> None:
        from safetensors.torch import save_file

        if self.rank != 0:
            return
        checkpoints = self.run_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = checkpoints / f".tmp-step-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}, tmp / "trainable.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        final = checkpoints / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._save_weights()  # the latest checkpoint is always usable (export, generate, shipping)
        for _, old in _checkpoints(self.run_dir)[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> dict:
        from safetensors.torch import load_file

        found = _checkpoints(self.run_dir)
        if not found:
            return {"step": 0, "tokens": 0, "elapsed_s": 0.0, "first_val_loss": None}
        _, path = found[-1]
        weights = load_file(path / "trainable.safetensors", device=str(self.device))
        if set(weights) != set(self.trainable):
            raise CrystalError(f"{path}: checkpoint weights do not match this run's LoRA layout")
        with torch.no_grad():
            for name, tensor in weights.items():
                self.trainable[name].copy_(tensor)
        state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        return json.loads((path / "trainer_state.json").read_text())

    def _save_weights(self) -> None:
        """RUN/adapter (LoRA) or RUN/model (whole model, with tokenizer and base provenance), renamed in."""
        from crystal_cli.bases import PROVENANCE
        from crystal_cli.models import ADAPTER_DIR, MODEL_DIR

        name = MODEL_DIR if self.config.train.method == "full" else ADAPTER_DIR
        tmp = self.run_dir / f".{name}-tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        if name == MODEL_DIR:
            self.tokenizer.save_pretrained(str(tmp))
            if (self.base_dir / PROVENANCE).is_file():  # where export finds the tokenizer's GGUF metadata
                shutil.copy(self.base_dir / PROVENANCE, tmp / PROVENANCE)
        final, old = self.run_dir / name, self.run_dir / f".{name}-old{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- loop

    def run(self, resume: bool, on_event: Callable[[StepEvent], None]) -> FinetuneResult:
        train = self.config.train
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved = asdict(self.config)
            saved["data"]["records"] = str(Path(self.config.data.records).expanduser().resolve())
            saved["train"]["max_steps"] = self.max_steps
            _atomic_json(self.run_dir / "config.json",
                         {"base_spec": self.config.base} | saved | {"base": str(self.base_dir.resolve())})
        state = self.load_checkpoint() if resume else {"step": 0, "tokens": 0, "elapsed_s": 0.0, "first_val_loss": None}
        step, tokens = state["step"], state["tokens"]
        if self.rank == 0:  # forget lines logged after the checkpoint we resume from: they are replayed
            from crystal_cli.structure_io import read_jsonl

            kept = [row for row in read_jsonl(metrics_path) if row["step"] <= step] if resume else []
            metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        metrics = metrics_path.open("a") if self.rank == 0 else None

        def log(row: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

        first_val = state["first_val_loss"]
        val_loss = None
        if step == 0 and train.eval_every and self.val_examples:
            first_val = val_loss = self.evaluate()
            log({"step": 0, "val_loss": val_loss})
            on_event(StepEvent(step=0, max_steps=self.max_steps, val_loss=val_loss))
        started = time.perf_counter() - state["elapsed_s"]
        examples_per_step = train.batch_size * train.grad_accum * self.world
        window_loss, window_labels, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
        train_loss = None
        interrupted = False
        try:
            with _Stopper() as stopper:
                while step < self.max_steps:
                    lr = self.scheduler.get_last_lr()[0]
                    loss, label_tokens, input_tokens = self._step(step)
                    step += 1
                    tokens += input_tokens
                    window_loss += loss * label_tokens
                    window_labels += label_tokens
                    window_inputs += input_tokens
                    train_loss = loss
                    speed = window_inputs / max(1e-9, time.perf_counter() - window_start)
                    on_event(StepEvent(step=step, max_steps=self.max_steps, loss=loss, lr=lr, tokens_per_s=speed))
                    if step % train.log_every == 0 or step == self.max_steps:
                        log({"step": step, "examples": step * examples_per_step, "loss": window_loss / window_labels,
                             "lr": lr, "tokens_per_s": speed, "tokens": tokens, "elapsed_s": time.perf_counter() - started})
                        window_loss, window_labels, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
                    out_of_time = self._all_agree(
                        train.max_minutes > 0 and time.perf_counter() - started >= 60 * train.max_minutes)
                    last = step == self.max_steps or out_of_time
                    if self.val_examples and (step % train.eval_every == 0 or last):
                        val_loss = self.evaluate()
                        log({"step": step, "examples": step * examples_per_step, "val_loss": val_loss})
                        on_event(StepEvent(step=step, max_steps=self.max_steps, val_loss=val_loss))
                    stop = self._all_agree(stopper.requested)
                    if stop or last or step % train.checkpoint_every == 0:
                        self.save_checkpoint(step, {"tokens": tokens, "elapsed_s": time.perf_counter() - started,
                                                    "first_val_loss": first_val})
                    if stop:
                        interrupted = True
                        break
                    if out_of_time:
                        break
        except torch.OutOfMemoryError:
            t = self.config.train
            raise CrystalError(
                f"out of memory at step {step + 1} with batch_size={t.batch_size}, max_length="
                f"{self.config.data.max_length}, grad_accum={t.grad_accum}: lower train.batch_size (--batch-size) "
                "or data.max_length (--max-length) and raise train.grad_accum (--grad-accum) to keep the batch"
            ) from None
        finally:
            if metrics is not None:
                metrics.close()
        wall = time.perf_counter() - started
        if not interrupted and self.rank == 0:
            _atomic_json(self.run_dir / "summary.json", {
                "steps": step, "tokens": tokens, "wall_s": wall, "train_loss": train_loss, "val_loss": val_loss,
                "first_val_loss": first_val, "counts": self.counts, "device": str(self.device),
                "precision": str(self.autocast_dtype or "fp32"), "examples": step * examples_per_step,
                "stopped_by": "max_steps" if step >= self.max_steps else "max_minutes",
            })
        return FinetuneResult(self.run_dir, step, interrupted, train_loss, val_loss, first_val, tokens, wall, self.counts)


def parse_override(text: str) -> tuple[str, object]:
    """`--set section.key=VALUE` with VALUE read as a TOML value (bare words are taken as strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CrystalError(f"--set {text!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value

