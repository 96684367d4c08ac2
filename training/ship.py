"""Copy a finished run into models/NAME: what `crystal generate -m NAME` (or `crystal refine --model NAME`)
loads, small enough to commit.

    python training/ship.py runs/smollm2-135m-mp20-cpu default        # LoRA run -> models/default
    python training/ship.py runs/flow-mp20 flow-default                 # flow run -> models/flow-default

LoRA runs: config.json (base kept as its spec, e.g. "smollm2-135m", re-resolved on the user's machine),
summary.json, metrics.jsonl and adapter/ with the weights stored in float16 (half the bytes; they are
upcast when loaded). Flow runs: config.json, summary.json, metrics.jsonl and the EMA weights. The model card
(models/NAME/README.md) is written by hand from the run's numbers and bench/table1.py; it is kept if present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ship_lora(run: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = json.loads((run / "config.json").read_text())
    config["base"] = config["base_spec"]  # the run's absolute cache path means nothing elsewhere
    config["data"]["records"] = str(Path(config["data"]["records"]).relative_to(ROOT)) if Path(
        config["data"]["records"]).is_relative_to(ROOT) else config["data"]["records"]
    (target / "adapter").mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = config["base_spec"]
    (target / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, target / "adapter" / "adapter_model.safetensors")


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
    if (args.run / "adapter").is_dir():
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
