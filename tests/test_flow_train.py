"""Flow matching end to end on a tiny paired set: training moves samples toward their targets, exact resume,
refinement keeps composition and site order, and the CLI commands (`crystal flow pairs/train`, `crystal refine`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from crystal_cli.cli import app
from crystal_cli.codec import encode_structure
from crystal_cli.datasets import read_structures
from crystal_cli.flow.manifolds import mean_periodic_distance, structure_lattice_vector
from crystal_cli.flow.network import FlowNetConfig
from crystal_cli.flow.ode import refine_file, refine_structures
from crystal_cli.flow.pairs import PairOptions, PerturbedSamples, aligned_target, build_pairs
from crystal_cli.flow.train import RunConfig, TrainConfig, load_model, train
from crystal_cli.structure_io import read_jsonl, write_structures

REPO = Path(__file__).resolve().parents[1]
TINY_NET = FlowNetConfig(hidden_dim=64, num_layers=2, num_freqs=4, time_dim=16, num_rbf=8)
NOISE = PerturbedSamples(coord_noise=0.04, lattice_noise=0.04)

TARGETS = {
    "ZnO": Structure(Lattice.hexagonal(3.25, 5.21), ["Zn", "Zn", "O", "O"],
                     [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38], [2 / 3, 1 / 3, 0.88]]),
    "TiO2": Structure(Lattice.tetragonal(4.59, 2.96), ["Ti", "Ti", "O", "O", "O", "O"],
                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.305, 0.305, 0], [0.695, 0.695, 0], [0.195, 0.805, 0.5],
                       [0.805, 0.195, 0.5]]),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core host: one intra-op thread is ~5x faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    """32 perturbed samples per target, built through the file path users take (targets CIF -> pairs dir)."""
    root = tmp_path_factory.mktemp("flow")
    write_structures(root / "targets.cif", list(TARGETS.items()))
    build_pairs(root / "targets.cif", root / "pairs", NOISE, PairOptions(samples_per_target=32, seed=0))
    return root / "pairs"


@pytest.fixture(scope="module")
def trained(paired) -> Path:
    config = RunConfig(pairs=str(paired), model=TINY_NET, train=TrainConfig(
        steps=300, batch_size=16, lr=2e-3, warmup_steps=20, ema_decay=0.9, log_every=50, checkpoint_every=100))
    run = paired.parent / "run"
    train(config, run)
    return run


def fresh_samples(count: int, seed: int) -> list[tuple[str, Structure]]:
    """New perturbations (a seed the pairs never used), as (target name, sample)."""
    rng = np.random.default_rng(seed)
    return [(name, s) for name, target in TARGETS.items() for s in NOISE.draw(target, count, rng)]


def distance_to_target(structure: Structure, name: str) -> float:
    return mean_periodic_distance(structure, aligned_target(structure, TARGETS[name]))


def test_training_moves_samples_toward_their_targets(trained):
    metrics = read_jsonl(trained / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [50, 100, 150, 200, 250, 300]
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]

    model = load_model(trained)
    samples = fresh_samples(8, seed=123)
    refined = refine_structures(model, [s for _, s in samples], steps=50)
    before = np.mean([distance_to_target(s, name) for name, s in samples])
    after = np.mean([distance_to_target(r.structure, name) for (name, _), r in zip(samples, refined)])
    assert after < 0.75 * before, (before, after)
    lattice_before = np.mean([float((structure_lattice_vector(s) - structure_lattice_vector(TARGETS[n])).norm())
                              for n, s in samples])
    lattice_after = np.mean([float((structure_lattice_vector(r.structure) - structure_lattice_vector(TARGETS[n])).norm())
                             for (n, _), r in zip(samples, refined)])
    assert lattice_after < lattice_before, (lattice_before, lattice_after)


def test_refine_keeps_composition_and_site_order_and_counts_bad_inputs(trained, tmp_path):
    samples = [s for _, s in fresh_samples(2, seed=7)]  # perturbed and shuffled: sites not grouped by element
    path = tmp_path / "samples.jsonl"  # what `crystal generate` writes: crystal text per row
    rows = [{"id": f"s{i}", "text": encode_structure(s)} for i, s in enumerate(samples)]
    rows.insert(2, {"id": "bad", "text": "4.0 4.0\nnot a crystal"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = refine_file(path, tmp_path / "refined.jsonl", load_model(trained), steps=20, batch_size=3)
    assert stats["refined"] == 4 and stats["skipped"] == {"too_few_lines": 1}

    refined = [Structure.from_dict(r["structure"]) for r in read_jsonl(tmp_path / "refined.jsonl")]
    for before, after in zip(samples, refined):
        assert [site.specie.symbol for site in after] == [site.specie.symbol for site in before]
        assert after.composition == before.composition
        assert mean_periodic_distance(after, before) < 1.0  # refined, not replaced
    log = read_jsonl(tmp_path / "refined.steps.jsonl")
    assert [r["status"] for r in log] == ["refined", "refined", "too_few_lines", "refined", "refined"]
    assert [r["id"] for r in log] == ["s0", "s1", "bad", "s2", "s3"]
    assert all(len(r["step_displacement"]) == 20 and r["path_length"] >= r["displacement"] - 1e-4
               for r in log if r["status"] == "refined")


def test_refine_resumes_to_the_same_output(trained, tmp_path):
    path = tmp_path / "samples.cif"
    write_structures(path, [(f"s{i}", s) for i, (_, s) in enumerate(fresh_samples(2, seed=9))])
    model = load_model(trained)
    refine_file(path, tmp_path / "full.cif", model, steps=10, batch_size=1)

    def stop_after_two(total):
        stop_after_two.calls += total is None
        if stop_after_two.calls == 2:
            raise KeyboardInterrupt

    stop_after_two.calls = 0
    with pytest.raises(KeyboardInterrupt):
        refine_file(path, tmp_path / "part.cif", model, steps=10, batch_size=1, progress=stop_after_two)
    stats = refine_file(path, tmp_path / "part.cif", model, steps=10, batch_size=1, resume=True)
    assert stats["resumed_from"] == 2 and stats["refined"] == 2
    assert (tmp_path / "part.cif").read_text() == (tmp_path / "full.cif").read_text()
    assert len(read_jsonl(tmp_path / "part.steps.jsonl")) == 4


def test_resumed_training_equals_uninterrupted_training(paired, tmp_path):
    config = RunConfig(pairs=str(paired), model=FlowNetConfig(hidden_dim=16, num_layers=1, num_freqs=2, time_dim=8,
                                                              num_rbf=2),
                       train=TrainConfig(steps=6, batch_size=4, warmup_steps=2, log_every=1, checkpoint_every=3))
    train(config, tmp_path / "straight")

    def interrupt(step, total, row):
        if step == 4:  # one step past the checkpoint at 3: that step is redone on resume
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=interrupt)
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]
    summary = train(None, tmp_path / "resumed", resume=True)
    assert summary["steps"] == 6
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert read_jsonl(tmp_path / "resumed" / "metrics.jsonl") == [
        {**r, "steps_per_s": r2["steps_per_s"]}
        for r, r2 in zip(read_jsonl(tmp_path / "straight" / "metrics.jsonl"),
                         read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    ]


def test_cli_pairs_train_refine(tmp_path):
    runner = CliRunner()
    write_structures(tmp_path / "targets.cif", list(TARGETS.items()))
    result = runner.invoke(app, ["flow", "pairs", str(tmp_path / "targets.cif"), "-o", str(tmp_path / "pairs"),
                                 "--perturb", "--per-target", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "pairs" / "pairs.jsonl")) == 6

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'pairs = "{tmp_path / "pairs"}"\n[model]\nhidden_dim = 16\nnum_layers = 1\nnum_freqs = 2\n'
                      "[train]\nsteps = 3\nbatch_size = 4\nwarmup_steps = 1\n")
    result = runner.invoke(app, ["flow", "train", "--recipe", str(recipe), "-o", str(tmp_path / "bad"),
                                 "--set", "train.stepz=4"])
    assert result.exit_code == 2 and "unknown key 'train.stepz'" in result.output
    result = runner.invoke(app, ["flow", "train", "--recipe", str(recipe), "-o", str(tmp_path / "run"), "--steps", "4",
                                 "--set", "train.warmup_steps=2", "--set", "model.hidden_dim=8"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["train"]["warmup_steps"] == 2 and saved["model"]["hidden_dim"] == 8
    result = runner.invoke(app, ["flow", "train", "--recipe", str(recipe), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--resume" in result.output

    result = runner.invoke(app, ["refine", str(tmp_path / "targets.cif"), "-o", str(tmp_path / "refined.cif"),
                                 "--model", str(tmp_path / "run"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert len(list(read_structures(tmp_path / "refined.cif"))) == 2
    result = runner.invoke(app, ["refine", str(tmp_path / "targets.cif"), "-o", str(tmp_path / "x.cif"),
                                 "--model", "no-such-model"])
    assert result.exit_code == 2 and "no such flow run" in result.output


def test_shipped_recipes_are_valid():
    recipes = sorted((REPO / "training").glob("flow-*.toml"))
    assert recipes
    for path in recipes:
        config = RunConfig.from_dict(tomllib.loads(path.read_text()), str(path))
        assert config.train.lambda_f == 200.0 and config.train.lambda_l == 1.0


def test_pairs_count_each_target_once_when_records_repeat_it(tmp_path):
    """crystal encode writes one record per prompt task: the same material under one id several times."""
    rows = [{"id": name, "task": task, "prompt": "p", "completion": encode_structure(s)}
            for name, s in TARGETS.items() for task in ("unconditional", "formula", "spacegroup")]
    rows.append({"id": "ZnO", "task": "unconditional", "prompt": "p",
                 "completion": encode_structure(TARGETS["ZnO"].copy().perturb(0.1))})  # same id, other cell
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = build_pairs(tmp_path / "records.jsonl", tmp_path / "pairs", NOISE, PairOptions(samples_per_target=1, seed=0))
    assert stats["this_run"]["targets"] == 3 and stats["this_run"]["skipped"]["duplicate"] == 4


def test_llm_pairs_become_a_formula_conditioned_positives_pool(tmp_path):
    """training/pairs_pool.py: the c0 of each LLM pair, written back in the training text under the formula
    prompt it was drawn with (perturbed pairs are not LLM samples and are left out); the pool is read by
    read_positives, which keeps the valid sample and drops the stacked one. An existing output is kept."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from crystal_cli.bases import smollm2_tokenizer
    from crystal_cli.codec import conditional_prompt, parse_crystal
    from crystal_cli.finetune.data import read_positives
    from crystal_cli.flow.pairs import make_pair

    zno, tio2 = TARGETS["ZnO"], TARGETS["TiO2"]
    stacked = tio2.copy()
    stacked.replace(1, "Ti", [0, 0, 0])  # two Ti on one site: parses, but is not a valid crystal
    rows = [make_pair("ZnO#0", "ZnO", zno.copy().perturb(0.05), zno, "llm"),
            make_pair("TiO2#0", "TiO2", stacked, tio2, "llm"),
            make_pair("TiO2#p", "TiO2", tio2.copy().perturb(0.05), tio2, "perturbed")]
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = tmp_path / "pool.jsonl"
    script = [sys.executable, str(REPO / "training" / "pairs_pool.py"), str(tmp_path / "pairs"), "-o", str(pool)]
    subprocess.run(script, check=True, capture_output=True)
    written = read_jsonl(pool)
    assert [(r["id"], r["prompt"]) for r in written] == [("ZnO#0", conditional_prompt({"formula": "ZnO"})),
                                                        ("TiO2#0", conditional_prompt({"formula": "TiO2"}))]
    back = parse_crystal(written[0]["text"]).structure
    assert back.composition.reduced_formula == "ZnO" and len(back) == 4
    assert back.lattice.abc == pytest.approx(Structure.from_dict(rows[0]["c0"]).lattice.abc, abs=0.051)  # lengths to 0.1 Å

    examples, _, counts = read_positives(pool, AutoTokenizer.from_pretrained(str(smollm2_tokenizer())), 320)
    assert counts["positives"] == 1 and [e.completion for e in examples] == [written[0]["text"]]
    before = pool.read_bytes()
    refused = subprocess.run(script, capture_output=True, text=True)
    assert refused.returncode != 0 and "exists" in refused.stderr and pool.read_bytes() == before
