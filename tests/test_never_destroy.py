"""No command destroys data it did not write: an existing file of the user's is refused (exit 2, byte for
byte unchanged) unless --overwrite; crystal's own work (a stability log, a refine log) is reused with
--resume or redone with --overwrite, never silently; conditions mean what they say; a run's CIF holds only
blocks pymatgen reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.cli import app
from crystal_cli.structure_io import StructureAppender, read_jsonl, write_structures
from tests.conftest import simple_structures
from tests.test_evaluate_stability import tiny_hull

runner = CliRunner()
USER_CIF = "data_mine\n_cell_length_a 4.0\n# the user's own notes, not crystal's\n"


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    from crystal_cli.export import cached_export

    return cached_export("tiny", "f16")


def _generate(model: Path, out: Path, *extra: str):
    return runner.invoke(app, ["generate", "-m", str(model), "-o", str(out), "-n", "3", "--threads", "1",
                               "--parallel", "3", "--max-atoms", "6", *extra])


def test_generate_refuses_a_users_cif_and_replaces_it_only_with_overwrite(tiny_gguf, tmp_path):
    mine = tmp_path / "existing.cif"
    mine.write_text(USER_CIF)
    for extra in ((), ("--resume",)):
        result = _generate(tiny_gguf, mine, *extra)
        assert result.exit_code == 2 and "not written by crystal generate" in result.output, result.output
        assert mine.read_text() == USER_CIF and not (tmp_path / "existing.jsonl").exists()
    result = _generate(tiny_gguf, mine, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "mine" not in mine.read_text() and len(read_jsonl(tmp_path / "existing.jsonl")) == 3
    assert "structurally valid" in result.output
    assert _generate(tiny_gguf, mine, "--resume", "--overwrite").exit_code == 2  # one or the other
    result = _generate(tiny_gguf, mine)  # its own output, not resumed: refused, not appended to
    assert result.exit_code == 2 and "--resume" in result.output


def test_formula_fixes_the_cells_content_when_written_with_a_common_factor(tiny_gguf, tmp_path):
    result = _generate(tiny_gguf, tmp_path / "exact.cif", "--formula", "Na2Cl2", "--temperature", "1.0")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "exact.jsonl")
    assert all("The chemical formula is NaCl. " in r["prompt"] for r in rows)  # reduced, as in training
    assert [len(codec.parse_crystal(r["text"]).structure) for r in rows] == [4, 4, 4]
    from crystal_cli.grammar import formula_constraint

    assert formula_constraint("NaCl", 6).max_multiple == 3 and formula_constraint("Na2Cl2", 6).max_multiple == 1


def test_evaluate_typo_keeps_the_stability_log_and_reuse_needs_resume(tmp_path):
    known = simple_structures()
    samples = tmp_path / "samples.cif"
    write_structures(samples, [("nacl", known["NaCl"].get_primitive_structure()), ("cscl", known["CsCl"])])
    hull = tiny_hull().save(tmp_path / "hull.json")
    out = tmp_path / "eval"
    base = ["evaluate", str(samples), "--hull", str(hull), "--steps", "3", "-o", str(out)]
    assert runner.invoke(app, base).exit_code == 0
    log = (out / "stability.jsonl").read_bytes()
    typos = [["--reference", str(tmp_path / "trian.csv")], ["--hull", str(tmp_path / "hul.json")],
             ["--coverage-reference", str(tmp_path / "nope")], []]  # the last: neither --resume nor --overwrite
    for extra in typos:
        result = runner.invoke(app, base + extra if extra[:1] != ["--hull"] else
                               ["evaluate", str(samples), *extra, "--steps", "3", "-o", str(out)])
        assert result.exit_code == 2, (extra, result.output)
        assert (out / "stability.jsonl").read_bytes() == log
    assert "--resume" in result.output and "--overwrite" in result.output
    assert runner.invoke(app, base + ["--resume"]).exit_code == 0
    assert (out / "stability.jsonl").read_bytes() == log  # reused, nothing relaxed again
    assert runner.invoke(app, base + ["--overwrite"]).exit_code == 0
    assert len(read_jsonl(out / "stability.jsonl")) == 2

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"my": "notes"}')
    result = runner.invoke(app, ["evaluate", str(samples), "--no-stability", "-o", str(mine)])
    assert result.exit_code == 2 and "report.json" in result.output
    assert (mine / "report.json").read_text() == '{"my": "notes"}'


def test_refine_refuses_a_users_file_and_unasked_restarts(tmp_path):
    known = simple_structures()
    samples = tmp_path / "samples.cif"
    write_structures(samples, [("nacl", known["NaCl"]), ("si", known["Si"])])
    mine = tmp_path / "refined.cif"
    mine.write_text(USER_CIF)
    refine = ["refine", str(samples), "-o", str(mine), "--steps", "2"]
    result = runner.invoke(app, refine)
    assert result.exit_code == 2 and "not written by crystal refine" in result.output
    assert mine.read_text() == USER_CIF
    assert runner.invoke(app, refine + ["--overwrite"]).exit_code == 0
    refined = mine.read_bytes()
    result = runner.invoke(app, refine)  # its own finished work: --resume or --overwrite, never a silent redo
    assert result.exit_code == 2 and "--resume" in result.output and mine.read_bytes() == refined


def test_encode_hull_export_and_perplexity_outputs_are_claimed(tmp_path):
    from tests.conftest import write_cdvae_csv

    csv = write_cdvae_csv(tmp_path / "train.csv", simple_structures())
    records = tmp_path / "records"
    records.mkdir()
    (records / "train.jsonl").write_text("my own records\n")
    result = runner.invoke(app, ["encode", str(csv), "-o", str(records)])
    assert result.exit_code == 2 and "train.jsonl" in result.output
    assert (records / "train.jsonl").read_text() == "my own records\n"
    assert runner.invoke(app, ["encode", str(csv), "-o", str(records), "--overwrite"]).exit_code == 0
    assert runner.invoke(app, ["encode", str(csv), "-o", str(records)]).exit_code == 0  # its own: re-encoded

    from pymatgen.core import Composition
    from pymatgen.entries.computed_entries import ComputedEntry

    elements = tmp_path / "elements.json"
    elements.write_text(json.dumps([ComputedEntry(Composition(el), e).as_dict() for el, e in (("Na", -1.3), ("Cl", -1.8))]))
    table = tmp_path / "f.csv"
    table.write_text("pretty_formula,formation_energy_per_atom\nNaCl,-2.1\n")
    target = tmp_path / "notes.json"
    target.write_text('{"mine": true}')
    hull = ["hull", "build", str(table), "--elements", str(elements), "-o", str(target)]
    assert runner.invoke(app, hull).exit_code == 2 and target.read_text() == '{"mine": true}'
    assert runner.invoke(app, hull + ["--overwrite"]).exit_code == 0
    assert runner.invoke(app, hull).exit_code == 0  # a crystal hull file is rebuilt in place

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"my weights")
    result = runner.invoke(app, ["export", "tiny", "-o", str(gguf), "--quant", "f16"])
    assert result.exit_code == 2 and gguf.read_bytes() == b"my weights"
    scores = tmp_path / "scores.jsonl"
    scores.write_text("mine\n")
    result = runner.invoke(app, ["perplexity", str(records), "-m", "tiny", "--split", "train", "-o", str(scores)])
    assert result.exit_code == 2 and scores.read_text() == "mine\n"


def test_cif_blocks_that_would_not_read_back_are_left_out(tmp_path):
    stacked = Structure(Lattice.cubic(4.0), ["Li", "Li", "O"], [[0, 0, 0], [0, 0, 0], [0.5, 0.5, 0.5]])
    fine = simple_structures()["CsCl"]
    with StructureAppender(tmp_path / "s.cif", mode="w") as out:
        assert out.append(fine, "fine") and not out.append(stacked, "stacked")
    assert write_structures(tmp_path / "t.cif", [("a", fine), ("b", stacked)]) == 1
    assert (tmp_path / "t.cif").read_text().count("data_") == 1
    with StructureAppender(tmp_path / "s.jsonl") as out:  # jsonl keeps every site
        assert out.append(stacked, "stacked")
