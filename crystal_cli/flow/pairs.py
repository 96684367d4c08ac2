"""Paired data for flow matching (FlowLLM): each training crystal c1 with one or more base samples c0 of the
same composition, their sites put in correspondence.

A base sample comes from one of three sources: the LLM prompted with c1's formula (`LLMSamples`, llama.cpp
with the generate grammar pinning c1's exact composition), a file of
LLM samples matched by reduced formula and atom count (`FileSamples`), or c1 itself perturbed in
coordinates and lattice (`PerturbedSamples`, for tests and ablations). Alignment assigns c0's sites to c1's
within each element by minimum periodic distance (Hungarian assignment), after the best of a few candidate
translations, and stores c1 reordered and shifted to match c0 site by site.

Pairs are appended to OUTDIR/pairs.jsonl as they are produced and each finished target is logged in
OUTDIR/progress.jsonl, so an interrupted run resumes where it stopped with identical results (the random
stream is seeded per target). OUTDIR/manifest.json (crystal_cli.runs) pins targets, source and options: a
resume with others is refused, except a larger --max-targets (more targets) and threads.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pymatgen.core import Element, Lattice, Structure
from scipy.optimize import linear_sum_assignment

from crystal_cli import runs
from crystal_cli.datasets import read_structures
from crystal_cli.errors import CrystalError, check_counts
from crystal_cli.flow.manifolds import (
    euclidean_to_lattice,
    mean_periodic_distance,
    reduce_if_needed,
    structure_lattice_vector,
)
from crystal_cli.grammar import MAX_Z
from crystal_cli.sampling.guard import MIN_DISTANCE, GuardSettings, check_min_distance
from crystal_cli.structure_io import append_jsonl, read_jsonl

PAIRS_FILE = "pairs.jsonl"
PROGRESS_FILE = "progress.jsonl"
STATS_FILE = "stats.json"
RESUME_SAFE = ("max_targets", "threads")  # targets are seeded one by one: more of them continue the run
_CHUNK = 64  # targets a worker process draws as one batch


def target_rng(seed: int, key: str) -> np.random.Generator:
    """Random stream of one target: independent of processing order, so resumed runs match fresh ones."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


# ------------------------------------------------------------------------------------------- alignment


def periodic_cost(f0: np.ndarray, f1: np.ndarray, lattice: Lattice) -> np.ndarray:
    """(n0, n1) Cartesian minimum-image distances (Å) between fractional points: pymatgen's exact search over
    images (rounding fractional differences is not the minimum image in a skewed cell)."""
    return lattice.get_all_distances(f0, f1)


def align_sites(c0: Structure, c1: Structure) -> tuple[np.ndarray, np.ndarray] | None:
    """Which c1 site corresponds to each c0 site, and the shift that brings c1 onto c0.

    Returns (order, shift) with c1[order[i]] - shift matching c0[i], or None when the element multisets
    differ. Candidate shifts superpose one site of the rarest element of c0 onto each same-element site of c1
    (plus no shift); the one with the smallest total assignment distance wins.
    """
    species0 = [site.specie.symbol for site in c0]
    species1 = [site.specie.symbol for site in c1]
    if sorted(species0) != sorted(species1):
        return None
    by_element0: dict[str, list[int]] = defaultdict(list)
    by_element1: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(species0):
        by_element0[s].append(i)
    for j, s in enumerate(species1):
        by_element1[s].append(j)
    f0, f1 = c0.frac_coords, c1.frac_coords
    anchor = min(by_element0, key=lambda s: (len(by_element0[s]), s))
    a0 = by_element0[anchor][0]
    shifts = [np.zeros(3)] + [f1[j] - f0[a0] for j in by_element1[anchor]]

    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for shift in shifts:
        order = np.empty(len(c0), dtype=int)
        total = 0.0
        for element, rows in by_element0.items():
            cols = by_element1[element]
            cost = periodic_cost(f0[rows] + shift, f1[cols], c1.lattice)
            r, c = linear_sum_assignment(cost)
            total += float(cost[r, c].sum())
            order[np.asarray(rows)[r]] = np.asarray(cols)[c]
        if best is None or total < best[0] - 1e-9:
            best = (total, order, shift)
    return best[1], best[2]


