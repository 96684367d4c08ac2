"""A pool of the model's own space-group-conditioned samples, for data.positives of a self-training round.

    python training/spacegroup_pool.py -m default -n 4000 --seed 8000 -o runs/own/sg-pool

For every space group with at least --min-train crystals among the train records (unconditional task), draws
samples under its `--spacegroup` prompt through `crystal generate` (guard off, top-p 1.0, as the unconditional
pools), n in all, shared among the groups in proportion to (train count)^--power: 1 follows the train
distribution, 0.5 (the default) gives the rarer groups more practice than the data does while the common ones
still get the most. Each group's samples go to OUT/sg-NNN.jsonl (resumable: a rerun tops them up), all of them
to OUT/pool.jsonl (prompt + text, as data.positives reads them), and to OUT/summary.json how many samples of
each group have the group they were asked for (finetune.data.meets_prompt: the reading bench/conditional.py
checks, and the filter read_positives applies). read_positives imitates a sample under its prompt only where it meets it (without positives_relabel),
so the pool needs no filtering here: the misses are counted there as positives_off_condition.

This is the filter of rejection-sampling self-training applied to the space-group task: the model is taught the
samples in which it did honour the condition, for many groups, where the unconditional pools teach it only the
groups it writes unasked (mostly Fm-3m).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

ROOT = Path(__file__).resolve().parents[1]


def allocate(counts: Counter, n: int, power: float, min_train: int) -> dict[int, int]:
    """n samples over the groups with >= min_train train crystals, proportional to count**power (largest
    remainders, so the total is exactly n; a group may get 0 when n is small)."""
    import numpy as np

    groups = sorted(g for g, c in counts.items() if g is not None and c >= min_train)
    if not groups:
        raise SystemExit(f"spacegroup_pool: no space group has {min_train} train crystals")
    weights = np.array([counts[g] ** power for g in groups], dtype=float)
    exact = n * weights / weights.sum()
    share = np.floor(exact).astype(int)
    for i in np.argsort(share - exact)[: n - share.sum()]:
        share[i] += 1
    return {g: int(k) for g, k in zip(groups, share) if k > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None, help="-m for crystal generate (default: the shipped default)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="a directory")
    parser.add_argument("-n", type=int, default=4000, help="samples in all")
    parser.add_argument("--records", type=Path, default=ROOT / "runs/data/mp20-open", help="train.jsonl's groups")
    parser.add_argument("--min-train", type=int, default=20, help="groups with fewer train crystals are left out")
    parser.add_argument("--power", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=8000, help="group g draws with seed + g")
    args = parser.parse_args()

    from crystal_cli import codec
    from crystal_cli.errors import CrystalError
    from crystal_cli.finetune.data import meets_prompt
    from crystal_cli.runs import write_jsonl, write_text
    from crystal_cli.sampling import GenerateOptions, generate
    from crystal_cli.structure_io import read_jsonl

    train = args.records / "train.jsonl"
    if not train.exists():
        raise SystemExit(f"spacegroup_pool: {train} is missing (make corpus)")
    counts = Counter(r["spacegroup"] for r in read_jsonl(train) if r["task"] == "unconditional")
    plan = allocate(counts, args.n, args.power, args.min_train)
    args.out.mkdir(parents=True, exist_ok=True)
    pool, per_group = [], {}
    for group, k in plan.items():
        output = args.out / f"sg-{group:03d}.jsonl"
        try:
            generate(GenerateOptions(model=args.model, output=output, n=k, spacegroup=group, temperature=args.temperature,
                                     top_p=1.0, seed=args.seed + group, min_distance=0.0, resume=output.exists(),
                                     parallel=min(k, 32)))
        except CrystalError as error:
            raise SystemExit(f"spacegroup_pool: {error}") from None
        rows = [r for r in read_jsonl(output) if r.get("text")]
        parsed = [codec.parse_crystal(row["text"]) for row in rows]
        hits = sum(p.ok and meets_prompt(row["prompt"], p.structure) for row, p in zip(rows, parsed))
        per_group[group] = {"train": counts[group], "samples": len(rows), "hits": hits}
        pool.extend({"prompt": r["prompt"], "text": r["text"], "source": f"{output.name}:{r['id']}"} for r in rows)
        print(f"sg {group:3d}: {hits:3d}/{len(rows):3d} meet it (train {counts[group]})", flush=True)
    write_jsonl(args.out / "pool.jsonl", pool)
    hits, samples = sum(g["hits"] for g in per_group.values()), sum(g["samples"] for g in per_group.values())
    write_text(args.out / "summary.json", json.dumps({
        "model": args.model or "default", "n": args.n, "seed": args.seed, "temperature": args.temperature,
        "power": args.power, "min_train": args.min_train, "symprec": codec.SYMPREC, "samples": samples,
        "hits": hits, "groups": per_group}, indent=2) + "\n")
    print(f"{hits}/{samples} samples meet their space group ({len(per_group)} groups) -> {args.out / 'pool.jsonl'}")


if __name__ == "__main__":
    main()
