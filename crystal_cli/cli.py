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
from crystal_cli.errors import CrystalError  # noqa: E402

console = Console()
err_console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns CrystalError into one red line and exit code 2; Ctrl-C into exit code 130."""

    def invoke(self, ctx):
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


def progress_bar(*extra_columns) -> Progress:
    """The one progress bar style every long command uses."""
    return Progress(
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
) -> None:
    """Encode crystal datasets into text records (prompt, completion) for fine-tuning."""
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
    options.max_rows = max_rows

    with progress_bar() as bar:
        current: dict[str, int] = {}

        def on_progress(split: str, total: int | None) -> None:
            if total is not None or split not in current:
                current[split] = bar.add_task(f"encode {split}", total=total)
            else:
                bar.advance(current[split])

        stats = encode_records(inputs, output, options, progress=on_progress)

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
# <<< finetune commands

# >>> generate commands
# <<< generate commands

# >>> evaluate commands
# <<< evaluate commands

# >>> flow commands
# <<< flow commands


def main() -> None:
    app(prog_name="crystal")


if __name__ == "__main__":
    sys.exit(main())