def aligned_target(c0: Structure, c1: Structure) -> Structure | None:
    """c1 with its sites reordered and translated to correspond to c0's, or None if compositions differ."""
    alignment = align_sites(c0, c1)
    if alignment is None:
        return None
    order, shift = alignment
    frac = (c1.frac_coords[order] - shift) % 1.0
    return Structure(c1.lattice, [c1[int(j)].specie for j in order], frac)


# ---------------------------------------------------------------------------------------- base samples


class SampleSource(Protocol):
    """Draws base samples c0 for a target; a string in the result is a failure reason (counted, skipped)."""

    name: str

    def draw(self, target: Structure, count: int, rng: np.random.Generator) -> list[Structure | str]: ...

    def describe(self) -> tuple[dict, dict]:
        """(options, inputs) that decide its samples, for the pairs directory's manifest."""
        ...


@dataclass
class PerturbedSamples:
    """c1 itself, moved: Gaussian fractional-coordinate noise, lattice noise on the flow's 6-vector (log
    lengths, logit angles), a random origin shift and a random site order."""

    coord_noise: float = 0.05
    lattice_noise: float = 0.05
    name: str = "perturb"

    def __post_init__(self) -> None:
        for flag, value in (("--coord-noise", self.coord_noise), ("--lattice-noise", self.lattice_noise)):
            if not math.isfinite(value) or value < 0:
                raise CrystalError(f"{flag} must be a finite standard deviation >= 0, got {value}")

    def draw(self, target: Structure, count: int, rng: np.random.Generator) -> list[Structure | str]:
        out: list[Structure | str] = []
        base = structure_lattice_vector(target).numpy()
        for _ in range(count):
            vec = base + rng.normal(0.0, self.lattice_noise, size=6)
            lengths, angles = euclidean_to_lattice(torch.from_numpy(vec))
            lattice = Lattice.from_parameters(*lengths.tolist(), *angles.tolist())
            frac = target.frac_coords + rng.normal(0.0, self.coord_noise, size=target.frac_coords.shape)
            frac = (frac + rng.uniform(size=3)) % 1.0
            order = rng.permutation(len(target))
            out.append(Structure(lattice, [target[int(i)].specie for i in order], frac[order]))
        return out

    def describe(self) -> tuple[dict, dict]:
        return {"coord_noise": self.coord_noise, "lattice_noise": self.lattice_noise}, {}


class FileSamples:
    """LLM samples read from a file (CIF, jsonl, any format crystal reads), matched to targets by reduced
    formula and atom count; each target gets up to `count` distinct samples chosen by its seeded stream."""

    name = "file"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pool: dict[tuple[str, int], list[Structure]] = defaultdict(list)
        self.unreadable: Counter = Counter()
        for entry in read_structures(self.path):
            if entry.structure is None:
                self.unreadable[entry.error or "unreadable"] += 1
            else:
                self.pool[_match_key(entry.structure)].append(entry.structure)
        if not self.pool:
            raise CrystalError(f"{self.path}: no readable samples ({dict(self.unreadable) or 'empty'})")

    def draw(self, target: Structure, count: int, rng: np.random.Generator) -> list[Structure | str]:
        candidates = self.pool.get(_match_key(target), [])
        if not candidates:
            return ["no_matching_sample"]
        chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
        return [candidates[int(i)] for i in chosen]

    def describe(self) -> tuple[dict, dict]:
        return {}, {"samples": runs.input_record(self.path)}


