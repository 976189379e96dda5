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

from stemlive.live.analysis.drift import register_translation

from .acquisition import (
    PlanCheck,
    Procedure,
    Progress,
    ProgressClock,
    check_disk_space,
)

log = logging.getLogger(__name__)


DEFAULT_SATURATION_COUNTS = 65535.0  # a 16-bit readout, when neither the plan nor the camera says otherwise


def camera_saturation_counts(camera_source: Any) -> float | None:
    """The saturation level a camera device reports (attribute ``saturation_counts``), if it reports one."""
    device = getattr(camera_source, "camera", None)
    value = getattr(device, "saturation_counts", None)
    return float(value) if value is not None else None


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
    saturation_counts: float | None = None  # None: what the camera reports, else 16 bit (65535)
    readout_overhead_ms: float = 1.0
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


def check_plan(
    plan: EELSScanPlan, *, fov_nm: float, n_channels: int = 2048, zlp_counts_per_ms: float | None = None
) -> PlanCheck:
    """Time, disk and zero-loss saturation check of a plan, with every reason it cannot run.

    Parameters
    ----------
    zlp_counts_per_ms
        Peak zero-loss counts per ms in the brightest channel, from a short test exposure; ``None`` skips the
        saturation check (noted).
    """
    n_points = len(plan.positions_fractional(fov_nm)) if plan.mode in ("line", "map") else 0
    n_spectra = n_points * plan.frames_per_point
    duration = n_spectra * (plan.exposure_ms + plan.readout_overhead_ms) * 1e-3
    survey_s = plan.survey_size_px**2 * plan.survey_dwell_us * 1e-6 * 1.1
    duration += survey_s * (int(plan.survey_before) + int(plan.survey_after))
    nbytes = n_spectra * n_channels * 4
    check = PlanCheck(duration_s=duration, dose_e_per_A2=0.0, bytes_on_disk=nbytes)
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
    saturation = plan.saturation_counts if plan.saturation_counts is not None else DEFAULT_SATURATION_COUNTS
    if zlp_counts_per_ms is None:
        check.notes.append("zero-loss saturation not checked (no test exposure)")
    else:
        peak = zlp_counts_per_ms * plan.exposure_ms
        if peak >= saturation:
            safe_ms = 0.8 * saturation / zlp_counts_per_ms
            check.problems.append(
                f"the zero-loss peak would saturate: about {peak:.3g} counts per channel in {plan.exposure_ms:g} ms "
                f"(saturation {saturation:.3g}); use at most {safe_ms:.3g} ms per frame"
            )
        elif peak >= 0.8 * saturation:
            check.notes.append(f"zero-loss peak at {100 * peak / saturation:.0f}% of saturation")
    check_disk_space(plan.session_dir, nbytes, check)
    return check


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

    def _survey(self) -> tuple[np.ndarray, float]:
        plan = self.plan
        return self.scan(self.scan_parameters(plan.survey_size_px, plan.survey_dwell_us, plan.survey_fov_nm))

    def _camera_parameters(self) -> Any:
        fp = self.camera_source.get_current_frame_parameters()
        fp.exposure_ms = self.plan.exposure_ms
        fp.processing = None  # sum_project trips an assertion in device_kit 23.6; sum rows here instead
        return fp

    def _spectra(self, n: int) -> tuple[np.ndarray, float, float]:
        """``n`` spectra at the parked probe: ``(spectra (n, channels), energy_offset_meV, dispersion_meV)``."""
        self.camera_source.grab_sequence_prepare(n)
        xdatas = self.camera_source.grab_sequence(n)
        if not xdatas or xdatas[0] is None:
            raise RuntimeError("the EELS camera returned no data")
        xdata = xdatas[0]
        data = np.asarray(xdata.data, dtype=np.float32)
        spectra = data.sum(axis=1) if data.ndim == 3 else data.reshape(n, -1)
        energy = xdata.dimensional_calibrations[-1]
        return spectra, float(energy.offset) * 1e3, float(energy.scale) * 1e3

    def zlp_counts_per_ms(self, test_exposure_ms: float = 1.0) -> float:
        """Peak counts per ms at the current probe position from one short test exposure."""
        fp = self._camera_parameters()
        fp.exposure_ms = test_exposure_ms
        self.camera_source.set_current_frame_parameters(fp)
        spectra, _, _ = self._spectra(1)
        return float(spectra.max()) / test_exposure_ms

    def _track(self, reference: np.ndarray, region: tuple[slice, slice]) -> None:
        view, _ = self._survey()
        (dy, dx), _q = register_translation(reference, view[region])
        self.drift_correction_frac = np.array([dy, dx]) / np.array(view.shape)
        log.info("drift tracking: reference region moved by (%.2f, %.2f) px", dy, dx)

    def run(self) -> str:
        """Acquire the scan; returns the session status."""
        from nion.utils import Geometry

        plan = self.plan
        # The saturation test exposure is taken where the scan starts; a refused plan puts the probe back.
        if plan.saturation_counts is None:
            plan.saturation_counts = camera_saturation_counts(self.camera_source)
        previous_probe = self.stem_controller.probe_position
        self.stem_controller.probe_position = Geometry.FloatPoint(*plan.start)
        check = check_plan(plan, fov_nm=plan.survey_fov_nm, zlp_counts_per_ms=self.zlp_counts_per_ms())
        if not check.ok:
            self.stem_controller.probe_position = previous_probe
            check.raise_if_refused()
        self.camera_source.set_current_frame_parameters(self._camera_parameters())
        fractions = plan.positions_fractional(plan.survey_fov_nm)
        n, m = len(fractions), plan.frames_per_point
        clock = ProgressClock(check.duration_s)
        region = self._region_slices()
        reference: np.ndarray | None = None

        def finish(status: str, message: str) -> None:
            if self.stream.started:
                self.stream.end(status, message)
            self.report(Progress(status, n, n, m, m, clock.elapsed(), 0.0, 0.0, message))

        with self.outcome("EELS scan", finish):
            survey, t_survey = self._survey()
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
                fy, fx = np.clip(frac + self.drift_correction_frac, 0.0, 1.0)
                self.stem_controller.probe_position = Geometry.FloatPoint(float(fy), float(fx))
                for first in range(0, m, plan.batch):
                    clock.paused_s += self.control.checkpoint()
                    k = min(plan.batch, m - first)
                    t0 = time.time()
                    spectra, offset_meV, dispersion_meV = self._spectra(k)
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
                                          clock.remaining(fraction), 0.0))
            if plan.survey_after:
                after, t_after = self._survey()
                self.stream.survey(after, which="after", t=t_after,
                                   pixel_size_nm=plan.survey_fov_nm / after.shape[1])
        return self.status

    def _region_slices(self) -> tuple[slice, slice]:
        y0, x0, h, w = self.plan.tracking_region
        s = self.plan.survey_size_px
        return slice(int(y0 * s), int((y0 + h) * s)), slice(int(x0 * s), int((x0 + w) * s))

