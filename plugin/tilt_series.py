"""Tilt-series acquisition: the plan, its checks, and the procedure the "Tilt Series" panel runs.

At each (alpha, beta) the stage is moved and confirmed, the region is re-found by cross-correlation with the
previous tilt (optional tracking), and several fast HAADF frames are scanned and streamed with full metadata to
the pipeline service, which registers, corrects and sums them and sends each tilt's sum back.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.analysis.registration import register_translation

from .acquisition import (
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
    full_frame_parameters,
    instrument_sleep,
    instrument_wall_seconds,
    nion_metadata,
)

log = logging.getLogger(__name__)

# Nominal (alpha, beta) of the 12 projections of the reference experiment (Sci. Adv. 7, eabi6699, table S1).
REFERENCE_TILTS_DEG: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (-14.3, -22.9), (-14.3, 17.1), (20.1, 17.1), (20.1, -20.1), (12.6, -12.6),
    (12.6, 12.6), (-12.6, 12.6), (-12.6, -12.6), (-6.3, -6.3), (-6.3, 6.3), (6.3, 6.3),
)

STAGE_ALPHA = "StageOutA"  # radians, as Nion records the stage
STAGE_BETA = "StageOutB"
SCAN_FLYBACK_FRACTION = 0.1  # line flyback and frame overhead, for time estimates


@dataclass
class TiltSeriesPlan:
    """Everything the procedure needs; defaults are the reference experiment's."""

    tilts_deg: list[tuple[float, float]] = field(default_factory=lambda: list(REFERENCE_TILTS_DEG))
    frames_per_tilt: int = 10
    size_px: int = 512
    dwell_us: float = 4.0
    fov_nm: float = 16.384  # 512 x 0.32 A
    settle_s: float = 2.0
    confirm_tolerance: float = 1.0  # Nion tolerance factor for SetValAndConfirm
    confirm_timeout_s: float = 30.0
    order: str = "as_listed"  # or "increasing_tilt"
    tracking: bool = True
    beam_current_pA: float | None = None  # None: the instrument's BeamCurrent (17 pA when it reports none)
    alpha_limits_deg: tuple[float, float] = (-35.0, 35.0)
    beta_limits_deg: tuple[float, float] = (-30.0, 30.0)
    max_dose_e_per_A2: float = 1.0e6
    session_dir: str | None = None  # where the service records, when it is on this computer
    # analysis parameters for this session only, {stage: {param: value}}, over the service's own
    analysis: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pixel_size_nm(self) -> float:
        return self.fov_nm / self.size_px

    def ordered_tilts(self) -> list[tuple[int, float, float]]:
        """``(index in the table, alpha, beta)`` in acquisition order."""
        indexed = [(i, float(a), float(b)) for i, (a, b) in enumerate(self.tilts_deg)]
        if self.order == "increasing_tilt":
            indexed.sort(key=lambda t: (total_tilt_deg(t[1], t[2]), t[0]))
        return indexed

    def frame_time_s(self) -> float:
        return self.size_px**2 * self.dwell_us * 1e-6 * (1.0 + SCAN_FLYBACK_FRACTION)

    def settings(self) -> dict[str, Any]:
        """The plan as JSON-ready session settings."""
        d = asdict(self)
        d["pixel_size_nm"] = self.pixel_size_nm
        d["tilts_deg"] = [list(t) for t in self.tilts_deg]
        return d


def total_tilt_deg(alpha_deg: float, beta_deg: float) -> float:
    """Angle between the beam and the sample normal for a double tilt (alpha then beta)."""
    ca, cb = math.cos(math.radians(alpha_deg)), math.cos(math.radians(beta_deg))
    return math.degrees(math.acos(max(-1.0, min(1.0, ca * cb))))


def read_tilts_csv(text: str) -> list[tuple[float, float]]:
    """Parse a tilt table: two columns alpha_deg, beta_deg (a header row and ``#`` comments are allowed)."""
    tilts: list[tuple[float, float]] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        try:
            alpha, beta = float(row[0]), float(row[1])
        except (ValueError, IndexError):
            if not tilts and any(c.isalpha() for c in row[0]):
                continue  # header row
            raise PlanError(f"tilt table line {n}: expected 'alpha_deg, beta_deg', got {','.join(row)!r}") from None
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise PlanError(f"tilt table line {n}: angles must be finite numbers")
        tilts.append((alpha, beta))
    if not tilts:
        raise PlanError("tilt table has no rows")
    return tilts


