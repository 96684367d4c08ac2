"""`crystal generate`: conditions -> prompt + grammar -> a backend's samples -> CIF/extxyz + jsonl, as they finish.

The jsonl sidecar is the record of the run (one row per sample: id, index, prompt, text, parse status with
the codec's failure reason, seconds, seed, tokens, and the model, quant, backend and sampling settings that
drew it); the structure file holds the samples that parsed; NAME.manifest.json (crystal_cli.runs) the run's
inputs and settings. Rows are appended the moment a sample finishes, so a killed run keeps what it finished;
`resume` accepts only the same settings (a larger -n tops the run up), rebuilds the structure file from the
sidecar (atomically) and draws only the missing sample indices, each seeded by (seed, index), so nothing is
duplicated. Infill is resumable the same way: per input structure, the missing ranks are appended.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from crystal_cli import codec, runs
from crystal_cli.errors import CrystalError
from crystal_cli.export import QUANTS
from crystal_cli.grammar import ELEMENTS, crystal_gbnf, formula_constraint, max_new_tokens
from crystal_cli.evaluate.validity import structural_validity
from crystal_cli.models import LLM, model_fingerprint, resolve_model
from crystal_cli.sampling.guard import MIN_DISTANCE, GuardSettings, check_min_distance
from crystal_cli.sampling.llama_backend import Finished, Job, SamplingSettings, job_seed
from crystal_cli.structure_io import (
    FORMATS, StructureAppender, append_jsonl, read_jsonl, remove_structures, write_structures,
)

BACKENDS = ("llama", "transformers")
# Options a resumed run may change: how many samples, how many decode at once, threads. Every other option
# changes what a sample is, so resuming with another value is refused (crystal_cli.runs).
RESUME_SAFE = ("n", "parallel", "threads")
_NOT_OPTIONS = ("output", "model", "adapter", "infill", "resume", "overwrite")  # inputs, or how the run is invoked


@dataclass
class GenerateOptions:
    model: str | None
    output: Path
    n: int = 10
    formula: str | None = None
    spacegroup: int | None = None
    e_hull: float | None = None
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    max_atoms: int = 20
    parallel: int = 32
    fmt: str | None = None
    symmetrize: float | None = None  # write symmetry-refined CIF blocks found with this tolerance (Å)
    resume: bool = False
    overwrite: bool = False  # start over: replace the output, its sidecar and manifest (even files crystal did not write)
    backend: str = "llama"
    grammar: bool = True
    adapter: Path | None = None  # a GGUF LoRA adapter applied on a .gguf model (llama backend)
    quant: str = "auto"  # type of on-the-fly exports of run directories (export.auto_quant)
    threads: int | None = None
    infill: Path | None = None
    mask: str | None = None
    min_distance: float | None = None  # Å between any two atoms (sampling/guard.py); None: 0.5 with the grammar, 0 = off


@dataclass
class GenerateSummary:
    output: Path
    sidecar: Path
    requested: int
    existing: int = 0
    generated: int = 0
    ok: int = 0
    failures: Counter = field(default_factory=Counter)
    tokens: int = 0
    seconds: float = 0.0
    rankings: list[dict] = field(default_factory=list)  # infill: per input structure, ranked candidates
    guard_masked: int = 0  # tokens the distance guard masked, over the samples drawn
    adopted: int = 0  # rows of a pre-manifest sidecar this resume took over (their model was never recorded)
    valid: int = 0  # parsed samples with every interatomic distance >= 0.5 Å and volume >= 0.1 Å³ (CDVAE)
    not_in_file: int = 0  # parsed samples left out of the CIF (pymatgen cannot read them back); the jsonl has them
    spacegroup: int | None = None  # the --spacegroup asked for
    spacegroup_matched: int = 0  # parsed samples whose space group (codec.spacegroup_number) is the one asked for

    @property
    def parse_rate(self) -> float:
        return self.ok / self.generated if self.generated else 0.0


# ------------------------------------------------------------------------------------------- checks


def output_paths(output: Path, fmt: str | None) -> tuple[Path, str]:
    """(sidecar jsonl, structure format). With format jsonl the sidecar is the output itself."""
    from crystal_cli.structure_io import format_for

    try:
        fmt = format_for(output, fmt)
    except ValueError as exc:
        raise CrystalError(f"--format: {exc}" if fmt else str(exc)) from None
    return (output if fmt == "jsonl" else output.with_suffix(".jsonl")), fmt


def check_options(options: GenerateOptions) -> None:
    """Every option check that needs no model (cheap; the CLI runs it before drawing its progress bar)."""
    _check_common(options)
    if options.infill is None and options.mask is None:
        prompt_and_grammar(options)


def _check_common(options: GenerateOptions) -> None:
    if options.n <= 0:
        raise CrystalError(f"-n must be > 0, got {options.n}")
    if options.parallel <= 0:
        raise CrystalError(f"--parallel must be > 0, got {options.parallel}")
    if options.backend not in BACKENDS:
        raise CrystalError(f"--backend {options.backend!r}: choose from {', '.join(BACKENDS)}")
    if options.fmt is not None and options.fmt not in FORMATS:
        raise CrystalError(f"--format {options.fmt!r}: choose from {', '.join(FORMATS)}")
    if not options.output.parent.is_dir():
        raise CrystalError(f"{options.output}: directory {options.output.parent} does not exist")
    fmt = output_paths(options.output, options.fmt)[1]
    if fmt == "poscar" and options.output.exists() and not options.output.is_dir():
        raise CrystalError(f"{options.output}: a file; --format poscar writes one POSCAR per sample into a directory")
    if fmt != "poscar" and options.output.is_dir():
        raise CrystalError(f"{options.output}: is a directory; -o names the structure file to write (e.g. samples.cif)")
    if options.symmetrize is not None and (fmt != "cif" or not math.isfinite(options.symmetrize)
                                           or options.symmetrize <= 0):
        raise CrystalError(f"--symmetrize takes a symmetry tolerance > 0 Å and writes CIF, got {options.symmetrize} "
                           f"with format {fmt}")
    if not math.isfinite(options.temperature) or options.temperature < 0:
        raise CrystalError(f"--temperature must be a number >= 0 (0 = greedy), got {options.temperature}")
    if not math.isfinite(options.top_p) or not 0 < options.top_p <= 1:
        raise CrystalError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.threads is not None and options.threads < 1:
        raise CrystalError(f"--threads must be >= 1, got {options.threads}")
    if options.max_atoms < 1:
        raise CrystalError(f"--max-atoms must be >= 1, got {options.max_atoms}")
    if options.resume and options.overwrite:
        raise CrystalError("--resume continues a run and --overwrite starts it over: pass one of them")
    if options.quant != "auto" and options.quant not in QUANTS:
        raise CrystalError(f"--quant {options.quant!r}: choose from auto, {', '.join(QUANTS)}")
    if options.min_distance is not None:
        check_min_distance(options.min_distance)
        if options.min_distance > 0 and not options.grammar:
            raise CrystalError("--min-distance needs the grammar (the guard reads grammatical text): drop --no-grammar "
                               "or pass --min-distance 0")


def min_distance(options: GenerateOptions) -> float:
    """The distance the guard keeps (0: off): --min-distance, by default MIN_DISTANCE under the grammar."""
    if options.min_distance is not None:
        return options.min_distance
    return MIN_DISTANCE if options.grammar else 0.0


def guard_settings(options: GenerateOptions) -> GuardSettings | None:
    """The distance guard for these options (None when off); with --formula its volume floor per formula unit."""
    distance = min_distance(options)
    if distance <= 0:
        return None
    constraint = formula_constraint(options.formula, options.max_atoms) if options.formula else None
    return GuardSettings(distance, constraint)


def prompt_and_grammar(options: GenerateOptions) -> tuple[str, str | None]:
    """The generation prompt for the conditions and, unless disabled, the grammar that enforces them."""
    constraint = formula_constraint(options.formula, options.max_atoms) if options.formula is not None else None
    if options.spacegroup is not None and not 1 <= options.spacegroup <= 230:
        raise CrystalError(f"--spacegroup must be 1..230, got {options.spacegroup}")
    if options.e_hull is not None and not (math.isfinite(options.e_hull) and options.e_hull >= 0):
        raise CrystalError(f"--e-hull must be a finite energy above the hull >= 0 eV/atom, got {options.e_hull}")
    prompt = codec.conditional_prompt(
        {
            "formula": constraint.formula if constraint else None,
            "spacegroup": options.spacegroup,
            "e_above_hull": options.e_hull,
        }
    )
    gbnf = crystal_gbnf(options.max_atoms, constraint) if options.grammar else None
    return prompt, gbnf


# ------------------------------------------------------------------------------------------- models


def load_llama(options: GenerateOptions, source: str | Path):
    """(LlamaModel, weight type) of a resolved -m: a GGUF as it is, or a run/base exported once (cached)."""
    from crystal_cli.export import cached_export, check_gguf_model, gguf_quant, resolve_quant
    from crystal_cli.sampling.llama_backend import LlamaModel

    if isinstance(source, Path) and source.suffix == ".gguf":
        if check_gguf_model(source) == "adapter":
            raise CrystalError(f"{source}: a LoRA adapter, not a model; pass it with --adapter and the base with -m")
        gguf, quant = source, gguf_quant(source)
    else:
        quant = resolve_quant(source, options.quant)
        gguf = cached_export(source, quant)
    if options.adapter is not None and check_gguf_model(options.adapter) != "adapter":
        raise CrystalError(f"{options.adapter}: not a GGUF LoRA adapter (crystal export --adapter-only)")
    return LlamaModel(gguf, options.adapter, options.threads), quant


class _LlamaBackend:
    def __init__(self, options: GenerateOptions, source: str | Path, settings: SamplingSettings, gbnf: str | None,
                 loaded=None):
        from crystal_cli.sampling.llama_backend import BatchedSampler

        self.owns_model = loaded is None  # a model loaded by the caller (crystal.load_model) stays open
        self.model, self.quant = load_llama(options, source) if loaded is None else loaded
        self.sampler = BatchedSampler(self.model, settings, gbnf, guard_settings(options) if gbnf else None)
        self.settings = settings

    def run(self, prompt: str, jobs: list[Job]):
        return self.sampler.run(prompt, jobs)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=False)

    def score(self, prompt: str, continuations: list[list[int]]) -> list[float]:
        from crystal_cli.sampling.llama_backend import score_continuations

        return score_continuations(self.model, prompt, continuations, self.settings.parallel)

    def close(self) -> None:
        self.sampler.close()
        if self.owns_model:
            self.model.close()


class _TransformersBackend:
    quant = "f32"  # the merged model runs in float32

    def __init__(self, options: GenerateOptions, source: str | Path, settings: SamplingSettings, gbnf: str | None):
        from crystal_cli.bases import smollm2_gguf, source_gguf
        from crystal_cli.models import load_trained, model_dir
        from crystal_cli.sampling.hf_backend import HFSampler, load_vocab_grammar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the CLI draws its own progress
        if options.adapter is not None:
            raise CrystalError("--adapter (a GGUF LoRA) needs --backend llama")
        base_dir = model_dir(source)
        self.model, self.tokenizer = load_trained(source, merge=True)
        self.vocab_model = None
        grammar = None
        if gbnf is not None:
            grammar, self.vocab_model = load_vocab_grammar(source_gguf(base_dir) or smollm2_gguf(), gbnf)
        self.grammar = grammar
        end_tokens = self.vocab_model.end_tokens if self.vocab_model is not None else ()
        guard = guard_settings(options) if grammar is not None else None
        pieces = self.vocab_model.piece_texts() if guard is not None else None
        self.sampler = HFSampler(self.model, self.tokenizer, settings, grammar, end_tokens, guard, pieces)
        self.settings = settings

    def run(self, prompt: str, jobs: list[Job]):
        return self.sampler.run(prompt, jobs)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, prompt: str, continuations: list[list[int]]) -> list[float]:
        from crystal_cli.sampling.hf_backend import score_continuations

        return score_continuations(self.model, self.tokenizer, prompt, continuations, self.settings.parallel)

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()
        if self.vocab_model is not None:
            self.vocab_model.close()


def open_backend(options: GenerateOptions, source: str | Path, gbnf: str | None, loaded=None):
    """The sampler for these options: llama.cpp (reusing `loaded`, a (LlamaModel, quant) pair, when given) or
    transformers."""
    settings = SamplingSettings(
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=max_new_tokens(options.max_atoms),
        parallel=options.parallel,
        threads=options.threads,
    )
    if options.backend == "llama":
        return _LlamaBackend(options, source, settings, gbnf, loaded)
    return _TransformersBackend(options, source, settings, gbnf)


# -------------------------------------------------------------------------------------- the run record


_DEFAULTS = {f.name: f.default for f in fields(GenerateOptions) if f.default is not MISSING}


def model_inputs(source: str | Path, options: GenerateOptions) -> dict[str, dict | None]:
    """The manifest's model inputs: the resolved model (a base name is kept as its name) and the adapter."""
    path = str(source) if isinstance(source, str) else str(Path(source).resolve())
    return {"model": {"path": path, "sha256": model_fingerprint(source)}, "adapter": runs.input_record(options.adapter)}


