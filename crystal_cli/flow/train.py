"""Conditional flow matching on (c0, c1) pairs: `crystal flow train`.

For a pair and t ~ U(0, 1): f_t = exp_{f0}(t · log_{f0}(f1)) on the torus, l_t = (1 − t) l0 + t l1; the
targets are u_f = log_{f0}(f1) with each cell's mean removed and u_l = l1 − l0, and the loss is
λ_f · mean_atoms ‖v_f − u_f‖² + λ_l · mean_cells ‖v_l − u_l‖² (FlowLLM: λ_f = 200, λ_l = 1).

A run directory holds config.json (the whole configuration, authoritative on --resume), manifest.json
(crystal_cli.runs: the pairs' content hash, the flattened configuration, versions), metrics.jsonl
(append-only), checkpoint.pt (model, EMA, optimizer, schedule, random streams: resuming reproduces an
uninterrupted run exactly) and, when training ends, model.pt (EMA weights) which `crystal refine` loads.
A resume with other pairs or another configuration is refused, except how often it logs, evaluates and
checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crystal_cli import recipes, runs
from crystal_cli.errors import CrystalError
from crystal_cli.flow.manifolds import remove_mean, torus_geodesic, torus_log
from crystal_cli.flow.network import Cells, FlowNet, FlowNetConfig
from crystal_cli.flow.pairs import Pair, load_pairs, pairs_file, split_pairs
from crystal_cli.structure_io import append_jsonl, read_jsonl

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
RESUME_SAFE = ("train.log_every", "train.checkpoint_every", "train.eval_every")  # change no trained weight


@dataclass
class TrainConfig:
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    lambda_f: float = 200.0
    lambda_l: float = 1.0
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 500
    eval_every: int = 500
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise CrystalError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "grad_clip", "lambda_f", "lambda_l"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise CrystalError(f"train.{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CrystalError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CrystalError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class RunConfig:
    """Everything a run needs; written to RUN/config.json."""

    pairs: str
    model: FlowNetConfig = field(default_factory=FlowNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "model": asdict(self.model), "train": asdict(self.train)}

    def flat(self) -> dict:
        """Every setting but the pairs path as "section.key" (what a manifest compares)."""
        return {key: value for key, value in recipes.as_flat(self).items() if key != "pairs"}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> RunConfig:
        """A recipe's or config.json's tables (pairs, model, train), every key and type checked."""
        return recipes.build(cls, recipes.flatten(cls, data), where)


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class PairBatch:
    cells: Cells
    f0: torch.Tensor
    f1: torch.Tensor
    l0: torch.Tensor
    l1: torch.Tensor


def collate(pairs: Sequence[Pair]) -> PairBatch:
    counts = torch.tensor([len(p.numbers) for p in pairs])
    return PairBatch(
        cells=Cells.from_counts(torch.cat([p.numbers for p in pairs]), counts),
        f0=torch.cat([p.f0 for p in pairs]),
        f1=torch.cat([p.f1 for p in pairs]),
        l0=torch.stack([p.l0 for p in pairs]),
        l1=torch.stack([p.l1 for p in pairs]),
    )


def flow_matching_loss(
    model: FlowNet, batch: PairBatch, t: torch.Tensor, lambda_f: float, lambda_l: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, coordinate term, lattice term) at times t (one per cell)."""
    cells = batch.cells
    u_raw = torus_log(batch.f0, batch.f1)
    frac_t = torus_geodesic(batch.f0, batch.f1, t[cells.graph, None])
    lattice_t = batch.l0 + t[:, None] * (batch.l1 - batch.l0)
    u_frac = remove_mean(u_raw, cells.graph, cells.num_graphs)
    u_lattice = batch.l1 - batch.l0
    v_frac, v_lattice = model(t, cells, frac_t, lattice_t)
    loss_f = (v_frac - u_frac).pow(2).sum(-1).mean()
    loss_l = (v_lattice - u_lattice).pow(2).sum(-1).mean()
    return lambda_f * loss_f + lambda_l * loss_l, loss_f, loss_l