def write_tilts_csv(tilts: Sequence[tuple[float, float]]) -> str:
    """The tilt table as CSV with a header row."""
    return "alpha_deg,beta_deg\n" + "".join(f"{a:g},{b:g}\n" for a, b in tilts)


DEFAULT_BEAM_CURRENT_PA = 17.0  # the reference experiment's, when neither the plan nor the instrument says


@dataclass
class TiltInstrumentTest:
    """What Check measures on the instrument for a tilt series (wall seconds as the procedure sees them)."""

    has_stage: bool
    missing_controls: list[str]
    tilt_deg: tuple[float, float] | None  # the stage's read-back when tested
    alpha_limits_deg: tuple[float, float] | None  # the instrument's limits, when it reports them
    beta_limits_deg: tuple[float, float] | None
    frame_s: float  # one scan at the plan's size and dwell
    move_s: float  # a stage move to where the stage is (both axes confirmed), plus the settling wait
    tracking_s: float  # registering one frame to another
    beam_current_pA: float | None
    check_s: float = 0.0  # how long this test takes when it runs again at Start
    metadata: dict[str, Any] = field(default_factory=dict)


def stage_limits_deg(stem_controller: Any) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The stage's (alpha, beta) tilt limits in degrees, when the instrument reports them
    (``stage_tilt_limits_deg``); Nion's STEMController interface has no standard for them."""
    limits = getattr(stem_controller, "stage_tilt_limits_deg", None)
    if limits is None:
        return None
    (a0, a1), (b0, b1) = limits
    return (float(a0), float(a1)), (float(b0), float(b1))


def read_stage_deg(stem_controller: Any) -> tuple[float, float] | None:
    """The stage tilt read-back (``StageOutA``/``StageOutB``, radians) in degrees; None without the controls."""
    ok_a, a = stem_controller.TryGetVal(STAGE_ALPHA)
    ok_b, b = stem_controller.TryGetVal(STAGE_BETA)
    if not (ok_a and ok_b) or a is None or b is None:
        return None
    return math.degrees(float(a)), math.degrees(float(b))


def measure_instrument(plan: TiltSeriesPlan, stem_controller: Any, scan_source: Any, *,
                       channel: int = 0) -> TiltInstrumentTest:
    """Check the stage controls and limits and measure the scan and stage timings; the instrument is left as it
    was (scan settings, live scan, probe; the stage is only moved to where it is)."""

    missing = [c for c in (STAGE_ALPHA, STAGE_BETA) if not stem_controller.TryGetVal(c)[0]]
    tilt = read_stage_deg(stem_controller)
    limits = stage_limits_deg(stem_controller)
    current = beam_current_pA(stem_controller)
    frame_s = move_s = tracking_s = 0.0
    metadata: dict[str, Any] = {}
    if not missing:
        state = HardwareState(stem_controller, scan_source)
        try:
            state.stop_live_scan()
            fp = full_frame_parameters(scan_source, plan.size_px, plan.dwell_us, plan.fov_nm, channel)
            channel_xdata(scan_source.record_immediate(fp), channel)  # warm-up: first-use costs are not the run's
            t0 = time.perf_counter()
            xdata = channel_xdata(scan_source.record_immediate(fp), channel)
            frame_s = time.perf_counter() - t0
            if plan.tracking and xdata is not None:
                image = np.asarray(xdata.data, np.float32)
                t1 = time.perf_counter()
                register_translation(image, image)
                tracking_s = time.perf_counter() - t1
            if tilt is not None:
                # a small real move (both axes, 0.5 deg towards zero tilt) and back: a move to where the stage
                # already is would not show the stage's travel and settling
                def move(alpha: float, beta: float) -> None:
                    for control, value in ((STAGE_ALPHA, alpha), (STAGE_BETA, beta)):
                        if not stem_controller.SetValAndConfirm(control, math.radians(value), plan.confirm_tolerance,
                                                                int(plan.confirm_timeout_s * 1000)):
                            raise RuntimeError(f"the stage did not confirm {control} = {value:g} deg "
                                               f"within {plan.confirm_timeout_s:g} s")

                step = [-0.5 if v > 0 else 0.5 for v in tilt]
                t2 = time.perf_counter()
                move(tilt[0] + step[0], tilt[1] + step[1])
                move(*tilt)
                move_s = (time.perf_counter() - t2) / 2 + instrument_wall_seconds(stem_controller, plan.settle_s)
            metadata = nion_metadata(stem_controller, scan_source, scan_xdata=xdata)
        finally:
            state.restore()
    return TiltInstrumentTest(
        has_stage=not missing, missing_controls=missing, tilt_deg=tilt,
        alpha_limits_deg=limits[0] if limits else None, beta_limits_deg=limits[1] if limits else None,
        frame_s=frame_s, move_s=move_s, tracking_s=tracking_s, beam_current_pA=current,
        check_s=2 * frame_s + tracking_s + 2 * move_s, metadata=metadata)


