"""The one config system and LR schedule of both trainers (crystal_cli.recipes)."""

from __future__ import annotations

import math

import pytest

from crystal_cli import recipes
from crystal_cli.errors import CrystalError
from crystal_cli.finetune import RunConfig as FinetuneConfig
from crystal_cli.flow.train import RunConfig as FlowConfig


def test_schedule_warms_up_then_decays_to_its_floor():
    assert recipes.lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert recipes.lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert recipes.lr_factor(10, 10, 110) == pytest.approx(1.0)
    assert recipes.lr_factor(60, 10, 110) == pytest.approx(0.5)
    assert recipes.lr_factor(110, 10, 110) == pytest.approx(0.0)
    assert recipes.lr_factor(500, 10, 110, min_ratio=0.1) == pytest.approx(0.1)  # held at the floor after the end
    middle = recipes.lr_factor(35, 10, 110, min_ratio=0.1)
    assert middle == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_build_checks_keys_types_and_choices_for_both_trainers():
    config = recipes.build(FinetuneConfig, {"base": "tiny", "train.batch_size": 3, "lora.target_modules": ["q_proj"]},
                           "x")
    assert config.base == "tiny" and config.train.batch_size == 3 and config.lora.target_modules == ["q_proj"]
    assert config.train.learning_rate == FinetuneConfig().train.learning_rate  # untouched keys keep defaults
    over = recipes.build(FinetuneConfig, {"train.learning_rate": 1}, "x", start=config)
    assert over.train.learning_rate == 1.0 and isinstance(over.train.learning_rate, float) and over.base == "tiny"
    with pytest.raises(CrystalError, match="x: train.batch_size: expected int, got str"):
        recipes.build(FinetuneConfig, {"train.batch_size": "3"}, "x")
    with pytest.raises(CrystalError, match="x: unknown key 'model.hidden_dim'"):
        recipes.build(FinetuneConfig, {"model.hidden_dim": 3}, "x")
    with pytest.raises(CrystalError, match="train.method must be one of lora, full"):
        recipes.build(FinetuneConfig, {"train.method": "half"}, "x", choices={"train.method": ("lora", "full")})
    flow = recipes.build(FlowConfig, {"pairs": "p", "model.hidden_dim": 8, "train.lr": 1e-3}, "y")
    assert flow.pairs == "p" and flow.model.hidden_dim == 8 and flow.train.lr == 1e-3
    with pytest.raises(CrystalError, match="y: missing 'pairs'"):
        recipes.build(FlowConfig, {"train.lr": 1e-3}, "y")
    assert recipes.as_flat(flow)["model.hidden_dim"] == 8 and recipes.flatten(FlowConfig, {"train": {"lr": 2}}) == {
        "train.lr": 2}


def test_overrides_read_toml_values():
    assert recipes.parse_overrides(["train.lr=1e-4", "base=tiny", "train.lr=2e-4"]) == {"train.lr": 2e-4, "base": "tiny"}
    with pytest.raises(CrystalError, match="expected KEY=VALUE"):
        recipes.parse_override("train.lr")
