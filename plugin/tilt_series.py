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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.analysis.drift import register_translation

from .acquisition import (
    PlanCheck,
    PlanError,
    Procedure,
    Progress,
    ProgressClock,
    check_disk_space,
    dose_per_scan_e_per_A2,
    instrument_sleep,
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
    beam_current_pA: float = 17.0
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


def check_plan(plan: TiltSeriesPlan) -> PlanCheck:
    """Time, dose and disk estimate of a plan and every reason it cannot run."""
    n_tilts = len(plan.tilts_deg)
    n_scans = n_tilts * (plan.frames_per_tilt + (1 if plan.tracking else 0))
    duration = n_tilts * (plan.settle_s + plan.frames_per_tilt * plan.frame_time_s())
    if plan.tracking:
        duration += n_tilts * plan.frame_time_s()
    dose = n_scans * dose_per_scan_e_per_A2(plan.beam_current_pA, plan.dwell_us, plan.pixel_size_nm)
    nbytes = n_tilts * plan.frames_per_tilt * plan.size_px**2 * 4
    check = PlanCheck(duration_s=duration, dose_e_per_A2=dose, bytes_on_disk=nbytes)
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
    for i, (alpha, beta) in enumerate(plan.tilts_deg):
        lo, hi = plan.alpha_limits_deg
        if not lo <= alpha <= hi:
            check.problems.append(f"tilt {i + 1}: alpha {alpha:g} deg is outside the stage limits {lo:g}..{hi:g} deg")
        lo, hi = plan.beta_limits_deg
        if not lo <= beta <= hi:
            check.problems.append(f"tilt {i + 1}: beta {beta:g} deg is outside the stage limits {lo:g}..{hi:g} deg")
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

    # --- stage ---
    def _read_tilt_deg(self) -> tuple[float, float]:
        ok_a, a = self.stem_controller.TryGetVal(STAGE_ALPHA)
        ok_b, b = self.stem_controller.TryGetVal(STAGE_BETA)
        if not (ok_a and ok_b):
            raise RuntimeError(f"the instrument has no {STAGE_ALPHA}/{STAGE_BETA} stage controls")
        return math.degrees(a), math.degrees(b)

    def _move_stage(self, alpha_deg: float, beta_deg: float) -> None:
        for control, value in ((STAGE_ALPHA, alpha_deg), (STAGE_BETA, beta_deg)):
            ok = self.stem_controller.SetValAndConfirm(
                control, math.radians(value), self.plan.confirm_tolerance, int(self.plan.confirm_timeout_s * 1000)
            )
            if not ok:
                raise RuntimeError(
                    f"stage did not confirm {control} = {value:g} deg within {self.plan.confirm_timeout_s:g} s"
                )
        instrument_sleep(self.stem_controller, self.plan.settle_s)  # mechanical settling after the encoder confirms

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

    # --- the run ---
    def run(self) -> str:
        """Acquire the whole series; returns the session status (``complete``, ``aborted`` or ``failed``)."""
        check = check_plan(self.plan)
        check.raise_if_refused()
        start_tilt = self._read_tilt_deg()
        self.stream.start()
        clock = ProgressClock(check.duration_s)
        frame_dose = dose_per_scan_e_per_A2(self.plan.beam_current_pA, self.plan.dwell_us, self.plan.pixel_size_nm)
        dose = 0.0
        tilts = self.plan.ordered_tilts()
        n, m = len(tilts), self.plan.frames_per_tilt
        frame_parameters = self.scan_parameters(self.plan.size_px, self.plan.dwell_us, self.plan.fov_nm)
        previous_sum: np.ndarray | None = None

        def finish(status: str, message: str) -> None:
            if status != "complete":
                self._return_stage(start_tilt)
            self.stream.end(status, message)
            self.report(Progress(status, n, n, m, m, clock.elapsed(), 0.0, dose, message))

        with self.outcome("tilt series", finish):
            for step, (tilt_index, alpha, beta) in enumerate(tilts, start=1):
                clock.paused_s += self.control.checkpoint()
                self.report(Progress("moving stage", step, n, 0, m, clock.elapsed(),
                                      clock.remaining((step - 1) / n), dose, f"alpha {alpha:g}, beta {beta:g} deg"))
                self._move_stage(alpha, beta)
                if self.plan.tracking and previous_sum is not None:
                    self._track(previous_sum, frame_parameters)
                    dose += frame_dose
                tilt_sum = None
                for frame_index in range(m):
                    clock.paused_s += self.control.checkpoint()
                    image, t = self.scan(frame_parameters)
                    dose += frame_dose
                    self.stream.frame(
                        image, t=t, tilt_index=tilt_index, alpha_deg=alpha, beta_deg=beta, frame_index=frame_index,
                        pixel_size_nm=self.plan.pixel_size_nm, dwell_us=self.plan.dwell_us,
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
