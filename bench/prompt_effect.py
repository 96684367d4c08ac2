"""Does the model read its prompt? Teacher-forced log-likelihood of true crystals under three prompts.

For N val records of one conditional task (formula or spacegroup), the negative log-likelihood (nats, summed
over the completion's tokens, full-vocabulary softmax) of the record's crystal text under its own prompt, under
Crystal-LLM's unconditional prompt, and under the prompt of another record of the task (the condition of record
i + OFFSET). A model that uses the condition gives the true crystal a higher likelihood under its own prompt than
under the unconditional or a wrong one; a model that ignores it gives all three the same. Sampling tells the
same from the other side (bench/conditional.py: the condition in the prompt alone, against the unconditional
prompt with the same seeds). The full softmax puts some mass on tokens the crystal loss never trained, so the
absolute numbers compare prompts within one model, not models.

    python bench/prompt_effect.py --task formula        # the shipped default, 60 val records
    python bench/prompt_effect.py --task spacegroup --model runs/NAME
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("formula", "spacegroup")  # tasks whose prompt states a record field of the same name
WRONG = "another record's prompt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="finished run directory or shipped name")
    parser.add_argument("--task", choices=TASKS, default="formula")
    parser.add_argument("-n", type=int, default=60, help="val records of the task (the first N)")
    parser.add_argument("--offset", type=int, default=7, help="the wrong prompt is record i + OFFSET's")
    parser.add_argument("--records", type=Path, default=ROOT / "runs/data/mp20-open/val.jsonl")
    args = parser.parse_args()

    import torch

    from crystal_cli import codec
    from crystal_cli.models import LLM, load_trained, resolve_model
    from crystal_cli.structure_io import read_jsonl

    if not args.records.exists():
        raise SystemExit(f"prompt_effect: {args.records} is missing (make corpus)")
    records = [r for r in read_jsonl(args.records) if r.get("task") == args.task][:args.n]
    if len(records) <= args.offset:
        raise SystemExit(f"prompt_effect: {args.records} has {len(records)} {args.task} records, need > {args.offset}")
    model, tokenizer = load_trained(resolve_model(args.model, LLM))

    def nll(prompt: str, completion: str) -> float:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1:-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return -float(log_probs.gather(1, torch.tensor(completion_ids)[:, None]).sum())

    field = args.task
    totals = {"own prompt": 0.0, "unconditional prompt": 0.0, WRONG: 0.0}
    for i, record in enumerate(records):
        wrong = records[(i + args.offset) % len(records)][field]
        totals["own prompt"] += nll(record["prompt"], record["completion"])
        totals["unconditional prompt"] += nll(codec.unconditional_prompt(), record["completion"])
        totals[WRONG] += nll(codec.conditional_prompt({field: wrong}), record["completion"])
    means = {name: total / len(records) for name, total in totals.items()}
    print(json.dumps({"model": args.model, "task": args.task, "records": len(records),
                      "nll_nats_per_crystal": {k: round(v, 2) for k, v in means.items()}}, indent=2))
    own = means["own prompt"]
    print(f"\n{args.task}: the own prompt's gain over the unconditional one {means['unconditional prompt'] - own:.2f} "
          f"nats per crystal, over another record's {means[WRONG] - own:.2f}")


if __name__ == "__main__":
    main()