def check_plan(plan: TiltSeriesPlan, *, instrument: Any = None, test: TiltInstrumentTest | None = None) -> PlanCheck:
    """Time, dose and disk estimate of a plan and every reason it cannot run.

    Parameters
    ----------
    instrument
        Anything with ``stem_controller`` and ``scan_source`` (and ``channel``): the stage controls and limits
        are checked there and the timings measured (:func:`measure_instrument`); the instrument is left as it was.
    test
        A :class:`TiltInstrumentTest` already taken (the procedure passes its own).
    """
    if test is None and instrument is not None:
        try:
            test = measure_instrument(plan, instrument.stem_controller, instrument.scan_source,
                                      channel=int(getattr(instrument, "channel", 0) or 0))
        except Exception as e:  # the instrument failed the test: refuse with its reason (one line)
            log.info("tilt-series instrument test failed", exc_info=True)  # the reason is the refusal; -v: traceback
            check = PlanCheck(duration_s=0.0, dose_e_per_A2=0.0, bytes_on_disk=0)
            check.instrument_error = f"the instrument test failed: {type(e).__name__}: {e}"
            check.problems.append(check.instrument_error)
            return check
    n_tilts = len(plan.tilts_deg)
    n_scans = n_tilts * (plan.frames_per_tilt + (1 if plan.tracking else 0))
    if test is not None and test.has_stage:
        n_tracking = max(n_tilts - 1, 0) if plan.tracking else 0
        duration = (test.check_s + (n_tilts + 1) * test.move_s + n_tilts * plan.frames_per_tilt * test.frame_s
                    + n_tracking * (test.frame_s + test.tracking_s))
    else:
        duration = n_tilts * (plan.settle_s + plan.frames_per_tilt * plan.frame_time_s())
        if plan.tracking:
            duration += n_tilts * plan.frame_time_s()
    current = plan.beam_current_pA if plan.beam_current_pA is not None else (
        test.beam_current_pA if test is not None and test.beam_current_pA else DEFAULT_BEAM_CURRENT_PA)
    dose = n_scans * dose_per_scan_e_per_A2(current, plan.dwell_us, plan.pixel_size_nm)
    nbytes = n_tilts * plan.frames_per_tilt * plan.size_px**2 * 4
    check = PlanCheck(duration_s=duration, dose_e_per_A2=dose, bytes_on_disk=nbytes)
    if test is not None and not test.has_stage:
        check.problems.append(
            f"the instrument has no {'/'.join(test.missing_controls)} stage tilt control"
            f"{'s' if len(test.missing_controls) > 1 else ''} ({STAGE_ALPHA}/{STAGE_BETA} are needed to tilt)")
    if n_tilts == 0:
        check.problems.append("the tilt table is empty")
    if plan.frames_per_tilt < 1:
        check.problems.append(f"frames per tilt must be at least 1, not {plan.frames_per_tilt}")
    if not 16 <= plan.size_px <= 8192:
        check.problems.append(f"frame size {plan.size_px} px is outside 16-8192")
    if not 0.05 <= plan.dwell_us <= 1000:
        check.problems.append(f"dwell time {plan.dwell_us} us is outside 0.05-1000 us")
    if not plan.fov_nm > 0:
        check.problems.append("field of view must be positive")
    if plan.order not in ("as_listed", "increasing_tilt"):
        check.problems.append(f"order must be 'as_listed' or 'increasing_tilt', not {plan.order!r}")
    alpha_limits, beta_limits, source = plan.alpha_limits_deg, plan.beta_limits_deg, "the plan's"
    if test is not None and test.alpha_limits_deg is not None and test.beta_limits_deg is not None:
        # the tighter of the instrument's and the plan's limits
        alpha_limits = (max(alpha_limits[0], test.alpha_limits_deg[0]), min(alpha_limits[1], test.alpha_limits_deg[1]))
        beta_limits = (max(beta_limits[0], test.beta_limits_deg[0]), min(beta_limits[1], test.beta_limits_deg[1]))
        source = "the instrument's and the plan's"
    elif test is not None and test.has_stage:
        check.notes.append("stage limits from the plan (the instrument reports none)")
    for i, (alpha, beta) in enumerate(plan.tilts_deg):
        lo, hi = alpha_limits
        if not lo <= alpha <= hi:
            check.problems.append(f"tilt {i + 1}: alpha {alpha:g} deg is outside the stage limits "
                                  f"{lo:g}..{hi:g} deg ({source})")
        lo, hi = beta_limits
        if not lo <= beta <= hi:
            check.problems.append(f"tilt {i + 1}: beta {beta:g} deg is outside the stage limits {lo:g}..{hi:g} deg "
                                  f"({source})")
    if dose > plan.max_dose_e_per_A2:
        check.problems.append(
            f"total dose {dose:.3g} e/A^2 exceeds the limit {plan.max_dose_e_per_A2:.3g} e/A^2 "
            "(fewer frames, shorter dwell or lower current)"
        )
    check_disk_space(plan.session_dir, nbytes, check)
    return check