def data_statistics(model: FlowNet, pairs: Sequence[Pair]) -> None:
    """Standardize the network's lattice input and velocity outputs on the training pairs."""
    batch = collate(pairs)
    u_frac = remove_mean(torus_log(batch.f0, batch.f1), batch.cells.graph, batch.cells.num_graphs)
    model.set_statistics(torch.cat([batch.l0, batch.l1]), batch.l1 - batch.l0, u_frac)


@torch.no_grad()
def ema_update(ema: FlowNet, model: FlowNet, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


@torch.no_grad()
def validation_loss(model: FlowNet, pairs: Sequence[Pair], config: TrainConfig) -> dict:
    """Loss on held-out pairs at a fixed grid of times (deterministic, comparable across steps)."""
    totals = {"val_loss": 0.0, "val_loss_f": 0.0, "val_loss_l": 0.0}
    grid = torch.linspace(0.05, 0.95, 4)
    count = 0
    for start in range(0, len(pairs), config.batch_size):
        batch = collate(pairs[start:start + config.batch_size])
        for t_value in grid:
            t = torch.full((batch.cells.num_graphs,), float(t_value))
            loss, loss_f, loss_l = flow_matching_loss(model, batch, t, config.lambda_f, config.lambda_l)
            for key, value in zip(totals, (loss, loss_f, loss_l)):
                totals[key] += float(value)
            count += 1
    return {k: round(v / count, 6) for k, v in totals.items()}


# -------------------------------------------------------------------------------------------- the loop


def train(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: Callable[[int, int, dict | None], None] | None = None,
) -> dict:
    """Train (or resume) a flow run in `run_dir`. `progress(step, total, metrics_row_or_None)` is called
    after every step. Returns a summary (steps, final metrics, paths)."""
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    saved = None
    if resume:
        if not checkpoint_path.exists():
            raise CrystalError(f"{run_dir}: nothing to resume (no {CHECKPOINT_FILE})")
        saved = saved_config(run_dir)
        config = config or saved
    manifest = runs.Manifest("flow train", config.flat(), inputs={"pairs": runs.input_record(pairs_file(config.pairs))},
                             safe=RESUME_SAFE, outputs=(CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, MODEL_FILE))
    start = runs.begin(runs.manifest_path(run_dir, directory=True), manifest, resume=resume,
                       existing=checkpoint_path.exists() or (run_dir / MODEL_FILE).exists(),
                       exists_message=f"{run_dir}: already holds a run; pass --resume to continue it or choose another -o",
                       adopt=lambda: _adopt(run_dir, saved, config))
    tc = config.train
    pairs = load_pairs(config.pairs)
    train_pairs, val_pairs = split_pairs(pairs, tc.val_fraction, tc.seed)

    torch.manual_seed(tc.seed)
    model = FlowNet(config.model)
    data_statistics(model, train_pairs)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: recipes.lr_factor(step, tc.warmup_steps, tc.steps))
    generator = torch.Generator().manual_seed(tc.seed)
    step = 0

    if resume:
        state = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        step = int(state["step"])
        _truncate_metrics(run_dir / METRICS_FILE, step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run_dir / METRICS_FILE, 0)  # a run killed before its first checkpoint starts over
    runs.write_json(run_dir / CONFIG_FILE, config.to_dict())
    start.commit()

    window = {"loss": 0.0, "loss_f": 0.0, "loss_l": 0.0, "grad_norm": 0.0}
    window_steps, window_start = 0, time.perf_counter()
    last_row: dict = {}
    with (run_dir / METRICS_FILE).open("a") as metrics:
        while step < tc.steps:
            model.train()
            index = torch.randint(len(train_pairs), (tc.batch_size,), generator=generator)
            batch = collate([train_pairs[int(i)] for i in index])
            t = torch.rand(batch.cells.num_graphs, generator=generator)
            loss, loss_f, loss_l = flow_matching_loss(model, batch, t, tc.lambda_f, tc.lambda_l)
            if not torch.isfinite(loss):
                raise CrystalError(f"{run_dir}: loss became {float(loss)} at step {step + 1}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            schedule.step()
            ema_update(ema, model, tc.ema_decay)
            step += 1

            for key, value in zip(window, (loss, loss_f, loss_l, grad_norm)):
                window[key] += value.item()
            window_steps += 1
            row = None
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, **{k: round(v / window_steps, 6) for k, v in window.items()},
                       "lr": schedule.get_last_lr()[0], "steps_per_s": round(window_steps / max(elapsed, 1e-9), 3)}
                window = dict.fromkeys(window, 0.0)
                window_steps, window_start = 0, time.perf_counter()
            if val_pairs and (step % tc.eval_every == 0 or step == tc.steps):
                ema.eval()
                row = {**(row or {"step": step}), **validation_loss(ema, val_pairs, tc)}
            if row is not None:
                append_jsonl(metrics, row)
                last_row = row
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                _save_checkpoint(checkpoint_path, step, model, ema, optimizer, schedule, generator)
            if progress:
                progress(step, tc.steps, row)

    _atomic_save(ema.state_dict(), run_dir / MODEL_FILE)
    return {
        "run": str(run_dir),
        "steps": step,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "last_metrics": last_row,
        "model": str(run_dir / MODEL_FILE),
    }


