"""The `crystal` command line: thin Typer commands over the library; only this module prints.

Heavy libraries (torch, transformers, llama.cpp, pymatgen) are imported inside commands so that
`crystal --help` stays instant.
"""

from __future__ import annotations

from crystal_cli.runtime import configure_process

configure_process()  # before anything imports torch or huggingface_hub

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from crystal_cli import __version__  # noqa: E402
from crystal_cli.errors import CrystalError, check_counts  # noqa: E402

console = Console()
err_console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns CrystalError into one red line and exit code 2; Ctrl-C (or SIGTERM) into exit code 130."""

    def invoke(self, ctx):
        from crystal_cli.runs import stop_on_terminate

        stop_on_terminate()
        try:
            return super().invoke(ctx)
        except CrystalError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/] — finished work is saved; rerun with --resume to continue")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="Generate stable inorganic crystals with a fine-tuned language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"crystal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Generate stable inorganic crystals with a fine-tuned language model."""


def _total_then_steps(bar: Progress, description: str):
    """The progress callback of stages that report progress(total) once, then progress(None) per item."""
    task = bar.add_task(description, total=None)

    def on_progress(total: int | None) -> None:
        if total is not None:
            bar.update(task, total=total)
        else:
            bar.advance(task)

    return on_progress


class _Progress(Progress):
    """A progress display that appears when its first task moves, so that an input error found before any
    work is done prints only its one line."""

    def __enter__(self) -> _Progress:
        return self

    def update(self, *args, **kwargs) -> None:
        if not self.live.is_started:
            self.start()
        super().update(*args, **kwargs)

    def advance(self, *args, **kwargs) -> None:
        if not self.live.is_started:
            self.start()
        super().advance(*args, **kwargs)


