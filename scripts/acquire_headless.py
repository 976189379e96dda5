"""Headless acquisition through Swift's hardware-source API on the stemlive simulated instrument (fast mode).

1. Tilt series: 12 reference nominal (alpha, beta) tilts x ``--frames`` HAADF frames of ``--size``^2 pixels at
   4 us; the stage is moved with ``set_control_output(StageOutA/B, radians, {"confirm": True})``.
2. EELS line scan: ``--points`` probe positions 1.6 nm apart across the interface (x = 0) x ``--eels-frames``
   spectra of 300 ms (simulated) each at the parked probe, through Swift's acquisition data streams
   (``camera_base.make_sequence_data_stream`` with ``sum_project``, as the procedures take them).

Prints timings (wall and simulated). Saves nothing unless ``--out FILE.npz`` is given.

Example::

    .venv/bin/python scripts/acquire_headless.py --frames 2 --points 4 --eels-frames 10 --size 128
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

#: Nominal (alpha, beta) stage tilts in degrees of the reference tilt series (reference/tilt_series_mos2_wse2.json).
REFERENCE_TILTS_DEG: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (-14.3, -22.9), (-14.3, 17.1), (20.1, 17.1), (20.1, -20.1), (12.6, -12.6),
    (12.6, 12.6), (-12.6, 12.6), (-12.6, -12.6), (-6.3, -6.3), (-6.3, 6.3), (6.3, 6.3),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10, help="HAADF frames per tilt (default 10)")
    p.add_argument("--tilts", type=int, default=len(REFERENCE_TILTS_DEG), help="number of reference tilts (<= 12)")
    p.add_argument("--size", type=int, default=512, help="scan size in pixels (default 512)")
    p.add_argument("--dwell-us", type=float, default=4.0, help="pixel dwell time (default 4 us)")
    p.add_argument("--points", type=int, default=40, help="EELS probe positions (default 40)")
    p.add_argument("--step-nm", type=float, default=1.6, help="EELS probe step (default 1.6 nm)")
    p.add_argument("--eels-frames", type=int, default=200, help="spectra per probe position (default 200)")
    p.add_argument("--exposure-ms", type=float, default=300.0, help="EELS exposure (default 300 ms, simulated)")
    p.add_argument("--eels-rows", type=int, default=2, help="EELS sensor rows (default 2: cheap sequences)")
    p.add_argument("--scenario", default="default", help="scenario of the tilt series (default 'default')")
    p.add_argument("--eels-scenario", default="eels_mos2_wse2", help="scenario of the line scan")
    p.add_argument("--time-scale", type=float, default=0.0, help="0 = as fast as possible (default), 1 = real time")
    p.add_argument("--skip-tilt", action="store_true", help="skip the tilt series")
    p.add_argument("--skip-eels", action="store_true", help="skip the EELS line scan")
    p.add_argument("--out", default=None, help="save the data to this .npz file")
    return p.parse_args(argv)


def tilt_series(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Acquire the tilt series through the scan hardware source."""
    from nion.utils import Geometry

    from stemlive.simulators import devices

    config = devices.SimulatedInstrumentConfiguration(args.scenario, time_scale=args.time_scale)
    with devices.run_headless(config) as hw:
        instrument, scan, clock = hw.instrument, hw.scan, hw.configuration.clock
        params = scan.get_current_frame_parameters()
        params.size = Geometry.IntSize(args.size, args.size)
        params.pixel_time_us = args.dwell_us
        frames: list[np.ndarray] = []
        angles: list[tuple[float, float, float, float]] = []
        wall0, sim0 = time.perf_counter(), clock.now()
        for index, (alpha, beta) in enumerate(REFERENCE_TILTS_DEG[: args.tilts]):
            t_move = time.perf_counter()
            instrument.set_control_output("StageOutA", math.radians(alpha), {"confirm": True})
            instrument.set_control_output("StageOutB", math.radians(beta), {"confirm": True})
            move_s = time.perf_counter() - t_move
            actual = instrument.actual_tilt_deg()
            t_frames = time.perf_counter()
            for _ in range(args.frames):
                xdatas = scan.record_immediate(params)
                frames.append(np.asarray(xdatas[0].data, np.float32))
                angles.append((alpha, beta, actual[0], actual[1]))
            print(f"tilt {index + 1:2d} nominal ({alpha:6.1f}, {beta:6.1f}) actual ({actual[0]:6.2f}, "
                  f"{actual[1]:6.2f}) deg: move {move_s:5.2f} s, {args.frames} frames "
                  f"{time.perf_counter() - t_frames:6.2f} s wall")
        wall, sim = time.perf_counter() - wall0, clock.now() - sim0
        print(f"tilt series: {len(frames)} frames of {args.size}x{args.size} in {wall:.1f} s wall, "
              f"{sim:.1f} s simulated ({sim / max(wall, 1e-9):.1f}x real time)")
        results["tilt_frames"] = np.stack(frames) if frames else np.zeros((0, args.size, args.size), np.float32)
        results["tilt_angles_deg"] = np.asarray(angles)
        results["tilt_wall_s"], results["tilt_sim_s"] = wall, sim


