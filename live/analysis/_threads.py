"""Thread fan-out for the batched analyses (numpy and scipy release the GIL in their array loops)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for batched analyses: the CPUs this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, on ``workers`` threads (None: :func:`default_workers`), in order.

    ``fn`` must be safe to run concurrently (independent items, disjoint outputs).
    """
    todo = list(items)
    n = default_workers() if workers is None else int(workers)
    if n <= 1 or len(todo) <= 1:
        return [fn(item) for item in todo]
    with ThreadPoolExecutor(min(n, len(todo))) as pool:
        return list(pool.map(fn, todo))


def row_blocks(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``range(n)`` (the work items of a blocked :func:`thread_map`)."""
    return [slice(i, i + size) for i in range(0, n, size)]
