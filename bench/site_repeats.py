"""How a model's structurally invalid samples fail: exact repeated sites, and whether each element's sites
come in increasing (x, y, z) order (what a model trained with data.site_order = "sorted" should write).

    python bench/site_repeats.py runs/table1-v4-translate/samples-t0.7.jsonl [more.jsonl ...]

Reads the jsonl of `crystal generate` (its "text" field) and prints, per file: samples, samples with an exact
repeated fractional position, repeats onto the same element and onto another one, and same-element
neighbours out of order. Counted on the text as written (two decimals), so a repeat is an exact copy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def counts(path: Path) -> dict[str, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {"samples": len(rows), "with_repeat": 0, "repeat_same_element": 0, "repeat_other_element": 0,
           "same_element_neighbours": 0, "out_of_order": 0}
    for row in rows:
        lines = row["text"].split("\n")[2:]
        sites = [(element, tuple(coords.split())) for element, coords in zip(lines[::2], lines[1::2])]
        seen: dict[tuple[str, ...], set[str]] = {}
        for element, coords in sites:
            if coords in seen:
                out["repeat_same_element" if element in seen[coords] else "repeat_other_element"] += 1
            seen.setdefault(coords, set()).add(element)
        out["with_repeat"] += len(seen) < len(sites)
        for (e1, c1), (e2, c2) in zip(sites, sites[1:]):
            if e1 == e2:
                out["same_element_neighbours"] += 1
                out["out_of_order"] += tuple(map(float, c2)) <= tuple(map(float, c1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, nargs="+")
    for path in parser.parse_args().samples:
        c = counts(path)
        print(f"{path}: {c['samples']} samples, {c['with_repeat']} with an exact repeated site "
              f"({c['repeat_same_element']} repeats onto the same element, {c['repeat_other_element']} onto another); "
              f"same-element neighbours out of (x, y, z) order {c['out_of_order']}/{c['same_element_neighbours']}")


if __name__ == "__main__":
    main()
