"""Benchmark: the tilt-angle calibration of ``stemlive tomo atoms`` at the reference size, step by step.

Usage::

    python benchmarks/tomo_angles.py [--size 512] [--no-drift] [--json out.json]

Data: :func:`stemlive.simulators.tilt_sums.simulate_tilt_sums` of the default scenario (the 16 x 16 nm MoS2-WSe2
flake, ripple, vacancies, stage hysteresis, 10 frames of 17 pA x 4 us per tilt) at the 12 reference nominal
tilts. ``--no-drift`` renders the sums without the drift during the frame (what the tilt-series stage's drift
correction delivers; the simulator otherwise gives every sum the same 0.45 px scan distortion of one frame).

Steps, each with wall and CPU time (one BLAS thread): column fits per tilt
(:func:`~stemlive.live.analysis.columns.find_columns`), the first calibration (matching and equation 1,
:func:`~stemlive.live.analysis.tilt_calibration.calibrate_tilts`), the refit of every projection's atoms at their
predicted positions (:func:`~stemlive.live.analysis.atomic_tomography.refit_metals`) and the recalibration
(:func:`~stemlive.live.analysis.tilt_calibration.recalibrate`). Printed: per-tilt angle errors against the
simulator's actual angles (nominal, first, final). The 3D atoms and the windowed step: ``benchmarks/tomo_atoms.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tomo_chain import Clock, reference_sums, scenario_parser  # the sibling benchmark (run from benchmarks/)

from stemlive.live.analysis import atomic_tomography as at
from stemlive.live.analysis import columns, tilt_calibration
from stemlive.live.analysis.reconstruct import stage_rotation


def main() -> None:
    args = scenario_parser(__doc__).parse_args()
    _sc, ts = reference_sums(args)
    px = 10 * ts.pixel_size_nm
    al, be = ts.nominal_deg[:, 0], ts.nominal_deg[:, 1]
    out: dict[str, Any] = {"size": args.size, "no_drift": args.no_drift, "load_start": os.getloadavg()[0]}
    with threadpool_limits(limits=1, user_api="blas"):
        rot = stage_rotation(al, be).reshape(-1, 3, 3)
        cols, per_tilt = [], []
        for k in range(len(ts.sums)):
            clock = Clock()
            off = 1.6 * np.array([rot[k, 1, 2], rot[k, 0, 2]]) / px
            cols.append(columns.find_columns(ts.sums[k].astype(float), pixel_size_A=px, chalcogen_offset_px=off))
            per_tilt.append(clock.read())
            print(f"columns tilt {k}: {len(cols[-1])} columns, {per_tilt[-1]}", flush=True)
        out["columns_per_tilt"] = per_tilt
        out["columns"] = {key: round(sum(p[key] for p in per_tilt), 1) for key in ("wall_s", "cpu_s")}
        clock = Clock()
        obs = tilt_calibration.MetalObservations([c.position[c.is_metal] for c in cols],
                                                 [c.position_err[c.is_metal] for c in cols],
                                                 [c.intensity[c.is_metal] for c in cols])
        cal1 = tilt_calibration.calibrate_tilts(obs, al, be, px, ts.sums.shape[1:])
        out["first_calibration"] = clock.read()
        clock = Clock()
        ref = cols[cal1.reference]
        sigma = 1.3 / at.FWHM_PER_SIGMA / px
        metal_px, metal_err = at.refit_metals(ts.sums.astype(float), cal1, ref.position[~ref.is_metal], sigma)
        out["refit"] = clock.read()
        clock = Clock()
        cal2 = tilt_calibration.recalibrate(cal1, metal_px, metal_err)
        out["recalibration"] = clock.read()
    out["angles_total"] = {key: round(sum(out[s][key] for s in ("columns", "first_calibration", "refit",
                                                                  "recalibration")), 1) for key in ("wall_s", "cpu_s")}
    for name, values in (("nominal", ts.nominal_deg), ("first", np.column_stack([cal1.alpha_deg, cal1.beta_deg])),
                         ("final", np.column_stack([cal2.alpha_deg, cal2.beta_deg]))):
        err = values - ts.actual_deg
        out[f"{name}_error_deg"] = np.round(err, 4).tolist()
        out[f"{name}_error_max_deg"] = float(np.abs(err).max())
        out[f"{name}_within_0.05"] = int((np.abs(err).max(axis=1) < 0.05).sum())
    out["final_se_deg"] = np.round(np.column_stack([cal2.alpha_err_deg, cal2.beta_err_deg]), 4).tolist()
    out["final_rms_px"] = cal2.rms_px
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in out.items() if k != "columns_per_tilt"}, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
