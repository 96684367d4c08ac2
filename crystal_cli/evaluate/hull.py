"""A convex hull of reference formation energies in the Materials Project frame, stored as plain JSON.

Frame: a compound's formation energy per atom is E/atom − Σ x_i·μ_i with μ_i the energy per atom of MP's
elemental reference entries, so elements sit at 0 and MP's (MP-20's) formation energies can be used as they
are. A potential's relaxed energy is put into the same frame with the same μ_i (measured: CHGNet's energies
reproduce MP formation energies this way; see bench/calibrate_hull.py and the README).

Only the lowest formation energy per reduced formula matters for a hull, so that is all the file keeps. Phase
diagrams are built lazily per chemical system with pymatgen's PhaseDiagram (a single 89-element diagram is not
computable) and cached.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from crystal_cli.errors import CrystalError
from crystal_cli.runs import atomic_path

FORMAT = "crystal-hull"
VERSION = 1
FORMULA_COLUMNS = ("pretty_formula", "formula", "reduced_formula", "composition")
ENERGY_COLUMNS = ("formation_energy_per_atom", "e_form_per_atom", "formation_energy")
_FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+'?([^'\n]+?)'?\s*$", re.MULTILINE)


class ElementNotInHull(KeyError):
    """The composition has an element the hull has no reference energy for."""


@dataclass
class BuildStats:
    rows_read: int = 0
    rows_used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class Hull:
    """Elemental reference energies (eV/atom) and the lowest formation energy (eV/atom) per reduced formula."""

    def __init__(self, elemental_energies: dict[str, float], entries: dict[str, tuple[float, str]],
                 sources: list[str] | None = None):
        self.elemental_energies = dict(elemental_energies)
        self.entries = dict(entries)
        self.sources = list(sources or [])
        self._elements_of = {f: frozenset(Composition(f).chemical_system.split("-")) for f in self.entries}
        self._diagram = lru_cache(maxsize=4096)(self._build_diagram)

    # ------------------------------------------------------------------------------------------- energies
    def formation_energy_per_atom(self, composition: Composition, energy_per_atom: float) -> float:
        """A potential's energy per atom moved into the hull's frame (elements at 0)."""
        self._require(composition)
        fractions = composition.fractional_composition
        return energy_per_atom - sum(fractions[el] * self.elemental_energies[el.symbol] for el in fractions)

    def e_above_hull(self, composition: Composition, formation_energy_per_atom: float) -> float:
        """Distance to the hull in eV/atom; negative below it (the structure would extend the hull)."""
        self._require(composition)
        chemsys = frozenset(el.symbol for el in composition.elements)
        diagram = self._diagram(chemsys)
        entry = PDEntry(composition, formation_energy_per_atom * composition.num_atoms)
        _, e_hull = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
        return float(e_hull)

    def _require(self, composition: Composition) -> None:
        missing = [el.symbol for el in composition.elements if el.symbol not in self.elemental_energies]
        if missing:
            raise ElementNotInHull(", ".join(missing))

    def reference_entries(self, chemsys: frozenset[str]) -> list[PDEntry]:
        """The hull's entries inside one chemical system (elements at 0, the frame's zero), for phase diagrams."""
        entries = [PDEntry(Composition(el), 0.0, name=el) for el in sorted(chemsys)]
        for formula, (energy, _) in self.entries.items():
            if self._elements_of[formula] <= chemsys:
                composition = Composition(formula)
                entries.append(PDEntry(composition, energy * composition.num_atoms, name=formula))
        return entries

    def _build_diagram(self, chemsys: frozenset[str]) -> PhaseDiagram:
        return PhaseDiagram(self.reference_entries(chemsys))

    # ----------------------------------------------------------------------------------------- persistence
    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "frame": "formation energy per atom (eV/atom) relative to MP elemental reference entries",
            "sources": self.sources,
            "elemental_energies": self.elemental_energies,
            "entries": [{"formula": f, "formation_energy_per_atom": e, "id": i} for f, (e, i) in sorted(self.entries.items())],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.as_dict(), indent=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            if path.name.endswith(".gz"):
                with gzip.open(tmp, "wt") as handle:
                    handle.write(text)
            else:
                tmp.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Hull:
        path = Path(path)
        if not path.is_file():
            raise CrystalError(f"{path}: no such hull file (build one with `crystal hull build -o {path}`)")
        try:
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt") as handle:
                data = json.load(handle)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            entries = {row["formula"]: (float(row["formation_energy_per_atom"]), str(row.get("id", "")))
                       for row in data["entries"]}
            elemental = {el: float(e) for el, e in data["elemental_energies"].items()}
        except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:  # EOFError: a cut-off .gz
            raise CrystalError(f"{path}: not a crystal hull file ({exc})") from None
        return cls(elemental, entries, data.get("sources", []))


# -------------------------------------------------------------------------------------------------- build


def load_elemental_references(path: str | Path) -> dict[str, float]:
    """Energy per atom of each element's MP reference entry (a json(.gz) dict or list of ComputedEntries)."""
    from pymatgen.entries.computed_entries import ComputedEntry

    path = Path(path)
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt") as handle:
            data = json.load(handle)
        rows = data.values() if isinstance(data, dict) else data
        energies: dict[str, float] = {}
        for row in rows:
            entry = ComputedEntry.from_dict(row)
            if not entry.composition.is_element:
                raise ValueError(f"entry {entry.entry_id} ({entry.composition.reduced_formula}) is not an element")
            symbol = entry.composition.elements[0].symbol
            energies[symbol] = min(energies.get(symbol, math.inf), entry.energy_per_atom)
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:  # EOFError: a cut-off .gz
        raise CrystalError(f"{path}: not a file of elemental reference entries ({exc})") from None
    return energies