class LLMSamples:
    """c0 drawn from an LLM (llama.cpp; -m as `crystal generate` takes it, "smollm2-135m" the shipped base GGUF) prompted with the
    target's reduced formula, the grammar pinning the target's exact site multiset (its elements in
    training-text order, its atom count), and the distance guard (sampling/guard.py) keeping its atoms
    min_distance Å apart (0: off) in a cell with room for them. It pickles as its arguments: a worker
    process (build_pairs' `workers`) loads its own copy of the model."""

    name = "llm"

    def __init__(self, model: str | Path | None, adapter: str | Path | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, parallel: int = 8, threads: int | None = None, min_distance: float = MIN_DISTANCE,
                 quant: str = "auto"):
        from crystal_cli.bases import SMOLLM2, smollm2_gguf
        from crystal_cli.models import LLM, resolve_model
        from crystal_cli.sampling.generate import GenerateOptions, load_llama, model_inputs

        self._arguments = {"model": model, "adapter": adapter, "temperature": temperature, "top_p": top_p,
                           "parallel": parallel, "threads": threads, "min_distance": min_distance, "quant": quant}
        self.min_distance = check_min_distance(min_distance)
        if not math.isfinite(temperature) or temperature < 0:
            raise CrystalError(f"--temperature must be a number >= 0, got {temperature}")
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise CrystalError(f"top_p must be in (0, 1], got {top_p}")
        # -m as `crystal generate` takes it (a .gguf, a finetune run, a shipped name; None: models/default),
        # except that the base smollm2-135m samples from its shipped GGUF rather than a fresh export
        source = smollm2_gguf() if str(model) == SMOLLM2 else resolve_model(model, LLM)
        options = GenerateOptions(model=None if model is None else str(model), output=Path("unused.cif"),
                                  quant=quant, threads=threads, adapter=Path(adapter) if adapter else None)
        self.inputs = model_inputs(source, options)
        self.model, self.quant = load_llama(options, source)
        self.temperature, self.top_p, self.parallel, self.threads = temperature, top_p, parallel, threads

    def __getstate__(self) -> dict:
        return self._arguments

    def __setstate__(self, arguments: dict) -> None:
        self.__init__(**arguments)

    def describe(self) -> tuple[dict, dict]:
        options = {"temperature": self.temperature, "top_p": self.top_p, "threads": self.threads,
                   "min_distance": self.min_distance}
        return options, self.inputs

    def draw(self, target: Structure, count: int, rng: np.random.Generator) -> list[Structure | str]:
        [(_, _, samples)] = self.draw_many([("", target, rng)], count)
        return samples

    def draw_many(self, items: Iterable[tuple[str, Structure, np.random.Generator]],
                  count: int) -> Iterator[tuple[str, Structure, list[Structure | str]]]:
        """(id, target, samples) of every (id, target, rng), in their order: all targets' sequences share one
        batch of `parallel` slots (a target's own prompt and grammar in each), so a target of one sample
        does not leave the batch empty. Same samples as one draw() per target: each job's seed comes from
        its target's stream, and llama.cpp's results do not depend on the batch."""
        from crystal_cli.codec import conditional_prompt, parse_crystal
        from crystal_cli.grammar import FormulaConstraint, crystal_gbnf, element_order, max_new_tokens
        from crystal_cli.sampling.llama_backend import BatchedSampler, Finished, Job, Request, SamplingSettings

        items = list(items)
        results: list[list[Structure | str] | None] = [None] * len(items)
        plans: list[tuple[int, str, FormulaConstraint, Structure, list[Job]]] = []
        for i, (_, target, rng) in enumerate(items):
            amounts = target.composition.get_el_amt_dict()
            if max(Element(el).Z for el in amounts) > MAX_Z:
                results[i] = ["element_out_of_range"]
                continue
            order = element_order(list(amounts))
            formula = target.composition.reduced_formula
            exact = FormulaConstraint(formula, tuple(order), tuple(int(round(amounts[el])) for el in order), 1)
            jobs = [Job(k, int(rng.integers(2**31 - 1))) for k in range(count)]
            plans.append((i, conditional_prompt({"formula": formula}), exact, target, jobs))
        longest = max((max_new_tokens(len(plan[3])) for plan in plans), default=1)
        settings = SamplingSettings(temperature=self.temperature, top_p=self.top_p, max_new_tokens=longest,
                                    parallel=self.parallel, threads=self.threads)
        sampler = BatchedSampler(self.model, settings, None)
        index: dict[int, int] = {}  # id(request) -> item

        def requests() -> Iterator[Request]:
            for i, prompt, exact, target, jobs in plans:  # a grammar is compiled when its target's turn comes
                guard = GuardSettings(self.min_distance, exact) if self.min_distance > 0 else None
                request = Request(prompt, jobs, self.model.grammar(crystal_gbnf(len(target), exact)),
                                  sampler.distance_guard(guard), max_new_tokens(len(target)), owns_grammar=True)
                index[id(request)] = i
                yield request

        drawn: dict[int, list[Finished]] = defaultdict(list)
        emitted = 0
        max_prompt = max((len(self.model.tokenize(plan[1])) for plan in plans), default=1)
        try:
            finished = sampler.run_requests(requests(), sum(len(plan[4]) for plan in plans), max_prompt, longest)
            for request, sample in finished:
                i = index[id(request)]
                drawn[i].append(sample)
                if len(drawn[i]) == count:
                    results[i] = [_outcome(f, parse_crystal) for f in sorted(drawn.pop(i), key=lambda f: f.index)]
                while emitted < len(items) and results[emitted] is not None:
                    yield *items[emitted][:2], results[emitted]
                    results[emitted] = []  # emitted; drop the structures
                    emitted += 1
            while emitted < len(items):
                yield *items[emitted][:2], results[emitted]
                emitted += 1
        finally:
            sampler.close()


