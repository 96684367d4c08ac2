"""Where a real `crystal finetune` step spends its time: torch.profiler over the trainer's own steps.

bench/train_throughput.py times one fixed batch per row; this runs `crystal_cli.finetune.finetune` itself on the
recipe's own length-bucketed, translated batches with its gradient clipping, optimizer and schedule, so it sees
what varied batch widths and the whole step cost. The profiler is stepped from finetune's per-step callback: the
warm-up steps come first (compilation, under train.compile, happens there and is not profiled), then N profiled
steps; no evaluation or checkpoint falls inside them. Prints seconds per step and the operators by self time.

    python bench/trainer_profile.py --recipe training/scratch-384x8-mp20-cpu.toml
    python bench/trainer_profile.py --recipe training/scratch-384x8-mp20-cpu.toml --compiled-attention sdpa
    python bench/trainer_profile.py --recipe training/scratch-384x8-mp20-cpu.toml --set train.compile=off

The run goes to a scratch directory under the system's temp folder, removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--compiled-attention", choices=("matmul", "sdpa"), default="matmul",
                        help="the attention a compiled CPU run uses: finetune.model.compile_decoder's switch, or "
                             "scaled_dot_product_attention (the compiled loop before that switch)")
    args = parser.parse_args()

    from functools import partial

    from torch.profiler import ProfilerActivity, profile, schedule

    from crystal_cli.errors import CrystalError
    from crystal_cli.finetune import finetune, resolve_config, trainer
    from crystal_cli.finetune.model import compile_decoder
    from crystal_cli.recipes import parse_overrides

    if args.compiled_attention == "sdpa":  # the compiled loop before compile_decoder switched the attention
        trainer.compile_decoder = partial(compile_decoder, attention="sdpa")
    total = args.warmup + args.steps
    overrides = parse_overrides(args.overrides) | {"train.max_steps": total, "train.epochs": 0,
                                                   "train.eval_every": total, "train.checkpoint_every": total}
    scratch = Path(tempfile.mkdtemp(prefix="trainer-profile-"))
    clock: dict[int, float] = {}
    try:
        run_dir = scratch / "run"
        with profile(activities=[ProfilerActivity.CPU],
                     schedule=schedule(wait=args.warmup - 1, warmup=1, active=args.steps)) as prof:
            def on_step(event) -> None:
                if event.loss is not None:  # an optimizer step, not an evaluation
                    clock[event.step] = time.perf_counter()
                    prof.step()

            try:
                result = finetune(resolve_config(run_dir, args.recipe, overrides), run_dir, on_event=on_step)
            except CrystalError as error:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
        per_step = (clock[total] - clock[args.warmup]) / args.steps
        print(f"{args.recipe} {' '.join(args.overrides)}: {result.steps} steps, the last {args.steps} profiled at "
              f"{per_step:.3f} s/step (compiled attention: {args.compiled_attention} where the run compiles)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
