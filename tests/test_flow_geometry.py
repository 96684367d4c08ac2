"""Flat torus and lattice maps (crystal_cli.flow.manifolds) and pair building (crystal_cli.flow.pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystal_cli.errors import CrystalError
from crystal_cli.flow import manifolds as M
from crystal_cli.flow.pairs import (
    FileSamples,
    PairOptions,
    PerturbedSamples,
    align_sites,
    aligned_target,
    build_pairs,
    load_pairs,
    split_pairs,
)
from crystal_cli.structure_io import write_structures


def torus_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return M.torus_log(a, b).abs().max()


def test_torus_log_exp_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, generator=g, dtype=torch.float64)
    y = torch.rand(200, 3, generator=g, dtype=torch.float64)
    u = M.torus_log(x, y)
    assert u.abs().max() <= 0.5 + 1e-12  # the shortest way round
    assert torus_distance(M.torus_exp(x, u), y) < 1e-12
    assert torch.all((M.torus_exp(x, u) >= 0) & (M.torus_exp(x, u) < 1))
    # log of exp recovers any tangent vector shorter than half a cell
    small = (torch.rand(200, 3, generator=g, dtype=torch.float64) - 0.5) * 0.98
    assert torch.allclose(M.torus_log(x, M.torus_exp(x, small)), small, atol=1e-12)


def test_torus_wraps_around_the_cell_edge():
    x = torch.tensor([0.95, 0.05, 0.5], dtype=torch.float64)
    y = torch.tensor([0.05, 0.95, 0.5], dtype=torch.float64)
    assert torch.allclose(M.torus_log(x, y), torch.tensor([0.1, -0.1, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(M.torus_exp(x, torch.tensor([0.1, -0.1, 0.0], dtype=torch.float64)), y, atol=1e-12)
    # the geodesic midpoint between 0.9 and 0.1 is the cell corner, not 0.5
    mid = M.torus_geodesic(torch.tensor([0.9]), torch.tensor([0.1]), torch.tensor(0.5))
    assert torus_distance(mid, torch.tensor([0.0])) < 1e-6
    assert torus_distance(M.torus_geodesic(x, y, torch.tensor(1.0, dtype=torch.float64)), y) < 1e-12


def test_remove_mean_zeroes_each_cell_drift():
    u = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    graph = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    out = M.remove_mean(u, graph, 2)
    assert torch.allclose(out[:3].mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(out[3:].mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(out[:3] - out[0], u[:3] - u[0], atol=1e-6)  # only the drift went


def test_lattice_maps_are_inverse_and_match_pymatgen():
    g = torch.Generator().manual_seed(2)
    lengths = 2 + 18 * torch.rand(100, 3, generator=g, dtype=torch.float64)
    angles = 60.5 + 59 * torch.rand(100, 3, generator=g, dtype=torch.float64)
    x = M.lattice_to_euclidean(lengths, angles)
    back_lengths, back_angles = M.euclidean_to_lattice(x)
    assert torch.allclose(back_lengths, lengths, atol=1e-10)
    assert torch.allclose(back_angles, angles, atol=1e-9)
    # and the other way round: any point of R^6 is a lattice that maps back to itself
    z = 16 * torch.rand(100, 6, generator=g, dtype=torch.float64) - 8  # |logit| < 8.7: not clamped
    assert torch.allclose(M.lattice_to_euclidean(*M.euclidean_to_lattice(z)), z, atol=1e-6)
    for a, b in zip(lengths[:5], angles[:5]):
        expected = Lattice.from_parameters(*a.tolist(), *b.tolist()).matrix
        got = M.lattice_matrix(a, b).numpy()
        assert np.allclose(got, expected, atol=1e-8)


def test_angles_outside_the_interval_are_clamped_or_niggli_reduced(structures):
    x = M.lattice_to_euclidean(torch.tensor([4.0, 4.0, 4.0]), torch.tensor([45.0, 90.0, 150.0]))
    assert torch.isfinite(x).all()
    _, angles = M.euclidean_to_lattice(x)
    assert M.ANGLE_LOW < angles.min() and angles.max() < M.ANGLE_HIGH

    skewed = Structure(Lattice.from_parameters(3.0, 3.0, 7.0, 90, 90, 30), ["Na", "Cl", "Cl"],
                       [[0, 0, 0], [0.5, 0.5, 0.5], [0.1, 0.7, 0.2]])
    reduced, changed = M.reduce_if_needed(skewed)
    assert changed and M.in_angle_range(reduced.lattice)
    assert [s.specie.symbol for s in reduced] == ["Na", "Cl", "Cl"]
    assert np.isclose(reduced.volume, skewed.volume)
    assert np.allclose(np.sort(reduced.distance_matrix, axis=None), np.sort(skewed.distance_matrix, axis=None), atol=1e-6)
    nacl = structures["NaCl"]
    assert M.reduce_if_needed(nacl) == (nacl, False)


def test_mean_periodic_distance_ignores_origin_and_sees_displacement(structures):
    s = structures["LiFePO4-like"]
    shifted = s.copy()
    shifted.translate_sites(range(len(s)), [0.37, 0.81, 0.55], frac_coords=True, to_unit_cell=True)
    assert M.mean_periodic_distance(shifted, s) < 1e-6
    moved = s.copy()
    moved.translate_sites([0], [0.1, 0, 0], frac_coords=True, to_unit_cell=True)
    d = M.mean_periodic_distance(moved, s)
    # 1.03 Å on one of 7 sites; the common shift (1/7 of it) is removed: 1.03 · 12/49 ≈ 0.25 Å
    assert 0.22 < d < 0.27


# ------------------------------------------------------------------------------------------------ pairs


def test_alignment_recovers_permutation_and_translation(structures):
    target = structures["LiFePO4-like"]
    rng = np.random.default_rng(0)
    sample = PerturbedSamples(coord_noise=0.01, lattice_noise=0.0).draw(target, 1, rng)[0]
    assert [s.specie.symbol for s in sample] != [s.specie.symbol for s in target]  # really shuffled
    aligned = aligned_target(sample, target)
    assert [s.specie.symbol for s in aligned] == [s.specie.symbol for s in sample]
    assert M.mean_periodic_distance(sample, aligned) < 0.15  # only the 0.01 noise remains
    assert aligned.composition == target.composition
    other = structures["NaCl"]
    assert align_sites(sample, other) is None


def _perturbed_samples_file(tmp_path, structures, seed=5):
    rng = np.random.default_rng(seed)
    named = []
    for name, s in structures.items():
        for k, sample in enumerate(PerturbedSamples(0.03, 0.03).draw(s, 2, rng)):
            named.append((f"{name}-{k}", sample))
    path = tmp_path / "samples.cif"
    write_structures(path, named)
    return path


def test_pairs_from_files_match_formula_and_resume_identically(tmp_path, structures):
    targets = tmp_path / "targets.cif"
    write_structures(targets, list(structures.items()))
    wanted = {k: structures[k] for k in ("LiFePO4-like", "ZnO-hex", "CsCl")}
    samples = _perturbed_samples_file(tmp_path, wanted)
    options = PairOptions(samples_per_target=2, seed=3)

    full = build_pairs(targets, tmp_path / "full", FileSamples(samples), options)
    rows = [json.loads(line) for line in (tmp_path / "full" / "pairs.jsonl").read_text().splitlines()]
    assert full["total_pairs"] == len(rows) == 6
    assert full["this_run"]["skipped"] == {"no_matching_sample": 2}  # NaCl and Si have no samples
    for row in rows:
        c0, c1 = Structure.from_dict(row["c0"]), Structure.from_dict(row["c1"])
        assert [s.specie for s in c0] == [s.specie for s in c1]
        assert row["distance"] < 1.0
    pairs = load_pairs(tmp_path / "full")
    assert len(pairs) == 6 and pairs[0].f0.shape == pairs[0].f1.shape

    # an interrupted run (first 2 targets, plus a torn pair of an unfinished target) resumes to the same file
    part = tmp_path / "part"
    build_pairs(targets, part, FileSamples(samples), PairOptions(samples_per_target=2, seed=3, max_targets=2))
    with (part / "pairs.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "ZnO-hex#0", "target_id": "ZnO-hex"}) + "\n")
    with pytest.raises(CrystalError, match="--resume"):
        build_pairs(targets, part, FileSamples(samples), options)
    resumed = build_pairs(targets, part, FileSamples(samples), options, resume=True)
    assert resumed["this_run"]["resumed_targets"] == 2
    assert (part / "pairs.jsonl").read_text() == (tmp_path / "full" / "pairs.jsonl").read_text()


def test_pairs_from_worker_processes_are_the_files_of_one_process(tmp_path, structures):
    """workers=2 (spawned processes, each with its own source) writes byte for byte what one process writes,
    and a resume with workers continues a one-process run to the same files."""
    targets = tmp_path / "targets.cif"
    write_structures(targets, list(structures.items()))
    options = PairOptions(samples_per_target=2, seed=5)
    build_pairs(targets, tmp_path / "one", PerturbedSamples(0.03, 0.03), options)
    build_pairs(targets, tmp_path / "two", PerturbedSamples(0.03, 0.03), options, workers=2)
    build_pairs(targets, tmp_path / "part", PerturbedSamples(0.03, 0.03), PairOptions(2, seed=5, max_targets=2))
    build_pairs(targets, tmp_path / "part", PerturbedSamples(0.03, 0.03), options, resume=True, workers=2)
    for name in ("pairs.jsonl", "progress.jsonl"):
        expected = (tmp_path / "one" / name).read_text()
        assert (tmp_path / "two" / name).read_text() == expected
        assert (tmp_path / "part" / name).read_text() == expected
    with pytest.raises(CrystalError, match="--workers"):
        build_pairs(targets, tmp_path / "zero", PerturbedSamples(), options, workers=0)


def test_pairs_of_a_cell_outside_the_angle_interval_share_its_niggli_cell(tmp_path):
    skewed = Structure(Lattice.from_parameters(3.0, 3.0, 7.0, 90, 90, 30), ["Na", "Cl", "Cl"],
                       [[0, 0, 0], [0.5, 0.5, 0.5], [0.1, 0.7, 0.2]])
    write_structures(tmp_path / "t.cif", [("skewed", skewed)])
    build_pairs(tmp_path / "t.cif", tmp_path / "p", PerturbedSamples(0.02, 0.02), PairOptions(samples_per_target=2))
    for pair in load_pairs(tmp_path / "p"):
        assert (pair.l1 - pair.l0).norm() < 0.2  # the noise only, not a clamped angle against a reduced one


def test_split_pairs_keeps_targets_together(tmp_path, structures):
    targets = tmp_path / "targets.cif"
    write_structures(targets, list(structures.items()))
    build_pairs(targets, tmp_path / "p", PerturbedSamples(), PairOptions(samples_per_target=3, seed=0))
    pairs = load_pairs(tmp_path / "p")
    train, val = split_pairs(pairs, 0.4, seed=1)
    assert len(train) + len(val) == 15 and val
    assert not {p.target_id for p in train} & {p.target_id for p in val}


def test_llm_pairs_with_the_real_base_model(tmp_path, structures):
    """`crystal flow pairs --model smollm2-135m`: real llama.cpp on the shipped GGUF, grammar-pinned formula.
    Run in a subprocess so a llama.cpp build the CPU cannot execute fails this test, not the whole run."""
    import subprocess
    import sys

    write_structures(tmp_path / "targets.cif", [("CsCl", structures["CsCl"])])
    command = [sys.executable, "-m", "crystal_cli.cli", "flow", "pairs", str(tmp_path / "targets.cif"),
               "-o", str(tmp_path / "pairs"), "--model", "smollm2-135m", "--per-target", "2", "--seed", "4",
               "--threads", "1"]  # one thread: two spin-waiting llama.cpp threads crawl on a shared 2-core host
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (-4 = SIGILL: rebuild llama.cpp): {done.stderr[-2000:]}"
    progress = [json.loads(line) for line in (tmp_path / "pairs" / "progress.jsonl").read_text().splitlines()]
    assert [p["target_id"] for p in progress] == ["CsCl"]
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert rows, progress  # the grammar makes every finished sample parse with the target's sites
    for row in rows:
        c0, c1 = Structure.from_dict(row["c0"]), Structure.from_dict(row["c1"])
        assert c0.composition == structures["CsCl"].composition and [s.specie for s in c0] == [s.specie for s in c1]
        assert row["source"] == "llm"
