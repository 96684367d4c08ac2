"""`crystal evaluate` and `crystal hull build` end to end: mixed inputs with parse failures, bad inputs, outputs."""

from __future__ import annotations

import csv
import json

from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from crystal_cli.cli import app
from crystal_cli.codec import encode_structure
from crystal_cli.structure_io import write_structures
from tests.conftest import simple_structures, write_cdvae_csv
from tests.test_evaluate_stability import tiny_hull

runner = CliRunner()


def _samples_dir(tmp_path):
    """A multi-block CIF and a `crystal generate`-style jsonl: 5 structures + 2 parse failures."""
    known = simple_structures()
    nacl = known["NaCl"].get_primitive_structure()
    shifted = nacl.copy()
    shifted.translate_sites(range(len(shifted)), [0.25, 0.1, 0.0])
    overlapping = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    samples = tmp_path / "samples"
    samples.mkdir()
    write_structures(samples / "samples.cif", [("nacl", nacl), ("nacl-again", shifted), ("overlap", overlapping),
                                                ("na2cl", Structure(Lattice.cubic(4.5), ["Na", "Na", "Cl"],
                                                                    [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]]))])
    lines = [{"id": "gen-ok", "text": encode_structure(known["CsCl"])},
             {"id": "gen-garbage", "text": "5.0 5.0 5.0\n90 90 90\nXx\n0.00 0.00 0.00"},
             {"id": "gen-short", "text": "hello"}]
    (samples / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return samples


def test_evaluate_end_to_end(tmp_path):
    samples = _samples_dir(tmp_path)
    reference = write_cdvae_csv(tmp_path / "train.csv", {"NaCl": simple_structures()["NaCl"]})
    hull = tiny_hull().save(tmp_path / "hull.json")
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "evaluate", str(samples), "--reference", str(reference), "--coverage-reference", str(reference),
        "--hull", str(hull), "--stability-samples", "4", "--steps", "5", "--seed", "1", "-o", str(out),
        "--plots", str(out / "plots"),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["entries"] == 7 and report["counts"]["structures"] == 5
    assert report["counts"]["parse_failures"] == {"unknown_element": 1, "too_few_lines": 1}
    assert report["validity"]["structural"]["k"] == 4  # everything parsed but the overlapping pair
    assert report["validity"]["overall"]["k"] == 3 and report["validity"]["overall"]["n"] == 7
    assert report["validity"]["invalid_reasons"]["overlapping_atoms"] == 1
    assert report["uniqueness"]["k"] == 2 and report["uniqueness"]["n"] == 3  # the shifted NaCl is a duplicate
    assert report["novelty"]["k"] == 1  # NaCl is in the reference; CsCl is not
    assert report["versions"]["chgnet"] and report["settings"]["structure_matcher"]["stol"] == 0.3
    assert report["coverage"]["cov_recall"] == 1.0 and report["distribution"]["n_reference"] == 1
    stability = report["stability"]
    assert stability["sampled"] == 4 and stability["metastable"]["n"] == 4

    rows = list(csv.DictReader((out / "structures.csv").open()))
    assert [r["id"] for r in rows] == ["nacl", "nacl-again", "overlap", "na2cl", "gen-ok", "gen-garbage", "gen-short"]
    assert rows[2]["structural_reason"] == "overlapping_atoms" and rows[5]["parse_error"] == "unknown_element"
    sampled = [r for r in rows if r["stability_error"] or r["energy_per_atom"]]
    assert len(sampled) == 4
    e_hull = [float(r["e_above_hull"]) for r in sampled if r["e_above_hull"] and not r["stability_error"]]
    assert stability["metastable"]["k"] == sum(e < 0.1 for e in e_hull) == sum(r["metastable"] == "True" for r in rows)
    relaxed = [r for r in rows if r["relaxed_structure"]]
    blocks = (out / "relaxed.cif").read_text().count("data_")
    assert blocks == len(relaxed) == stability["relaxed"]
    assert {p.name for p in (out / "plots").iterdir()} >= {"validity.png", "density.png", "n_elements.png"}


def test_bad_inputs_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.cif"
    empty.write_text("")
    samples = str(_samples_dir(tmp_path))
    for args in (["evaluate", str(empty)], ["evaluate", str(tmp_path / "missing.cif")],
                 ["evaluate", samples, "--hull", str(tmp_path / "nope.json")],
                 ["evaluate", samples, "--potential", str(tmp_path)],
                 ["evaluate", samples, "--stability-samples", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and "error:" in result.output


def test_only_unparseable_samples_are_all_invalid_without_a_crash(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"text": "1 2"}\n{"text": "nonsense\\nmore\\nlines\\nhere"}\nnot json\n')
    result = runner.invoke(app, ["evaluate", str(path), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validity"]["overall"]["k"] == 0 and report["counts"]["entries"] == 3
    assert report["stability"]["relaxed"] == 0 and sum(report["stability"]["failures"].values()) == 3


def test_hull_build_command(tmp_path):
    from pymatgen.core import Composition
    from pymatgen.entries.computed_entries import ComputedEntry

    elements = tmp_path / "elements.json"
    elements.write_text(json.dumps([ComputedEntry(Composition(el), e).as_dict() for el, e in (("Na", -1.32), ("Cl", -1.85))]))
    table = tmp_path / "f.csv"
    table.write_text("pretty_formula,formation_energy_per_atom\nNaCl,-2.1\n")
    result = runner.invoke(app, ["hull", "build", str(table), "--elements", str(elements), "-o", str(tmp_path / "h.json.gz")])
    assert result.exit_code == 0, result.output
    from crystal_cli.evaluate.hull import Hull

    assert Hull.load(tmp_path / "h.json.gz").entries == {"NaCl": (-2.1, "f.csv:1")}
    result = runner.invoke(app, ["hull", "build", str(tmp_path / "none.csv"), "--elements", str(elements), "-o", "x.json"])
    assert result.exit_code == 2
