"""Benchmark: the whole chain of ``stemlive tomo atoms`` (angles and 3D atoms) at the reference size, step by step.

Usage::

    python benchmarks/tomo_chain.py [--size 512] [--extent-nm 16] [--no-drift] [--workers 2] [--json out.json]

Data: :func:`stemlive.simulators.tilt_sums.simulate_tilt_sums` of the default scenario (the 16 x 16 nm MoS2-WSe2
flake, ripple, vacancies, stage hysteresis, 10 frames of 17 pA x 4 us per tilt) at the 12 reference nominal
tilts; ``--no-drift`` renders the sums without the drift during the frame.

Steps (one BLAS thread), each with wall and CPU time (``time.process_time`` of this process plus, with
``--workers`` > 1, the worker processes' CPU from ``resource.getrusage(RUSAGE_CHILDREN)``): column fits of all
tilts, first calibration, refit of every projection's atoms at their predicted positions, recalibration, 3D atoms
(:func:`~stemlive.live.analysis.atoms3d.build_model`). The steps are those of
:func:`~stemlive.live.analysis.atomic_tomography.reconstruct_atoms`, called one by one. Printed with them: the
angle errors against the simulator's actual angles and :func:`~stemlive.simulators.tilt_sums.compare_model`'s
accuracy figures. Target (issue 14): angles and atoms in under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from stemlive.live.analysis import atomic_tomography as at
from stemlive.live.analysis import atoms3d, tilt_calibration
from stemlive.simulators.scenario import load_scenario
from stemlive.simulators.tilt_sums import TiltSums, compare_model, simulate_tilt_sums


class Clock:
    """Wall and CPU seconds since creation (this process and its reaped children)."""

    @staticmethod
    def _cpu() -> float:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    def read(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.wall, 2), "cpu_s": round(self._cpu() - self.cpu, 2)}


def scenario_parser(doc: str) -> argparse.ArgumentParser:
    """The reference tilt series' options shared by the tomography benchmarks."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--extent-nm", type=float, default=16.0)
    ap.add_argument("--no-drift", action="store_true", help="sums without the drift during the frame")
    ap.add_argument("--json", help="write the figures here")
    return ap


def reference_sums(args: argparse.Namespace) -> tuple[Any, TiltSums]:
    """The default scenario (flake extent and drift from ``args``) and its per-tilt sums at the reference tilts."""
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} (shared machine)", flush=True)
    changes: dict[str, Any] = {"sample": {"extent_x_nm": args.extent_nm, "extent_y_nm": args.extent_nm},
                               "stage": {"settle_time_s": 0.0}}
    if args.no_drift:
        changes["drift"] = {"velocity_nm_per_s": (0.0, 0.0), "random_walk_nm_per_sqrt_s": 0.0}
    sc = load_scenario("default").replace(**changes)
    return sc, simulate_tilt_sums(sc, shape=(args.size, args.size))


def main() -> None:
    ap = scenario_parser(__doc__)
    ap.add_argument("--workers", type=int, default=2, help="processes for the per-tilt fits")
    args = ap.parse_args()
    sc, ts = reference_sums(args)
    data = ts.sums.astype(float)
    px = 10 * ts.pixel_size_nm
    al, be = ts.nominal_deg[:, 0], ts.nominal_deg[:, 1]
    sigma = sc.haadf.probe_fwhm_A / at.FWHM_PER_SIGMA / px
    out: dict[str, Any] = {"size": args.size, "no_drift": args.no_drift, "workers": args.workers,
                           "load_start": round(os.getloadavg()[0], 1)}
    steps: dict[str, dict[str, float]] = {}
    # older versions of the chain have no workers argument
    kw = {"workers": args.workers} if hasattr(at, "fit_tilt_columns") else {}
    total = Clock()
    with threadpool_limits(limits=1, user_api="blas"):
        clock = Clock()
        if kw:
            cols = at.fit_tilt_columns(data, al, be, px, **kw)
        else:
            from stemlive.live.analysis import columns
            from stemlive.live.analysis.reconstruct import stage_rotation

            rot = stage_rotation(al, be).reshape(-1, 3, 3)
            cols = [columns.find_columns(data[k], pixel_size_A=px,
                                         chalcogen_offset_px=1.6 * np.array([rot[k, 1, 2], rot[k, 0, 2]]) / px)
                    for k in range(len(data))]
        steps["columns"] = clock.read()
        print("columns", steps["columns"], flush=True)
        clock = Clock()
        obs = tilt_calibration.MetalObservations([c.position[c.is_metal] for c in cols],
                                                 [c.position_err[c.is_metal] for c in cols],
                                                 [c.intensity[c.is_metal] for c in cols])
        cal1 = tilt_calibration.calibrate_tilts(obs, al, be, px, data.shape[1:])
        steps["first_calibration"] = clock.read()
        clock = Clock()
        ref = cols[cal1.reference]
        chalcogen_px = ref.position[~ref.is_metal]
        metal_px, metal_err = at.refit_metals(data, cal1, chalcogen_px, sigma, **kw)
        steps["refit"] = clock.read()
        print("refit", steps["refit"], flush=True)
        clock = Clock()
        # as reconstruct_atoms(fit_distortion=True): the common image distortion fitted in the recalibration
        cal2 = tilt_calibration.recalibrate(cal1, metal_px, metal_err, distortion=True)
        steps["recalibration"] = clock.read()
        angles = total.read()
        clock = Clock()
        model = atoms3d.build_model(data, at.geometry_of(cal2, data.shape[1:]), cal2.metals_A, chalcogen_px,
                                    cal2.reference, sigma)
        steps["atoms"] = clock.read()
    steps["angles"] = angles
    steps["total"] = total.read()
    out["steps"] = steps
    out["atoms_steps_cpu_s"] = model.timings_s
    for name, cal in (("first", cal1), ("final", cal2)):
        err = np.column_stack([cal.alpha_deg, cal.beta_deg]) - ts.actual_deg
        out[f"{name}_angle_error_max_deg"] = round(float(np.abs(err).max()), 4)
        out[f"{name}_angle_error_rms_deg"] = round(float(np.sqrt(np.mean(err**2))), 4)
    out["final_angle_error_deg"] = np.round(np.column_stack([cal2.alpha_deg, cal2.beta_deg]) - ts.actual_deg,
                                            4).tolist()
    out["nominal_error_max_deg"] = round(float(np.abs(ts.nominal_deg - ts.actual_deg).max()), 2)
    out["final_se_median_deg"] = round(float(np.median(np.r_[cal2.alpha_err_deg, cal2.beta_err_deg])), 4)
    out["final_rms_px"] = cal2.rms_px
    out["columns_per_tilt"] = [len(c) for c in cols]
    out["model"] = {k: round(v, 4) for k, v in compare_model(ts, sc, model.positions_A, model.species,
                                                             model.vacancy_sites_A).items()}
    out["sigma_px"], out["element_height"] = model.sigma_px, model.element_height
    out["load_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
