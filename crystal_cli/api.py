"""The Python API: generate, refine and evaluate crystals in memory, the way notebooks use a library.

Import it as ``import crystal`` (the distribution's name; ``crystal_cli.evaluate`` is the evaluation
subpackage, so ``crystal_cli`` itself cannot also offer an ``evaluate`` function)::

    import crystal

    model = crystal.load_model()                 # models/default; exported to GGUF once, cached
    samples = crystal.generate(4, formula="LiFePO4", model=model, seed=1)
    structures = [s.structure for s in samples if s.structure is not None]
    refined = crystal.refine(structures, steps=50)
    report = crystal.evaluate(refined, stability=False)
    print(report.rates["overall"], report.to_pandas().head())

Every function here is the one the command line runs: ``generate_to_file``, ``refine_file`` and
``evaluate_file`` are ``crystal generate``, ``crystal refine`` and ``crystal evaluate`` without the printing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymatgen.core import Structure

from crystal_cli.errors import CrystalError
from crystal_cli.evaluate.pipeline import EvaluateOptions, Evaluation
from crystal_cli.evaluate.stats import Rate
from crystal_cli.sampling.generate import GenerateOptions, GenerateSummary

__all__ = ["Model", "Report", "Sample", "evaluate", "evaluate_file", "generate", "generate_to_file", "iter_generate",
           "load_model", "refine", "refine_file"]


# ------------------------------------------------------------------------------------------ generation


@dataclass
class Model:
    """A language model loaded once for many `generate` calls (llama.cpp; run directories are exported to
    GGUF on first use and the export is cached). Close it, or use it as a context manager, to free it."""

    source: str | Path
    quant: str
    options: GenerateOptions = field(repr=False)
    _loaded: object = field(default=None, repr=False)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded[0].close()
            self._loaded = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_model(model: str | Path | None = None, quant: str = "auto", threads: int | None = None,
               adapter: str | Path | None = None) -> Model:
    """The model `crystal generate -m MODEL` would use: a .gguf, a finetune run directory, a base name or a
    shipped name (None: models/default), loaded once.

    >>> model = crystal.load_model()                    # doctest: +SKIP
    >>> crystal.generate(2, formula="NaCl", model=model)  # doctest: +SKIP
    """
    from crystal_cli.models import LLM, resolve_model
    from crystal_cli.sampling.generate import load_llama

    options = GenerateOptions(model=None if model is None else str(model), output=Path("unused.cif"), quant=quant,
                              threads=threads, adapter=Path(adapter) if adapter else None)
    source = resolve_model(options.model, LLM)
    loaded = load_llama(options, source)
    return Model(source, loaded[1], options, loaded)


@dataclass
class Sample:
    """One generated crystal: its text, the parsed Structure (None when the text is not a crystal, with the
    reason in `status`) and the settings that drew it (model, quant, temperature, seed, ...)."""

    id: str
    index: int
    text: str
    status: str
    detail: str
    structure: Structure | None
    prompt: str
    seed: int
    settings: dict


def iter_generate(n: int = 10, *, formula: str | None = None, spacegroup: int | None = None,
                  e_hull: float | None = None, temperature: float = 0.7, top_p: float = 0.9,
                  model: Model | str | Path | None = None, seed: int = 0, max_atoms: int = 20,
                  min_distance: float | None = None, parallel: int = 32) -> Iterator[Sample]:
    """Samples as they finish (in completion order), conditioned like `crystal generate`. `model` is a
    loaded Model (reused), or anything load_model takes (loaded for this call and closed after).

    >>> for sample in crystal.iter_generate(3, formula="NaCl"):   # doctest: +SKIP
    ...     print(sample.index, sample.status, sample.structure.composition)
    """
    from crystal_cli.sampling.generate import draw

    loaded = model if isinstance(model, Model) else load_model(model)
    options = GenerateOptions(
        model=str(loaded.source), output=Path("memory.cif"), n=n, formula=formula, spacegroup=spacegroup,
        e_hull=e_hull, temperature=temperature, top_p=top_p, seed=seed, max_atoms=max_atoms, parallel=parallel,
        threads=loaded.options.threads, quant=loaded.options.quant, adapter=loaded.options.adapter,
        min_distance=min_distance,
    )
    settings = ("model", "model_sha256", "quant", "backend", "temperature", "top_p", "max_atoms", "run_seed",
                "min_distance")
    try:
        for row, structure in draw(options, loaded.source, loaded._loaded):
            yield Sample(row["id"], row["index"], row["text"], row["status"], row["detail"], structure,
                         row["prompt"], row["seed"], {k: row[k] for k in settings if k in row})
    finally:
        if loaded is not model:
            loaded.close()


def generate(n: int = 10, **conditions) -> list[Sample]:
    """`n` samples in index order (sample i is seeded by (seed, i): the same call gives the same samples).
    Keywords as iter_generate: formula, spacegroup, e_hull, temperature, top_p, model, seed, max_atoms,
    min_distance, parallel.

    >>> samples = crystal.generate(4, formula="LiFePO4", temperature=0.8, seed=1)   # doctest: +SKIP
    >>> [s.structure.composition.reduced_formula for s in samples if s.structure]   # doctest: +SKIP
    """
    return sorted(iter_generate(n, **conditions), key=lambda sample: sample.index)


def generate_to_file(options: GenerateOptions, on_sample: Callable[[dict, GenerateSummary], None] | None = None,
                     on_ready: Callable[[], None] | None = None) -> GenerateSummary:
    """`crystal generate`: samples appended to options.output and its jsonl sidecar, resumable (runs.py)."""
    from crystal_cli.sampling.generate import generate as generate_file

    return generate_file(options, on_sample, on_ready)


# ------------------------------------------------------------------------------------------ refinement

_FLOW_MODELS: dict[str, object] = {}


def _flow(model: str | Path | None):
    from crystal_cli.flow.train import load_model as load_flow
    from crystal_cli.models import FLOW, resolve_model
    from crystal_cli.runs import fingerprint

    path = Path(resolve_model(model, FLOW)).resolve()
    key = f"{path}:{fingerprint(path)}"  # a run trained further on disk is loaded again
    if key not in _FLOW_MODELS:  # loaded once per process: a notebook refines many times
        _FLOW_MODELS[key] = load_flow(path)
    return _FLOW_MODELS[key]


def refine(structures: Sequence[Structure], model: str | Path | None = None, steps: int = 250,
           batch_size: int = 64) -> list[Structure]:
    """The structures moved by the flow refiner (None: models/flow-default), same species and site order.

    >>> refined = crystal.refine(structures, steps=50)   # doctest: +SKIP
    """
    from crystal_cli.flow.ode import refine_structures

    if steps < 1 or batch_size < 1:
        raise CrystalError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    network = _flow(model)
    out: list[Structure] = []
    for start in range(0, len(structures), batch_size):
        out += [r.structure for r in refine_structures(network, list(structures[start:start + batch_size]), steps)]
    return out


def refine_file(samples: str | Path, output: str | Path, model: str | Path | None = None, fmt: str | None = None,
                **options) -> dict:
    """`crystal refine`: every structure of `samples` refined into `output` with a step log, resumable.
    `fmt` is cif, extxyz, jsonl or poscar (`output` a directory, one POSCAR per input id); None infers it from
    the suffix of `output`. The output is checked before the flow model is loaded, so a wrong path or format
    fails at once. Other keywords as crystal_cli.flow.ode.refine_file (steps, batch_size, resume, ...).

    >>> crystal.refine_file("samples.cif", "refined", fmt="poscar", steps=50)   # doctest: +SKIP
    """
    from crystal_cli.flow.ode import output_format, refine_file as refine_to_file

    output_format(Path(output), fmt)
    return refine_to_file(samples, output, _flow(model), fmt=fmt, **options)


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class Report:
    """An evaluation: `to_dict()` is report.json, `to_pandas()` structures.csv (one row per structure),
    `rates` every rate as a Rate (k, n, rate and its 95 % Wilson interval)."""

    evaluation: Evaluation
    data: dict

    def to_dict(self) -> dict:
        return self.data

    def to_pandas(self):
        import pandas as pd

        from crystal_cli.evaluate.report import CSV_COLUMNS, csv_rows

        return pd.DataFrame(csv_rows(self.evaluation), columns=list(CSV_COLUMNS))

    @property
    def rates(self) -> dict[str, Rate]:
        found: dict[str, Rate] = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict) and {"k", "n", "rate", "low", "high"} <= set(value):
                found[prefix] = Rate(value["k"], value["n"], value["rate"], value["low"], value["high"])
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(key, item)

        walk("", {k: v for k, v in self.data.items() if k not in ("settings", "versions")})
        return found


def evaluate(structures: Sequence[Structure], *, reference: str | Path | None = None,
             hull: str | Path | None = None, stability: bool = True, **options) -> Report:
    """The field's metrics on structures in memory (validity, uniqueness; novelty against `reference`; with
    stability, CHGNet relaxation and E_hull against `hull`). Other keywords as EvaluateOptions
    (coverage_reference, stability_samples, workers, seed, relax, potential).

    >>> report = crystal.evaluate(structures, stability=False)   # doctest: +SKIP
    >>> report.rates["overall"].rate, report.to_pandas().shape    # doctest: +SKIP
    """
    from crystal_cli.datasets import Entry
    from crystal_cli.evaluate.pipeline import evaluate_entries
    from crystal_cli.evaluate.report import build_report

    entries = [Entry(id=f"structure-{i:05d}", source=f"memory#{i}", structure=s) for i, s in enumerate(structures)]
    settings = EvaluateOptions(reference=Path(reference) if reference else None, hull=Path(hull) if hull else None,
                               stability=stability, **options)
    evaluation = evaluate_entries(entries, settings)
    return Report(evaluation, build_report(evaluation, settings, Path("memory")))


def evaluate_file(samples: str | Path, options: EvaluateOptions, progress=None) -> Report:
    """`crystal evaluate SAMPLES`: every structure the file (or folder) holds."""
    from crystal_cli.evaluate.pipeline import evaluate as evaluate_path
    from crystal_cli.evaluate.report import build_report

    evaluation = evaluate_path(Path(samples), options, progress)
    return Report(evaluation, build_report(evaluation, options, Path(samples)))
