"""Which model to ship: pilots of equal training time on the same records, seeds and evaluation.

For each pilot recipe (training/pilots/*.toml by default) this runs `crystal finetune` for --minutes of
training time (train.max_minutes; a pilot already run is resumed, so the script is re-runnable), all pilots
at once with one torch thread each, so each gets an equal share of the cores (CPU seconds are reported: a
2-thread torch loop collapses when anything else shares the 2 cores, one thread per process does not); then draws
--samples unconditional samples at --temperature through `crystal generate` (llama.cpp, the grammar on, the
distance guard off where it exists, seed 0) and scores them:

* val loss: completion cross-entropy over the crystal vocabulary, the same 128 seeded val records for all
* structural validity: every interatomic distance >= 0.5 Å (periodic images) and volume >= 0.1 Å³
* compositional validity: SMACT charge neutrality + electronegativity (crystal_cli.evaluate.validity)

and prints one table with examples seen, wall and CPU seconds of training next to them.
Usage: .venv/bin/python bench/model_choice.py [--minutes 10] [--samples 100] [--out runs/model-choice] [RECIPE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()
CRYSTAL = str(Path(sys.executable).with_name("crystal"))


def train(recipes: list[Path], out: Path, minutes: float, threads: int) -> dict[str, float]:
    """Every pilot at once, one torch thread each (equal shares of the cores); CPU seconds per pilot."""
    running = {}
    for recipe in recipes:
        run = out / recipe.stem
        command = [CRYSTAL, "finetune", "-o", str(run), "--set", f"train.max_minutes={minutes}",
                   "--set", f"train.threads={threads}"]
        command += ["--resume"] if (run / "config.json").is_file() else ["--recipe", str(recipe)]
        log = (out / f"{recipe.stem}.log").open("a")
        running[subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT).pid] = recipe.stem
    cpu = {}
    while running:
        pid, status, usage = os.wait4(-1, 0)
        name = running.pop(pid)
        if os.waitstatus_to_exitcode(status) not in (0, 130):  # 130: interrupted, its checkpoint saved
            raise SystemExit(f"pilot {name} failed: see {out / name}.log")
        cpu[name] = usage.ru_utime + usage.ru_stime
    return cpu


def sample(run: Path, n: int, temperature: float, folder: Path | None = None) -> Path:
    """n unconditional samples of `run` (seed 0, top-p 1.0, guard off) into FOLDER (default: the run); the sidecar."""
    out = (folder or run) / f"samples-t{temperature}-n{n}.cif"
    if (out.with_suffix(".jsonl")).is_file():
        return out.with_suffix(".jsonl")
    command = [CRYSTAL, "generate", "-m", str(run), "-n", str(n), "--temperature", str(temperature), "--top-p", "1.0",
               "--seed", "0", "-o", str(out)]
    if "--min-distance" in subprocess.run([CRYSTAL, "generate", "--help"], capture_output=True, text=True,
                                          env=os.environ | {"COLUMNS": "300"}).stdout:
        command += ["--min-distance", "0"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out.with_suffix(".jsonl")


def score(sidecar: Path) -> dict:
    from crystal_cli import codec
    from crystal_cli.evaluate.stats import wilson
    from crystal_cli.evaluate.validity import check
    from crystal_cli.structure_io import read_jsonl

    rows = read_jsonl(sidecar)
    structural = compositional = 0
    for row in rows:
        parsed = codec.parse_crystal(row["text"])
        if parsed.ok:
            validity = check(parsed.structure)
            structural += validity.structural
            compositional += validity.compositional
    n = len(rows)
    s_rate, c_rate = wilson(structural, n), wilson(compositional, n)
    return {"n": n, "structural": s_rate.rate, "structural_ci": [s_rate.low, s_rate.high],
            "compositional": c_rate.rate, "compositional_ci": [c_rate.low, c_rate.high]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, default=sorted((REPO / "training" / "pilots").glob("*.toml")))
    parser.add_argument("--minutes", type=float, default=20.0, help="training time per pilot; 0: score the runs as they are")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pilot (they run at once)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "model-choice")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    args.out.mkdir(parents=True, exist_ok=True)
    cpu = train(args.recipes, args.out, args.minutes, args.threads) if args.minutes > 0 else {}
    results = []
    for recipe in args.recipes:
        run = args.out / recipe.stem
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in metrics if "val_loss" in m]
        summary = json.loads((run / "summary.json").read_text())
        result = {"recipe": recipe.stem, "run": str(run), "steps": summary["steps"], "examples": summary["examples"],
                  "train_wall_s": summary["wall_s"], "train_cpu_s_this_call": cpu.get(recipe.stem),
                  "val_loss": val[-1]["val_loss"], "val_curve": [(m["step"], m["val_loss"]) for m in val],
                  "trainable_params": summary["counts"]["trainable_params"]}
        result |= score(sample(run, args.samples, args.temperature))
        results.append(result)
        print(json.dumps(result), flush=True)
    table = Table(title=f"model choice: {args.minutes:g} min of training each, {args.samples} unconditional samples "
                        f"at τ {args.temperature} (grammar on, guard off)")
    for column in ("pilot", "trainable", "steps", "examples seen", "train wall s", "train CPU s", "val loss",
                   "struct. valid", "comp. valid"):
        table.add_column(column, justify="left" if column == "pilot" else "right")
    for r in results:
        ci = r["structural_ci"]
        table.add_row(r["recipe"], f"{r['trainable_params']:,}", str(r["steps"]), f"{r['examples']:,}",
                      f"{r['train_wall_s']:.0f}", "—" if r["train_cpu_s_this_call"] is None else f"{r['train_cpu_s_this_call']:.0f}", f"{r['val_loss']:.4f}",
                      f"{r['structural']:.0%} ({ci[0]:.0%}–{ci[1]:.0%})", f"{r['compositional']:.0%}")
    Console(width=160).print(table)
    (args.out / "model-choice.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
