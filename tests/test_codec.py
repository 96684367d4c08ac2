"""The Crystal-LLM text codec: exact format, strict parser reasons, prompts for every task, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from crystal_cli import codec
from crystal_cli.codec import ParseFailure


def test_encode_exact_format():
    s = Structure(Lattice.from_parameters(3.456, 4.0, 5.04, 90, 91.6, 120), ["Li", "O"],
                  [[0, 0, 0], [0.333, 0.5, 0.996]])
    assert codec.encode_structure(s) == "3.5 4.0 5.0\n90 92 120\nLi\n0.00 0.00 0.00\nO\n0.33 0.50 0.00"


def test_coordinates_wrap_into_unit_interval():
    assert codec.wrap_fraction(-0.25) == 0.75
    assert codec.wrap_fraction(0.999) == 0.0
    assert codec.wrap_fraction(1.5) == 0.5
    assert str(codec.wrap_fraction(-1e-9)) == "0.0"  # no "-0.00" in the text


def test_round_trip_matches(structures):
    matcher = StructureMatcher()
    for name, s in structures.items():
        parsed = codec.parse_crystal(codec.encode_structure(s))
        assert parsed.ok, (name, parsed)
        assert parsed.structure.composition == s.composition
        assert matcher.fit(parsed.structure, s), name


def test_sorted_sites_is_a_canonical_order_of_the_same_crystal(structures):
    """Elements grouped in order of first appearance, (x, y, z) increasing within each; same sites; any order
    of each element's sites gives the same text; what does not parse as lattice + site pairs comes back unchanged."""
    text = "4.0 4.0 4.0\n90 90 90\nO\n0.50 0.10 0.00\nNa\n0.90 0.00 0.00\nO\n0.50 0.00 0.90\nO\n0.10 0.90 0.90\nNa\n0.00 0.50 0.50"
    assert codec.sorted_sites(text) == ("4.0 4.0 4.0\n90 90 90\nO\n0.10 0.90 0.90\nO\n0.50 0.00 0.90\nO\n0.50 0.10 0.00"
                                        "\nNa\n0.00 0.50 0.50\nNa\n0.90 0.00 0.00")
    rng = np.random.default_rng(0)
    for s in structures.values():
        canonical = codec.sorted_sites(codec.encode_structure(s))
        first = {el: i for i, el in reversed(list(enumerate(site.specie.symbol for site in s)))}
        permuted = sorted(codec.permute_sites(s, rng), key=lambda site: first[site.specie.symbol])
        shuffled = codec.encode_structure(Structure.from_sites(permuted))
        assert codec.sorted_sites(shuffled) == canonical and codec.sorted_sites(canonical) == canonical
        a, b = codec.parse_crystal(canonical).structure, codec.parse_crystal(shuffled).structure
        assert sorted(map(str, a)) == sorted(map(str, b))
    for bad in ("4.0 4.0 4.0\n90 90 90\nNa", "4.0 4.0 4.0\n90 90 90\nNa\n0.1 x 0.2", "a\nb\nNa\n0.1 0.2"):
        assert codec.sorted_sites(bad) == bad


def test_sites_keep_their_order(structures):
    s = structures["LiFePO4-like"]
    parsed = codec.parse_crystal(codec.encode_structure(s)).structure
    assert [site.specie.symbol for site in parsed] == [site.specie.symbol for site in s]


def test_disordered_structure_is_refused():
    s = Structure(Lattice.cubic(4), [{"Na": 0.5, "K": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="disordered"):
        codec.encode_structure(s)


GOOD = "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("4.0 4.0 4.0\n90 90 90\nNa", ParseFailure.TOO_FEW_LINES),
        ("", ParseFailure.TOO_FEW_LINES),
        ("4.0 4.0 4.0\n90 90 90\nXx\n0.0 0.0 0.0", ParseFailure.UNKNOWN_ELEMENT),
        ("4.0 4.0 4.0\n90 90 90\n[MASK]\n0.0 0.0 0.0", ParseFailure.UNKNOWN_ELEMENT),
        ("4.0 four 4.0\n90 90 90\nNa\n0.0 0.0 0.0", ParseFailure.NON_NUMERIC),
        ("4.0 4.0 4.0\n90 90 90\nNa\n0.0 x 0.0", ParseFailure.NON_NUMERIC),
        ("4.0 nan 4.0\n90 90 90\nNa\n0.0 0.0 0.0", ParseFailure.NON_NUMERIC),
        ("4.0 0.0 4.0\n90 90 90\nNa\n0.0 0.0 0.0", ParseFailure.NON_POSITIVE_LENGTH),
        ("4.0 -1 4.0\n90 90 90\nNa\n0.0 0.0 0.0", ParseFailure.NON_POSITIVE_LENGTH),
        ("4.0 4.0 4.0\n90 180 90\nNa\n0.0 0.0 0.0", ParseFailure.ANGLE_OUT_OF_RANGE),
        ("4.0 4.0 4.0\n0 90 90\nNa\n0.0 0.0 0.0", ParseFailure.ANGLE_OUT_OF_RANGE),
        ("4.0 4.0 4.0\n90 90 90\nNa\n0.0 0.0", ParseFailure.COORD_COUNT_MISMATCH),
        ("4.0 4.0\n90 90 90\nNa\n0.0 0.0 0.0", ParseFailure.COORD_COUNT_MISMATCH),
        (GOOD + "\nK", ParseFailure.COORD_COUNT_MISMATCH),
        (GOOD + "\nThe structure above is stable.", ParseFailure.TRAILING_GARBAGE),
        (GOOD + "\n0.1 0.2 0.3", ParseFailure.TRAILING_GARBAGE),
        ("4.0 4.0 4.0\n10 10 170\nNa\n0.0 0.0 0.0", ParseFailure.INVALID_LATTICE),
    ],
)
def test_every_failure_reason(text, reason):
    result = codec.parse_crystal(text)
    assert not result.ok
    assert result.reason is reason, result.detail
    assert result.detail


