"""Benchmark: tilt-angle calibration and the 3D atomic model from 12 tilts of 512x512, and the windowed SIRT on a
2-worker local Dask cluster against in-process.

Usage::

    python benchmarks/tomo_atoms.py [--size 512] [--extent-nm 16] [--no-dask] [--windowed-only] [--json out.json]
    python benchmarks/tomo_atoms.py --atoms-only [--size 512] [--extent-nm 16]

Data: :func:`stemlive.simulators.tilt_sums.simulate_tilt_sums` of the default scenario (the 16 x 16 nm MoS2-WSe2
flake with ripple and vacancies, stage hysteresis, 10 frames of 17 pA x 4 us per tilt) at the 12 reference
nominal tilts. The chain (:func:`stemlive.live.analysis.atomic_tomography.reconstruct_atoms`) runs with one BLAS
thread; its steps are timed separately (column fits, first calibration, refit + recalibration, 3D atoms) and the
results are compared with the simulator's truth. Target: angles and atoms in under 5 minutes on 2 cores. The 3D atom
step (:func:`stemlive.live.analysis.atoms3d.build_model`) is broken down into its own steps (CPU seconds: free
refinement, amplitudes + species, element heights/widths, occupancies, final refinement).

``--atoms-only``: the 3D atom step alone at the true geometry (the angles the calibration aims at; with
``--scan-distortion`` also the linear image distortion of the drift during each frame), started from the zero-tilt
sum's columns (metals at z = 0), wall and CPU time per step; no calibration, no windowed step.

The windowed step: :func:`stemlive.live.analysis.windowed.reconstruct_at_calibration` on the sums binned 2x2
(0.64 A voxels; windows of 60 voxels stepped by 30, 16 slices, support 12, 60 accelerated SIRT iterations), once
in-process (2 threads per window) and once on ``batch.local_cluster(2)`` (2 single-threaded worker processes,
1 thread per window; ``benchmarks/windowed_dask.py`` compares them in interleaved rounds), in the same run, wall
and CPU time (the workers' CPU from ``getrusage``);
Pearson r against the true potential (:func:`~stemlive.live.analysis.windowed.potential_correlation`) at the
calibrated and at the nominal angles (nominal: cross-correlation alignment). ``--windowed-only`` skips the chain
and uses the simulator's true geometry (actual angles and field offsets) in place of the calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from stemlive.live.analysis import atomic_tomography as at
from stemlive.live.analysis import reconstruct as rc
from stemlive.live.analysis import windowed as wd
from stemlive.simulators.scenario import Scenario, load_scenario
from stemlive.simulators.tilt_sums import TiltSums, compare_model, simulate_tilt_sums, true_geometry


def atoms_only(ts: TiltSums, sc: Scenario, scan_distortion: bool) -> dict[str, Any]:
    """Step 3 alone at the true geometry, started from the zero-tilt sum's columns."""
    from stemlive.live.analysis import atoms3d, columns

    px = 10 * ts.pixel_size_nm
    rot, shift, distortion = true_geometry(ts, scan_distortion=scan_distortion)
    geo = atoms3d.Geometry(rot, shift, px, ts.sums.shape[1:], distortion)
    ref = int(np.argmin(np.hypot(*ts.nominal_deg.T)))
    out: dict[str, Any] = {}
    c0 = time.process_time()
    off = 1.6 * np.array([rot[ref, 1, 2], rot[ref, 0, 2]]) / px
    cols = columns.find_columns(ts.sums[ref].astype(float), pixel_size_A=px, chalcogen_offset_px=off)
    out["reference_columns_cpu_s"] = time.process_time() - c0
    mp = cols.position[cols.is_metal]
    metals = np.column_stack([atoms3d.lift_columns(mp, np.zeros(len(mp)), rot[ref], shift[ref], px), np.zeros(len(mp))])
    c0, t0 = time.process_time(), time.perf_counter()
    m = atoms3d.build_model(ts.sums.astype(float), geo, metals, cols.position[~cols.is_metal], ref,
                            sc.haadf.probe_fwhm_A / at.FWHM_PER_SIGMA / px)
    out["atoms_cpu_s"], out["atoms_wall_s"] = time.process_time() - c0, time.perf_counter() - t0
    out["atoms_steps_cpu_s"] = m.timings_s
    out["atoms"] = len(m)
    out["sigma_px"], out["element_height"] = m.sigma_px, m.element_height
    out.update(compare_model(ts, sc, m.positions_A, m.species, m.vacancy_sites_A))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--extent-nm", type=float, default=16.0)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--windowed-only", action="store_true", help="true geometry instead of running the chain")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--atoms-only", action="store_true", help="the 3D atom step alone at the true geometry")
    ap.add_argument("--scan-distortion", action="store_true",
                    help="with --atoms-only: the geometry includes the scan distortion of the drift during a frame")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} (shared machine)")
    sc = load_scenario("default").replace(sample={"extent_x_nm": args.extent_nm, "extent_y_nm": args.extent_nm},
                                          stage={"settle_time_s": 0.0})
    t0 = time.perf_counter()
    ts = simulate_tilt_sums(sc, shape=(args.size, args.size))
    out: dict = {"simulate_s": time.perf_counter() - t0, "size": args.size, "load_start": os.getloadavg()[0]}
    if args.atoms_only:
        with threadpool_limits(limits=1, user_api="blas"):
            out.update(atoms_only(ts, sc, args.scan_distortion))
        out["load_end"] = os.getloadavg()[0]
        print(json.dumps(out, indent=1))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1)
        return
    px_A = 10 * ts.pixel_size_nm
    ny, nx = ts.sums.shape[1:]
    if args.windowed_only:
        rotations = rc.stage_rotation(ts.actual_deg[:, 0], ts.actual_deg[:, 1])
        shift_px = np.array([(ny - 1) / 2, (nx - 1) / 2]) + ts.centre_offset_px
        out["geometry"] = "true (simulator)"
    else:
        t0 = time.perf_counter()
        with threadpool_limits(limits=1, user_api="blas"):
            res = at.reconstruct_atoms(ts.sums, ts.nominal_deg[:, 0], ts.nominal_deg[:, 1], 10 * ts.pixel_size_nm)
        out["chain_s"] = time.perf_counter() - t0
        out["steps_s"] = res.timings_s
        if res.model is not None:
            out["atoms_steps_cpu_s"] = res.model.timings_s
            out["sigma_px"], out["element_height"] = res.model.sigma_px, res.model.element_height
        cal = res.calibration
        err = np.column_stack([cal.alpha_deg, cal.beta_deg]) - ts.actual_deg
        out["angle_error_max_deg"] = float(np.abs(err).max())
        out["angle_error_rms_deg"] = float(np.sqrt(np.mean(err**2)))
        out["nominal_error_max_deg"] = float(np.abs(ts.nominal_deg - ts.actual_deg).max())
        out["angle_se_median_deg"] = float(np.median(np.r_[cal.alpha_err_deg, cal.beta_err_deg]))
        assert res.model is not None
        out.update(compare_model(ts, sc, res.model.positions_A, res.model.species, res.model.vacancy_sites_A))
        out["r1"] = res.model.r1
        print(json.dumps(out, indent=1))
        rotations, shift_px = cal.rotations, cal.shift_px
        out["geometry"] = "calibrated"
    # windowed SIRT, binned 2x2
    n = len(ts.sums)
    b = 2
    s = ts.sums[:, : ny // b * b, : nx // b * b].reshape(n, ny // b, b, nx // b, b).mean(axis=(2, 4))
    sirt = {"window": 60, "step": 30, "nz": 16, "n_iter": args.iterations, "support_z": 12}
    shifts = (shift_px - (b - 1) / 2) / b
    out["windows"] = len(rc.window_origins(s.shape[1], 60, 30)) * len(rc.window_origins(s.shape[2], 60, 30))
    t0, c0 = time.perf_counter(), time.process_time()
    vol_cal = wd.reconstruct_at_calibration(s, rotations, shifts, workers=2, **sirt)
    out["windowed_inprocess_s"] = time.perf_counter() - t0
    out["windowed_inprocess_cpu_s"] = time.process_time() - c0
    if not args.no_dask:
        from dask.distributed import Client

        from stemlive.live.pipeline.batch import local_cluster

        def cpu() -> float:
            import resource

            ru = resource.getrusage(resource.RUSAGE_SELF)
            return ru.ru_utime + ru.ru_stime

        with local_cluster(2) as cluster, Client(cluster) as client:
            w0 = sum(client.run(cpu).values())
            t0, c0 = time.perf_counter(), time.process_time()
            vol_dask = wd.reconstruct_at_calibration(s, rotations, shifts, client=client, workers=1, **sirt)
            out["windowed_dask2_s"] = time.perf_counter() - t0
            out["windowed_dask2_cpu_s"] = time.process_time() - c0 + sum(client.run(cpu).values()) - w0
            out["dask_equals_inprocess"] = bool(np.allclose(vol_dask, vol_cal, atol=1e-4 * float(vol_cal.max())))
    al, be = ts.nominal_deg[:, 0], ts.nominal_deg[:, 1]
    aligned, _ = rc.align_tilt_series(s, "cross_correlation", rc.projection_direction(al, be))
    centre = np.tile([s.shape[1] // 2, s.shape[2] // 2], (n, 1)).astype(float)
    vol_nom = wd.reconstruct_at_calibration(aligned, rc.stage_rotation(al, be), centre, **sirt)
    weight = (ts.atoms.Z / 42.0) ** 1.7
    sigma_A = sc.haadf.probe_fwhm_A / 2.3548
    m = s.shape[1] // 8
    out["windowed_r_calibrated"] = wd.potential_correlation(vol_cal, ts.atoms.positions_A, weight, px_A * b, sigma_A,
                                                            margin=m)[0]
    out["windowed_r_nominal"] = wd.potential_correlation(vol_nom, ts.atoms.positions_A, weight, px_A * b, sigma_A,
                                                         margin=m)[0]
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("windowed", "dask", "load", "geometry"))},
                     indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
