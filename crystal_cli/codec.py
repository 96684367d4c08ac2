"""Crystal-LLM text codec: pymatgen Structure <-> plain text, prompts for every task, and a strict parser.

The text format (Gruver et al., ICLR 2024) is, with sites in the order the structure holds them::

    {a:.1f} {b:.1f} {c:.1f}
    {alpha:.0f} {beta:.0f} {gamma:.0f}
    El
    {x:.2f} {y:.2f} {z:.2f}
    ...

The parser never raises on model output: it returns a typed reason that the sampler and the evaluator count.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure

PROMPT_HEADER = "Below is a description of a bulk material. "
GENERATION_INSTRUCTION = (
    "Generate a description of the lengths and angles of the lattice vectors "
    "and then the element type and coordinates for each atom within the lattice:\n"
)
INFILL_HEADER = (
    "Below is a partial description of a bulk material where one element has been replaced "
    "with the mask token [MASK]. Generate an element that could replace [MASK] in the bulk material:\n"
)
MASK = "[MASK]"

# Condition name -> sentence template. Order here is the order sentences appear in a prompt.
CONDITION_SENTENCES: dict[str, str] = {
    "formula": "The chemical formula is {}. ",
    "spacegroup": "The spacegroup number is {}. ",
    "e_above_hull": "The energy above the convex hull is {}. ",
    "formation_energy_per_atom": "The formation energy per atom is {}. ",
    "band_gap": "The band gap is {}. ",
}
CONDITIONS = tuple(CONDITION_SENTENCES)
SYMPREC = 0.1  # Å, the tolerance the field uses for space groups of generated and reference crystals

_ELEMENT_LIKE = re.compile(r"^[A-Za-z\[\]]{1,8}$")


class ParseFailure(str, enum.Enum):
    """Why model text is not a crystal. Values are stable strings used in jsonl files and reports."""

    TOO_FEW_LINES = "too_few_lines"
    UNKNOWN_ELEMENT = "unknown_element"
    NON_NUMERIC = "non_numeric"
    NON_POSITIVE_LENGTH = "non_positive_length"
    ANGLE_OUT_OF_RANGE = "angle_out_of_range"
    COORD_COUNT_MISMATCH = "coord_count_mismatch"
    TRAILING_GARBAGE = "trailing_garbage"
    INVALID_LATTICE = "invalid_lattice"


@dataclass(frozen=True)
class ParseResult:
    """A parsed structure, or the reason (and the offending line, 1-based) why there is none."""

    structure: Structure | None
    reason: ParseFailure | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.structure is not None


def format_value(value: float) -> str:
    """Numbers in condition sentences: two decimals, trailing zeros dropped but one kept ("0.0")."""
    return repr(round(float(value), 2) + 0.0)


def wrap_fraction(x: float) -> float:
    """Fractional coordinate rounded to the text's 2 decimals and wrapped into [0, 1)."""
    return round(round(x % 1.0, 2) % 1.0, 2) + 0.0


def encode_structure(structure: Structure) -> str:
    """Structure -> Crystal-LLM text. Requires an ordered structure (one species per site)."""
    if not structure.is_ordered:
        raise ValueError("disordered structure (partial occupancies) cannot be written as text")
    a, b, c = structure.lattice.abc
    alpha, beta, gamma = structure.lattice.angles
    lines = [f"{a:.1f} {b:.1f} {c:.1f}", f"{alpha:.0f} {beta:.0f} {gamma:.0f}"]
    for site in structure:
        lines.append(site.specie.symbol)
        lines.append(" ".join(f"{wrap_fraction(x):.2f}" for x in site.frac_coords))
    return "\n".join(lines)


def sorted_sites(text: str) -> str:
    """The same crystal text with its sites grouped by element (in order of first appearance) and sorted by
    (x, y, z) within each element: one order for every ordering of each element's sites (training's
    data.site_order = "sorted"; the records' element order, electronegativity in MP's files, is kept). A model
    trained on it writes each element's sites in increasing order, so repeating an earlier site of the same
    element breaks a rule it can check against the line just above. Text that is not lattice lines followed
    by (element, 3 numbers) pairs is returned unchanged."""
    lines = text.split("\n")
    if len(lines) < 4 or len(lines) % 2:
        return text
    groups: dict[str, list[tuple[tuple[float, ...], str]]] = {}
    for element, coords in zip(lines[2::2], lines[3::2]):
        try:
            key = tuple(float(v) for v in coords.split())
        except ValueError:
            return text
        if len(key) != 3:
            return text
        groups.setdefault(element, []).append((key, coords))
    body = [line for element, sites in groups.items()
            for _, coords in sorted(sites, key=lambda site: site[0]) for line in (element, coords)]
    return "\n".join(lines[:2] + body)


