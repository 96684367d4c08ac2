"""Datasets -> text records (prompt, completion, task) for fine-tuning: `crystal encode`.

One record per (structure, augmented copy, task). Output is OUTDIR/<split>.jsonl plus OUTDIR/stats.json with
every skip counted by reason and OUTDIR/manifest.json (crystal_cli.runs: inputs with content hashes, options,
versions); every file is renamed into place only when the whole encode succeeded. Randomness (augmentation, condition subsets, infill element, val split) is
seeded per material, so the same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_cli import codec, runs
from crystal_cli.datasets import Entry, count_entries, discover, read_entries, read_file
from crystal_cli.errors import CrystalError, check_counts
from crystal_cli.files import read_toml

TASKS = ("unconditional", "formula", "spacegroup", "stability", "conditional", "infill")


@dataclass
class EncodeOptions:
    tasks: tuple[str, ...] = ("unconditional",)
    augment: int = 0
    permute: bool = False
    seed: int = 0
    max_atoms: int | None = None
    max_rows: int | None = None
    exclude_ids: frozenset[str] = frozenset()
    exclude_in: tuple[str, ...] | None = None  # splits the exclusion applies to; None = every split
    val_fraction: float = 0.0  # carve a seeded validation split out of "train" (by material)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise CrystalError(f"unknown task(s) {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
        if self.augment < 0:
            raise CrystalError(f"--augment must be >= 0, got {self.augment}")
        check_counts({"--max-atoms": self.max_atoms, "--max-rows": self.max_rows})
        if not 0.0 <= self.val_fraction < 1.0:
            raise CrystalError(f"--val-fraction (val_fraction) must be in [0, 1), got {self.val_fraction}")


@dataclass
class SplitStats:
    rows_read: int = 0
    structures: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def records_for(entry: Entry, structure: Structure, options: EncodeOptions) -> Iterable[dict]:
    """The records of one accepted structure: every task for the original and each augmented copy."""
    rng = _rng(options.seed, entry.id, entry.source)
    properties = dict(entry.properties)
    if "spacegroup" not in properties:
        number = codec.spacegroup_number(structure)
        if number is not None:  # None: spglib gave up, and the prompts leave the condition out
            properties["spacegroup"] = number
    formula = codec.reduced_formula(structure)
    conditions = {"formula": formula, **{k: v for k, v in properties.items() if k in codec.CONDITIONS}}
    base = {
        "id": entry.id,
        "formula": formula,
        "spacegroup": properties.get("spacegroup"),
        "n_atoms": len(structure),
        "source": entry.source,
    }
    for copy_index, variant in enumerate(codec.augment(structure, options.augment, rng, options.permute)):
        text = codec.encode_structure(variant)
        for task in options.tasks:
            prompt_completion = _task_prompt(task, variant, text, conditions, rng)
            if prompt_completion is not None:
                prompt, completion = prompt_completion
                yield {**base, "task": task, "copy": copy_index, "prompt": prompt, "completion": completion}


def _task_prompt(
    task: str, structure: Structure, text: str, conditions: dict, rng: np.random.Generator
) -> tuple[str, str] | None:
    if task == "unconditional":
        return codec.unconditional_prompt(), text
    if task == "formula":
        return codec.conditional_prompt({"formula": conditions["formula"]}), text
    if task == "spacegroup":
        if "spacegroup" not in conditions:
            return None
        return codec.conditional_prompt({"spacegroup": conditions["spacegroup"]}), text
    if task == "stability":
        if "e_above_hull" not in conditions:
            return None
        return codec.conditional_prompt({"e_above_hull": conditions["e_above_hull"]}), text
    if task == "conditional":
        names = sorted(conditions)
        chosen = [n for n in names if rng.random() < 0.5] or [names[int(rng.integers(len(names)))]]
        return codec.conditional_prompt({n: conditions[n] for n in chosen}), text
    elements = sorted(structure.composition.get_el_amt_dict())
    if len(elements) < 2:  # infill needs another element to condition on
        return None
    masked = elements[int(rng.integers(len(elements)))]
    return codec.infill_prompt(structure, masked), masked


def read_id_list(path: str | Path) -> set[str]:
    """Material ids to exclude: any dataset crystal understands, or a text file with one id per line."""
    path = Path(path)
    if not path.exists():
        raise CrystalError(f"{path}: no such file (--exclude-ids)")
    if path.is_file() and path.suffix == ".txt":
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if path.is_file() and path.name.endswith((".csv", ".csv.gz")):
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, usecols=lambda c: c in ("material_id", "id"))
        if frame.columns.empty:
            raise CrystalError(f"{path}: no material_id or id column to exclude by")
        return set(frame[frame.columns[0]].dropna())
    return {entry.id for _, files in discover(path) for entry in read_entries(files)}


class RecordWriter:
    """Writes OUTDIR/<split>.jsonl through runs.atomic_path: each file is renamed into place when the stack
    closes without an error, and every one is dropped when it closes with one."""

    def __init__(self, outdir: Path, stack: ExitStack):
        self.outdir, self.stack = outdir, stack
        self.handles: dict[str, object] = {}

    def write(self, split: str, record: dict) -> None:
        if split not in self.handles:
            self.outdir.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            tmp = self.stack.enter_context(runs.atomic_path(self.outdir / f"{split}.jsonl"))
            self.handles[split] = self.stack.enter_context(tmp.open("w"))
        self.handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")


def encode(
    inputs: list[tuple[str | Path, str | None]],
    outdir: str | Path,
    options: EncodeOptions,
    progress: Callable[[str, int | None], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Encode (path, split-or-None) inputs into OUTDIR. Returns the stats dict also written to stats.json.

    A split of None keeps the split(s) the path holds (train/val/test files, or the file's own name).
    `progress(split, total)` is called once per input file before reading and with total=None per row.
    Files already in OUTDIR are replaced only when an earlier encode wrote them, or with `overwrite`.
    """
    outdir = runs.dir_output(outdir, "-o")
    plan: list[tuple[str, Path]] = []
    for path, split in inputs:
        for found_split, files in discover(path):
            plan.extend((split or found_split, f) for f in files)
    splits = {split for split, _ in plan} | ({"val"} if options.val_fraction > 0 else set())
    _claim(outdir, ["stats.json", *(f"{split}.jsonl" for split in sorted(splits))], overwrite)
    stats: dict[str, SplitStats] = {}
    seen: dict[str, set[str]] = {}
    with ExitStack() as stack:
        writer = RecordWriter(outdir, stack)
        for split, path in plan:
            rows = 0
            if progress:
                total = count_entries([path])
                progress(split, total if total is None or options.max_rows is None else min(total, options.max_rows))
            for entry in read_file(path):
                if options.max_rows is not None and rows >= options.max_rows:
                    break
                rows += 1
                target = _target_split(split, entry.id, options)
                split_stats = stats.setdefault(target, SplitStats())
                split_stats.rows_read += 1
                reason = _skip_reason(entry, target, seen.setdefault(target, set()), options)
                if progress:
                    progress(split, None)
                if reason:
                    split_stats.skipped[reason] += 1
                    continue
                split_stats.structures += 1
                for record in records_for(entry, entry.structure, options):
                    writer.write(target, record)
                    split_stats.records += 1
                    split_stats.tasks[record["task"]] += 1
        if not any(s.records for s in stats.values()):
            names = ", ".join(str(p) for p in dict.fromkeys(p for _, p in plan))
            raise CrystalError(f"nothing was encoded from {names}: " + (_skip_summary(stats) or "the inputs hold no rows"))
    result = {
        "inputs": [{"path": str(p), "split": s} for s, p in plan],
        "options": {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(options).items()
                    if k != "exclude_ids"} | {"exclude_ids": len(options.exclude_ids)},
        "splits": {
            name: {**asdict(s), "skipped": dict(s.skipped), "tasks": dict(s.tasks)} for name, s in sorted(stats.items())
        },
    }
    runs.write_json(outdir / "stats.json", result)
    excluded = hashlib.sha256("\n".join(sorted(options.exclude_ids)).encode()).hexdigest()
    runs.Manifest("encode", result["options"] | {"exclude_ids_sha256": excluded},
                  inputs={str(p): runs.input_record(p) for p in dict.fromkeys(p for _, p in plan)},
                  outputs=("stats.json", *(f"{name}.jsonl" for name in sorted(writer.handles)))
                  ).save(runs.manifest_path(outdir, directory=True))
    return json.loads(json.dumps(result))


