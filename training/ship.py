"""Copy a finished run into models/NAME: what `crystal generate -m NAME` (or `crystal refine --model NAME`)
loads, small enough to commit.

    python training/ship.py runs/smollm2-135m-mp20-cpu default        # LoRA run -> models/default
    python training/ship.py runs/flow-mp20 flow-default                 # flow run -> models/flow-default

LoRA runs: config.json (base kept as its spec, e.g. "smollm2-135m", re-resolved on the user's machine),
summary.json, metrics.jsonl and adapter/ with the weights stored in float16 (half the bytes; they are
upcast when loaded). Whole-model runs (train.method = "full"): the same, with model/ holding only what
differs from the base (see ship_whole) instead of adapter/.
Whatever models/NAME held before is replaced (stale files of the other kind are removed). Flow runs: config.json, summary.json, metrics.jsonl and the EMA weights. The model card
(models/NAME/README.md) is written by hand from the run's numbers and bench/table1.py; it is kept if present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _write_config(run: Path, target: Path) -> dict:
    """The run's config.json with the base kept as its spec and its data paths relative to the repository."""
    config = json.loads((run / "config.json").read_text())
    config["base"] = config["base_spec"]  # the run's absolute cache path means nothing elsewhere
    for key in ("records", "negatives", "positives"):
        if config["data"].get(key):
            path = Path(config["data"][key])
            config["data"][key] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def ship_lora(run: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = _write_config(run, target)
    (target / "adapter").mkdir(parents=True, exist_ok=True)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = config["base_spec"]
    (target / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, target / "adapter" / "adapter_model.safetensors")


def ship_whole(run: Path, target: Path) -> None:
    """A whole-model run: config.json as for LoRA runs; model/ with the tokenizer, the model config and
    crystal-delta.safetensors, the float16 tensors that differ from the base (an embedding as its changed
    rows), which crystal_cli.models rebuilds on top of the re-resolved base on first use."""
    from safetensors.torch import save_file

    from crystal_cli.bases import resolve_base
    from crystal_cli.models import DELTA, read_weights

    config = _write_config(run, target)
    base = read_weights(resolve_base(config["base_spec"]))
    trained = read_weights(run / "model")
    delta = {}
    for name, tensor in trained.items():
        before = base.get(name)
        if before is not None and before.shape == tensor.shape and tensor.ndim == 2:
            changed = (tensor != before).any(dim=1).nonzero()[:, 0]
            if len(changed) < tensor.shape[0] // 2:  # mostly untouched rows: an embedding
                delta[f"{name}.rows"], delta[f"{name}.ids"] = tensor[changed].half(), changed
                continue
        if before is None or not torch.equal(tensor, before):
            delta[name] = tensor.half()
    (target / "model").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in delta.items()}, target / "model" / DELTA, metadata={"format": "pt"})
    for path in (run / "model").iterdir():
        if path.suffix != ".safetensors" and path.name != "crystal-base.json":  # its paths are this machine's
            shutil.copy2(path, target / "model" / path.name)


def ship_flow(run: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.pt"):  # the EMA weights; never checkpoint.pt (optimizer state)
        shutil.copy2(run / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    args = parser.parse_args()
    target = ROOT / "models" / args.name
    for stale in ("adapter", "model"):  # weights this script shipped before; the card (README.md) stays
        shutil.rmtree(target / stale, ignore_errors=True)
    if (args.run / "model" / "config.json").is_file():
        ship_whole(args.run, target)
    elif (args.run / "adapter").is_dir():
        ship_lora(args.run, target)
    elif (args.run / "config.json").is_file():
        ship_flow(args.run, target)
    else:
        raise SystemExit(f"{args.run}: not a finished finetune or flow run")
    for name in ("summary.json", "metrics.jsonl"):
        if (args.run / name).exists():
            shutil.copy2(args.run / name, target / name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"{target}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
