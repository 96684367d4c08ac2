"""Training throughput: today's LoRA step against each speed change and each candidate model, one run.

Every row is one fresh subprocess (so peak RSS is its own) that builds its model, takes the SAME batch of
real mp20-open training records (all six tasks, or pymatgen-built cells without ../shared/data), runs
warm-up steps, then times N optimizer steps of the loss `crystal finetune` computes:

* plain:        model(input_ids, attention_mask, labels=labels).loss, the textbook transformers loop
* today:        crystal_cli.finetune.model.completion_nll (lm_head on completion positions only), fp32,
                torch's default (flash) CPU attention
* + crystal vocab: the softmax over the grammar's crystal tokens only (train.loss_vocab = "crystal")
* + bf16:       bf16 autocast, only where the CPU multiplies bf16 natively (avx512_bf16 / AMX)
* + bf16 weights: the frozen base held in bf16 (no cast of every weight at every step; LoRA stays fp32)
* + no LoRA dropout: lora.dropout = 0 (peft then skips the dropout of every adapted layer's input)
* + bf16 base weights: + no LoRA dropout with the frozen base held in bf16
* + math attention: + no LoRA dropout on scaled_dot_product_attention's math path instead of the CPU flash
                kernel (what crystal finetune runs on a CPU without AMX: finetune.model.compute_context)
* + CPU dropout: + bf16 with LoRA's dropout masks drawn by numpy's PCG64 (finetune.model.CpuDropout, what
                `crystal finetune` uses on a CPU) instead of torch's generator
* + compile:    + CPU dropout with the decoder under torch.compile (inductor, dynamic shapes: train.compile); slower on
                a Zen 5, faster on an AMX Xeon, where `crystal finetune` compiles under train.compile = "auto";
                the compiled attention is the model's matmul + softmax (finetune.model.compile_decoder)
* + no dropout + compile: the same on the + no LoRA dropout row
* + compile (torch dropout): + compile with nn.Dropout's masks (what crystal finetune compiled before CpuDropout)
* ... compile (SDPA attention): a compiled row with torch's scaled_dot_product_attention kept inside the
                compiled graph (what train.compile did before compile_decoder switched the attention)
* + 1 thread:   + bf16 on one torch thread (a second process would take the other core)
* candidate models at the best setting: SmolLM2-135M cut to its first 12 layers (LoRA and full), and a
  Llama trained from scratch (scratch-384x8), all with SmolLM2's tokenizer; the last with AdamW's fused
  kernel (what `crystal finetune` steps with) and with it + compile.

Columns: tokens/s (non-padding input tokens), crystals/s (examples per second), the share of the machine's
measured matmul peak (fp32 or bf16, whichever the row computes in; model FLOPs counted as 2 per weight per
token forward, 2 more backward for activations, 2 more for trained weights), seconds per step, peak RSS,
and the ratio to today's loop.
`--padding N` instead prints the share of padding in `crystal finetune`'s length-bucketed batches of the first
N train records, at exact widths and at collate's rounded ones: the most that packing examples into rows could
recover.
Usage: .venv/bin/python bench/train_throughput.py [--steps 3] [--batch 8] [--length 384] [--rows today,...]
       .venv/bin/python bench/train_throughput.py --padding 6144
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

from crystal_cli.runtime import configure_process, matmul_gflops  # noqa: E402

configure_process()

LORA_135M = {"base": "smollm2-135m", "method": "lora"}
ROWS = {  # name -> settings; a "+ X" row adds X to the row its name extends (listed above it)
    "plain": LORA_135M | {"loop": "plain", "vocab": "full", "precision": "fp32", "threads": 0},
    "today": LORA_135M | {"loop": "crystal", "vocab": "full", "precision": "fp32", "threads": 0},
    "+ crystal vocab": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "fp32", "threads": 0},
    "+ bf16": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0},
    "+ bf16 weights": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0,
                                   "weights": "bf16"},
    "+ no LoRA dropout": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0,
                                      "dropout": 0.0},
    "+ bf16 base weights": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16",
                                            "threads": 0, "dropout": 0.0, "weights": "bf16"},
    "+ math attention": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0,
                                     "dropout": 0.0, "attention": "math"},
    "+ CPU dropout": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0,
                                  "cpu_dropout": True},
    "+ compile": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0,
                              "cpu_dropout": True, "compile": True},
    "+ compile (torch dropout)": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16",
                                             "threads": 0, "compile": True},
    "+ no dropout + compile": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 0,
                                           "dropout": 0.0, "compile": True},
    "+ compile (SDPA attention)": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16",
                                              "threads": 0, "cpu_dropout": True, "compile": True,
                                              "compiled_attention": "sdpa"},
    "+ no dropout + compile (SDPA attention)": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16",
                                                           "threads": 0, "dropout": 0.0, "compile": True,
                                                           "compiled_attention": "sdpa"},
    "+ 1 thread": LORA_135M | {"loop": "crystal", "vocab": "crystal", "precision": "bf16", "threads": 1},
    "135M:12 LoRA": {"base": "smollm2-135m:12", "method": "lora", "loop": "crystal", "vocab": "crystal",
                                   "precision": "bf16", "threads": 0},
    "135M:12 full": {"base": "smollm2-135m:12", "method": "full", "loop": "crystal", "vocab": "crystal",
                                   "precision": "bf16", "threads": 0},
    "scratch-384x8 full": {"base": "scratch-384x8", "method": "full", "loop": "crystal", "vocab": "crystal",
                            "precision": "bf16", "threads": 0},
    "scratch-384x8 full + fused AdamW": {"base": "scratch-384x8", "method": "full", "loop": "crystal",
                                         "vocab": "crystal", "precision": "bf16", "threads": 0, "fused": True},
    "scratch-384x8 full + fused AdamW + compile": {"base": "scratch-384x8", "method": "full", "loop": "crystal",
                                                   "vocab": "crystal", "precision": "bf16", "threads": 0,
                                                   "fused": True, "compile": True},
    "scratch-384x8 full + fused AdamW + compile (SDPA attention)": {
        "base": "scratch-384x8", "method": "full", "loop": "crystal", "vocab": "crystal", "precision": "bf16",
        "threads": 0, "fused": True, "compile": True, "compiled_attention": "sdpa"},
    "scratch-384x8 full + math attention": {"base": "scratch-384x8", "method": "full", "loop": "crystal",
                                           "vocab": "crystal", "precision": "bf16", "threads": 0, "attention": "math"},
}


def training_records(count: int) -> list[dict]:
    """The first `count` mp20-open train records (make corpus), else unconditional pymatgen-built cells."""
    records = REPO / "runs" / "data" / "mp20-open" / "train.jsonl"
    if records.is_file():
        with records.open() as handle:
            return [json.loads(next(handle)) for _ in range(count)]
    from pymatgen.core import Lattice, Structure

    from crystal_cli import codec

    return [{"prompt": codec.unconditional_prompt(), "task": "unconditional",
             "completion": codec.encode_structure(Structure(Lattice.cubic(3.0 + 0.1 * i), ["Na", "Cl"],
                                                            [[0, 0, 0], [0.5, 0.5, 0.5]]))} for i in range(count)]


def model_flops(net, method: str, head_rows: int, completion_share: float) -> float:
    """FLOPs per input token of one training step: 2 per weight forward, 2 backward for activations, and 2
    more for weights that train (full); the head counts only its computed rows on completion positions."""
    embed = net.get_input_embeddings().weight
    body = sum(p.numel() for n, p in net.named_parameters() if p is not embed and "lora_" not in n)
    per_weight = 6 if method == "full" else 4
    return per_weight * body + per_weight * head_rows * embed.shape[1] * completion_share


def measure(row: str, steps: int, batch: int, length: int, warmup: int) -> dict:
    import torch

    from crystal_cli.runtime import cpu_has_bf16

    settings = ROWS[row]
    if settings["precision"] == "bf16" and not cpu_has_bf16():  # emulated bf16 is slower than fp32: run fp32
        settings = settings | {"precision": "fp32"}
    if settings["threads"] > 0:
        torch.set_num_threads(settings["threads"])
    from peft import LoraConfig, get_peft_model

    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune.config import ALL_LINEAR
    from crystal_cli.finetune.data import collate, make_examples
    from crystal_cli.finetune.model import (LossVocab, compile_decoder, completion_nll, compute_context,
                                            crystal_vocab, use_cpu_dropout)
    from crystal_cli.models import load_base

    torch.manual_seed(0)
    frozen = torch.bfloat16 if settings.get("weights") == "bf16" and settings["precision"] == "bf16" else torch.float32
    net, tokenizer = load_base(resolve_base(settings["base"]), "cpu", frozen)
    model = net
    if settings["method"] == "lora":
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=settings.get("dropout", 0.05), target_modules=ALL_LINEAR,
                          task_type="CAUSAL_LM")
        model = get_peft_model(net, lora)
        if settings.get("cpu_dropout"):
            use_cpu_dropout(model)
        net = model.get_base_model()
    if settings.get("compile"):
        compile_decoder(net, torch.device("cpu"), settings.get("compiled_attention", "matmul"))
    examples, _ = make_examples(tokenizer, training_records(batch * 8), length)
    chosen = examples[:batch]
    data = collate(chosen, tokenizer.pad_token_id)
    vocab = None
    head_rows = net.get_output_embeddings().weight.shape[0]
    if settings["vocab"] == "crystal":
        vocab = LossVocab.of(crystal_vocab(tokenizer, examples), head_rows, "cpu")
        head_rows = len(vocab.ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=settings.get("fused", False))
    bf16 = torch.bfloat16 if settings["precision"] == "bf16" else None

    def context():  # the math attention path crystal finetune takes on CPUs without AMX, or the fused kernel
        return compute_context(torch.device("cpu"), bf16, math_attention=settings.get("attention") == "math")

    def step() -> None:
        with context():
            if settings["loop"] == "plain":
                loss = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
            else:
                nll, _ = completion_nll(net, data, vocab)
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
    tokens = int(data["attention_mask"].sum())
    completion_share = int((data["labels"] != -100).sum()) / tokens
    return {"row": row, **settings, "threads": torch.get_num_threads(), "tokens_per_s": tokens * steps / elapsed,
            "crystals_per_s": len(chosen) * steps / elapsed, "s_per_step": elapsed / steps,
            "flops_per_token": model_flops(net, settings["method"], head_rows, completion_share),
            "batch": list(data["input_ids"].shape), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def padding_shares(count: int, batch: int, length: int) -> dict[int, float]:
    """Padding share of `count` train records in epoch 0's bucketed batches, per width multiple."""
    from transformers import AutoTokenizer

    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune.data import PAD_MULTIPLE, epoch_batches, make_examples

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_base("scratch-384x8")))  # SmolLM2's
    examples, _ = make_examples(tokenizer, training_records(count), length)
    lengths = [e.length for e in examples]
    shares = {}
    for multiple in (1, PAD_MULTIPLE):
        widths = [-(-max(lengths[i] for i in b) // multiple) * multiple * len(b) for b in epoch_batches(lengths, batch, 0, 0)]
        shares[multiple] = 1 - sum(lengths) / sum(widths)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=384, help="longest example kept (tokens)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench-train-throughput.json")
    parser.add_argument("--padding", type=int, metavar="N", help="print the padding share of N train records' batches")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.padding:
        for multiple, share in padding_shares(args.padding, args.batch, args.length).items():
            print(f"{args.padding} train records, batches of {args.batch}, widths a multiple of {multiple}: "
                  f"padding {share:.1%} of the tokens (packing could give at most {1 / (1 - share):.2f}x)")
        return
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.batch, args.length, args.warmup)))
        return
    from rich.console import Console
    from rich.table import Table

    from crystal_cli.runtime import cpu_has_bf16

    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    native_bf16 = cpu_has_bf16()
    peaks = {p: matmul_gflops(p, size=2048, seconds=2.0) for p in ("fp32", "bf16")}
    results = []
    for row in rows:
        command = [sys.executable, __file__, "--one", row, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--length", str(args.length), "--warmup", str(args.warmup)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    today = next((r for r in results if r["row"] == "today"), results[0])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    title = (f"training step on {cpu} ({os.cpu_count()} cores, native bf16: {'yes' if native_bf16 else 'no'}), "
             f"matmul peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16; same batch {today['batch']}")
    table = Table(title=title)
    for column in ("row", "base", "method", "vocab", "precision", "threads", "tokens/s", "crystals/s", "% of peak",
                   "s/step", "peak RSS MB", "× today"):
        table.add_column(column, justify="left" if column in ("row", "base", "method", "vocab", "precision") else "right")
    for r in results:
        r["share_of_peak"] = r["tokens_per_s"] * r["flops_per_token"] / (peaks[r["precision"]] * 1e9)
        r["vs_today"] = r["tokens_per_s"] / today["tokens_per_s"]
        table.add_row(r["row"], r["base"], r["method"], r["vocab"], r["precision"], str(r["threads"]),
                      f"{r['tokens_per_s']:,.0f}", f"{r['crystals_per_s']:.2f}", f"{r['share_of_peak']:.0%}",
                      f"{r['s_per_step']:.2f}", f"{r['peak_rss_mb']:,.0f}", f"{r['vs_today']:.2f}")
    Console(width=200).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu, "native_bf16": native_bf16, "peaks_gflops": peaks, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