def _floats(line: str, lineno: int, what: str) -> tuple[list[float] | None, ParseResult | None]:
    tokens = line.split()
    if len(tokens) != 3:
        return None, ParseResult(
            None, ParseFailure.COORD_COUNT_MISMATCH, f"line {lineno}: {what} needs 3 numbers, got {len(tokens)}"
        )
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return None, ParseResult(None, ParseFailure.NON_NUMERIC, f"line {lineno}: {what} {line!r} is not numeric")
    if not all(math.isfinite(v) for v in values):
        return None, ParseResult(None, ParseFailure.NON_NUMERIC, f"line {lineno}: {what} {line!r} is not finite")
    return values, None


def parse_crystal(text: str) -> ParseResult:
    """Model text -> Structure, strictly. Leading/trailing blank lines are tolerated, nothing else is."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 4:
        return ParseResult(None, ParseFailure.TOO_FEW_LINES, f"{len(lines)} lines; a crystal needs at least 4")
    lengths, failure = _floats(lines[0], 1, "lattice lengths")
    if failure:
        return failure
    angles, failure = _floats(lines[1], 2, "lattice angles")
    if failure:
        return failure
    if min(lengths) <= 0:
        return ParseResult(None, ParseFailure.NON_POSITIVE_LENGTH, f"line 1: lengths {lines[0]!r}")
    if not all(0 < x < 180 for x in angles):
        return ParseResult(None, ParseFailure.ANGLE_OUT_OF_RANGE, f"line 2: angles {lines[1]!r} not in (0, 180)")

    species: list[str] = []
    coords: list[list[float]] = []
    for i in range(2, len(lines), 2):
        symbol, lineno = lines[i], i + 1
        if not Element.is_valid_symbol(symbol):
            if species and not _ELEMENT_LIKE.match(symbol):
                return ParseResult(None, ParseFailure.TRAILING_GARBAGE, f"line {lineno}: {symbol!r} after the last site")
            return ParseResult(None, ParseFailure.UNKNOWN_ELEMENT, f"line {lineno}: {symbol!r} is not an element")
        if i + 1 >= len(lines):
            return ParseResult(
                None, ParseFailure.COORD_COUNT_MISMATCH, f"line {lineno}: element {symbol} has no coordinate line"
            )
        xyz, failure = _floats(lines[i + 1], lineno + 1, "coordinates")
        if failure:
            return failure
        species.append(symbol)
        coords.append(xyz)

    try:
        lattice = Lattice.from_parameters(*lengths, *angles)
        volume = lattice.volume
    except (ValueError, ZeroDivisionError) as exc:
        return ParseResult(None, ParseFailure.INVALID_LATTICE, f"lattice {lengths} {angles}: {exc}")
    if not math.isfinite(volume) or volume <= 1e-6:
        return ParseResult(None, ParseFailure.INVALID_LATTICE, f"lengths {lengths} and angles {angles} enclose no volume")
    return ParseResult(Structure(lattice, species, coords))


# ----------------------------------------------------------------------------------------------- prompts


def conditional_prompt(conditions: Mapping[str, object] | None = None) -> str:
    """Generation prompt; conditions is any subset of CONDITIONS (None values are left out)."""
    conditions = dict(conditions or {})
    unknown = set(conditions) - set(CONDITION_SENTENCES)
    if unknown:
        raise ValueError(f"unknown condition(s) {sorted(unknown)}; known: {', '.join(CONDITIONS)}")
    sentences = []
    for name, template in CONDITION_SENTENCES.items():
        value = conditions.get(name)
        if value is None:
            continue
        if name == "spacegroup":
            value = int(value)
        elif name != "formula":
            value = format_value(float(value))
        sentences.append(template.format(value))
    return PROMPT_HEADER + "".join(sentences) + GENERATION_INSTRUCTION


def prompt_conditions(prompt: str) -> dict[str, object] | None:
    """The conditions a generation prompt asks for (the inverse of conditional_prompt: {} for the unconditional
    prompt), or None for any other text, an infill prompt included. A `crystal generate` jsonl keeps each
    sample's prompt, not its options: this is how a sample is checked against what it was asked for."""
    if not (prompt.startswith(PROMPT_HEADER) and prompt.endswith(GENERATION_INSTRUCTION)):
        return None
    body = prompt[len(PROMPT_HEADER):len(prompt) - len(GENERATION_INSTRUCTION)]
    conditions: dict[str, object] = {}
    for name, template in CONDITION_SENTENCES.items():
        head, tail = template.split("{}")
        end = body.find(tail, len(head)) if body.startswith(head) else -1
        if end < 0:
            continue
        value = body[len(head):end]
        try:
            conditions[name] = value if name == "formula" else int(value) if name == "spacegroup" else float(value)
        except ValueError:
            return None
        body = body[end + len(tail):]
    return conditions if not body else None