def progress_bar(*extra_columns) -> Progress:
    """The one progress bar style every long command uses."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra_columns,
        console=err_console,
        transient=False,
    )


# ------------------------------------------------------------------------------------------------ encode


@app.command()
def encode(
    data: Annotated[Optional[list[Path]], typer.Argument(help="Datasets: csv(.gz), split dir, CIF(s), POSCAR, extxyz.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output directory for <split>.jsonl.")] = None,
    task: Annotated[
        Optional[list[str]], typer.Option("--task", "-t", help="Prompt task(s); repeat. Default: unconditional.")
    ] = None,
    augment: Annotated[int, typer.Option(help="Extra randomly translated copies per structure.")] = 0,
    permute: Annotated[bool, typer.Option(help="Also shuffle site order in augmented copies.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for augmentation, condition subsets and splits.")] = 0,
    max_atoms: Annotated[Optional[int], typer.Option(help="Skip structures with more sites.")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="Read at most this many rows per input file.")] = None,
    exclude_ids: Annotated[
        Optional[list[Path]], typer.Option("--exclude-ids", help="Drop materials whose id appears in this dataset/list.")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Move a seeded fraction of train materials to val.")] = 0.0,
    recipe: Annotated[Optional[Path], typer.Option(help="Data recipe TOML (inputs, splits, options).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace files in the output directory that crystal did not write.")] = False,
) -> None:
    """Encode crystal datasets into text records (prompt, completion) for fine-tuning."""
    import dataclasses

    from crystal_cli.encode import EncodeOptions, encode as encode_records, load_recipe, read_id_list

    if recipe is not None:
        inputs, recipe_output, options = load_recipe(recipe)
        inputs += [(p, None) for p in data or []]
        output = output or recipe_output
    else:
        if not data:
            raise CrystalError("give at least one DATA path (or --recipe)")
        if output is None:
            raise CrystalError("give an output directory with -o")
        excluded: set[str] = set()
        for path in exclude_ids or []:
            excluded |= read_id_list(path)
        options = EncodeOptions(
            tasks=tuple(task or ("unconditional",)),
            augment=augment,
            permute=permute,
            seed=seed,
            max_atoms=max_atoms,
            exclude_ids=frozenset(excluded),
            val_fraction=val_fraction,
        )
        inputs = [(p, None) for p in data]
    options = dataclasses.replace(options, max_rows=max_rows)  # re-checked like every other option

    with progress_bar() as bar:
        current: dict[str, int] = {}

        def on_progress(split: str, total: int | None) -> None:
            if total is not None or split not in current:
                current[split] = bar.add_task(f"encode {split}", total=total)
            else:
                bar.advance(current[split])

        stats = encode_records(inputs, output, options, progress=on_progress, overwrite=overwrite)

    table = Table(title=f"crystal encode → {output}")
    for column in ("split", "rows read", "structures", "records", "skipped (reason: n)"):
        table.add_column(column, justify="left" if column in ("split", "skipped (reason: n)") else "right")
    for name, s in stats["splits"].items():
        skipped = ", ".join(f"{r}: {n}" for r, n in sorted(s["skipped"].items(), key=lambda kv: -kv[1])) or "-"
        table.add_row(name, str(s["rows_read"]), str(s["structures"]), str(s["records"]), skipped)
    console.print(table)


# ---------------------------------------------------------------------------------------- other stages
# Each stage registers its commands below its own marker (kept so parallel work never collides).

# >>> finetune commands


@app.command()
def finetune(
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Records dir from crystal encode (train.jsonl, val.jsonl).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Run directory (config, metrics, checkpoints, adapter).")] = ...,
    recipe: Annotated[Optional[Path], typer.Option(help="Training recipe TOML (training/NAME.toml).")] = None,
    base: Annotated[Optional[str], typer.Option(help="smollm2-135m (default), tiny, a .gguf file or an HF dir.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (train.max_steps; sets train.epochs = 0).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs instead of steps (train.epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per micro-batch (train.batch_size).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step (train.grad_accum).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (train.learning_rate).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Longest example in tokens (data.max_length).")] = None,
    translate: Annotated[Optional[float], typer.Option(help="Random-translation probability (data.translate).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for init, data order, augmentation (train.seed).")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate val loss every N steps.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (train.checkpoint_every).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any recipe key: section.key=VALUE (repeat).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in -o from its last checkpoint.")] = False,
) -> None:
    """Fine-tune a base LLM on crystal text records, LoRA or every weight (recipe values, overridden by flags)."""
    from rich.progress import TextColumn

    from crystal_cli.finetune import finetune as run_finetune, resolve_config
    from crystal_cli.finetune.model import compiles, device_and_dtype
    from crystal_cli.recipes import parse_overrides

    flags = {
        "base": base, "data.records": str(data) if data is not None else None, "train.max_steps": steps,
        "train.epochs": epochs, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
        "train.learning_rate": lr, "data.max_length": max_length, "data.translate": translate, "train.seed": seed,
        "train.eval_every": eval_every, "train.checkpoint_every": save_every, "train.device": device,
        "train.precision": precision,
    }
    if steps is not None and epochs is None:
        flags["train.epochs"] = 0.0  # --steps means steps even when the recipe counts epochs
    overrides = parse_overrides(set_) | {k: v for k, v in flags.items() if v is not None}
    config = resolve_config(output, recipe, overrides, resume=resume)
    if compiles(config.train.compile, device_and_dtype(config.train, 0)[0]):
        err_console.print(f"[yellow]note:[/] train.compile = {config.train.compile!r}: the decoder runs under "
                          "torch.compile; the first steps (and the first evaluation) compile it: minutes, up to "
                          "~15 for a 135M-parameter base on a 2-core CPU (inductor caches the result for later runs)")
    columns = (TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
               TextColumn("{task.fields[speed]} tok/s"))
    with progress_bar(*columns) as bar:
        task_id = bar.add_task("finetune", total=None, loss="-", val="-", speed="-")

        def on_event(event) -> None:
            if event.val_loss is not None:
                bar.update(task_id, total=event.max_steps, completed=event.step, val=f"{event.val_loss:.4f}")
            else:
                bar.update(task_id, total=event.max_steps, completed=event.step, loss=f"{event.loss:.4f}",
                           speed=f"{event.tokens_per_s:,.0f}")

        result = run_finetune(config, output, resume=resume, on_event=on_event)
    table = Table(title=f"crystal finetune → {output}")
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    val = "-" if result.val_loss is None else f"{result.val_loss:.4f}"
    if result.first_val_loss is not None and result.val_loss is not None:
        val = f"{result.first_val_loss:.4f} → {result.val_loss:.4f}"
    rows = [("steps", str(result.steps)), ("train loss (last step)", f"{result.train_loss:.4f}" if result.train_loss else "-"),
            ("val loss (start → end)", val), ("tokens", f"{result.tokens:,}"),
            ("tokens/s", f"{result.tokens / max(result.wall_s, 1e-9):,.0f}"), ("wall", f"{result.wall_s:.0f} s")]
    rows += [(k.replace("_", " "), f"{v:,}" if isinstance(v, int) else str(v)) for k, v in result.counts.items()]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if result.interrupted:
        err_console.print(f"[yellow]interrupted[/] at step {result.steps}: checkpoint saved; "
                          f"continue with: crystal finetune -o {output} --resume")
        raise typer.Exit(130)
    weights = output / ("model" if config.train.method == "full" else "adapter")
    console.print(f"{weights.name}: {weights}")


@app.command()
def perplexity(
    source: Annotated[Path, typer.Argument(help="Records (dir or .jsonl) or structures (CIF, csv, extxyz, samples.jsonl).")],
    model: Annotated[str, typer.Option("-m", "--model", help="Finished run dir, or a base (smollm2-135m, tiny, path).")],
    translations: Annotated[int, typer.Option(help="Random translations per crystal for IPT (0: perplexity only).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for the translations.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    split: Annotated[str, typer.Option(help="Split of a records directory to score.")] = "val",
    limit: Annotated[Optional[int], typer.Option(help="Score at most this many items.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write every score as jsonl (lowest perplexity first).")] = None,
    top: Annotated[int, typer.Option(help="Rows to show (lowest perplexity first).")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing -o file that crystal did not write.")] = False,
) -> None:
    """Per-structure perplexity under a model and IPT (increase in perplexity under translation)."""
    from crystal_cli.perplexity import check_output, perplexity as score, write_scores

    check_output(output, overwrite)
    with progress_bar() as bar:
        task_id = bar.add_task("perplexity", total=None)
        report = score(model, source, translations=translations, seed=seed, batch_size=batch_size, split=split,
                       limit=limit, device=device, progress=lambda done, total: bar.update(task_id, completed=done, total=total))
    ranked = sorted(report.items, key=lambda s: s.perplexity)
    if output is not None:
        write_scores(ranked, output, model, source)
    table = Table(title=f"perplexity of {source} under {model}")
    for column in ("id", "task", "tokens", "perplexity", "IPT"):
        table.add_column(column, justify="left" if column in ("id", "task") else "right")
    for s in ranked[:top]:
        table.add_row(s.id, s.task, str(s.tokens), f"{s.perplexity:.4f}", "-" if s.ipt is None else f"{s.ipt:.4f}")
    console.print(table)
    ipt = report.mean_ipt
    console.print(f"{len(report.items)} scored, mean perplexity {report.mean_perplexity:.4f}"
                  + (f", mean IPT {ipt:.4f} ({report.translations} translations)" if ipt is not None else "")
                  + (f"; skipped {report.skipped}" if report.skipped else ""))


# <<< finetune commands

# >>> generate commands


@app.command("export")
def export_command(
    run: Annotated[str, typer.Argument(help="Finetune run directory, or a base (tiny, smollm2-135m, HF dir, .gguf).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .gguf file to write.")],
    quant: Annotated[str, typer.Option(help="Weight type: f32, f16, q8_0, q4_0 or q4_k_m.")] = "f16",
    adapter_only: Annotated[
        bool, typer.Option("--adapter-only", help="Write only the LoRA adapter (GGUF LoRA, applied on the base GGUF).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing -o file that crystal did not write.")] = False,
) -> None:
    """Export a fine-tuned run (base + LoRA merged) or a base to a GGUF file llama.cpp loads."""
    from crystal_cli.export import export

    with err_console.status(f"exporting {run} → {output}"):
        result = export(run, output, quant, adapter_only, overwrite=overwrite)
    kind = "LoRA adapter" if result.adapter_only else f"model ({result.quant})"
    console.print(f"wrote {result.path}: {kind}, {result.tensors} tensors, {result.bytes / 1e6:.1f} MB")
    if result.adapter_only:
        console.print(f"apply it with: crystal generate -m BASE.gguf --adapter {result.path} (tokenizer: {result.base_gguf.name})")


@app.command()
def generate(
    model: Annotated[
        Optional[str], typer.Option("-m", "--model", help=".gguf, finetune run directory, or a name in models/.")
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="samples.cif (+ samples.jsonl sidecar).")] = Path("samples.cif"),
    n: Annotated[int, typer.Option("-n", help="Number of samples (with --resume: the total to reach).")] = 10,
    formula: Annotated[Optional[str], typer.Option(
        help="Exact composition, enforced by the grammar: LiFePO4 (any number of formula units within --max-atoms) "
             "or Li2Fe2P2O8 (exactly these atoms). The prompt states the reduced formula, as the training data does."
    )] = None,
    spacegroup: Annotated[Optional[int], typer.Option(help="Space group number condition (1-230).")] = None,
    e_hull: Annotated[Optional[float], typer.Option("--e-hull", help="Energy above hull condition, eV/atom.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Run seed; sample i is seeded by (seed, i).")] = 0,
    max_atoms: Annotated[int, typer.Option(help="Most sites per structure.")] = 20,
    parallel: Annotated[int, typer.Option(help="Sequences decoded at once.")] = 32,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", help="cif, extxyz, jsonl, or poscar (-o names a directory: one POSCAR per sample, named by its "
                         "id); default: from -o.")] = None,
    symmetrize: Annotated[Optional[float], typer.Option(
        help="Write symmetry-refined CIF blocks (spglib via pymatgen) found with this tolerance, e.g. 0.1 Å.")] = None,
    resume: Annotated[bool, typer.Option(help="Top an existing output up to -n samples.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Start over: replace an existing output and its sidecar, even files crystal did not write.")
    ] = False,
    backend: Annotated[str, typer.Option(help="llama (llama.cpp, batched) or transformers.")] = "llama",
    grammar: Annotated[bool, typer.Option(help="Constrain sampling with the crystal grammar.")] = True,
    adapter: Annotated[Optional[Path], typer.Option(help="GGUF LoRA adapter applied on a .gguf model.")] = None,
    quant: Annotated[
        str, typer.Option(help="Weight type of on-the-fly exports: auto (f32 below 2 GB of weights, else q8_0) or a type.")
    ] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: one per core no other process keeps busy).")] = None,
    infill_file: Annotated[
        Optional[Path], typer.Option("--infill", help="Structures to propose substitutions for (with --mask).")
    ] = None,
    mask: Annotated[Optional[str], typer.Option(help="Element to replace; candidates ranked by probability.")] = None,
    min_distance: Annotated[
        Optional[float], typer.Option(help="No two atoms closer than this, Å, periodic images included (masked while "
                                      "sampling; 0 = off). Default 0.5 (needs the grammar).")
    ] = None,
) -> None:
    """Sample crystals from a fine-tuned model, conditioned on formula / space group / stability."""
    from rich.progress import TextColumn

    from crystal_cli.api import generate_to_file
    from crystal_cli.codec import SYMPREC
    from crystal_cli.sampling import GenerateOptions, check_options

    options = GenerateOptions(
        model=model, output=output, n=n, formula=formula, spacegroup=spacegroup, e_hull=e_hull,
        temperature=temperature, top_p=top_p, seed=seed, max_atoms=max_atoms, parallel=parallel, fmt=fmt,
        symmetrize=symmetrize,
        resume=resume, overwrite=overwrite, backend=backend, grammar=grammar, adapter=adapter, quant=quant, threads=threads,
        infill=infill_file, mask=mask, min_distance=min_distance,
    )
    check_options(options)
    loading = err_console.status("loading model")  # transient: an error while loading leaves only its line
    loading.start()
    with progress_bar(TextColumn("{task.fields[speed]}")) as bar:
        task = bar.add_task("generate", total=None, speed="sampling")

        def on_ready() -> None:
            loading.stop()
            bar.update(task)

        def on_sample(row: dict, summary) -> None:
            total = summary.requested if infill_file is None else None
            rate = summary.generated / summary.seconds if summary.seconds else 0.0
            bar.update(task, total=total, completed=summary.existing + summary.generated,
                       speed=f"{rate:.2f} structures/s · parsed {summary.parse_rate:.0%}")

        try:
            summary = generate_to_file(options, on_sample, on_ready)
        finally:
            loading.stop()
    for ranking in summary.rankings:
        table = Table(title=f"{ranking['id']}: replacements for {mask}")
        table.add_column("element")
        table.add_column("probability", justify="right")
        for element, probability in ranking["ranked"]:
            table.add_row(element, f"{probability:.3f}")
        console.print(table)
    if summary.adopted:
        err_console.print(f"[yellow]note:[/] {summary.sidecar} was written before crystal kept run manifests: took over "
                          f"its {summary.adopted} rows, whose model and sampling settings could not be checked")
    if summary.not_in_file:
        err_console.print(f"[yellow]note:[/] {summary.not_in_file} parsed samples are not in {summary.output}: their "
                          f"sites overlap, which pymatgen cannot read back from a CIF; {summary.sidecar} keeps them")
    if temperature == 0 and summary.generated > 1 and infill_file is None:
        err_console.print("[yellow]note:[/] --temperature 0 is greedy decoding: every sample of one prompt is the same")
    failures = ", ".join(f"{k}: {v}" for k, v in summary.failures.most_common()) or "none"
    speed = summary.generated / summary.seconds if summary.seconds else 0.0
    console.print(
        f"{summary.generated} new samples ({summary.existing} already there) → {summary.output}, {summary.sidecar}; "
        f"parsed {summary.ok}/{summary.generated}, structurally valid (all distances ≥ 0.5 Å) "
        f"{summary.valid}/{summary.generated}; failures: {failures}; {speed:.2f} structures/s, "
        f"{summary.tokens / summary.seconds if summary.seconds else 0.0:.0f} tokens/s"
        + (f"; distance guard masked {summary.guard_masked} tokens" if summary.guard_masked else "")
        + (f"; space group {summary.spacegroup} found (symprec {SYMPREC} Å) in "
           f"{summary.spacegroup_matched}/{summary.generated}" if summary.spacegroup is not None else "")
    )


# <<< generate commands

# >>> evaluate commands

hull_app = typer.Typer(help="Convex hulls of reference formation energies, for `crystal evaluate --hull`.",
                       no_args_is_help=True)
app.add_typer(hull_app, name="hull")


@hull_app.command("build")
def hull_build(
    tables: Annotated[
        Optional[list[Path]],
        typer.Argument(help="csv/parquet with formation_energy_per_atom and a formula (or cif) column. "
                            "Default: ../shared/data hull/mp20_near_hull.parquet + mp_20 + mpts_52 csvs "
                            "(beside the checkout; CRYSTAL_SHARED_DATA moves it)."),
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Hull file to write (.json or .json.gz).")] = ...,
    elements: Annotated[
        Optional[Path], typer.Option(help="MP elemental reference entries (json.gz). "
                                          "Default: ../shared/data/hull/mp_elemental_reference_entries.json.gz")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing -o file that is not a crystal hull.")] = False,
) -> None:
    """Build a convex hull (MP frame: MP elemental references + reference formation energies)."""
    from crystal_cli.evaluate.hull import BuildStats, build_hull, check_output, default_elements, default_tables

    check_output(output, overwrite)
    tables = tables or default_tables()
    elements = elements or default_elements()
    stats = BuildStats()
    with err_console.status("building hull"):
        hull = build_hull(tables, elements, stats)
        hull.save(output)
    table = Table(title=f"crystal hull build → {output}")
    for column in ("rows read", "rows used", "formulas", "elements", "skipped (reason: n)"):
        table.add_column(column, justify="left" if column.startswith("skipped") else "right")
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(stats.skipped.items(), key=lambda kv: -kv[1])) or "-"
    table.add_row(str(stats.rows_read), str(stats.rows_used), str(len(hull.entries)),
                  str(len(hull.elemental_energies)), skipped)
    console.print(table)


def _fmt_rate(rate: dict | None) -> str:
    if not rate or rate.get("rate") is None:
        return "-"
    return (f"{100 * rate['rate']:.1f} % ({rate['k']}/{rate['n']}) "
            f"[{100 * rate['low']:.1f}–{100 * rate['high']:.1f}]")


def _fmt_number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _render_report(report: dict) -> None:
    counts = report["counts"]
    table = Table(title=f"crystal evaluate: {counts['entries']} entries, {counts['structures']} parsed, "
                        f"{counts['valid']} valid")
    table.add_column("metric")
    table.add_column("rate (k/n) [95 % Wilson]", justify="right")
    validity = report["validity"]
    for name in ("structural", "compositional", "overall"):
        table.add_row(f"{name} validity (of all)", _fmt_rate(validity[name]))
    table.add_row("uniqueness (of valid)", _fmt_rate(report["uniqueness"]))
    if "novelty" in report:
        table.add_row("novelty (of valid)", _fmt_rate(report["novelty"]))
        table.add_row("unique and novel (of valid)", _fmt_rate(report["unique_and_novel"]))
    stability = report.get("stability")
    if stability and "metastable" in stability:
        table.add_row("metastable (E_hull < 0.1; of sampled)", _fmt_rate(stability["metastable"]))
        table.add_row("stable (E_hull < 0, ≥ 2 elements; of sampled)", _fmt_rate(stability["stable"]))
        if "sun" in stability:
            table.add_row("SUN (stable, unique, novel; of sampled)", _fmt_rate(stability["sun"]))
    console.print(table)
    if validity["invalid_reasons"]:
        console.print("invalid: " + ", ".join(f"{r}: {n}" for r, n in validity["invalid_reasons"].items()))
    extra = Table(title="distribution and energies")
    extra.add_column("quantity")
    extra.add_column("value", justify="right")
    for key in ("cov_recall", "cov_precision", "amsd_recall", "amsd_precision"):
        if "coverage" in report and report["coverage"].get(key) is not None:
            extra.add_row(key.replace("_", " "), _fmt_number(report["coverage"][key]))
    for key in ("wdist_density", "wdist_num_elems"):
        if "distribution" in report and report["distribution"].get(key) is not None:
            extra.add_row(key.replace("_", " "), _fmt_number(report["distribution"][key]))
    if stability:
        extra.add_row("relaxed / sampled", f"{stability['relaxed']}/{stability['sampled']}")
        if stability["failures"]:
            extra.add_row("not stable because", ", ".join(f"{r}: {n}" for r, n in stability["failures"].items()))
        for key, label in (("energy_per_atom", "energy per atom (eV), median"),
                           ("e_above_hull", "E_hull (eV/atom), median"),
                           ("seconds_per_relaxation", "seconds per relaxation, mean")):
            stats = stability.get(key)
            if stats:
                extra.add_row(label, _fmt_number(stats["mean" if key.startswith("seconds") else "median"]))
    if extra.row_count:
        console.print(extra)


@app.command()
def evaluate(
    samples: Annotated[Path, typer.Argument(help="Samples: multi-block CIF, CIF dir, generate jsonl, extxyz, csv.")],
    reference: Annotated[Optional[Path], typer.Option(help="Novelty reference: training data (dir, csv, records).")] = None,
    coverage_reference: Annotated[
        Optional[Path], typer.Option(help="Reference test set for COV-R/COV-P and Wasserstein distances.")
    ] = None,
    coverage_max_reference: Annotated[int, typer.Option(help="Seeded subsample of the coverage reference.")] = 1000,
    hull: Annotated[Optional[Path], typer.Option(help="Hull file from `crystal hull build`; without it no E_hull.")] = None,
    potential: Annotated[str, typer.Option(help="'chgnet' or a matgl model directory.")] = "chgnet",
    stability: Annotated[bool, typer.Option(help="Relax with the potential (energies, E_hull).")] = True,
    stability_samples: Annotated[Optional[int], typer.Option(help="Relax a seeded subset of this many entries.")] = None,
    fmax: Annotated[float, typer.Option(help="Force convergence criterion, eV/Å.")] = 0.05,
    steps: Annotated[int, typer.Option(help="Maximum FIRE steps per structure.")] = 500,
    relax_cell: Annotated[bool, typer.Option(help="Relax the cell too (FrechetCellFilter).")] = True,
    time_limit: Annotated[float, typer.Option(help="Seconds per structure before it counts as timed out.")] = 120.0,
    workers: Annotated[int, typer.Option(help="Worker processes for matching, fingerprints, relaxation.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for every subsample.")] = 0,
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Directory for report.json, structures.csv, relaxed.cif.")
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write the per-structure csv here.")] = None,
    relaxed_path: Annotated[Optional[Path], typer.Option("--relaxed", help="Write relaxed structures here.")] = None,
    relaxed_format: Annotated[str, typer.Option(
        "--format", help="Relaxed structures as cif, extxyz, jsonl or poscar (a directory, one POSCAR per id).")] = "cif",
    plots: Annotated[Optional[Path], typer.Option(help="Directory for PNG plots.")] = None,
    chemsys: Annotated[Optional[str], typer.Option(
        help="--plots: phase diagram of this chemical system, e.g. Li-Fe-P-O (default: the samples' most frequent, "
             "2-4 elements; needs --hull).")] = None,
    resume: Annotated[bool, typer.Option(help="Reuse finished relaxations from OUTPUT/stability.jsonl.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Relax again and replace existing outputs, even files crystal did not write.")
    ] = False,
) -> None:
    """Judge crystals: validity, uniqueness, novelty, coverage, and stability by ML potential + convex hull.

    Metrics (each rate with its count, denominator and 95 % Wilson interval): structural validity (every
    interatomic distance >= 0.5 Å, volume >= 0.1 Å³) and compositional validity (SMACT charge neutrality and
    Pauling test) of all entries; uniqueness and novelty (pymatgen StructureMatcher) of valid structures;
    COV-R / COV-P, coverage recall and precision: the share of reference structures with a sample, and of
    samples with a reference structure, within the CrystalNN fingerprint (0.4) and Magpie composition (10)
    distance cut-offs; AMSD-R / AMSD-P and AMCD-R / AMCD-P: average minimum structure / composition
    fingerprint distance in each direction; wdist: Wasserstein distance of density and of the number of
    elements; metastable (E_hull < 0.1 eV/atom), stable (E_hull < 0 with >= 2 elements) and SUN (stable,
    unique and novel) of the seeded stability subset.
    """
    from crystal_cli import runs
    from crystal_cli.api import evaluate_file
    from crystal_cli.evaluate.pipeline import EvaluateOptions, check_options
    from crystal_cli.evaluate.potential import RelaxSettings
    from crystal_cli.evaluate.report import OutputPaths, check_chemsys, write_outputs

    if resume and output is None:
        raise CrystalError("--resume needs -o/--output (the relaxation log lives there)")
    if resume and overwrite:
        raise CrystalError("--resume reuses the relaxations and --overwrite redoes them: pass one of them")
    runs.dir_output(output, "-o")
    paths = OutputPaths.of(output, json_path, csv_path, relaxed_path, plots, relaxed_format)
    paths.check(stability, overwrite)
    check_chemsys(chemsys)
    options = EvaluateOptions(
        reference=reference, coverage_reference=coverage_reference, coverage_max_reference=coverage_max_reference,
        hull=hull, potential=potential, stability=stability, stability_samples=stability_samples,
        relax=RelaxSettings(fmax=fmax, max_steps=steps, relax_cell=relax_cell, time_limit=time_limit),
        seed=seed, workers=workers, stability_log=paths.stability_log, resume=resume, overwrite=overwrite,
    )
    check_options(options)
    with progress_bar() as bar:
        def stage(description: str, total: int | None):
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        result = evaluate_file(samples, options, stage)
    evaluation, report = result.evaluation, result.data
    if evaluation.adopted_relaxations:
        err_console.print(f"[yellow]note:[/] {paths.stability_log} was written before crystal kept run manifests: "
                          f"reused its {evaluation.adopted_relaxations} relaxations, whose potential and settings "
                          "could not be checked")
    _render_report(report)
    written = write_outputs(evaluation, report, paths, samples, stability, chemsys)
    for path in written.get("reports", []):
        console.print(f"report → {path}")
    if "relaxed" in written:
        console.print(f"{written['relaxed'][0]} relaxed structures → {written['relaxed'][1]}")
    if "csv" in written:
        console.print(f"per-structure csv → {written['csv']}")
    if "plots" in written:
        console.print(f"plots → {', '.join(str(p) for p in written['plots'])}")


# <<< evaluate commands

# >>> flow commands
flow_app = typer.Typer(cls=_Group, help="FlowLLM refiner: paired data and flow-matching training.", no_args_is_help=True)
app.add_typer(flow_app, name="flow")


@flow_app.command("pairs")
def flow_pairs(
    targets: Annotated[Path, typer.Argument(help="Training crystals c1: csv(.gz), split dir, CIF(s), extxyz, jsonl.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Pairs directory (pairs.jsonl, progress.jsonl, stats.json).")],
    samples: Annotated[
        Optional[Path], typer.Option(help="LLM samples (CIF/jsonl) matched to targets by reduced formula and atom count.")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="LLM as `crystal generate -m` takes it (.gguf, finetune run, shipped name such as default): sample c0 prompting with each target's formula.")
    ] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="--model: a GGUF LoRA adapter to apply.")] = None,
    temperature: Annotated[float, typer.Option(help="--model: sampling temperature.")] = 1.0,
    threads: Annotated[Optional[int], typer.Option(help="--model: llama.cpp threads (default: one per idle core).")] = None,
    perturb: Annotated[bool, typer.Option(help="c0 = the target with coordinate and lattice noise.")] = False,
    coord_noise: Annotated[float, typer.Option(help="--perturb: std of fractional-coordinate noise.")] = 0.05,
    lattice_noise: Annotated[float, typer.Option(help="--perturb: std of noise on log lengths / logit angles.")] = 0.05,
    per_target: Annotated[int, typer.Option(help="Base samples per target.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed (streams are per target, so resumed runs match).")] = 0,
    max_atoms: Annotated[Optional[int], typer.Option(help="Skip targets with more sites.")] = None,
    max_targets: Annotated[Optional[int], typer.Option(help="Use at most this many targets.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a pairs directory where it stopped.")] = False,
    min_distance: Annotated[
        float, typer.Option(help="--model: no two atoms of c0 closer than this, Å (distance guard; 0 = off).")
    ] = 0.5,
    workers: Annotated[
        int, typer.Option(help="Processes drawing targets side by side, each with its own model (--model: one "
                          "llama.cpp thread each unless --threads); same files as one. On a CPU, one per core.")
    ] = 1,
) -> None:
    """Build (c0, c1) pairs: a base sample per training crystal, sites aligned to the target's."""
    from crystal_cli.flow.pairs import FileSamples, PairOptions, PerturbedSamples, build_pairs
    from crystal_cli.sampling.guard import check_min_distance

    check_min_distance(min_distance)
    check_counts({"--workers": workers})  # before a model loads

    chosen = [name for name, given in (("--samples", samples), ("--model", model), ("--perturb", perturb)) if given]
    if len(chosen) != 1:
        raise CrystalError(f"choose exactly one base-sample source: --samples, --model or --perturb (got {chosen or 'none'})")
    if per_target < 1:
        raise CrystalError(f"--per-target must be >= 1, got {per_target}")
    if samples is not None:
        source = FileSamples(samples)
    elif model is not None:
        from crystal_cli.flow.pairs import LLMSamples

        if threads is None and workers > 1:
            threads = 1  # one sequence per target: a process's extra threads mostly wait
        source = LLMSamples(model, adapter=adapter, temperature=temperature, threads=threads, min_distance=min_distance)
    else:
        source = PerturbedSamples(coord_noise=coord_noise, lattice_noise=lattice_noise)
    options = PairOptions(samples_per_target=per_target, seed=seed, max_atoms=max_atoms, max_targets=max_targets)
    with progress_bar() as bar:
        stats = build_pairs(targets, output, source, options, resume=resume, progress=_total_then_steps(bar, "pairs"),
                            workers=workers)
    run = stats["this_run"]
    table = Table(title=f"crystal flow pairs → {output}")
    for column in ("source", "targets (this run)", "pairs (this run)", "pairs (total)", "skipped (reason: n)"):
        table.add_column(column, justify="left" if column in ("source", "skipped (reason: n)") else "right")
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(run["skipped"].items(), key=lambda kv: -kv[1])) or "-"
    table.add_row(stats["source"], str(run["targets"]), str(run["pairs"]), str(stats["total_pairs"]), skipped)
    console.print(table)