def _begin(stage: str, options: GenerateOptions, sidecar: Path, rows: list[dict], manifest_options: dict,
           inputs: dict, what: str, adopt: Callable[[], dict]) -> runs.Start:
    """The resume rule for a generate or infill output (its manifest beside it)."""
    outputs = tuple(dict.fromkeys((options.output.name, sidecar.name)))
    manifest = runs.Manifest(stage, manifest_options, inputs=inputs, safe=RESUME_SAFE, outputs=outputs)
    return runs.begin(runs.manifest_path(options.output), manifest, resume=options.resume, existing=bool(rows),
                      exists_message=f"{sidecar} already holds {len(rows)} {what}: pass --resume to top it up, or remove it",
                      adopt=adopt, defaults=_DEFAULTS)


def _existing(options: GenerateOptions, sidecar: Path) -> list[dict]:
    """The sidecar's rows to continue from (none with --overwrite). With none, the output files must be new,
    or crystal's own (listed in a manifest): a file the user made is never appended to or rebuilt."""
    rows = [] if options.overwrite else read_jsonl(sidecar)
    if not rows:
        runs.claim((options.output, sidecar), "generate", options.overwrite)
    return rows


def _provenance(options: GenerateOptions, inputs: dict, quant: str) -> dict:
    """What every sidecar row records about how it was drawn (the run's manifest holds the rest)."""
    return {"model": inputs["model"]["path"], "model_sha256": inputs["model"]["sha256"], "quant": quant,
            "backend": options.backend, "temperature": options.temperature, "top_p": options.top_p,
            "max_atoms": options.max_atoms, "run_seed": options.seed, "min_distance": min_distance(options)}


