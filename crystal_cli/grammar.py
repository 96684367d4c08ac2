"""A GBNF grammar for Crystal-LLM text, so that every finished sample parses, and the tokens it can emit.

The grammar (llama.cpp's GBNF, see llama.cpp grammars/README.md) is the codec's format with every number in
range: lengths ``{:.1f}`` in [1.0, 99.9] Å, angles ``{:.0f}`` that always enclose a volume (0 < α, β, γ < 180,
α + β + γ < 360, each less than the sum of the other two), fractional coordinates ``0.xx``. Exact validity of an
angle triple is not a regular property over digits, so angles are written in buckets of ANGLE_BUCKET degrees:
α's bucket and β's bucket fix a γ range that is valid for every α, β in them (this keeps every one of 4,000
MP-20 triples; a 10° bucket would drop 0.8 %).

With a formula the sites are the elements in the order the training text uses (MP structures sort sites by
electronegativity, pymatgen's Element order, and group them by element), each count k × the reduced formula,
k × atoms-per-formula ≤ max atoms.

The grammar runs on llama.cpp's own grammar sampler (sampling/llama_ctypes.py) over a shortlist: the tokens
whose text could ever occur in crystal text (digits, '.', ' ', '\\n', element-like letters) plus
end-of-generation — a few hundred of 49,152; the trainer restricts its loss to the same shortlist.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element

from crystal_cli.codec import parse_formula
from crystal_cli.errors import CrystalError

ANGLE_BUCKET = 6
MAX_Z = 94  # H..Pu: every element of the Materials Project structures the models are trained on
ELEMENTS = tuple(Element.from_Z(z).symbol for z in range(1, MAX_Z + 1))
LENGTH = '[1-9] [0-9]? "." [0-9]'
FRACTION = '"0." [0-9] [0-9]'
# Longest text per line of the grammar, in characters (a token is at least one character).
_LATTICE_CHARS = len("99.9 99.9 99.9\n179 179 179")
_SITE_CHARS = len("\nHe\n0.00 0.00 0.00")
_TEXT_CHARS = frozenset("0123456789. \n")
_LETTER_RUNS = re.compile(r"[A-Za-z]+")
_SYMBOL_PREFIXES = frozenset(el[:i] for el in ELEMENTS for i in range(1, len(el) + 1))
_SYMBOL_SUFFIXES = frozenset(el[i:] for el in ELEMENTS for i in range(len(el)))
_SYMBOL_PARTS = _SYMBOL_PREFIXES | _SYMBOL_SUFFIXES


def max_new_tokens(max_atoms: int) -> int:
    """Tokens that always suffice for a grammatical crystal of up to max_atoms sites, plus end of text."""
    return _LATTICE_CHARS + _SITE_CHARS * max_atoms + 1


# ------------------------------------------------------------------------------------------ GBNF text


def _same_length_range(lo: str, hi: str) -> list[str]:
    """GBNF sequences matching the decimal strings lo..hi (same length, lo <= hi)."""
    if not lo:
        return [""]
    if lo == hi:
        return [f'"{lo}"']
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    rest = len(lo) - 1
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" {tail}' for tail in _same_length_range(lo[1:], hi[1:])]
    out = []
    first, last = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * rest:
        out += [f'"{lo[0]}" {tail}' for tail in _same_length_range(lo[1:], "9" * rest)]
        first += 1
    tail_hi = [] if hi[1:] == "9" * rest else [f'"{hi[0]}" {tail}' for tail in _same_length_range("0" * rest, hi[1:])]
    if tail_hi:
        last -= 1
    if first <= last:
        head = f'"{first}"' if first == last else f"[{first}-{last}]"
        out.append(head + " [0-9]" * rest)
    return out + tail_hi


def int_range(lo: int, hi: int) -> str:
    """A GBNF group matching the integers lo..hi written without leading zeros."""
    if not 0 <= lo <= hi:
        raise ValueError(f"bad integer range {lo}..{hi}")
    alternatives = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        start = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
        stop = min(hi, 10**digits - 1)
        if start <= stop:
            alternatives += _same_length_range(str(start), str(stop))
    return "(" + " | ".join(alternatives) + ")"


ANGLE_BUCKETS = tuple((lo, min(lo + ANGLE_BUCKET - 1, 179)) for lo in range(1, 180, ANGLE_BUCKET))


def gamma_range(alpha_bucket: tuple[int, int], beta_bucket: tuple[int, int]) -> tuple[int, int]:
    """The γ values (lo..hi, empty when lo > hi) the grammar takes after an α and a β in these buckets:
    valid for every α, β in them. The distance guard reads the grammar's angle triples from here."""
    (a_lo, a_hi), (b_lo, b_hi) = alpha_bucket, beta_bucket
    g_lo = max(a_hi - b_lo, b_hi - a_lo, 0) + 1  # γ > |α − β| for every α, β in the buckets
    g_hi = min(a_lo + b_lo - 1, 359 - a_hi - b_hi, 179)  # γ < α + β and α + β + γ < 360
    return g_lo, g_hi


