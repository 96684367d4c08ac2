"""Speed of `crystal evaluate`, stage by stage, and composition-bucketed matching against naive all-pairs.

Measures in one run:
  * seconds per structure for reading, validity, CrystalNN+Magpie fingerprints and CHGNet relaxation (slices);
  * novelty + uniqueness of N (default 5,000) MP-20 test materials against the mp20-open train split with the
    bucketed StructureMatcher (target: under 60 s on the 2-core CPU box);
  * the same question answered naively (every sample against every reference structure, every sample
    against every other) on a small slice, extrapolated to N, and the ratio.

    .venv/bin/python bench/evaluate.py                      # needs runs/data/mp20-open (make corpus)
    .venv/bin/python bench/evaluate.py --samples 5000 --naive-slice 20 --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "runs" / "data" / "mp20-open")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--naive-slice", type=int, default=20)
    parser.add_argument("--fingerprint-slice", type=int, default=40)
    parser.add_argument("--relax-slice", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    from crystal_cli.evaluate import coverage, matching, validity
    from crystal_cli.evaluate.potential import RelaxSettings, load_potential

    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    started = time.monotonic()
    samples = [s for _, s in itertools.islice(matching.record_materials(args.corpus / "test.jsonl"), args.samples)]
    results["read_s_per_structure"] = (time.monotonic() - started) / len(samples)
    n = len(samples)

    started = time.monotonic()
    checks = [validity.check(s) for s in samples]
    results["validity_s_per_structure"] = (time.monotonic() - started) / n
    results["valid"] = sum(c.valid for c in checks)

    started = time.monotonic()
    formulas = {matching.bucket_key(s) for s in samples}
    reference = matching.load_reference(args.corpus / "train.jsonl", formulas)
    load_s = time.monotonic() - started
    started = time.monotonic()
    unique = matching.uniqueness(samples, args.workers)
    uniqueness_s = time.monotonic() - started
    started = time.monotonic()
    novel = matching.novelty(samples, reference, args.workers)
    novelty_s = time.monotonic() - started
    results["bucketed"] = {
        "n_samples": n, "reference_materials": reference.materials, "reference_load_s": load_s,
        "uniqueness_s": uniqueness_s, "novelty_s": novelty_s, "total_s": load_s + uniqueness_s + novelty_s,
        "unique_rate": sum(unique) / n, "novel_rate": sum(novel) / n,
    }

    # naive: the same matcher on every pair, no composition buckets (a slice, extrapolated)
    full_reference = [s for _, s in matching.record_materials(args.corpus / "train.jsonl")]
    matcher = matching.make_matcher()
    slice_ = samples[: args.naive_slice]
    started = time.monotonic()
    naive_novel = [not any(matcher.fit(s, r) for r in full_reference) for s in slice_]
    per_sample_novelty = (time.monotonic() - started) / len(slice_)
    started = time.monotonic()
    for s in slice_:
        for other in samples[: 10 * args.naive_slice]:
            matcher.fit(s, other)
    per_pair_uniqueness = (time.monotonic() - started) / (len(slice_) * 10 * args.naive_slice)
    naive_total = per_sample_novelty * n + per_pair_uniqueness * n * (n - 1) / 2
    results["naive"] = {
        "slice": len(slice_), "novelty_s_per_sample": per_sample_novelty,
        "uniqueness_s_per_pair": per_pair_uniqueness, "extrapolated_total_s": naive_total,
        "agrees_with_bucketed_on_slice": naive_novel == novel[: len(slice_)],
    }
    results["speedup_naive_over_bucketed"] = naive_total / (uniqueness_s + novelty_s)

    started = time.monotonic()
    coverage.fingerprints(samples[: args.fingerprint_slice], args.workers)
    results["fingerprint_s_per_structure"] = (time.monotonic() - started) / args.fingerprint_slice

    potential = load_potential("chgnet")
    relax_slice = samples[: args.relax_slice]
    relaxations = [potential.relax(s, RelaxSettings()) for s in relax_slice]
    results["relax_s_per_structure"] = sum(r.seconds for r in relaxations) / len(relax_slice)
    results["relax_mean_sites"] = sum(len(s) for s in relax_slice) / len(relax_slice)

    print(json.dumps(results, indent=2))
    b = results["bucketed"]
    print(f"\nnovelty+uniqueness of {n} structures vs {b['reference_materials']} train materials: "
          f"{b['total_s']:.1f} s bucketed (load {b['reference_load_s']:.1f} s) vs ~{naive_total:.0f} s naive all-pairs "
          f"(extrapolated from {len(slice_)} samples): {results['speedup_naive_over_bucketed']:.0f}x")


if __name__ == "__main__":
    main()