def _save_checkpoint(path: Path, step: int, model, ema, optimizer, schedule, generator) -> None:
    _atomic_save(
        {
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": generator.get_state(),
        },
        path,
    )


def _atomic_save(obj: object, path: Path) -> None:
    with runs.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    runs.write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


def saved_config(run_dir: str | Path) -> RunConfig:
    """The configuration a run directory was started with (its config.json)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CrystalError(f"{run_dir}: not a flow run (no {CONFIG_FILE})")
    return RunConfig.from_dict(json.loads(path.read_text()), str(path))


def resumed_config(run_dir: str | Path, settings: dict[str, object], where: str) -> RunConfig:
    """The saved configuration with a recipe's and the flags' dotted settings laid over it (a resume names
    only what it means to keep or change; train() then refuses any change that is not safe)."""
    return recipes.build(RunConfig, settings, where, start=saved_config(run_dir))


def _adopt(run_dir: Path, saved: RunConfig, given: RunConfig) -> dict:
    """A run started before manifests: its config.json must hold the given configuration."""
    legacy = runs.Manifest("flow train", saved.flat(), safe=RESUME_SAFE)
    changed = runs.differences(legacy, runs.Manifest("flow train", given.flat(), safe=RESUME_SAFE))
    if changed:
        raise CrystalError(f"{run_dir / CONFIG_FILE}: --resume with settings other than the run it continues: "
                           + "; ".join(changed))
    return {"rows": 0, "unchecked": ["pairs"]}


# --------------------------------------------------------------------------------------------- loading


def load_model(run: str | Path) -> FlowNet:
    """The EMA network of a finished run (RUN/model.pt + RUN/config.json), or of a shipped model directory
    with the same two files. A run still training falls back to the EMA weights of its last checkpoint."""
    run = Path(run)
    config_path = run / CONFIG_FILE
    if not config_path.exists():
        raise CrystalError(f"{run}: not a flow run or model (no {CONFIG_FILE})")
    config = RunConfig.from_dict(json.loads(config_path.read_text()), str(config_path))
    model = FlowNet(config.model)
    if (run / MODEL_FILE).exists():
        state = torch.load(run / MODEL_FILE, weights_only=True)
    elif (run / CHECKPOINT_FILE).exists():
        state = torch.load(run / CHECKPOINT_FILE, weights_only=True)["ema"]
    else:
        raise CrystalError(f"{run}: no {MODEL_FILE} or {CHECKPOINT_FILE}")
    model.load_state_dict(state)
    model.source = str(run.resolve())
    return model.eval()