def _claim(outdir: Path, names: list[str], overwrite: bool) -> None:
    """runs.claim for encode's outputs; an OUTDIR written before manifests is recognised by its stats.json."""
    legacy: set[str] = set()
    stats = outdir / "stats.json"
    if stats.is_file() and not runs.owned(stats):
        try:
            saved = json.loads(stats.read_text())
            if {"inputs", "options", "splits"} <= set(saved):
                legacy = {"stats.json", *(f"{split}.jsonl" for split in saved["splits"])}
        except (ValueError, TypeError, UnicodeDecodeError):
            pass
    runs.claim([outdir / name for name in names if name not in legacy], "encode", overwrite)


def _target_split(split: str, material_id: str, options: EncodeOptions) -> str:
    if split == "train" and options.val_fraction > 0:
        if _rng(options.seed, "val-split", material_id).random() < options.val_fraction:
            return "val"
    return split


def _skip_reason(entry: Entry, split: str, seen: set[str], options: EncodeOptions) -> str | None:
    if entry.structure is None:
        return entry.error or "unreadable"
    if entry.id in options.exclude_ids and (options.exclude_in is None or split in options.exclude_in):
        return "excluded_id"
    if options.max_atoms is not None and len(entry.structure) > options.max_atoms:
        return "too_many_atoms"
    if entry.id in seen:
        return "duplicate_id"
    seen.add(entry.id)
    return None


