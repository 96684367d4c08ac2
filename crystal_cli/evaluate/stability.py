"""Stability by ML potential + convex hull: relax, energy per atom, formation energy and E_hull in the hull's
frame, then metastable (E_hull < 0.1 eV/atom, Crystal-LLM), stable (E_hull < 0 with ≥ 2 elements, FlowLLM).

Relaxations run in worker processes, each loading the potential once. Every finished structure is appended to
a jsonl log (relaxed structure included, as pymatgen's JSON dict, and a fingerprint of the input structure),
so an interrupted run resumes where it stopped; a logged relaxation is reused only for the same input
structure at the same index (the log's manifest, written by pipeline.evaluate, pins potential and settings). Failures (unsupported element, NaN, explosion, timeout, element missing from the hull) are recorded
with their reason and count as not stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from pymatgen.core import Structure

from crystal_cli.evaluate.hull import ElementNotInHull, Hull
from crystal_cli.evaluate.parallel import imap_ordered
from crystal_cli.evaluate.potential import Potential, Relaxation, RelaxSettings, load_potential
from crystal_cli.runs import write_jsonl
from crystal_cli.structure_io import append_jsonl, read_jsonl, structure_fingerprint

METASTABLE_THRESHOLD = 0.1  # eV/atom
STABLE_THRESHOLD = 0.0

_worker_potential: Potential | None = None


@dataclass
class StabilityRecord:
    """One relaxed (or failed) structure with its energies in the hull frame."""

    index: int
    id: str
    energy_per_atom: float | None
    formation_energy_per_atom: float | None
    e_above_hull: float | None
    steps: int
    converged: bool
    seconds: float
    error: str | None
    detail: str
    relaxed: Structure | None
    input_sha256: str | None = None  # structure_io.structure_fingerprint of what was relaxed (None: not logged)

    @property
    def metastable(self) -> bool:
        return self.error is None and self.e_above_hull is not None and self.e_above_hull < METASTABLE_THRESHOLD

    @property
    def stable(self) -> bool:
        return (
            self.error is None and self.e_above_hull is not None and self.e_above_hull < STABLE_THRESHOLD
            and self.relaxed is not None and len(self.relaxed.composition.elements) >= 2
        )

    def to_log(self) -> dict:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["relaxed"] = self.relaxed.as_dict() if self.relaxed is not None else None
        return row

    @classmethod
    def from_log(cls, row: dict) -> StabilityRecord:
        row = dict(row)
        row["relaxed"] = Structure.from_dict(row["relaxed"]) if row.get("relaxed") else None
        return cls(**row)


def not_relaxed(index: int, entry_id: str, reason: str, detail: str = "") -> StabilityRecord:
    """A sampled entry that cannot be relaxed (no structure, structurally invalid): counted, not stable."""
    return StabilityRecord(index, entry_id, None, None, None, 0, False, 0.0, reason, detail, None)


def _init_worker(spec: str) -> None:
    """Per process: malloc and hub settings first, then one potential."""
    global _worker_potential
    from crystal_cli.runtime import configure_process

    configure_process()
    _worker_potential = load_potential(spec)


def _relax_job(job: tuple[int, Structure, RelaxSettings]) -> tuple[int, Relaxation]:
    index, structure, settings = job
    assert _worker_potential is not None
    return index, _worker_potential.relax(structure, settings)


def to_record(index: int, entry_id: str, relaxation: Relaxation, hull: Hull | None,
              input_sha256: str | None = None) -> StabilityRecord:
    """Put a relaxation's energy into the hull frame and compute E_hull (when there is a hull)."""
    formation = e_hull = None
    error, detail = relaxation.error, relaxation.detail
    if relaxation.energy_per_atom is not None and hull is not None:
        composition = relaxation.structure.composition
        try:
            formation = hull.formation_energy_per_atom(composition, relaxation.energy_per_atom)
            e_hull = hull.e_above_hull(composition, formation)
        except ElementNotInHull as exc:
            error = error or "element_not_in_hull"
            detail = detail or f"no elemental reference for {exc.args[0]}"
        if e_hull is not None and not math.isfinite(e_hull):
            error, e_hull = error or "nan_energy", None
    return StabilityRecord(
        index, entry_id, relaxation.energy_per_atom, formation, e_hull, relaxation.steps, relaxation.converged,
        relaxation.seconds, error, detail, relaxation.structure, input_sha256,
    )


def evaluate_stability(
    jobs: Sequence[tuple[int, str, Structure]],
    potential: str,
    settings: RelaxSettings,
    hull: Hull | None,
    workers: int = 1,
    log_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[StabilityRecord]:
    """Relax (index, id, structure) jobs; resumes from `log_path` rows of the same index, id and input structure
    (rows of logs written before fingerprints were kept match by index and id)."""
    done: dict[int, StabilityRecord] = {}
    keys = {index: structure_fingerprint(structure) for index, _, structure in jobs}
    if log_path is not None:
        wanted = {index: entry_id for index, entry_id, _ in jobs}
        rows = read_jsonl(log_path)
        write_jsonl(log_path, rows)  # drops a line torn by a kill
        for row in rows:
            index = row.get("index")
            if wanted.get(index) == row.get("id") and row.get("input_sha256") in (None, keys.get(index)):
                done[index] = StabilityRecord.from_log(row)
        if progress is not None and done:
            progress(len(done))
    if workers > 1:
        load_potential(potential)  # fail here, once, rather than in every respawned worker
    pending = [(index, structure, settings) for index, _, structure in jobs if index not in done]
    ids = {index: entry_id for index, entry_id, _ in jobs}
    log = open(log_path, "a") if log_path is not None else None
    try:
        for index, relaxation in imap_ordered(
            _relax_job, pending, workers, initializer=_init_worker, initargs=(potential,)
        ):
            record = to_record(index, ids[index], relaxation, hull, keys[index])
            done[index] = record
            if log is not None:
                append_jsonl(log, record.to_log())
            if progress is not None:
                progress(1)
    finally:
        if log is not None:
            log.close()
    return [done[index] for index, _, _ in jobs]

