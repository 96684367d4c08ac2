"""Distribution metrics against a reference set, as CDVAE computes them (scripts/compute_metrics.py).

COV-R / COV-P: a structure fingerprint (CrystalNN "ops" site fingerprints averaged over sites) and a
composition fingerprint (Magpie element-property statistics, standardised) per crystal; a reference crystal is
recalled when some generated crystal lies within 0.4 (structure) and, separately, within 10 (composition) of
it; precision counts generated crystals within both cut-offs of some reference crystal, over all generated
entries (fingerprint failures and parse failures included in the denominator, as CDVAE does). Wasserstein
distances compare density (g/cm³) and number of elements of valid samples with the reference.

One difference, on purpose: CDVAE standardises Magpie features with constants fitted on its MP-20 training
set; here the scaler is fitted on the reference fingerprints actually used, so the composition cut-off keeps
its meaning for any reference set. The report records this.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Structure

from crystal_cli.evaluate.parallel import map_ordered

STRUCTURE_CUTOFF = 0.4  # MP-20 values of CDVAE's COV_Cutoffs
COMPOSITION_CUTOFF = 10.0
WASSERSTEIN_SAMPLES = 1000

_featurizers: tuple | None = None


def _get_featurizers():
    global _featurizers
    if _featurizers is None:
        from matminer.featurizers.composition.composite import ElementProperty
        from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

        _featurizers = (CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie"))
    return _featurizers


@dataclass
class Fingerprint:
    """Both fingerprints of one crystal; either is None when its featuriser failed."""

    structure: np.ndarray | None
    composition: np.ndarray | None


def fingerprint(structure: Structure) -> Fingerprint:
    """CrystalNN "ops" site fingerprints averaged over sites, and the Magpie composition vector."""
    site_featurizer, composition_featurizer = _get_featurizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            composition = np.array(composition_featurizer.featurize(Composition(structure.composition)), dtype=float)
        except Exception:  # Magpie lacks data for some elements; CDVAE then drops the crystal
            composition = None
        try:
            sites = [site_featurizer.featurize(structure, i) for i in range(len(structure))]
            structural = np.array(sites, dtype=float).mean(axis=0)
        except Exception:  # CrystalNN fails on some degenerate cells: the crystal cannot cover anything
            structural = None
    return Fingerprint(structural, composition)


def fingerprints(
    structures: Sequence[Structure], workers: int = 1, progress: Callable[[int], None] | None = None
) -> list[Fingerprint]:
    return map_ordered(fingerprint, list(structures), workers, progress)


class CompositionScaler:
    """Standardises Magpie vectors with the reference's mean/std; NaN features become 0 (CDVAE's token)."""

    def __init__(self, reference: np.ndarray):
        self.mean = np.nanmean(reference, axis=0)
        std = np.nanstd(reference, axis=0)
        self.std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        self.mean = np.where(np.isfinite(self.mean), self.mean, 0.0)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return np.nan_to_num((vectors - self.mean) / self.std, nan=0.0)


def coverage(
    generated: Sequence[Fingerprint], reference: Sequence[Fingerprint], n_generated: int,
    structure_cutoff: float = STRUCTURE_CUTOFF, composition_cutoff: float = COMPOSITION_CUTOFF,
) -> dict:
    """COV-R, COV-P and the mean matching distances (AMSD/AMCD), CDVAE's compute_cov."""
    from scipy.spatial.distance import cdist

    gen = [f for f in generated if f.structure is not None and f.composition is not None]
    ref = [f for f in reference if f.structure is not None and f.composition is not None]
    if not gen or not ref:
        return {"cov_recall": None, "cov_precision": None, "n_generated": n_generated,
                "n_generated_fingerprinted": len(gen), "n_reference": len(ref)}
    ref_comp = np.array([f.composition for f in ref])
    scaler = CompositionScaler(ref_comp)
    struct_dist = cdist(np.array([f.structure for f in gen]), np.array([f.structure for f in ref]))
    comp_dist = cdist(scaler.transform(np.array([f.composition for f in gen])), scaler.transform(ref_comp))
    recall_hit = (struct_dist.min(axis=0) <= structure_cutoff) & (comp_dist.min(axis=0) <= composition_cutoff)
    precision_hit = (struct_dist.min(axis=1) <= structure_cutoff) & (comp_dist.min(axis=1) <= composition_cutoff)
    return {
        "cov_recall": float(recall_hit.mean()),
        "cov_precision": float(precision_hit.sum() / max(n_generated, 1)),
        "amsd_recall": float(struct_dist.min(axis=0).mean()),
        "amsd_precision": float(struct_dist.min(axis=1).mean()),
        "amcd_recall": float(comp_dist.min(axis=0).mean()),
        "amcd_precision": float(comp_dist.min(axis=1).mean()),
        "n_generated": n_generated,
        "n_generated_fingerprinted": len(gen),
        "n_reference": len(ref),
        "structure_cutoff": structure_cutoff,
        "composition_cutoff": composition_cutoff,
        "composition_scaler": "fitted on the reference fingerprints",
    }


def density(structure: Structure) -> float:
    return float(structure.density)


def n_elements(structure: Structure) -> int:
    return len(structure.composition.elements)


def wasserstein(samples: Sequence[Structure], reference: Sequence[Structure], seed: int = 0,
                n_samples: int = WASSERSTEIN_SAMPLES) -> dict:
    """Wasserstein distances of density and #elements: ≤ n_samples seeded valid samples vs the reference."""
    from scipy.stats import wasserstein_distance

    if not samples or not reference:
        return {"wdist_density": None, "wdist_num_elems": None, "n_samples": len(samples), "n_reference": len(reference)}
    rng = np.random.default_rng(seed)
    if len(samples) > n_samples:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), n_samples, replace=False))]
    return {
        "wdist_density": float(wasserstein_distance([density(s) for s in samples], [density(s) for s in reference])),
        "wdist_num_elems": float(
            wasserstein_distance([n_elements(s) for s in samples], [n_elements(s) for s in reference])
        ),
        "n_samples": len(samples),
        "n_reference": len(reference),
    }