def unconditional_prompt() -> str:
    return conditional_prompt({})


def infill_prompt(structure: Structure, element: str) -> str:
    """Prompt with every site of `element` written as [MASK]; the model answers an element symbol."""
    text = encode_structure(structure)
    if element not in structure.composition.get_el_amt_dict():
        raise ValueError(f"{element} is not in {structure.composition.reduced_formula}")
    masked = "\n".join(MASK if line == element else line for line in text.split("\n"))
    return INFILL_HEADER + masked + "\n"


def reduced_formula(structure: Structure) -> str:
    return structure.composition.reduced_formula


def spacegroup_number(structure: Structure, symprec: float = SYMPREC) -> int | None:
    """The structure's space group number at SYMPREC, or None where spglib gives up on a degenerate cell.
    One reading for training conditions, the bench's condition check and structures.csv, so they agree
    (`symprec` only for a diagnostic that asks how near a structure is to a group)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer  # seconds to import; most commands never need it

    try:
        return SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()
    except Exception:  # spglib raises on some degenerate cells
        return None


def parse_formula(formula: str) -> Composition:
    """A user's formula, validated: not empty, known elements, every written amount positive (pymatgen drops
    an element written with amount 0, which would silently change the composition). Raises ValueError."""
    if not formula.strip():
        raise ValueError("the formula is empty")
    try:
        composition = Composition(formula)
    except Exception as exc:  # pymatgen raises several types for malformed formulas
        raise ValueError(f"malformed formula {formula!r}: {exc}") from None
    kept = {getattr(el, "symbol", str(el)) for el in composition}
    dropped = sorted(set(re.findall(r"[A-Z][a-z]*", formula)) - kept)
    if dropped:
        raise ValueError(f"formula {formula!r}: {', '.join(dropped)} written with amount 0")
    if len(composition) == 0 or any(amount <= 0 for amount in composition.values()):
        raise ValueError(f"formula {formula!r} has no positive element amounts")
    unknown = [getattr(el, "symbol", str(el)) for el in composition if not isinstance(el, Element)]
    if unknown:
        raise ValueError(f"formula {formula!r}: unknown element(s) {', '.join(unknown)}")
    return composition


# ------------------------------------------------------------------------------------------ augmentations


def translate(structure: Structure, rng: np.random.Generator) -> Structure:
    """Same crystal, origin shifted by a uniform random fractional vector (wrapped back into the cell)."""
    shifted = structure.copy()
    shifted.translate_sites(range(len(shifted)), rng.uniform(size=3), frac_coords=True, to_unit_cell=True)
    return shifted


def permute_sites(structure: Structure, rng: np.random.Generator) -> Structure:
    """Same crystal with its sites in a random order."""
    order = rng.permutation(len(structure))
    return Structure.from_sites([structure[int(i)] for i in order])


def augment(
    structure: Structure, copies: int, rng: np.random.Generator, permute: bool = False
) -> list[Structure]:
    """The structure itself followed by `copies` randomly translated (optionally permuted) versions."""
    out = [structure]
    for _ in range(copies):
        variant = translate(structure, rng)
        out.append(permute_sites(variant, rng) if permute else variant)
    return out

