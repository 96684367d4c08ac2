"""Process start-up hygiene shared by the CLI, tests and benchmarks.

Two traps on CPU hosts (see README): hub look-ups that hang offline, and glibc malloc returning memory to
the OS after every small PyTorch op (up to 20x slower). Both are fixed before heavy imports happen. Also here:
llama.cpp loaded with its logging quieted, which export (quantizing) and sampling both need.
"""

from __future__ import annotations

import ctypes
import os
import warnings

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def configure_process() -> None:
    """Offline hub by default and a malloc that keeps freed memory; idempotent and cheap."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib's C code prints to stderr on hard cells
    # pymatgen warns once per noble gas when sorting formulas; it says nothing about the user's data.
    warnings.filterwarnings("ignore", message="No Pauling electronegativity")
    # peft asks transformers a deprecated question when it loads an adapter; nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def quiet_llama_cpp():
    """The llama_cpp module with llama.cpp's own logging limited to errors (library code never prints)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp logs through Python; keep only errors
    return llama_cpp
