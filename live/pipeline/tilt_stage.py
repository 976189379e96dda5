"""The tilt-series stage: register every frame of a tilt to its first, fit the drift, undo scan distortion, sum.

It adapts :mod:`stemlive.live.analysis.drift` to the message stream: it keeps per-session state, decides when a tilt
is complete and emits :class:`~stemlive.live.pipeline.stage.Result` objects (the results table in
``docs/architecture.md``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from stemlive.live.analysis import drift
from stemlive.live.pipeline.frame_spill import SpillingFrameStore
from stemlive.live.pipeline.stage import Result, Stage, register_stage
from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)


def _scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def bin_preview(image: np.ndarray, max_size: int) -> np.ndarray:
    """Bin an image by an integer factor so that neither side exceeds ``max_size`` (for live previews)."""
    factor = int(np.ceil(max(image.shape) / max_size)) if max_size > 0 else 1
    if factor <= 1:
        return np.asarray(image, dtype=np.float32)
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3)).astype(np.float32)


@register_stage
class TiltSeriesStage(Stage):
    """Register every frame of a tilt to its first frame, fit the drift, undo scan distortion and sum.

    Frames of one tilt arrive consecutively; a frame with a new ``tilt_index`` closes the previous tilt.
    """

    name = "tilt_series"
    kinds = frozenset({"tilt_series"})
    defaults: ClassVar[dict[str, Any]] = {
        "correct_distortion": True,  # interpolate onto drift-corrected positions along the slow axis
        "model": "linear",  # drift trajectory within a tilt
        "search_radius_px": 2.0,  # once the trajectory is known, search this close to it (no unit-cell jumps)
        "flyback_us": 0.0,  # per-line flyback of the scan, for row timing
        "preview_px": 256,  # size of the published frame preview
        # after each tilt: fit the atomic columns of its sum and re-run the tilt-angle calibration over the tilts so
        # far (published, not stored; `stemlive tomo atoms` stores the final one). Off by default: a 512^2 column
        # fit takes ~20 s on 2 cores.
        "atom_columns": False,
        "probe_fwhm_A": 1.3,
        # frames of the open tilt held in memory for its final correction; the rest spill to an unlinked temporary
        # file in spill_dir (default: TMPDIR) and are read back one at a time; if that file fails, they stay in
        # memory with a frame_spill problem rather than the tilt being lost (docs/service.md, memory budget)
        "frame_budget_mib": 128,
        "spill_dir": None,
    }

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._acc: drift.TiltAccumulator | None = None
        self._store: SpillingFrameStore | None = None
        self._tilt_key: int | None = None
        self._tilt_row = -1
        self._frame_row = 0
        self._tilt_first_frame_row = 0
        self._drift: list[np.ndarray] = []
        self._sums: list[np.ndarray] = []
        self._alpha: list[float] = []
        self._beta: list[float] = []
        self._pixel_size_nm: float | None = None
        self._columns: list[Any] = []
        self._spill_failed = False  # then the frames of every later tilt are kept in memory (one problem, no retry)

    def process(self, msg: Message) -> Iterator[Result]:
        if msg.type != "frame" or msg.payload is None:
            return
        h = msg.header
        tilt_key = int(h["tilt_index"])
        if tilt_key != self._tilt_key or self._acc is None:
            yield from self._close_tilt()
            self._tilt_key = tilt_key
            self._tilt_row += 1
            self._tilt_first_frame_row = self._frame_row
            self._alpha.append(float(h["alpha_deg"]))
            self._beta.append(float(h["beta_deg"]))
            if h.get("pixel_size_nm") is not None:
                self._pixel_size_nm = float(h["pixel_size_nm"])  # the sums' calibration (Swift, exports)
            radius = self.params["search_radius_px"]
            spill_dir = self.params["spill_dir"]
            self._store = None if self._spill_failed else SpillingFrameStore(
                int(float(self.params["frame_budget_mib"]) * 2**20), None if spill_dir is None else str(spill_dir))
            self._acc = drift.TiltAccumulator(
                msg.payload,
                t_start_s=float(msg.t),
                dwell_us=float(h["dwell_us"]),
                flyback_us=float(self.params["flyback_us"]),
                model=str(self.params["model"]),
                correct_distortion=bool(self.params["correct_distortion"]),
                search_radius=None if radius is None else float(radius),
                preview=False,
                frames=self._store,
            )
            shift = np.zeros(2)
        else:
            shift = np.asarray(self._acc.add(msg.payload, t_start_s=float(msg.t)).shift, dtype=np.float64)
        yield from self._spill_problem()
        self._drift.append(shift)
        yield Result(self.name, "drift_px", shift, index=self._frame_row,
                     attrs={"tilt_index": tilt_key, "frame_index": int(h["frame_index"])})
        yield Result(self.name, "frame_preview", bin_preview(msg.payload, int(self.params["preview_px"])),
                     index=self._frame_row, store=False,
                     attrs={"tilt_index": tilt_key, "frame_index": int(h["frame_index"]),
                            "alpha_deg": float(h["alpha_deg"]), "beta_deg": float(h["beta_deg"])})
        self._frame_row += 1

    def _spill_problem(self) -> Iterator[Result]:
        """The one ``frame_spill`` problem of a session whose spill file failed (the store then kept the frames)."""
        store = self._store
        if store is None or store.spill_error is None or self._spill_failed:
            return
        self._spill_failed = True
        error, where = store.spill_error, store.spill_dir or tempfile.gettempdir()
        budget = self.params["frame_budget_mib"]
        yield Result(self.name, "problem", np.zeros(0), attrs={
            "result": "frame_spill", "severity": "failed",
            "reason": f"could not spill the open tilt's frames to {where} ({type(error).__name__}: {error}); "
                      f"they are kept in memory for the rest of the session, so tilt_series.frame_budget_mib="
                      f"{budget} no longer bounds the memory (no frame lost, results unaffected)"})

    def _close_tilt(self) -> Iterator[Result]:
        if self._acc is None:
            return
        try:
            result = self._acc.result()
        finally:
            self._acc = None
            if self._store is not None:
                self._store.close()
                self._store = None
        # The final fit may revise the live shifts of this tilt: keep the measured shifts of the final pass.
        first = self._tilt_first_frame_row
        for i, shift in enumerate(result.shifts):
            self._drift[first + i] = np.asarray(shift, dtype=np.float64)
        total = result.sum.astype(np.float32)
        self._sums.append(total)
        row = self._tilt_row
        attrs = {"tilt_index": self._tilt_key, "n_frames": int(len(result.shifts)),
                 "residual_rms_px": float(result.residual_rms)}
        if self._pixel_size_nm is not None:
            attrs["pixel_size_nm"] = self._pixel_size_nm
        yield Result(self.name, "sums", total, index=row, attrs=attrs)
        yield Result(self.name, "tilt_alpha_deg", _scalar(self._alpha[row]), index=row)
        yield Result(self.name, "tilt_beta_deg", _scalar(self._beta[row]), index=row)
        if self.params["atom_columns"]:
            yield from self._atom_update(total, row)

    def _atom_update(self, total: np.ndarray, row: int) -> Iterator[Result]:
        """Columns of the new tilt and the running calibration over all tilts so far (published only)."""
        from stemlive.live.analysis import atomic_tomography

        try:
            cols, cal = atomic_tomography.running_update(
                self._columns, self._sums, self._alpha, self._beta, 10.0 * (self._pixel_size_nm or 0.0),
                probe_fwhm_A=float(self.params["probe_fwhm_A"]))
        except (ValueError, np.linalg.LinAlgError) as e:
            yield Result(self.name, "problem", np.zeros(0), store=False,
                         attrs={"result": "atom_columns", "severity": "skipped", "reason": f"tilt {row}: {e}"})
            return
        table = np.column_stack([cols.position, cols.position_err, cols.is_metal]).astype(np.float32)
        yield Result(self.name, "atom_columns", table, index=row, store=False,
                     attrs={"columns": "row, col, row_err, col_err, is_metal (px)", "n_columns": len(cols),
                            "n_metal": int(cols.is_metal.sum())})
        if cal is not None:
            angles = np.column_stack([cal.alpha_deg, cal.beta_deg, cal.alpha_err_deg, cal.beta_err_deg])
            yield Result(self.name, "running_angles", angles, index=row, store=False,
                         attrs={"columns": "alpha, beta, alpha_err, beta_err (deg) per tilt so far",
                                "rms_px": float(cal.rms_px), "n_metals": int(len(cal.metals_A)),
                                "n_tilts": len(self._columns)})

    def finish(self, status: str) -> Iterator[Result]:
        yield from self._close_tilt()
        if not self._sums:
            return
        yield Result(self.name, "drift_px", np.array(self._drift, dtype=np.float64).reshape(-1, 2),
                     attrs={"convention": "feature at (y, x) in the tilt's first frame is at (y+dy, x+dx)"})
        yield Result(self.name, "sums", np.stack(self._sums).astype(np.float32),
                     attrs={} if self._pixel_size_nm is None else {"pixel_size_nm": self._pixel_size_nm})
        yield Result(self.name, "tilt_alpha_deg", np.array(self._alpha))
        yield Result(self.name, "tilt_beta_deg", np.array(self._beta))
