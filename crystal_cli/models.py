"""Trained models on disk and how to load them: one module for export, sampling, perplexity and the benches.

A finetune run directory (what `crystal finetune` writes, and what models/NAME ships) is recognised by its
config.json recording ``base_spec``. It holds either

* ``adapter/`` — a PEFT LoRA adapter over the base named in config.json (the base is re-resolved from
  ``base_spec`` when the cached path of another machine is gone), or
* ``model/`` — the whole model as a transformers directory (full fine-tuning, or a model trained from
  scratch); config.json still names the base it started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from crystal_cli.errors import CrystalError

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def load_base(base_dir: Path, device, dtype):
    """(model, tokenizer) of a transformers directory; pad = eos so no token is ever added."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # never add a token: adapters must not touch embeddings
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    return model, tokenizer


@dataclass(frozen=True)
class RunInfo:
    base_dir: Path  # the model weights to load: the base (LoRA runs) or RUN/model (whole-model runs)
    adapter_dir: Path | None  # the LoRA adapter applied on base_dir; None for whole-model runs
    config: dict


def is_run_dir(path: str | Path) -> bool:
    """A finetune run (its config.json records base_spec), as opposed to a base model directory."""
    try:
        return "base_spec" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def load_run(run_dir: str | Path) -> RunInfo:
    """A finished run: its whole model (model/) or its adapter (adapter/) with the re-resolved base."""
    from crystal_cli.bases import resolve_base

    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise CrystalError(f"{run_dir}: not a crystal finetune run (no config.json)")
    config = json.loads(config_file.read_text())
    whole, adapter_dir = run_dir / MODEL_DIR, run_dir / ADAPTER_DIR
    if (whole / "config.json").is_file():
        return RunInfo(base_dir=whole.resolve(), adapter_dir=None, config=config)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CrystalError(f"{run_dir}: run not finished (no adapter/ or model/); continue it with crystal finetune --resume")
    base_dir = Path(config["base"])
    if not (base_dir / "config.json").is_file():
        base_dir = resolve_base(config["base_spec"])
    return RunInfo(base_dir=base_dir, adapter_dir=adapter_dir.resolve(), config=config)


def model_dir(spec: str | Path) -> Path:
    """The transformers directory whose tokenizer and provenance a run or base spec uses."""
    from crystal_cli.bases import resolve_base

    return load_run(spec).base_dir if is_run_dir(spec) else resolve_base(spec)


def load_trained(model_spec: str | Path, device: str = "cpu", dtype=None, merge: bool = False):
    """(model in eval mode, tokenizer) for a finished run directory, or a bare base spec (no adapter).
    merge=True folds a LoRA adapter into the base weights (plain transformers model: faster inference)."""
    from crystal_cli.bases import resolve_base

    dtype = dtype or torch.float32
    if is_run_dir(model_spec):
        info = load_run(model_spec)
        model, tokenizer = load_base(info.base_dir, device, dtype)
        if info.adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(info.adapter_dir)).to(device)
            if merge:
                model = model.merge_and_unload()
    else:
        model, tokenizer = load_base(resolve_base(model_spec), device, dtype)
    return model.eval(), tokenizer
