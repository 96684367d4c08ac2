"""Refinement: integrate the learned velocity field from t = 0 (an LLM sample) to t = 1, `crystal refine`.

Euler steps on the product manifold: fractional coordinates move by the exp map of the flat torus, the
lattice 6-vector moves in Euclidean space. Cells are integrated in batches; atom order and types never
change. Inputs whose angles lie outside the flow's interval are first replaced by their Niggli cell (the
same crystal, same site order), and the log says so.

Output is written batch by batch in any format `crystal generate` writes (crystal_cli.structure_io): a
multi-block CIF, an extxyz file, pymatgen structure dicts in jsonl (which keep the site order exactly: CIF
readers re-sort sites by element), or a directory with one POSCAR per input id. Beside it: a jsonl with one
row per input (refined or the reason it was skipped, with a fingerprint of the input structure) holding
per-step displacement summaries, and NAME.manifest.json (crystal_cli.runs: samples, network, steps, format).
--resume accepts only the same network, steps and format and continues after the rows logged; the samples
file may have grown (say, generate topped up) as long as every logged row is still the same input at the
same position. The log is the record of what is done: on resume the output is cut back to its refined rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pymatgen.core import Structure

from crystal_cli import runs
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
from crystal_cli.sampling.guard import MIN_DISTANCE, shortest_distance
from crystal_cli.structure_io import (
    POSCAR_SUFFIX,
    StructureAppender,
    UniqueNames,
    append_jsonl,
    format_for,
    poscar_path,
    read_jsonl,
    record_starts,
    remove_structures,
    structure_fingerprint,
)

RESUME_SAFE = ("batch_size", "samples")  # batching changes no result; logged rows are checked one by one


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
    min_distance: float = MIN_DISTANCE,
    overwrite: bool = False,
    fmt: str | None = None,
) -> dict:
    """Refine every structure in `samples` into `output` in format `fmt` (cif, extxyz, jsonl, or poscar: a
    directory of POSCAR files; None: from the suffix, as structure_io.format_for); one jsonl row per input in
    `log_path` (default OUTPUT with suffix .steps.jsonl). `progress(total)` once, then `progress(None)` per
    input handled. Returns counts (refined, skipped by reason, resumed, and too_close: refined structures with
    two atoms closer than min_distance Å, since the flow may move atoms together again). Logged work is
    continued with `resume` or replaced with `overwrite`; without either it is refused, as is writing over a
    file (or POSCAR directory) crystal did not write."""
    output = Path(output)
    fmt = output_format(output, fmt)
    if steps < 1:
        raise CrystalError(f"--steps must be >= 1, got {steps}")
    log_path = Path(log_path) if log_path else output.with_suffix(".steps.jsonl")
    entries = list(read_structures(samples))
    if resume and overwrite:
        raise CrystalError("--resume continues a run and --overwrite starts it over: pass one of them")
    rows = [] if overwrite else read_jsonl(log_path)
    if rows and not resume:
        raise CrystalError(f"{log_path} already logs {len(rows)} inputs: pass --resume to continue, or --overwrite "
                           "to start over")
    if not rows:
        runs.claim((output, log_path), "refine", overwrite)
    manifest = runs.Manifest(
        "refine", {"steps": steps, "format": fmt, "batch_size": batch_size},
        inputs={"samples": runs.input_record(samples), "model": {"path": model.source, "sha256": model.fingerprint()}},
        safe=RESUME_SAFE, outputs=(output.name, log_path.name),
    )
    start = runs.begin(runs.manifest_path(output), manifest, resume=resume, existing=bool(rows), exists_message="",
                       adopt=lambda: _adopt(log_path, rows, steps))
    done = _resume_point(output, fmt, log_path, rows, entries, samples) if rows else 0
    if not rows:  # a new run (or --overwrite): nothing of an earlier one may remain
        remove_structures(output, fmt)
        runs.discard(log_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    start.commit()
    counts: Counter = Counter()
    if progress:
        progress(len(entries))
        for _ in range(done):
            progress(None)

    # inputs in order, each with the reason it is skipped (or None); refined a batch at a time so the log
    # stays in input order without letting skipped rows shrink the batches
    pending: list[tuple[int, Entry, str | None]] = []
    too_close = 0  # refined structures with two atoms closer than min_distance
    with StructureAppender(output, fmt, taken=_appended(rows)) as out, log_path.open("a") as log:

        def flush() -> None:
            nonlocal too_close
            batch = [entry.structure for _, entry, reason in pending if reason is None]
            refined = iter(refine_structures(model, batch, steps) if batch else [])
            for index, entry, reason in pending:
                key = structure_fingerprint(entry.structure) if entry.structure is not None else None
                if reason is not None:
                    append_jsonl(log, {"index": index, "id": entry.id, "input_sha256": key, "status": reason,
                                       "detail": entry.detail})
                    counts[f"skipped:{reason}"] += 1
                else:
                    result = next(refined)
                    written = out.append(result.structure, entry.id)  # False: a CIF pymatgen cannot read back
                    shortest = shortest_distance(result.structure)
                    append_jsonl(log, {"index": index, "id": entry.id, "input_sha256": key, "status": "refined",
                                       "in_output": written,
                                       "n_atoms": len(result.structure),
                                       "formula": result.structure.composition.reduced_formula, "steps": steps,
                                       "shortest_distance": None if shortest is None else round(shortest, 4),
                                       **result.summary})
                    counts["refined"] += 1
                    counts["not_in_output"] += not written
                    too_close += shortest is not None and shortest < min_distance
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
    not_in_output = counts.pop("not_in_output", 0)
    return {
        "inputs": len(entries),
        "refined": refined,
        "not_in_output": not_in_output,  # refined, logged, but left out of a CIF pymatgen could not read back
        "resumed_from": done,
        "skipped": {k.removeprefix("skipped:"): v for k, v in counts.items()},
        "too_close": too_close,
        "min_distance": min_distance,
        "output": str(output),
        "log": str(log_path),
    }


def output_format(output: Path, fmt: str | None) -> str:
    """The format refine writes `output` in, checked before any work: poscar needs a directory (or a new
    path), every other format a file."""
    try:
        fmt = format_for(output, fmt)
    except ValueError as exc:
        raise CrystalError(f"--format: {exc}" if fmt else str(exc)) from None
    if fmt == "poscar":
        runs.dir_output(output, "-o with --format poscar")
    elif output.is_dir():
        raise CrystalError(f"{output}: is a directory; -o names the refined structure file (.cif, .extxyz or .jsonl), "
                           "or pass --format poscar to write one POSCAR per input into it")
    return fmt


def _appended(rows: list[dict]) -> list[str]:
    """The ids the logged rows handed to the structure writer, in order (a CIF block it refused included:
    its name was taken all the same), from which a resumed writer continues the ID~2 numbering."""
    return [row.get("id") for row in rows if row.get("status") == "refined"]


def _adopt(log_path: Path, rows: list[dict], steps: int) -> dict:
    """A step log written before manifests: its refined rows must have been integrated with these steps."""
    other = next((r for r in rows if r.get("status") == "refined" and r.get("steps") != steps), None)
    if other is not None:
        raise CrystalError(f"{log_path}: --resume with --steps {steps}, but row {other.get('index')} "
                           f"(id {other.get('id')}) was refined with {other.get('steps')}")
    return {"rows": len(rows), "unchecked": ["model"]}


def _resume_point(output: Path, fmt: str, log_path: Path, rows: list[dict], entries: list[Entry],
                  samples: str | Path) -> int:
    """Inputs already handled, after checking that every logged row is still the same input (id and
    structure) at the same position. The output is cut back to the refined rows of the log: a structure is
    written before its log row, so one written just before a kill is dropped and redone (a POSCAR directory:
    .vasp files no logged row names)."""
    for position, row in enumerate(rows):
        entry = entries[position] if position < len(entries) else None
        key = row.get("input_sha256")  # absent from pre-manifest logs: those rows are checked by id only
        if entry is None or row.get("index") != position or row.get("id") != entry.id or (
                key is not None and (entry.structure is None or structure_fingerprint(entry.structure) != key)):
            raise CrystalError(f"{log_path}: row {position} (id {row.get('id')}) is not input {position} of {samples} "
                               "any more; rerun without --resume")
    refined = sum(1 for r in rows if r.get("status") == "refined" and r.get("in_output", True))
    if fmt == "poscar":
        _cut_poscars(output, log_path, rows)
    elif output.exists():
        text = output.read_text()
        starts = record_starts(text, fmt)
        if len(starts) > refined:
            runs.write_text(output, text[: starts[refined]])
        elif len(starts) < refined:
            raise CrystalError(f"{output}: holds {len(starts)} structures but {log_path} logs {refined}; rerun without --resume")
    runs.write_jsonl(log_path, rows)
    return len(rows)


def _cut_poscars(output: Path, log_path: Path, rows: list[dict]) -> None:
    """A POSCAR directory cut back to the log: every refined row's file must be there; a .vasp file no row
    names was written just before a kill (its input is redone) and is removed."""
    names = UniqueNames()
    logged = {poscar_path(output, names(name)).name for name in _appended(rows)}
    present = {file.name for file in output.glob(f"*{POSCAR_SUFFIX}")} if output.is_dir() else set()
    missing = sorted(logged - present)
    if missing:
        raise CrystalError(f"{output}: lacks {len(missing)} of the {len(logged)} POSCAR files {log_path} logs (first "
                           f"{missing[0]}); rerun without --resume")
    for name in present - logged:
        (output / name).unlink()
