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
# In a shipped whole model (training/ship.py): the tensors that differ from the run's base, with an
# embedding stored as its changed rows (NAME.rows + NAME.ids): a model trained from scratch uses a few
# thousand of its 49,152 token rows, the rest stay the seeded initialisation the base rebuilds anyway.
DELTA = "crystal-delta.safetensors"


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory, its *.safetensors shards merged (on the CPU, as stored)."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        weights |= load_file(path)
    return weights


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
    if (whole / DELTA).is_file():
        return RunInfo(base_dir=_materialized(whole, config["base_spec"]), adapter_dir=None, config=config)
    if (whole / "config.json").is_file():
        return RunInfo(base_dir=whole.resolve(), adapter_dir=None, config=config)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CrystalError(f"{run_dir}: run not finished (no adapter/ or model/); continue it with crystal finetune --resume")
    base_dir = Path(config["base"])
    if not (base_dir / "config.json").is_file():
        base_dir = resolve_base(config["base_spec"])
    return RunInfo(base_dir=base_dir, adapter_dir=adapter_dir.resolve(), config=config)


def _materialized(whole: Path, base_spec: str) -> Path:
    """The transformers directory of a shipped delta model (base + delta), built once into the base cache."""
    from crystal_cli.bases import cached, resolve_base, source_gguf
    from crystal_cli.files import sha256_file

    def build(out: Path) -> dict:
        import shutil

        from safetensors.torch import load_file, save_file

        base = resolve_base(base_spec)
        weights = read_weights(base)
        delta = load_file(whole / DELTA)
        for name, tensor in delta.items():
            if name.endswith(".rows"):
                target = name.removesuffix(".rows")
                weights[target][delta[f"{target}.ids"]] = tensor.to(weights[target].dtype)
            elif not name.endswith(".ids"):
                weights[name] = tensor.float()
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
        for path in whole.iterdir():
            if path.name != DELTA:
                shutil.copy2(path, out / path.name)
        tokenizer_gguf = source_gguf(base)
        return {"kind": "shipped-delta", "base_spec": base_spec, "source": str(whole),
                "tokenizer_gguf": str(tokenizer_gguf) if tokenizer_gguf else None}

    return cached(f"delta-{sha256_file(whole / DELTA)[:16]}", build)


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


# ----------------------------------------------------------------------------------- shipped models

LLM, FLOW = "llm", "flow"
DEFAULTS = {LLM: "default", FLOW: "flow-default"}  # what `crystal generate` / `crystal refine` use unasked
SHIPPED_PACKAGE_DIR = "shipped"  # where a built wheel puts models/ inside the package (pyproject.toml)


def shipped_dir() -> Path | None:
    """The folder of shipped models: $CRYSTAL_MODELS, else the installed package's data (a wheel install),
    else models/ of the source checkout this package runs from (an editable install); None if none exists."""
    import os

    package = Path(__file__).resolve().parent
    checkout = package.parent
    candidates = [Path(os.environ["CRYSTAL_MODELS"])] if os.environ.get("CRYSTAL_MODELS") else []
    candidates.append(package / SHIPPED_PACKAGE_DIR)
    if (checkout / "pyproject.toml").is_file():  # never a stray models/ folder beside site-packages
        candidates.append(checkout / "models")
    return next((path for path in candidates if path.is_dir()), None)


def _is_flow_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not is_run_dir(path) and any(
        (path / name).is_file() for name in ("model.pt", "checkpoint.pt"))


def shipped_names(kind: str) -> list[str]:
    """Names of the shipped models of one kind (LLM: finetune runs and .gguf files; FLOW: flow runs)."""
    folder = shipped_dir()
    if folder is None:
        return []
    wanted = (lambda p: is_run_dir(p) or p.suffix == ".gguf") if kind == LLM else _is_flow_dir
    return sorted(p.stem if p.suffix == ".gguf" else p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and wanted(p))


def resolve_model(spec: str | Path | None, kind: str = LLM) -> str | Path:
    """The one model resolver: -m/--model as given -> an existing path, a base name (LLM: smollm2-135m,
    tiny; returned as the string) or a shipped model by name (models/NAME, or models/NAME.gguf for an LLM).
    None means the kind's shipped default."""
    from crystal_cli.bases import SMOLLM2, TINY

    if spec is None:
        spec = DEFAULTS[kind]
        if spec not in shipped_names(kind):
            flag = "-m MODEL (.gguf, finetune run directory" if kind == LLM else "--model RUN (flow run directory"
            raise CrystalError(f"no model given and no shipped {spec!r} installed: pass {flag} or a name in models/)")
    if kind == LLM and str(spec) in (SMOLLM2, TINY):
        return str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    folder = shipped_dir()
    if folder is not None:
        for candidate in (folder / str(spec), folder / f"{spec}.gguf") if kind == LLM else (folder / str(spec),):
            if candidate.exists():
                return candidate
    shipped = ", ".join(shipped_names(kind)) or "none installed"
    if kind == FLOW:
        raise CrystalError(f"{spec}: no such flow run or shipped model (shipped: {shipped})")
    raise CrystalError(f"model {str(spec)!r}: no such file or directory, nor a shipped model ({shipped})")


def model_fingerprint(source: str | Path) -> str:
    """Content hash of a resolved model (runs.fingerprint of the file or directory; a base name hashes the
    base directory it resolves to): what a manifest records so a resume can tell another model apart."""
    from crystal_cli.bases import resolve_base
    from crystal_cli.runs import fingerprint

    path = Path(source)
    return fingerprint(path if path.exists() else resolve_base(str(source)))