def _outcome(sample, parse_crystal) -> Structure | str:
    """A finished sample's structure, or why there is none."""
    if sample.failure:
        return sample.failure
    parsed = parse_crystal(sample.text)
    return parsed.structure if parsed.ok else (parsed.reason.value if sample.ended else "max_tokens")


def _match_key(structure: Structure) -> tuple[str, int]:
    return structure.composition.reduced_formula, len(structure)


# ------------------------------------------------------------------------------------------ the build


@dataclass
class PairOptions:
    samples_per_target: int = 1
    seed: int = 0
    max_atoms: int | None = None
    max_targets: int | None = None

    def __post_init__(self) -> None:
        check_counts({"--per-target": self.samples_per_target, "--max-atoms": self.max_atoms,
                      "--max-targets": self.max_targets})


@dataclass
class PairStats:
    targets: int = 0
    pairs: int = 0
    resumed_targets: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (targets or samples)


def make_pair(pair_id: str, target_id: str, c0: Structure, c1: Structure, source: str) -> dict | str:
    """One pairs.jsonl row, or the reason the sample cannot pair with the target."""
    c0, reduced0 = reduce_if_needed(c0)
    c1, _ = reduce_if_needed(c1)
    if max(site.specie.Z for site in c0) > MAX_Z:
        return "element_out_of_range"
    target = aligned_target(c0, c1)
    if target is None:
        return "composition_mismatch"
    return {
        "id": pair_id,
        "target_id": target_id,
        "source": source,
        "n_atoms": len(c0),
        "distance": round(mean_periodic_distance(c0, target), 5),
        "c0_reduced": reduced0,
        "c0": c0.as_dict(),
        "c1": target.as_dict(),
    }


def build_pairs(
    targets: str | Path,
    outdir: str | Path,
    source: SampleSource,
    options: PairOptions,
    resume: bool = False,
    progress: Callable[[int | None], None] | None = None,
    workers: int = 1,
) -> dict:
    """Pairs for every target under `targets`, appended to OUTDIR/pairs.jsonl. Returns the stats that are
    also written to OUTDIR/stats.json. `progress(total)` is called once with the number of targets (or None),
    then with None after each target. `workers` > 1 draws targets in that many processes (each with its own
    copy of the source); the files are the same as with one, in the same order."""
    check_counts({"--workers": workers})
    outdir = runs.dir_output(outdir, "-o")
    pairs_path, progress_path = outdir / PAIRS_FILE, outdir / PROGRESS_FILE
    source_options, source_inputs = source.describe()
    manifest = runs.Manifest("flow pairs", {"source": source.name, **asdict(options), **source_options},
                             inputs={"targets": runs.input_record(targets), **source_inputs}, safe=RESUME_SAFE,
                             outputs=(PAIRS_FILE, PROGRESS_FILE, STATS_FILE))
    start = runs.begin(runs.manifest_path(outdir, directory=True), manifest, resume=resume, existing=pairs_path.exists(),
                       exists_message=f"{outdir}: already holds {PAIRS_FILE}; pass --resume to continue it or choose another -o",
                       adopt=lambda: _adopt(outdir, source.name, options))
    stats = PairStats()
    entries = list(_targets(targets, options, stats))  # every target read (and checked) before a file is written
    outdir.mkdir(parents=True, exist_ok=True)
    start.commit()
    done = _restore(pairs_path, progress_path) if resume else set()
    stats.resumed_targets = len(done)
    if progress:
        progress(len(entries))
    todo = [(entry_id, target) for entry_id, target in entries if entry_id not in done]
    if progress:
        for _ in range(len(entries) - len(todo)):
            progress(None)
    with pairs_path.open("a") as pairs_out, progress_path.open("a") as progress_out:
        for entry_id, rows, reasons in _pair_all(source, options, todo, workers):
            for row in rows:
                append_jsonl(pairs_out, row)
            append_jsonl(progress_out, {"target_id": entry_id, "pairs": len(rows), "skipped": dict(reasons)})
            stats.targets += 1
            stats.pairs += len(rows)
            stats.skipped.update(reasons)
            if progress:
                progress(None)

    rows = read_jsonl(pairs_path)
    result = {
        "targets": str(targets),
        "source": source.name,
        "options": asdict(options),
        "this_run": {**asdict(stats), "skipped": dict(stats.skipped)},
        "total_pairs": len(rows),
        "total_targets_done": len(read_jsonl(progress_path)),
    }
    runs.write_json(outdir / STATS_FILE, result)
    return result


