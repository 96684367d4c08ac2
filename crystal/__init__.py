"""crystal's Python API: `import crystal`, then crystal.generate / iter_generate / load_model / refine /
evaluate (in memory) and their file-to-file forms (generate_to_file, refine_file, evaluate_file), which are
what the `crystal` command runs. Defined in crystal_cli.api; imported on first use, so this stays light."""

from __future__ import annotations

from crystal_cli import __version__

__all__ = ["Model", "Report", "Sample", "__version__", "evaluate", "evaluate_file", "generate", "generate_to_file",
           "iter_generate", "load_model", "refine", "refine_file"]


def __getattr__(name: str):
    if name in __all__:
        from crystal_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'crystal' has no attribute {name!r}")
