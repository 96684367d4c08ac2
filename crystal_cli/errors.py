"""The one exception type the CLI turns into a one-line message and exit code 2."""


class CrystalError(Exception):
    """A user-facing problem (bad path, bad input, bad option). Never a bug in crystal itself."""
