"""The report of an evaluation: one dict (written as report.json) with settings, counts, every rate with its
count and 95 % Wilson interval, and package versions; plus the per-structure csv and the relaxed structures.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crystal_cli import codec, runs
from crystal_cli.errors import CrystalError
from crystal_cli.evaluate.matching import MATCHER_SETTINGS
from crystal_cli.evaluate.pipeline import EvaluateOptions, Evaluation, SampleResult
from crystal_cli.evaluate.stability import METASTABLE_THRESHOLD, STABLE_THRESHOLD
from crystal_cli.evaluate.stats import wilson
from crystal_cli.evaluate.validity import MIN_DISTANCE, MIN_VOLUME
from crystal_cli.runs import atomic_path, package_versions
from crystal_cli.structure_io import FORMATS, format_for, write_structures

CSV_COLUMNS = (
    "id", "source", "formula", "n_sites", "spacegroup", "density", "volume_per_atom", "min_distance", "parse_error",
    "parse_detail", "structural_valid", "structural_reason", "compositional_valid", "compositional_reason", "valid",
    "unique", "novel", "energy_per_atom", "formation_energy_per_atom", "e_above_hull", "metastable", "stable", "sun",
    "relax_steps", "relax_converged", "relax_seconds", "stability_error", "stability_detail", "not_relaxed_reason",
    "relaxed_structure",
)


# What each rate is out of, stated in report.json beside the rate (and in the CLI's table).
OF_ENTRIES = "every entry read; parse failures count as invalid"
OF_VALID = "valid structures (structurally and compositionally)"
OF_SAMPLED = ("the seeded stability subset of every entry (valid or not); entries that cannot be relaxed "
              "(parse failure, structurally invalid, failed relaxation) count as not stable")


def _rate(k: int, n: int, of: str) -> dict:
    return wilson(k, n).as_dict() | {"of": of}


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    array = np.array(values)
    return {"mean": float(array.mean()), "median": float(np.median(array)),
            "p10": float(np.quantile(array, 0.1)), "p90": float(np.quantile(array, 0.9)), "n": len(values)}


@dataclass(frozen=True)
class OutputPaths:
    """Where `crystal evaluate` writes: -o DIR fills in every file; an explicit path wins for its file."""

    report: Path | None
    csv: Path | None
    relaxed: Path | None
    stability_log: Path | None  # the resumable relaxation log; only inside -o DIR
    plots: Path | None = None
    default_report: Path | None = None  # -o DIR/report.json, written even when --json points elsewhere
    relaxed_format: str = "cif"  # cif, extxyz, jsonl, or poscar (a directory of POSCAR files)

    @classmethod
    def of(cls, output: Path | None, report: Path | None = None, csv: Path | None = None,
           relaxed: Path | None = None, plots: Path | None = None, relaxed_format: str = "cif") -> OutputPaths:
        if relaxed_format not in FORMATS:
            raise CrystalError(f"--format {relaxed_format!r}: choose from {', '.join(FORMATS)}")
        if output is None:
            return cls(report, csv, relaxed, None, plots, None, relaxed_format)
        default = output / ("relaxed" if relaxed_format == "poscar" else f"relaxed.{relaxed_format}")
        return cls(report or output / "report.json", csv or output / "structures.csv", relaxed or default,
                   output / "stability.jsonl", plots, output / "report.json", relaxed_format)

    def reports(self) -> list[Path]:
        """report.json goes into -o DIR always, and also to --json when that names another file."""
        return list(dict.fromkeys(p for p in (self.report, self.default_report) if p is not None))

    def files(self, stability: bool) -> list[Path]:
        """Every file the evaluation writes besides the stability log (which has its own manifest)."""
        from crystal_cli.evaluate.plots import PLOT_NAMES

        files = [*self.reports(), self.csv, self.relaxed if stability else None]
        files += [self.plots / name for name in PLOT_NAMES] if self.plots is not None else []
        return [path for path in files if path is not None]

    def check(self, stability: bool, overwrite: bool) -> None:
        """Before any work: each output is a file path, and none is a file crystal did not write (unless
        overwrite)."""
        for path, option in ((self.report, "--json"), (self.csv, "--csv")):
            runs.file_output(path, option)
        if self.relaxed_format == "poscar":
            runs.dir_output(self.relaxed, "--relaxed")
        else:
            runs.file_output(self.relaxed, "--relaxed")
            try:
                format_for(self.relaxed, self.relaxed_format)
            except ValueError as exc:
                raise CrystalError(str(exc)) from None
        runs.dir_output(self.plots, "--plots")
        runs.claim(self.files(stability), "evaluate", overwrite)


def check_chemsys(chemsys: str | None) -> str | None:
    """--chemsys as element symbols joined by "-", 2 to 4 of them (what a phase-diagram plot can show)."""
    if chemsys is None:
        return None
    from pymatgen.core import Element

    symbols = chemsys.split("-")
    bad = [s for s in symbols if not Element.is_valid_symbol(s)]
    if bad or not 2 <= len(set(symbols)) <= 4:
        raise CrystalError(f"--chemsys {chemsys!r}: give 2 to 4 element symbols joined by '-', e.g. Li-Fe-P-O"
                           + (f" ({', '.join(bad)} not an element)" if bad else ""))
    return chemsys


def write_outputs(evaluation: Evaluation, report: dict, paths: OutputPaths, samples_path: Path,
                  stability: bool, chemsys: str | None = None) -> dict:
    """Write the report, relaxed structures, csv and plots the paths ask for, and mark them as crystal's
    (runs.record_outputs). Returns what was written: {"report": path, "relaxed": (count, path), "csv": path,
    "plots": [paths]} for the ones written."""
    written: dict = {}
    for path in paths.reports():
        written.setdefault("reports", []).append(write_json(report, path))
    if paths.relaxed and stability:
        written["relaxed"] = (write_relaxed(evaluation, paths.relaxed, paths.relaxed_format), paths.relaxed)
    if paths.csv:
        written["csv"] = write_csv(evaluation, paths.csv, paths.relaxed if stability else None)
    if paths.plots:
        from crystal_cli.evaluate.plots import write_plots

        written["plots"] = write_plots(evaluation, paths.plots, chemsys)
    files = [*written.get("reports", []), *([written["csv"]] if "csv" in written else [])]
    files += [written["relaxed"][1]] if "relaxed" in written else []
    files += written.get("plots", [])
    runs.record_outputs("evaluate", files, report["settings"], {"samples": runs.input_record(samples_path)})
    return written


def settings_of(options: EvaluateOptions, samples_path: Path) -> dict:
    settings = asdict(options)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
    settings["samples"] = str(samples_path)
    settings["structure_matcher"] = MATCHER_SETTINGS
    settings["validity"] = {"min_distance_A": MIN_DISTANCE, "min_volume_A3": MIN_VOLUME,
                            "composition": "SMACT charge neutrality + Pauling test; elements and alloys pass"}
    settings["thresholds_eV_per_atom"] = {"metastable": METASTABLE_THRESHOLD, "stable": STABLE_THRESHOLD}
    return settings


def build_report(evaluation: Evaluation, options: EvaluateOptions, samples_path: Path) -> dict:
    samples = evaluation.samples
    n = len(samples)
    parsed = [s for s in samples if s.validity is not None]
    valid = [s for s in samples if s.valid]
    parse_failures = Counter(s.entry.error for s in samples if s.entry.structure is None)
    invalid_reasons = Counter(parse_failures)
    for s in parsed:
        if not s.validity.structural:
            invalid_reasons[s.validity.structural_reason] += 1
        if not s.validity.compositional:
            invalid_reasons[f"smact_{s.validity.compositional_reason}"] += 1
    report: dict = {
        "settings": settings_of(options, samples_path),
        "versions": package_versions(),
        "counts": {"entries": n, "structures": len(parsed), "valid": len(valid),
                   "parse_failures": dict(parse_failures), **evaluation.reference_sizes},
        "validity": {
            "structural": _rate(sum(s.validity.structural for s in parsed), n, OF_ENTRIES),
            "compositional": _rate(sum(s.validity.compositional for s in parsed), n, OF_ENTRIES),
            "overall": _rate(len(valid), n, OF_ENTRIES),
            "invalid_reasons": dict(invalid_reasons.most_common()),
        },
        "uniqueness": _rate(sum(bool(s.unique) for s in valid), len(valid), OF_VALID),
        "timings_s": evaluation.timings,
    }
    if options.reference is not None:
        report["novelty"] = _rate(sum(bool(s.novel) for s in valid), len(valid), OF_VALID)
        report["unique_and_novel"] = _rate(sum(bool(s.novel and s.unique) for s in valid), len(valid), OF_VALID)
    if evaluation.coverage is not None:
        report["coverage"] = evaluation.coverage
    if evaluation.distribution is not None:
        report["distribution"] = evaluation.distribution
    if evaluation.stability_indices is not None:
        report["stability"] = _stability_section(evaluation, options)
    return report


def _stability_section(evaluation: Evaluation, options: EvaluateOptions) -> dict:
    chosen = [evaluation.samples[i] for i in evaluation.stability_indices]
    records = [s.stability for s in chosen]
    k = len(chosen)
    relaxed = [r for r in records if r.energy_per_atom is not None]
    section: dict = {
        "potential": options.potential,
        "sampled": k,
        "relaxed": len(relaxed),
        "converged": sum(r.converged for r in records),
        "failures": dict(Counter(r.error for r in records if r.error).most_common()),
        "energy_per_atom": _quantiles([r.energy_per_atom for r in relaxed if r.error is None]),
        # every structure handed to the potential: failed and timed-out relaxations included
        "seconds_per_relaxation": _quantiles([r.seconds for r in records if r.seconds > 0]),
    }
    if options.hull is not None:
        e_hull = [r.e_above_hull for r in records if r.error is None and r.e_above_hull is not None]
        section["hull"] = str(options.hull)
        section["e_above_hull"] = _quantiles(e_hull)
        section["metastable"] = _rate(sum(r.metastable for r in records), k, OF_SAMPLED)
        section["stable"] = _rate(sum(r.stable for r in records), k, OF_SAMPLED)
        if options.reference is not None:
            section["sun"] = _rate(sum(bool(s.sun) for s in chosen), k, OF_SAMPLED)
    return section


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return runs.write_json(path, report)


def _geometry(structure) -> dict:
    """Space group (codec.spacegroup_number; empty where spglib gives up), density, volume per atom, shortest
    distance."""
    from crystal_cli.sampling.guard import shortest_distance

    shortest = shortest_distance(structure)
    return {"spacegroup": codec.spacegroup_number(structure), "density": round(float(structure.density), 4),
            "volume_per_atom": round(structure.volume / len(structure), 4),
            "min_distance": None if shortest is None else round(shortest, 4)}


def _not_relaxed(sample: SampleResult, sampled: bool | None) -> str:
    """Why a structure has no relaxation: stability off, outside the seeded subset, or the record's reason."""
    if sampled is None:
        return "stability_off"
    if not sampled:
        return "not_in_stability_subset"
    record = sample.stability
    return record.error or "" if record is not None and record.relaxed is None else ""


