"""FlowLLM pair drawing speed, side by side: one target at a time vs every target in one batch.

`crystal flow pairs --model` samples one crystal per training target, each with its own formula prompt and
grammar. Drawn one target at a time (LLMSamples.draw), a single sequence is in flight; drawn in one batch
(LLMSamples.draw_many, what `crystal flow pairs` uses), `--parallel` targets share the decode. Same model,
targets, seeds and threads; prints targets/s of each, their ratio, and whether the samples are the same.

    python bench/pairs.py                       # models/default, 48 MP-20 train targets, 1 thread
    python bench/pairs.py --targets 96 --threads 2 --parallel 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.files import shared_data  # noqa: E402
from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

def main() -> None:
    import numpy as np

    from crystal_cli.datasets import read_structures
    from crystal_cli.flow.manifolds import reduce_if_needed
    from crystal_cli.flow.pairs import LLMSamples, target_rng

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="-m as crystal generate takes it")
    parser.add_argument("--records", type=Path, default=shared_data("mp_20", "train.csv.gz"),
                        help="targets: any file crystal reads (default: MP-20 train in ../shared/data)")
    parser.add_argument("--targets", type=int, default=48)
    parser.add_argument("--max-atoms", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--min-distance", type=float, default=0.0)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    targets, seen = [], set()
    for entry in read_structures(args.records):
        if entry.structure is None or len(entry.structure) > args.max_atoms or entry.id in seen:
            continue
        seen.add(entry.id)
        targets.append((entry.id, reduce_if_needed(entry.structure)[0]))
        if len(targets) == args.targets:
            break
    source = LLMSamples(args.model, temperature=args.temperature, top_p=1.0, parallel=args.parallel,
                        threads=args.threads, min_distance=args.min_distance)

    def items():
        return [(name, target, target_rng(0, name)) for name, target in targets]

    started = time.perf_counter()
    alone = [source.draw(target, 1, rng) for _, target, rng in items()]
    t_alone = time.perf_counter() - started
    started = time.perf_counter()
    batched = [samples for _, _, samples in source.draw_many(items(), 1)]
    t_batched = time.perf_counter() - started

    def same(a, b) -> bool:
        if isinstance(a, str) or isinstance(b, str):
            return a == b
        return a.lattice == b.lattice and np.allclose(a.frac_coords, b.frac_coords)

    agree = sum(same(a[0], b[0]) for a, b in zip(alone, batched))
    n = len(targets)
    print(f"{n} targets, model {args.model}, {args.threads} thread(s), parallel {args.parallel}, τ {args.temperature}")
    print(f"one target at a time  {n / t_alone:6.2f} targets/s  ({t_alone:.1f} s)")
    print(f"one batch (draw_many) {n / t_batched:6.2f} targets/s  ({t_batched:.1f} s)")
    print(f"ratio {t_alone / t_batched:.2f}×; same samples for {agree}/{n} targets")


if __name__ == "__main__":
    main()
