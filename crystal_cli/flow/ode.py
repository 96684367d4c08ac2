"""Refinement: integrate the learned velocity field from t = 0 (an LLM sample) to t = 1, `crystal refine`.

Euler steps on the product manifold: fractional coordinates move by the exp map of the flat torus, the
lattice 6-vector moves in Euclidean space. Cells are integrated in batches; atom order and types never
change. Inputs whose angles lie outside the flow's interval are first replaced by their Niggli cell (the
same crystal, same site order), and the log says so.

Output is a multi-block CIF (or, for a .jsonl output, pymatgen structure dicts, which keep the site order
exactly: CIF readers re-sort sites by element) appended batch by batch, plus a jsonl with one row per input
(refined or the reason it was skipped) holding per-step displacement summaries; --resume continues after
the rows logged.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pymatgen.core import Structure

from crystal_cli.datasets import Entry, read_structures
from crystal_cli.errors import CrystalError
from crystal_cli.flow.manifolds import (
    euclidean_to_lattice,
    lattice_matrix,
    mean_periodic_distance,
    reduce_if_needed,
    structure_from_flow,
    structure_lattice_vector,
    torus_exp,
)
from crystal_cli.flow.network import Cells, FlowNet
from crystal_cli.structure_io import StructureAppender, append_jsonl, format_for, read_jsonl

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


@torch.inference_mode()
def integrate(
    model: FlowNet, cells: Cells, frac: torch.Tensor, lattice: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler integration from t = 0 to 1 in `steps` steps. Returns final (frac, lattice) and a (steps, B)
    tensor of each step's mean Cartesian atom displacement per cell (Å)."""
    if steps < 1:
        raise CrystalError(f"--steps must be >= 1, got {steps}")
    dt = 1.0 / steps
    per_step = torch.empty(steps, cells.num_graphs)
    counts = cells.counts.to(frac.dtype)
    for k in range(steps):
        t = torch.full((cells.num_graphs,), k * dt, dtype=frac.dtype)
        v_frac, v_lattice = model(t, cells, frac, lattice)
        move = dt * v_frac
        matrices = lattice_matrix(*euclidean_to_lattice(lattice))
        step_length = torch.einsum("ni,nij->nj", move, matrices[cells.graph]).norm(dim=-1)
        per_step[k] = torch.zeros(cells.num_graphs, dtype=frac.dtype).index_add_(0, cells.graph, step_length) / counts
        frac = torus_exp(frac, move)
        lattice = lattice + dt * v_lattice
    return frac, lattice, per_step


@dataclass
class Refined:
    structure: Structure
    summary: dict


def refine_structures(model: FlowNet, structures: Sequence[Structure], steps: int) -> list[Refined]:
    """Refine one batch of structures together; each keeps its species and site order."""
    prepared = [reduce_if_needed(s) for s in structures]
    cells = Cells.from_counts(
        torch.tensor([site.specie.Z for s, _ in prepared for site in s]), torch.tensor([len(s) for s, _ in prepared])
    )
    frac0 = torch.tensor([c for s, _ in prepared for c in s.frac_coords.tolist()], dtype=torch.float32)
    lattice0 = torch.stack([structure_lattice_vector(s) for s, _ in prepared]).float()
    frac, lattice, per_step = integrate(model, cells, frac0, lattice0, steps)
    out = []
    start = 0
    for b, (structure, reduced) in enumerate(prepared):
        n = len(structure)
        refined = structure_from_flow(structure.species, frac[start:start + n], lattice[b])
        start += n
        out.append(Refined(refined, {
            "niggli_reduced": reduced,
            "displacement": round(mean_periodic_distance(structure, refined), 5),
            "path_length": round(float(per_step[:, b].sum()), 5),
            "max_step": round(float(per_step[:, b].max()), 6),
            "lattice_before": _lattice_summary(structure),
            "lattice_after": _lattice_summary(refined),
            "step_displacement": [round(float(x), 6) for x in per_step[:, b]],
        }))
    return out


def _lattice_summary(structure: Structure) -> list[float]:
    return [round(x, 4) for x in (*structure.lattice.abc, *structure.lattice.angles)]