def _csv_row(sample: SampleResult, relaxed_path: Path | None, sampled: bool | None = None) -> dict:
    """One structures.csv row. `sampled`: whether the entry is in the stability subset (None: stability off)."""
    entry, v, r = sample.entry, sample.validity, sample.stability
    row = {
        "id": entry.id, "source": entry.source,
        "formula": entry.structure.composition.reduced_formula if entry.structure is not None else "",
        "n_sites": len(entry.structure) if entry.structure is not None else "",
        **(_geometry(entry.structure) if entry.structure is not None else {}),
        "not_relaxed_reason": _not_relaxed(sample, sampled),
        "parse_error": entry.error or "", "parse_detail": entry.detail,
        "structural_valid": v.structural if v else False, "structural_reason": v.structural_reason if v else "",
        "compositional_valid": v.compositional if v else False,
        "compositional_reason": v.compositional_reason if v else "",
        "valid": sample.valid, "unique": sample.unique, "novel": sample.novel, "sun": sample.sun,
    }
    if r is not None:
        row.update({
            "energy_per_atom": r.energy_per_atom, "formation_energy_per_atom": r.formation_energy_per_atom,
            "e_above_hull": r.e_above_hull, "metastable": r.metastable if r.e_above_hull is not None else None,
            "stable": r.stable if r.e_above_hull is not None else None, "relax_steps": r.steps,
            "relax_converged": r.converged, "relax_seconds": round(r.seconds, 3), "stability_error": r.error or "",
            "stability_detail": r.detail,
            "relaxed_structure": f"{relaxed_path}#{entry.id}" if relaxed_path and r.relaxed is not None else "",
        })
    return {k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS}


def write_csv(evaluation: Evaluation, path: str | Path, relaxed_path: Path | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(evaluation, relaxed_path))
    return path


def csv_rows(evaluation: Evaluation, relaxed_path: Path | None = None) -> list[dict]:
    """structures.csv's rows, one per structure (also Report.to_pandas)."""
    chosen = set(evaluation.stability_indices) if evaluation.stability_indices is not None else None
    return [_csv_row(sample, relaxed_path, None if chosen is None else sample.index in chosen)
            for sample in evaluation.samples]


def write_relaxed(evaluation: Evaluation, path: str | Path, fmt: str = "cif") -> int:
    """Relaxed structures, named by entry id: one multi-block CIF (or extxyz/jsonl; poscar: a directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    named = [(s.entry.id, s.stability.relaxed) for s in evaluation.samples
             if s.stability is not None and s.stability.relaxed is not None]
    return write_structures(path, named, fmt=fmt)
