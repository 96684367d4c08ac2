"""`crystal encode`: records, tasks, augmentation, exclusion, stats, recipes and the CLI's bad-input contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.cli import app
from crystal_cli.encode import TASKS, EncodeOptions, encode, load_recipe
from crystal_cli.errors import CrystalError
from tests.conftest import REPO, write_cdvae_csv

runner = CliRunner()


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unconditional_records(tmp_path, mp20_csv):
    stats = encode([(mp20_csv, None)], tmp_path / "out", EncodeOptions())
    records = read_records(tmp_path / "out" / "train.jsonl")
    assert stats["splits"]["train"]["records"] == len(records) == stats["splits"]["train"]["rows_read"]
    first = records[0]
    assert set(first) == {"id", "task", "copy", "prompt", "completion", "formula", "spacegroup", "n_atoms", "source"}
    assert first["task"] == "unconditional" and first["prompt"] == codec.unconditional_prompt()
    parsed = codec.parse_crystal(first["completion"])
    assert parsed.ok and len(parsed.structure) == first["n_atoms"]
    assert parsed.structure.composition.reduced_formula == first["formula"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_every_task(tmp_path, structures):
    csv = write_cdvae_csv(tmp_path / "train.csv", structures)
    encode([(csv, None)], tmp_path / "out", EncodeOptions(tasks=TASKS, seed=3))
    records = read_records(tmp_path / "out" / "train.jsonl")
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    assert set(by_task) == set(TASKS)
    nacl = {r["task"]: r for r in records if r["formula"] == "NaCl"}
    assert "The chemical formula is NaCl. " in nacl["formula"]["prompt"]
    assert "The spacegroup number is 225. " in nacl["spacegroup"]["prompt"]
    assert "The energy above the convex hull is 0.0. " in nacl["stability"]["prompt"]
    assert nacl["infill"]["completion"] in ("Na", "Cl")
    assert codec.MASK in nacl["infill"]["prompt"]
    assert "Si" not in {r["formula"] for r in by_task["infill"]}  # one element: nothing to infill
    for r in by_task["conditional"]:
        assert r["prompt"].startswith(codec.PROMPT_HEADER) and r["prompt"] != codec.unconditional_prompt()


def test_augmentation_and_determinism(tmp_path, structures):
    csv = write_cdvae_csv(tmp_path / "train.csv", structures)
    options = EncodeOptions(tasks=("unconditional", "conditional"), augment=2, seed=1)
    encode([(csv, None)], tmp_path / "a", options)
    encode([(csv, None)], tmp_path / "b", options)
    a = (tmp_path / "a" / "train.jsonl").read_text()
    assert a == (tmp_path / "b" / "train.jsonl").read_text()
    records = read_records(tmp_path / "a" / "train.jsonl")
    assert len(records) == len(structures) * 3 * 2
    texts = {r["completion"] for r in records if r["formula"] == "ZnO"}
    assert len(texts) == 3


def test_exclusion_max_atoms_and_val_split(tmp_path, structures):
    csv = write_cdvae_csv(tmp_path / "train.csv", structures)
    options = EncodeOptions(exclude_ids=frozenset({"mp-0"}), max_atoms=6, val_fraction=0.5, seed=0)
    stats = encode([(csv, None)], tmp_path / "out", options)
    ids = {r["id"] for split in ("train", "val") if (tmp_path / "out" / f"{split}.jsonl").exists()
           for r in read_records(tmp_path / "out" / f"{split}.jsonl")}
    skipped = {k: v for s in stats["splits"].values() for k, v in s["skipped"].items()}
    assert "mp-0" not in ids and skipped["excluded_id"] == 1
    assert skipped["too_many_atoms"] == 2  # 8-site conventional Si and the 7-site LiFePO4-like cell
    assert set(stats["splits"]) == {"train", "val"}


def test_nothing_encoded_raises(tmp_path, structures):
    csv = write_cdvae_csv(tmp_path / "train.csv", structures)
    with pytest.raises(CrystalError, match="nothing was encoded"):
        encode([(csv, None)], tmp_path / "out", EncodeOptions(max_atoms=1))
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_recipe_validation(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('output = "x"\ninputs = []\ntaks = ["formula"]\n')
    with pytest.raises(CrystalError, match="unknown key"):
        load_recipe(bad)
    inputs, output, options = load_recipe(REPO / "training" / "data" / "mp20-open.toml")
    assert options.max_atoms == 20 and options.val_fraction == 0.05 and options.exclude_in == ("train", "val")
    assert [split for _, split in inputs] == ["train", "train", "train", "train", "test"]


def test_cli_encode_with_bad_rows(tmp_path, structures):
    rows = [{"material_id": "broken", "cif": "data_x\n_cell_length_a 4\n"}]
    csv = write_cdvae_csv(tmp_path / "train.csv", structures, extra_rows=rows)
    result = runner.invoke(app, ["encode", str(csv), "-o", str(tmp_path / "out"), "-t", "formula"])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["splits"]["train"]["records"] == len(structures)
    assert stats["splits"]["train"]["skipped"] == {"unparseable_cif": 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encode", "does/not/exist.csv", "-o", "OUT"], "no such file"),
        (["encode", "EMPTY", "-o", "OUT"], "file is empty"),
        (["encode", "WEIRD", "-o", "OUT"], "unknown format"),
        (["encode", "CSV", "-o", "OUT", "--task", "poetry"], "unknown task"),
        (["encode", "CSV", "-o", "OUT", "--max-atoms", "1"], "nothing was encoded"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, structures, args, message):
    (tmp_path / "EMPTY.cif").write_text("")
    (tmp_path / "WEIRD.h5").write_bytes(b"\x89HDF")
    csv = write_cdvae_csv(tmp_path / "train.csv", structures)
    paths = {"EMPTY": str(tmp_path / "EMPTY.cif"), "WEIRD": str(tmp_path / "WEIRD.h5"), "CSV": str(csv),
             "OUT": str(tmp_path / "out")}
    result = runner.invoke(app, [paths.get(a, a) for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_console_script_version_and_help():
    exe = [sys.executable, "-m", "crystal_cli.cli"]
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip().startswith("crystal 0.")
    help_text = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "encode" in help_text