def _adopt_samples(sidecar: Path, rows: list[dict], prompt: str, seed: int) -> dict:
    """A sidecar written before manifests: its rows must hold this prompt and the seeds (seed, index) gives."""
    for row in rows:
        if row.get("prompt") != prompt:
            raise CrystalError(f"{sidecar}: --resume with different conditions than the existing samples (row id {row.get('id')})")
        if "index" in row and row.get("seed") != job_seed(seed, int(row["index"])):
            raise CrystalError(f"{sidecar}: --resume with --seed {seed}, but its samples were drawn with another seed "
                               f"(row id {row.get('id')})")
    return {"rows": len(rows), "unchecked": ["model", "quant", "backend", "temperature", "top_p", "max_atoms", "grammar",
                                       "min_distance"]}


# ----------------------------------------------------------------------------------------- generate

_NO_ROOM = "the distance guard found no position for the next site the grammar requires"


def _row(finished: Finished, name: str, prompt: str, provenance: dict) -> tuple[dict, object]:
    parsed = codec.parse_crystal(finished.text)
    detail = parsed.detail if parsed.reason else ""
    if not finished.ended:
        detail = f"cut at {finished.tokens} tokens; {detail}".rstrip("; ")
    row = {
        "id": name,
        "index": finished.index,
        "prompt": prompt,
        "text": finished.text,
        "status": finished.failure or ("ok" if parsed.ok else parsed.reason.value),
        "detail": _NO_ROOM if finished.failure == "no_room" else detail,
        "seconds": round(finished.seconds, 3),
        "seed": finished.seed,
        "tokens": finished.tokens,
        "guard_masked": finished.guard_masked,
        **provenance,
    }
    return row, parsed.structure


