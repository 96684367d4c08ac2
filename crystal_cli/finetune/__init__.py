"""Fine-tuning on crystal text records: `crystal finetune`.

config.py   the recipe's tables, recipe + `--set` resolution, what `--resume` may change
data.py     records -> tokenized examples -> length-bucketed, seeded batches
model.py    LoRA or full training, device/precision, the completion loss
trainer.py  the loop: steps, evaluation, checkpoints, exact resume, DDP
"""

from crystal_cli.finetune.config import RunConfig, load_recipe, resolve_config
from crystal_cli.finetune.trainer import FinetuneResult, StepEvent, finetune

__all__ = ["FinetuneResult", "RunConfig", "StepEvent", "finetune", "load_recipe", "resolve_config"]