def eels_line_scan(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Acquire the EELS line scan through the EELS camera hardware source at parked probe positions."""
    from nion.utils import Geometry

    from stemlive.simulators import devices

    config = devices.SimulatedInstrumentConfiguration(args.eels_scenario, time_scale=args.time_scale,
                                                      eels_sensor_height=args.eels_rows)
    with devices.run_headless(config) as hw:
        instrument, scan, eels, clock = hw.instrument, hw.scan, hw.eels, hw.configuration.clock
        # survey image: sets the scan context the probe positions refer to
        length_nm = (args.points - 1) * args.step_nm
        survey = scan.get_current_frame_parameters()
        survey.size = Geometry.IntSize(128, 128)
        survey.pixel_time_us = 1.0
        survey.fov_nm = max(1.25 * length_nm, 16.0)
        t0 = time.perf_counter()
        scan.record_immediate(survey)
        print(f"survey {survey.fov_nm:.1f} nm: {time.perf_counter() - t0:.2f} s wall")
        fov = float(instrument.scan_context.fov_nm or survey.fov_nm)
        from nionswift_plugin.stemlive.eels_scan import acquire_spectra

        camera = eels.get_current_frame_parameters()
        camera.binning = 1
        eels.set_current_frame_parameters(camera)
        xs = (np.arange(args.points) - (args.points - 1) / 2) * args.step_nm
        spectra = []
        positions = []
        wall0, sim0 = time.perf_counter(), clock.now()
        for index, x_nm in enumerate(xs):
            instrument.probe_position = Geometry.FloatPoint(y=0.5, x=0.5 + x_nm / fov)
            assert instrument.probe_state == "parked"
            positions.append(instrument.probe_position_nm(instrument.probe_position))
            xdata = acquire_spectra(eels, args.exposure_ms, args.eels_frames)  # sum_project data stream
            spectra.append(np.asarray(xdata.data, np.float32).reshape(args.eels_frames, -1))
            if index % 10 == 0 or index == len(xs) - 1:
                print(f"point {index + 1:2d}/{len(xs)} x = {x_nm:6.1f} nm: {args.eels_frames} spectra, "
                      f"{time.perf_counter() - wall0:6.1f} s wall so far")
        wall, sim = time.perf_counter() - wall0, clock.now() - sim0
        n = len(xs) * args.eels_frames
        print(f"EELS line scan: {n} spectra x {spectra[0].shape[-1]} channels in {wall:.1f} s wall, "
              f"{sim:.1f} s simulated ({sim / max(wall, 1e-9):.1f}x real time)")
        results["eels_spectra"] = np.stack(spectra)
        results["eels_positions_nm"] = np.asarray(positions)
        results["eels_wall_s"], results["eels_sim_s"] = wall, sim


def main(argv: list[str] | None = None) -> int:
    """Run the acquisitions; return the exit status."""
    args = parse_args(argv)
    from nion.swift.test import TestContext

    TestContext.TestSetup()  # headless application with a test UI
    results: dict[str, Any] = {}
    wall0 = time.perf_counter()
    if not args.skip_tilt:
        tilt_series(args, results)
    if not args.skip_eels:
        eels_line_scan(args, results)
    print(f"total {time.perf_counter() - wall0:.1f} s wall")
    if args.out:
        np.savez_compressed(args.out, **{k: np.asarray(v) for k, v in results.items()})
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