def generate(options: GenerateOptions, on_sample: Callable[[dict, GenerateSummary], None] | None = None,
             on_ready: Callable[[], None] | None = None) -> GenerateSummary:
    """Draw samples until the sidecar holds options.n of them; returns counts, parse failures, speed.
    `on_ready()` is called once the model is loaded, `on_sample(row, summary)` after every sample."""
    _check_common(options)
    if options.infill is not None or options.mask is not None:
        return infill(options, on_sample, on_ready)
    prompt, gbnf = prompt_and_grammar(options)
    sidecar, fmt = output_paths(options.output, options.fmt)
    source = resolve_model(options.model, LLM)
    inputs = model_inputs(source, options)
    manifest_options = {k: v for k, v in asdict(options).items() if k not in _NOT_OPTIONS} | {"prompt": prompt}
    rows = _existing(options, sidecar)
    start = _begin("generate", options, sidecar, rows, manifest_options, inputs, "samples",
                   lambda: _adopt_samples(sidecar, rows, prompt, options.seed))
    done = {int(r["index"]) for r in rows if "index" in r}
    summary = GenerateSummary(options.output, sidecar, options.n, existing=len(done), adopted=start.adopted_rows,
                              spacegroup=options.spacegroup)
    jobs = [Job(i, job_seed(options.seed, i)) for i in range(options.n) if i not in done]
    if not jobs:
        return summary
    backend = open_backend(options, source, gbnf)  # loads (or exports) before any output file is touched
    if on_ready is not None:
        on_ready()
    provenance = _provenance(options, inputs, backend.quant)
    stem = options.output.stem
    try:
        if options.overwrite:
            remove_structures(options.output, fmt)
            runs.discard(sidecar)
        start.commit()
        if fmt != "jsonl" and rows:
            _rebuild_structures(options.output, fmt, rows, options.symmetrize)
        appender = StructureAppender(options.output, fmt, mode="a" if rows else "w",
                                     symprec=options.symmetrize) if fmt != "jsonl" else None
        started = time.perf_counter()
        with sidecar.open("a" if rows else "w") as log:
            try:
                for finished in backend.run(prompt, jobs):
                    row, structure = _row(finished, f"{stem}-{finished.index:05d}", prompt, provenance)
                    with runs.interrupts_deferred():  # a row and its structure record, or neither
                        _record(summary, log, appender, row, structure, started, on_sample)
            finally:
                if appender is not None:
                    appender.close()
    finally:
        backend.close()
    return summary


