"""The papers' Table 1 for our model: unconditional samples at two temperatures, with and without the flow
refiner, scored exactly as `crystal evaluate` scores them, printed beside the published rows.

    python bench/table1.py                          # shipped default model, N=200 per temperature
    python bench/table1.py -n 1000 --model runs/NAME --flow runs/flow-NAME --out runs/table1-big

Every stage writes its files under --out as it goes (samples, refined samples, stability logs, reports) and
is skipped or resumed when run again, so an interrupted benchmark continues where it stopped. Novelty is
against the mp20-open train split (the model's training data), coverage and the Wasserstein distances against
a seeded subsample of the mp_20 test split, stability (CHGNet relaxation, E_hull against the calibrated hull
built by `crystal hull build`) on a seeded subset, with a shorter relaxation than `crystal evaluate`'s default
(100 FIRE steps instead of 500, so a CPU finishes; an unfinished relaxation keeps its last energy, which can only
overstate E_hull). Writes OUT/table1.md and OUT/table1.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crystal_cli.files import shared_data  # noqa: E402
from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ("struct. valid", "comp. valid", "COV-R", "COV-P", "wdist ρ", "wdist N_el", "metastable", "stable",
           "SUN", "structures/s")

# Published rows (Crystal-LLM Table 1 / FlowLLM Table 1, MP-20). Their stability numbers come from M3GNet or
# CHGNet pre-relaxation followed by DFT on a subset; "—" where the paper gives no number.
PUBLISHED = [
    ("CDVAE (Crystal-LLM Table 1)", ("1.000", "0.867", "0.9915", "0.9949", "0.688", "1.432", "28.8 %", "—", "—", "—")),
    ("Crystal-LLM LLaMA-2 7B, τ=0.7", ("0.964", "0.933", "0.911", "0.949", "3.61", "1.06", "—", "—", "—", "—")),
    ("Crystal-LLM LLaMA-2 70B, τ=0.7", ("—", "—", "—", "—", "—", "—", "~49 %", "—", "—", "—")),
    ("FlowLLM (LLaMA-2 70B + RFM)", ("—", "—", "—", "—", "—", "—", "—", "17.82 %", "4.92 %", "—")),
]


def fmt_rate(section: dict | None, digits: int = 3, percent: bool = False) -> str:
    if not section or section.get("rate") is None:
        return "—"
    if percent:
        return f"{section['rate']:.1%} ({section['k']}/{section['n']})"
    return f"{section['rate']:.{digits}f}"


def fmt_number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_row(report: dict, structures_per_s: float | None) -> tuple[str, ...]:
    validity, coverage = report["validity"], report.get("coverage") or {}
    distribution, stability = report.get("distribution") or {}, report.get("stability") or {}
    return (
        fmt_rate(validity["structural"]),
        fmt_rate(validity["compositional"]),
        fmt_number(coverage.get("cov_recall"), 4),
        fmt_number(coverage.get("cov_precision"), 4),
        fmt_number(distribution.get("wdist_density")),
        fmt_number(distribution.get("wdist_num_elems")),
        fmt_rate(stability.get("metastable"), percent=True),
        fmt_rate(stability.get("stable"), percent=True),
        fmt_rate(stability.get("sun"), percent=True),
        fmt_number(structures_per_s, 2),
    )


def markdown(rows: list[tuple[str, tuple[str, ...]]]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"


class Timings:
    """Seconds and counts per stage, accumulated across resumed runs (OUT/timings.json)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, n: int, seconds: float) -> None:
        entry = self.data.setdefault(key, {"n": 0, "seconds": 0.0})
        entry["n"] += n
        entry["seconds"] += seconds
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)

    def per_second(self, *keys: str) -> float | None:
        """Structures per second of a pipeline of stages: samples of the first / total seconds."""
        if any(k not in self.data for k in keys):
            return None
        seconds = sum(self.data[k]["seconds"] for k in keys)
        return self.data[keys[0]]["n"] / seconds if seconds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="-m for crystal generate (default: the shipped default model)")
    parser.add_argument("--flow", default="flow-default", help="flow run or shipped name; 'none' skips refinement")
    parser.add_argument("-n", type=int, default=200, help="unconditional samples per temperature")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--max-atoms", type=int, default=20)
    parser.add_argument("--min-distance", type=float, default=0.0,
                        help="crystal generate's distance guard, Å (0 = off, the papers' protocol; 0.5 = generate's default)")
    parser.add_argument("--stability-samples", type=int, default=200)
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--relax-steps", type=int, default=100, help="FIRE steps per relaxation (evaluate: 500)")
    parser.add_argument("--relax-time-limit", type=float, default=30.0, help="seconds per relaxation")
    parser.add_argument("--coverage-reference-max", type=int, default=1000)
    parser.add_argument("--reference", type=Path, default=ROOT / "runs/data/mp20-open", help="novelty reference")
    parser.add_argument("--coverage-reference", type=Path, default=shared_data("mp_20", "test.csv.gz"))
    parser.add_argument("--hull", type=Path, default=ROOT / "runs/hull.json.gz")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/table1")
    args = parser.parse_args()

    from crystal_cli.errors import CrystalError
    from crystal_cli.evaluate.pipeline import EvaluateOptions, evaluate
    from crystal_cli.evaluate.potential import RelaxSettings
    from crystal_cli.evaluate.report import build_report, write_json
    from crystal_cli.sampling import GenerateOptions, generate

    for path, how in ((args.reference, "make corpus"), (args.hull, "crystal hull build -o runs/hull.json.gz"),
                      (args.coverage_reference, "../shared/data beside the checkout")):
        if not path.exists():
            raise SystemExit(f"table1: {path} is missing ({how})")
    args.out.mkdir(parents=True, exist_ok=True)
    timings = Timings(args.out / "timings.json")
    flow = None
    if args.flow != "none":
        from crystal_cli.flow.ode import refine_file
        from crystal_cli.flow.train import load_model
        from crystal_cli.models import FLOW, resolve_model

        try:
            flow = load_model(resolve_model(args.flow, FLOW))
        except CrystalError as error:
            print(f"table1: no flow refinement ({error})", flush=True)

    results: dict[str, dict] = {}
    for temperature in args.temperatures:
        key = f"t{temperature:g}"
        samples = args.out / f"samples-{key}.cif"
        started = time.perf_counter()
        summary = generate(GenerateOptions(
            model=args.model, output=samples, n=args.n, temperature=temperature, top_p=1.0, seed=args.seed,
            max_atoms=args.max_atoms, resume=samples.exists(), threads=args.threads, min_distance=args.min_distance,
        ))
        if summary.generated:
            timings.add(f"generate-{key}", summary.generated, time.perf_counter() - started)
        print(f"{key}: {summary.existing + summary.generated} samples ({summary.generated} new"
              + (f", parse rate {summary.parse_rate:.1%})" if summary.generated else ")"), flush=True)
        stages = {key: (samples.with_suffix(".jsonl"), (f"generate-{key}",))}
        if flow is not None:
            refined = args.out / f"refined-{key}.jsonl"  # structure dicts: every site as the flow left it
            started = time.perf_counter()
            stats = refine_file(samples.with_suffix(".jsonl"), refined, flow, steps=args.refine_steps,
                                resume=refined.exists())
            if stats["refined"]:
                timings.add(f"refine-{key}", stats["refined"], time.perf_counter() - started)
            print(f"{key}: refined {stats['refined']} (+{stats['resumed_from']} earlier), skipped {dict(stats['skipped'])}",
                  flush=True)
            stages[f"{key}-flow"] = (refined, (f"generate-{key}", f"refine-{key}"))
        for name, (path, timing_keys) in stages.items():
            report_path = args.out / f"report-{name}.json"
            if not report_path.exists():
                options = EvaluateOptions(
                    reference=args.reference, coverage_reference=args.coverage_reference,
                    coverage_max_reference=args.coverage_reference_max, hull=args.hull,
                    stability_samples=args.stability_samples, seed=args.seed, workers=args.workers,
                    relax=RelaxSettings(max_steps=args.relax_steps, time_limit=args.relax_time_limit),
                    stability_log=args.out / f"stability-{name}.jsonl",
                )
                started = time.perf_counter()
                write_json(build_report(evaluate(path, options), options, path), report_path)
                print(f"{name}: evaluated in {time.perf_counter() - started:.0f} s", flush=True)
            results[name] = {"report": json.loads(report_path.read_text()),
                             "structures_per_s": timings.per_second(*timing_keys)}

    model_name = args.model or "default (models/default)"
    guard = f"guard {args.min_distance:g} Å" if args.min_distance > 0 else "guard off"
    rows = [(f"ours: {model_name}, τ={name[1:].replace('-flow', '')}" + (" + flow" if name.endswith("-flow") else "")
             + f", {guard}, N={r['report']['counts']['entries']}", table_row(r["report"], r["structures_per_s"]))
            for name, r in results.items()]
    footer = (f"\nOurs: novelty vs {args.reference.name} train; COV and wdist vs a seeded {args.coverage_reference_max} of "
              f"{args.coverage_reference.parent.name}/{args.coverage_reference.name} (binary/ternary-heavy); stability: CHGNet "
              f"relaxation (≤ {args.relax_steps} FIRE steps, ≤ {args.relax_time_limit:g} s) of a seeded subset of "
              f"≤ {args.stability_samples} valid-or-not samples per row, E_hull against {args.hull.name}; flow: "
              f"{args.flow}, {args.refine_steps} Euler steps; structures/s on this machine, generation (+ refinement).\n")
    text = markdown(rows + PUBLISHED) + footer
    (args.out / "table1.md").write_text(text)
    (args.out / "table1.json").write_text(json.dumps(
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "rows": {name: dict(zip(COLUMNS, cells)) for name, cells in rows},
         "reports": {name: r["report"] for name, r in results.items()}}, indent=2) + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
