"""A long run's learning curve: validity, val loss and prompt reading against crystals seen.

For every snapshot a run kept (RUN/snapshots/step-N, written every train.snapshot_every steps) and for the
run's weights as they stand (its last checkpoint), this reads the val loss the trainer logged at that step,
draws --samples unconditional samples at --temperature through `crystal generate` (llama.cpp, the grammar on,
the distance guard off, seed 0: bench/model_choice.py's protocol) and scores their structural and
compositional validity, and, with --prompt-records N, takes bench/prompt_effect.py's formula-task NLLs of N val
crystals under their own and the unconditional prompt (the nats the formula prompt is worth to the model).
Each step's result is kept in OUT/step-N.json, so a rerun after more snapshots only evaluates the new ones;
OUT/curve.json holds them all.

    python bench/learning_curve.py runs/smollm2-long --out runs/smollm2-long-eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

from model_choice import sample, score  # noqa: E402
from prompt_effect import prompt_nlls  # noqa: E402

from crystal_cli.structure_io import read_jsonl  # noqa: E402

MAX_ATOMS = 20  # crystal generate's default --max-atoms, which model_choice.sample keeps


def steps_of(folder: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name.removeprefix("step-")), p) for p in folder.glob("step-*") if p.is_dir())


def snapshots(run: Path) -> list[tuple[int, Path]]:
    """The run's snapshots and, where its last checkpoint is not one of them, the run's weights as they stand."""
    found = steps_of(run / "snapshots")
    checkpoints = steps_of(run / "checkpoints")
    if checkpoints and checkpoints[-1][0] not in dict(found):
        found.append((checkpoints[-1][0], run))
    return found


def evaluate_step(step: int, snapshot: Path, examples_per_step: int, logged: dict[int, float],
                  args: argparse.Namespace) -> dict:
    folder = args.out / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    result = {"step": step, "examples": step * examples_per_step, "val_loss": logged.get(step), "snapshot": str(snapshot)}
    sidecar = sample(snapshot, args.samples, args.temperature, folder)
    result |= score(sidecar)
    # a model that has not learnt to end its text writes sites up to crystal generate's cap (--max-atoms 20)
    sites = [len(row["text"].split("\n")) // 2 - 1 for row in read_jsonl(sidecar)]  # 2 lattice lines, 2 per site
    result["at_max_atoms"] = sum(n >= MAX_ATOMS for n in sites) / len(sites)
    if args.prompt_records:
        nll = prompt_nlls(str(snapshot), "formula", args.prompt_records)
        result["formula_nll_own"] = nll["own prompt"]
        result["formula_nll_unconditional"] = nll["unconditional prompt"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finetune run directory with snapshots/")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--prompt-records", type=int, default=60, help="formula val records for the prompt NLLs; 0: skip")
    parser.add_argument("--steps", default="", help="comma-separated steps to evaluate (default: every snapshot)")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN-curve")
    args = parser.parse_args()
    args.out = args.out or args.run.with_name(args.run.name + "-curve")
    found = snapshots(args.run)
    if args.steps:
        wanted = {int(step) for step in args.steps.split(",")}
        found = [(step, path) for step, path in found if step in wanted]
    if not found:
        raise SystemExit(f"learning_curve: {args.run} has no snapshot{' of steps ' + args.steps if args.steps else ''} "
                         "(train with train.snapshot_every > 0)")
    args.out.mkdir(parents=True, exist_ok=True)
    train = json.loads((args.run / "config.json").read_text())["train"]
    logged = {r["step"]: r["val_loss"] for r in map(json.loads, (args.run / "metrics.jsonl").read_text().splitlines())
              if "val_loss" in r}
    settings = {"samples": args.samples, "temperature": args.temperature, "prompt_records": args.prompt_records}
    results = []
    for step, snapshot in found:
        path = args.out / f"step-{step}.json"
        if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
            result = json.loads(path.read_text())
        else:
            result = evaluate_step(step, snapshot, train["batch_size"] * train["grad_accum"], logged, args) | {"settings": settings}
            path.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
        gain = (f", formula prompt worth {result['formula_nll_unconditional'] - result['formula_nll_own']:.1f} nats"
                if "formula_nll_own" in result else "")
        val = "—" if result["val_loss"] is None else f"{result['val_loss']:.4f}"
        print(f"step {step:5d} ({result['examples']:,} examples): val loss {val}, structural "
              f"{result['structural']:.0%} ({result['structural_ci'][0]:.0%}–{result['structural_ci'][1]:.0%}), "
              f"compositional {result['compositional']:.0%} of {result['n']}, {result['at_max_atoms']:.0%} at {MAX_ATOMS} "
              f"sites{gain}", flush=True)
    (args.out / "curve.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
