"""Refinement throughput on CPU: structures/s of `crystal refine` integration at 50 and 250 Euler steps.

    python bench/refine.py [--model RUN] [--data CSV] [--count 64] [--batch-size 64] [--threads N]

Inputs are real MP-20 test crystals (first --count rows with at most 20 atoms) from ../shared/data when
present, else perturbed copies of a few built-in cells. Without --model the network is the recipe-sized one
(training/flow-mp20.toml [model]) with random weights: speed does not depend on the weights. Timed: the
batched ODE integration including structure conversion (refine_structures), not file reading.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

from crystal_cli.runtime import configure_process

configure_process()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pymatgen.core import Lattice, Structure  # noqa: E402

from crystal_cli.datasets import read_structures  # noqa: E402
from crystal_cli.flow.network import FlowNet, FlowNetConfig  # noqa: E402
from crystal_cli.files import shared_data  # noqa: E402
from crystal_cli.flow.ode import refine_structures  # noqa: E402
from crystal_cli.flow.pairs import PerturbedSamples  # noqa: E402
from crystal_cli.flow.train import load_model  # noqa: E402
from crystal_cli.models import FLOW, resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = shared_data("mp_20", "test.csv.gz")
RECIPE = REPO / "training" / "flow-mp20.toml"


def inputs(data: Path, count: int, max_atoms: int) -> tuple[list[Structure], str]:
    if data.exists():
        found = []
        for entry in read_structures(data):
            if entry.structure is not None and len(entry.structure) <= max_atoms:
                found.append(entry.structure)
            if len(found) == count:
                break
        return found, f"{data} (first {len(found)} rows with <= {max_atoms} atoms)"
    cells = [
        Structure(Lattice.hexagonal(3.25, 5.21), ["Zn", "Zn", "O", "O"],
                  [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38], [2 / 3, 1 / 3, 0.88]]),
        Structure(Lattice.cubic(5.69), ["Na"] * 4 + ["Cl"] * 4,
                  [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]]),
    ]
    rng = np.random.default_rng(0)
    found = [s for i in range(count) for s in PerturbedSamples().draw(cells[i % len(cells)], 1, rng)]
    return found, "perturbed built-in cells (no ../shared/data)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="flow run or shipped model (default: recipe-sized random weights)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--max-atoms", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 250])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = load_model(resolve_model(args.model, FLOW))
        described = args.model
    else:
        torch.manual_seed(0)
        model = FlowNet(FlowNetConfig(**tomllib.loads(RECIPE.read_text())["model"])).eval()
        described = f"random weights, {RECIPE.name} [model]"
    structures, source = inputs(args.data, args.count, args.max_atoms)
    if not structures:
        print("no input structures", file=sys.stderr)
        return 2
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {described} ({parameters:,} parameters); torch threads {torch.get_num_threads()}")
    print(f"inputs: {len(structures)} structures, mean {np.mean([len(s) for s in structures]):.1f} atoms, {source}")
    refine_structures(model, structures[: min(4, len(structures))], steps=2)  # warm-up (lazy init, allocator)
    rates = {}
    for steps in args.steps:
        started = time.perf_counter()
        for start in range(0, len(structures), args.batch_size):
            refine_structures(model, structures[start:start + args.batch_size], steps)
        seconds = time.perf_counter() - started
        rates[steps] = len(structures) / seconds
        print(f"steps {steps:>4}: {seconds:7.2f} s, {rates[steps]:8.2f} structures/s, "
              f"{rates[steps] * steps:9.1f} structure-steps/s (batch {args.batch_size})")
    if len(rates) > 1:
        first, *rest = args.steps
        for steps in rest:
            print(f"ratio {first}/{steps} steps: {rates[first] / rates[steps]:.2f}x faster (ideal {steps / first:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
