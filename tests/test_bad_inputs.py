"""Every command against a table of bad inputs a user can type: missing, empty, a directory where a file
goes, binary, truncated, wrong columns, out-of-range numbers, NaN and infinity. Each must end in exit code
2 with one line that names the file or option and the reason, print no traceback, and change nothing on
disk (no file or folder created, changed or removed)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crystal_cli.cli import app
from crystal_cli.structure_io import write_structures
from tests.conftest import simple_structures, write_cdvae_csv
from tests.test_evaluate_stability import tiny_hull

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    known = simple_structures()
    write_structures(root / "samples.cif", [("nacl", known["NaCl"]), ("cscl", known["CsCl"])])
    write_cdvae_csv(root / "train.csv", known)
    (root / "binary.cif").write_bytes(bytes(range(256)) * 8)
    (root / "binary.toml").write_bytes(bytes(range(256)) * 8)
    (root / "binary.json").write_bytes(bytes(range(256)) * 8)
    (root / "binary.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    (root / "empty.cif").write_text("")
    (root / "empty.jsonl").write_text("")
    (root / "nocif.csv").write_text("material_id,formula\nmp-1,NaCl\n")
    (root / "noenergy.csv").write_text("pretty_formula,band_gap\nNaCl,5.0\n")
    data = gzip.compress((root / "train.csv").read_bytes())
    (root / "truncated.csv.gz").write_bytes(data[: len(data) // 2])
    hull_bytes = gzip.compress(json.dumps(tiny_hull().as_dict()).encode())
    (root / "truncated-hull.json.gz").write_bytes(hull_bytes[: len(hull_bytes) // 2])
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("the user's file")
    (root / "existing.txt").write_text("the user's file")
    tiny_hull().save(root / "hull.json")
    from pymatgen.core import Composition
    from pymatgen.entries.computed_entries import ComputedEntry

    (root / "elements.json").write_text(json.dumps([ComputedEntry(Composition(el), e).as_dict()
                                                    for el, e in (("Na", -1.32), ("Cl", -1.85))]))
    (root / "energies.csv").write_text("pretty_formula,formation_energy_per_atom\nNaCl,-2.1\n")
    return {"dir": str(root), **{p.name: str(p) for p in root.iterdir()}, "missing": str(root / "missing.cif"),
            "out": str(root / "out"), "new.cif": str(root / "new.cif")}


@pytest.fixture(scope="module")
def gguf():
    from crystal_cli.export import cached_export

    return str(cached_export("tiny", "f16"))


GENERATE = ["generate", "-m", "{gguf}", "-o", "{new.cif}", "--threads", "1"]
EVALUATE = ["evaluate", "{samples.cif}", "--no-stability"]
PAIRS = ["flow", "pairs", "{samples.cif}", "-o", "{out}", "--perturb"]
REFINE = ["refine", "{samples.cif}", "-o", "{new.cif}"]
HULL = ["hull", "build", "{energies.csv}", "--elements", "{elements.json}", "-o", "{dir}/h.json"]

CASES = [
    # encode
    (["encode", "{missing}", "-o", "{out}"], ["missing.cif", "no such file"]),
    (["encode", "{empty.cif}", "-o", "{out}"], ["empty.cif", "empty"]),
    (["encode", "{binary.cif}", "-o", "{out}"], ["binary.cif"]),
    (["encode", "{truncated.csv.gz}", "-o", "{out}"], ["truncated.csv.gz", "not a readable csv"]),
    (["encode", "{nocif.csv}", "-o", "{out}"], ["nocif.csv", "cif"]),
    (["encode", "--recipe", "{binary.toml}"], ["binary.toml"]),
    (["encode", "--recipe", "{folder}"], ["folder", "directory"]),
    (["encode", "--recipe", "{missing}"], ["missing.cif", "no such"]),
    (["encode", "{train.csv}", "-o", "{existing.txt}"], ["existing.txt", "not a directory"]),
    (["encode", "{train.csv}", "-o", "{out}", "--augment", "-1"], ["--augment"]),
    (["encode", "{train.csv}", "-o", "{out}", "--val-fraction", "1.5"], ["--val-fraction"]),
    (["encode", "{train.csv}", "-o", "{out}", "--val-fraction", "nan"], ["--val-fraction"]),
    (["encode", "{train.csv}", "-o", "{out}", "--max-atoms", "0"], ["--max-atoms"]),
    (["encode", "{train.csv}", "-o", "{out}", "--task", "bogus"], ["bogus"]),
    (["encode", "{train.csv}", "-o", "{out}", "--max-rows", "0"], ["--max-rows"]),
    # finetune and flow train read recipes through the same reader
    (["finetune", "--recipe", "{binary.toml}", "-o", "{out}"], ["binary.toml"]),
    (["flow", "train", "--recipe", "{binary.toml}", "-o", "{out}"], ["binary.toml"]),
    (["flow", "train", "--recipe", "{folder}", "-o", "{out}"], ["folder", "directory"]),
    (["flow", "train", "--pairs", "{missing}", "-o", "{out}"], ["missing.cif"]),
    (["flow", "train", "--pairs", "{empty.jsonl}", "-o", "{out}"], ["empty.jsonl"]),
    (["flow", "train", "--pairs", "{samples.cif}", "-o", "{out}", "--steps", "0"], ["steps"]),
    (["flow", "train", "--pairs", "{samples.cif}", "-o", "{out}", "--lr", "nan"], ["lr"]),
    (["flow", "train", "--pairs", "{samples.cif}", "-o", "{out}", "--batch-size", "0"], ["batch_size"]),
    # perplexity and export
    (["perplexity", "{missing}", "-m", "tiny"], ["missing.cif", "no such file"]),
    (["perplexity", "{samples.cif}", "-m", "tiny", "-o", "{folder}"], ["folder", "directory"]),
    (["perplexity", "{samples.cif}", "-m", "tiny", "--translations", "-1"], ["--translations"]),
    (["perplexity", "{samples.cif}", "-m", "tiny", "--batch-size", "0"], ["--batch-size"]),
    (["export", "{folder}", "-o", "{dir}/x.gguf"], ["folder", "not a finetune run"]),
    (["export", "tiny", "-o", "{folder}"], ["folder"]),
    (["export", "tiny", "-o", "{dir}/x.gguf", "--quant", "q3"], ["--quant"]),
    # generate
    (GENERATE + ["-o", "{folder}"], ["folder", "directory"]),
    (GENERATE + ["--temperature", "-1"], ["--temperature"]),
    (GENERATE + ["--temperature", "nan"], ["--temperature"]),
    (GENERATE + ["--top-p", "1.5"], ["--top-p"]),
    (GENERATE + ["--top-p", "nan"], ["--top-p"]),
    (GENERATE + ["--e-hull", "nan"], ["--e-hull"]),
    (GENERATE + ["--e-hull", "inf"], ["--e-hull"]),
    (GENERATE + ["--spacegroup", "0"], ["--spacegroup"]),
    (GENERATE + ["--formula", ""], ["--formula", "empty"]),
    (GENERATE + ["--formula", "Li0O"], ["--formula", "Li"]),
    (GENERATE + ["--formula", "Li-1O"], ["--formula"]),
    (GENERATE + ["--formula", "Li10Fe10P10O40"], ["--formula", "70", "--max-atoms"]),
    (GENERATE + ["--formula", "Xx2O"], ["--formula", "Xx"]),
    (GENERATE + ["-n", "0"], ["-n"]),
    (GENERATE + ["--parallel", "0"], ["--parallel"]),
    (GENERATE + ["--max-atoms", "0"], ["--max-atoms"]),
    (GENERATE + ["--threads", "0"], ["--threads"]),
    (GENERATE + ["-o", "{dir}/x.vasp"], ["x.vasp"]),
    (GENERATE + ["-m", "{binary.gguf}"], ["binary.gguf"]),
    (GENERATE + ["-m", "{empty.cif}"], ["empty.cif"]),
    (GENERATE + ["--adapter", "{binary.gguf}"], ["binary.gguf"]),
    (GENERATE + ["--infill", "{missing}", "--mask", "Na"], ["missing.cif"]),
    (GENERATE + ["--infill", "{samples.cif}", "--mask", "Xx"], ["--mask"]),
    # hull build
    (["hull", "build", "{missing}", "--elements", "{elements.json}", "-o", "{dir}/h.json"], ["missing.cif"]),
    (HULL[:-2] + ["-o", "{folder}"], ["folder", "directory"]),
    (["hull", "build", "{noenergy.csv}", "--elements", "{elements.json}", "-o", "{dir}/h.json"], ["noenergy.csv"]),
    (["hull", "build", "{binary.cif}", "--elements", "{elements.json}", "-o", "{dir}/h.json"], ["binary.cif"]),
    (["hull", "build", "{energies.csv}", "--elements", "{binary.json}", "-o", "{dir}/h.json"], ["binary.json"]),
    (["hull", "build", "{truncated.csv.gz}", "--elements", "{elements.json}", "-o", "{dir}/h.json"], ["truncated.csv.gz"]),
    # evaluate
    (["evaluate", "{missing}"], ["missing.cif", "no such file"]),
    (["evaluate", "{empty.cif}"], ["empty.cif", "empty"]),
    (["evaluate", "{binary.cif}"], ["binary.cif"]),
    (["evaluate", "{truncated.csv.gz}"], ["truncated.csv.gz"]),
    (EVALUATE + ["--json", "{folder}"], ["folder", "directory"]),
    (EVALUATE + ["--csv", "{folder}"], ["folder", "directory"]),
    (EVALUATE + ["--plots", "{existing.txt}"], ["existing.txt", "not a directory"]),
    (EVALUATE + ["-o", "{existing.txt}"], ["existing.txt", "not a directory"]),
    (["evaluate", "{samples.cif}", "--hull", "{binary.json}"], ["binary.json"]),
    (["evaluate", "{samples.cif}", "--hull", "{folder}"], ["folder"]),
    (["evaluate", "{samples.cif}", "--hull", "{truncated-hull.json.gz}"], ["truncated-hull.json.gz"]),
    (["evaluate", "{samples.cif}", "--reference", "{missing}"], ["missing.cif"]),
    (["evaluate", "{samples.cif}", "--fmax", "nan"], ["--fmax"]),
    (["evaluate", "{samples.cif}", "--fmax", "0"], ["--fmax"]),
    (["evaluate", "{samples.cif}", "--steps", "0"], ["--steps"]),
    (["evaluate", "{samples.cif}", "--workers", "0"], ["--workers"]),
    (["evaluate", "{samples.cif}", "--time-limit", "-1"], ["--time-limit"]),
    (["evaluate", "{samples.cif}", "--time-limit", "nan"], ["--time-limit"]),
    (["evaluate", "{samples.cif}", "--stability-samples", "0"], ["--stability-samples"]),
    (["evaluate", "{samples.cif}", "--coverage-max-reference", "0"], ["--coverage-max-reference"]),
    (["evaluate", "{samples.cif}", "--potential", "{folder}"], ["folder"]),
    # flow pairs and refine
    (["flow", "pairs", "{missing}", "-o", "{out}", "--perturb"], ["missing.cif"]),
    (["flow", "pairs", "{samples.cif}", "-o", "{out}"], ["--samples", "--model", "--perturb"]),
    (PAIRS + ["--per-target", "0"], ["--per-target"]),
    (PAIRS + ["--coord-noise", "nan"], ["--coord-noise"]),
    (PAIRS + ["--coord-noise", "-1"], ["--coord-noise"]),
    (PAIRS + ["--lattice-noise", "inf"], ["--lattice-noise"]),
    (PAIRS + ["--max-atoms", "0"], ["--max-atoms"]),
    (PAIRS + ["--max-targets", "0"], ["--max-targets"]),
    (PAIRS + ["--workers", "0"], ["--workers"]),
    (["flow", "pairs", "{samples.cif}", "-o", "{out}", "--model", "no-such-model"], ["no-such-model"]),
    (["flow", "pairs", "{samples.cif}", "-o", "{existing.txt}", "--perturb"], ["existing.txt", "not a directory"]),
    (["flow", "pairs", "{samples.cif}", "-o", "{out}", "--samples", "{missing}"], ["missing.cif"]),
    (["flow", "pairs", "{samples.cif}", "-o", "{out}", "--model", "{binary.gguf}"], ["binary.gguf"]),
    (["flow", "pairs", "{samples.cif}", "-o", "{out}", "--model", "{gguf}", "--temperature", "-1"], ["--temperature"]),
    (["refine", "{missing}", "-o", "{new.cif}"], ["missing.cif"]),
    (["refine", "{samples.cif}", "-o", "{dir}/x.vasp"], ["x.vasp"]),
    (["refine", "{samples.cif}", "-o", "{folder}"], ["folder", "directory"]),
    (REFINE + ["--steps", "0"], ["--steps"]),
    (REFINE + ["--batch-size", "0"], ["--batch-size"]),
    (REFINE + ["--model", "{missing}"], ["missing.cif"]),
    (REFINE + ["--model", "{folder}"], ["folder"]),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args, named", CASES, ids=[" ".join(a[:3]) + " " + " ".join(a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(files, gguf, args, named):
    values = {**files, "gguf": gguf}

    def fill(text: str) -> str:
        return re.sub(r"\{([^{}]+)\}", lambda m: values[m.group(1)], text)

    argv = [fill(a) for a in args]
    root = Path(files["dir"])
    before = _snapshot(root)
    result = runner.invoke(app, argv)
    text = " ".join(result.output.split())  # rich wraps long lines; judge the words
    assert result.exit_code == 2, (argv, result.output, result.exception)
    assert "Traceback" not in result.output and "error:" in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    for word in named:
        assert fill(word).replace(files["dir"] + "/", "") in text, (word, result.output)
    assert _snapshot(root) == before, argv
