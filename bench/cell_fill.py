"""How full a model's cells are: structural validity and the median volume per atom by atom count, beside the
training crystals' own, so a model that writes too many atoms for its cell (or too small a cell for its atoms)
shows where it starts.

Structural validity (CDVAE's: every distance >= 0.5 Å) passes atoms far closer than any bond, so each size group
also shows the share whose closest pair is at least BOND_RATIO x the sum of the two elements' atomic radii
(pymatgen's Element.atomic_radius): 99.9 % of the mp20-open train crystals are, and the distance guard's 0.5 Å
does not ask for it.

    python bench/cell_fill.py runs/table1/samples-t0.7.jsonl [more.jsonl ...]

Reads the jsonl of `crystal generate` (its "text" field) and, for the reference, the unconditional records of
--reference (mp20-open train, the "completion" field; the first --reference-max of them). A sample that does
not parse is left out and counted. Sizes are grouped in fours (1-3, 4-7, ... atoms), the last group open.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli import codec  # noqa: E402
from crystal_cli.evaluate.validity import structural_validity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP, LAST = 4, 5  # atoms per size group; the index of the open last group (20+ atoms)
BOND_RATIO = 0.7  # 4,000 train crystals' closest pairs: 1st percentile 0.785 x the radii sum, 0.12 % below 0.7


def bonded(structure) -> bool:
    """Is every pair at least BOND_RATIO x the sum of its elements' atomic radii apart (the minimum-image
    distance_matrix, as structural validity reads it)?"""
    if len(structure) < 2:
        return True
    radii = np.array([site.specie.atomic_radius or site.specie.atomic_radius_calculated for site in structure])
    ratio = structure.distance_matrix / (radii[:, None] + radii[None, :])
    return bool((ratio + np.eye(len(structure)) * 1e9).min() >= BOND_RATIO)


def by_size(texts: list[str]) -> tuple[dict[int, list[tuple[float, bool, bool]]], int]:
    """(size group -> [(volume per atom, structurally valid, bonded)], unparsed count)."""
    groups: dict[int, list[tuple[float, bool, bool]]] = {}
    unparsed = 0
    for text in texts:
        parsed = codec.parse_crystal(text)
        if not parsed.ok:
            unparsed += 1
            continue
        structure = parsed.structure
        groups.setdefault(min(len(structure) // GROUP, LAST), []).append(
            (structure.volume / len(structure), structural_validity(structure)[0], bonded(structure)))
    return groups, unparsed


def reference_texts(records: Path, limit: int) -> list[str]:
    texts = []
    with records.open() as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("task") == "unconditional":
                texts.append(record["completion"])
                if len(texts) >= limit:
                    break
    return texts


def label(group: int) -> str:
    return f"{group * GROUP}+" if group == LAST else f"{max(group * GROUP, 1)}-{group * GROUP + GROUP - 1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, nargs="+")
    parser.add_argument("--reference", type=Path, default=ROOT / "runs/data/mp20-open/train.jsonl")
    parser.add_argument("--reference-max", type=int, default=3000)
    args = parser.parse_args()
    reference, _ = by_size(reference_texts(args.reference, args.reference_max)) if args.reference.is_file() else ({}, 0)
    for path in args.samples:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        groups, unparsed = by_size([row["text"] for row in rows])
        print(f"{path}: {len(rows)} samples ({unparsed} unparsed)")
        print(f"| atoms | samples | struct. valid | ≥ {BOND_RATIO} × radii | median Å³/atom | reference crystals "
              f"| reference ≥ {BOND_RATIO} × radii | reference Å³/atom |")
        print("|---|---|---|---|---|---|---|---|")
        for group in sorted(set(groups) | set(reference)):
            mine, ref = groups.get(group, []), reference.get(group, [])
            print(f"| {label(group)} | {len(mine)} | {share(mine, 1)} | {share(mine, 2)} | {median(mine)} | {len(ref)} "
                  f"| {share(ref, 2)} | {median(ref)} |")


def share(rows: list[tuple[float, bool, bool]], column: int) -> str:
    return f"{sum(row[column] for row in rows) / len(rows):.0%}" if rows else "—"


def median(rows: list[tuple[float, bool, bool]]) -> str:
    return f"{statistics.median(row[0] for row in rows):.1f}" if rows else "—"


if __name__ == "__main__":
    main()
