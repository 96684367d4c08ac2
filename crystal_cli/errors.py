"""The one exception type the CLI turns into a one-line message and exit code 2, and the count check every
stage words the same way."""

from __future__ import annotations

from collections.abc import Mapping


class CrystalError(Exception):
    """A user-facing problem (bad path, bad input, bad option). Never a bug in crystal itself."""


def check_counts(counts: Mapping[str, int | None]) -> None:
    """Every count given (None: not set) must be >= 1; CrystalError names the first flag that is not."""
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise CrystalError(f"{flag} must be >= 1, got {value}")
