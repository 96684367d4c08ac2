"""Uniqueness and novelty with pymatgen's StructureMatcher (ltol 0.2, stol 0.3, angle_tol 5; the field's values).

Two structures can only match when their reduced compositions agree, so every comparison happens inside a
composition bucket: uniqueness compares a structure with the distinct structures of its bucket seen so far,
novelty with the reference structures of its bucket. That turns all-pairs O(n·m) into a few fits per
structure. Buckets are independent, so they spread over worker processes.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from crystal_cli.datasets import discover, read_entries
from crystal_cli.errors import CrystalError
from crystal_cli.evaluate.parallel import map_ordered

MATCHER_SETTINGS = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0}
_FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+'?([^'\n]+?)'?\s*$", re.MULTILINE)

Progress = Callable[[int], None]


def make_matcher() -> StructureMatcher:
    return StructureMatcher(**MATCHER_SETTINGS)


def bucket_key(structure: Structure) -> str:
    """The reduced formula: structures in different buckets can never match."""
    return structure.composition.reduced_formula


@dataclass
class Reference:
    """Reference structures grouped by reduced formula (only the formulas that were asked for, if any)."""

    by_formula: dict[str, list[Structure]] = field(default_factory=dict)
    materials: int = 0  # distinct reference materials read (before the formula filter), unreadable included
    unreadable: int = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_formula.values())


def load_reference(path: str | Path, formulas: set[str] | None = None) -> Reference:
    """Reference structures under `path` (dataset dir, csv, CIF(s), encode records), deduplicated by id.
    Of a train/val/test directory only the train split is used.

    With `formulas`, only structures of those reduced formulas are kept; csv rows are filtered on the CIF's
    `_chemical_formula_sum` before parsing, and `crystal encode` records are parsed once per material id
    (records repeat a material once per task), which makes a 30k-material reference a matter of seconds.
    """
    reference = Reference()
    done: set[str] = set()
    failed: set[str] = set()
    splits = discover(path)
    # A split directory is training data plus held-out data: novelty is judged against what was trained on.
    if any(split == "train" for split, _ in splits):
        splits = [(split, files) for split, files in splits if split == "train"]
    for _, files in splits:
        for file in files:
            name = file.name.lower()
            if name.endswith((".csv", ".csv.gz")) and formulas is not None:
                rows = _csv_rows_for(file, formulas)
            elif name.endswith(".jsonl"):
                rows = _record_rows(file, done, formulas)
            else:
                rows = ((e.id, e.structure, False) for e in read_entries([file]))
            for material_id, structure, filtered_out in rows:
                if material_id in done:
                    continue
                if structure is None and not filtered_out:
                    failed.add(material_id)
                    continue
                done.add(material_id)
                if structure is not None:
                    key = bucket_key(structure)
                    if formulas is None or key in formulas:
                        reference.by_formula.setdefault(key, []).append(structure)
    reference.unreadable = len(failed - done)
    reference.materials = len(done) + reference.unreadable
    if reference.materials == 0:
        raise CrystalError(f"{path}: the reference holds no structures")
    return reference


def record_materials(path: str | Path) -> Iterator[tuple[str, Structure]]:
    """(id, structure) of each material of a `crystal encode` records jsonl, in file order: the first record
    of every id (records repeat a material once per task), infill records and unparseable text left out."""
    done: set[str] = set()
    for material_id, structure, _ in _record_rows(Path(path), done, None):
        done.add(material_id)
        if structure is not None:
            yield material_id, structure


def _record_rows(path: Path, done: set[str], formulas: set[str] | None) -> Iterable[tuple[str, Structure | None, bool]]:
    """(id, structure, filtered out) per jsonl row with crystal text; ids already read and rows whose
    "formula" field is not wanted are not parsed."""
    import json

    from crystal_cli.codec import parse_crystal

    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            try:
                row = json.loads(line)
                text = row["text"] if "text" in row else row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            material_id = str(row.get("id", f"{path.name}:{number}"))
            if material_id in done or row.get("task") == "infill":  # infill completions are one element
                continue
            if formulas is not None and isinstance(row.get("formula"), str):
                if _reduced_formula(row["formula"]) not in formulas:
                    yield material_id, None, True
                    continue
            yield material_id, parse_crystal(str(text)).structure, False


def _csv_rows_for(path: Path, formulas: set[str]) -> Iterable[tuple[str, Structure | None, bool]]:
    """(id, structure, filtered out) of csv rows, parsing the CIF only when its formula is wanted."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={"material_id": str})
    except Exception as exc:  # pandas raises many types on broken csv/gzip
        raise CrystalError(f"{path}: not a readable csv ({exc})") from None
    if "cif" not in frame.columns:
        raise CrystalError(f"{path}: no 'cif' column")
    ids = frame["material_id"] if "material_id" in frame.columns else [f"{path.name}-{i}" for i in range(len(frame))]
    for material_id, cif in zip(ids, frame["cif"]):
        if not isinstance(cif, str):
            yield str(material_id), None, False
            continue
        formula = _formula_of_cif(cif)
        if formula is not None and formula not in formulas:
            yield str(material_id), None, True
            continue
        yield str(material_id), _parse_cif(cif), False


