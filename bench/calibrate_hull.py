"""Calibrate `crystal evaluate`'s stability against DFT: relax known near-hull MP-20 test materials with the
potential and compare its E_hull (hull frame of crystal_cli.evaluate.hull) with MP's DFT e_above_hull.

Reports (a) the fraction called metastable (target >= 90 %), (b) median and 90th percentile of
|predicted - DFT e_above_hull|, plus the formation-energy error in two frames, to decide by measurement:
  direct  E/atom - sum x_i mu_i with mu_i from MP's elemental reference entries (what crystal uses), and
  mp2020  the same after pymatgen's MaterialsProject2020Compatibility corrections on the potential's energy.
It also checks the hull itself: the DFT formation energy of each row, put on the hull, should give back the
row's own DFT e_above_hull.

    .venv/bin/python bench/calibrate_hull.py --rows 220 --out runs/calibration      # resumable

Relaxations are appended to OUT/stability.jsonl as they finish; rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crystal_cli.runtime import configure_process  # noqa: E402

configure_process()

import pandas as pd  # noqa: E402

from crystal_cli.files import shared_data  # noqa: E402

U_ELEMENTS = {"Co": 3.32, "Cr": 3.7, "Fe": 5.3, "Mn": 3.9, "Mo": 4.38, "Ni": 6.2, "V": 3.25, "W": 6.2}  # MPRelaxSet


def mp2020_energy_per_atom(structure, energy_per_atom: float) -> float | None:
    """The potential's energy with MP2020 anion/U corrections, treating it as an MP GGA(+U) calculation."""
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    symbols = {el.symbol for el in structure.composition.elements}
    hubbard = bool(symbols & {"O", "F"}) and bool(symbols & set(U_ELEMENTS))
    parameters = {
        "run_type": "GGA+U" if hubbard else "GGA",
        "is_hubbard": hubbard,
        "hubbards": {s: U_ELEMENTS.get(s, 0.0) for s in symbols} if hubbard else {},
        "potcar_symbols": [],
    }
    entry = ComputedStructureEntry(structure, energy_per_atom * len(structure), parameters=parameters)
    processed = MaterialsProject2020Compatibility(check_potcar=False).process_entry(entry)
    return None if processed is None else processed.energy_per_atom


def select_rows(path: Path, n: int, max_e_hull: float, seed: int) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame = frame[frame["e_above_hull"] <= max_e_hull]
    return frame.sample(n=min(n, len(frame)), random_state=seed).reset_index(drop=True)


