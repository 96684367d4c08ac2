"""Dataset readers: csv(.gz), split dirs, CIF files/folders/multi-block, POSCAR, extxyz, generate jsonl."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from crystal_cli import codec
from crystal_cli.datasets import discover, read_structures
from crystal_cli.errors import CrystalError
from crystal_cli.structure_io import write_structures
from tests.conftest import require_shared, write_cdvae_csv


def test_real_mp20_csv_reads_every_row():
    path = require_shared("mp_20", "train.csv.gz")
    entries = list(read_structures(path))
    assert len(entries) == 1000
    assert all(e.structure is not None for e in entries)
    first = entries[0]
    assert first.id == "mp-1221227" and first.structure.composition.reduced_formula == "Na3MnCoNiO6"
    assert first.properties["spacegroup"] == 8 and first.source.endswith("train.csv.gz:1")
    assert set(first.properties) == {"formation_energy_per_atom", "band_gap", "e_above_hull", "spacegroup"}


def test_csv_gz_and_missing_property_columns(tmp_path, structures):
    csv = write_cdvae_csv(tmp_path / "x.csv", structures)
    import pandas as pd

    frame = pd.read_csv(csv).drop(columns=["band_gap", "e_above_hull", "spacegroup.number"])
    gz = tmp_path / "plain.csv.gz"
    with gzip.open(gz, "wt") as handle:
        frame.to_csv(handle, index=False)
    entries = list(read_structures(gz))
    assert [e.id for e in entries] == [f"mp-{i}" for i in range(len(structures))]
    assert all(set(e.properties) == {"formation_energy_per_atom"} for e in entries)


def test_bad_rows_are_counted_not_fatal(tmp_path, structures):
    broken = str(CifWriter(structures["NaCl"])).replace("_cell_length_a", "_cell_length_q")
    unknown = str(CifWriter(structures["CsCl"])).replace("Cs ", "Qq ").replace("Cs0", "Qq0")
    flat = str(CifWriter(structures["CsCl"])).replace("_cell_length_c   4.12000000", "_cell_length_c   0.0")
    rows = [
        {"material_id": "broken", "cif": broken},
        {"material_id": "unknown", "cif": unknown},
        {"material_id": "flat", "cif": flat},
        {"material_id": "empty", "cif": ""},
    ]
    csv = write_cdvae_csv(tmp_path / "mixed.csv", {"Si": structures["Si"]}, extra_rows=rows)
    entries = {e.id: e for e in read_structures(csv)}
    assert entries["mp-0"].structure is not None
    assert entries["broken"].error == "unparseable_cif"
    assert entries["unknown"].error == "unknown_element"
    assert entries["flat"].error == "unparseable_cif"  # pymatgen parses no structure from a zero-length cell
    assert entries["empty"].error == "missing_cif"
    assert all(e.detail for e in entries.values() if e.error)


def test_split_directory(tmp_path, structures):
    for split in ("train", "val", "test"):
        write_cdvae_csv(tmp_path / f"{split}.csv", structures)
    (tmp_path / "README.md").write_text("ignored")
    assert [s for s, _ in discover(tmp_path)] == ["train", "val", "test"]


def test_cif_folder_multiblock_poscar_extxyz(tmp_path, structures):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for name, s in structures.items():
        CifWriter(s).write_file(folder / f"{name}.cif")
    assert discover(folder)[0][0] == "cifs"
    assert sorted(e.structure.composition.reduced_formula for e in read_structures(folder)) == sorted(
        s.composition.reduced_formula for s in structures.values()
    )

    multi = tmp_path / "samples.cif"
    write_structures(multi, structures.items())
    entries = list(read_structures(multi))
    assert [e.id for e in entries] == list(structures)
    assert [len(e.structure) for e in entries] == [len(s) for s in structures.values()]

    poscar = tmp_path / "POSCAR"
    Poscar(structures["ZnO-hex"]).write_file(poscar)
    (entry,) = read_structures(poscar)
    assert entry.structure.composition.reduced_formula == "ZnO"

    xyz = tmp_path / "frames.extxyz"
    write_structures(xyz, structures.items())
    entries = list(read_structures(xyz))
    assert [e.id for e in entries] == list(structures)
    assert entries[2].structure.composition == structures["LiFePO4-like"].composition


def test_generate_jsonl_parse_failures_carry_reasons(tmp_path, structures):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"id": "ok", "text": codec.encode_structure(structures["NaCl"])},
        {"id": "bad", "text": "4.0 4.0 4.0\n90 90 90\nXx\n0 0 0"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    entries = list(read_structures(path))
    assert entries[0].structure is not None
    assert entries[1].error == "unknown_element"
    assert entries[2].error == "bad_jsonl_row"


def test_structure_jsonl_keeps_overlapping_sites_that_cif_would_merge(tmp_path, structures):
    """generate/refine --format jsonl write pymatgen dicts; they read back site for site, including a raw
    sample whose atoms overlap (a CIF reader merges or rejects those, hiding what the sampler produced)."""
    from pymatgen.core import Structure

    crowded = Structure(structures["NaCl"].lattice, ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.501]])
    path = tmp_path / "refined.jsonl"
    write_structures(path, [("nacl", structures["NaCl"]), ("crowded", crowded)])
    with path.open("a") as handle:
        handle.write(json.dumps({"id": "broken", "structure": {"lattice": "nonsense"}}) + "\n")
    entries = list(read_structures(path))
    assert [e.id for e in entries] == ["nacl", "crowded", "broken"]
    assert entries[0].structure == structures["NaCl"]
    assert len(entries[1].structure) == 3 and entries[1].structure.composition.reduced_formula == "NaCl2"
    assert entries[2].structure is None and entries[2].error == "bad_structure_dict"


@pytest.mark.parametrize("kind", ["missing", "empty", "unknown", "nocif", "emptydir"])
def test_whole_file_problems_raise_one_line(tmp_path, kind):
    path = tmp_path / {"missing": "nope.csv", "empty": "empty.cif", "unknown": "data.parquet",
                       "nocif": "x.csv", "emptydir": "d"}[kind]
    if kind == "empty":
        path.write_text("")
    elif kind == "unknown":
        path.write_bytes(b"PAR1")
    elif kind == "nocif":
        path.write_text("material_id,formula\nmp-1,NaCl\n")
    elif kind == "emptydir":
        path.mkdir()
    with pytest.raises(CrystalError) as info:
        list(read_structures(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_shared_split_directory_layout():
    root = require_shared("mp_20")
    assert [(s, [f.name for f in files]) for s, files in discover(root)] == [
        ("train", ["train.csv.gz"]), ("val", ["val.csv.gz"]), ("test", ["test.csv.gz"])
    ]


def test_copy_of_split_dir_with_cif_files(tmp_path, structures):
    """A user's own split layout made of multi-block CIFs works like the csv one."""
    for split in ("train", "test"):
        write_structures(tmp_path / f"{split}.cif", structures.items())
    shutil.copy(tmp_path / "train.cif", tmp_path / "notes.cif")
    assert [s for s, _ in discover(tmp_path)] == ["train", "test"]