def _formula_of_cif(cif: str) -> str | None:
    match = _FORMULA_SUM.search(cif)
    return _reduced_formula(match.group(1)) if match else None


@lru_cache(maxsize=None)
def _reduced_formula(formula: str) -> str | None:
    try:
        return Composition(formula).reduced_formula
    except Exception:  # malformed formula: the caller falls back to parsing the structure
        return None


def _parse_cif(cif: str) -> Structure | None:
    from pymatgen.io.cif import CifParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CifParser(io.StringIO(cif)).parse_structures(primitive=False, on_error="raise")[0]
    except Exception:  # an unreadable reference row is counted, not fatal
        return None


def _bucket_uniqueness(structures: Sequence[Structure]) -> list[bool]:
    matcher = make_matcher()
    distinct: list[Structure] = []
    flags = []
    for structure in structures:
        duplicate = any(matcher.fit(structure, other) for other in distinct)
        if not duplicate:
            distinct.append(structure)
        flags.append(not duplicate)
    return flags


def _bucket_novelty(job: tuple[Sequence[Structure], Sequence[Structure]]) -> list[bool]:
    structures, references = job
    matcher = make_matcher()
    return [not any(matcher.fit(s, r) for r in references) for s in structures]


def _buckets(structures: Sequence[Structure | None]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, structure in enumerate(structures):
        if structure is not None:
            groups[bucket_key(structure)].append(index)
    # largest buckets first so a pool is not left waiting on one big bucket at the end
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def _scatter(groups: dict[str, list[int]], results: list[list[bool]], n: int) -> list[bool | None]:
    """Per-bucket flags back into input order; None where there was no structure."""
    flags: list[bool | None] = [None] * n
    for indices, bucket_flags in zip(groups.values(), results):
        for i, flag in zip(indices, bucket_flags):
            flags[i] = flag
    return flags


def uniqueness(
    structures: Sequence[Structure | None], workers: int = 1, progress: Progress | None = None
) -> list[bool | None]:
    """True for the first structure of each equivalence class, False for later duplicates, None for missing."""
    groups = _buckets(structures)
    jobs = [[structures[i] for i in indices] for indices in groups.values()]
    return _scatter(groups, map_ordered(_bucket_uniqueness, jobs, workers, progress), len(structures))


def novelty(
    structures: Sequence[Structure | None], reference: Reference, workers: int = 1, progress: Progress | None = None
) -> list[bool | None]:
    """True when no reference structure of the same reduced formula matches; None for missing structures."""
    groups = _buckets(structures)
    jobs = [([structures[i] for i in indices], reference.by_formula.get(key, [])) for key, indices in groups.items()]
    return _scatter(groups, map_ordered(_bucket_novelty, jobs, workers, progress), len(structures))
