"""Training throughput of crystal's LoRA step against a plain transformers loop, on the same batch.

For each base (tiny, smollm2-135m) and each loop, one fresh subprocess (so peak RSS is its own) builds the
same LoRA model and the same batch of real crystal records, runs warm-up steps, then times N optimizer steps:

* plain:   model(input_ids, attention_mask, labels=labels).loss, the textbook transformers loop
* crystal: crystal_cli.finetune.completion_nll (lm_head on completion positions only), as `crystal finetune`

Prints tokens/s (non-padding input tokens), seconds per step and peak memory, and the crystal/plain ratio.
Usage: .venv/bin/python bench/train_throughput.py [--bases tiny smollm2-135m] [--steps 5] [--batch 4] [--length 256]
       [--threads N]   (on a busy shared host, --threads 1 avoids oversubscription stalls)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()


def crystal_texts(count: int) -> list[dict]:
    """Unconditional records of real MP-20 rows (../shared/data) or pymatgen-built cells otherwise."""
    from crystal_cli import codec
    from crystal_cli.datasets import read_structures

    shared = REPO.parent / "shared" / "data" / "mp_20" / "val.csv.gz"
    structures = []
    if shared.exists():
        for entry in read_structures(shared):
            if entry.structure is not None:
                structures.append(entry.structure)
            if len(structures) == count:
                break
    else:
        from pymatgen.core import Lattice, Structure

        structures = [Structure(Lattice.cubic(3.0 + 0.1 * i), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
                      for i in range(count)]
    prompt = codec.unconditional_prompt()
    return [{"prompt": prompt, "completion": codec.encode_structure(s)} for s in structures]


def measure(base: str, loop: str, steps: int, batch: int, length: int, precision: str, threads: int,
            warmup: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model

    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune import ALL_LINEAR, collate, completion_nll, make_examples
    from crystal_cli.models import load_base

    torch.manual_seed(0)
    model, tokenizer = load_base(resolve_base(base), "cpu", torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=ALL_LINEAR,
                                             task_type="CAUSAL_LM"))
    examples, _ = make_examples(tokenizer, crystal_texts(batch * 4), length)
    data = collate(examples[:batch], tokenizer.pad_token_id)
    net = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            if loop == "plain":
                loss = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
            else:
                nll, _ = completion_nll(net, data)
                loss = nll.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    tokens = int(data["attention_mask"].sum()) * steps
    return {"base": base, "loop": loop, "precision": precision, "threads": torch.get_num_threads(), "tokens_per_s": tokens / elapsed,
            "s_per_step": elapsed / steps, "batch": list(data["input_ids"].shape),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="longest example kept (tokens)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("BASE", "LOOP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.batch, args.length, args.precision, args.threads, args.warmup)))
        return
    from rich.console import Console
    from rich.table import Table

    threads = args.threads or "default"
    table = Table(title=f"LoRA r=8 training step on CPU ({os.cpu_count()} cores, {threads} threads, {args.precision}), same batch")
    for column in ("base", "loop", "batch", "tokens/s", "s/step", "peak RSS MB", "crystal/plain"):
        table.add_column(column, justify="left" if column in ("base", "loop") else "right")
    for base in args.bases:
        results = {}
        for loop in ("plain", "crystal"):
            command = [sys.executable, __file__, "--one", base, loop, "--steps", str(args.steps), "--batch",
                       str(args.batch), "--length", str(args.length), "--precision", args.precision,
                       "--threads", str(args.threads), "--warmup", str(args.warmup)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[loop] = json.loads(out.strip().splitlines()[-1])
        ratio = results["crystal"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        for loop, r in results.items():
            table.add_row(base, loop, "×".join(map(str, r["batch"])), f"{r['tokens_per_s']:,.0f}",
                          f"{r['s_per_step']:.3f}", f"{r['peak_rss_mb']:,.0f}", f"{ratio:.2f}" if loop == "crystal" else "")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
