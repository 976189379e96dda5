"""Peak memory of the tilt-series stage on one long tilt, frames held in memory vs spilled (issue 13).

Feeds ``--frames`` frames of ``--size`` x ``--size`` float32 (a lattice shifted by a linear drift plus noise; the
content does not change the memory) of a single tilt to the real :class:`TiltSeriesStage`, then finishes it
(the final correction reads every frame back). Each budget runs in its own child process; the peak is that
process' ``VmHWM`` (``ru_maxrss``), its CPU time is printed too.

    .venv/bin/python benchmarks/tilt_memory.py [--frames 800] [--size 512] [--budgets 100000 128]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import numpy as np

from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.tilt_stage import TiltSeriesStage
from stemlive.live.wire.protocol import Message
from stemlive.simulators.lattice import render_lattice


def run(frames: int, size: int, budget_mib: float, out: multiprocessing.queues.Queue) -> None:
    params = make_params(overrides=[f"tilt_series.frame_budget_mib={budget_mib}"])["tilt_series"]
    stage = TiltSeriesStage(params)
    rng = np.random.default_rng(0)
    base = render_lattice((size, size), (0.0, 0.0), period=9.9, counts=(1000.0, 400.0), sigma=1.7)
    cpu0 = time.process_time()
    for i in range(frames):
        image = np.roll(base, (i // 10, i // 7), axis=(0, 1)) + rng.normal(0.0, 5.0, base.shape)
        header = {"proto": "stemlive/1", "type": "frame", "session": "m", "seq": i + 1, "t": 0.1 * i,
                  "tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "frame_index": i, "dwell_us": 4.0}
        for _ in stage.process(Message(header, image.astype(np.float32))):
            pass
    for _ in stage.finish("complete"):
        pass
    out.put((budget_mib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.process_time() - cpu0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--budgets", type=float, nargs="+", default=[100000.0, 128.0], help="frame_budget_mib values")
    a = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    print(f"{a.frames} frames of {a.size}x{a.size} float32 in one tilt ({a.frames * a.size**2 * 4 / 2**20:.0f} MiB)")
    for budget in a.budgets:
        q = ctx.Queue()
        p = ctx.Process(target=run, args=(a.frames, a.size, budget, q))
        p.start()
        result = q.get()
        p.join()
        print(f"frame_budget_mib={result[0]:g}: peak {result[1]:.0f} MiB (ru_maxrss), CPU {result[2]:.1f} s")


if __name__ == "__main__":
    main()
