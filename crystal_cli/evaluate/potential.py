"""ML interatomic potentials behind one ASE relaxation: CHGNet (weights ship in its wheel) or any matgl model
directory (matgl's named models need the hub, so users save/point at a directory; tests use a random-weight
M3GNet saved with Potential.save).

Both become an ASE calculator, so relaxation is the same FIRE + FrechetCellFilter loop for every potential. A
structure that returns NaN, blows up or runs past its time limit ends with a reason, never an exception.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_cli.grammar import ELEMENTS

CHGNET = "chgnet"
CHGNET_ELEMENTS = frozenset(ELEMENTS)  # its embedding covers H..Pu, exactly the elements crystal's text uses
MAX_VOLUME_RATIO = 5.0  # a cell that grows or shrinks more than this during relaxation has exploded


@dataclass
class RelaxSettings:
    fmax: float = 0.05  # eV/Å
    max_steps: int = 500
    relax_cell: bool = True
    time_limit: float = 120.0  # seconds per structure


@dataclass
class Relaxation:
    """The outcome of relaxing one structure; `error` names why it is unusable (then energies may be None)."""

    structure: Structure | None
    energy_per_atom: float | None
    steps: int
    converged: bool
    seconds: float
    error: str | None = None
    detail: str = ""


class Potential:
    """An ASE calculator plus the elements its model knows."""

    def __init__(self, name: str, calculator, elements: frozenset[str] | None):
        self.name = name
        self.calculator = calculator
        self.elements = elements  # None: any element the model can embed

    def unsupported(self, structure: Structure) -> list[str]:
        if self.elements is None:
            return []
        return sorted({el.symbol for el in structure.composition.elements} - self.elements)

    def relax(self, structure: Structure, settings: RelaxSettings) -> Relaxation:
        """FIRE on positions (and cell, via FrechetCellFilter) until fmax, max_steps or the time limit.

        Runs with one torch thread: small cells gain nothing from intra-op threads, and on a shared CPU two
        threads measured 3-10x slower per step than one; parallelism comes from worker processes.
        """
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._relax(structure, settings)
        finally:
            torch.set_num_threads(threads)

    def _relax(self, structure: Structure, settings: RelaxSettings) -> Relaxation:
        from ase.filters import FrechetCellFilter
        from ase.optimize import FIRE
        from pymatgen.io.ase import AseAtomsAdaptor

        start = time.monotonic()
        missing = self.unsupported(structure)
        if missing:
            return Relaxation(None, None, 0, False, 0.0, "unsupported_element", f"{self.name} has no {', '.join(missing)}")
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = self.calculator
        volume0 = atoms.get_volume()
        target = FrechetCellFilter(atoms) if settings.relax_cell else atoms
        steps, converged, error, detail = 0, False, None, ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimizer = FIRE(target, logfile=None)
                for converged in optimizer.irun(fmax=settings.fmax, steps=settings.max_steps):
                    steps = optimizer.nsteps
                    energy = atoms.get_potential_energy()
                    if not math.isfinite(energy) or not np.isfinite(atoms.positions).all():
                        error, detail = "nan_energy", f"non-finite energy/positions at step {steps}"
                        break
                    ratio = atoms.get_volume() / volume0
                    if not 1 / MAX_VOLUME_RATIO < ratio < MAX_VOLUME_RATIO:
                        error, detail = "exploded", f"cell volume changed {ratio:.3g}x by step {steps}"
                        break
                    if time.monotonic() - start > settings.time_limit:
                        error, detail = "timeout", f"over {settings.time_limit:g} s after {steps} steps"
                        break
        except Exception as exc:  # the model or ASE failing on one structure must not stop the others
            error, detail = "potential_failed", f"{type(exc).__name__}: {str(exc)[:160]}"
        seconds = time.monotonic() - start
        if error in ("nan_energy", "exploded", "potential_failed"):
            return Relaxation(None, None, steps, False, seconds, error, detail)
        energy_per_atom = float(atoms.get_potential_energy()) / len(atoms)
        relaxed = Structure(np.array(atoms.cell), atoms.get_chemical_symbols(), atoms.get_scaled_positions())
        return Relaxation(relaxed, energy_per_atom, steps, bool(converged) and error is None, seconds, error, detail)


def check_spec(spec: str | Path) -> None:
    """Reject a potential that cannot be loaded before any work starts (a matgl save holds model.json)."""
    from crystal_cli.errors import CrystalError

    if str(spec).lower() != CHGNET and not (Path(spec) / "model.json").is_file():
        raise CrystalError(f"{spec}: --potential must be 'chgnet' or a matgl model directory (with model.json)")


def load_potential(spec: str | Path) -> Potential:
    """'chgnet' (default, bundled weights) or a directory holding a matgl model saved with Potential.save."""
    from crystal_cli.errors import CrystalError

    check_spec(spec)
    if str(spec).lower() == CHGNET:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        # CHGNet prints its banner unconditionally; library code here returns data and never prints.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = CHGNet.load(verbose=False)
            calculator = CHGNetCalculator(model=model, use_device="cpu")
        return Potential(CHGNET, calculator, CHGNET_ELEMENTS)
    path = Path(spec)
    import matgl
    from matgl.ext.ase import PESCalculator

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = matgl.load_model(path)
    except Exception as exc:  # matgl raises many types for directories that are not saved models
        raise CrystalError(f"{path}: not a loadable matgl model directory ({str(exc)[:160]})") from None
    if not hasattr(model, "model") or not hasattr(model, "calc_stresses"):
        raise CrystalError(f"{path}: a matgl model, but not a potential (energy/forces/stresses)")
    elements = getattr(model.model, "element_types", None)
    calculator = PESCalculator(model, stress_unit="eV/A3")  # ASE filters expect eV/Å³, matgl defaults to GPa
    return Potential(f"matgl:{path.name}", calculator, frozenset(elements) if elements else None)