class TiltSeriesProcedure(Procedure):
    """Runs a :class:`TiltSeriesPlan` on a Nion STEM controller and scan device, streaming every frame.

    Parameters
    ----------
    plan
        The tilts and scan settings.
    **kwargs
        ``stem_controller``, ``scan_source``, ``sender``, ``control``, ``on_progress``, ``channel``,
        ``session_id``: see :class:`~nionswift_plugin.stemlive.acquisition.Procedure`.
    """

    def __init__(self, plan: TiltSeriesPlan, **kwargs: Any) -> None:
        super().__init__(kind="tilt_series", settings=plan.settings(), **kwargs)
        self.plan = plan
        self.tracking_shifts_px: list[tuple[float, float]] = []
        self.readback_deg: list[tuple[float, float]] = []  # the stage's read-back after each move
        self.test: TiltInstrumentTest | None = None
        self.check: PlanCheck | None = None

    # --- stage ---
    def _read_tilt_deg(self) -> tuple[float, float]:
        tilt = read_stage_deg(self.stem_controller)
        if tilt is None:
            raise RuntimeError(f"the instrument has no {STAGE_ALPHA}/{STAGE_BETA} stage controls")
        return tilt

    def _move_stage(self, alpha_deg: float, beta_deg: float) -> tuple[float, float]:
        """Move, confirm, settle; returns the stage's read-back (alpha, beta) in degrees."""
        for control, value in ((STAGE_ALPHA, alpha_deg), (STAGE_BETA, beta_deg)):
            ok = self.stem_controller.SetValAndConfirm(
                control, math.radians(value), self.plan.confirm_tolerance, int(self.plan.confirm_timeout_s * 1000)
            )
            if not ok:
                raise RuntimeError(
                    f"stage did not confirm {control} = {value:g} deg within {self.plan.confirm_timeout_s:g} s"
                )
        instrument_sleep(self.stem_controller, self.plan.settle_s)  # mechanical settling after the encoder confirms
        return self._read_tilt_deg()

    def _track(self, reference: np.ndarray, frame_parameters: Any) -> None:
        """Find ``reference`` (the previous tilt's sum) in a new scan and move the scan centre onto it."""
        view, _ = self.scan(frame_parameters)
        (dy, dx), _quality = register_translation(reference, view)
        self.tracking_shifts_px.append((float(dy), float(dx)))
        # The region appears displaced by (dy, dx) px: move the scan centre by the same amount in the sample
        # frame (rotate from image to scan axes) so it returns to where it was.
        rot = float(getattr(frame_parameters, "rotation_rad", 0.0))
        px = self.plan.pixel_size_nm
        sy = (dy * math.cos(rot) + dx * math.sin(rot)) * px
        sx = (-dy * math.sin(rot) + dx * math.cos(rot)) * px
        cy, cx = frame_parameters.center_nm
        frame_parameters.center_nm = (cy + sy, cx + sx)
        log.info("tracking: region found at (%.2f, %.2f) px; scan centre moved by (%.2f, %.2f) nm", dy, dx, sy, sx)

    def check_plan(self) -> PlanCheck:
        """The plan check with a fresh test on this procedure's instrument (the Start check)."""
        self.test = measure_instrument(self.plan, self.stem_controller, self.scan_source, channel=self.channel)
        self.check = check_plan(self.plan, test=self.test)
        return self.check

    # --- the run ---
    def run(self) -> str:
        """Acquire the whole series; returns the session status (``complete``, ``aborted`` or ``failed``).

        Raises
        ------
        PlanError
            The plan is refused on this instrument (no stage controls, beyond its limits, ...): nothing moved,
            nothing recorded.
        """
        state, check = self.take_instrument()
        test = self.test
        assert test is not None
        start_tilt = self._read_tilt_deg()
        current = self.plan.beam_current_pA if self.plan.beam_current_pA is not None else (
            test.beam_current_pA or DEFAULT_BEAM_CURRENT_PA)
        self.stream.settings["nion"] = test.metadata
        self.stream.settings["beam_current_pA"] = current
        self.stream.settings["estimated_duration_s"] = check.duration_s
        self.stream.settings["start_tilt_deg"] = list(start_tilt)
        self.stream.start()
        clock = ProgressClock(check.duration_s)
        frame_dose = dose_per_scan_e_per_A2(current, self.plan.dwell_us, self.plan.pixel_size_nm)
        dose = 0.0
        tilts = self.plan.ordered_tilts()
        n, m = len(tilts), self.plan.frames_per_tilt
        frame_parameters = self.scan_parameters(self.plan.size_px, self.plan.dwell_us, self.plan.fov_nm)
        previous_sum: np.ndarray | None = None

        def finish(status: str, message: str) -> None:
            self._return_stage(start_tilt)  # every ending: the stage back at the tilt it was found at
            state.restore()  # scan settings and channels, probe, the user's live scan
            self.released_at = time.perf_counter()
            self.stream.end(status, message)
            self.report(Progress(status, n, n, m, m, clock.elapsed(), 0.0, dose, message))

        with self.outcome("tilt series", finish):
            for step, (tilt_index, alpha, beta) in enumerate(tilts, start=1):
                clock.paused_s += self.control.checkpoint()
                self.report(Progress("moving stage", step, n, 0, m, clock.elapsed(),
                                      clock.remaining((step - 1) / n), dose, f"alpha {alpha:g}, beta {beta:g} deg"))
                alpha_rb, beta_rb = self._move_stage(alpha, beta)
                self.readback_deg.append((alpha_rb, beta_rb))
                if self.plan.tracking and previous_sum is not None:
                    self._track(previous_sum, frame_parameters)
                    dose += frame_dose
                tilt_sum = None
                for frame_index in range(m):
                    clock.paused_s += self.control.checkpoint()
                    image, t = self.scan(frame_parameters)
                    dose += frame_dose
                    # the angles the stage reports after the move, not the plan's (those are in the settings)
                    self.stream.frame(
                        image, t=t, tilt_index=tilt_index, alpha_deg=alpha_rb, beta_deg=beta_rb,
                        frame_index=frame_index, pixel_size_nm=self.plan.pixel_size_nm, dwell_us=self.plan.dwell_us,
                    )
                    tilt_sum = image.astype(np.float64) if tilt_sum is None else tilt_sum + image
                    fraction = ((step - 1) * m + frame_index + 1) / (n * m)
                    self.report(Progress("acquiring", step, n, frame_index + 1, m, clock.elapsed(),
                                          clock.remaining(fraction), dose))
                previous_sum = tilt_sum
        return self.status

    def _return_stage(self, tilt_deg: tuple[float, float]) -> None:
        try:
            self._move_stage(*tilt_deg)
            log.info("stage returned to the starting tilt (%.2f, %.2f) deg", *tilt_deg)
        except Exception:
            log.exception("could not return the stage to the starting tilt %s", tilt_deg)


def save_plan(plan: TiltSeriesPlan, path: str | Path) -> None:
    """Write the tilt table of a plan as CSV."""
    Path(path).write_text(write_tilts_csv(plan.tilts_deg))
