"""The training loop of `crystal finetune` (LoRA, or every weight).

A run directory holds everything needed to reproduce, resume or use a run::

    RUN/config.json          fully resolved config ("base": resolved HF dir, "base_spec": what was asked)
    RUN/metrics.jsonl        one line per log step (loss, lr, tokens/s) and per evaluation (val_loss)
    RUN/checkpoints/step-N/  trainable weights, optimizer, scheduler, RNG state (atomically renamed in)
    RUN/adapter/             the final PEFT adapter (no embedding or lm_head weights), train.method = lora
    RUN/model/               the whole trained model (transformers directory + tokenizer), train.method = full
    RUN/summary.json         data counts, steps, final losses, wall time
    RUN/snapshots/step-N/    with train.snapshot_every: that step's weights and config.json, kept (a run directory)

Exact resume: batch order and augmentation are pure functions of (seed, epoch, position), and the
checkpoint carries optimizer, scheduler and torch RNG state, so a resumed run replays the same steps.
Several GPUs/nodes: launched under torchrun/accelerate (WORLD_SIZE > 1) the same code runs DDP.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crystal_cli import recipes, runs
from crystal_cli.errors import CrystalError
from crystal_cli.finetune.config import CONFIG_FILE, RunConfig, saved_form
from crystal_cli.finetune.data import (Example, OverlapDigits, collate, epoch_batches, imitated_tokens, load_splits,
                                       make_examples, read_negatives, read_positives, size_shares,
                                       translated, with_overlaps, with_task_repeats)
from crystal_cli.finetune.model import (CompletionNLL, LossVocab, compile_decoder, compiles, completion_nll,
                                        compute_context, crystal_vocab, device_and_dtype, trainable)
from crystal_cli.models import load_base


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


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def grown_depth(weights: dict[str, torch.Tensor], factor: int) -> dict[str, torch.Tensor]:
    """A Llama's weights deepened `factor` times: each of its layers followed by factor − 1 copies of itself
    whose attention and MLP output projections are zero, so every added block adds nothing to the residual
    stream and the deeper model computes exactly what the init did (function-preserving growth, as Net2Net's
    identity layers). The copies' other weights are the trained ones, not noise: once the zeroed projections
    move, the new blocks start from features the init already computes."""
    grown = {}
    for key, value in weights.items():
        if not (m := _LAYER.fullmatch(key)):
            grown[key] = value
            continue
        for copy in range(factor):
            tensor = torch.zeros_like(value) if copy and m[2] in _BLOCK_OUTPUTS else value.clone()
            grown[f"model.layers.{int(m[1]) * factor + copy}.{m[2]}"] = tensor
    return grown


def _load_init(base, spec: str) -> dict:
    """Copy a finished whole-model run's weights (train.init: a run directory or a shipped name) into the
    freshly loaded base, whose architecture they must fit, or fit once deepened (a base with k times the
    init's layers and otherwise its shape: `grown_depth`); returns what summary.json records of it."""
    from crystal_cli.models import is_run_dir, load_run, model_fingerprint, read_weights, resolve_model

    source = resolve_model(spec)
    if not is_run_dir(source):
        raise CrystalError(f"train.init {spec!r}: not a finetune run directory nor a shipped model")
    info = load_run(source)
    if info.adapter_dir is not None:
        raise CrystalError(f"train.init {spec!r}: a LoRA run; init takes a whole-model run (train.method = full)")
    weights, growth = read_weights(info.base_dir), {}
    have = json.loads((info.base_dir / "config.json").read_text()).get("num_hidden_layers", 0)
    want = base.config.num_hidden_layers
    if 0 < have < want and want % have == 0:
        weights, growth = grown_depth(weights, want // have), {"init_growth": f"{have} -> {want} layers"}
    try:
        missing, unexpected = base.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise CrystalError(f"train.init {spec!r}: its weights do not fit the base ({str(exc).splitlines()[1].strip()})") from None
    tied = {"lm_head.weight"} if base.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CrystalError(f"train.init {spec!r}: its weights do not fit the base "
                           f"({len(set(missing) - tied)} missing, {len(unexpected)} unexpected tensors)")
    return {"init": str(Path(source).resolve()), "init_fingerprint": model_fingerprint(source)} | growth


class _Trainer:
    def __init__(self, config: RunConfig, run_dir: Path, rank: int, world: int, local_rank: int):
        from crystal_cli.bases import resolve_base

        self.config, self.run_dir, self.rank, self.world = config, run_dir, rank, world
        train, data = config.train, config.data
        records_dir = Path(data.records).expanduser()
        train_records, val_records = load_splits(records_dir, data.tasks)
        if data.max_train_records:
            train_records = train_records[: data.max_train_records]
        record_count = len(train_records)
        train_records = with_task_repeats(train_records, data.task_repeats)
        self.base_dir = resolve_base(config.base)
        self.device, weights_dtype, self.autocast_dtype = device_and_dtype(train, local_rank)
        if train.threads > 0:
            torch.set_num_threads(train.threads)
        torch.manual_seed(train.seed + rank)
        base, self.tokenizer = load_base(self.base_dir, self.device, weights_dtype)
        init = _load_init(base, train.init) if train.init else {}
        self.model, self.net = trainable(config, base, weights_dtype)
        self.train_examples, too_long = make_examples(self.tokenizer, train_records, data.max_length, data.site_order)
        if not self.train_examples:
            raise CrystalError(f"{records_dir}: every train example is longer than data.max_length={data.max_length}")
        val_fitting, val_too_long = make_examples(self.tokenizer, val_records, data.max_length, data.site_order)
        val_pick = np.random.default_rng([train.seed, 7]).permutation(len(val_fitting))[: data.val_records]
        self.val_examples = [val_fitting[i] for i in sorted(val_pick)]
        self.overlaps = OverlapDigits.of(self.tokenizer) if train.overlap_unlikelihood > 0 else None
        self.negatives, negative_counts = [], {}
        if data.negatives:
            path = Path(data.negatives).expanduser()
            self.negatives, negative_counts = read_negatives(path, self.tokenizer, self.overlaps, data.max_length)
            negative_counts["negatives_sha256"] = runs.fingerprint(path)
        self.positives, self.positive_p, positive_counts = [], np.zeros(0), {}
        if data.positives:
            path = Path(data.positives).expanduser()
            shares = size_shares(self.train_examples) if data.positives_sizes == "train" else None
            self.positives, self.positive_p, positive_counts = read_positives(
                path, self.tokenizer, data.max_length, shares, data.positives_relabel, data.positives_even_formulas)
            if self.overlaps is not None:
                self.positives = [with_overlaps(e, self.overlaps) for e in self.positives]
            positive_counts["positives_sha256"] = runs.fingerprint(path)
        self.loss_vocab = None
        if train.loss_vocab == "crystal":
            ids = crystal_vocab(self.tokenizer, self.train_examples + self.val_examples + self.negatives
                                 + self.positives)
            self.loss_vocab = LossVocab.of(ids, base.get_output_embeddings().weight.shape[0], self.device)
        self.lengths = [e.length for e in self.train_examples]
        self.batches_per_epoch = len(epoch_batches(self.lengths, train.batch_size, train.seed, 0))
        micro_per_step = train.grad_accum * world
        self.max_steps = (math.ceil(train.epochs * self.batches_per_epoch / micro_per_step)
                          if train.epochs > 0 else train.max_steps)
        self.counts = {"train_records": record_count, "train_examples": len(self.train_examples),
                       "train_too_long": too_long, "val_records": len(val_records),
                       "val_examples": len(self.val_examples), "val_too_long": val_too_long,
                       "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                       "loss_vocab_size": len(self.loss_vocab.ids) if self.loss_vocab is not None
                       else base.get_output_embeddings().weight.shape[0],
                       "world_size": world} | negative_counts | positive_counts | init
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # fused: one kernel over all tensors; the per-tensor loop took 0.11 s of a 0.87 s scratch-384x8 step on
        # 2 cores (31.5 M weights), the fused one 0.02 s. A resumed run keeps the kind its checkpoint was made
        # with (load_state_dict restores the param group's "fused"), so old runs continue exactly.
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=train.learning_rate,
                                           weight_decay=train.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: recipes.lr_factor(
            step, train.warmup_steps, self.max_steps, train.min_lr_ratio))
        digit_ids = None if self.overlaps is None else torch.from_numpy(self.overlaps.ids).to(self.device)
        self.compiled = compiles(train.compile, self.device)
        if self.compiled:
            compile_decoder(self.net, self.device)
        self.forward = CompletionNLL(self.net, self.loss_vocab, digit_ids)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.forward, device_ids=[local_rank] if self.device.type == "cuda" else None)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    # ---------------------------------------------------------------------------------------- pieces

    def _compute(self):
        return compute_context(self.device, self.autocast_dtype)

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
                example = translated(example, self.tokenizer, rng, self.config.data.site_order)
            if self.overlaps is not None:
                example = with_overlaps(example, self.overlaps)
            examples.append(example)
        if self.negatives:  # the model's own samples, drawn by (seed, index) alone so a resume replays them
            rng = np.random.default_rng([train.seed, 13, index])
            count = min(self.config.data.negatives_per_batch, len(self.negatives))
            examples.extend(self.negatives[i] for i in sorted(rng.choice(len(self.negatives), count, replace=False)))
        if self.positives:  # the same for the valid ones, at data.read_positives' probabilities
            rng = np.random.default_rng([train.seed, 17, index])
            count = min(self.config.data.positives_per_batch, len(self.positives))
            picks = rng.choice(len(self.positives), count, replace=False, p=self.positive_p)
            examples.extend(self.positives[i] for i in sorted(picks))
        return examples

    def _batch(self, examples: list[Example]) -> dict:
        n_digits = 0 if self.overlaps is None else len(self.overlaps.ids)
        return {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id, n_digits).items()}

    def _step(self, step: int) -> tuple[float, int, int, float, int]:
        """One optimizer step over all processes: (mean completion loss, completion tokens, input tokens, and
        with train.overlap_unlikelihood the summed overlap mass and the positions it was taken at)."""
        train = self.config.train
        per_step = train.grad_accum * self.world
        mine = [self._batch(self._micro_batch(step * per_step + k))
                for k in range(self.rank, per_step, self.world)]
        counts = torch.tensor([sum(imitated_tokens(b) for b in mine),
                               sum(int(b["attention_mask"].sum()) for b in mine)], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(counts)
        label_tokens, input_tokens = int(counts[0]), int(counts[1])
        self.model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # nll, overlap mass, overlap positions
        for k, batch in enumerate(mine):
            sync = self.forward.no_sync() if self.world > 1 and k < len(mine) - 1 else nullcontext()
            with sync, self._compute():
                nll, _, mass = self.forward(batch)
                objective = nll.sum()
                if len(mass):
                    objective = objective - train.overlap_unlikelihood * torch.log1p(-mass.clamp(max=1 - 1e-6)).sum()
                # DDP averages gradients over processes; scale so the result is the global token mean.
                loss = objective * (self.world / label_tokens)
            loss.backward()
            sums += torch.tensor([float(nll.detach().sum()), float(mass.detach().sum()), len(mass)], dtype=torch.float64)
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        return float(sums[0]) / label_tokens, label_tokens, input_tokens, float(sums[1]), int(sums[2])

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
        with torch.no_grad(), self._compute():
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

    def _save_snapshot(self, step: int) -> None:
        """RUN/snapshots/step-N: the weights just saved and the run's config, renamed in: a run directory of its
        own that generate, export and perplexity read like the run, and that no checkpoint pruning touches."""
        from crystal_cli.models import ADAPTER_DIR, MODEL_DIR

        if self.rank != 0:
            return
        snapshots = self.run_dir / "snapshots"
        snapshots.mkdir(exist_ok=True)
        tmp = snapshots / f".tmp-step-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        name = MODEL_DIR if self.config.train.method == "full" else ADAPTER_DIR
        shutil.copytree(self.run_dir / name, tmp / name)
        shutil.copy(self.run_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        final = snapshots / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)  # a resumed run replays the steps after its checkpoint
        os.replace(tmp, final)

    # -------------------------------------------------------------------------------------------- loop

    def run(self, resume: bool, on_event: Callable[[StepEvent], None]) -> FinetuneResult:
        train = self.config.train
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            runs.write_json(self.run_dir / CONFIG_FILE, saved_form(self.config, self.base_dir, self.max_steps))
        state = self.load_checkpoint() if resume else {"step": 0, "tokens": 0, "elapsed_s": 0.0, "first_val_loss": None}
        step, tokens = state["step"], state["tokens"]
        if self.rank == 0:  # forget lines logged after the checkpoint we resume from: they are replayed
            from crystal_cli.structure_io import read_jsonl

            runs.write_jsonl(metrics_path, [row for row in read_jsonl(metrics_path) if row["step"] <= step] if resume else [])
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
        window_mass, window_marked = 0.0, 0
        train_loss = None
        interrupted = False
        try:
            with _Stopper() as stopper:
                while step < self.max_steps:
                    lr = self.scheduler.get_last_lr()[0]
                    loss, label_tokens, input_tokens, mass, marked = self._step(step)
                    window_mass += mass
                    window_marked += marked
                    step += 1
                    tokens += input_tokens
                    window_loss += loss * label_tokens
                    window_labels += label_tokens
                    window_inputs += input_tokens
                    train_loss = loss
                    speed = window_inputs / max(1e-9, time.perf_counter() - window_start)
                    on_event(StepEvent(step=step, max_steps=self.max_steps, loss=loss, lr=lr, tokens_per_s=speed))
                    if step % train.log_every == 0 or step == self.max_steps:
                        row = {"step": step, "examples": step * examples_per_step, "loss": window_loss / window_labels,
                               "lr": lr, "tokens_per_s": speed, "tokens": tokens, "elapsed_s": time.perf_counter() - started}
                        if self.overlaps is not None:  # mean probability of an overlapping digit where one exists
                            row["overlap_mass"] = window_mass / window_marked if window_marked else None
                        log(row)
                        window_loss, window_labels, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
                        window_mass, window_marked = 0.0, 0
                    out_of_time = self._all_agree(
                        train.max_minutes > 0 and time.perf_counter() - started >= 60 * train.max_minutes)
                    last = step == self.max_steps or out_of_time
                    if self.val_examples and (step % train.eval_every == 0 or last):
                        val_loss = self.evaluate()
                        log({"step": step, "examples": step * examples_per_step, "val_loss": val_loss})
                        on_event(StepEvent(step=step, max_steps=self.max_steps, val_loss=val_loss))
                    stop = self._all_agree(stopper.requested)
                    snapshot = train.snapshot_every > 0 and step % train.snapshot_every == 0
                    if stop or last or snapshot or step % train.checkpoint_every == 0:
                        self.save_checkpoint(step, {"tokens": tokens, "elapsed_s": time.perf_counter() - started,
                                                    "first_val_loss": first_val})
                    if snapshot:
                        self._save_snapshot(step)
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
            runs.write_json(self.run_dir / "summary.json", {
                "steps": step, "tokens": tokens, "wall_s": wall, "train_loss": train_loss, "val_loss": val_loss,
                "first_val_loss": first_val, "counts": self.counts, "device": str(self.device),
                "precision": str(self.autocast_dtype or "fp32"), "compiled": self.compiled,
                "examples": step * examples_per_step,
                "stopped_by": "max_steps" if step >= self.max_steps else "max_minutes",
            })
        return FinetuneResult(self.run_dir, step, interrupted, train_loss, val_loss, first_val, tokens, wall, self.counts)
