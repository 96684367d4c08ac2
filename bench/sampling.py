"""Sampling speed, side by side: llama.cpp batched vs transformers batched, same weights, prompt and N.

Prints structures/s and tokens/s of each backend, their ratio, parse rates, the grammar's per-token overhead
(llama.cpp with vs without the grammar), the gain from appending grammar-forced tokens unsampled (llama.cpp
with the grammar, skipping on vs off), the same sampler on q8_0 weights, and decoding throughput as a fraction
of this machine's measured float32 matmul throughput (torch, all threads). llama.cpp runs the f32 export by
default: the transformers side's own weights.

    python bench/sampling.py                          # the shipped default model (models/default), N=64
    python bench/sampling.py --model smollm2-135m     # the bare base; or --model runs/NAME (a finetune run)

GPU: build llama-cpp-python with CMAKE_ARGS="-DGGML_CUDA=on" (see Makefile), and this script's llama.cpp
numbers use it as they are (all layers are offloaded by default); transformers runs on CPU here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()


def matmul_gflops(seconds: float = 3.0) -> float:
    """float32 GEMM throughput with torch on all threads (the machine's practical dense-math ceiling)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * 1024**3 * count / (time.perf_counter() - start) / 1e9


def show(name: str, r: dict) -> None:
    print(f"{name:24s} {r['structures_per_s']:6.2f} structures/s  {r['tokens_per_s']:7.1f} tokens/s  "
          f"parse {r['parse_rate']:6.1%}  {r['seconds']:6.1f} s", flush=True)


def run_backend(sampler, prompt: str, jobs) -> dict:
    from crystal_cli import codec

    start = time.perf_counter()
    finished = list(sampler.run(prompt, jobs))
    seconds = time.perf_counter() - start
    tokens = sum(f.tokens for f in finished)
    ok = sum(codec.parse_crystal(f.text).ok for f in finished)
    return {"n": len(finished), "seconds": seconds, "tokens": tokens, "structures_per_s": len(finished) / seconds,
            "tokens_per_s": tokens / seconds, "parse_rate": ok / len(finished)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "default"),
                        help="run directory or base (default: models/default)")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--max-atoms", type=int, default=20)
    parser.add_argument("--quant", default="f32", help="llama.cpp weight type (f32: the transformers side's own weights; "
                        "the ablations add q8_0)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-ablations", action="store_true", help="only llama.cpp (grammar) and transformers")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from crystal_cli import codec
    from crystal_cli.export import cached_export
    from crystal_cli.grammar import crystal_gbnf, max_new_tokens
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings, job_seed

    torch.set_num_threads(args.threads)
    prompt = codec.unconditional_prompt()
    gbnf = crystal_gbnf(args.max_atoms)
    settings = SamplingSettings(args.temperature, args.top_p, max_new_tokens(args.max_atoms), args.parallel, args.threads)
    jobs = [Job(i, job_seed(0, i)) for i in range(args.n)]
    report: dict = {"model": args.model, "n": args.n, "parallel": args.parallel, "max_atoms": args.max_atoms,
                    "quant": args.quant, "threads": args.threads}

    report["matmul_gflops"] = matmul_gflops()
    runs = [("llama_grammar", args.quant, gbnf, settings)]
    if not args.skip_ablations:
        runs += [("llama_grammar_no_skip", args.quant, gbnf, replace(settings, skip_forced=False)),
                 ("llama_free", args.quant, None, settings)]
        if args.quant != "q8_0":
            runs.append(("llama_grammar_q8_0", "q8_0", gbnf, settings))
    for name, quant, grammar, run_settings in runs:
        with LlamaModel(cached_export(args.model, quant), threads=args.threads) as model:
            report["params"] = model._llama.llama_model_n_params(model.model)
            sampler = BatchedSampler(model, run_settings, grammar)
            report[name] = run_backend(sampler, prompt, jobs)
            show(name, report[name])
            sampler.close()
    params = report["params"]

    if not args.skip_transformers:
        from crystal_cli.bases import smollm2_gguf, source_gguf
        from crystal_cli.models import load_trained, model_dir
        from crystal_cli.sampling.hf_backend import HFSampler, load_vocab_grammar

        base_dir = model_dir(args.model)
        hf_model, tokenizer = load_trained(args.model, merge=True)
        engine, vocab_model = load_vocab_grammar(source_gguf(base_dir) or smollm2_gguf(), gbnf)
        report["transformers_grammar"] = run_backend(HFSampler(hf_model, tokenizer, settings, engine, vocab_model.end_tokens), prompt, jobs)
        show("transformers_grammar", report["transformers_grammar"])
        engine.close()
        vocab_model.close()
        report["ratio_llama_vs_transformers"] = (
            report["llama_grammar"]["structures_per_s"] / report["transformers_grammar"]["structures_per_s"]
        )

    def per_token(r: dict) -> float:
        return r["seconds"] / r["tokens"]

    names = [name for name, *_ in runs] + ["transformers_grammar"]
    if "llama_free" in report:
        report["grammar_overhead_per_token"] = per_token(report["llama_grammar"]) / per_token(report["llama_free"]) - 1
        report["grammar_overhead_per_token_no_skip"] = per_token(report["llama_grammar_no_skip"]) / per_token(report["llama_free"]) - 1
        report["forced_skip_speedup"] = per_token(report["llama_grammar_no_skip"]) / per_token(report["llama_grammar"])
    for name in names:
        if name in report:
            report[name]["matmul_fraction"] = report[name]["tokens_per_s"] * 2 * params / 1e9 / report["matmul_gflops"]

    print(f"\nmodel {args.model} ({params / 1e6:.0f}M params, llama.cpp {args.quant}), N={args.n}, "
          f"parallel={args.parallel}, max atoms {args.max_atoms}, {args.threads} threads")
    print(f"machine float32 matmul: {report['matmul_gflops']:.1f} GFLOP/s")
    for name in names:
        if name in report:
            print(f"{name:24s} {report[name]['matmul_fraction']:.1%} of the matmul peak (2 x params FLOP/token)")
    if "ratio_llama_vs_transformers" in report:
        print(f"llama.cpp / transformers (both with grammar): {report['ratio_llama_vs_transformers']:.2f}x")
    if "forced_skip_speedup" in report:
        print(f"grammar overhead per token (llama.cpp): {report['grammar_overhead_per_token']:+.1%} with forced tokens "
              f"skipped, {report['grammar_overhead_per_token_no_skip']:+.1%} with every token sampled")
        print(f"skipping forced tokens: {report['forced_skip_speedup']:.2f}x tokens/s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
