"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed): E_hull histogram with the stable
(0) and metastable (0.1 eV/atom) lines, density and #elements against the reference, invalid samples by reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from crystal_cli.evaluate.coverage import density, n_elements
from crystal_cli.evaluate.pipeline import Evaluation
from crystal_cli.evaluate.stability import METASTABLE_THRESHOLD, STABLE_THRESHOLD
from crystal_cli.runs import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOT_NAMES = ("e_above_hull.png", "density.png", "n_elements.png", "validity.png", "phase_diagram.png")


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    _pyplot().close(figure)
    return path


def phase_diagram(evaluation: Evaluation, directory: Path, chemsys: str | None = None) -> Path | None:
    """pymatgen's PDPlotter hull of one chemical system (`chemsys` such as "Li-Fe-P-O", else the most frequent
    one among the relaxed samples, 2 to 4 elements) with the samples placed on it by their formation energy.
    None when there is no hull, no relaxed sample in that system, or it has more than 4 elements."""
    from pymatgen.analysis.phase_diagram import PDEntry, PDPlotter, PhaseDiagram

    if evaluation.hull is None:
        return None
    relaxed = [s for s in evaluation.samples if s.stability is not None and s.stability.error is None
               and s.stability.formation_energy_per_atom is not None and s.stability.relaxed is not None]
    systems = Counter(s.stability.relaxed.composition.chemical_system for s in relaxed
                      if 2 <= len(s.stability.relaxed.composition.elements) <= 4)
    system = "-".join(sorted(chemsys.split("-"))) if chemsys else (systems.most_common(1)[0][0] if systems else None)
    if system is None or not 2 <= len(system.split("-")) <= 4:
        return None
    elements = frozenset(system.split("-"))
    samples = [PDEntry(s.stability.relaxed.composition,
                       s.stability.formation_energy_per_atom * s.stability.relaxed.composition.num_atoms,
                       name=s.entry.id)
               for s in relaxed if frozenset(el.symbol for el in s.stability.relaxed.composition.elements) <= elements]
    if not samples:
        return None
    diagram = PhaseDiagram(evaluation.hull.reference_entries(elements) + samples)
    plotter = PDPlotter(diagram, show_unstable=max(0.2, max(diagram.get_e_above_hull(e) for e in samples)),
                        backend="matplotlib")
    axis = plotter.get_plot(label_unstable=True, highlight_entries=samples)
    axis.set_title(f"{system}: {len(samples)} samples on the reference hull")
    axis.figure.set_size_inches(9, 7)  # pymatgen's large fonts need the room
    return _save(axis.figure, directory / "phase_diagram.png")


def write_plots(evaluation: Evaluation, directory: str | Path, chemsys: str | None = None) -> list[Path]:
    """Every figure the evaluation has data for (with a hull and relaxed samples also the phase diagram of
    `chemsys`, or of the samples' most frequent chemical system); returns the files written."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    valid = [s.entry.structure for s in evaluation.samples if s.valid]

    e_hull = [s.stability.e_above_hull for s in evaluation.samples
              if s.stability is not None and s.stability.error is None and s.stability.e_above_hull is not None]
    if e_hull:
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.hist(e_hull, bins=40, color="tab:blue")
        axis.axvline(STABLE_THRESHOLD, color="k", linestyle="--", label="stable (0)")
        axis.axvline(METASTABLE_THRESHOLD, color="tab:red", linestyle="--", label=f"metastable ({METASTABLE_THRESHOLD})")
        axis.set(xlabel="E above hull (eV/atom)", ylabel="structures", title=f"E_hull, n = {len(e_hull)}")
        axis.legend()
        written.append(_save(figure, directory / "e_above_hull.png"))

    if valid:
        reference = evaluation.reference_properties
        for name, values, integer in (("density", [density(s) for s in valid], False),
                                      ("n_elements", [n_elements(s) for s in valid], True)):
            figure, axis = plt.subplots(figsize=(6, 4))
            combined = values + reference.get(name, [])
            bins = np.arange(0.5, max(combined) + 1.5) if integer else np.histogram_bin_edges(combined, bins=40)
            axis.hist(values, bins=bins, density=True, alpha=0.6, label=f"samples (n = {len(values)})")
            if reference.get(name):
                axis.hist(reference[name], bins=bins, density=True, alpha=0.6,
                          label=f"reference (n = {len(reference[name])})")
            axis.set(xlabel="density (g/cm³)" if name == "density" else "number of elements", ylabel="probability density")
            axis.legend()
            written.append(_save(figure, directory / f"{name}.png"))

    reasons: Counter = Counter()
    for s in evaluation.samples:
        if s.entry.structure is None:
            reasons[f"parse: {s.entry.error}"] += 1
        elif not s.valid:
            if not s.validity.structural:
                reasons[f"structure: {s.validity.structural_reason}"] += 1
            if not s.validity.compositional:
                reasons[f"smact: {s.validity.compositional_reason}"] += 1
    reasons["valid"] = len(valid)
    figure, axis = plt.subplots(figsize=(7, 0.4 * len(reasons) + 1.5))
    labels, counts = zip(*reasons.most_common())
    axis.barh(labels, counts, color=["tab:green" if label == "valid" else "tab:red" for label in labels])
    axis.invert_yaxis()
    axis.set(xlabel="entries", title=f"validity of {len(evaluation.samples)} entries")
    written.append(_save(figure, directory / "validity.png"))
    diagram = phase_diagram(evaluation, directory, chemsys)
    if diagram is not None:
        written.append(diagram)
    return written
