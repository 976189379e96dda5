"""Benchmark: a large EELS map analysed in-process against on a 2-worker local Dask cluster (live/pipeline/batch.py).

Usage: ``python benchmarks/eels_dask.py [--size 256] [--channels 2048] [--workers 2] [--rows-per-task 16]
[--per-point-rows 16] [--repeats 2] [--no-stock] [--no-full]``.

First, interleaved ``--repeats`` times: the per-point step alone (``batch.map_rows`` over ``--per-point-rows``
scan rows) in this process (one analysis thread, as on a worker), on the cluster of ``batch.open_client`` and on
a LocalCluster with Dask's stock settings (its workers start with ``MALLOC_TRIM_THRESHOLD_=65536``): CPU time
and minor page faults per point, the workers' from ``getrusage`` in each worker process.

Writes a two-material map (one 2048-channel spectrum per point, corpus generator of tests/corpus, temperature
gradient across x) as a session file in a temporary folder, then times, in the same run, ``replay --analyze``
in-process and :func:`stemlive.live.pipeline.batch.analyze_files` (maps split by rows of points; cluster start-up
included and reported separately), and checks that both give the same arrays.

Steps (wall and CPU seconds, accumulated by wrapping the functions in this process): recording the spectra
into the output file, the per-point step (alignment, temperatures), writing per-point result rows, the final
step (whole-map datasets, segmentation, peaks).  On Dask the per-point step runs on the workers: their task
time (Dask's task stream) and CPU time (each worker process) are reported instead.  The load average of the
shared machine is printed with each phase.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import generator  # noqa: E402

from stemlive.live.analysis import eels  # noqa: E402
from stemlive.live.pipeline import batch, eels_stage  # noqa: E402
from stemlive.live.pipeline.registry import make_params  # noqa: E402
from stemlive.live.pipeline.replay import replay_analyze  # noqa: E402
from stemlive.live.storage import session as session_mod  # noqa: E402
from stemlive.live.storage.session import SessionWriter  # noqa: E402
from stemlive.live.wire.protocol import Message  # noqa: E402


def write_map(path: Path, size: int, channels: int, seed: int = 0) -> None:
    """``size x size`` points, materials P | Q (left/right halves), 300-360 K across x, 2e8 e per spectrum."""
    inst = generator.Instrument(0.44, -300.0, channels, generator.ZeroLoss(), generator.Background(), 0.002)
    rng = np.random.default_rng(seed)
    temps = np.round(300.0 + 60.0 * np.arange(size) / max(1, size - 1))  # 1 K steps: cached expected spectra
    mean = {(m, t): generator.expected_counts(inst, {m: 1.0}, float(t), 2e8).astype(np.float64)
            for m in ("P", "Q") for t in np.unique(temps)}
    settings = {"scan_shape": [size, size], "dispersion_meV": 0.44, "exposure_ms": 10.0}
    start = Message({"proto": "stemlive/1", "type": "session_start", "session": "bench", "seq": 0, "t": 0.0,
                     "kind": "eels_map", "settings": settings}, None)
    with SessionWriter(path, start) as w:
        for iy in range(size):
            mu = np.stack([mean[("P" if ix < size // 2 else "Q", temps[ix])] for ix in range(size)])
            rows = rng.poisson(mu).astype(np.float32)
            pts = [iy * size + ix for ix in range(size)]
            header = {"proto": "stemlive/1", "type": "spectrum", "session": "bench", "seq": iy + 1,
                      "t": [0.01 * p for p in pts], "point_index": pts, "frame_index": [0] * size,
                      "x_nm": [float(ix) for ix in range(size)], "y_nm": [float(iy)] * size,
                      "energy_offset_meV": [-300.0] * size, "dispersion_meV": 0.44, "exposure_ms": 10.0}
            w.append(Message(header, rows))


def _arrays(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        f["results"].visititems(lambda n, o: out.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None)
    return out


STEPS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
"""step -> [wall s, CPU s of this process] (CPU includes the analysis's own threads)."""


def _timed(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            STEPS[step][0] += time.perf_counter() - t0
            STEPS[step][1] += time.process_time() - c0
    return wrapper


def _timed_gen(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield from fn(*args, **kwargs)
        finally:
            STEPS[step][0] += time.perf_counter() - t0
            STEPS[step][1] += time.process_time() - c0
    return wrapper


def _instrument() -> None:
    """Time the steps in this process (the wrapped functions do not call one another)."""
    w = session_mod.SessionWriter
    w.append = _timed("record spectra", w.append)  # type: ignore[method-assign]
    w.write_result = _timed("write result rows", w.write_result)  # type: ignore[method-assign]
    eels.sum_aligned = _timed("alignment", eels.sum_aligned)
    st = eels_stage.EELSStage
    st._temperatures = _timed("temperatures", st._temperatures)  # type: ignore[method-assign]
    st._final = _timed_gen("final step (datasets, segmentation, peaks)", st._final)  # type: ignore[method-assign]


def _report(label: str) -> None:
    for step, (wall, cpu) in sorted(STEPS.items()):
        print(f"  {label} {step:45s} {wall:8.1f} s wall {cpu:8.1f} s CPU", flush=True)
    STEPS.clear()


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def _rusage() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _faults() -> float:
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def per_point(src: Path, params: dict, clients: dict[str, Any], rows: int, rows_per_task: int, repeats: int) -> None:
    """The per-point step alone (``batch.map_rows`` over ``rows`` scan rows after the first), in this process
    (one analysis thread, as on a worker) and on each cluster, interleaved ``repeats`` times: CPU per point."""
    from stemlive.live.analysis._threads import limit_threads
    from stemlive.live.storage.session import SessionReader

    with SessionReader(src) as reader:
        order = [int(p) for p in reader.spectrum_table()["point_index"]]
        nx = int(reader.settings["scan_shape"][1])
    energy = batch.map_rows(src, order[:nx], params, None).energy_meV
    parts = [order[i : i + rows_per_task * nx] for i in range(nx, min(len(order), (rows + 1) * nx), rows_per_task * nx)]
    n = sum(len(p) for p in parts)
    # the stock cluster twice: with the tasks' heap_reuse switched off on its workers (the per-point step as before
    # this round) and on (as on an existing scheduler's workers now)
    variants = [(label, c, True) for label, c in clients.items() if "stock" not in label]
    variants += [(f"{label}, {'with' if reuse else 'without'} heap_reuse", c, reuse)
                 for label, c in clients.items() if "stock" in label for reuse in (False, True)]
    for c in clients.values():  # warm the workers up (imports, first file open)
        c.gather([c.submit(batch.map_rows, src, order[:nx], params, energy, pure=False) for _ in range(2)])
    for r in range(repeats):
        t0, c0, f0 = time.perf_counter(), time.process_time(), _faults()
        with limit_threads(1):
            for part in parts:
                batch.map_rows(src, part, params, energy)
        t1, c1, f1 = time.perf_counter(), time.process_time(), _faults()
        print(f"  per-point step, round {r + 1}, {n} points: in-process {1e3 * (c1 - c0) / n:.3f} ms CPU/point "
              f"({1e3 * (t1 - t0) / n:.3f} ms wall, {(f1 - f0) / n:.0f} page faults/point); {_load()}", flush=True)
        for label, c, reuse in variants:
            c.run(_heap_reuse, reuse)
            cpu0, flt0 = c.run(_rusage), c.run(_faults)
            t0 = time.perf_counter()
            c.gather([c.submit(batch.map_rows, src, part, params, energy, pure=False) for part in parts])
            wall = time.perf_counter() - t0
            cpu = sum(v - cpu0[w] for w, v in c.run(_rusage).items())
            flt = sum(v - flt0[w] for w, v in c.run(_faults).items())
            print(f"  per-point step, round {r + 1}, {n} points: {label} {1e3 * cpu / n:.3f} ms CPU/point on the "
                  f"workers ({1e3 * wall / n:.3f} ms wall, {flt / n:.0f} page faults/point); {_load()}", flush=True)


def _heap_reuse(on: bool) -> None:
    """On a worker: the tasks' :func:`~stemlive.live.analysis._malloc.heap_reuse` on or off (off: a no-op)."""
    from stemlive.live.analysis import _malloc

    if not hasattr(_malloc, "_fixed"):
        _malloc._fixed = _malloc.fixed_trim_threshold  # type: ignore[attr-defined]
    _malloc.fixed_trim_threshold = _malloc._fixed if on else (lambda: None)  # type: ignore[attr-defined]


def stock_cluster(n_workers: int) -> tuple[Any, Callable[[], None]]:
    """A LocalCluster with Dask's defaults (as ``batch.open_client`` made it before this round)."""
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.WARNING)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows-per-task", type=int, default=16)
    ap.add_argument("--per-point-rows", type=int, default=16,
                    help="scan rows of the interleaved per-point comparison (0: skip it)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-stock", action="store_true", help="leave out Dask's stock LocalCluster in the comparison")
    ap.add_argument("--no-full", action="store_true", help="only the per-point comparison")
    args = ap.parse_args()
    # the live segmentation refresh (every 5 points, a k-means over all points so far) is for live viewing:
    # off in both runs (the batch workers never run it)
    params = make_params(overrides=["eels.k=2", "eels.labels_every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src = d / "map.h5"
        t0 = time.perf_counter()
        write_map(src, args.size, args.channels)
        print(f"wrote {args.size}x{args.size} x {args.channels} channels: {time.perf_counter() - t0:.1f} s", flush=True)

        t0 = time.perf_counter()
        client, close = batch.open_client(n_workers=args.workers)
        t_start = time.perf_counter() - t0
        print(f"Dask cluster start-up ({args.workers} workers): {t_start:.1f} s", flush=True)
        try:
            if args.per_point_rows > 0:
                clients = {"Dask (batch.local_cluster)": client}
                closers = []
                if not args.no_stock:
                    t0 = time.perf_counter()
                    stock, close_stock = stock_cluster(args.workers)
                    print(f"stock Dask LocalCluster start-up: {time.perf_counter() - t0:.1f} s", flush=True)
                    clients["Dask (stock LocalCluster)"] = stock
                    closers.append(close_stock)
                try:
                    per_point(src, params, clients, args.per_point_rows, args.rows_per_task, args.repeats)
                finally:
                    for c in closers:
                        c()
            if not args.no_full:
                full(src, d, params, client, args, t_start)
        finally:
            close()


def full(src: Path, d: Path, params: dict, client: Any, args: argparse.Namespace, t_start: float) -> None:
    """The whole analysis: ``replay --analyze`` in-process, then on the cluster (already started)."""
    _instrument()
    print(f"in-process start: {_load()}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    replay_analyze(src, d / "in_process.h5", params)
    t_in, c_in = time.perf_counter() - t0, time.process_time() - c0
    print(f"in-process replay --analyze: {t_in:.1f} s wall, {c_in:.1f} s CPU; end: {_load()}", flush=True)
    n_points = args.size * args.size
    step_cpu = STEPS["alignment"][1] + STEPS["temperatures"][1]
    print(f"in-process per-point step (alignment + temperatures): {1e3 * step_cpu / n_points:.3f} ms CPU/point",
          flush=True)
    _report("in-process")

    from distributed import get_task_stream

    cpu0 = client.run(time.process_time)
    print(f"Dask start: {_load()}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    with get_task_stream(client) as ts:
        out = batch.analyze_files([src], d / "batch", params, client=client,
                                  rows_per_task=args.rows_per_task)[0]
    t_batch, c_batch = time.perf_counter() - t0, time.process_time() - c0
    cpu1 = client.run(time.process_time)
    tasks = [t for t in ts.data if "map_rows" in str(t.get("key", ""))]
    task_s = sum(x["stop"] - x["start"] for t in tasks for x in t.get("startstops", ())
                 if x.get("action") == "compute")
    worker_cpu = sum(cpu1[w] - cpu0[w] for w in cpu1)
    print(f"Dask, {args.workers} local workers: {t_batch:.1f} s wall (+ {t_start:.1f} s cluster start-up), "
          f"client {c_batch:.1f} s CPU, workers {worker_cpu:.1f} s CPU ({task_s:.1f} s in {len(tasks)} tasks); "
          f"end: {_load()}", flush=True)
    print(f"Dask workers: {1e3 * worker_cpu / n_points:.3f} ms CPU/point (the per-point step and its I/O)", flush=True)
    _report("Dask client")
    print(f"in-process / Dask = {t_in / t_batch:.2f} (wall), CPU in-process / (client + workers) = "
          f"{c_in / (c_batch + worker_cpu):.2f}", flush=True)
    a, b = _arrays(d / "in_process.h5"), _arrays(out)
    same = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")
                                          if a[k].dtype.names is None else a[k].tolist() == b[k].tolist()
                                          for k in a)
    print(f"identical results: {same}")
    if not same:
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                print(f"  only in one file: {k}")
            elif not (np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") if a[k].dtype.names is None
                      else a[k].tolist() == b[k].tolist()):
                print(f"  differs: {k}: {str(a[k])[:300]} | {str(b[k])[:300]}")


if __name__ == "__main__":
    main()