def _skip_summary(stats: dict[str, SplitStats]) -> str:
    skipped = Counter()
    for s in stats.values():
        skipped.update(s.skipped)
    return ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())


# ------------------------------------------------------------------------------------------------ recipes

RECIPE_KEYS = {
    "output", "tasks", "augment", "permute", "seed", "max_atoms", "val_fraction", "inputs", "exclude_ids", "exclude_in"
}


def load_recipe(path: str | Path) -> tuple[list[tuple[Path, str | None]], Path, EncodeOptions]:
    """A data recipe (TOML): inputs with target splits, options, and output dir; relative paths resolve
    against the directory the command runs in (recipes are written for the repository root)."""
    path = Path(path)
    recipe = read_toml(path)
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise CrystalError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(RECIPE_KEYS)}")
    try:
        inputs = [(Path(item["path"]), item.get("split")) for item in recipe["inputs"]]
        exclude: set[str] = set()
        for id_source in recipe.get("exclude_ids", []):
            exclude |= read_id_list(id_source)
        options = EncodeOptions(
            tasks=tuple(recipe.get("tasks", ("unconditional",))),
            augment=int(recipe.get("augment", 0)),
            permute=bool(recipe.get("permute", False)),
            seed=int(recipe.get("seed", 0)),
            max_atoms=recipe.get("max_atoms"),
            val_fraction=float(recipe.get("val_fraction", 0.0)),
            exclude_ids=frozenset(exclude),
            exclude_in=tuple(recipe["exclude_in"]) if "exclude_in" in recipe else None,
        )
        output = Path(recipe["output"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CrystalError(f"{path}: bad recipe ({type(exc).__name__}: {exc})") from None
    return inputs, output, options

