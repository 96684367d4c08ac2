"""Does the model read its prompt? Teacher-forced log-likelihood of true crystals under three prompts.

For N val records of one conditional task (formula or spacegroup), the negative log-likelihood (nats, summed
over the completion's tokens and EOS, full-vocabulary softmax: `crystal perplexity`'s quantity,
perplexity.summed_nll) of the record's crystal text under its own prompt, under
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


def prompt_nlls(model_spec: str, task: str, n: int = 60, offset: int = 7,
                records_path: Path = ROOT / "runs/data/mp20-open/val.jsonl") -> dict[str, float]:
    """Mean summed NLL (nats per crystal) of the first n val records of `task` under each of the three prompts."""
    from crystal_cli import codec
    from crystal_cli.finetune.data import Example, tokenize_completion
    from crystal_cli.models import LLM, load_trained, resolve_model
    from crystal_cli.perplexity import summed_nll
    from crystal_cli.structure_io import read_jsonl

    if not records_path.exists():
        raise SystemExit(f"prompt_effect: {records_path} is missing (make corpus)")
    records = [r for r in read_jsonl(records_path) if r.get("task") == task][:n]
    if len(records) <= offset:
        raise SystemExit(f"prompt_effect: {records_path} has {len(records)} {task} records, need > {offset}")
    model, tokenizer = load_trained(resolve_model(model_spec, LLM))

    prompts = {
        "own prompt": [r["prompt"] for r in records],
        "unconditional prompt": [codec.unconditional_prompt()] * len(records),
        WRONG: [codec.conditional_prompt({task: records[(i + offset) % len(records)][task]})
                for i in range(len(records))],
    }
    completions = [tokenize_completion(tokenizer, r["completion"]) for r in records]
    means = {}
    for name, texts in prompts.items():
        examples = [Example(tokenizer(prompt)["input_ids"], r["completion"], ids, True)
                    for prompt, r, ids in zip(texts, records, completions)]
        means[name] = sum(summed_nll(model, examples, tokenizer.pad_token_id)) / len(records)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="finished run directory or shipped name")
    parser.add_argument("--task", choices=TASKS, default="formula")
    parser.add_argument("-n", type=int, default=60, help="val records of the task (the first N)")
    parser.add_argument("--offset", type=int, default=7, help="the wrong prompt is record i + OFFSET's")
    parser.add_argument("--records", type=Path, default=ROOT / "runs/data/mp20-open/val.jsonl")
    args = parser.parse_args()

    means = prompt_nlls(args.model, args.task, args.n, args.offset, args.records)
    print(json.dumps({"model": args.model, "task": args.task, "records": args.n,
                      "nll_nats_per_crystal": {k: round(v, 2) for k, v in means.items()}}, indent=2))
    own = means["own prompt"]
    print(f"\n{args.task}: the own prompt's gain over the unconditional one {means['unconditional prompt'] - own:.2f} "
          f"nats per crystal, over another record's {means[WRONG] - own:.2f}")


if __name__ == "__main__":
    main()
