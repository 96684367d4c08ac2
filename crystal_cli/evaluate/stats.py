"""Rates with honest uncertainty: every rate the report shows carries its count and a 95 % Wilson interval.

Wilson rather than the normal approximation because generated-crystal rates sit near 0 or 1 (SUN a few %,
validity ~100 %) and samples can be small (a --stability-samples subset), where p ± 1.96·se leaves [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z_95 = 1.959963984540054


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


def wilson(k: int, n: int, z: float = Z_95) -> Rate:
    """The Wilson score interval of k/n; an empty sample gives no rate (None), never a division by zero."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(k, n, None, None, None)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(k, n, p, max(0.0, center - half), min(1.0, center + half))