@flow_app.command("train")
def flow_train(
    output: Annotated[Path, typer.Option("-o", "--output", help="Run directory, e.g. runs/flow-NAME.")],
    pairs: Annotated[Optional[Path], typer.Option(help="Pairs directory or pairs.jsonl (overrides the recipe).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe TOML: pairs, model and train tables (training/flow-*.toml).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (overrides the recipe).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Pairs per step (overrides the recipe).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (overrides the recipe).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (overrides the recipe).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any recipe key: section.key=VALUE (repeat), "
                                                      "e.g. model.hidden_dim=512.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue RUN from its checkpoint (its saved config; a recipe or flags must agree).")
    ] = False,
) -> None:
    """Train the flow-matching refiner on (c0, c1) pairs."""
    from crystal_cli import recipes
    from crystal_cli.flow.train import RunConfig, resumed_config, train

    flags = {"pairs": str(pairs) if pairs is not None else None, "train.steps": steps,
             "train.batch_size": batch_size, "train.lr": lr, "train.seed": seed}
    settings = ((recipes.load(recipe, RunConfig) if recipe is not None else {}) | recipes.parse_overrides(set_)
                | {k: v for k, v in flags.items() if v is not None})
    if not resume and "pairs" not in settings:
        raise CrystalError("give --pairs DIR (or a --recipe that names pairs)")
    where = str(recipe or "options")
    config = recipes.build(RunConfig, settings, where) if not resume else resumed_config(output, settings, where)
    with progress_bar(TextColumn("{task.fields[loss]}")) as bar:
        task = bar.add_task("train", total=None, loss="")

        def on_progress(step: int, total: int, row: dict | None) -> None:
            loss = f"loss {row['loss']:.4f}" if row and "loss" in row else bar.tasks[0].fields["loss"]
            bar.update(task, completed=step, total=total, loss=loss)

        summary = train(config, output, resume=resume, progress=on_progress)
    table = Table(title=f"crystal flow train → {output}")
    for column in ("steps", "train pairs", "val pairs", "parameters", "last loss", "model"):
        table.add_column(column, justify="left" if column == "model" else "right")
    last = summary["last_metrics"] or {}
    table.add_row(str(summary["steps"]), str(summary["train_pairs"]), str(summary["val_pairs"]),
                  f"{summary['parameters']:,}", f"{last.get('loss', float('nan')):.4f}", summary["model"])
    console.print(table)


