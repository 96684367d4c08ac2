"""`crystal finetune`'s configuration: the recipe's tables (lora, data, train), how a recipe and `--set`
overrides resolve into one RunConfig, and which keys a `--resume` may change.

A run's RUN/config.json is `asdict(RunConfig)` plus "base_spec" (what was asked) and "base" (the resolved
HF directory). Keys added since a run was written take their defaults, which are the old behaviour (e.g.
train.loss_vocab = "full"), so every run directory made so far still resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crystal_cli import recipes
from crystal_cli.errors import CrystalError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    # {task: k}: each train record of that task is drawn k times an epoch (another translation each time), so a
    # task the model honours worst gets more of the updates without dropping the others. {} = once each.
    task_repeats: dict[str, int] = field(default_factory=dict)
    max_length: int = 512  # longer examples are skipped and counted, never truncated
    translate: float = 0.0  # probability of a random translation each time a crystal is drawn
    # Order of a crystal completion's sites: "as-given" (the records'; runs made before this key) or "sorted"
    # (grouped by element, increasing (x, y, z) within each: codec.sorted_sites), applied after translation.
    site_order: str = "as-given"
    max_train_records: int = 0  # 0 = all
    val_records: int = 256  # val examples scored at each evaluation; 0 = no evaluation
    # The model's own guard-off samples (a `crystal generate --min-distance 0` jsonl): each micro-batch adds
    # negatives_per_batch of them, trained only by train.overlap_unlikelihood at the positions the distance
    # guard marks on them (data.with_overlaps), never imitated. "" = none.
    negatives: str = ""
    negatives_per_batch: int = 0
    # The model's own samples again (a `crystal generate` jsonl): each micro-batch adds positives_per_batch of the
    # valid ones (data.read_positives: structurally and compositionally valid, drawn at the atom-count
    # distribution positives_sizes names), imitated like train records. Rejection-sampling self-training. "" = none.
    positives: str = ""
    positives_per_batch: int = 0
    # Whose atom-count distribution the drawn positives follow: "own" (the samples', invalid ones included) or
    # "train" (the train records': pulls the model back towards the data's larger cells)
    positives_sizes: str = "own"
    # true: imitate each valid positive under the unconditional prompt, its own formula's and its own space
    # group's (data.relabeled_prompts, hindsight relabelling) instead of the prompt it was sampled under
    positives_relabel: bool = False
    # true: within each atom-count bin every reduced formula of the valid positives is drawn equally often,
    # split among its samples, instead of every sample (data.read_positives: the model's favourites not amplified)
    positives_even_formulas: bool = False


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
    # > 0: also keep the weights of every snapshot_every-th step as RUN/snapshots/step-N, a run directory of its
    # own (`crystal generate -m RUN/snapshots/step-N`): a long run's learning curve, sampled after the fact
    snapshot_every: int = 0
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16
    threads: int = 0  # CPU threads for torch; 0 = torch's default (use 1 on a busy shared host)
    method: str = "lora"  # lora: train a LoRA adapter on the frozen base | full: train every weight
    # Softmax of the loss over: "full" vocabulary (runs made before this key existed) or "crystal": the
    # tokens the sampling grammar can ever emit plus every completion token of the data (model.crystal_vocab).
    loss_vocab: str = "full"
    # Start from the weights of a finished whole-model run (a run directory or a shipped name, e.g. "default")
    # instead of the base's; the architecture must be the base's. "" = the base's own weights.
    init: str = ""
    # > 0: add this weight times the unlikelihood -log(1 - p) of the digits that would put a site closer than
    # 0.5 Å to an earlier one (model.completion_losses; the distance guard's mask, learnt instead of imposed)
    overlap_unlikelihood: float = 0.0
    # The decoder under torch.compile: "off" (runs made before this key), "on", or "auto" (a CPU with AMX and a
    # C++ compiler). The rule and its measurements: model.compiles; what is compiled: model.compile_decoder.
    compile: str = "off"


@dataclass
class RunConfig:
    base: str = "smollm2-135m"  # a base name, a .gguf file or an HF directory (see bases.resolve_base)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


RESUME_OVERRIDABLE = {"train.max_steps", "train.max_minutes", "train.threads", "train.compile", "train.eval_every",
                      "train.checkpoint_every", "train.log_every", "train.keep_checkpoints", "train.snapshot_every"}
CHOICES = {"train.precision": ("auto", "fp32", "bf16"), "train.method": ("lora", "full"),
           "train.loss_vocab": ("full", "crystal"), "data.site_order": ("as-given", "sorted"),
           "data.positives_sizes": ("own", "train"), "train.compile": ("off", "on", "auto")}
CONFIG_FILE = "config.json"


def load_recipe(path: str | Path) -> dict[str, object]:
    """A training recipe (TOML) as dotted keys, every key and type checked now: the recipe is wrong on its
    own, whatever overrides follow."""
    flat = recipes.load(path, RunConfig)
    _build(flat, str(path))
    return flat


def _build(settings: dict[str, object], where: str, start: RunConfig | None = None) -> RunConfig:
    config = recipes.build(RunConfig, settings, where, start=start, choices=CHOICES)
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
    if t.snapshot_every < 0:
        raise CrystalError(f"{where}: train.snapshot_every must be >= 0 (0: no snapshots), got {t.snapshot_every}")
    if t.max_steps < 1 and t.epochs <= 0:
        raise CrystalError(f"{where}: give train.max_steps >= 1 or train.epochs > 0")
    if not 0.0 <= d.translate <= 1.0 or not 0.0 <= lora.dropout < 1.0:
        raise CrystalError(f"{where}: data.translate must be in [0, 1] and lora.dropout in [0, 1)")
    if t.learning_rate <= 0 or not 0.0 <= t.min_lr_ratio <= 1.0:
        raise CrystalError(f"{where}: train.learning_rate must be > 0 and train.min_lr_ratio in [0, 1]")
    bad_repeats = {task: k for task, k in d.task_repeats.items() if k < 1 or (d.tasks and task not in d.tasks)}
    if bad_repeats:
        raise CrystalError(f"{where}: data.task_repeats must give each task a count >= 1 and name only tasks "
                           f"kept by data.tasks, got {bad_repeats}")
    if not lora.target_modules:
        raise CrystalError(f"{where}: lora.target_modules is empty")
    if not (math.isfinite(t.overlap_unlikelihood) and t.overlap_unlikelihood >= 0):
        raise CrystalError(f"{where}: train.overlap_unlikelihood must be a finite weight >= 0, got {t.overlap_unlikelihood}")
    if d.negatives_per_batch < 0 or (d.negatives_per_batch and not d.negatives):
        raise CrystalError(f"{where}: data.negatives_per_batch must be >= 0 and needs data.negatives, got {d.negatives_per_batch}")
    if d.negatives:
        if t.overlap_unlikelihood <= 0 or d.negatives_per_batch < 1:
            raise CrystalError(f"{where}: data.negatives needs train.overlap_unlikelihood > 0 and data.negatives_per_batch >= 1")
    for key, path in (("data.negatives", d.negatives), ("data.positives", d.positives)):
        if path and not Path(path).expanduser().is_file():
            raise CrystalError(f"{where}: {key} {path!r} is not a file (a `crystal generate` jsonl)")
    if d.positives_per_batch < 0 or bool(d.positives) != (d.positives_per_batch > 0):
        raise CrystalError(f"{where}: data.positives and data.positives_per_batch >= 1 go together, "
                           f"got {d.positives!r} and {d.positives_per_batch}")
    for key in ("positives_relabel", "positives_even_formulas"):
        if getattr(d, key) and not d.positives:
            raise CrystalError(f"{where}: data.{key} needs data.positives")


def saved_config(run_dir: Path) -> RunConfig:
    """The configuration RUN/config.json was written with, its base as it was asked for (base_spec)."""
    raw = json.loads((run_dir / CONFIG_FILE).read_text())
    return RunConfig(base=raw["base_spec"], lora=LoraSection(**raw["lora"]), data=DataSection(**raw["data"]),
                     train=TrainSection(**raw["train"]))


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
        if (run_dir / CONFIG_FILE).exists():
            raise CrystalError(f"{run_dir} already holds a run: pass --resume to continue it or choose another -o")
        settings = load_recipe(recipe) if recipe is not None else {}
        return _build(settings | overrides, "overrides" if recipe is None else str(recipe))
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise CrystalError(f"{run_dir}: nothing to resume (no config.json); start it without --resume")
    config = saved_config(run_dir)
    current = recipes.as_flat(config)
    settings = (load_recipe(recipe) if recipe is not None else {}) | overrides
    changed = {k: v for k, v in settings.items() if not _same(k, current.get(k), v)}
    frozen = sorted(set(changed) - RESUME_OVERRIDABLE)
    if frozen:
        raise CrystalError(f"--resume continues {saved} as saved and cannot change {', '.join(frozen)} "
                           f"(only {', '.join(sorted(RESUME_OVERRIDABLE))})")
    return _build(changed, "overrides", start=config)


def _same(key: str, saved: object, given: object) -> bool:
    if key in ("data.records", "data.negatives", "data.positives") and isinstance(given, str):
        return Path(given).expanduser().resolve() == Path(str(saved)).expanduser().resolve()
    return saved == given


def saved_form(config: RunConfig, base_dir: Path, max_steps: int) -> dict:
    """What RUN/config.json holds: the config with records and base resolved and the step count it runs to."""
    saved = asdict(config)
    saved["data"]["records"] = str(Path(config.data.records).expanduser().resolve())
    for key in ("negatives", "positives"):
        if saved["data"][key]:
            saved["data"][key] = str(Path(saved["data"][key]).expanduser().resolve())
    saved["train"]["max_steps"] = max_steps
    return {"base_spec": config.base} | saved | {"base": str(base_dir.resolve())}
