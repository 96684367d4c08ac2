"""Writing structures and per-item logs the way long jobs need: append-as-you-go, never half-written.

A multi-block CIF is appended one complete block at a time (flushed), so a killed run leaves a valid file of
what finished; whole-file outputs go through runs.atomic_path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from crystal_cli.runs import atomic_path, write_text

FORMATS = ("cif", "extxyz", "jsonl", "poscar")


def safe_name(name: str) -> str:
    """`name` with spaces and other separators replaced, so CIF readers and file systems accept it."""
    return "".join(ch if ch.isalnum() or ch in "-_.()~" else "_" for ch in name) or "structure"


def cif_block(structure: Structure, name: str, symprec: float | None = None) -> str:
    """One CIF data block named `name`: P1 with every site, or with `symprec` the symmetry-refined
    (conventional) cell with its space group's operations (spglib through pymatgen)."""
    text = str(CifWriter(structure, symprec=symprec))
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("data_"):
            lines[i] = f"data_{safe_name(name)}"
            break
    return "\n".join(lines).rstrip() + "\n\n"


def cif_reads_back(block: str, structure: Structure, symmetrized: bool = False) -> bool:
    """Does pymatgen read this CIF block back as one structure with every site of `structure` (a symmetrized
    block: with its composition; the refined cell may hold more formula units)?"""
    import io
    import warnings

    from pymatgen.io.cif import CifParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structures = CifParser(io.StringIO(block)).parse_structures(primitive=False, on_error="raise")
    except Exception:  # pymatgen raises ValueError and others for blocks it rejects
        return False
    if len(structures) != 1:
        return False
    if symmetrized:
        return structures[0].composition.reduced_composition == structure.composition.reduced_composition
    return len(structures[0]) == len(structure)


def extxyz_frame(structure: Structure, name: str) -> str:
    """One extxyz frame with the lattice and pbc, `id` stored in the comment line."""
    import io

    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.info["id"] = name
    buffer = io.StringIO()
    write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def structure_record(structure: Structure, name: str) -> str:
    return json.dumps({"id": name, "structure": structure.as_dict()}) + "\n"


def poscar_text(structure: Structure, name: str) -> str:
    """A POSCAR (VASP 5, element names line) whose comment line is the structure's name."""
    from pymatgen.io.vasp import Poscar

    return Poscar(structure, comment=name).get_str()


SUFFIXES = {"cif": "cif", "extxyz": "extxyz", "xyz": "extxyz", "jsonl": "jsonl"}


def format_for(path: Path, fmt: str | None = None) -> str:
    """The output format: explicit, else from the file suffix (.cif, .extxyz/.xyz, .jsonl; none: cif). Any
    other suffix is a ValueError: a .vasp or .poscar file must not silently receive CIF text (POSCARs are
    written one file per structure into a directory: --format poscar)."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix and suffix not in SUFFIXES:
        raise ValueError(f"{path}: cannot write .{suffix} files; name the output .cif, .extxyz, .xyz or .jsonl "
                         "(or --format poscar: a directory of POSCAR files)")
    return SUFFIXES.get(suffix, "cif")


class UniqueNames:
    """The names one run gives its records: an id seen before becomes ID~2, ID~3 ... Uniqueness is decided on
    the written form (safe_name), since that is what becomes a CIF block or a POSCAR file name: "a b" and "a_b"
    (or a literal "a~2" after two "a") would otherwise land on one file and the second would replace the first."""

    def __init__(self) -> None:
        self._count: Counter = Counter()
        self._used: set[str] = set()

    def __call__(self, name: str) -> str:
        self._count[name] += 1
        candidate = name if self._count[name] == 1 else f"{name}~{self._count[name]}"
        while safe_name(candidate) in self._used:
            self._count[name] += 1
            candidate = f"{name}~{self._count[name]}"
        self._used.add(safe_name(candidate))
        return candidate


POSCAR_SUFFIX = ".vasp"  # what datasets.read_structures recognises as a POSCAR inside a directory


def poscar_path(directory: str | Path, name: str) -> Path:
    """The file a record named `name` (already unique within its run) gets in a POSCAR directory."""
    return Path(directory) / f"{safe_name(name)}{POSCAR_SUFFIX}"


class StructureAppender:
    """Appends complete structure records to one file (POSCAR: one file each into a directory), flushing
    after each, so partial runs stay valid. Names are made unique within the run (NAME~2, NAME~3 ...): no two
    blocks or files of one run share a name. A resumed run passes the names it already appended as `taken`,
    so its next repeat of an id continues the numbering instead of replacing an earlier record's file."""

    def __init__(self, path: str | Path, fmt: str | None = None, mode: str = "a", symprec: float | None = None,
                 taken: Iterable[str] = ()):
        self.path = Path(path)
        self.fmt = format_for(self.path, fmt)
        self.symprec = symprec
        self._unique = UniqueNames()
        for name in taken:
            self._unique(name)
        if self.fmt == "poscar":
            self.path.mkdir(parents=True, exist_ok=True)
            self._handle: IO[str] | None = None
        else:
            self._handle = self.path.open(mode)

    def append(self, structure: Structure, name: str) -> bool:
        """Write one record; False (nothing written) when it is a CIF block pymatgen would not read back with
        every site (it merges overlapping sites into one with occupancy > 1): a run's CIF never holds a block
        its readers reject. The caller says so; jsonl, extxyz and POSCAR keep every structure."""
        name = self._unique(name)
        if self.fmt == "poscar":
            write_text(poscar_path(self.path, name), poscar_text(structure, name))
            return True
        if self.fmt == "cif":
            text = cif_block(structure, name, self.symprec)
            if not cif_reads_back(text, structure, self.symprec is not None):
                return False
        else:
            text = _WRITERS[self.fmt](structure, name)
        self._handle.write(text)
        self._handle.flush()
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> StructureAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_WRITERS = {"extxyz": extxyz_frame, "jsonl": structure_record}


