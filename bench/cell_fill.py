"""How full a model's cells are: structural validity and the median volume per atom by atom count, beside the
training crystals' own, so a model that writes too many atoms for its cell (or too small a cell for its atoms)
shows where it starts.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli import codec  # noqa: E402
from crystal_cli.evaluate.validity import structural_validity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP, LAST = 4, 5  # atoms per size group; the index of the open last group (20+ atoms)


def by_size(texts: list[str]) -> tuple[dict[int, list[tuple[float, bool]]], int]:
    """(size group -> [(volume per atom, structurally valid)], unparsed count)."""
    groups: dict[int, list[tuple[float, bool]]] = {}
    unparsed = 0
    for text in texts:
        parsed = codec.parse_crystal(text)
        if not parsed.ok:
            unparsed += 1
            continue
        structure = parsed.structure
        groups.setdefault(min(len(structure) // GROUP, LAST), []).append(
            (structure.volume / len(structure), structural_validity(structure)[0]))
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
        print("| atoms | samples | struct. valid | median Å³/atom | reference crystals | reference Å³/atom |")
        print("|---|---|---|---|---|---|")
        for group in sorted(set(groups) | set(reference)):
            mine, ref = groups.get(group, []), reference.get(group, [])
            valid = f"{sum(v for _, v in mine) / len(mine):.0%}" if mine else "—"
            volume = f"{statistics.median(a for a, _ in mine):.1f}" if mine else "—"
            ref_volume = f"{statistics.median(a for a, _ in ref):.1f}" if ref else "—"
            print(f"| {label(group)} | {len(mine)} | {valid} | {volume} | {len(ref)} | {ref_volume} |")


if __name__ == "__main__":
    main()
