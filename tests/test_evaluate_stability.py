"""Stability: real CHGNet and a random-weight matgl model loaded from disk, a tiny hull, failure reasons, resume."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from crystal_cli.errors import CrystalError
from crystal_cli.evaluate.hull import Hull, build_hull, load_elemental_references
from crystal_cli.evaluate.potential import RelaxSettings, load_potential
from crystal_cli.evaluate.stability import evaluate_stability
from tests.conftest import require_shared

# MP elemental reference energies per atom (hull/mp_elemental_reference_entries.json.gz) and MP-20's DFT
# formation energy of rocksalt NaCl (mp-22862), so the tiny hull works without ../shared/data.
MP_NA, MP_CL, MP_NACL_FORMATION = -1.3225252934, -1.84853666, -2.109608383275862


def tiny_hull() -> Hull:
    return Hull({"Na": MP_NA, "Cl": MP_CL}, {"NaCl": (MP_NACL_FORMATION, "mp-22862")})


def rocksalt(a: float = 5.69) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure()


@pytest.fixture(scope="module")
def chgnet():
    return load_potential("chgnet")


def test_chgnet_relaxes_perturbed_rocksalt_back_onto_the_hull(chgnet):
    relaxed_ideal = chgnet.relax(rocksalt(), RelaxSettings(fmax=0.02, max_steps=200))
    perturbed = rocksalt()
    perturbed.apply_strain([0.06, -0.04, 0.03])
    perturbed.perturb(0.15, min_distance=0.1)
    result = chgnet.relax(perturbed, RelaxSettings(fmax=0.02, max_steps=300))
    assert result.error is None and result.converged and result.steps > 3
    volume_per_atom = result.structure.volume / len(result.structure)
    assert volume_per_atom == pytest.approx(relaxed_ideal.structure.volume / 2, rel=0.02)
    assert result.energy_per_atom == pytest.approx(relaxed_ideal.energy_per_atom, abs=0.005)
    assert result.energy_per_atom < chgnet.relax(perturbed, RelaxSettings(max_steps=1)).energy_per_atom
    hull = tiny_hull()
    formation = hull.formation_energy_per_atom(result.structure.composition, result.energy_per_atom)
    assert formation == pytest.approx(MP_NACL_FORMATION, abs=0.05)  # CHGNet lands in MP's frame
    assert abs(hull.e_above_hull(result.structure.composition, formation)) < 0.05


def test_failures_are_recorded_with_reasons(chgnet, tmp_path):
    americium = Structure(Lattice.cubic(3.5), ["Am"], [[0, 0, 0]])  # Z = 95: outside CHGNet's embedding
    assert chgnet.relax(americium, RelaxSettings()).error == "unsupported_element"
    timed_out = chgnet.relax(rocksalt(6.2), RelaxSettings(time_limit=0.0))
    assert timed_out.error == "timeout" and timed_out.energy_per_atom is not None
    kcl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(6.3), ["K", "Cl"], [[0, 0, 0], [0.5] * 3]).get_primitive_structure()
    jobs = [(0, "nacl", rocksalt()), (1, "kcl", kcl), (2, "am", americium)]
    log = tmp_path / "stability.jsonl"
    records = evaluate_stability(jobs, "chgnet", RelaxSettings(max_steps=5), tiny_hull(), log_path=log)
    assert [r.error for r in records] == [None, "element_not_in_hull", "unsupported_element"]
    assert records[0].e_above_hull is not None and not records[1].metastable and not records[2].metastable
    # resume: everything is in the log, so no potential is loaded (a bogus spec would raise) and nothing reruns
    resumed = evaluate_stability(jobs, "/no/such/model", RelaxSettings(max_steps=5), tiny_hull(), log_path=log)
    assert [r.energy_per_atom for r in resumed] == [r.energy_per_atom for r in records]
    assert resumed[0].relaxed.composition == records[0].relaxed.composition
    with pytest.raises(CrystalError):
        evaluate_stability(jobs + [(3, "new", rocksalt())], "/no/such/model", RelaxSettings(), None, log_path=log)


def test_matgl_random_weight_model_saved_and_loaded_from_disk(tmp_path):
    import matgl
    import torch
    from matgl.apps.pes import Potential as MatglPotential
    from matgl.models import M3GNet

    torch.manual_seed(0)
    model = M3GNet(element_types=("Na", "Cl"), is_intensive=False, dim_node_embedding=16, dim_edge_embedding=16,
                   units=16, nblocks=1, max_n=2, max_l=2)
    MatglPotential(model=model).save(tmp_path / "m3gnet")
    assert isinstance(matgl.load_model(tmp_path / "m3gnet"), MatglPotential)
    potential = load_potential(tmp_path / "m3gnet")
    assert potential.elements == {"Na", "Cl"}
    rattled = rocksalt()
    rattled.perturb(0.1, min_distance=0.05)  # off the symmetric positions, where every force vanishes
    result = potential.relax(rattled, RelaxSettings(max_steps=3, fmax=1e-6))
    assert result.error is None and np.isfinite(result.energy_per_atom) and result.steps == 3
    silicon = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    assert potential.relax(silicon, RelaxSettings()).error == "unsupported_element"
    with pytest.raises(CrystalError):
        load_potential(tmp_path)  # a directory, but no model in it


def test_hull_builds_from_tables_and_round_trips_as_json(tmp_path):
    from pymatgen.entries.computed_entries import ComputedEntry

    references = tmp_path / "elements.json.gz"
    entries = {el: ComputedEntry(Composition({el: 2}), 2 * e).as_dict() for el, e in (("Na", MP_NA), ("Cl", MP_CL))}
    with gzip.open(references, "wt") as handle:
        json.dump(entries, handle)
    table = tmp_path / "formation.csv"
    table.write_text("material_id,pretty_formula,formation_energy_per_atom\n"
                     "a,NaCl,-2.1\nb,NaCl,-2.0\nc,NaCl3,-0.9\nd,NaCl,\ne,KCl,-2.2\n")
    hull = build_hull([table], references)
    assert hull.entries == {"NaCl": (-2.1, "a"), "NaCl3": (-0.9, "c")}  # lowest per formula; K has no reference
    path = hull.save(tmp_path / "hull.json")
    assert json.loads(path.read_text())["format"] == "crystal-hull"  # plain JSON, no pickle
    loaded = Hull.load(path)
    assert loaded.e_above_hull(Composition("NaCl"), -2.1) == pytest.approx(0.0, abs=1e-9)
    assert loaded.e_above_hull(Composition("NaCl"), -2.0) == pytest.approx(0.1)
    # NaCl3 lies above the NaCl-Cl tie line: -2.1 * 0.5 = -1.05 at x_Cl = 0.75 vs -0.9
    assert loaded.e_above_hull(Composition("NaCl3"), -0.9) == pytest.approx(0.15)
    assert loaded.e_above_hull(Composition("Na"), 0.0) == pytest.approx(0.0)
    (tmp_path / "broken.json").write_text('{"format": "something else"}')
    with pytest.raises(CrystalError):
        Hull.load(tmp_path / "broken.json")


def test_mp_elemental_reference_energies_match_the_constants():
    energies = load_elemental_references(require_shared("hull", "mp_elemental_reference_entries.json.gz"))
    assert len(energies) == 89
    assert energies["Na"] == pytest.approx(MP_NA) and energies["Cl"] == pytest.approx(MP_CL)