def _read_table(path: Path):
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype={"material_id": str})
    except Exception as exc:  # pandas/pyarrow raise many types on unreadable files
        raise CrystalError(f"{path}: not a readable csv/parquet table ({exc})") from None


def _row_formula(row: dict, formula_column: str | None) -> str | None:
    if formula_column is not None and isinstance(row.get(formula_column), str):
        return row[formula_column]
    cif = row.get("cif")
    if isinstance(cif, str):
        match = _FORMULA_SUM.search(cif)
        if match:
            return match.group(1)
    return None


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Where `crystal hull build -o` may write: a new file, or a crystal hull file (rebuilt in place); any
    other existing file only with overwrite."""
    from crystal_cli.runs import file_output

    path = file_output(path, "-o")
    if path.exists() and not overwrite:
        try:
            Hull.load(path)
        except CrystalError:
            raise CrystalError(f"{path}: exists and is not a crystal hull file; pass --overwrite to replace it, or "
                               "choose another -o") from None
    return path


def default_tables() -> list[Path]:
    """The tables `crystal hull build` reads when given none: the near-hull MP-20 parquet and the MP-20 and
    MPTS-52 csvs of the founders' data (files.shared_data)."""
    from crystal_cli.files import shared_data

    tables = [shared_data("hull", "mp20_near_hull.parquet")] + sorted(
        p for folder in ("mp_20", "mpts_52") for p in shared_data(folder).glob("*.csv.gz"))
    if len(tables) == 1 or not all(p.exists() for p in tables):
        raise CrystalError(f"no default hull data under {shared_data()} (set CRYSTAL_SHARED_DATA or give TABLES)")
    return tables


def default_elements() -> Path:
    """MP's elemental reference entries in the founders' data: the frame's zero when none are given."""
    from crystal_cli.files import shared_data

    return shared_data("hull", "mp_elemental_reference_entries.json.gz")


def build_hull(tables: Iterable[str | Path], elemental_references: str | Path, stats: BuildStats | None = None) -> Hull:
    """A hull from tables of formation energies (formula or cif column + formation energy per atom)."""
    stats = stats if stats is not None else BuildStats()
    with warnings.catch_warnings():  # pymatgen warns about noble-gas electronegativities for every formula
        warnings.simplefilter("ignore")
        return _build_hull(tables, elemental_references, stats)


def _build_hull(tables: Iterable[str | Path], elemental_references: str | Path, stats: BuildStats) -> Hull:
    elemental = load_elemental_references(elemental_references)
    lowest: dict[str, tuple[float, str]] = {}
    sources = [str(elemental_references)]
    for path in map(Path, tables):
        if not path.is_file():
            raise CrystalError(f"{path}: no such file")
        frame = _read_table(path)
        energy_column = next((c for c in ENERGY_COLUMNS if c in frame.columns), None)
        formula_column = next((c for c in FORMULA_COLUMNS if c in frame.columns), None)
        if energy_column is None or (formula_column is None and "cif" not in frame.columns):
            raise CrystalError(
                f"{path}: needs a formation energy column ({', '.join(ENERGY_COLUMNS)}) and a formula column "
                f"({', '.join(FORMULA_COLUMNS)}) or a cif column"
            )
        sources.append(str(path))
        id_column = "material_id" if "material_id" in frame.columns else None
        for number, row in enumerate(frame.to_dict("records"), start=1):
            stats.rows_read += 1
            energy = row[energy_column]
            formula = _row_formula(row, formula_column)
            if formula is None or not isinstance(energy, (int, float)) or not math.isfinite(energy):
                stats.skip("missing_formula_or_energy")
                continue
            try:
                composition = Composition(formula)
            except Exception:  # malformed formula strings
                stats.skip("bad_formula")
                continue
            if any(el.symbol not in elemental for el in composition.elements):
                stats.skip("element_without_reference")
                continue
            stats.rows_used += 1
            key = composition.reduced_formula
            row_id = str(row[id_column]) if id_column else f"{path.name}:{number}"
            if key not in lowest or energy < lowest[key][0]:
                lowest[key] = (float(energy), row_id)
    if not lowest:
        raise CrystalError("no usable formation energies in the given tables")
    return Hull(elemental, lowest, sources)

