"""Simulator benchmarks: ``python benchmarks/simulator.py`` runs every ``bench_*`` function in this module.

HAADF: milliseconds per 512 x 512 frame of the default scene, compared with nionswift-usim, which paces a
512 x 512 frame at 4 us in real time (~1.1 s).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

USIM_FRAME_S = 1.1  # nionswift-usim: a 512 x 512 frame at 4 us takes ~1.1 s (real-time pacing)


def bench_haadf(repeats: int = 20, scenario: str = "default") -> dict[str, Any]:
    """Time 512 x 512 HAADF frames: the default 16 x 16 nm flake (~8,100 atoms in the field) and a 7.6 x 7.6 nm
    flake (~2,000 atoms, the size of the reference reconstruction) in the same 16.4 nm field."""
    from stemlive.simulators.scenario import load_scenario

    full = _bench_haadf_scene(load_scenario(scenario), repeats, label=scenario)
    small = load_scenario(scenario).replace(sample={"extent_x_nm": 7.6, "extent_y_nm": 7.6})
    return {"full": full, "small": _bench_haadf_scene(small, repeats, label=f"{scenario}, 7.6 nm flake")}


def _bench_haadf_scene(scen: Any, repeats: int, label: str) -> dict[str, Any]:
    """Median/min wall and CPU ms per noisy and noise-free frame of one scene."""
    import numpy as np

    from stemlive.simulators.haadf import HAADFSimulator

    scenario = label
    t0 = time.perf_counter()
    sim = HAADFSimulator(scen)
    build_ms = 1e3 * (time.perf_counter() - t0)
    p = scen.haadf
    kw = dict(shape=p.shape_px, fov_nm=p.fov_nm, dwell_us=p.dwell_us)
    tilts = [(0.0, 0.0), (-14.3, -22.9), (20.1, 17.1), (6.3, 6.3)]
    out: dict[str, Any] = {"scenario": scenario, "atoms_in_sample": len(sim.atoms), "build_sample_ms": build_ms}
    for noise in (True, False):
        times, cpu = [], []
        sim.render_frame(alpha_deg=0.0, beta_deg=0.0, t_start_s=0.0, noise=noise, **kw)  # warm-up
        for i in range(repeats):
            a, b = tilts[i % len(tilts)]
            t0, c0 = time.perf_counter(), time.process_time()
            _, truth = sim.render_frame(alpha_deg=a, beta_deg=b, t_start_s=1.2 * i, noise=noise,
                                        rng=np.random.default_rng(i), **kw)
            times.append(1e3 * (time.perf_counter() - t0))
            cpu.append(1e3 * (time.process_time() - c0))
        key = "noisy" if noise else "noise_free"
        out[f"{key}_median_ms"] = statistics.median(times)
        out[f"{key}_min_ms"] = min(times)
        out[f"{key}_cpu_median_ms"] = statistics.median(cpu)
        out["atoms_in_field"] = truth.n_atoms
    out["speedup_vs_usim_realtime"] = USIM_FRAME_S * 1e3 / out["noisy_median_ms"]
    print(f"HAADF {p.shape_px[0]}x{p.shape_px[1]} ({scenario}: {out['atoms_in_field']} atoms in field, "
          f"sample built in {build_ms:.0f} ms): {out['noisy_median_ms']:.1f} ms/frame median "
          f"(min {out['noisy_min_ms']:.1f}, CPU {out['noisy_cpu_median_ms']:.1f}), "
          f"noise-free {out['noise_free_median_ms']:.1f} ms (CPU {out['noise_free_cpu_median_ms']:.1f}); "
          f"usim real time {USIM_FRAME_S * 1e3:.0f} ms -> {out['speedup_vs_usim_realtime']:.0f}x faster "
          f"(target <= 50 ms)")
    return out


def main() -> int:
    """Run every ``bench_*`` function defined in this module."""
    module = sys.modules[__name__]
    results = {}
    for name in sorted(n for n in dir(module) if n.startswith("bench_")):
        results[name] = getattr(module, name)()
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
