"""Classifier-free guidance on --spacegroup: does pushing the model toward its condition raise the match?

Guidance (Sanchez et al. 2023, "Stay on topic with classifier-free guidance") samples from
log p(x | prompt) + (w - 1) * (log p(x | prompt) - log p(x | unconditional prompt)) at every token: w = 1 is plain
sampling, w > 1 amplifies whatever the conditional prompt changes. The model already trains on both prompts
(the unconditional task and the space-group task), so it needs no retraining. This runs transformers' own
implementation (`guidance_scale`, `negative_prompt_ids` = Crystal-LLM's unconditional prompt) under the same
grammar as `crystal generate --backend transformers`, the distance guard on, on bench/conditional.py's targets
and seeds, and scores the space group found (codec.spacegroup_number, symprec 0.1) and its crystal system.

    python bench/guidance.py --scales 1,2               # the shipped default, 40 targets x 5 samples each
    python bench/guidance.py --scales 2 --threads 1     # one scale per process, side by side on 2 cores

Samples are appended to OUT/w{scale}.jsonl as they finish; a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conditional import crystal_system, pick_targets  # noqa: E402

from crystal_cli.files import shared_data  # noqa: E402
from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

ROOT = Path(__file__).resolve().parents[1]


def guided(backend, scale: float, unconditional: str) -> None:
    """Make the backend's model.generate sample with guidance `scale` against the unconditional prompt."""
    model = backend.sampler.model
    plain = model.generate

    def generate(*args, **kwargs):
        if scale != 1.0:
            rows = kwargs["input_ids"].shape[0]
            kwargs.update(guidance_scale=scale,
                          negative_prompt_ids=backend.tokenizer([unconditional] * rows, return_tensors="pt")["input_ids"])
        return plain(*args, **kwargs)

    model.generate = generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="-m of crystal generate (default: the shipped default model)")
    parser.add_argument("--scales", default="1,2", help="comma-separated guidance scales w (1 = plain sampling)")
    parser.add_argument("--formulas", type=int, default=40)
    parser.add_argument("-k", type=int, default=5, help="samples per target")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/guidance")
    args = parser.parse_args()

    import torch

    from crystal_cli import codec
    from crystal_cli.evaluate.stats import wilson
    from crystal_cli.models import LLM, resolve_model
    from crystal_cli.sampling.generate import GenerateOptions, open_backend, prompt_and_grammar
    from crystal_cli.sampling.llama_backend import Job, job_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    test = shared_data("mp_20", "test.csv.gz")
    if not test.exists():
        raise SystemExit(f"guidance: {test} is missing (../shared/data beside the checkout)")
    args.out.mkdir(parents=True, exist_ok=True)
    targets = pick_targets(test, args.formulas, 20, args.seed)
    source = resolve_model(args.model, LLM)
    unconditional = codec.unconditional_prompt()
    for scale in (float(s) for s in args.scales.split(",")):
        path = args.out / f"w{scale:g}.jsonl"
        done = {(r["target"], r["index"]) for r in map(json.loads, path.open())} if path.exists() else set()
        with path.open("a") as log:
            for i, target in enumerate(targets):
                jobs = [Job(j, job_seed(args.seed + i, j)) for j in range(args.k) if (i, j) not in done]
                if not jobs:
                    continue
                options = GenerateOptions(model=args.model, output=args.out / "unused.cif", n=args.k,
                                          temperature=args.temperature, top_p=1.0, seed=args.seed + i,
                                          spacegroup=target["spacegroup"], backend="transformers", parallel=args.k)
                prompt, gbnf = prompt_and_grammar(options)
                backend = open_backend(options, source, gbnf)
                guided(backend, scale, unconditional)
                try:
                    for finished in backend.run(prompt, jobs):
                        structure = codec.parse_crystal(finished.text).structure
                        found = codec.spacegroup_number(structure) if structure is not None else None
                        log.write(json.dumps({"target": i, "index": finished.index, "spacegroup": target["spacegroup"],
                                              "found": found, "text": finished.text}) + "\n")
                        log.flush()
                finally:
                    backend.close()
        rows = [json.loads(line) for line in path.open()]
        hits = sum(r["found"] == r["spacegroup"] for r in rows)
        systems = sum(crystal_system(r["found"]) == crystal_system(r["spacegroup"]) for r in rows)
        exact, system = wilson(hits, len(rows)), wilson(systems, len(rows))
        print(f"w = {scale:g}: space group {hits}/{len(rows)} = {exact.rate:.1%} ({exact.low:.1%}–{exact.high:.1%}), "
              f"crystal system {systems}/{len(rows)} = {system.rate:.1%} ({system.low:.1%}–{system.high:.1%})",
              flush=True)


if __name__ == "__main__":
    main()
