"""The velocity network: CSPNet-style message passing (DiffCSP, Jiao et al. 2023; as adapted by FlowMM) over the
fully connected atoms of each cell.

Nodes start from an element embedding and a time embedding. Edges carry sinusoidal features of the torus
difference f_j − f_i (integer frequencies, so smooth across the cell boundary), the minimum-image distance
in Å and the cell's standardized lattice 6-vector. Mean aggregation over all atoms of a cell makes every
layer permutation-equivariant; only differences of fractional coordinates enter, so a common translation
changes nothing. Outputs: a per-atom coordinate velocity (cell mean removed) and a per-cell lattice velocity
(from the mean-pooled nodes, hence permutation-invariant).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch_geometric.nn import MessagePassing

from crystal_cli.flow.manifolds import euclidean_to_lattice, lattice_matrix, remove_mean, torus_log
from crystal_cli.grammar import MAX_Z

LATTICE_DIM = 6


@dataclass
class FlowNetConfig:
    """Network sizes. FlowMM's CSPNet: hidden 512, 6 layers, 128 frequencies; defaults here are CPU-sized."""

    hidden_dim: int = 256
    num_layers: int = 4
    num_freqs: int = 32
    time_dim: int = 64
    num_rbf: int = 16
    rbf_cutoff: float = 8.0  # Å
    max_z: int = MAX_Z  # element embedding size (the shipped flow-default was trained with 103)


@dataclass
class Cells:
    """The fixed part of a batch of cells: atomic numbers, atom -> cell index, fully connected edges."""

    numbers: torch.Tensor  # (N,) long
    graph: torch.Tensor  # (N,) long
    edge_index: torch.Tensor  # (2, E) long: (source j, target i) within each cell, self edges included
    counts: torch.Tensor  # (B,) atoms per cell

    @property
    def num_graphs(self) -> int:
        return int(self.counts.shape[0])

    @classmethod
    def from_counts(cls, numbers: torch.Tensor, counts: torch.Tensor) -> Cells:
        counts = counts.long()
        graph = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return cls(numbers=numbers.long(), graph=graph, edge_index=full_edges(counts), counts=counts)


