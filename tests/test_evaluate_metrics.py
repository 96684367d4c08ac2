"""Validity, uniqueness, novelty, coverage and interval statistics on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from crystal_cli.evaluate import coverage, matching, validity
from crystal_cli.evaluate.stats import wilson
from crystal_cli.structure_io import write_structures
from tests.conftest import require_shared, simple_structures


def test_atoms_closer_than_half_an_angstrom_are_structurally_invalid():
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])  # 0.3 Å apart
    apart = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert validity.structural_validity(close) == (False, "overlapping_atoms")
    assert validity.structural_validity(apart) == (True, "")
    # periodic images count: 0.3 Å apart across the cell boundary
    wrapped = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0.01, 0, 0], [0.95, 0, 0]])
    assert validity.structural_validity(wrapped)[0] is False


def test_tiny_cell_and_single_atom_cells():
    tiny = Structure(Lattice.cubic(0.4), ["Fe"], [[0, 0, 0]])  # 0.064 Å^3
    assert validity.structural_validity(tiny) == (False, "small_volume")
    single = Structure(Lattice.cubic(2.9), ["Fe"], [[0, 0, 0]])
    assert validity.check(single).valid


def test_smact_splits_nacl_and_na2cl():
    assert validity.compositional_validity(Composition("NaCl")) == (True, "")
    # Na2Cl balances only as Na(-1) with Cl(+2) (smact14), making the less electronegative element the anion
    assert validity.compositional_validity(Composition("Na2Cl")) == (False, "electronegativity")
    assert validity.compositional_validity(Composition("NaCl2")) == (False, "charge_neutrality")
    # pure elements and all-metal alloys pass, as in CDVAE's smact_validity
    assert validity.compositional_validity(Composition("Si8"))[0]
    assert validity.compositional_validity(Composition("Cu3Au"))[0]
    # the reduced stoichiometry is what is tested: Na4Cl4 is NaCl
    assert validity.compositional_validity(Composition("Na4Cl4"))[0]


def _copies(structure: Structure, rng: np.random.Generator) -> list[Structure]:
    """The same crystal written three other ways: translated, 2x1x1 supercell, slightly strained."""
    translated = structure.copy()
    translated.translate_sites(range(len(translated)), rng.uniform(size=3), to_unit_cell=True)
    strained = structure.copy()
    strained.apply_strain(0.01)
    return [translated, structure * (2, 1, 1), strained]


def test_a_duplicated_structure_halves_uniqueness():
    distinct = list(simple_structures().values())[:4]
    rng = np.random.default_rng(0)
    samples = distinct + [_copies(s, rng)[i % 3] for i, s in enumerate(distinct)]
    flags = matching.uniqueness(samples)
    assert flags == [True] * 4 + [False] * 4
    assert sum(flags) / len(flags) == 0.5
    assert matching.uniqueness([distinct[0], None]) == [True, None]


def test_uniqueness_in_worker_processes_agrees():
    structures = simple_structures()
    samples = [structures["NaCl"], structures["Si"], structures["NaCl"] * (1, 1, 2), structures["CsCl"]]
    assert matching.uniqueness(samples, workers=2) == matching.uniqueness(samples) == [True, True, False, True]


def test_a_reference_structure_is_not_novel(tmp_path):
    structures = simple_structures()
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    write_structures(reference_dir / "train.cif", [("nacl", structures["NaCl"]), ("si", structures["Si"])])
    reference = matching.load_reference(reference_dir)
    assert reference.materials == 2
    moved = structures["NaCl"].copy()
    moved.translate_sites(range(len(moved)), [0.1, 0.2, 0.3])
    samples = [moved, structures["CsCl"], structures["ZnO-hex"]]
    assert matching.novelty(samples, reference) == [False, True, True]


def test_a_split_directory_reference_is_its_train_split(tmp_path):
    structures = simple_structures()
    write_structures(tmp_path / "train.cif", [("nacl", structures["NaCl"])])
    write_structures(tmp_path / "test.cif", [("si", structures["Si"])])
    reference = matching.load_reference(tmp_path)
    assert reference.materials == 1
    assert matching.novelty([structures["NaCl"], structures["Si"]], reference) == [False, True]


def test_novelty_against_real_mp20_rows_prefilters_by_formula(mp20_csv):
    import pandas as pd

    frame = pd.read_csv(mp20_csv)
    first = Structure.from_str(frame["cif"][0], fmt="cif")
    formulas = {first.composition.reduced_formula, "NaCl"}
    reference = matching.load_reference(mp20_csv, formulas)
    assert reference.materials == len(frame)  # every row counted as read ...
    assert set(reference.by_formula) <= formulas  # ... but only wanted formulas parsed
    rattled = first.copy()
    rattled.perturb(0.02, min_distance=0.0)
    assert matching.novelty([rattled], reference) == [False]


def test_wilson_interval_known_values():
    rate = wilson(5, 10)
    assert rate.rate == 0.5
    assert rate.low == pytest.approx(0.2366, abs=1e-4) and rate.high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 20).low == 0.0 and 0.15 < wilson(0, 20).high < 0.17
    assert wilson(0, 0).rate is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_coverage_of_a_set_against_itself_and_against_a_different_set():
    known = simple_structures()
    structures = [known["NaCl"].get_primitive_structure(), known["CsCl"], known["Si"].get_primitive_structure()]
    fingerprints = coverage.fingerprints(structures)
    assert all(f.structure is not None and f.composition is not None for f in fingerprints)
    same = coverage.coverage(fingerprints, fingerprints, n_generated=len(structures))
    assert same["cov_recall"] == 1.0 and same["cov_precision"] == 1.0 and same["amsd_recall"] == 0.0
    # one extra generated entry that never produced a structure still counts in COV-P's denominator
    assert coverage.coverage(fingerprints, fingerprints, n_generated=len(structures) + 1)["cov_precision"] < 1.0
    tight = coverage.coverage(fingerprints[:1], fingerprints, len(structures[:1]), structure_cutoff=1e-6,
                              composition_cutoff=1e-6)
    assert tight["cov_recall"] == pytest.approx(1 / len(structures))


def test_wasserstein_distances_of_density_and_element_count():
    structures = list(simple_structures().values())
    assert coverage.wasserstein(structures, structures)["wdist_density"] == 0.0
    expanded = [s.copy() for s in structures]
    for s in expanded:
        s.scale_lattice(s.volume * 2)  # halves every density
    shifted = coverage.wasserstein(expanded, structures)
    mean_density = np.mean([s.density for s in structures])
    assert math.isclose(shifted["wdist_density"], mean_density / 2, rel_tol=1e-6)
    assert shifted["wdist_num_elems"] == 0.0


def test_real_mp20_rows_are_valid():
    import pandas as pd

    frame = pd.read_csv(require_shared("mp_20", "test.csv.gz"), nrows=30)
    checks = [validity.check(Structure.from_str(cif, fmt="cif")) for cif in frame["cif"]]
    assert sum(c.structural for c in checks) == 30
    assert sum(c.compositional for c in checks) >= 24  # CDVAE reports ~91 % for MP-20 test


def test_compositional_validity_of_a_twenty_element_composition_returns_at_once():
    """smact enumerates every oxidation-state combination; a 20-element sample (a weak model writes them)
    would take hours. It is refused up front with its own reason."""
    import time

    from pymatgen.core import Composition

    from crystal_cli.evaluate.validity import compositional_validity

    formula = "EuDyLuMgUVGaFeCuTcNiSnBHWCSXeIF"
    start = time.perf_counter()
    assert compositional_validity(Composition(formula)) == (False, "too_many_oxidation_states")
    assert time.perf_counter() - start < 5
    assert compositional_validity(Composition("LiFePO4")) == (True, "")