@app.command()
def refine(
    samples: Annotated[Path, typer.Argument(help="Structures to refine: CIF (multi-block), jsonl of samples, csv, extxyz.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Refined structures: multi-block .cif, .extxyz, .jsonl of structure "
                           "dicts, or a directory with --format poscar.")
    ],
    model: Annotated[
        str, typer.Option(help="Flow run directory (runs/flow-NAME) or a shipped model name under models/.")
    ] = "flow-default",
    fmt: Annotated[Optional[str], typer.Option(
        "--format", help="cif, extxyz, jsonl, or poscar (-o names a directory: one POSCAR per input, named by its "
                         "id); default: from -o.")] = None,
    steps: Annotated[int, typer.Option(help="Euler steps from t=0 to t=1.")] = 250,
    batch_size: Annotated[int, typer.Option(help="Structures integrated together.")] = 64,
    log: Annotated[Optional[Path], typer.Option(help="Per-structure step log (default OUTPUT.steps.jsonl).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue after the inputs already in the log.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Start over: replace an existing output and step log, even files crystal did not write.")
    ] = False,
    min_distance: Annotated[
        float, typer.Option(help="Report refined structures with two atoms closer than this, Å (the flow can move "
                            "atoms together again).")
    ] = 0.5,
) -> None:
    """Refine crystals (e.g. LLM samples) with a trained flow-matching network; keeps atom order and types."""
    from crystal_cli.api import refine_file
    from crystal_cli.sampling.guard import check_min_distance

    if batch_size < 1:
        raise CrystalError(f"--batch-size must be >= 1, got {batch_size}")
    check_min_distance(min_distance)
    with progress_bar() as bar:
        stats = refine_file(samples, output, model, fmt=fmt, steps=steps, batch_size=batch_size, log_path=log,
                            resume=resume, progress=_total_then_steps(bar, "refine"), min_distance=min_distance,
                            overwrite=overwrite)
    table = Table(title=f"crystal refine → {output}")
    too_close = f"closer than {min_distance:g} Å"
    for column in ("inputs", "refined", too_close, "resumed from", "skipped (reason: n)", "step log"):
        table.add_column(column, justify="left" if column in ("skipped (reason: n)", "step log") else "right")
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(stats["skipped"].items(), key=lambda kv: -kv[1])) or "-"
    table.add_row(str(stats["inputs"]), str(stats["refined"]), str(stats["too_close"]), str(stats["resumed_from"]),
                  skipped, stats["log"])
    console.print(table)
# <<< flow commands


def main() -> None:
    app(prog_name="crystal")


if __name__ == "__main__":
    sys.exit(main())