def draw(options: GenerateOptions, source: str | Path, loaded=None) -> Iterator[tuple[dict, object]]:
    """(sidecar row, parsed structure or None) of every sample as it finishes, written nowhere: the loop of
    generate() without its files (crystal.iter_generate). `loaded`: a (LlamaModel, quant) pair to reuse."""
    _check_common(options)
    prompt, gbnf = prompt_and_grammar(options)
    backend = open_backend(options, source, gbnf, loaded)
    provenance = _provenance(options, model_inputs(source, options), backend.quant)
    try:
        for finished in backend.run(prompt, [Job(i, job_seed(options.seed, i)) for i in range(options.n)]):
            yield _row(finished, f"sample-{finished.index:05d}", prompt, provenance)
    finally:
        backend.close()


def _record(summary: GenerateSummary, log, appender: StructureAppender | None, row: dict, structure,
            started: float, on_sample) -> None:
    """One finished sample: its sidecar row, its structure (when it parsed and the file can hold it), the
    summary's counts, the caller's callback."""
    append_jsonl(log, row)
    if structure is not None:
        summary.valid += structural_validity(structure)[0]
        if summary.spacegroup is not None:  # the prompt asks; the model alone decides (no sampler constraint)
            summary.spacegroup_matched += codec.spacegroup_number(structure) == summary.spacegroup
        if appender is not None and not appender.append(structure, row["id"]):
            summary.not_in_file += 1
    _count(summary, row, started)
    if on_sample is not None:
        on_sample(row, summary)


def _count(summary: GenerateSummary, row: dict, started: float) -> None:
    summary.generated += 1
    summary.tokens += row.get("tokens", 0)
    summary.guard_masked += row.get("guard_masked", 0)
    if row["status"] == "ok":
        summary.ok += 1
    else:
        summary.failures[row["status"]] += 1
    summary.seconds = time.perf_counter() - started


def _rebuild_structures(output: Path, fmt: str, rows: list[dict], symprec: float | None = None) -> None:
    """The structure file made again from the sidecar (the source of truth), so resume never duplicates."""
    named = []
    for row in rows:
        if row.get("status") == "ok":
            parsed = codec.parse_crystal(row["text"])
            if parsed.ok:
                named.append((row["id"], parsed.structure))
    write_structures(output, named, fmt, symprec)


# -------------------------------------------------------------------------------------------- infill


def _adopt_substitutions(sidecar: Path, rows: list[dict], mask: str) -> dict:
    """An infill sidecar written before manifests: its rows must replace the same element."""
    other = next((r for r in rows if r.get("mask") != mask), None)
    if other is not None:
        raise CrystalError(f"{sidecar}: --resume with --mask {mask}, but its rows replace {other.get('mask')} "
                           f"(row id {other.get('id')})")
    return {"rows": len(rows), "unchecked": ["model", "quant", "backend"]}