def _angle_rules() -> list[str]:
    """angles ::= one alternative per (α bucket, β bucket) with the γ range valid for all of them."""
    alternatives = []
    for a_lo, a_hi in ANGLE_BUCKETS:
        betas = []
        for b_lo, b_hi in ANGLE_BUCKETS:
            g_lo, g_hi = gamma_range((a_lo, a_hi), (b_lo, b_hi))
            if g_lo <= g_hi:
                betas.append(f'{int_range(b_lo, b_hi)} " " {int_range(g_lo, g_hi)}')
        if betas:
            alternatives.append(f'{int_range(a_lo, a_hi)} " " ({" | ".join(betas)})')
    return ["angles ::= " + " | ".join(f"({alt})" for alt in alternatives)]


@dataclass(frozen=True)
class FormulaConstraint:
    """Sites a --formula allows: elements in training-text order, counts per formula unit and the largest
    number of units. A reduced formula (LiFePO4) allows any whole number of units within --max-atoms; one
    written with a common factor (Li2Fe2P2O8) is the cell's exact content (one unit)."""

    formula: str  # reduced formula, as training prompts write it
    elements: tuple[str, ...]
    counts: tuple[int, ...]
    max_multiple: int


def element_order(symbols: Sequence[str]) -> list[str]:
    """Elements in the order MP structures hold their sites: pymatgen's Element order (electronegativity)."""
    return [el.symbol for el in sorted(Element(s) for s in symbols)]


def formula_constraint(formula: str, max_atoms: int) -> FormulaConstraint:
    """Validate a user's --formula against --max-atoms; CrystalError names what is wrong."""
    try:
        composition = parse_formula(formula)
    except ValueError as exc:
        raise CrystalError(f"--formula: {exc}") from None
    unknown = [str(el) for el in composition.elements if not isinstance(el, Element) or el.Z > MAX_Z]
    if unknown:
        raise CrystalError(f"--formula {formula!r}: element(s) {', '.join(unknown)} not supported (H..Pu only)")
    amounts = composition.get_el_amt_dict()
    if any(abs(v - round(v)) > 1e-6 for v in amounts.values()):
        raise CrystalError(f"--formula {formula!r}: amounts must be whole numbers of atoms")
    order = element_order(list(amounts))
    written = tuple(int(round(amounts[el])) for el in order)
    units = math.gcd(*written)
    reduced = composition.reduced_formula
    if units > 1:  # written with a common factor: that is the cell's exact content
        if sum(written) > max_atoms:
            raise CrystalError(f"--formula {formula} has {sum(written)} atoms; --max-atoms is {max_atoms}")
        return FormulaConstraint(reduced, tuple(order), written, 1)
    if sum(written) > max_atoms:
        raise CrystalError(f"--formula {reduced} needs {sum(written)} atoms per formula unit; --max-atoms is {max_atoms}")
    return FormulaConstraint(reduced, tuple(order), written, max_atoms // sum(written))


def crystal_gbnf(max_atoms: int, formula: FormulaConstraint | None = None) -> str:
    """The GBNF grammar of crystal text with 1..max_atoms sites (or the formula's site multiset)."""
    if max_atoms < 1:
        raise CrystalError(f"--max-atoms must be >= 1, got {max_atoms}")
    rules = [
        'root ::= lengths "\\n" angles sites',
        'lengths ::= len " " len " " len',
        f"len ::= {LENGTH}",
        f"frac ::= {FRACTION}",
        'xyz ::= frac " " frac " " frac',
        *_angle_rules(),
    ]
    if formula is None:
        rules.append(f"sites ::= site{{1,{max_atoms}}}")
        rules.append('site ::= "\\n" element "\\n" xyz')
        rules.append("element ::= " + " | ".join(f'"{el}"' for el in ELEMENTS))
    else:
        names = [f"site-{el.lower()}" for el in formula.elements]
        blocks = []
        for k in range(1, formula.max_multiple + 1):
            blocks.append(" ".join(f"{name}{{{k * n}}}" for name, n in zip(names, formula.counts)))
        rules.append("sites ::= " + " | ".join(f"({b})" for b in blocks))
        rules += [f'{name} ::= "\\n{el}\\n" xyz' for name, el in zip(names, formula.elements)]
    return "\n".join(rules) + "\n"


# -------------------------------------------------------------------------------------------- tokens


def _could_be_crystal_text(piece: str) -> bool:
    """Is `piece` a substring of some crystal text? Letters only as (parts of) element symbols."""
    if not piece or any(not (ch in _TEXT_CHARS or (ch.isascii() and ch.isalpha())) for ch in piece):
        return False
    for match in _LETTER_RUNS.finditer(piece):
        start, end, run = match.start(), match.end(), match.group()
        at_start, at_end = start == 0, end == len(piece)
        allowed = (
            _SYMBOL_PARTS if at_start and at_end else
            _SYMBOL_SUFFIXES if at_start else
            _SYMBOL_PREFIXES if at_end else
            ELEMENTS
        )
        if run not in allowed:
            return False
    return True


def crystal_shortlist(pieces: Sequence[str], end_tokens: Sequence[int]) -> np.ndarray:
    """Token ids that could ever be grammatical: pieces of crystal text and end-of-generation tokens."""
    ids = {i for i, piece in enumerate(pieces) if _could_be_crystal_text(piece)}
    return np.array(sorted(ids | set(end_tokens)), dtype=np.int32)
