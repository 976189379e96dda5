"""``stemlive demo``: the main job end to end on the simulated instrument, headless and in fast mode.

1. A :class:`~stemlive.live.pipeline.service.PipelineService` starts in this process on free loopback ports.
2. The *same* acquisition procedures the Swift panels run (:class:`TiltSeriesProcedure`,
   :class:`EELSScanProcedure`) drive the simulated instrument (``time_scale=0``) through Swift's hardware-source
   API and stream every frame to the service, which records and analyses it:

   * a tilt series at the 12 reference nominal tilts (scenario ``default``: MoS2-WSe2, 17 pA, 4 us);
   * an EELS line scan across the MoS2-WSe2 interface (scenario ``eels_mos2_wse2``: 300 K, three regions,
     segmentation and peak fits, as in the reference line scan);
   * a thermometry line scan across the AlN-SiC interface (scenario ``eels_aln_sic``: a temperature gradient and
     a 15 K interface drop, 1200 ms frames; the phonon window above 55 meV that thermometry needs exists in
     AlN/SiC, not in MoS2/WSe2 whose modes all lie below 50 meV).
3. The simulator's ground truth is written next to each session (``<session>.truth.json``).
4. The tilt series is exported for tomography and reconstructed (SIRT), and the reconstruction is compared with
   the true atoms; at atomic-resolution pixels (``--full``) ``stemlive tomo atoms`` calibrates the tilt angles
   (compared with the simulator's actual ones) and builds the 3D atomic model with its figures.
5. :func:`stemlive.live.apps.report.write_report` writes ``report.html``, ``report.json`` and ``figures/*.png``.

Heavy imports (Swift, the simulator, matplotlib) happen inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

TILT_SCENARIO = "default"
LINE_SCENARIO = "eels_mos2_wse2"
THERMO_SCENARIO = "eels_aln_sic"



def line_scan_analysis(thermometry: bool) -> dict[str, dict[str, Any]]:
    """Per-session analysis settings of a demo line scan (sent in its session_start, over the service's own).

    The peak fits of the MoS2-WSe2 line start from the published centres (close pairs are separated only from a
    good start). Thermometry keeps the default resolution-corrected log-ratio fit, whose error bars are honest.
    """
    from stemlive.live.apps.report_eels import reference_centres_meV

    return {} if thermometry else {"eels": {"peak_initial_meV": reference_centres_meV()}}


@dataclass
class DemoConfig:
    """Sizes of the demo acquisitions (defaults: about 5 minutes on 2 cores)."""

    tilts: int = 12
    frames: int = 6
    size: int = 256
    dwell_us: float = 4.0
    pixel_nm: float = 0.064  # field of view = size x pixel (the reference: 512 x 0.032 nm)
    points: int = 40
    step_nm: float = 1.6
    eels_frames: int = 50
    exposure_ms: float = 300.0
    thermo_points: int = 40
    thermo_step_nm: float = 0.5
    thermo_frames: int = 50
    thermo_exposure_ms: float = 1200.0
    seed: int | None = None
    tomo: bool = True
    tomo_iterations: int = 20
    tomo_bin: int = 2
    tomo_thickness_px: int = 32
    overrides: list[str] = field(default_factory=list)
    timeout_s: float = 600.0


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {"tilts": 12, "frames": 4, "size": 128, "points": 24, "eels_frames": 30, "thermo_points": 30,
              "thermo_step_nm": 0.6, "thermo_frames": 30, "tomo_iterations": 10, "tomo_bin": 1,
              "tomo_thickness_px": 24},
    "full": {"frames": 10, "size": 512, "pixel_nm": 0.032, "points": 40, "eels_frames": 200, "thermo_points": 40,
             "thermo_frames": 200, "tomo_iterations": 30, "tomo_bin": 4},
}


def make_config(preset: str = "default", **overrides: Any) -> DemoConfig:
    """A :class:`DemoConfig` from a preset (``default``, ``small``, ``full``) and explicit overrides (None: keep)."""
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return DemoConfig(**values)


# ------------------------------------------------------------------------------------------------ console
class ConsoleBar:
    """A one-line carriage-return progress bar (no dependencies); inert when ``stream`` is None.

    Only a terminal gets the redrawn bar: on a redirected stream (a log file, a pipe) there are no carriage
    returns, just one line per finished step from :meth:`done`.
    """

    def __init__(self, label: str, stream: TextIO | None = sys.stderr, width: int = 30) -> None:
        from stemlive.live.apps.console import is_terminal

        self.label = label
        self.stream = stream
        self.width = width
        self.live = stream is not None and is_terminal(stream)
        self._last = ""

    def update(self, fraction: float, text: str = "") -> None:
        """Redraw the bar at ``fraction`` (0..1) with ``text`` after it."""
        if self.stream is None or not self.live:
            return
        f = min(max(float(fraction), 0.0), 1.0)
        n = int(round(f * self.width))
        line = f"\r{self.label:<14} [{'#' * n}{'.' * (self.width - n)}] {100 * f:5.1f}% {text}"
        pad = max(len(self._last) - len(line), 0)
        self.stream.write(line + " " * pad)
        self.stream.flush()
        self._last = line

    def done(self, text: str = "") -> None:
        """Draw the full bar and end the line (not on a terminal: one plain line)."""
        if self.stream is None:
            return
        if self.live:
            self.update(1.0, text)
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {text}\n")
        self.stream.flush()

    def progress_callback(self, step_name: str) -> Callable[[Any], None]:
        """A procedure ``on_progress`` callback drawing :class:`~nionswift_plugin.stemlive.acquisition.Progress`."""

        def on_progress(p: Any) -> None:
            if p.phase in ("complete", "aborted", "failed"):
                return
            text = f"{step_name} {p.step}/{p.steps}, frame {p.frame}/{p.frames}"
            self.update(p.fraction, text)

        return on_progress


def free_endpoint() -> str:
    """A loopback TCP endpoint on a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------------------------------------ acquisitions
def _scenario(name: str, seed: int | None) -> Any:
    from stemlive.simulators.scenario import load_scenario

    scenario = load_scenario(name)
    return scenario if seed is None else scenario.replace(seed=int(seed))


def _line_fractions(
    x_nm: Sequence[float] | np.ndarray, fov_nm: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Survey fractions (y, x) of a horizontal line from ``x_nm[0]`` to ``x_nm[-1]`` (scan centred on x = 0)."""
    return (0.5, 0.5 + x_nm[0] / fov_nm), (0.5, 0.5 + x_nm[-1] / fov_nm)


def acquire_tilt_series(cfg: DemoConfig, sender: Any, stream: TextIO | None) -> tuple[Any, str]:
    """Run the tilt-series procedure on the simulated instrument; returns (ground truth, session id)."""
    from nionswift_plugin.stemlive.tilt_series import REFERENCE_TILTS_DEG, TiltSeriesPlan, TiltSeriesProcedure
    from stemlive.simulators import devices

    tilts = list(REFERENCE_TILTS_DEG[: max(1, min(cfg.tilts, len(REFERENCE_TILTS_DEG)))])
    plan = TiltSeriesPlan(tilts_deg=tilts, frames_per_tilt=cfg.frames, size_px=cfg.size, dwell_us=cfg.dwell_us,
                          fov_nm=cfg.size * cfg.pixel_nm, settle_s=0.0)
    # The procedure's settle wait is wall-clock time (time.sleep), which fast mode skips (settle_s=0); a stage that
    # settles in simulated time would still be moving during the first frames of every tilt, so the demo's stage
    # settles at once (hysteresis and the random angle error stay).
    scenario = _scenario(TILT_SCENARIO, cfg.seed).replace(stage={"settle_time_s": 0.0})
    config = devices.SimulatedInstrumentConfiguration(scenario, time_scale=0.0, ronchigram=False)
    bar = ConsoleBar("tilt series", stream)
    with devices.run_headless(config) as hw:
        truth = hw.instrument.ground_truth
        draw = bar.progress_callback("tilt")
        row = [0]

        def on_progress(p: Any) -> None:
            if p.phase == "acquiring":  # the frame just streamed is the latest frame the simulator rendered
                truth.add("session_frame", row=row[0], frame_record=len(truth.get("frame")) - 1,
                          tilt_step=p.step, frame_index=p.frame - 1)
                row[0] += 1
            draw(p)

        procedure = TiltSeriesProcedure(plan, stem_controller=hw.instrument, scan_source=hw.scan, sender=sender,
                                        on_progress=on_progress)
        status = procedure.run()
    bar.done(status)
    if status != "complete":
        raise RuntimeError(f"tilt series ended {status}")
    return truth, procedure.session_id


def acquire_line_scan(cfg: DemoConfig, sender: Any, stream: TextIO | None, *, thermometry: bool) -> tuple[Any, str]:
    """Run the EELS line-scan procedure across the scenario's interface; returns (ground truth, session id)."""
    import numpy as np

    from nionswift_plugin.stemlive.eels_scan import EELSScanPlan, EELSScanProcedure
    from stemlive.simulators import devices

    name = THERMO_SCENARIO if thermometry else LINE_SCENARIO
    scenario = _scenario(name, cfg.seed)
    points = cfg.thermo_points if thermometry else cfg.points
    step = cfg.thermo_step_nm if thermometry else cfg.step_nm
    frames = cfg.thermo_frames if thermometry else cfg.eels_frames
    exposure = cfg.thermo_exposure_ms if thermometry else cfg.exposure_ms
    config = devices.SimulatedInstrumentConfiguration(scenario, time_scale=0.0, ronchigram=False,
                                                      eels_sensor_height=2)
    bar = ConsoleBar("thermometry" if thermometry else "EELS line", stream)
    with devices.run_headless(config) as hw:
        model = hw.instrument.physics.eels.model
        x0 = float(model.interface_x_nm)
        x_nm = x0 + (np.arange(points) - (points - 1) / 2.0) * step
        fov = 2.4 * float(np.max(np.abs(x_nm))) + 8.0
        start, end = _line_fractions(x_nm, fov)
        plan = EELSScanPlan(start=start, end=end, points=points, step_nm=None, frames_per_point=frames,
                            analysis=line_scan_analysis(thermometry),
                            exposure_ms=exposure, batch=min(50, frames), survey_size_px=256, survey_fov_nm=fov,
                            survey_dwell_us=1.0,
                            saturation_counts=float(hw.instrument.physics.eels.config["saturation_counts"]))
        _set_scan_context(hw.scan, fov, plan.survey_size_px)
        truth = hw.instrument.ground_truth
        _record_eels_model(truth, hw.instrument.physics.eels)
        procedure = EELSScanProcedure(plan, stem_controller=hw.instrument, scan_source=hw.scan,
                                      camera_source=hw.eels, sender=sender,
                                      on_progress=bar.progress_callback("point"))
        status = procedure.run()
    bar.done(status)
    if status != "complete":
        raise RuntimeError(f"EELS line scan ended {status}")
    return truth, str(procedure.stream.session_id)


def _set_scan_context(scan: Any, fov_nm: float, size_px: int) -> None:
    """Make the survey's field of view the scan context that probe positions refer to.

    Works around ``EELSScanProcedure._survey`` recording with ``record_immediate`` only, which leaves the scan
    context (used to turn survey fractions into nm, by the procedure and by the instrument) at the previous FOV.
    """
    fp = scan.get_current_frame_parameters()
    fp.fov_nm = float(fov_nm)
    fp.pixel_size = (int(size_px), int(size_px))
    scan.set_current_frame_parameters(fp)


def _record_eels_model(truth: Any, simulator: Any) -> None:
    """Add the EELS model's true interface and phonon peaks to the ground truth (kind ``eels_model``)."""
    m = simulator.model
    regions = ["left", "interface", "right"]
    truth.add("eels_model", system=m.system, interface_x_nm=m.interface_x_nm,
              interface_width_nm=m.interface_width_nm, drop_K=m.drop_K, T_left_K=m.T_left_K, T_right_K=m.T_right_K,
              gradient_left_K_per_nm=m.gradient_left_K_per_nm, gradient_right_K_per_nm=m.gradient_right_K_per_nm,
              drop_width_nm=m.drop_width_nm,
              peaks_meV={r: [p[0] for p in peaks] for r, peaks in zip(regions, simulator.peaks, strict=True)})


# ------------------------------------------------------------------------------------------------ tomography
def run_tomography(session: Path, out_dir: Path, cfg: DemoConfig, stream: TextIO | None) -> dict[str, Any]:
    """Export the tilt series (EMD + GENFIRE), reconstruct it (SIRT) and compare with the true atoms.

    The exported, aligned projections are binned by ``cfg.tomo_bin`` into a second EMD that is reconstructed with a
    ``cfg.tomo_thickness_px`` support along the beam (a monolayer), which keeps the demo's SIRT within a minute.
    """
    from stemlive.live.apps import tomo

    t0 = time.perf_counter()
    tomo_dir = out_dir / "tomo"
    paths = tomo.export(session, tomo_dir, align="cross_correlation")
    source = _binned_emd(paths["emd"], cfg.tomo_bin) if cfg.tomo_bin > 1 else paths["emd"]
    bar = ConsoleBar("reconstruction", stream)

    def progress(i: int, n: int, err: float) -> None:
        bar.update(i / n, f"SIRT iteration {i}/{n}, residual {err:.3f}")

    rec = tomo.reconstruct(source, tomo_dir, n_iter=cfg.tomo_iterations, thickness_px=cfg.tomo_thickness_px,
                           png=True, progress=progress)
    volume, pixel_nm = tomo.read_emd_volume(rec["volume"])
    truth = _true_volume(volume.shape, pixel_nm, cfg.seed)
    _, ny, nx = volume.shape
    crop = (slice(None), slice(ny // 8, ny - ny // 8), slice(nx // 8, nx - nx // 8))  # SIRT edge artefacts
    corr = volume_correlation(volume[crop], truth[crop])
    bar.done(f"Pearson r vs true atoms {corr:.3f}")
    out: dict[str, Any] = {key: str(p) for key, p in {**paths, **rec}.items()}
    out.update({"correlation": corr, "n_iter": cfg.tomo_iterations, "bin": cfg.tomo_bin, "pixel_nm": pixel_nm,
                "shape_zyx": list(volume.shape), "seconds": time.perf_counter() - t0, "angles": "nominal"})
    out.update(run_atoms_step(session, tomo_dir, cfg))
    return out


def run_atoms_step(session: Path, tomo_dir: Path, cfg: DemoConfig) -> dict[str, Any]:
    """``stemlive tomo atoms`` on the demo's tilt series: calibrated angles vs the simulator's actual ones, the 3D
    model and its figures (``atoms_*`` keys). Needs atomic-resolution pixels (<= 0.04 nm: ``--full``)."""
    import numpy as np

    from stemlive.live.apps import atoms, tomo
    from stemlive.simulators.truth import truth_path_for

    if cfg.pixel_nm > 0.04:
        return {"atoms": f"skipped: pixel {cfg.pixel_nm} nm is too coarse for column fits (<= 0.04 nm: --full)"}
    t0 = time.perf_counter()
    res = atoms.run_atoms(session, tomo_dir / "model.xyz", store=True)
    cal, nominal = res["calibration"], np.column_stack(res["nominal"])
    out: dict[str, Any] = {"atoms_xyz": str(res["paths"]["xyz"]), "atoms_n": res["summary"]["n_atoms"],
                           "atoms_vacancies": res["summary"]["vacancies"], "atoms_r1": res["summary"]["r1"],
                           "atoms_structure_png": str(res["paths"]["structure"]),
                           "atoms_strain_png": str(res["paths"]["strain"]), "atoms_seconds": time.perf_counter() - t0}
    truth = truth_path_for(session)
    if truth.exists():
        actual = np.column_stack(tomo.load_angles(truth, len(nominal), nominal))
        out["atoms_angle_error_max_deg"] = float(np.abs(np.column_stack([cal.alpha_deg, cal.beta_deg]) - actual).max())
        out["atoms_nominal_error_max_deg"] = float(np.abs(nominal - actual).max())
    return out


def _binned_emd(emd: Path, factor: int) -> Path:
    """Write ``<stem>_bin<factor>.emd``: the exported projections binned ``factor`` x ``factor``."""
    import numpy as np

    from stemlive.live.apps import tomo

    g = tomo.read_emd_layout(emd)
    data, alpha, beta, shifts = g["projections"], g["alpha_deg"], g["beta_deg"], g["shifts_px"]
    pixel, session_id = g["pixel_size_nm"], g["session_id"]
    n, ny, nx = data.shape
    ny, nx = ny // factor * factor, nx // factor * factor
    binned = data[:, :ny, :nx].reshape(n, ny // factor, factor, nx // factor, factor).mean(axis=(2, 4))
    series = tomo.TiltSeries(binned, np.asarray(alpha), np.asarray(beta), pixel * factor, session_id, "nominal")
    out = emd.with_name(emd.stem.replace("_tilt_series", "") + f"_bin{factor}_tilt_series.emd")
    return tomo.write_emd(out, series, binned, np.asarray(shifts) / factor, align="cross_correlation")


def _true_volume(shape_zyx: tuple[int, ...], voxel_nm: float, seed: int | None) -> Any:
    """The tilt-series scenario's atoms splatted (weight Z^1.7) on the reconstruction grid, probe-blurred."""
    import numpy as np
    from scipy import ndimage

    scenario = _scenario(TILT_SCENARIO, seed)
    atoms = scenario.sample.atoms()
    pos_vox = atoms.positions_A / (10.0 * voxel_nm)  # (x, y, z) in voxels from the sample origin
    nz, ny, nx = shape_zyx
    idx = np.rint(pos_vox[:, [2, 1, 0]] + np.array([nz // 2, ny // 2, nx // 2])).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array([nz, ny, nx])), axis=1)
    vol = np.zeros(shape_zyx, np.float32)
    weight = (atoms.Z / scenario.haadf.reference_Z) ** scenario.haadf.z_exponent
    np.add.at(vol, tuple(idx[inside].T), weight[inside])
    sigma = scenario.haadf.probe_fwhm_A / 2.3548 / (10.0 * voxel_nm)
    return ndimage.gaussian_filter(vol, max(sigma, 0.5))


def volume_correlation(volume: Any, truth: Any) -> float:
    """Pearson r of two volumes at the integer translation that maximises their cross-correlation."""
    import numpy as np

    a = np.asarray(volume, np.float64)
    b = np.asarray(truth, np.float64)
    a, b = a - a.mean(), b - b.mean()
    axes = tuple(range(a.ndim))
    xc = np.fft.irfftn(np.fft.rfftn(a) * np.conj(np.fft.rfftn(b)), a.shape, axes=axes)
    shift = np.unravel_index(int(np.argmax(xc)), a.shape)
    b = np.roll(b, shift, axis=tuple(range(b.ndim)))
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ------------------------------------------------------------------------------------------------ the demo
def run_demo(out_dir: str | Path, cfg: DemoConfig, *, stream: TextIO | None = sys.stderr,
             report: bool = True) -> dict[str, Any]:
    """Acquire, record, analyse, reconstruct and report; returns sessions, tomography, timings and report path.

    Parameters
    ----------
    out_dir
        Output folder (sessions under ``sessions/``, tomography under ``tomo/``, the report at the top).
    cfg
        Acquisition sizes and options.
    stream
        Where the progress bars go (None: silent).
    report
        Write the report.
    """
    from stemlive.live.pipeline.registry import make_params
    from stemlive.live.pipeline.service import PipelineService
    from stemlive.live.wire.transport import FrameSender

    out = Path(out_dir)
    session_dir = out / "sessions"
    params = make_params(None, cfg.overrides)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    from nion.swift.test import TestContext

    TestContext.TestSetup()  # headless Swift application: what the instrumentation layer needs
    frames_ep, results_ep = free_endpoint(), free_endpoint()
    sessions: dict[str, Path] = {}
    steps: list[tuple[str, Callable[[Any], tuple[Any, str]]]] = [
        ("tilt_series", lambda s: acquire_tilt_series(cfg, s, stream)),
        ("eels_line_scan", lambda s: acquire_line_scan(cfg, s, stream, thermometry=False)),
        ("eels_thermometry", lambda s: acquire_line_scan(cfg, s, stream, thermometry=True)),
    ]
    with PipelineService(session_dir, params, frame_endpoint=frames_ep, result_endpoint=results_ep) as service, \
            FrameSender(frames_ep, timeout_s=120.0) as sender:
        for n, (key, acquire) in enumerate(steps, start=1):
            t0 = time.perf_counter()
            truth, _session_id = acquire(sender)
            path = service.wait_for_sessions(n, timeout_s=cfg.timeout_s)[n - 1]
            truth.write_next_to(path)
            sessions[key] = path
            timings[f"{key}_s"] = time.perf_counter() - t0
    tomo_info: dict[str, Any] | None = None
    if cfg.tomo:
        t0 = time.perf_counter()
        tomo_info = run_tomography(sessions["tilt_series"], out, cfg, stream)
        timings["tomography_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {"sessions": sessions, "tomo": tomo_info, "timings": timings}
    if report:
        from stemlive.live.apps.report import write_report

        t0 = time.perf_counter()
        timings["total_s"] = time.perf_counter() - t_start  # up to the report (the page shows this one)
        result["report"] = write_report(out, sessions, tomo_info, timings=timings, config=dataclasses.asdict(cfg))
        timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return result


def make_demo_sessions(out_dir: str | Path, small: bool = True) -> dict[str, Path]:
    """Acquire the demo sessions (no tomography, no report) silently; returns ``{kind: session path}``.

    For scripts (e.g. ``scripts/screenshots.py``) that need realistic recorded sessions with ground truth.
    """
    cfg = make_config("small" if small else "default", tomo=False)
    return dict(run_demo(out_dir, cfg, stream=None, report=False)["sessions"])


# ------------------------------------------------------------------------------------------------ command line
def add_subcommand(subparsers: Any) -> None:
    """Register ``stemlive demo``."""
    p = subparsers.add_parser("demo", help="end-to-end demo on the simulated instrument: acquire, analyse, report")
    p.add_argument("--out", type=Path, default=Path("stemlive-demo"), help="output folder (default ./stemlive-demo)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="reference-sized acquisitions (12 x 10 x 512^2; 40 x 200)")
    size.add_argument("--small", action="store_true", help="tiny acquisitions for tests (about a minute)")
    p.add_argument("--tilts", type=int, help="number of reference tilts (1-12)")
    p.add_argument("--frames", type=int, help="frames per tilt")
    p.add_argument("--size", type=int, help="frame size in pixels")
    p.add_argument("--points", type=int, help="probe positions of each EELS line")
    p.add_argument("--eels-frames", type=int, help="spectra per probe position of each EELS line")
    p.add_argument("--seed", type=int, help="simulator seed (default: the scenarios' own)")
    p.add_argument("--no-tomo", action="store_true", help="skip the tomography export and reconstruction")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="analysis parameter for the service, e.g. --set eels.k=3 (repeatable)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``stemlive demo``."""
    if getattr(args, "verbose", 0) == 0:
        # keep the progress bars readable: warnings only (Nion's Application later resets the root logger to
        # INFO and adds its own handler, so a level set here would not last)
        logging.disable(logging.INFO)
    check_demo_args(args)
    preset = "full" if args.full else "small" if args.small else "default"
    cfg = make_config(preset, tilts=args.tilts, frames=args.frames, size=args.size, points=args.points,
                      eels_frames=args.eels_frames, seed=args.seed, overrides=list(args.overrides))
    if args.points is not None:
        cfg.thermo_points = args.points
    if args.eels_frames is not None:
        cfg.thermo_frames = args.eels_frames
    cfg.tomo = not args.no_tomo
    print(f"stemlive demo ({preset}): {cfg.tilts} tilts x {cfg.frames} frames of {cfg.size}^2 px; "
          f"EELS {cfg.points} x {cfg.eels_frames} spectra; thermometry {cfg.thermo_points} x {cfg.thermo_frames}; "
          f"output in {args.out.resolve()}", flush=True)
    from stemlive.live.apps.console import is_quiet

    try:
        result = run_demo(args.out, cfg, stream=None if is_quiet(args) else sys.stderr)
    finally:
        logging.disable(logging.NOTSET)
    summary = json.loads(Path(result["report"]).with_name("report.json").read_text()) if "report" in result else {}
    for line in summary_lines(summary):
        print(line)
    print(f"report: {result.get('report')}  ({result['timings']['total_s']:.0f} s)")
    return 0


#: ``stemlive demo`` options and the values the demo can run: (option, lowest, highest or None)
LIMITS: tuple[tuple[str, int, int | None], ...] = (
    ("tilts", 1, 12), ("frames", 1, None), ("size", 16, 4096), ("points", 2, None), ("eels_frames", 1, None),
)


def check_demo_args(args: argparse.Namespace) -> None:
    """Refuse options outside what the demo can do (ExitCode.USAGE), e.g. ``--tilts 99`` with 12 reference tilts."""
    from nionswift_plugin.stemlive.tilt_series import REFERENCE_TILTS_DEG
    from stemlive.live.exitcodes import CLIError, ExitCode

    for name, low, high in LIMITS:
        value = getattr(args, name, None)
        high = len(REFERENCE_TILTS_DEG) if name == "tilts" else high
        if value is not None and (value < low or (high is not None and value > high)):
            what = f"in {low}..{high}" if high is not None else f">= {low}"
            note = f" (the reference tilt series has {high} tilts)" if name == "tilts" else ""
            raise CLIError(f"--{name.replace('_', '-')} {value}: must be {what}{note}", ExitCode.USAGE)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A few console lines with the headline numbers of ``report.json``."""
    lines = []
    for key, label in (("drift_rms_error_px", "drift RMS error (px)"), ("sharpness_gain", "sharpness gain"),
                       ("ari", "segmentation ARI"), ("temperature_bias_percent", "temperature bias (%)"),
                       ("temperature_pull_rms", "temperature pull RMS"), ("interface_drop_K", "interface drop (K)"),
                       ("interface_drop_true_K", "true drop (K)"), ("peak_centre_mae_meV", "peak centre MAE (meV)"),
                       ("tomo_correlation", "tomography Pearson r")):
        value = summary.get("headline", {}).get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            lines.append(f"  {label:<26} {value:.3g}{_sharpness_note(summary) if key == 'sharpness_gain' else ''}")
    return lines


#: Within-tilt drift (px) below which a drift-corrected sum cannot be visibly sharper than the plain sum.
NO_BLUR_DRIFT_PX = 0.5


def _sharpness_note(summary: dict[str, Any]) -> str:
    """Why the sharpness gain is 1 when it is: the frames hardly moved within a tilt, so nothing was blurred."""
    true_max = summary.get("headline", {}).get("true_drift_max_px")
    if true_max is None or not true_max < NO_BLUR_DRIFT_PX:
        return ""
    return f" (true drift within a tilt <= {true_max:.2g} px: no blur to undo)"
