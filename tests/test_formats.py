"""The files materials scientists open: POSCAR directories and extxyz round-trip through `crystal evaluate`,
symmetry-refined CIFs keep the space group, no two blocks or files of one run share a name, and the report
states every denominator (report.json always lands in -o)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crystal_cli.cli import app
from crystal_cli.datasets import read_structures
from crystal_cli.structure_io import read_jsonl, write_structures
from tests.conftest import simple_structures

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    from crystal_cli.export import cached_export

    return cached_export("tiny", "f16")


@pytest.mark.parametrize("fmt, output", [("poscar", "poscars"), ("extxyz", "samples.extxyz")])
def test_generated_structures_round_trip_through_evaluate(tiny_gguf, tmp_path, fmt, output):
    out = tmp_path / output
    result = runner.invoke(app, ["generate", "-m", str(tiny_gguf), "-o", str(out), "--format", fmt, "-n", "4",
                                 "--parallel", "4", "--threads", "1", "--max-atoms", "6", "--temperature", "1.0"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out.with_suffix(".jsonl"))
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    entries = {e.id: e for e in read_structures(out)}
    assert set(entries) == set(ok) and len(ok) == 4  # every sample, named by its id
    if fmt == "poscar":
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.vasp" for i in ok)
    from crystal_cli import codec

    for name, entry in entries.items():
        expected = codec.parse_crystal(ok[name]["text"]).structure
        assert entry.structure.composition == expected.composition and len(entry.structure) == len(expected)
    result = runner.invoke(app, ["evaluate", str(out), "--no-stability", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["structures"] == 4
    # --overwrite starts over in place: a POSCAR directory loses its old samples (none left behind), not itself
    result = runner.invoke(app, ["generate", "-m", str(tiny_gguf), "-o", str(out), "--format", fmt, "-n", "2",
                                 "--parallel", "2", "--threads", "1", "--max-atoms", "6", "--temperature", "1.0",
                                 "--seed", "5", "--overwrite"])
    assert result.exit_code == 0, result.output
    ok = [r["id"] for r in read_jsonl(out.with_suffix(".jsonl")) if r["status"] == "ok"]
    assert len(ok) == 2 and sorted(e.id for e in read_structures(out)) == sorted(ok)


def test_symmetrized_cif_of_rock_salt_reads_back_as_space_group_225(tiny_gguf, tmp_path):
    rock_salt = simple_structures()["NaCl"].get_primitive_structure()
    assert write_structures(tmp_path / "nacl.cif", [("nacl", rock_salt)], symprec=0.1) == 1
    (entry,) = read_structures(tmp_path / "nacl.cif")
    assert entry.structure.get_space_group_info(symprec=0.1)[1] == 225
    assert "_symmetry_space_group_name_H-M   Fm-3m" in (tmp_path / "nacl.cif").read_text()
    result = runner.invoke(app, ["generate", "-m", str(tiny_gguf), "-o", str(tmp_path / "sym.cif"), "-n", "3",
                                 "--parallel", "3", "--threads", "1", "--max-atoms", "6", "--symmetrize", "0.1"])
    assert result.exit_code == 0, result.output
    from crystal_cli import codec

    texts = {r["id"]: r["text"] for r in read_jsonl(tmp_path / "sym.jsonl")}
    entries = list(read_structures(tmp_path / "sym.cif"))  # the guard keeps atoms apart: every block reads back
    assert len(entries) == 3 and "_symmetry_equiv_pos_as_xyz" in (tmp_path / "sym.cif").read_text()
    for entry in entries:
        written = codec.parse_crystal(texts[entry.id]).structure.composition.reduced_composition
        assert entry.structure.composition.reduced_composition == written


def test_no_two_blocks_or_files_of_one_run_share_a_name(tmp_path):
    known = simple_structures()
    named = [("Hf", known["NaCl"]), ("Hf", known["CsCl"]), ("Hf", known["Si"])]
    write_structures(tmp_path / "same.cif", named)
    assert [e.id for e in read_structures(tmp_path / "same.cif")] == ["Hf", "Hf~2", "Hf~3"]
    write_structures(tmp_path / "poscars", named, fmt="poscar")
    assert sorted(p.name for p in (tmp_path / "poscars").iterdir()) == ["Hf.vasp", "Hf~2.vasp", "Hf~3.vasp"]


def test_report_states_denominators_and_csv_has_geometry_columns(tmp_path):
    known = simple_structures()
    samples = tmp_path / "samples.cif"
    write_structures(samples, [("nacl", known["NaCl"]), ("cscl", known["CsCl"])])
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", str(samples), "--no-stability", "-o", str(out),
                                 "--json", str(tmp_path / "elsewhere.json")])
    assert result.exit_code == 0, result.output
    assert "(of all)" in result.output and "(of valid)" in result.output
    report = json.loads((out / "report.json").read_text())  # in -o as well as where --json asked
    assert report == json.loads((tmp_path / "elsewhere.json").read_text())
    assert "parse failures count as invalid" in report["validity"]["overall"]["of"]
    assert "valid structures" in report["uniqueness"]["of"]
    rows = list(csv.DictReader((out / "structures.csv").open()))
    assert [r["spacegroup"] for r in rows] == ["225", "221"]
    assert float(rows[0]["min_distance"]) == pytest.approx(5.69 / 2, abs=1e-3)
    assert float(rows[1]["volume_per_atom"]) == pytest.approx(4.12**3 / 2, rel=1e-3)
    assert {r["not_relaxed_reason"] for r in rows} == {"stability_off"}


def test_plots_place_the_samples_on_a_phase_diagram(tmp_path):
    from tests.test_evaluate_stability import tiny_hull

    known = simple_structures()
    samples = tmp_path / "samples.cif"
    write_structures(samples, [("nacl", known["NaCl"].get_primitive_structure()), ("cscl-like", known["CsCl"])])
    hull = tiny_hull().save(tmp_path / "hull.json")
    result = runner.invoke(app, ["evaluate", str(samples), "--hull", str(hull), "--steps", "3", "--plots",
                                 str(tmp_path / "plots"), "--chemsys", "Na-Cl"])
    assert result.exit_code == 0, result.output
    picture = tmp_path / "plots" / "phase_diagram.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    bad = runner.invoke(app, ["evaluate", str(samples), "--no-stability", "--chemsys", "Na-Qq"])
    assert bad.exit_code == 2 and "--chemsys" in bad.output


# ------------------------------------------------------------------------------------------ crystal refine


def _refine_inputs(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """Three inputs as a jsonl of structure dicts, two of them with the same id (so the run must write nacl~2)."""
    from crystal_cli.structure_io import structure_record

    known = simple_structures()
    named = [("nacl", known["NaCl"]), ("si", known["Si"]), ("nacl", known["CsCl"])]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(structure_record(structure, name) for name, structure in named))
    return samples, {"nacl": known["NaCl"], "si": known["Si"], "nacl~2": known["CsCl"]}


@pytest.mark.parametrize("fmt, output", [("poscar", "refined"), ("extxyz", "refined.extxyz")])
def test_refined_structures_round_trip_through_evaluate(tmp_path, fmt, output):
    samples, inputs = _refine_inputs(tmp_path)
    out = tmp_path / output
    refine = ["refine", str(samples), "-o", str(out), "--format", fmt, "--steps", "2"]  # models/flow-default
    result = runner.invoke(app, refine)
    assert result.exit_code == 0, result.output
    if fmt == "poscar":
        assert sorted(p.name for p in out.iterdir()) == ["nacl.vasp", "nacl~2.vasp", "si.vasp"]
    entries = {e.id: e for e in read_structures(out)}
    assert set(entries) == set(inputs)  # every input, named uniquely by its id
    for name, before in inputs.items():
        after = entries[name].structure
        assert len(after) == len(before) and after.composition == before.composition
    assert [r["status"] for r in read_jsonl(tmp_path / "refined.steps.jsonl")] == ["refined"] * 3
    result = runner.invoke(app, ["evaluate", str(out), "--no-stability", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["structures"] == 3
    again = runner.invoke(app, refine)  # finished work: --resume or --overwrite, never a silent redo
    assert again.exit_code == 2 and "--resume" in again.output


def test_refine_to_poscar_resumes_without_duplicates(tmp_path):
    from crystal_cli.api import refine_file

    samples, inputs = _refine_inputs(tmp_path)
    refine_file(samples, tmp_path / "full", fmt="poscar", steps=2, batch_size=1)

    def stop_after_two(total: int | None) -> None:
        stop_after_two.calls += total is None
        if stop_after_two.calls == 2:
            raise KeyboardInterrupt

    stop_after_two.calls = 0
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        refine_file(samples, part, fmt="poscar", steps=2, batch_size=1, progress=stop_after_two)
    assert sorted(p.name for p in part.iterdir()) == ["nacl.vasp", "si.vasp"]
    (part / "stale.vasp").write_text("written just before a kill, its input since changed")
    result = runner.invoke(app, ["refine", str(samples), "-o", str(part), "--format", "poscar", "--steps", "2",
                                 "--batch-size", "1", "--resume"])
    assert result.exit_code == 0, result.output
    log = read_jsonl(tmp_path / "part.steps.jsonl")
    assert [r["index"] for r in log] == [0, 1, 2] and [r["id"] for r in log] == ["nacl", "si", "nacl"]
    files = {p.name: p.read_text() for p in part.iterdir()}  # the third input is nacl~2, not a second nacl
    assert files == {p.name: p.read_text() for p in (tmp_path / "full").iterdir()}
    assert {e.id for e in read_structures(part)} == set(inputs)


def test_refine_refuses_a_users_poscar_directory_and_a_bad_format(tmp_path):
    samples, _ = _refine_inputs(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "POSCAR").write_text("my own structure\n")
    result = runner.invoke(app, ["refine", str(samples), "-o", str(mine), "--format", "poscar", "--steps", "2"])
    assert result.exit_code == 2 and "not written by crystal refine" in result.output
    assert [p.name for p in mine.iterdir()] == ["POSCAR"] and (mine / "POSCAR").read_text() == "my own structure\n"
    for fmt in ("vasp", "CIF"):
        bad = runner.invoke(app, ["refine", str(samples), "-o", str(tmp_path / "new.cif"), "--format", fmt])
        assert bad.exit_code == 2 and "--format" in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
    assert not (tmp_path / "new.cif").exists() and not (tmp_path / "new.steps.jsonl").exists()


def test_ids_that_write_to_one_file_name_still_get_two_files(tmp_path):
    known = simple_structures()
    named = [("a b", known["NaCl"]), ("a_b", known["CsCl"]), ("Hf", known["Si"]), ("Hf", known["NaCl"]),
             ("Hf~2", known["CsCl"])]
    assert write_structures(tmp_path / "poscars", named, fmt="poscar") == 5  # "a b" is written as a_b.vasp
    assert sorted(p.name for p in (tmp_path / "poscars").iterdir()) == [
        "Hf.vasp", "Hf~2.vasp", "Hf~2~2.vasp", "a_b.vasp", "a_b~2.vasp"]
