"""Rates with honest uncertainty: every rate the report shows carries its count and a 95 % Wilson interval.

Wilson rather than the normal approximation because generated-crystal rates sit near 0 or 1 (SUN a few %,
validity ~100 %) and samples can be small (a --stability-samples subset), where p ± 1.96·se leaves [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with the Wilson score interval at 95 %."""

    k: int
    n: int
    rate: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def wilson(k: int, n: int, confidence: float = 0.95) -> Rate:
    """The Wilson score interval of k/n (scipy's binomtest); an empty sample gives no rate (None)."""
    from scipy.stats import binomtest

    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(k, n, None, None, None)
    interval = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Rate(k, n, k / n, float(interval.low), float(interval.high))