def write_structures(path: str | Path, named: Iterable[tuple[str, Structure]], fmt: str | None = None,
                     symprec: float | None = None) -> int:
    """Write all structures to `path` atomically (temporary file + rename; POSCAR: each file). Returns how
    many were written (CIF blocks pymatgen would not read back are left out; see StructureAppender.append)."""
    path = Path(path)
    fmt = format_for(path, fmt)
    if fmt == "poscar":
        with StructureAppender(path, fmt) as out:
            return sum(out.append(structure, name) for name, structure in named)
    count = 0
    with atomic_path(path) as tmp, StructureAppender(tmp, fmt, mode="w", symprec=symprec) as out:
        for name, structure in named:
            count += out.append(structure, name)
    return count


_RECORD_START = {"cif": re.compile(r"^data_", re.MULTILINE), "jsonl": re.compile(r"^\{", re.MULTILINE)}


def record_starts(text: str, fmt: str) -> list[int]:
    """Character offsets at which the records of a cif, jsonl or extxyz file StructureAppender wrote begin:
    how a resumed run cuts its output back to the records its log vouches for. An extxyz frame is its atom
    count line, a comment line and that many atom lines (no marker a pattern could find), so it is counted."""
    if fmt != "extxyz":
        return [match.start() for match in _RECORD_START[fmt].finditer(text)]
    lines = text.splitlines(keepends=True)
    starts: list[int] = []
    offset = line = 0
    while line < len(lines) and lines[line].strip().isdigit():
        starts.append(offset)
        frame = lines[line:line + int(lines[line]) + 2]  # a frame torn by a kill still starts here
        offset += sum(len(part) for part in frame)
        line += len(frame)
    return starts


def remove_structures(path: str | Path, fmt: str) -> None:
    """Remove what StructureAppender writes at `path` when a run starts over: the file, or the POSCAR files
    of a directory (anything else a user keeps in that directory stays)."""
    path = Path(path)
    if fmt != "poscar":
        path.unlink(missing_ok=True)
    elif path.is_dir():
        for file in path.glob(f"*{POSCAR_SUFFIX}"):
            file.unlink()


def structure_fingerprint(structure: Structure) -> str:
    """A short content hash of a structure (species, lattice and wrapped coordinates to 1e-6): how a resumed
    log checks that row i still describes the same input structure."""
    frac = np.round(np.mod(structure.frac_coords, 1.0), 6) % 1.0 + 0.0  # + 0.0 turns -0.0 into 0.0
    key = json.dumps([[str(site.specie) for site in structure],
                      (np.round(structure.lattice.matrix, 6) + 0.0).tolist(), frac.tolist()])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def append_jsonl(handle: IO[str], row: dict) -> None:
    """One json object per line, flushed: the log format of every long job."""
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a torn last line (killed mid-write) is ignored."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
