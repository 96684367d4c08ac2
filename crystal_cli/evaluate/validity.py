"""Structural and compositional validity exactly as the field computes them (CDVAE's eval_utils).

Structural: every interatomic distance (pymatgen's distance_matrix, self-distances excluded) ≥ 0.5 Å and cell
volume ≥ 0.1 Å³. Compositional: SMACT — some combination of the elements' oxidation states is charge neutral
at the reduced stoichiometry and passes the Pauling electronegativity test; single elements and all-metal
alloys pass. Each failure carries a reason so reports can break invalid samples down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Composition, Structure

MIN_DISTANCE = 0.5  # Å
MIN_VOLUME = 0.1  # Å^3
MAX_OXIDATION_COMBINATIONS = 50_000  # oxidation-state assignments smact may enumerate (well under 1 s)


@dataclass(frozen=True)
class Validity:
    """Both validity flags of one structure and, for each failure, why."""

    structural: bool
    compositional: bool
    structural_reason: str = ""
    compositional_reason: str = ""

    @property
    def valid(self) -> bool:
        return self.structural and self.compositional


def structural_validity(structure: Structure) -> tuple[bool, str]:
    """(valid, reason) with CDVAE's cut-offs: shortest distance ≥ 0.5 Å and volume ≥ 0.1 Å³."""
    if structure.volume < MIN_VOLUME:
        return False, "small_volume"
    if len(structure) > 1:
        distances = structure.distance_matrix + np.eye(len(structure)) * (MIN_DISTANCE + 10.0)
        shortest = float(distances.min())
        if shortest < MIN_DISTANCE:
            return False, "overlapping_atoms"
    return True, ""


def compositional_validity(composition: Composition) -> tuple[bool, str]:
    """(valid, reason) by CDVAE's smact_validity on the reduced integer stoichiometry."""
    amounts = composition.get_el_amt_dict()
    symbols = tuple(sorted(amounts))
    counts = np.array([amounts[s] for s in symbols])
    if not np.allclose(counts, np.round(counts)):
        return False, "non_integer_stoichiometry"
    counts = np.round(counts).astype(int)
    counts = counts // np.gcd.reduce(counts)
    return _smact_validity(symbols, tuple(int(c) for c in counts))


@lru_cache(maxsize=65536)
def _smact_validity(symbols: tuple[str, ...], counts: tuple[int, ...]) -> tuple[bool, str]:
    """smact's own smact_validity with CDVAE's settings (smact 2.2.1's default oxidation states are the set
    smact now calls "smact14"); when it fails, the same test without the Pauling criterion says which part."""
    import smact
    from smact.screening import smact_validity

    # smact enumerates every combination of the elements' oxidation states: 20 distinct elements (which a
    # weak model does write) would take hours. Beyond MAX_OXIDATION_COMBINATIONS it is not run; such a
    # composition (mostly pure metals pass earlier inside smact, so this is 8+ multivalent elements) counts
    # as compositionally invalid, reason "too_many_oxidation_states". CDVAE's code would not finish on it.
    if len(symbols) > 1 and not all(symbol in smact.metals for symbol in symbols):
        elements = smact.element_dictionary(symbols)
        combinations = math.prod(max(1, len(elements[s].oxidation_states_smact14 or [])) for s in symbols)
        if combinations > MAX_OXIDATION_COMBINATIONS:
            return False, "too_many_oxidation_states"
    composition = Composition(dict(zip(symbols, counts)))
    if smact_validity(composition, oxidation_states_set="smact14"):
        return True, ""
    neutral = smact_validity(composition, use_pauling_test=False, oxidation_states_set="smact14")
    return False, "electronegativity" if neutral else "charge_neutrality"


def check(structure: Structure) -> Validity:
    """Both validity tests of one structure."""
    structural, s_reason = structural_validity(structure)
    compositional, c_reason = compositional_validity(structure.composition)
    return Validity(structural, compositional, s_reason, c_reason)
