"""Benchmark: the windowed SIRT (live/analysis/windowed.py) in-process against on a 2-worker local Dask cluster.

Usage: ``python benchmarks/windowed_dask.py [--size 256] [--extent-nm 8] [--iterations 60] [--rounds 2]
[--workers 2] [--no-stock] [--threads 2]``.

Data: 12 reference tilts of the simulator's MoS2-WSe2 flake (:func:`stemlive.simulators.tilt_sums.simulate_tilt_sums`)
at the true geometry, binned 2x2 (windows of 60 voxels stepped by 30, 16 slices, support 12, accelerated SIRT), as
in ``benchmarks/tomo_atoms.py --windowed-only``.  Interleaved ``--rounds`` times: in-process
(:func:`~stemlive.live.analysis.windowed.reconstruct_at_calibration`, ``--threads`` per-projection threads per
window), on the cluster of :func:`stemlive.live.pipeline.batch.local_cluster` and (unless ``--no-stock``) on a
LocalCluster with Dask's stock settings (workers started with ``MALLOC_TRIM_THRESHOLD_=65536``), once with the
jobs' ``heap_reuse`` switched off (as before) and once on.  Wall time, CPU
per window (the workers' from ``getrusage`` in each worker process, plus the client's), minor page faults per
window; cluster start-up reported apart; every volume compared with the in-process one.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from stemlive.live.analysis import reconstruct as rc
from stemlive.live.analysis import windowed as wd
from stemlive.live.pipeline import batch
from stemlive.simulators.scenario import load_scenario
from stemlive.simulators.tilt_sums import simulate_tilt_sums


def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, float(ru.ru_minflt)


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def _heap_reuse(on: bool) -> None:
    """On a worker: the jobs' :func:`~stemlive.live.analysis._malloc.heap_reuse` on or off (off: a no-op)."""
    from stemlive.live.analysis import _malloc

    if not hasattr(_malloc, "_fixed"):
        _malloc._fixed = _malloc.fixed_trim_threshold  # type: ignore[attr-defined]
    _malloc.fixed_trim_threshold = _malloc._fixed if on else (lambda: None)  # type: ignore[attr-defined]


def _stock(n_workers: int) -> Any:
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.WARNING)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--extent-nm", type=float, default=8.0)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="per-projection threads of the in-process run")
    ap.add_argument("--no-stock", action="store_true")
    args = ap.parse_args()
    from distributed import Client

    sc = load_scenario("default").replace(sample={"extent_x_nm": args.extent_nm, "extent_y_nm": args.extent_nm},
                                          stage={"settle_time_s": 0.0})
    ts = simulate_tilt_sums(sc, shape=(args.size, args.size))
    ny, nx = ts.sums.shape[1:]
    rotations = rc.stage_rotation(ts.actual_deg[:, 0], ts.actual_deg[:, 1])
    shift_px = np.array([(ny - 1) / 2, (nx - 1) / 2]) + ts.centre_offset_px
    n, b = len(ts.sums), 2
    s = ts.sums[:, : ny // b * b, : nx // b * b].reshape(n, ny // b, b, nx // b, b).mean(axis=(2, 4))
    shifts = (shift_px - (b - 1) / 2) / b
    sirt = {"window": 60, "step": 30, "nz": 16, "n_iter": args.iterations, "support_z": 12}
    windows = len(rc.window_origins(s.shape[1], 60, 30)) * len(rc.window_origins(s.shape[2], 60, 30))
    print(f"{os.cpu_count()} CPUs; {n} tilts of {s.shape[1]}x{s.shape[2]} (binned), {windows} windows; {_load()}",
          flush=True)

    clusters: dict[str, Any] = {}
    makers: dict[str, Callable[[int], Any]] = {"Dask (batch.local_cluster)": batch.local_cluster}
    if not args.no_stock:
        makers["Dask (stock LocalCluster)"] = _stock
    for label, make in makers.items():
        t0 = time.perf_counter()
        clusters[label] = make(args.workers)
        print(f"{label}: start-up {time.perf_counter() - t0:.1f} s", flush=True)
    clients = {label: Client(c) for label, c in clusters.items()}
    try:
        for c in clients.values():  # warm-up: imports on the workers
            c.gather(c.map(lambda i: rc.reconstruct_window(s, rotations, (30, 30), 60, 16, n_iter=1), range(2),
                           pure=False))
        # the stock cluster with the jobs' heap_reuse switched off on its workers (as before this round) and on
        variants = [(label, c, True) for label, c in clients.items() if "stock" not in label]
        variants += [(f"{label}, {'with' if reuse else 'without'} heap_reuse", c, reuse)
                     for label, c in clients.items() if "stock" in label for reuse in (False, True)]
        for r in range(args.rounds):
            c0, f0 = _usage()
            t0 = time.perf_counter()
            ref = wd.reconstruct_at_calibration(s, rotations, shifts, workers=args.threads, **sirt)
            wall = time.perf_counter() - t0
            c1, f1 = _usage()
            print(f"round {r + 1}: in-process ({args.threads} threads per window): {wall:.1f} s wall, "
                  f"{(c1 - c0) / windows:.2f} s CPU per window, {(f1 - f0) / windows:.0f} page faults per window; "
                  f"{_load()}", flush=True)
            for label, client, reuse in variants:
                client.run(_heap_reuse, reuse)
                w0 = client.run(_usage)
                c0, _ = _usage()
                t0 = time.perf_counter()
                vol = wd.reconstruct_at_calibration(s, rotations, shifts, client=client, **sirt)
                wall_d = time.perf_counter() - t0
                c1, _ = _usage()
                w1 = client.run(_usage)
                cpu_w = sum(w1[w][0] - w0[w][0] for w in w1)
                flt = sum(w1[w][1] - w0[w][1] for w in w1)
                same = bool(np.array_equal(vol, ref))
                print(f"round {r + 1}: {label}: {wall_d:.1f} s wall (in-process / Dask = {wall / wall_d:.2f}), "
                      f"workers {cpu_w / windows:.2f} s CPU per window ({flt / windows:.0f} page faults), "
                      f"client {c1 - c0:.1f} s CPU; identical volume: {same}; {_load()}", flush=True)
    finally:
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.close()


if __name__ == "__main__":
    main()