def test_parser_tolerates_surrounding_blank_lines():
    assert codec.parse_crystal("\n" + GOOD + "\n\n").ok


def test_unconditional_prompt():
    assert codec.unconditional_prompt() == (
        "Below is a description of a bulk material. Generate a description of the lengths and angles of the "
        "lattice vectors and then the element type and coordinates for each atom within the lattice:\n"
    )


@pytest.mark.parametrize(
    ("conditions", "sentences"),
    [
        ({"formula": "LiFePO4"}, "The chemical formula is LiFePO4. "),
        ({"spacegroup": 62}, "The spacegroup number is 62. "),
        ({"e_above_hull": 0.0}, "The energy above the convex hull is 0.0. "),
        ({"formation_energy_per_atom": -2.3456}, "The formation energy per atom is -2.35. "),
        ({"band_gap": 1.1}, "The band gap is 1.1. "),
        (
            {"band_gap": 0, "formula": "NaCl", "spacegroup": 225.0},
            "The chemical formula is NaCl. The spacegroup number is 225. The band gap is 0.0. ",
        ),
    ],
)
def test_conditional_prompts(conditions, sentences):
    prompt = codec.conditional_prompt(conditions)
    assert prompt == codec.PROMPT_HEADER + sentences + codec.GENERATION_INSTRUCTION


def test_unknown_condition_is_refused():
    with pytest.raises(ValueError, match="unknown condition"):
        codec.conditional_prompt({"density": 3.0})


def test_infill_prompt_masks_every_site_of_the_element(structures):
    s = structures["LiFePO4-like"]
    prompt = codec.infill_prompt(s, "O")
    body = prompt.removeprefix(codec.INFILL_HEADER)
    assert prompt.startswith(codec.INFILL_HEADER) and body.endswith("\n")
    lines = body.strip().split("\n")
    assert lines.count(codec.MASK) == 4 and "O" not in lines and lines.count("Fe") == 1
    with pytest.raises(ValueError):
        codec.infill_prompt(s, "Na")


def test_parse_formula():
    assert codec.parse_formula("LiFePO4").reduced_formula == "LiFePO4"
    for bad in ("Xy2O", "Li-O", ""):
        with pytest.raises(ValueError):
            codec.parse_formula(bad)


def test_spacegroup_number_reads_within_the_fields_tolerance(structures):
    assert codec.spacegroup_number(structures["NaCl"]) == 225
    cscl = structures["CsCl"]
    # Cl moved by d along a sits 2d from its mirror image: cubic while 2d < SYMPREC
    for shift, expected_cubic in ((0.25 * codec.SYMPREC, True), (3 * codec.SYMPREC, False)):
        moved = cscl.copy()
        moved.translate_sites([1], [shift / cscl.lattice.a, 0, 0])
        assert (codec.spacegroup_number(moved) == 221) is expected_cubic


def test_augmentation_is_seeded_and_preserves_the_crystal(structures):
    s = structures["ZnO-hex"]
    a = codec.augment(s, 3, np.random.default_rng(7), permute=True)
    b = codec.augment(s, 3, np.random.default_rng(7), permute=True)
    assert len(a) == 4 and a[0] is s
    assert [codec.encode_structure(x) for x in a] == [codec.encode_structure(x) for x in b]
    assert len({codec.encode_structure(x) for x in a}) == 4  # copies really differ
    matcher = StructureMatcher()
    assert all(matcher.fit(x, s) for x in a[1:])
    assert all(0 <= f < 1 for x in a for f in x.frac_coords.ravel())
