"""`crystal evaluate` as a library call: read samples, then validity → uniqueness/novelty → coverage and
distributions → stability, each stage over the entries the previous ones allow, with per-entry results kept
for the csv and aggregate rates (with Wilson intervals) for the report.

Denominators, stated once: validity over every entry read (parse failures are invalid); uniqueness and novelty
over valid structures; stability rates over the seeded stability subset drawn from every entry (entries that
cannot be relaxed count as not stable).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystal_cli import runs
from crystal_cli.datasets import Entry, discover, read_structures
from crystal_cli.errors import CrystalError, check_counts
from crystal_cli.evaluate import coverage as coverage_metrics
from crystal_cli.evaluate import matching, validity
from crystal_cli.evaluate.potential import CHGNET, RelaxSettings, check_spec
from crystal_cli.evaluate.stability import StabilityRecord, evaluate_stability, not_relaxed
from crystal_cli.structure_io import read_jsonl

# progress(stage description, total) -> advance(n); the CLI draws it, tests pass None
ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class EvaluateOptions:
    reference: Path | None = None  # novelty reference (training set)
    coverage_reference: Path | None = None  # COV-R/COV-P and Wasserstein reference (test set)
    coverage_max_reference: int = 1000  # seeded subsample of the coverage reference
    hull: Path | None = None
    potential: str = CHGNET
    stability: bool = True
    stability_samples: int | None = None  # None: every entry
    relax: RelaxSettings = field(default_factory=RelaxSettings)
    seed: int = 0
    workers: int = 1
    stability_log: Path | None = None  # jsonl of finished relaxations (+ NAME.manifest.json beside it)
    resume: bool = True  # reuse the log's relaxations (same settings only)
    overwrite: bool = False  # relax again: replace the log (refused without resume or overwrite when it holds rows)


@dataclass
class SampleResult:
    """Everything known about one input entry."""

    index: int
    entry: Entry
    validity: validity.Validity | None = None
    unique: bool | None = None
    novel: bool | None = None
    stability: StabilityRecord | None = None

    @property
    def valid(self) -> bool:
        return self.validity is not None and self.validity.valid

    @property
    def sun(self) -> bool | None:
        if self.stability is None or self.novel is None:
            return None
        return bool(self.stability.stable and self.unique and self.novel)


@dataclass
class Evaluation:
    samples: list[SampleResult]
    coverage: dict | None = None
    distribution: dict | None = None
    reference_sizes: dict[str, int] = field(default_factory=dict)
    stability_indices: list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # structures the distribution plots compare against (density, #elements of the coverage reference)
    reference_properties: dict[str, list[float]] = field(default_factory=dict)
    adopted_relaxations: int = 0  # rows of a pre-manifest stability log this resume took over unchecked
    hull: object | None = None  # the Hull the energies were measured against (phase-diagram plot)


def _quiet(_: str, __: int | None) -> Callable[[int], None]:
    return lambda n: None


def read_samples(path: Path) -> list[Entry]:
    entries = list(read_structures(path))
    if not entries:
        raise CrystalError(f"{path}: no structures found")
    return entries


def _subsample(items: list, k: int | None, rng: np.random.Generator) -> list:
    if k is None or k >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), k, replace=False))]


_COVERAGE_REFERENCES: dict[tuple, tuple[list, list]] = {}


def coverage_reference(path: Path, max_reference: int, seed: int, workers: int,
                       progress: ProgressFactory | None = None) -> tuple[list, list]:
    """The seeded subsample of a coverage reference and its fingerprints, computed once per process: a
    benchmark evaluating several sample sets against one reference fingerprints it once."""
    key = (Path(path).resolve(), max_reference, seed)
    if key not in _COVERAGE_REFERENCES:
        loaded = matching.load_reference(path)  # one structure per material id
        structures = [s for group in loaded.by_formula.values() for s in group]
        structures = _subsample(structures, max_reference, np.random.default_rng(seed))
        advance = (progress or _quiet)("reference fingerprints", len(structures))
        _COVERAGE_REFERENCES[key] = structures, coverage_metrics.fingerprints(structures, workers, advance)
    return _COVERAGE_REFERENCES[key]


# Stability settings a resumed log may change: which entries are relaxed and how many processes relax them
# (each logged relaxation is reused only for the same input structure), and the samples file itself.
STABILITY_RESUME_SAFE = ("workers", "stability_samples", "seed", "samples")


def stability_run(path: Path, options: EvaluateOptions) -> runs.Start:
    """The resume rule for the stability log: with options.resume its potential, relaxation settings and hull
    must match; with options.overwrite it is replaced, but only when relaxing starts (every input checked);
    with neither, a log holding relaxations is refused, and so is a file crystal did not write."""
    log = options.stability_log
    manifest = runs.Manifest(
        "evaluate", {"potential": options.potential, "fmax": options.relax.fmax, "steps": options.relax.max_steps,
                     "relax_cell": options.relax.relax_cell, "time_limit": options.relax.time_limit,
                     "workers": options.workers, "stability_samples": options.stability_samples, "seed": options.seed},
        inputs={"samples": runs.input_record(path), "hull": runs.input_record(options.hull),
                "potential": runs.input_record(options.potential) if Path(options.potential).exists() else None},
        safe=STABILITY_RESUME_SAFE, outputs=(log.name,),
    )
    rows = [] if options.overwrite else read_jsonl(log)
    if rows and not options.resume:
        raise CrystalError(f"{log} holds {len(rows)} relaxations: pass --resume to reuse them, or --overwrite to "
                           "relax again")
    if not rows:
        runs.claim((log,), "evaluate", options.overwrite)
    unchecked = ["potential", "fmax", "steps", "relax_cell", "time_limit", "hull"]
    return runs.begin(runs.manifest_path(log), manifest, resume=True, existing=bool(rows), exists_message="",
                      adopt=lambda: {"rows": len(rows), "unchecked": unchecked})


def check_options(options: EvaluateOptions) -> None:
    """Every option and input check that reads no samples: run before any work, so a typo costs nothing."""
    relax = options.relax
    check_counts({"--workers": options.workers, "--stability-samples": options.stability_samples,
                  "--coverage-max-reference": options.coverage_max_reference, "--steps": relax.max_steps})
    if not (math.isfinite(relax.fmax) and relax.fmax > 0):
        raise CrystalError(f"--fmax must be a finite force > 0 eV/Å, got {relax.fmax}")
    if not (math.isfinite(relax.time_limit) and relax.time_limit > 0):
        raise CrystalError(f"--time-limit must be a finite number of seconds > 0, got {relax.time_limit}")
    for path in (options.reference, options.coverage_reference):
        if path is not None:
            discover(path)  # exists, and is a dataset crystal reads
    if options.stability:
        check_spec(options.potential)


def evaluate(path: Path, options: EvaluateOptions, progress: ProgressFactory | None = None) -> Evaluation:
    """All metrics the options ask for, on every entry under `path`."""
    check_options(options)
    started = time.monotonic()
    entries = read_samples(path)
    read_s = round(time.monotonic() - started, 3)
    evaluation = evaluate_entries(entries, options, progress, samples_path=path)
    evaluation.timings = {"read": read_s, **evaluation.timings}
    return evaluation


def evaluate_entries(entries: list[Entry], options: EvaluateOptions, progress: ProgressFactory | None = None,
                     samples_path: Path | None = None) -> Evaluation:
    """All metrics the options ask for, on entries already read (structures in memory: crystal.evaluate).
    The stability log (and its resume rule) needs `samples_path`, the file the entries came from."""
    check_options(options)
    if not entries:
        raise CrystalError("no structures to evaluate")
    progress = progress or _quiet
    timings: dict[str, float] = {}

    def timed(stage: str, started: float) -> None:
        timings[stage] = round(time.monotonic() - started, 3)

    from crystal_cli.evaluate.hull import Hull

    hull = Hull.load(options.hull) if options.hull is not None else None  # fail before hours of work

    samples = [SampleResult(i, e) for i, e in enumerate(entries)]
    logged = options.stability and options.stability_log is not None
    if logged and samples_path is None:
        raise CrystalError("a stability log records which samples file it relaxed: evaluate the file, not entries")
    run = stability_run(samples_path, options) if logged else None

    started = time.monotonic()
    advance = progress("validity", len(samples))
    for sample in samples:
        if sample.entry.structure is not None:
            sample.validity = validity.check(sample.entry.structure)
        advance(1)
    timed("validity", started)
    valid = [s for s in samples if s.valid]
    valid_structures = [s.entry.structure for s in valid]

    started = time.monotonic()
    evaluation = Evaluation(samples, timings=timings, hull=hull)
    groups = len({matching.bucket_key(s) for s in valid_structures})
    flags = matching.uniqueness(valid_structures, options.workers, progress("uniqueness", groups))
    for sample, flag in zip(valid, flags):
        sample.unique = flag
    timed("uniqueness", started)

    if options.reference is not None:
        started = time.monotonic()
        formulas = {matching.bucket_key(s) for s in valid_structures}
        reference = matching.load_reference(options.reference, formulas)
        evaluation.reference_sizes["novelty_reference_materials"] = reference.materials
        evaluation.reference_sizes["novelty_reference_same_formula"] = len(reference)
        flags = matching.novelty(valid_structures, reference, options.workers, progress("novelty", groups))
        for sample, flag in zip(valid, flags):
            sample.novel = flag
        timed("novelty", started)

    if options.coverage_reference is not None:
        started = time.monotonic()
        reference_structures, reference_fingerprints = coverage_reference(
            options.coverage_reference, options.coverage_max_reference, options.seed, options.workers, progress
        )
        evaluation.reference_sizes["coverage_reference"] = len(reference_structures)
        evaluation.reference_properties = {
            "density": [coverage_metrics.density(s) for s in reference_structures],
            "n_elements": [coverage_metrics.n_elements(s) for s in reference_structures],
        }
        evaluation.distribution = coverage_metrics.wasserstein(valid_structures, reference_structures, options.seed)
        structures = [s.entry.structure for s in samples if s.entry.structure is not None]
        fingerprints = coverage_metrics.fingerprints(structures, options.workers, progress("fingerprints", len(structures)))
        evaluation.coverage = coverage_metrics.coverage(fingerprints, reference_fingerprints, n_generated=len(samples))
        timed("coverage", started)

    if options.stability:
        started = time.monotonic()
        rng = np.random.default_rng(options.seed)
        chosen = _subsample(list(range(len(samples))), options.stability_samples, rng)
        evaluation.stability_indices = chosen
        jobs = []
        for index in chosen:
            entry, checked = samples[index].entry, samples[index].validity
            if entry.structure is None:
                samples[index].stability = not_relaxed(index, entry.id, entry.error or "unreadable", entry.detail)
            elif not checked.structural:
                samples[index].stability = not_relaxed(index, entry.id, "structurally_invalid", checked.structural_reason)
            else:
                jobs.append((index, entry.id, entry.structure))
        if run is not None:
            if not run.resumed:
                runs.discard(options.stability_log, run.path)
            options.stability_log.parent.mkdir(parents=True, exist_ok=True)
            evaluation.adopted_relaxations = run.adopted_rows
            run.commit()
        records = evaluate_stability(
            jobs, options.potential, options.relax, hull, options.workers, options.stability_log,
            progress("relax", len(jobs)),
        )
        for record in records:
            samples[record.index].stability = record
        timed("stability", started)
    return evaluation
