"""Sampling speed, side by side: llama.cpp batched vs transformers batched, same weights, prompt and N.

Prints structures/s and tokens/s of each backend, their ratio, parse rates, the grammar's per-token overhead
(llama.cpp with vs without the grammar), the gain from appending grammar-forced tokens unsampled (llama.cpp
with the grammar, skipping on vs off), the same sampler on q8_0 weights, the distance guard on vs off
(sampling/guard.py; same seeds; its speed cost and the samples' structural validity, i.e. every distance
>= 0.5 Å with periodic images, compositional validity, no_room count), and decoding throughput as a fraction
of this machine's measured float32 matmul throughput (torch, all threads). llama.cpp runs the f32 export by
default: the transformers side's own weights.

    python bench/sampling.py                          # the shipped default model (models/default), N=64
    python bench/sampling.py --model smollm2-135m     # the bare base; or --model runs/NAME (a finetune run)
    python bench/sampling.py --guard-only --temperature 1.0 --repeats 2   # just guard off/on, alternated

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

from crystal_cli.runtime import configure_process, matmul_gflops  # noqa: E402

configure_process()


def show(name: str, r: dict) -> None:
    print(f"{name:24s} {r['structures_per_s']:6.2f} structures/s  {r['tokens_per_s']:7.1f} tokens/s  "
          f"parse {r['parse_rate']:6.1%}  struct. valid {r['structural_validity']:6.1%}  "
          f"comp. valid {r['compositional_validity']:6.1%}  no_room {r['no_room']}  {r['seconds']:6.1f} s", flush=True)


COUNTS = ("n", "seconds", "tokens", "parsed", "atoms", "structural", "compositional", "distance_ok", "no_room",
          "guard_masked", "guard_seconds")
GUARD_SECONDS = [0.0]  # time spent in the distance guard's own code (timed_guard), whatever the host's load


def timed_guard() -> None:
    """Time every GuardState call (text bookkeeping, masks, stencils): the guard's compute cost measured
    directly, which contention on a shared host inflates no more than it inflates the decode."""
    from crystal_cli.sampling.guard import GuardState

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                GUARD_SECONDS[0] += time.perf_counter() - start
        return wrapper

    GuardState.accept = timed(GuardState.accept)
    GuardState.allowed = timed(GuardState.allowed)


def run_backend(sampler, prompt: str, jobs, min_distance: float) -> dict:
    """One run's counts: speed, parse rate, validity (CDVAE's rules, evaluate.validity), distances, failures."""
    from crystal_cli import codec
    from crystal_cli.evaluate.validity import compositional_validity, structural_validity
    from crystal_cli.sampling.guard import shortest_distance

    GUARD_SECONDS[0] = 0.0
    start = time.perf_counter()
    finished = list(sampler.run(prompt, jobs))
    seconds = time.perf_counter() - start
    structures = [s for s in (codec.parse_crystal(f.text).structure for f in finished) if s is not None]
    shortest = [shortest_distance(s) for s in structures]
    return {"n": len(finished), "seconds": seconds, "tokens": sum(f.tokens for f in finished), "parsed": len(structures),
            "atoms": sum(len(s) for s in structures),
            "structural": sum(structural_validity(s)[0] for s in structures),
            "compositional": sum(compositional_validity(s.composition)[0] for s in structures),
            "distance_ok": sum(d is None or d >= min_distance for d in shortest),
            "no_room": sum(f.failure == "no_room" for f in finished),
            "guard_masked": sum(f.guard_masked for f in finished), "guard_seconds": GUARD_SECONDS[0]}


def rates(counts: dict) -> dict:
    """Counts summed over repeats -> the reported row (validity over all samples, as Table 1 counts it)."""
    n = counts["n"]
    return counts | {"structures_per_s": n / counts["seconds"], "tokens_per_s": counts["tokens"] / counts["seconds"],
                     "parse_rate": counts["parsed"] / n, "structural_validity": counts["structural"] / n,
                     "compositional_validity": counts["compositional"] / n,
                     "distance_ok_rate": counts["distance_ok"] / n, "atoms_per_sample": counts["atoms"] / n,
                     "guard_share": counts["guard_seconds"] / counts["seconds"]}


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
    parser.add_argument("--skip-ablations", action="store_true", help="only llama.cpp (grammar, guard off/on) and transformers")
    parser.add_argument("--min-distance", type=float, default=0.5, help="the guard row's --min-distance, Å")
    parser.add_argument("--formula", help="prompt and grammar with this --formula (the guard adds its volume floor)")
    parser.add_argument("--guard-only", action="store_true", help="only llama.cpp with the grammar, guard off and on")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the rows this many times, alternating, each time N new samples (run seed = repeat)")
    parser.add_argument("--load", action="store_true",
                        help="only the default llama.cpp row: idle, then beside one CPU-bound process with one thread "
                             "per core and with crystal's choice (one per idle core)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.load:
        return load_rows(args)

    import torch

    from crystal_cli import codec
    from crystal_cli.export import cached_export
    from crystal_cli.grammar import crystal_gbnf, formula_constraint, max_new_tokens
    from crystal_cli.sampling.guard import GuardSettings, check_min_distance
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings, job_seed

    torch.set_num_threads(args.threads)
    constraint = formula_constraint(args.formula, args.max_atoms) if args.formula else None
    prompt = codec.conditional_prompt({"formula": constraint.formula if constraint else None})
    gbnf = crystal_gbnf(args.max_atoms, constraint)
    guard = GuardSettings(check_min_distance(args.min_distance), constraint)
    settings = SamplingSettings(args.temperature, args.top_p, max_new_tokens(args.max_atoms), args.parallel, args.threads)
    timed_guard()
    report: dict = {"model": args.model, "n": args.n, "parallel": args.parallel, "max_atoms": args.max_atoms,
                    "quant": args.quant, "threads": args.threads, "temperature": args.temperature,
                    "top_p": args.top_p, "formula": args.formula, "min_distance": args.min_distance,
                    "repeats": args.repeats}

    report["matmul_gflops"] = matmul_gflops()
    runs = [("llama_grammar", args.quant, gbnf, settings, None), ("llama_grammar_guard", args.quant, gbnf, settings, guard)]
    if not args.skip_ablations and not args.guard_only:
        runs += [("llama_grammar_no_skip", args.quant, gbnf, replace(settings, skip_forced=False), None),
                 ("llama_free", args.quant, None, settings, None)]
        if args.quant != "q8_0":
            runs.append(("llama_grammar_q8_0", "q8_0", gbnf, settings, None))
    models: dict = {}
    totals: dict = {}
    try:
        for repeat in range(args.repeats):
            for name, quant, grammar, run_settings, run_guard in runs:
                if quant not in models:
                    models[quant] = LlamaModel(cached_export(args.model, quant), threads=args.threads)
                model = models[quant]
                report["params"] = model._llama.llama_model_n_params(model.model)
                sampler = BatchedSampler(model, run_settings, grammar, run_guard)
                jobs = [Job(i, job_seed(repeat, i)) for i in range(args.n)]
                counts = run_backend(sampler, prompt, jobs, args.min_distance)
                sampler.close()
                totals[name] = {k: totals.get(name, {}).get(k, 0) + counts[k] for k in COUNTS}
                show(f"{name} #{repeat + 1}", rates(counts))
    finally:
        for model in models.values():
            model.close()
    for name in totals:
        report[name] = rates(totals[name])
    params = report["params"]

    if not args.skip_transformers and not args.guard_only:
        from crystal_cli.models import resolve_model
        from crystal_cli.sampling.generate import GenerateOptions, open_backend

        # crystal generate --backend transformers itself (merged adapter, same grammar), guard off like llama_grammar
        options = GenerateOptions(model=args.model, output=Path("unused.cif"), temperature=args.temperature,
                                  top_p=args.top_p, max_atoms=args.max_atoms, parallel=args.parallel,
                                  threads=args.threads, backend="transformers", min_distance=0.0)
        backend = open_backend(options, resolve_model(args.model), gbnf)
        jobs = [Job(i, job_seed(0, i)) for i in range(args.n)]
        report["transformers_grammar"] = rates(run_backend(backend, prompt, jobs, args.min_distance))
        show("transformers_grammar", report["transformers_grammar"])
        backend.close()
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
    off, on = report["llama_grammar"], report["llama_grammar_guard"]
    report["guard_speed_cost"] = 1 - on["structures_per_s"] / off["structures_per_s"]
    report["guard_token_cost"] = 1 - on["tokens_per_s"] / off["tokens_per_s"]
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
    print(f"distance guard ({args.min_distance} Å, N={on['n']} each, same seeds): cost {report['guard_speed_cost']:+.1%} "
          f"structures/s, {report['guard_token_cost']:+.1%} tokens/s; time in the guard's code "
          f"{on['guard_share']:.1%} of the run; atoms per sample {off['atoms_per_sample']:.1f} -> {on['atoms_per_sample']:.1f}")
    print(f"  structural validity {off['structural_validity']:.1%} -> {on['structural_validity']:.1%}, compositional "
          f"{off['compositional_validity']:.1%} -> {on['compositional_validity']:.1%}, distances >= {args.min_distance} Å "
          f"{off['distance_ok_rate']:.1%} -> {on['distance_ok_rate']:.1%}, no_room {on['no_room']}, "
          f"{on['guard_masked'] / on['n']:.1f} tokens masked per sample")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def load_rows(args) -> None:
    """structures/s of the default configuration idle and beside one CPU-bound process (a Python busy loop),
    with llama.cpp's one thread per core and with crystal's default (runtime.idle_cores, measured with the
    busy process running); each from a fresh model load, same prompt and seeds."""
    import subprocess

    from crystal_cli import codec
    from crystal_cli.export import cached_export
    from crystal_cli.grammar import crystal_gbnf, max_new_tokens
    from crystal_cli.runtime import idle_cores
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings, job_seed

    gguf = cached_export(args.model, args.quant)
    prompt, gbnf = codec.unconditional_prompt(), crystal_gbnf(args.max_atoms)
    jobs = [Job(i, job_seed(0, i)) for i in range(args.n)]

    def measure(threads: int) -> dict:
        settings = SamplingSettings(args.temperature, args.top_p, max_new_tokens(args.max_atoms), args.parallel, threads)
        with LlamaModel(gguf, threads=threads) as model:
            sampler = BatchedSampler(model, settings, gbnf)
            counts = run_backend(sampler, prompt, jobs, args.min_distance)
            sampler.close()
        return rates(counts) | {"threads": threads}

    cores = os.cpu_count() or 1
    report: dict = {"model": args.model, "n": args.n, "parallel": args.parallel, "cores": cores,
                    "idle": measure(idle_cores())}
    show(f"idle, {report['idle']['threads']} threads", report["idle"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        report["busy_every_core"] = measure(cores)
        show(f"busy, {cores} threads", report["busy_every_core"])
        report["busy_idle_cores"] = measure(idle_cores())
        show(f"busy, {report['busy_idle_cores']['threads']} threads (crystal)", report["busy_idle_cores"])
    finally:
        busy.kill()
    idle = report["idle"]["structures_per_s"]
    for key in ("busy_every_core", "busy_idle_cores"):
        report[key]["of_idle"] = report[key]["structures_per_s"] / idle
    print(f"beside one busy process: {report['busy_every_core']['of_idle']:.0%} of the idle rate with "
          f"{cores} threads, {report['busy_idle_cores']['of_idle']:.0%} with crystal's choice")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