def _pair_stream(source: SampleSource, options: PairOptions,
                 items: Iterable[tuple[str, Structure]]) -> Iterator[tuple[str, list[dict], Counter]]:
    """(target id, pairs.jsonl rows, skip reasons) of each target in order, each from its own seeded stream;
    a source with draw_many (the LLM) draws all of them in one batch."""
    prepared = ((entry_id, reduce_if_needed(target)[0], target_rng(options.seed, entry_id))
                for entry_id, target in items)  # samples (perturbed ones too) start from the flow's cell
    draw_many = getattr(source, "draw_many", None)
    if draw_many is not None:
        drawn = draw_many(prepared, options.samples_per_target)
    else:
        drawn = ((entry_id, target, source.draw(target, options.samples_per_target, rng))
                 for entry_id, target, rng in prepared)
    for entry_id, target, samples in drawn:
        rows, reasons = [], Counter()
        for k, sample in enumerate(samples):
            row = sample if isinstance(sample, str) else make_pair(f"{entry_id}#{k}", entry_id, sample, target,
                                                                    source.name)
            if isinstance(row, str):
                reasons[row] += 1
            else:
                rows.append(row)
        yield entry_id, rows, reasons


_WORKER: tuple[SampleSource, PairOptions] | None = None  # the source and options of a worker process


def _start_worker(source: SampleSource, options: PairOptions) -> None:
    global _WORKER
    _WORKER = (source, options)


def _work(chunk: list[tuple[str, Structure]]) -> list[tuple[str, list[dict], Counter]]:
    return list(_pair_stream(*_WORKER, chunk))


def _pair_all(source: SampleSource, options: PairOptions, todo: list[tuple[str, Structure]],
              workers: int) -> Iterator[tuple[str, list[dict], Counter]]:
    """Every target's pairs in target order, from one process or from `workers` processes taking chunks of
    targets in turn (each chunk one batch; on a CPU one process per core draws ~that many times faster)."""
    if workers == 1 or len(todo) < 2:
        yield from _pair_stream(source, options, todo)
        return
    import multiprocessing

    size = max(1, min(_CHUNK, -(-len(todo) // (4 * workers))))
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    # spawn, not fork: the parent holds llama.cpp and torch thread pools that a fork would copy mid-state
    with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks)), _start_worker, (source, options)) as pool:
        for results in pool.imap(_work, chunks):
            yield from results


def _adopt(outdir: Path, source: str, options: PairOptions) -> dict:
    """A pairs directory written before manifests: its stats.json must name the same source and options."""
    stats_path = outdir / STATS_FILE
    saved = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    given = {"source": source, **asdict(options)}
    recorded = {"source": saved.get("source"), **saved.get("options", {})}
    changed = [f"{k}: {recorded[k]!r} → {v!r}" for k, v in given.items()
               if k in recorded and k not in RESUME_SAFE and recorded[k] != v]
    if changed:
        raise CrystalError(f"{stats_path}: --resume with settings other than the run it continues: {'; '.join(changed)}")
    return {"rows": len(read_jsonl(outdir / PAIRS_FILE)), "unchecked": ["targets", "source settings"]}