def infill(options: GenerateOptions, on_sample=None, on_ready: Callable[[], None] | None = None) -> GenerateSummary:
    """For each structure in options.infill holding options.mask: every element ranked by P(element | masked
    crystal); the top n substitutions are written like samples (structure file + sidecar). A resumed run with
    a larger n appends, per structure, the next-ranked elements it has not written yet."""
    from pymatgen.core import Element

    from crystal_cli.datasets import read_structures

    if options.infill is None or options.mask is None:
        raise CrystalError("--infill FILE and --mask ELEMENT go together")
    if not Element.is_valid_symbol(options.mask):
        raise CrystalError(f"--mask {options.mask!r}: not an element symbol")
    entries = [e for e in read_structures(options.infill) if e.structure is not None]
    targets = [e for e in entries if options.mask in e.structure.composition.get_el_amt_dict()]
    if not targets:
        raise CrystalError(f"{options.infill}: no readable structure contains {options.mask}")
    sidecar, fmt = output_paths(options.output, options.fmt)
    source = resolve_model(options.model, LLM)
    inputs = model_inputs(source, options) | {"infill": runs.input_record(options.infill)}
    manifest_options = {k: getattr(options, k) for k in ("mask", "backend", "quant", "fmt", *RESUME_SAFE)}
    rows = _existing(options, sidecar)
    start = _begin("infill", options, sidecar, rows, manifest_options, inputs, "substitutions",
                   lambda: _adopt_substitutions(sidecar, rows, options.mask))
    written: dict[str, list[str]] = defaultdict(list)  # input id -> elements already written, in rank order
    for row in rows:
        written[row["source_id"]].append(row["element"])
    summary = GenerateSummary(options.output, sidecar, options.n, existing=len(rows), adopted=start.adopted_rows)
    todo = [e for e in targets if len(written[e.id]) < options.n]
    if not todo:
        return summary
    candidates = [el for el in ELEMENTS if el != options.mask]
    backend = open_backend(options, source, None)
    if on_ready is not None:
        on_ready()
    provenance = {k: v for k, v in _provenance(options, inputs, backend.quant).items()
                  if k in ("model", "model_sha256", "quant", "backend")}
    started = time.perf_counter()
    try:
        if options.overwrite:
            remove_structures(options.output, fmt)
            runs.discard(sidecar)
        start.commit()
        by_id = {e.id: e for e in targets}
        if fmt != "jsonl" and rows:  # remade from the sidecar and the inputs: exactly what a fresh run wrote
            write_structures(options.output, [(r["id"], _substituted(by_id[r["source_id"]], r["mask"], r["element"]))
                                              for r in rows if r.get("source_id") in by_id], fmt,
                             options.symmetrize)
        candidate_tokens = [backend.tokenize(el) for el in candidates]
        appender = StructureAppender(options.output, fmt, mode="a" if rows else "w",
                                     symprec=options.symmetrize) if fmt != "jsonl" else None
        with sidecar.open("a" if rows else "w") as log:
            for entry in todo:
                prompt = codec.infill_prompt(entry.structure, options.mask)
                scores = np.array(backend.score(prompt, candidate_tokens))
                probabilities = np.exp(scores - scores.max())
                probabilities /= probabilities.sum()
                order = np.argsort(-probabilities)
                summary.rankings.append(
                    {"id": entry.id, "ranked": [(candidates[i], float(probabilities[i])) for i in order[: max(options.n, 5)]]}
                )
                done = written[entry.id]
                for i in order:
                    if len(done) >= options.n:
                        break
                    if candidates[i] in done:
                        continue
                    substituted = _substituted(entry, options.mask, candidates[i])
                    row = {
                        "id": f"{entry.id}-{options.mask}-to-{candidates[i]}",
                        "source_id": entry.id,
                        "mask": options.mask,
                        "element": candidates[i],
                        "probability": float(probabilities[i]),
                        "rank": len(done) + 1,
                        "prompt": prompt,
                        "text": codec.encode_structure(substituted),
                        "status": "ok",
                        "detail": "",
                        "seconds": round(time.perf_counter() - started, 3),
                        **provenance,
                    }
                    done.append(candidates[i])
                    _record(summary, log, appender, row, substituted, started, on_sample)
        if appender is not None:
            appender.close()
    finally:
        backend.close()
    return summary


def _substituted(entry, mask: str, element: str):
    """The input structure with every `mask` site replaced by `element`."""
    structure = entry.structure.copy()
    structure.replace_species({mask: element})
    return structure
