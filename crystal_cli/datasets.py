"""Readers for users' crystal data: CDVAE/MP-20-style csv(.gz), split directories, CIF (single, multi-block,
or a folder of them), POSCAR/CONTCAR/.vasp, extxyz, and the jsonl that `crystal generate` writes.

Every reader yields `Entry` objects, one per row/block/frame. A row that cannot become a structure is
still yielded, with `structure=None` and a short reason code, so callers count skips instead of dying.
Whole-file problems (missing, empty, unknown format, no cif column) raise CrystalError.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pymatgen.core import Element, Structure
from pymatgen.io.cif import CifParser

from crystal_cli.codec import parse_crystal
from crystal_cli.errors import CrystalError

SPLITS = ("train", "val", "test")
# csv column -> property name used in prompts (codec.CONDITIONS) and records.
PROPERTY_COLUMNS = {
    "formation_energy_per_atom": "formation_energy_per_atom",
    "band_gap": "band_gap",
    "e_above_hull": "e_above_hull",
    "energy_above_hull": "e_above_hull",
    "spacegroup.number": "spacegroup",
    "spacegroup": "spacegroup",
}
ID_COLUMNS = ("material_id", "id", "mp_id")
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz", ".jsonl")
MIN_VOLUME = 0.1  # Å^3, the field's structural-validity floor
_CIF_BLOCK = re.compile(r"^data_", re.MULTILINE)


@dataclass
class Entry:
    """One input structure (or the reason there is none) with its id, origin and known properties."""

    id: str
    source: str
    structure: Structure | None = None
    properties: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""


def split_name(path: Path) -> str:
    """'train.csv.gz' -> 'train'; 'samples.cif' -> 'samples'; a folder -> its name."""
    name = path.name
    for suffix in (".gz", ".csv", ".cif", ".extxyz", ".xyz", ".jsonl", ".vasp"):
        name = name.removesuffix(suffix)
    return name or path.name


def _is_poscar(path: Path) -> bool:
    return path.name.upper().startswith(("POSCAR", "CONTCAR")) or path.suffix.lower() in (".vasp", ".poscar")


def _is_structure_file(path: Path) -> bool:
    return path.is_file() and (path.name.lower().endswith(STRUCTURE_SUFFIXES) or _is_poscar(path))


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def discover(path: str | Path) -> list[tuple[str, list[Path]]]:
    """The splits a path holds: [(split name, files)]. A split directory yields train/val/test."""
    path = Path(path)
    if not path.exists():
        raise CrystalError(f"{path}: no such file or directory")
    if path.is_file():
        _check_file(path)
        return [(split_name(path), [path])]
    children = sorted(p for p in path.iterdir() if p.is_file())
    by_split = [(s, [p for p in children if split_name(p) == s and (_is_csv(p) or _is_structure_file(p))]) for s in SPLITS]
    found = [(s, files) for s, files in by_split if files]
    if found:
        for _, files in found:
            for f in files:
                _check_file(f)
        return found
    structures = [p for p in children if _is_structure_file(p) or _is_csv(p)]
    if not structures:
        raise CrystalError(f"{path}: no crystal files (csv, cif, POSCAR, extxyz) in this directory")
    return [(split_name(path), structures)]


def _check_file(path: Path) -> None:
    if not (_is_csv(path) or _is_structure_file(path)):
        raise CrystalError(
            f"{path}: unknown format (expected .csv/.csv.gz with a cif column, .cif, POSCAR/.vasp, .extxyz, .jsonl)"
        )
    if path.stat().st_size == 0:
        raise CrystalError(f"{path}: file is empty")


def read_entries(files: list[Path]) -> Iterator[Entry]:
    """All entries of the given files, in order."""
    for path in files:
        yield from read_file(path)


def read_file(path: Path) -> Iterator[Entry]:
    _check_file(path)
    if _is_csv(path):
        yield from _read_csv(path)
    elif path.name.lower().endswith(".cif"):
        yield from _read_cif(path)
    elif path.name.lower().endswith((".extxyz", ".xyz")):
        yield from _read_extxyz(path)
    elif path.name.lower().endswith(".jsonl"):
        yield from _read_samples_jsonl(path)
    else:
        yield from _read_poscar(path)


def count_entries(files: list[Path]) -> int | None:
    """Cheap row count for progress bars (csv rows, CIF blocks); None when unknown."""
    total = 0
    for path in files:
        if _is_csv(path):
            total += len(_load_csv(path))
        elif path.name.lower().endswith(".cif"):
            total += len(_CIF_BLOCK.findall(path.read_text(errors="replace"))) or 1
        else:
            return None
    return total


def _load_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"material_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, gzip.BadGzipFile, EOFError,
            zlib.error, OSError) as exc:  # a cut-off .gz file ends in EOFError
        raise CrystalError(f"{path}: not a readable csv ({exc})") from None


def _read_csv(path: Path) -> Iterator[Entry]:
    frame = _load_csv(path)
    if "cif" not in frame.columns:
        raise CrystalError(f"{path}: no 'cif' column (columns: {', '.join(map(str, frame.columns))})")
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    properties = {col: name for col, name in PROPERTY_COLUMNS.items() if col in frame.columns}
    for row_number, row in enumerate(frame.to_dict("records"), start=1):
        raw_id = row.get(id_column) if id_column else None
        entry_id = str(raw_id) if raw_id is not None and not _missing(raw_id) else f"{split_name(path)}-{row_number}"
        entry = Entry(id=entry_id, source=f"{path}:{row_number}")
        for col, name in properties.items():
            value = row[col]
            if not _missing(value):
                entry.properties[name] = int(value) if name == "spacegroup" else float(value)
        cif = row["cif"]
        if _missing(cif) or not str(cif).strip():
            entry.error, entry.detail = "missing_cif", "empty cif cell"
        else:
            _fill_from_cif(entry, str(cif))
        yield entry


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fill_from_cif(entry: Entry, cif_text: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structures = CifParser(io.StringIO(cif_text)).parse_structures(primitive=False, on_error="raise")
    except Exception as exc:  # pymatgen raises ValueError/KeyError/IndexError/... for broken CIFs
        message = str(exc).strip().splitlines()
        entry.error = _cif_error_reason(cif_text, exc)
        entry.detail = message[0][:200] if message else type(exc).__name__
        return
    if not structures:
        entry.error, entry.detail = "unparseable_cif", "no structure in CIF block"
        return
    _accept(entry, structures[0])


def _cif_error_reason(cif_text: str, exc: Exception) -> str:
    symbols = re.findall(r"^\s*([A-Z][a-z]?)\d*\s+\S+\s+\d+\s+[-\d.]+", cif_text, re.MULTILINE)
    if any(not Element.is_valid_symbol(s) for s in symbols) or "element" in str(exc).lower():
        return "unknown_element"
    return "unparseable_cif"


def _accept(entry: Entry, structure: Structure) -> None:
    """Attach a parsed structure after the checks every reader shares."""
    unknown = sorted({str(sp) for sp in structure.composition if not isinstance(sp, Element)})
    if len(structure) == 0:
        entry.error, entry.detail = "empty_structure", "no sites"
    elif unknown:
        entry.error, entry.detail = "unknown_element", f"not element(s): {', '.join(unknown)}"
    elif not math.isfinite(structure.volume) or structure.volume < MIN_VOLUME:
        entry.error, entry.detail = "degenerate_lattice", f"cell volume {structure.volume:.3g} Å^3"
    elif not structure.is_ordered:
        entry.error, entry.detail = "disordered", "partial occupancies"
    else:
        entry.structure = structure


def _read_cif(path: Path) -> Iterator[Entry]:
    text = path.read_text(errors="replace")
    starts = [m.start() for m in _CIF_BLOCK.finditer(text)]
    if not starts:
        raise CrystalError(f"{path}: not a CIF file (no data_ block)")
    for number, (start, end) in enumerate(zip(starts, starts[1:] + [len(text)]), start=1):
        block = text[start:end]
        name = block.split(None, 1)[0].removeprefix("data_") or f"{path.stem}-{number}"
        entry = Entry(id=name, source=f"{path}#{number}")
        _fill_from_cif(entry, block)
        yield entry


def _read_poscar(path: Path) -> Iterator[Entry]:
    entry = Entry(id=path.stem if path.suffix else path.name, source=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen's POSCAR reader raises many types
        entry.error, entry.detail = "unparseable_poscar", str(exc)[:200]
    else:
        _accept(entry, structure)
    yield entry


def _read_extxyz(path: Path) -> Iterator[Entry]:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as exc:  # ase raises many types on malformed files
        raise CrystalError(f"{path}: not a readable extxyz file ({str(exc)[:120]})") from None
    for number, atoms in enumerate(frames, start=1):
        entry = Entry(id=str(atoms.info.get("id", f"{path.stem}-{number}")), source=f"{path}#{number}")
        if not atoms.pbc.all() or atoms.cell.volume <= 0:
            entry.error, entry.detail = "not_periodic", "frame has no 3-D periodic cell"
        else:
            _accept(entry, AseAtomsAdaptor.get_structure(atoms))
        yield entry


def _read_samples_jsonl(path: Path) -> Iterator[Entry]:
    """jsonl with a pymatgen structure dict under "structure" (crystal generate/refine --format jsonl), or
    crystal text under "text" (generate's sidecar) or "completion" (crystal encode records)."""
    with path.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                row = json.loads(line)
                content = next(row[key] for key in ("structure", "text", "completion") if key in row)
            except (json.JSONDecodeError, StopIteration, TypeError):
                yield Entry(id=f"{path.stem}-{line_number}", source=source, error="bad_jsonl_row",
                            detail="not a json object with a 'structure', 'text' or 'completion' field")
                continue
            entry = Entry(id=str(row.get("id", f"{path.stem}-{line_number}")), source=source)
            if "structure" in row:
                try:
                    _accept(entry, Structure.from_dict(content))
                except Exception as exc:  # pymatgen raises many types on malformed dicts
                    entry.error, entry.detail = "bad_structure_dict", str(exc)[:200]
                yield entry
                continue
            parsed = parse_crystal(str(content))
            if parsed.ok:
                _accept(entry, parsed.structure)
            else:
                entry.error, entry.detail = parsed.reason.value, parsed.detail
            yield entry


def read_structures(path: str | Path) -> Iterator[Entry]:
    """Every entry under a path, all splits together: the one call evaluate/refine/perplexity need."""
    for _, files in discover(path):
        yield from read_entries(files)