def _targets(path: str | Path, options: PairOptions, stats: PairStats) -> Iterator[tuple[str, Structure]]:
    """(unique id, structure) of usable targets; unusable rows are counted in stats.skipped. A row repeating an
    earlier row's id and structure exactly (crystal encode writes one record per prompt task) is a duplicate."""
    seen: Counter = Counter()
    structures: dict[str, list[Structure]] = {}
    taken = 0
    for entry in read_structures(path):
        if options.max_targets is not None and taken >= options.max_targets:
            return
        if entry.structure is None:
            stats.skipped[entry.error or "unreadable"] += 1
            continue
        if options.max_atoms is not None and len(entry.structure) > options.max_atoms:
            stats.skipped["too_many_atoms"] += 1
            continue
        if any(entry.structure == s for s in structures.get(entry.id, ())):
            stats.skipped["duplicate"] += 1
            continue
        structures.setdefault(entry.id, []).append(entry.structure)
        seen[entry.id] += 1
        key = entry.id if seen[entry.id] == 1 else f"{entry.id}~{seen[entry.id]}"
        taken += 1
        yield key, entry.structure


def _restore(pairs_path: Path, progress_path: Path) -> set[str]:
    """Targets already finished; pair rows of an unfinished target (killed mid-target) are dropped."""
    finished = {row["target_id"] for row in read_jsonl(progress_path)}
    for path, keep in ((progress_path, lambda r: True), (pairs_path, lambda r: r.get("target_id") in finished)):
        if not path.exists():
            continue
        runs.write_jsonl(path, [r for r in read_jsonl(path) if keep(r)])
    return finished


# ----------------------------------------------------------------------------------------- reading back


@dataclass
class Pair:
    """Tensors of one pair: atomic numbers, c0/c1 fractional coordinates, c0/c1 lattice 6-vectors."""

    id: str
    target_id: str
    numbers: torch.Tensor
    f0: torch.Tensor
    f1: torch.Tensor
    l0: torch.Tensor
    l1: torch.Tensor


def pair_from_row(row: dict) -> Pair:
    c0 = Structure.from_dict(row["c0"])
    c1 = Structure.from_dict(row["c1"])
    return Pair(
        id=row["id"],
        target_id=row["target_id"],
        numbers=torch.tensor([site.specie.Z for site in c0], dtype=torch.long),
        f0=torch.tensor(c0.frac_coords, dtype=torch.float32),
        f1=torch.tensor(c1.frac_coords, dtype=torch.float32),
        l0=structure_lattice_vector(c0).float(),
        l1=structure_lattice_vector(c1).float(),
    )


def pairs_file(path: str | Path) -> Path:
    """The pairs jsonl of a pairs directory (its pairs.jsonl) or a pairs jsonl file itself."""
    path = Path(path)
    file = path / PAIRS_FILE if path.is_dir() else path
    if not file.exists():
        raise CrystalError(f"{path}: no {PAIRS_FILE} (build one with `crystal flow pairs`)")
    return file


def load_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a pairs directory (its pairs.jsonl) or a pairs jsonl file."""
    file = pairs_file(path)
    pairs = []
    for number, row in enumerate(read_jsonl(file), start=1):
        try:
            pairs.append(pair_from_row(row))
        except (KeyError, TypeError, ValueError) as exc:
            raise CrystalError(f"{file}:{number}: not a pair row ({exc})") from None
    if not pairs:
        raise CrystalError(f"{file}: holds no pairs")
    return pairs


def split_pairs(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Train/validation split by target (all samples of one target on the same side), seeded."""
    if val_fraction <= 0:
        return list(pairs), []
    val_targets = {p.target_id for p in pairs if target_rng(seed, "val:" + p.target_id).random() < val_fraction}
    train = [p for p in pairs if p.target_id not in val_targets]
    val = [p for p in pairs if p.target_id in val_targets]
    return (train, val) if train else (list(pairs), [])
