"""Process start-up hygiene shared by the CLI, tests and benchmarks.

Two traps on CPU hosts (see README): hub look-ups that hang offline, and glibc malloc returning memory to
the OS after every small PyTorch op (up to 20x slower). Both are fixed before heavy imports happen. Also here:
llama.cpp loaded with its logging quieted, which export (quantizing) and sampling both need.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
import warnings
from pathlib import Path

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


def idle_cores(window_s: float = 0.25) -> int:
    """Cores this process may use that no other process keeps busy right now (>= 1), from /proc/stat over a
    short window. llama.cpp's worker threads spin-wait at every barrier for each other: a thread on a core
    another process holds stalls all of them (measured: 0.7 -> 0.06 structures/s on 2 cores beside one busy
    process), so sampling starts one thread per idle core instead of one per core."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def counters() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as handle:
                values = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(values[3:5]), sum(values[:8])  # (idle + iowait, all but guest time)

    first = counters()
    if first is None:  # not Linux: assume the machine is ours
        return usable
    time.sleep(window_s)
    second = counters()
    idle, total = second[0] - first[0], second[1] - first[1]
    busy = (1 - idle / total) * (os.cpu_count() or usable) if total > 0 else 0.0
    return max(1, min(usable, round((os.cpu_count() or usable) - busy)))


def matmul_gflops(dtype: str = "fp32", size: int = 1024, seconds: float = 3.0) -> float:
    """GEMM throughput of torch on all its threads in fp32 or bf16: the machine's practical dense-math
    ceiling, which the benchmarks report their share of."""
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where it cannot be read: not Linux). Read once per
    process: finetune.model.compute_context asks at every forward."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Elsewhere bf16 is emulated and slower than
    fp32, so training's precision "auto" keeps fp32 there."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def has_cxx_compiler() -> bool:
    """Is a C++ compiler on PATH? torch.compile's inductor builds its CPU kernels with one."""
    import shutil

    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def cpu_has_amx() -> bool:
    """Does this CPU have AMX tile matmuls (Intel Sapphire Rapids and later)? oneDNN's fused CPU kernels use them."""
    return "amx_bf16" in cpu_flags()
