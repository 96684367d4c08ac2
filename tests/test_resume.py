"""--resume across the long stages, through the CLI a user types: a changed setting exits 2 naming it (and
changes no file); the same settings continue without duplicates or loss (generate after a real SIGINT);
outputs written before manifests existed are adopted, and said so."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crystal_cli.cli import app
from crystal_cli.datasets import read_structures
from crystal_cli.structure_io import read_jsonl, write_structures
from tests.conftest import simple_structures
from tests.test_evaluate_stability import tiny_hull

runner = CliRunner()
SAMPLING = {"--threads": "1", "--parallel": "4", "--max-atoms": "6", "--temperature": "1.0", "--top-p": "1.0",
            "--seed": "3"}


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    from crystal_cli.export import cached_export

    return cached_export("tiny", "f16")


def _generate(model: Path, out: Path, n: int, **changes: str):
    flags = {**SAMPLING, **{k.replace("_", "-") if k.startswith("--") else k: v for k, v in changes.items()}}
    args = ["generate", "-m", str(model), "-o", str(out), "-n", str(n), "--resume"]
    for flag, value in flags.items():
        args += [flag] if value is None else [flag, value]
    return runner.invoke(app, args)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _blocks(path: Path) -> list[str]:
    return [e.id for e in read_structures(path)]


def test_generate_resume_refuses_each_changed_setting_and_tops_up_with_the_same(tiny_gguf, tmp_path):
    from crystal_cli.export import cached_export

    out = tmp_path / "s.cif"
    result = _generate(tiny_gguf, out, 4)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert {(r["model"], r["quant"], r["backend"], r["temperature"], r["top_p"], r["max_atoms"], r["run_seed"])
            for r in rows} == {(str(tiny_gguf.resolve()), "f16", "llama", 1.0, 1.0, 6, 3)}
    assert len({r["model_sha256"] for r in rows}) == 1 and len(rows[0]["model_sha256"]) == 64
    before = _files(tmp_path)
    other_model = cached_export("tiny", "f32")
    changes = [({"--temperature": "0.8"}, "temperature: 1.0 → 0.8"), ({"--top-p": "0.5"}, "top_p: 1.0 → 0.5"),
               ({"--max-atoms": "5"}, "max_atoms: 6 → 5"), ({"--seed": "4"}, "seed: 3 → 4"),
               ({"--formula": "NaCl"}, 'formula: (none) → "NaCl"'), ({"--no-grammar": None}, "grammar: true → false"),
               ({"--spacegroup": "225"}, "spacegroup: (none) → 225"), ({"--format": "extxyz"}, "fmt")]
    for change, named in changes:
        result = _generate(tiny_gguf, out, 6, **change)
        assert result.exit_code == 2 and named in result.output, (change, result.output)
        assert "Traceback" not in result.output
    result = _generate(other_model, out, 6)
    assert result.exit_code == 2 and "model: " in result.output and str(other_model) in result.output
    assert _files(tmp_path) == before  # nothing refused touched a file

    result = _generate(tiny_gguf, out, 7, **{"--parallel": "2"})  # safe: how many decode at once
    assert result.exit_code == 0, result.output
    assert "3 new samples (4 already there)" in result.output
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(7)) and len({r["text"] for r in rows}) == 7
    assert sorted(_blocks(out)) == sorted(f"s-{i:05d}" for i in range(7))
    assert runner.invoke(app, ["generate", "-m", str(tiny_gguf), "-o", str(out), "-n", "7"]).exit_code == 2  # no --resume


def test_generate_continues_after_a_real_sigint(tiny_gguf, tmp_path):
    out = tmp_path / "run.cif"
    args = [sys.executable, "-m", "crystal_cli.cli", "generate", "-m", str(tiny_gguf), "-o", str(out), "-n", "4000"]
    for flag, value in {**SAMPLING, "--parallel": "2"}.items():
        args += [flag, value]
    # A shell starts background jobs with SIGINT ignored, and children inherit that: restore the default so
    # the test means the same under `make test &` as in a terminal.
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sidecar = tmp_path / "run.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if sidecar.exists() and sidecar.read_text().count("\n") >= 4:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0]
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in output, output
    rows = read_jsonl(sidecar)
    kept = len(rows)
    assert 4 <= kept < 4000 and len({r["index"] for r in rows}) == kept
    assert len(_blocks(out)) == sum(r["status"] == "ok" for r in rows)  # the partial CIF is whole

    result = _generate(tiny_gguf, out, kept + 3, **{"--parallel": "2"})
    assert result.exit_code == 0, result.output
    before, rows = rows, read_jsonl(sidecar)
    assert sorted(r["index"] for r in rows) == list(range(kept + 3))
    assert rows[:kept] == before and len({r["text"] for r in rows}) == kept + 3
    assert sorted(_blocks(out)) == sorted(r["id"] for r in rows if r["status"] == "ok")


def test_generate_adopts_a_sidecar_written_before_manifests(tiny_gguf, tmp_path):
    out = tmp_path / "old.cif"
    assert _generate(tiny_gguf, out, 3).exit_code == 0
    (tmp_path / "old.manifest.json").unlink()  # what crystal 0.1.0 left behind
    legacy = [{k: v for k, v in r.items() if k not in ("model", "model_sha256", "quant", "backend", "temperature",
                                                        "top_p", "max_atoms", "run_seed")}
              for r in read_jsonl(tmp_path / "old.jsonl")]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    result = _generate(tiny_gguf, out, 5, **{"--seed": "9"})
    assert result.exit_code == 2 and "seed" in result.output  # the rows' own seeds contradict --seed 9
    result = _generate(tiny_gguf, out, 5)
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "took over its 3 rows" in result.output
    from crystal_cli.runs import Manifest

    manifest = Manifest.load(tmp_path / "old.manifest.json")
    assert manifest.adopted["rows"] == 3 and "temperature" in manifest.adopted["unchecked"]
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "old.jsonl")) == list(range(5))
    assert _generate(tiny_gguf, out, 5, **{"--top-p": "0.5"}).exit_code == 2  # from now on it is checked


def test_infill_resume_refuses_changes_and_appends_the_next_ranks(tiny_gguf, tmp_path):
    from crystal_cli.export import cached_export

    source = tmp_path / "inputs.cif"
    known = simple_structures()
    write_structures(source, [("nacl", known["NaCl"]), ("cscl", known["CsCl"])])

    def infill(folder: Path, n: int, mask: str = "Cl", model: Path = tiny_gguf, *extra: str):
        folder.mkdir(exist_ok=True)
        return runner.invoke(app, ["generate", "-m", str(model), "--infill", str(source), "--mask", mask, "-n", str(n),
                                   "-o", str(folder / "subs.cif"), "--threads", "1", "--resume", *extra])

    part = tmp_path / "part"
    assert infill(part, 2).exit_code == 0
    before = _files(part)
    result = infill(part, 3, "Na")
    assert result.exit_code == 2 and 'mask: "Cl" → "Na"' in result.output, result.output
    result = infill(part, 3, "Cl", cached_export("tiny", "f32"))
    assert result.exit_code == 2 and "model: " in result.output, result.output
    assert _files(part) == before
    result = infill(part, 4, "Cl", tiny_gguf, "--parallel", "3")
    assert result.exit_code == 0, result.output
    assert "4 new samples (4 already there)" in result.output
    assert infill(tmp_path / "fresh", 4).exit_code == 0

    resumed, fresh = read_jsonl(part / "subs.jsonl"), read_jsonl(tmp_path / "fresh" / "subs.jsonl")
    key = lambda rows: sorted((r["source_id"], r["rank"], r["element"]) for r in rows)  # noqa: E731
    assert key(resumed) == key(fresh) and len(resumed) == 8
    assert (part / "subs.jsonl").read_bytes().startswith(before["subs.jsonl"])  # the first rows kept as they were
    assert sorted(_blocks(part / "subs.cif")) == sorted(_blocks(tmp_path / "fresh" / "subs.cif"))
    assert (part / "subs.cif").read_text().count("data_") == 8


@pytest.fixture(scope="module")
def small_flow(tmp_path_factory) -> Path:
    """A second, tiny flow network (a few steps on perturbed pairs), to resume with another model."""
    root = tmp_path_factory.mktemp("flow")
    known = simple_structures()
    write_structures(root / "targets.cif", [("nacl", known["NaCl"]), ("cscl", known["CsCl"])])
    assert runner.invoke(app, ["flow", "pairs", str(root / "targets.cif"), "-o", str(root / "pairs"), "--perturb",
                               "--per-target", "2"]).exit_code == 0
    recipe = root / "tiny.toml"
    recipe.write_text(f'pairs = "{root / "pairs"}"\n[model]\nhidden_dim = 16\nnum_layers = 1\nnum_freqs = 2\n'
                      "[train]\nsteps = 4\nbatch_size = 2\nwarmup_steps = 1\ncheckpoint_every = 2\n")
    result = runner.invoke(app, ["flow", "train", "--recipe", str(recipe), "-o", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root


def test_refine_resume_refuses_changes_and_continues_a_grown_input(small_flow, tmp_path):
    known = simple_structures()
    samples = tmp_path / "samples.cif"
    write_structures(samples, [("nacl", known["NaCl"]), ("si", known["Si"])])

    def refine(*extra: str):
        return runner.invoke(app, ["refine", str(samples), "-o", str(tmp_path / "refined.jsonl"), "--steps", "3",
                                   "--resume", *extra])

    assert refine().exit_code == 0
    before = _files(tmp_path)
    result = refine("--steps", "4")
    assert result.exit_code == 2 and "steps: 3 → 4" in result.output, result.output
    result = refine("--model", str(small_flow / "run"))
    assert result.exit_code == 2 and "model: " in result.output, result.output
    assert _files(tmp_path) == before

    write_structures(samples, [("nacl", known["NaCl"]), ("si", known["Si"]), ("cscl", known["CsCl"])])
    result = refine("--batch-size", "1")  # safe; and the input grew (generate topped it up)
    assert result.exit_code == 0, result.output
    log = read_jsonl(tmp_path / "refined.steps.jsonl")
    assert [r["id"] for r in log] == ["nacl", "si", "cscl"] and [r["index"] for r in log] == [0, 1, 2]
    assert [e.id for e in read_structures(tmp_path / "refined.jsonl")] == ["nacl", "si", "cscl"]
    write_structures(samples, [("nacl", known["ZnO-hex"]), ("si", known["Si"]), ("cscl", known["CsCl"])])
    result = refine()
    assert result.exit_code == 2 and "row 0 (id nacl) is not input 0" in result.output, result.output


def test_evaluate_resume_refuses_changes_and_reuses_logged_relaxations(tmp_path):
    known = simple_structures()
    nacl, cscl = known["NaCl"].get_primitive_structure(), known["CsCl"]
    samples = tmp_path / "samples.cif"
    write_structures(samples, [("nacl", nacl), ("cscl", cscl)])
    hull = tiny_hull().save(tmp_path / "hull.json")
    out = tmp_path / "eval"

    def evaluate(*extra: str, hull_path: Path = hull):
        return runner.invoke(app, ["evaluate", str(samples), "--hull", str(hull_path), "--steps", "3", "-o", str(out),
                                   "--resume", *extra])

    result = evaluate()
    assert result.exit_code == 0, result.output
    first = read_jsonl(out / "stability.jsonl")
    assert [r["id"] for r in first] == ["nacl", "cscl"] and all(r["input_sha256"] for r in first)
    log_bytes = (out / "stability.jsonl").read_bytes()
    other_hull = tiny_hull()
    other_hull.entries["NaCl"] = (-2.0, "other")
    other_hull.save(tmp_path / "other-hull.json")
    for extra, named in ((("--fmax", "0.1"), "fmax: 0.05 → 0.1"), (("--steps", "4"), "steps: 3 → 4"),
                         (("--time-limit", "60"), "time_limit: 120.0 → 60.0"), (("--no-relax-cell",), "relax_cell")):
        result = evaluate(*extra)
        assert result.exit_code == 2 and named in result.output, (extra, result.output)
    result = evaluate(hull_path=tmp_path / "other-hull.json")
    assert result.exit_code == 2 and "hull: " in result.output, result.output
    assert (out / "stability.jsonl").read_bytes() == log_bytes

    write_structures(samples, [("nacl", nacl), ("cscl", cscl), ("nacl-big", known["NaCl"])])
    result = evaluate("--workers", "1", "--seed", "5")  # safe keys; one more sample
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "stability.jsonl")
    assert rows[:2] == first and [r["id"] for r in rows] == ["nacl", "cscl", "nacl-big"]  # only the new one relaxed

    (out / "stability.manifest.json").unlink()  # a log written before manifests
    result = evaluate()
    assert result.exit_code == 0 and "reused its 3 relaxations" in result.output, result.output
    assert read_jsonl(out / "stability.jsonl") == rows


def test_flow_pairs_and_train_resume_rules(tmp_path):
    known = simple_structures()
    targets = tmp_path / "targets.cif"
    write_structures(targets, [("nacl", known["NaCl"]), ("cscl", known["CsCl"]), ("si", known["Si"])])
    pairs = tmp_path / "pairs"

    def build(*extra: str):
        return runner.invoke(app, ["flow", "pairs", str(targets), "-o", str(pairs), "--perturb", "--per-target", "2",
                                   "--resume", *extra])

    assert build("--max-targets", "1").exit_code == 0
    result = build("--max-targets", "1", "--coord-noise", "0.1")
    assert result.exit_code == 2 and "coord_noise: 0.05 → 0.1" in result.output, result.output
    result = build("--max-targets", "3")  # safe: more targets continue the run
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(pairs / "pairs.jsonl")) == 6 and len({r["id"] for r in read_jsonl(pairs / "pairs.jsonl")}) == 6

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'pairs = "{pairs}"\n[model]\nhidden_dim = 16\nnum_layers = 1\nnum_freqs = 2\n'
                      "[train]\nsteps = 4\nbatch_size = 2\nwarmup_steps = 1\ncheckpoint_every = 2\n")
    run = tmp_path / "run"
    assert runner.invoke(app, ["flow", "train", "--recipe", str(recipe), "-o", str(run), "--steps", "2"]).exit_code == 0
    result = runner.invoke(app, ["flow", "train", "-o", str(run), "--resume", "--lr", "0.01"])
    assert result.exit_code == 2 and "train.lr: 0.0003 → 0.01" in result.output, result.output
    result = runner.invoke(app, ["flow", "train", "--recipe", str(recipe), "-o", str(run), "--resume", "--steps", "2"])
    assert result.exit_code == 0, result.output  # the same recipe and flags agree with the saved run
    assert (run / "manifest.json").is_file() and (run / "model.pt").is_file()


def test_every_long_stage_writes_a_manifest_with_hashed_inputs(tmp_path):
    from crystal_cli.runs import Manifest
    from tests.conftest import write_cdvae_csv

    csv = write_cdvae_csv(tmp_path / "train.csv", simple_structures())
    assert runner.invoke(app, ["encode", str(csv), "-o", str(tmp_path / "records")]).exit_code == 0
    manifest = Manifest.load(tmp_path / "records" / "manifest.json")
    assert manifest.stage == "encode" and manifest.inputs[str(csv)]["sha256"]
    assert manifest.versions["crystal"] and "torch" in manifest.versions
    assert set(manifest.outputs) == {"stats.json", "train.jsonl"}