def resolve_model(name: str | Path) -> Path:
    """A run directory or a shipped model: an existing path, else models/NAME in this checkout."""
    path = Path(name)
    if path.exists():
        return path
    shipped = MODELS_DIR / str(name)
    if shipped.exists():
        return shipped
    available = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").exists()) if MODELS_DIR.exists() else []
    raise CrystalError(
        f"{name}: no such flow run or shipped model (shipped: {', '.join(available) or 'none'})"
    )


def usable(entry: Entry, max_z: int) -> str | None:
    """Why an input cannot be refined, or None."""
    if entry.structure is None:
        return entry.error or "unreadable"
    if max(site.specie.Z for site in entry.structure) > max_z:
        return "element_out_of_range"
    return None


def refine_file(
    samples: str | Path,
    output: str | Path,
    model: FlowNet,
    steps: int = 250,
    batch_size: int = 64,
    log_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int | None], None] | None = None,
) -> dict:
    """Refine every structure in `samples` into `output` (multi-block .cif or .jsonl); one jsonl row per
    input in `log_path` (default OUTPUT with suffix .steps.jsonl). `progress(total)` once, then `progress(None)` per
    input handled. Returns counts (refined, skipped by reason, resumed)."""
    output = Path(output)
    fmt = format_for(output)
    if fmt not in _RECORD_START:
        raise CrystalError(f"{output}: refine writes .cif or .jsonl, not {fmt}")
    log_path = Path(log_path) if log_path else output.with_suffix(".steps.jsonl")
    entries = list(read_structures(samples))
    done = _resume_point(output, fmt, log_path) if resume else 0
    if not resume:
        output.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    if progress:
        progress(len(entries))
        for _ in range(done):
            progress(None)

    # inputs in order, each with the reason it is skipped (or None); refined a batch at a time so the log
    # stays in input order without letting skipped rows shrink the batches
    pending: list[tuple[int, Entry, str | None]] = []
    with StructureAppender(output, fmt) as out, log_path.open("a") as log:

        def flush() -> None:
            batch = [entry.structure for _, entry, reason in pending if reason is None]
            refined = iter(refine_structures(model, batch, steps) if batch else [])
            for index, entry, reason in pending:
                if reason is not None:
                    append_jsonl(log, {"index": index, "id": entry.id, "status": reason, "detail": entry.detail})
                    counts[f"skipped:{reason}"] += 1
                else:
                    result = next(refined)
                    out.append(result.structure, entry.id)
                    append_jsonl(log, {"index": index, "id": entry.id, "status": "refined",
                                       "n_atoms": len(result.structure),
                                       "formula": result.structure.composition.reduced_formula, "steps": steps,
                                       **result.summary})
                    counts["refined"] += 1
                if progress:
                    progress(None)
            pending.clear()

        waiting = 0
        for index, entry in enumerate(entries):
            if index < done:
                continue
            reason = usable(entry, model.config.max_z)
            pending.append((index, entry, reason))
            waiting += reason is None
            if waiting >= batch_size:
                flush()
                waiting = 0
        flush()
    refined = counts.pop("refined", 0)
    return {
        "inputs": len(entries),
        "refined": refined,
        "resumed_from": done,
        "skipped": {k.removeprefix("skipped:"): v for k, v in counts.items()},
        "output": str(output),
        "log": str(log_path),
    }


_RECORD_START = {"cif": re.compile(r"^data_", re.MULTILINE), "jsonl": re.compile(r"^\{", re.MULTILINE)}


def _resume_point(output: Path, fmt: str, log_path: Path) -> int:
    """Inputs already handled. The output is cut back to the refined rows of the log: a structure is written
    before its log row, so one written just before a kill is dropped and redone."""
    rows = read_jsonl(log_path)
    refined = sum(1 for r in rows if r.get("status") == "refined")
    if output.exists():
        text = output.read_text()
        starts = [m.start() for m in _RECORD_START[fmt].finditer(text)]
        if len(starts) > refined:
            tmp = output.with_name(f".{output.name}.tmp")
            tmp.write_text(text[: starts[refined]])
            os.replace(tmp, output)
        elif len(starts) < refined:
            raise CrystalError(f"{output}: holds {len(starts)} structures but {log_path} logs {refined}; rerun without --resume")
    tmp = log_path.with_name(f".{log_path.name}.tmp")
    with tmp.open("w") as handle:
        for row in rows:
            append_jsonl(handle, row)
    os.replace(tmp, log_path)
    return len(rows)
