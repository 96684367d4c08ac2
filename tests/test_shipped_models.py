"""The models that ship in models/: `crystal generate` and `crystal refine` use them with no -m/--model, and
they are what their model cards say (a from-scratch Llama shipped as its delta; the flow refiner's EMA weights)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.cli import app
from crystal_cli.datasets import read_structures
from crystal_cli.structure_io import read_jsonl, write_structures

MODELS = Path(__file__).resolve().parents[1] / "models"
runner = CliRunner()


def test_default_model_is_a_small_delta_with_a_card():
    """models/default is a whole model trained from scratch, shipped as its delta from the seeded base."""
    from safetensors import safe_open

    from crystal_cli.models import DELTA, load_run

    config = json.loads((MODELS / "default" / "config.json").read_text())
    assert config["base"] == config["base_spec"] == "scratch-384x8"  # re-built from its seed on any machine
    assert config["train"]["method"] == "full" and config["train"]["loss_vocab"] == "crystal"
    delta = MODELS / "default" / "model" / DELTA
    assert delta.stat().st_size < 40e6
    with safe_open(str(delta), "pt") as handle:
        rows = handle.get_slice("model.embed_tokens.weight.rows").get_shape()
    assert rows[0] < 5000  # the embedding's trained rows, not all 49,152
    info = load_run(MODELS / "default")
    assert info.adapter_dir is None and json.loads((info.base_dir / "config.json").read_text())["hidden_size"] == 384
    card = (MODELS / "default" / "README.md").read_text()
    for must in ("training/scratch-384x8-mp20-cpu.toml", "bench/table1.py", "bench/model_choice.py", "val loss",
                 "wall time"):
        assert must in card


def test_generate_without_model_uses_the_shipped_default(tmp_path):
    out = tmp_path / "s.cif"
    result = runner.invoke(app, ["generate", "--formula", "LiFePO4", "-n", "3", "--parallel", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert codec.parse_crystal(row["text"]).structure.composition.reduced_formula == "LiFePO4"
    assert len(list(read_structures(out))) == 3


def test_spacegroup_run_reports_how_many_samples_have_the_group_asked_for(tmp_path):
    """The shipped default honours Fm-3m often (its card: ~2 in 3), so the count is checked on real matches."""
    out = tmp_path / "fm3m.jsonl"
    result = runner.invoke(app, ["generate", "--spacegroup", "225", "-n", "8", "--parallel", "8", "--seed", "4",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    found = [codec.spacegroup_number(codec.parse_crystal(r["text"]).structure) for r in read_jsonl(out)]
    matched = found.count(225)
    assert matched > 0  # else a count stuck at 0 would pass
    assert f"space group 225 found (symprec {codec.SYMPREC} Å) in {matched}/8" in " ".join(result.output.split())


def test_refine_without_model_uses_the_shipped_flow(tmp_path, structures):
    write_structures(tmp_path / "in.cif", [("NaCl", structures["NaCl"]), ("Si", structures["Si"])])
    result = runner.invoke(app, ["refine", str(tmp_path / "in.cif"), "-o", str(tmp_path / "out.cif"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    refined = list(read_structures(tmp_path / "out.cif"))
    assert [e.structure.composition for e in refined] == [structures["NaCl"].composition, structures["Si"].composition]


def test_flow_pairs_takes_the_shipped_default_by_name(tmp_path, structures):
    """`crystal flow pairs --model default` resolves -m as `crystal generate` does (FlowLLM's pairs from the
    shipped LLM), here in two worker processes that each load their own copy (LLMSamples pickles as its
    arguments): one c0 per target with the target's exact composition, aligned site by site."""
    write_structures(tmp_path / "t.cif", [("NaCl", structures["NaCl"]), ("Si", structures["Si"])])
    result = runner.invoke(app, ["flow", "pairs", str(tmp_path / "t.cif"), "-o", str(tmp_path / "p"),
                                 "--model", "default", "--temperature", "0.7", "--workers", "2"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "p" / "pairs.jsonl")
    assert [r["target_id"] for r in rows] == ["NaCl", "Si"] and {r["source"] for r in rows} == {"llm"}
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"] == str((MODELS / "default").resolve())


def test_batched_llm_pairs_draw_what_one_target_at_a_time_draws(structures):
    """LLMSamples.draw_many runs every target's sequences in one batch (a prompt and grammar per slot); each
    target still gets exactly the samples a draw() of its own gives (seeds from its stream), in input order."""
    import numpy as np

    from crystal_cli.flow.pairs import LLMSamples

    source = LLMSamples("default", temperature=0.7, min_distance=0.5, parallel=4, threads=1)
    names = ["NaCl", "Si", "CsCl"]
    batched = list(source.draw_many([(n, structures[n], np.random.default_rng(k)) for k, n in enumerate(names)], 2))
    assert [entry[0] for entry in batched] == names
    for k, (name, target, samples) in enumerate(batched):
        alone = source.draw(structures[name], 2, np.random.default_rng(k))
        assert len(samples) == len(alone) == 2
        for a, b in zip(samples, alone):
            assert not isinstance(a, str) and a.composition == target.composition
            assert a.lattice == b.lattice and np.allclose(a.frac_coords, b.frac_coords)
