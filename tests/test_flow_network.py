"""The velocity network is permutation-equivariant and translation-invariant, numerically."""

from __future__ import annotations

import pytest
import torch

from crystal_cli.flow.manifolds import torus_wrap
from crystal_cli.flow.network import Cells, FlowNet, FlowNetConfig, full_edges


@pytest.fixture(scope="module")
def net() -> FlowNet:
    torch.manual_seed(0)
    model = FlowNet(FlowNetConfig(hidden_dim=32, num_layers=2, num_freqs=4, time_dim=8, num_rbf=4)).double().eval()
    # non-trivial statistics so the standardization paths are exercised too
    g = torch.Generator().manual_seed(1)
    model.set_statistics(torch.randn(10, 6, generator=g, dtype=torch.float64),
                         torch.randn(10, 6, generator=g, dtype=torch.float64),
                         0.05 * torch.randn(40, 3, generator=g, dtype=torch.float64))
    return model


def random_batch(seed: int = 0):
    """Two cells (5 and 3 atoms) with random elements, coordinates, lattices and times."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([5, 3])
    numbers = torch.randint(1, 90, (8,), generator=g)
    frac = torch.rand(8, 3, generator=g, dtype=torch.float64)
    lattice = torch.cat([1.2 + 0.3 * torch.rand(2, 3, generator=g, dtype=torch.float64),
                         torch.randn(2, 3, generator=g, dtype=torch.float64)], dim=-1)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    return Cells.from_counts(numbers, counts), frac, lattice, t


def test_full_edges_connect_every_pair_within_each_cell_only():
    edges = full_edges(torch.tensor([2, 3]))
    pairs = set(map(tuple, edges.T.tolist()))
    expected = {(i, j) for i in range(2) for j in range(2)} | {(i, j) for i in range(2, 5) for j in range(2, 5)}
    assert pairs == expected and edges.shape[1] == 13


def test_permuting_atoms_permutes_outputs(net):
    cells, frac, lattice, t = random_batch()
    v_frac, v_lattice = net(t, cells, frac, lattice)
    # shuffle atoms inside each cell (cells stay contiguous, as a batch requires)
    perm = torch.cat([torch.tensor([3, 0, 4, 1, 2]), torch.tensor([7, 5, 6])])
    permuted = Cells.from_counts(cells.numbers[perm], cells.counts)
    p_frac, p_lattice = net(t, permuted, frac[perm], lattice)
    assert torch.allclose(p_frac, v_frac[perm], atol=1e-10)
    assert torch.allclose(p_lattice, v_lattice, atol=1e-10)
    assert v_frac.abs().max() > 1e-6  # the comparison is not between zeros


def test_translating_all_coordinates_changes_nothing(net):
    cells, frac, lattice, t = random_batch(1)
    v_frac, v_lattice = net(t, cells, frac, lattice)
    shift = torch.tensor([[0.31, 0.77, 0.52]] * 5 + [[0.9, 0.05, 0.46]] * 3, dtype=torch.float64)
    s_frac, s_lattice = net(t, cells, torus_wrap(frac + shift), lattice)
    assert torch.allclose(s_frac, v_frac, atol=1e-10)
    assert torch.allclose(s_lattice, v_lattice, atol=1e-10)
    # ... while moving one atom relative to the others does change the field
    moved = frac.clone()
    moved[0] += 0.1
    assert not torch.allclose(net(t, cells, moved, lattice)[0], v_frac, atol=1e-6)


def test_coordinate_velocity_has_no_drift_and_cells_do_not_interact(net):
    cells, frac, lattice, t = random_batch(2)
    v_frac, v_lattice = net(t, cells, frac, lattice)
    assert torch.allclose(v_frac[:5].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(v_frac[5:].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    alone = Cells.from_counts(cells.numbers[5:], torch.tensor([3]))
    a_frac, a_lattice = net(t[1:], alone, frac[5:], lattice[1:])
    assert torch.allclose(a_frac, v_frac[5:], atol=1e-10)
    assert torch.allclose(a_lattice, v_lattice[1:], atol=1e-10)
