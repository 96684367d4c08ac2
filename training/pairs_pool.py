"""The LLM samples of a `crystal flow pairs --model …` directory as a `crystal generate` jsonl (prompt, text),
so that they can serve as data.positives of a self-training round.

    python training/pairs_pool.py runs/flow-pairs-st -o runs/own/formula-pool.jsonl [--limit 4000 --seed 0]

FlowLLM's pairs draw one sample per train target under the target's formula, the grammar pinning its exact
site multiset: a pool of formula-conditioned samples at the train crystals' own sizes, which an unconditional
pool of a model that prefers small cells is not. Each c0 is written back in the training text format
(codec.encode_structure) under the formula prompt it was drawn with; c0 cells that `flow pairs` Niggli-reduced
are reduced cells of the same crystal. read_positives checks validity itself, so invalid samples are kept
here and filtered there (and counted in the run's summary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, help="a `crystal flow pairs` directory (or its pairs.jsonl)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=0, help="keep this many rows, drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    from pymatgen.core import Structure

    from crystal_cli import codec
    from crystal_cli.errors import CrystalError
    from crystal_cli.flow.pairs import LLMSamples, pairs_file
    from crystal_cli.runs import write_jsonl
    from crystal_cli.structure_io import read_jsonl

    if args.output.exists():
        raise SystemExit(f"pairs_pool: {args.output} exists; not overwriting it")
    try:
        rows = [row for row in read_jsonl(pairs_file(args.pairs)) if row.get("source") == LLMSamples.name]
    except CrystalError as error:
        raise SystemExit(f"pairs_pool: {error}") from None
    if not rows:
        raise SystemExit(f"pairs_pool: {args.pairs} holds no LLM pairs (`crystal flow pairs --model …`)")
    if args.limit and args.limit < len(rows):
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(rows))[:args.limit])
        rows = [rows[i] for i in keep]
    samples = []
    for row in rows:
        c0 = Structure.from_dict(row["c0"])
        samples.append({"id": row["id"], "prompt": codec.conditional_prompt({"formula": codec.reduced_formula(c0)}),
                        "text": codec.encode_structure(c0), "source": f"{args.pairs}:{row['id']}"})
    write_jsonl(args.output, samples)
    print(f"{len(samples)} formula-conditioned samples -> {args.output}")


if __name__ == "__main__":
    main()