def full_edges(counts: torch.Tensor) -> torch.Tensor:
    """All ordered atom pairs (i, j) inside each cell, as a (2, Σ n²) edge index over the concatenated atoms."""
    squares = counts * counts
    edge_graph = torch.repeat_interleave(torch.arange(len(counts)), squares)
    first_edge = torch.cumsum(squares, 0) - squares
    first_atom = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(squares.sum())) - first_edge[edge_graph]
    n = counts[edge_graph]
    offset = first_atom[edge_graph]
    return torch.stack([local // n + offset, local % n + offset])


class SinusoidalEmbedding(nn.Module):
    """sin/cos(2πk·x) for k = 1..K on each of the last-axis components (periodic with period 1)."""

    def __init__(self, num_freqs: int, num_inputs: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, num_freqs + 1, dtype=torch.float32), persistent=False)
        self.dim = 2 * num_freqs * num_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x.unsqueeze(-1) * self.freqs).flatten(-2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] at geometrically spaced frequencies, then a linear map."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), half)), persistent=False)
        self.linear = nn.Linear(2 * half, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs
        return self.linear(torch.cat([angles.sin(), angles.cos()], dim=-1))


class CSPLayer(MessagePassing):
    """h_i ← h_i + φ_h(h_i, mean_j φ_e(h_i, h_j, e_ij)), pre-LayerNorm (DiffCSP's layer with ln=True).

    φ_e's first linear map acts on the concatenation [h_i, h_j, e_ij]; it is split into three maps so the
    node parts are computed once per atom instead of once per edge (same function, ~2x fewer edge FLOPs).
    """

    def __init__(self, hidden_dim: int, edge_dim: int):
        super().__init__(aggr="mean")
        self.norm = nn.LayerNorm(hidden_dim)
        self.edge_target = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.edge_source = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.edge_attr = nn.Linear(edge_dim, hidden_dim)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU()
        )

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        normed = self.norm(h)
        aggregated = self.propagate(
            edge_index, target=self.edge_target(normed), source=self.edge_source(normed), attr=self.edge_attr(edge_attr)
        )
        return h + self.node_mlp(torch.cat([normed, aggregated], dim=-1))

    def message(self, target_i: torch.Tensor, source_j: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        return self.edge_out(target_i + source_j + attr)


class FlowNet(nn.Module):
    """Velocity field v(t, c) = (v_f per atom, v_l per cell) on the torus × lattice-parameter space.

    Buffers hold data statistics (set by `set_statistics` from the training pairs) so that the network sees
    standardized lattices and predicts standardized velocities; they travel with the state dict.
    """

    def __init__(self, config: FlowNetConfig):
        super().__init__()
        self.config = config
        self.source: str | None = None  # the run directory it was loaded from (provenance for manifests)
        h = config.hidden_dim
        self.frac_embedding = SinusoidalEmbedding(config.num_freqs, 3)
        self.register_buffer("rbf_centers", torch.linspace(0.0, config.rbf_cutoff, config.num_rbf), persistent=False)
        self.rbf_width = config.rbf_cutoff / max(config.num_rbf - 1, 1)
        edge_dim = self.frac_embedding.dim + config.num_rbf + LATTICE_DIM
        self.element_embedding = nn.Embedding(config.max_z + 1, h)
        self.time_embedding = TimeEmbedding(config.time_dim)
        self.node_in = nn.Linear(h + config.time_dim, h)
        self.layers = nn.ModuleList(CSPLayer(h, edge_dim) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(h)
        # no bias: a constant coordinate velocity would be a pure drift, which the flow does not model
        self.coord_out = nn.Linear(h, 3, bias=False)
        # the lattice head also sees the standardized lattice and the time directly: the lattice velocity
        # depends on where the lattice is now, which the edge features only carry diluted
        self.lattice_out = nn.Sequential(
            nn.Linear(h + LATTICE_DIM + config.time_dim, h), nn.SiLU(), nn.Linear(h, LATTICE_DIM)
        )
        self.register_buffer("lattice_mean", torch.zeros(LATTICE_DIM))
        self.register_buffer("lattice_std", torch.ones(LATTICE_DIM))
        self.register_buffer("lattice_velocity_scale", torch.ones(LATTICE_DIM))
        self.register_buffer("coord_velocity_scale", torch.ones(()))

    @torch.no_grad()
    def fingerprint(self) -> str:
        """Hex SHA-256 of the configuration and every saved tensor: the network's identity wherever it was
        loaded from (a refine manifest records it, so a resume can tell another network apart)."""
        digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def set_statistics(
        self, lattices: torch.Tensor, lattice_velocities: torch.Tensor, coord_velocities: torch.Tensor
    ) -> None:
        """Standardization from data: (P, 6) lattice points, (P, 6) lattice velocities, (N, 3) coord velocities."""
        self.lattice_mean.copy_(lattices.mean(0))
        self.lattice_std.copy_(lattices.std(0).clamp(min=1e-3) if len(lattices) > 1 else torch.ones(LATTICE_DIM))
        if len(lattice_velocities) > 1:
            self.lattice_velocity_scale.copy_(lattice_velocities.pow(2).mean(0).sqrt().clamp(min=1e-3))
        self.coord_velocity_scale.copy_(coord_velocities.pow(2).mean().sqrt().clamp(min=1e-4))

    def edge_features(self, cells: Cells, frac: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        src, dst = cells.edge_index
        diff = torus_log(frac[dst], frac[src])  # f_j − f_i, minimum image
        edge_graph = cells.graph[dst]
        lengths, angles = euclidean_to_lattice(lattice)
        matrices = lattice_matrix(lengths, angles)
        distance = torch.einsum("ei,eij->ej", diff, matrices[edge_graph]).norm(dim=-1)
        rbf = torch.exp(-((distance[:, None] - self.rbf_centers) / self.rbf_width) ** 2)
        standardized = (lattice - self.lattice_mean) / self.lattice_std
        return torch.cat([self.frac_embedding(diff), rbf, standardized[edge_graph]], dim=-1)

    def forward(
        self, t: torch.Tensor, cells: Cells, frac: torch.Tensor, lattice: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (B,), frac: (N, 3), lattice: (B, 6) -> (v_f (N, 3), v_l (B, 6))."""
        edge_attr = self.edge_features(cells, frac, lattice)
        time = self.time_embedding(t)
        h = self.node_in(torch.cat([self.element_embedding(cells.numbers), time[cells.graph]], dim=-1))
        for layer in self.layers:
            h = layer(h, cells.edge_index, edge_attr)
        h = self.final_norm(h)
        v_frac = remove_mean(self.coord_out(h), cells.graph, cells.num_graphs) * self.coord_velocity_scale
        pooled = torch.zeros(cells.num_graphs, h.shape[-1], dtype=h.dtype).index_add_(0, cells.graph, h)
        pooled = pooled / cells.counts[:, None].to(h.dtype)
        standardized = (lattice - self.lattice_mean) / self.lattice_std
        v_lattice = self.lattice_out(torch.cat([pooled, standardized, time], dim=-1)) * self.lattice_velocity_scale
        return v_frac, v_lattice
