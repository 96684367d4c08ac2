"""Codec round trip on real data: decode(encode(s)) vs s under StructureMatcher at default tolerances.

    python bench/roundtrip.py [DATA ...]      (default: every MP-20 row in ../shared/data/mp_20)

Prints the match rate next to the rate of the alternative of writing coordinates with one decimal (what a
shorter text would cost). Exits non-zero below the 99.5 % target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crystal_cli.runtime import configure_process

configure_process()

from pymatgen.analysis.structure_matcher import StructureMatcher  # noqa: E402
from pymatgen.core import Lattice, Structure  # noqa: E402

from crystal_cli import codec  # noqa: E402
from crystal_cli.datasets import read_structures  # noqa: E402
from crystal_cli.files import shared_data  # noqa: E402

DEFAULT = shared_data("mp_20")


def one_decimal(structure: Structure) -> Structure:
    """The alternative: coordinates rounded to 0.1 instead of 0.01."""
    lattice = Lattice.from_parameters(*(round(x, 1) for x in structure.lattice.abc),
                                      *(round(x) for x in structure.lattice.angles))
    return Structure(lattice, structure.species, [[round(x % 1, 1) for x in site.frac_coords] for site in structure])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*", type=Path, default=[DEFAULT])
    args = parser.parse_args()
    if not all(p.exists() for p in args.data):
        print(f"missing data: {[str(p) for p in args.data if not p.exists()]}", file=sys.stderr)
        return 2
    matcher = StructureMatcher()
    total = matched = matched_alt = failed_parse = 0
    started = time.perf_counter()
    for path in args.data:
        for entry in read_structures(path):
            if entry.structure is None:
                continue
            total += 1
            parsed = codec.parse_crystal(codec.encode_structure(entry.structure))
            if not parsed.ok:
                failed_parse += 1
                continue
            matched += matcher.fit(parsed.structure, entry.structure)
            matched_alt += matcher.fit(one_decimal(entry.structure), entry.structure)
    seconds = time.perf_counter() - started
    rate, rate_alt = matched / total, matched_alt / total
    print(f"structures: {total} from {', '.join(map(str, args.data))}")
    print(f"round trip (codec, 2-decimal coordinates): {matched}/{total} = {rate:.4%} match; parse failures {failed_parse}")
    print(f"alternative (1-decimal coordinates):        {matched_alt}/{total} = {rate_alt:.4%} match")
    print(f"ratio codec/alternative match rate: {rate / max(rate_alt, 1e-9):.2f}x   ({seconds:.0f} s)")
    return 0 if rate >= 0.995 else 1


if __name__ == "__main__":
    sys.exit(main())
