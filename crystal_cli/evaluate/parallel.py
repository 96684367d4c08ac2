"""One way to fan work out over processes, shared by fingerprints, matching and relaxation.

Spawned (not forked) workers: the parent may already hold torch/OpenMP thread pools, which a fork copies in a
locked state. Results come back in job order so callers can zip them with their inputs.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def imap_ordered(
    function: Callable[[Any], Any], jobs: Sequence[Any], workers: int = 1, initializer: Callable | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Results of function(job) in job order, computed in `workers` spawned processes (in-process when 1)."""
    if not jobs:
        return
    if workers <= 1 or len(jobs) <= 1:
        if initializer is not None:
            initializer(*initargs)
        for job in jobs:
            yield function(job)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(function, jobs, chunksize=1)


def map_ordered(
    function: Callable[[Any], Any], jobs: Sequence[Any], workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[Any]:
    """imap_ordered collected into a list, calling progress(1) after each job."""
    results = []
    for result in imap_ordered(function, jobs, workers):
        results.append(result)
        if progress is not None:
            progress(1)
    return results
