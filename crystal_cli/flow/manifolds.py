"""The spaces the flow lives in: fractional coordinates on the flat torus [0, 1)^3 and the lattice as a point
of R^6 (log lengths, logit of angles on a bounded interval), as in FlowMM / FlowLLM.

Everything works on torch tensors of any leading shape so the same functions serve training (batched
geodesic interpolation) and the ODE (exp map per Euler step). The unit-cell convention is pymatgen's:
lengths in Å, angles in degrees, lattice matrix rows are the cell vectors.
"""

from __future__ import annotations

import math

import torch
from pymatgen.core import Lattice, Structure

# FlowMM's angle interval (degrees). A Niggli-reduced cell has every angle in [60, 120]; the 0.1° margin keeps
# the logit finite for exactly 60/90/120° cells.
ANGLE_LOW = 59.9
ANGLE_HIGH = 120.1
_ANGLE_EPS = 0.01  # degrees: how far inside the interval out-of-range angles are clamped (logit ±8.7)


# -------------------------------------------------------------------------------------------- flat torus


def torus_wrap(x: torch.Tensor) -> torch.Tensor:
    """Project onto [0, 1)."""
    return torch.remainder(x, 1.0)


def torus_log(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shortest tangent vector at x pointing to y on the unit flat torus (each component in [-0.5, 0.5])."""
    z = 2 * math.pi * (y - x)
    return torch.atan2(torch.sin(z), torch.cos(z)) / (2 * math.pi)


def torus_exp(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Follow tangent vector u from x, wrapping around the cell."""
    return torus_wrap(x + u)


def torus_geodesic(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point at time t on the shortest path x0 -> x1 (t broadcasts against the leading dimensions)."""
    return torus_exp(x0, t * torus_log(x0, x1))


def remove_mean(u: torch.Tensor, graph: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Subtract each cell's mean from per-atom vectors: a common translation is no motion of the crystal."""
    sums = torch.zeros(num_graphs, u.shape[-1], dtype=u.dtype, device=u.device).index_add_(0, graph, u)
    counts = torch.bincount(graph, minlength=num_graphs).clamp(min=1).to(u.dtype)
    return u - (sums / counts[:, None])[graph]


# ---------------------------------------------------------------------------------------------- lattice


def lattice_to_euclidean(lengths: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """(…, 3) lengths in Å and (…, 3) angles in degrees -> (…, 6): log lengths, logit of scaled angles.

    Angles outside (ANGLE_LOW, ANGLE_HIGH) are clamped just inside it; callers that must not move a cell
    Niggli-reduce it first (`in_angle_range` / `reduce_if_needed`).
    """
    span = ANGLE_HIGH - ANGLE_LOW
    clamped = angles_deg.clamp(ANGLE_LOW + _ANGLE_EPS, ANGLE_HIGH - _ANGLE_EPS)
    scaled = (clamped - ANGLE_LOW) / span
    return torch.cat([torch.log(lengths), torch.logit(scaled)], dim=-1)


def euclidean_to_lattice(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of lattice_to_euclidean: (…, 6) -> lengths (Å), angles (degrees)."""
    lengths = torch.exp(x[..., :3])
    angles = ANGLE_LOW + (ANGLE_HIGH - ANGLE_LOW) * torch.sigmoid(x[..., 3:])
    return lengths, angles


def lattice_matrix(lengths: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """(…, 3, 3) row-vector lattice matrices in pymatgen's convention (c along z), differentiable."""
    alpha, beta, gamma = torch.deg2rad(angles_deg).unbind(-1)
    a, b, c = lengths.unbind(-1)
    cos_a, cos_b, cos_g = torch.cos(alpha), torch.cos(beta), torch.cos(gamma)
    sin_a, sin_b = torch.sin(alpha), torch.sin(beta)
    val = ((cos_a * cos_b - cos_g) / (sin_a * sin_b)).clamp(-1.0, 1.0)
    gamma_star = torch.arccos(val)
    zeros = torch.zeros_like(a)
    va = torch.stack([a * sin_b, zeros, a * cos_b], dim=-1)
    vb = torch.stack([-b * sin_a * torch.cos(gamma_star), b * sin_a * torch.sin(gamma_star), b * cos_a], dim=-1)
    vc = torch.stack([zeros, zeros, c], dim=-1)
    return torch.stack([va, vb, vc], dim=-2)


def in_angle_range(lattice: Lattice) -> bool:
    return all(ANGLE_LOW < angle < ANGLE_HIGH for angle in lattice.angles)


def reduce_if_needed(structure: Structure) -> tuple[Structure, bool]:
    """The structure itself if its angles fit the flow's interval, else its Niggli cell (same crystal, same
    site order, every angle in [60°, 120°]). Returns (structure, whether it was reduced)."""
    if in_angle_range(structure.lattice):
        return structure, False
    reduced_lattice = structure.lattice.get_niggli_reduced_lattice()
    cart = structure.cart_coords
    reduced = Structure(
        reduced_lattice, structure.species, reduced_lattice.get_fractional_coords(cart) % 1.0,
        coords_are_cartesian=False,
    )
    return reduced, True


def structure_lattice_vector(structure: Structure) -> torch.Tensor:
    """The 6-vector of a structure's lattice (float64)."""
    lengths = torch.tensor(structure.lattice.abc, dtype=torch.float64)
    angles = torch.tensor(structure.lattice.angles, dtype=torch.float64)
    return lattice_to_euclidean(lengths, angles)


def structure_from_flow(species: list, frac: torch.Tensor, lattice_vec: torch.Tensor) -> Structure:
    """Species (in order), (n, 3) fractional coordinates and a 6-vector -> pymatgen Structure."""
    lengths, angles = euclidean_to_lattice(lattice_vec.detach().double().cpu())
    lattice = Lattice.from_parameters(*lengths.tolist(), *angles.tolist())
    return Structure(lattice, species, torus_wrap(frac.detach().double().cpu()).numpy())


def mean_periodic_distance(a: Structure, b: Structure) -> float:
    """Mean distance (Å, in b's lattice) between corresponding sites of two same-order structures, after the
    best common translation: how far a is from b as a crystal, independent of where the origin sits."""
    fa = torch.tensor(a.frac_coords, dtype=torch.float64)
    fb = torch.tensor(b.frac_coords, dtype=torch.float64)
    delta = torus_log(fa, fb)
    delta = torus_log(torch.zeros_like(delta), delta - _circular_mean(delta))
    cart = delta @ torch.tensor(b.lattice.matrix, dtype=torch.float64)
    return float(cart.norm(dim=-1).mean())


def _circular_mean(delta: torch.Tensor) -> torch.Tensor:
    """Mean of displacements on the torus (per axis, via angles), so a shift across the cell edge counts once."""
    angle = 2 * math.pi * delta
    return torch.atan2(torch.sin(angle).mean(0), torch.cos(angle).mean(0)) / (2 * math.pi)
