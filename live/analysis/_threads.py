"""Thread fan-out for the batched analyses (numpy and scipy release the GIL in their array loops)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("analysis_threads", default=None)


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Run the batched analyses of this context on at most ``n`` threads (e.g. 1 in each process of a Dask
    cluster that already runs one task per core: more threads only contend for the same cores)."""
    token = _LIMIT.set(max(1, int(n)))
    try:
        yield
    finally:
        _LIMIT.reset(token)


_CONTROLLER: Any = None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS/LAPACK on one thread in this context (threadpoolctl).

    The batched analyses call BLAS only on small matrices (e.g. a 138x138 ``eigh`` of the spill model's
    grouping), where OpenBLAS's own threads cost far more than they save: measured on the shared 2-core VM
    under load, 92 ms wall / 29 ms CPU per such ``eigh`` against 8.5 / 2.2 ms on one thread.  Their
    parallelism is :func:`thread_map`'s blocks of spectra.
    """
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


def default_workers() -> int:
    """Threads for batched analyses: the CPUs this process may run on (at least 1; see :func:`limit_threads`)."""
    limit = _LIMIT.get()
    if limit is not None:
        return limit
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def fft_workers() -> int:
    """``workers`` of the multi-row ``scipy.fft`` calls: all CPUs (-1), or the :func:`limit_threads` limit."""
    limit = _LIMIT.get()
    return -1 if limit is None else limit


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
