"""Shared fixtures. Real data from ../shared/data when it is present, small generated data otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crystal_cli.files import shared_data
from crystal_cli.runtime import configure_process

configure_process()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data()  # $CRYSTAL_SHARED_DATA, else ../shared/data beside the checkout
os.environ.setdefault("CRYSTAL_CACHE", str(REPO / ".cache" / "crystal"))  # converted bases, kept across runs


def shared(*parts: str) -> Path | None:
    """A path under ../shared/data, or None when the founders' data is not beside this checkout."""
    path = SHARED_DATA.joinpath(*parts)
    return path if path.exists() else None


def require_shared(*parts: str) -> Path:
    """A path under ../shared/data for tests about the real data: skipped on a user's checkout without it,
    but a failure under CI, where the data is always beside the clone and a skip would hide a broken setup."""
    path = shared(*parts)
    if path is None:
        unavailable(f"{SHARED_DATA.joinpath(*parts)} is missing", "CI must run with ../shared beside the clone")
    return path


def unavailable(message: str, ci_rule: str) -> None:
    """Skip a test whose prerequisite this machine lacks, on a user's checkout; under CI (which sets CI) fail
    instead, naming `ci_rule`: there the prerequisite is part of the setup and a skip would hide it broken."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} ({ci_rule})")
    pytest.skip(message)


def simple_structures():
    """A handful of real, ordered crystals built with pymatgen (no files needed)."""
    from pymatgen.core import Lattice, Structure

    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    shifted = [[(x + 0.5) % 1, y, z] for x, y, z in fcc]
    quarter = [[x + 0.25, y + 0.25, z + 0.25] for x, y, z in fcc]
    # Conventional cells written out: Structure.from_spacegroup costs ~10 s per call in pymatgen 2026.
    return {
        "NaCl": Structure(Lattice.cubic(5.69), ["Na"] * 4 + ["Cl"] * 4, fcc + shifted),
        "Si": Structure(Lattice.cubic(5.43), ["Si"] * 8, fcc + quarter),
        "LiFePO4-like": Structure(
            Lattice.from_parameters(10.3, 6.0, 4.7, 90, 90, 90),
            ["Li", "Fe", "P", "O", "O", "O", "O"],
            [[0, 0, 0], [0.28, 0.25, 0.97], [0.09, 0.25, 0.42], [0.1, 0.25, 0.74], [0.46, 0.25, 0.21],
             [0.17, 0.05, 0.28], [0.17, 0.45, 0.28]],
        ),
        "CsCl": Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "ZnO-hex": Structure(
            Lattice.hexagonal(3.25, 5.21), ["Zn", "Zn", "O", "O"],
            [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38], [2 / 3, 1 / 3, 0.88]],
        ),
    }


def write_cdvae_csv(path: Path, structures: dict, extra_rows: list[dict] | None = None) -> Path:
    """A small MP-20-style csv (same columns as CDVAE's) from pymatgen structures."""
    import pandas as pd
    from pymatgen.io.cif import CifWriter

    rows = [
        {
            "material_id": f"mp-{i}",
            "formation_energy_per_atom": -1.0 - 0.1 * i,
            "band_gap": 0.5 * i,
            "pretty_formula": s.composition.reduced_formula,
            "e_above_hull": 0.01 * i,
            "elements": str(sorted(s.composition.get_el_amt_dict())),
            "cif": str(CifWriter(s)),
            "spacegroup.number": s.get_space_group_info(symprec=0.1)[1],
        }
        for i, s in enumerate(structures.values())
    ]
    rows += extra_rows or []
    pd.DataFrame(rows).to_csv(path)
    return path


@pytest.fixture
def structures():
    return simple_structures()


@pytest.fixture
def mp20_csv(tmp_path) -> Path:
    """Real MP-20 train rows when available (first 40), else a generated CDVAE-style csv."""
    real = shared("mp_20", "train.csv.gz")
    if real is not None:
        import pandas as pd

        out = tmp_path / "train.csv"
        pd.read_csv(real, nrows=40).to_csv(out, index=False)
        return out
    return write_cdvae_csv(tmp_path / "train.csv", simple_structures())