def summarize(results: pd.DataFrame) -> dict:
    from crystal_cli.evaluate.stats import wilson

    ok = results[results["error"].isna() & results["e_above_hull_pred"].notna()]
    delta = (ok["e_above_hull_pred"] - ok["e_above_hull_dft"]).abs()
    summary = {
        "n_rows": len(results),
        "n_relaxed_ok": len(ok),
        "failures": results["error"].dropna().value_counts().to_dict(),
        "metastable": wilson(int((ok["e_above_hull_pred"] < 0.1).sum()), len(results)).as_dict(),
        "abs_delta_e_hull_median": float(delta.median()),
        "abs_delta_e_hull_p90": float(delta.quantile(0.9)),
        "delta_e_hull_mean_signed": float((ok["e_above_hull_pred"] - ok["e_above_hull_dft"]).mean()),
        "formation_mae_direct": float((ok["e_form_pred"] - ok["e_form_dft"]).abs().mean()),
        "formation_mean_signed_direct": float((ok["e_form_pred"] - ok["e_form_dft"]).mean()),
        "hull_self_check_max_abs": float((results["e_above_hull_hull_dft"] - results["e_above_hull_dft"]).abs().max()),
        "hull_self_check_median_abs": float(
            (results["e_above_hull_hull_dft"] - results["e_above_hull_dft"]).abs().median()
        ),
        "seconds_per_structure_mean": float(results["seconds"].mean()),
    }
    mp2020 = ok[ok["e_form_pred_mp2020"].notna()]
    if len(mp2020):
        d2020 = (mp2020["e_above_hull_pred_mp2020"] - mp2020["e_above_hull_dft"]).abs()
        summary.update({
            "formation_mae_mp2020": float((mp2020["e_form_pred_mp2020"] - mp2020["e_form_dft"]).abs().mean()),
            "formation_mean_signed_mp2020": float((mp2020["e_form_pred_mp2020"] - mp2020["e_form_dft"]).mean()),
            "abs_delta_e_hull_median_mp2020": float(d2020.median()),
            "abs_delta_e_hull_p90_mp2020": float(d2020.quantile(0.9)),
            "metastable_mp2020": wilson(int((mp2020["e_above_hull_pred_mp2020"] < 0.1).sum()), len(results)).as_dict(),
        })
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=shared_data("mp_20", "test.csv.gz"))
    parser.add_argument("--hull", type=Path, default=REPO / "runs" / "hull.json.gz",
                        help="hull file (built from ../shared/data with the defaults when missing)")
    parser.add_argument("--rows", type=int, default=220)
    parser.add_argument("--max-e-hull", type=float, default=0.08)
    parser.add_argument("--potential", default="chgnet")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "calibration")
    args = parser.parse_args()

    from pymatgen.core import Structure

    from crystal_cli.evaluate.hull import Hull, build_hull, default_elements, default_tables
    from crystal_cli.evaluate.potential import RelaxSettings
    from crystal_cli.evaluate.stability import evaluate_stability

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.hull.exists():
        build_hull(default_tables(), default_elements()).save(args.hull)
    hull = Hull.load(args.hull)
    rows = select_rows(args.data, args.rows, args.max_e_hull, args.seed)
    jobs = [(i, str(r.material_id), Structure.from_str(r.cif, fmt="cif")) for i, r in rows.iterrows()]
    started = time.monotonic()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        print(f"{done[0]}/{len(jobs)} relaxed, {time.monotonic() - started:.0f} s", flush=True)

    records = evaluate_stability(
        jobs, args.potential, RelaxSettings(fmax=args.fmax, max_steps=args.steps), hull, args.workers,
        args.out / "stability.jsonl", progress,
    )
    table = []
    for (_, row), record in zip(rows.iterrows(), records):
        composition = record.relaxed.composition if record.relaxed is not None else None
        e_form_2020 = e_hull_2020 = None
        if record.energy_per_atom is not None and record.error is None:
            corrected = mp2020_energy_per_atom(record.relaxed, record.energy_per_atom)
            if corrected is not None:
                e_form_2020 = hull.formation_energy_per_atom(composition, corrected)
                e_hull_2020 = hull.e_above_hull(composition, e_form_2020)
        dft_composition = Structure.from_str(row.cif, fmt="cif").composition
        table.append({
            "material_id": row.material_id, "formula": row.pretty_formula, "n_sites": len(jobs[record.index][2]),
            "e_above_hull_dft": row.e_above_hull, "e_form_dft": row.formation_energy_per_atom,
            "e_above_hull_hull_dft": hull.e_above_hull(dft_composition, row.formation_energy_per_atom),
            "e_form_pred": record.formation_energy_per_atom, "e_above_hull_pred": record.e_above_hull,
            "e_form_pred_mp2020": e_form_2020, "e_above_hull_pred_mp2020": e_hull_2020,
            "steps": record.steps, "converged": record.converged, "seconds": record.seconds, "error": record.error,
        })
    results = pd.DataFrame(table)
    results.to_csv(args.out / "calibration.csv", index=False)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, **summarize(results)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    m = summary["metastable"]
    print(f"\nmetastable {100 * m['rate']:.1f} % ({m['k']}/{m['n']}, 95 % CI {100 * m['low']:.1f}-{100 * m['high']:.1f}); "
          f"|dE_hull| median {1000 * summary['abs_delta_e_hull_median']:.0f} meV/atom, "
          f"p90 {1000 * summary['abs_delta_e_hull_p90']:.0f} meV/atom; formation MAE direct "
          f"{1000 * summary['formation_mae_direct']:.0f} meV/atom"
          + (f", MP2020 {1000 * summary['formation_mae_mp2020']:.0f}" if "formation_mae_mp2020" in summary else ""))
    print(f"({len(results)} MP-20 test rows with DFT e_above_hull <= {args.max_e_hull}; "
          "MP-20 test here over-represents binaries and ternaries)")


if __name__ == "__main__":
    main()
