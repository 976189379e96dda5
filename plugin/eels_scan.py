"""Vibrational EELS line scans and maps: the plan, its checks, and the procedure the "Vibrational EELS" panel runs.

Probe positions are picked on a survey image (a line between two end points, or a rectangle for a map) in
fractional survey coordinates. At each position the probe is parked, many short spectrum frames are read out and
streamed (in batches) to the pipeline service, which aligns them for energy drift, sums them, and sends back the
per-point sum, temperature and cluster label.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stemlive.live.analysis.registration import register_translation

from .acquisition import (
    ELEMENTARY_CHARGE_C,
    HardwareState,
    PlanCheck,
    PlanError,
    Procedure,
    Progress,
    ProgressClock,
    beam_current_pA,
    channel_xdata,
    check_disk_space,
    dose_per_scan_e_per_A2,
    energy_calibration_meV,
    full_frame_parameters,
    nion_metadata,
)

log = logging.getLogger(__name__)


DEFAULT_SATURATION_COUNTS = 65535.0  # a 16-bit readout, when neither the plan nor the camera says otherwise
SATURATION_MARGIN = 0.8  # the largest safe exposure keeps the brightest pixel at 80 % of saturation
TEST_SEQUENCE_S = 3.0  # longest test sequence at Check (timing of the camera's sequence acquisition)


def camera_saturation_counts(camera_source: Any) -> float | None:
    """The saturation level per detector pixel a camera reports (``saturation_counts``, else from ``bit_depth``)."""
    device = getattr(camera_source, "camera", None)
    value = getattr(device, "saturation_counts", None)
    if value is not None:
        return float(value)
    bits = getattr(device, "bit_depth", None)
    return float(2 ** int(bits) - 1) if bits else None


@dataclass
class EELSInstrumentTest:
    """What Check measures on the instrument: the detector's brightest pixel, the energy axis and the timings.

    Times are wall seconds as the procedure sees them (the camera's real exposure and readout, a simulator's
    pacing, Swift's acquisition overheads).
    """

    peak_counts_per_ms: float  # brightest detector pixel of a raw test frame, per ms of exposure
    test_exposure_ms: float
    test_peak_counts: float
    saturation_counts: float
    saturation_source: str  # "camera" (its own level), "plan" or "16-bit default"
    energy_offset_meV: float
    dispersion_meV: float
    energy_units: str
    n_channels: int
    frame_s: float  # per spectrum in a sequence at the plan's exposure
    sequence_overhead_s: float  # per sequence (one batch at one probe position)
    survey_s: float  # one survey scan
    beam_current_pA: float | None
    check_s: float = 0.0  # how long this test takes when it runs again at Start
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class EELSScanPlan:
    """A line scan (``mode="line"``) or a map (``mode="map"``); defaults are the reference line scan's."""

    mode: str = "line"
    # Line end points / map corners in fractional survey coordinates (y, x), 0..1.
    start: tuple[float, float] = (0.5, 0.1)
    end: tuple[float, float] = (0.5, 0.9)
    points: int = 40  # line: number of points (or set step_nm); map: points along x
    rows: int = 1  # map: points along y
    step_nm: float | None = 1.6  # when set, overrides `points` for a line
    frames_per_point: int = 200
    exposure_ms: float = 300.0
    batch: int = 50  # spectra per wire message
    survey_size_px: int = 512
    survey_dwell_us: float = 2.0
    survey_fov_nm: float = 80.0
    survey_before: bool = True
    survey_after: bool = True
    drift_tracking_every: int = 0  # re-find the reference region every N points (0: off)
    tracking_region: tuple[float, float, float, float] = (0.1, 0.1, 0.3, 0.3)  # y0, x0, h, w (fractions)
    saturation_counts: float | None = None  # per detector pixel; None: what the camera reports, else 16 bit
    readout_overhead_ms: float = 1.0  # used only when the instrument was not measured
    beam_current_pA: float | None = None  # None: the instrument's BeamCurrent
    session_dir: str | None = None
    # analysis parameters for this session only, {stage: {param: value}}, over the service's own
    analysis: dict[str, dict[str, Any]] = field(default_factory=dict)

    def positions_fractional(self, fov_nm: float) -> np.ndarray:
        """Probe positions ``(n, 2)`` as survey fractions ``(y, x)``, row-major for maps."""
        (y0, x0), (y1, x1) = self.start, self.end
        if self.mode == "line":
            length_nm = math.hypot(y1 - y0, x1 - x0) * fov_nm
            n = self.points
            if self.step_nm:
                n = int(round(length_nm / self.step_nm)) + 1 if length_nm > 0 else 1
            f = np.linspace(0.0, 1.0, max(n, 1))
            return np.column_stack([y0 + f * (y1 - y0), x0 + f * (x1 - x0)])
        ys = np.linspace(y0, y1, max(self.rows, 1))
        xs = np.linspace(x0, x1, max(self.points, 1))
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return np.column_stack([yy.ravel(), xx.ravel()])

    @property
    def kind(self) -> str:
        return "eels_map" if self.mode == "map" else "eels_line_scan"

    def settings(self, fov_nm: float) -> dict[str, Any]:
        d = asdict(self)
        d["n_points"] = len(self.positions_fractional(fov_nm))
        if self.mode == "map":
            d["scan_shape"] = [self.rows, self.points]
        return d


def step_nm(plan: EELSScanPlan, fov_nm: float) -> tuple[float, float]:
    """Distance between neighbouring probe positions (along y, along x) in nm; a line's step on both."""
    (y0, x0), (y1, x1) = plan.start, plan.end
    n = len(plan.positions_fractional(fov_nm))
    if plan.mode == "line":
        step = math.hypot(y1 - y0, x1 - x0) * fov_nm / max(n - 1, 1)
        return step, step
    return (abs(y1 - y0) * fov_nm / max(plan.rows - 1, 1), abs(x1 - x0) * fov_nm / max(plan.points - 1, 1))


def check_plan(
    plan: EELSScanPlan, *, fov_nm: float, n_channels: int = 2048, zlp_counts_per_ms: float | None = None,
    instrument: Any = None, test: EELSInstrumentTest | None = None,
) -> PlanCheck:
    """Time, dose, disk and detector-saturation check of a plan, with every reason it cannot run.

    Parameters
    ----------
    zlp_counts_per_ms
        Brightest detector pixel per ms of exposure (a raw frame, not a row-summed spectrum); ``None`` and no
        ``instrument``/``test``: the saturation check is skipped (noted).
    instrument
        Anything with ``stem_controller``, ``scan_source``, ``camera_source`` (and ``channel``): a test frame and
        short test sequences are taken there (:func:`measure_instrument`) for the per-pixel saturation check and
        time estimates that include the instrument's measured overheads. The instrument is left as it was.
    test
        An :class:`EELSInstrumentTest` already taken (the procedure passes its own).
    """
    if test is None and instrument is not None and plan.mode in ("line", "map"):
        try:
            test = measure_instrument(plan, instrument.stem_controller, instrument.scan_source,
                                   instrument.camera_source, channel=int(getattr(instrument, "channel", 0) or 0))
        except PlanError as e:
            check = PlanCheck(duration_s=0.0, dose_e_per_A2=0.0, bytes_on_disk=0)
            check.problems.append(str(e))
            return check
        except Exception as e:  # the instrument failed the test: refuse with its reason (one line)
            log.info("EELS instrument test failed", exc_info=True)  # the reason is the refusal; -v: traceback
            check = PlanCheck(duration_s=0.0, dose_e_per_A2=0.0, bytes_on_disk=0)
            check.instrument_error = f"the instrument test failed: {type(e).__name__}: {e}"
            check.problems.append(check.instrument_error)
            return check
    n_points = len(plan.positions_fractional(fov_nm)) if plan.mode in ("line", "map") else 0
    m = plan.frames_per_point
    n_spectra = n_points * m
    n_surveys = int(plan.survey_before) + int(plan.survey_after)
    if test is not None:
        n_channels = test.n_channels
        batches = n_points * math.ceil(max(m, 1) / max(plan.batch, 1))
        duration = (test.check_s + n_surveys * test.survey_s + batches * test.sequence_overhead_s
                    + n_spectra * test.frame_s)
    else:
        duration = n_spectra * (plan.exposure_ms + plan.readout_overhead_ms) * 1e-3
        survey_s = plan.survey_size_px**2 * plan.survey_dwell_us * 1e-6 * 1.1
        duration += survey_s * n_surveys
    nbytes = n_spectra * n_channels * 4
    current = plan.beam_current_pA if plan.beam_current_pA is not None else (
        test.beam_current_pA if test is not None else None)
    dose = 0.0
    if current and n_points:
        sy, sx = step_nm(plan, fov_nm)
        electrons = current * 1e-12 / ELEMENTARY_CHARGE_C * m * plan.exposure_ms * 1e-3
        dose = electrons / max(sy * 10.0 * sx * 10.0, 1e-12)  # spread over one step's area
        dose += n_surveys * dose_per_scan_e_per_A2(current, plan.survey_dwell_us,
                                                   plan.survey_fov_nm / max(plan.survey_size_px, 1))
    check = PlanCheck(duration_s=duration, dose_e_per_A2=dose, bytes_on_disk=nbytes)
    if current is None:
        check.notes.append("dose not estimated (the instrument reports no BeamCurrent)")
    if plan.mode not in ("line", "map"):
        check.problems.append(f"mode must be 'line' or 'map', not {plan.mode!r}")
    for name, (y, x) in (("start", plan.start), ("end", plan.end)):
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            check.problems.append(f"{name} point ({y:g}, {x:g}) lies outside the survey image (fractions 0..1)")
    if n_points < 2:
        check.problems.append("the scan has fewer than 2 probe positions")
    if plan.frames_per_point < 1:
        check.problems.append("frames per point must be at least 1")
    if not 0.01 <= plan.exposure_ms <= 60000:
        check.problems.append(f"exposure {plan.exposure_ms} ms is outside 0.01-60000 ms")
    if plan.step_nm is not None and plan.mode == "line" and plan.step_nm <= 0:
        check.problems.append("step must be positive")
    if test is not None:
        saturation, source = test.saturation_counts, test.saturation_source
        zlp_counts_per_ms = test.peak_counts_per_ms
    else:
        saturation = plan.saturation_counts if plan.saturation_counts is not None else DEFAULT_SATURATION_COUNTS
        source = "plan" if plan.saturation_counts is not None else "16-bit default"
    if zlp_counts_per_ms is None or zlp_counts_per_ms <= 0:
        check.notes.append("detector saturation not checked (no test frame)")
    else:
        peak = zlp_counts_per_ms * plan.exposure_ms
        safe_ms = SATURATION_MARGIN * saturation / zlp_counts_per_ms
        if test is not None and test.test_peak_counts >= saturation:
            check.problems.append(
                f"the detector saturates already in the {test.test_exposure_ms:g} ms test frame (brightest pixel "
                f"{test.test_peak_counts:.3g} counts, saturation {saturation:.3g} per pixel, {source}): "
                "lower the beam current or spread the spectrum")
        elif peak >= saturation:
            check.problems.append(
                f"the detector would saturate: brightest pixel about {peak:.3g} counts in {plan.exposure_ms:g} ms "
                f"(saturation {saturation:.6g} counts per pixel, {source}); use at most {safe_ms:.3g} ms per frame"
            )
        elif peak >= SATURATION_MARGIN * saturation:
            check.notes.append(f"brightest detector pixel at {100 * peak / saturation:.0f}% of saturation")
    if test is not None:
        check.notes.append(f"energy axis {test.dispersion_meV:.4g} meV per channel (camera calibration, "
                           f"{test.energy_units})")
    check_disk_space(plan.session_dir, nbytes, check)
    return check


def _camera_parameters(camera_source: Any, exposure_ms: float, processing: str | None) -> Any:
    fp = camera_source.get_current_frame_parameters()
    fp.exposure_ms = exposure_ms
    fp.processing = processing
    return fp


def acquire_spectra(camera_source: Any, exposure_ms: float, n: int) -> Any:
    """``n`` spectra (Nion data and metadata, ``(n, channels)``) at the parked probe, the Nion way.

    Uses Swift's acquisition data streams: ``camera_base.make_sequence_data_stream`` with ``sum_project``
    processing (the frames are summed over the non-dispersive axis as they arrive) run by
    ``Acquisition.acquire_immediate``. (The hardware source's ``grab_sequence`` with ``sum_project`` fails an
    assertion in device_kit 23.6, so it is not used.) The stream starts and stops the camera itself.
    """
    from nion.instrumentation import Acquisition, camera_base

    fp = _camera_parameters(camera_source, exposure_ms, "sum_project")
    stream = camera_base.make_sequence_data_stream(camera_source, fp, n)
    data = Acquisition.acquire_immediate(stream)
    if not data:
        raise RuntimeError("the EELS camera returned no data")
    xdata = next(iter(data.values()))
    if xdata.data.ndim == 1:  # a sequence of one comes back as one spectrum
        from nion.data import DataAndMetadata

        xdata = DataAndMetadata.new_data_and_metadata(
            xdata.data[np.newaxis], intensity_calibration=xdata.intensity_calibration,
            dimensional_calibrations=[xdata.dimensional_calibrations[0], *xdata.dimensional_calibrations],
            metadata=xdata.metadata)
    return xdata


def raw_frame(camera_source: Any, exposure_ms: float) -> Any:
    """One raw camera frame (every detector pixel, no summing), through the same data stream."""
    from nion.instrumentation import Acquisition, camera_base

    fp = _camera_parameters(camera_source, exposure_ms, None)
    data = Acquisition.acquire_immediate(camera_base.make_sequence_data_stream(camera_source, fp, 1))
    if not data:
        raise RuntimeError("the EELS camera returned no test frame")
    return next(iter(data.values()))


def measure_instrument(plan: EELSScanPlan, stem_controller: Any, scan_source: Any, camera_source: Any, *,
                    channel: int = 0) -> EELSInstrumentTest:
    """Measure what :func:`check_plan` needs on the instrument, and leave it as it was.

    The live scan (if any) is stopped and the probe parked at the plan's first point; one raw test frame at a
    tenth of the plan's exposure gives the brightest detector pixel (per pixel, not per summed channel); one and
    ``k`` spectra at the plan's exposure give the per-spectrum and per-sequence times; one survey-sized scan the
    survey time. Scan and camera settings, the probe and the live scan are then restored.
    """
    from nion.utils import Geometry

    state = HardwareState(stem_controller, scan_source, camera_source)
    try:
        state.stop_live_scan()
        stem_controller.probe_position = Geometry.FloatPoint(*plan.start)
        state.confirm_parked()
        saturation, source = plan.saturation_counts, "plan"
        if saturation is None:
            saturation, source = camera_saturation_counts(camera_source), "camera"
        if saturation is None:
            saturation, source = DEFAULT_SATURATION_COUNTS, "16-bit default"
        # a tenth of the plan's exposure; shorter while the test frame itself saturates (a clipped peak would
        # understate the counts per ms)
        test_ms = min(plan.exposure_ms, max(0.001, plan.exposure_ms / 10.0))
        raw_s = 0.0
        for _ in range(4):
            t0 = time.perf_counter()
            frame = raw_frame(camera_source, test_ms)
            raw_s += time.perf_counter() - t0
            test_peak = float(np.max(frame.data))
            if test_peak < saturation or test_ms <= 0.001:
                break
            test_ms = max(0.001, test_ms / 10.0)
        offset_meV, dispersion_meV = energy_calibration_meV(frame.dimensional_calibrations[-1])
        units = str(frame.dimensional_calibrations[-1].units)
        k = max(2, min(plan.batch, plan.frames_per_point, 10, int(TEST_SEQUENCE_S * 1e3 / plan.exposure_ms)))
        acquire_spectra(camera_source, plan.exposure_ms, 1)  # warm-up: first-use costs are not the run's
        # each timed sequence at a new probe position, as in the run (a move, and whatever the first frame at a
        # new position costs: settling on a microscope, a new spectrum in a simulator); two pairs, averaged
        (ya, xa), (yb, xb) = plan.start, plan.end
        positions = [(ya + f * (yb - ya), xa + f * (xb - xa)) for f in (1.0, 0.5, 0.25, 0.75)]
        ones, tks = [], []
        for pair in range(2):
            t0 = time.perf_counter()
            stem_controller.probe_position = Geometry.FloatPoint(*positions[2 * pair])
            acquire_spectra(camera_source, plan.exposure_ms, 1)
            t1 = time.perf_counter()
            stem_controller.probe_position = Geometry.FloatPoint(*positions[2 * pair + 1])
            spectra = acquire_spectra(camera_source, plan.exposure_ms, k)
            ones.append(t1 - t0)
            tks.append(time.perf_counter() - t1)
        one, tk = float(np.mean(ones)), float(np.mean(tks))
        frame_s = max((tk - one) / (k - 1), 0.0)
        overhead_s = max(one - frame_s, 0.0)
        survey_s = 0.0
        scan_xdata = None
        if plan.survey_before or plan.survey_after:
            fp = full_frame_parameters(scan_source, plan.survey_size_px, plan.survey_dwell_us, plan.survey_fov_nm,
                                       channel)
            t2 = time.perf_counter()
            scan_xdata = channel_xdata(scan_source.record_immediate(fp), channel)
            survey_s = time.perf_counter() - t2
        # this test again at Start (warm): what it takes when nothing is done for the first time
        check_s = raw_s + 3 * one + 2 * tk + survey_s
        metadata = nion_metadata(stem_controller, scan_source, camera_source, camera_xdata=spectra,
                                 scan_xdata=scan_xdata)
    finally:
        state.restore()
    return EELSInstrumentTest(
        peak_counts_per_ms=test_peak / test_ms, test_exposure_ms=test_ms, test_peak_counts=test_peak,
        saturation_counts=float(saturation), saturation_source=source, energy_offset_meV=offset_meV,
        dispersion_meV=dispersion_meV, energy_units=units, n_channels=int(spectra.data.shape[-1]),
        frame_s=frame_s, sequence_overhead_s=overhead_s, survey_s=survey_s,
        beam_current_pA=beam_current_pA(stem_controller), check_s=check_s, metadata=metadata)


def fraction_to_nm(fraction_yx: np.ndarray, scan_context: Any) -> np.ndarray:
    """Survey fractions ``(y, x)`` of a square survey to sample coordinates in nm (scan centre and rotation)."""
    fov = float(scan_context.fov_nm)
    fy = (np.asarray(fraction_yx)[..., 0] - 0.5) * fov
    fx = (np.asarray(fraction_yx)[..., 1] - 0.5) * fov
    rot = float(scan_context.rotation_rad or 0.0)
    cy, cx = scan_context.center_nm
    y = cy + fy * math.cos(rot) - fx * math.sin(rot)
    x = cx + fy * math.sin(rot) + fx * math.cos(rot)
    return np.stack([y, x], axis=-1)


class EELSScanProcedure(Procedure):
    """Runs an :class:`EELSScanPlan`: survey, spectra at every probe position, survey; every frame streamed.

    The Nion way: a live scan is stopped first and the probe confirmed ``parked`` before any spectrum (and after
    every survey); spectra come from Swift's acquisition data streams (:func:`acquire_spectra`); at every ending
    the camera is stopped (unless the user had it running), camera and scan settings are restored, the probe
    returns to where it was and a live scan the user had running is restarted (:class:`HardwareState`).

    Parameters
    ----------
    plan
        Positions and exposure settings.
    camera_source
        The EELS camera hardware source.
    **kwargs
        ``stem_controller``, ``scan_source`` (survey images), ``sender``, ``control``, ``on_progress``,
        ``channel``, ``session_id``: see :class:`~nionswift_plugin.stemlive.acquisition.Procedure`.
    """

    def __init__(self, plan: EELSScanPlan, *, camera_source: Any, **kwargs: Any) -> None:
        settings = plan.settings(plan.survey_fov_nm)
        settings["camera_device"] = str(getattr(camera_source, "hardware_source_id", ""))
        super().__init__(kind=plan.kind, settings=settings, **kwargs)
        self.plan = plan
        self.camera_source = camera_source
        self.drift_correction_frac: np.ndarray = np.zeros(2)
        self.test: EELSInstrumentTest | None = None
        self.check: PlanCheck | None = None
        self.probe_states: list[str] = []  # the probe state before every spectrum sequence

    def _survey(self) -> tuple[np.ndarray, float]:
        plan = self.plan
        image, t = self.scan(self.scan_parameters(plan.survey_size_px, plan.survey_dwell_us, plan.survey_fov_nm))
        return image, t

    def _spectra(self, n: int) -> tuple[np.ndarray, float, float]:
        """``n`` spectra at the parked probe: ``(spectra (n, channels), energy_offset_meV, dispersion_meV)``."""
        xdata = acquire_spectra(self.camera_source, self.plan.exposure_ms, n)
        spectra = np.asarray(xdata.data, dtype=np.float32).reshape(n, -1)
        offset_meV, dispersion_meV = energy_calibration_meV(xdata.dimensional_calibrations[-1])
        return spectra, offset_meV, dispersion_meV

    def zlp_counts_per_ms(self, test_exposure_ms: float = 1.0) -> float:
        """Brightest detector pixel per ms at the current probe position from one raw test frame."""
        frame = raw_frame(self.camera_source, test_exposure_ms)
        return float(np.max(frame.data)) / test_exposure_ms

    def check_plan(self) -> PlanCheck:
        """The plan check with a fresh test on this procedure's instrument (the Start check)."""
        self.test = measure_instrument(self.plan, self.stem_controller, self.scan_source, self.camera_source,
                                       channel=self.channel)
        self.check = check_plan(self.plan, fov_nm=self.plan.survey_fov_nm, test=self.test)
        return self.check

    def _track(self, reference: np.ndarray, region: tuple[slice, slice]) -> None:
        view, _ = self._survey()
        (dy, dx), _q = register_translation(reference, view[region])
        self.drift_correction_frac = np.array([dy, dx]) / np.array(view.shape)
        log.info("drift tracking: reference region moved by (%.2f, %.2f) px", dy, dx)

    def run(self) -> str:
        """Acquire the scan; returns the session status.

        Raises
        ------
        PlanError
            The plan is refused on this instrument (nothing recorded, the instrument as it was).
        """
        from nion.utils import Geometry

        plan = self.plan
        # saturation, energy axis and timings checked on this instrument, at Start too
        state, check = self.take_instrument(self.camera_source)
        test = self.test
        assert test is not None
        self.stream.settings["nion"] = test.metadata
        self.stream.settings["energy_units"] = test.energy_units
        self.stream.settings["beam_current_pA"] = test.beam_current_pA
        self.stream.settings["estimated_duration_s"] = check.duration_s
        self.stream.settings["saturation_counts"] = test.saturation_counts
        fractions = plan.positions_fractional(plan.survey_fov_nm)
        n, m = len(fractions), plan.frames_per_point
        clock = ProgressClock(check.duration_s)
        region = self._region_slices()
        reference: np.ndarray | None = None
        current = plan.beam_current_pA if plan.beam_current_pA is not None else test.beam_current_pA
        sy, sx = step_nm(plan, plan.survey_fov_nm)
        dose_per_spectrum = 0.0
        if current:
            dose_per_spectrum = (current * 1e-12 / ELEMENTARY_CHARGE_C * plan.exposure_ms * 1e-3
                                 / max(sy * 10.0 * sx * 10.0, 1e-12))
        survey_dose = dose_per_scan_e_per_A2(current or 0.0, plan.survey_dwell_us,
                                             plan.survey_fov_nm / max(plan.survey_size_px, 1))
        dose = 0.0

        def finish(status: str, message: str) -> None:
            state.restore()  # the instrument first: camera stopped, settings and probe back, live scan resumed
            self.released_at = time.perf_counter()
            if self.stream.started:
                self.stream.end(status, message)
            self.report(Progress(status, n, n, m, m, clock.elapsed(), 0.0, dose, message))

        with self.outcome("EELS scan", finish):
            survey, t_survey = self._survey()
            dose += survey_dose
            scan_context = self.stem_controller.scan_context
            positions_nm = fraction_to_nm(fractions, scan_context)
            self.stream.start()
            if plan.survey_before:
                self.stream.survey(survey, which="before", t=t_survey,
                                   pixel_size_nm=plan.survey_fov_nm / survey.shape[1])
            if plan.drift_tracking_every:
                reference = survey[region]
            for point_index, (frac, pos_nm) in enumerate(zip(fractions, positions_nm, strict=True)):
                clock.paused_s += self.control.checkpoint()
                if reference is not None and point_index and point_index % plan.drift_tracking_every == 0:
                    self._track(reference, region)
                    dose += survey_dose
                fy, fx = np.clip(frac + self.drift_correction_frac, 0.0, 1.0)
                self.stem_controller.probe_position = Geometry.FloatPoint(float(fy), float(fx))
                state.confirm_parked()  # a survey or tracking scan has ended: spectra only at a parked probe
                for first in range(0, m, plan.batch):
                    clock.paused_s += self.control.checkpoint()
                    k = min(plan.batch, m - first)
                    self.probe_states.append(str(self.stem_controller.probe_state))
                    t0 = time.time()
                    spectra, offset_meV, dispersion_meV = self._spectra(k)
                    dose += k * dose_per_spectrum
                    times = t0 + (np.arange(k) + 1) * plan.exposure_ms * 1e-3
                    self.stream.spectra(
                        spectra,
                        point_index=[point_index] * k,
                        frame_index=list(range(first, first + k)),
                        x_nm=[float(pos_nm[1])] * k,
                        y_nm=[float(pos_nm[0])] * k,
                        energy_offset_meV=[offset_meV] * k,
                        t=times.tolist(),
                        dispersion_meV=dispersion_meV,
                        exposure_ms=plan.exposure_ms,
                    )
                    fraction = (point_index * m + first + k) / (n * m)
                    self.report(Progress("acquiring", point_index + 1, n, first + k, m, clock.elapsed(),
                                          clock.remaining(fraction), dose))
            if plan.survey_after:
                after, t_after = self._survey()
                dose += survey_dose
                self.stream.survey(after, which="after", t=t_after,
                                   pixel_size_nm=plan.survey_fov_nm / after.shape[1])
        return self.status

    def _region_slices(self) -> tuple[slice, slice]:
        y0, x0, h, w = self.plan.tracking_region
        s = self.plan.survey_size_px
        return slice(int(y0 * s), int((y0 + h) * s)), slice(int(x0 * s), int((x0 + w) * s))

