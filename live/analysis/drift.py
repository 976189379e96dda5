"""Drift correction of fast STEM frame series (tilt series): align and sum, and the sharpness of a sum.

Pure functions over numpy arrays (numpy + scipy only).

Shifts ``(dy, dx)`` follow the contract of :mod:`~stemlive.live.analysis.registration` (pixels; a feature at
``(y, x)`` in the first frame is at ``(y + dy, x + dx)`` in the moving frame).

Method (see docs/drift-correction.md)
-------------------------------------
1. :func:`~stemlive.live.analysis.registration.register_translation` /
   :class:`~stemlive.live.analysis.registration.Registrator`: sub-pixel registration to the first frame.
2. :func:`~stemlive.live.analysis.drift_trajectory.fit_drift_trajectory`: robust polynomial fit of shift against
   frame time, default linear.
3. :func:`~stemlive.live.analysis.scan_distortion.correct_scan_distortion`: every scan row is displaced by the
   drift at its acquisition time and resampled onto drift-corrected positions.
4. :func:`align_and_sum` and the incremental :class:`TiltAccumulator` (this module): register every frame to the
   first, fit the trajectory, correct each frame (translation + scan distortion) and sum; :func:`sharpness`
   scores the lattice contrast of a sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.fft
import scipy.ndimage

from stemlive.live.analysis.drift_trajectory import DriftTrajectory, fit_drift_trajectory
from stemlive.live.analysis.registration import Registration, Registrator, apodization_window, check_image
from stemlive.live.analysis.scan_distortion import correct_scan_distortion, line_time, row_displacements

__all__ = ["AlignResult", "FrameStore", "TiltAccumulator", "align_and_sum", "sharpness"]


class FrameStore(Protocol):
    """Where :class:`TiltAccumulator` keeps the frames of its tilt: a list, or a store that spills to disk
    (:class:`~stemlive.live.pipeline.frame_spill.SpillingFrameStore`); it must give back the same float32 arrays.
    """

    def append(self, frame: np.ndarray) -> None: ...

    def __getitem__(self, i: int) -> np.ndarray: ...

    def __len__(self) -> int: ...


@dataclass
class AlignResult:
    """Aligned sum of a frame series.

    Attributes
    ----------
    sum : (ny, nx) ndarray of float64
        Sum of the corrected frames on the grid of the first frame (undistorted about its centre row). Pixels
        seen by fewer frames are scaled to ``n`` frames (``sum = n * mean over the frames that cover them``).
    shifts : (n, 2) ndarray
        Measured shift of every frame relative to the first (contract convention, frame 0 is 0).
    fitted : (n, 2) ndarray
        Trajectory fit evaluated at the frame centre times, relative to frame 0 (fitted[0] is 0).
    residual : (n, 2) ndarray
        ``shifts - fitted``.
    residual_rms : float
        RMS residual of the trajectory fit over its inliers (pixels).
    trajectory : DriftTrajectory
        The fit, against frame centre times.
    quality : (n,) ndarray
        Registration quality (normalised correlation) of every frame; 1 for frame 0.
    used : (n, 2) ndarray
        Translation applied to every frame: the measured shift for inliers, the fitted one for outliers.
    coverage : (ny, nx) ndarray of int
        Number of frames contributing to every pixel.
    times : (n,) ndarray
        Frame centre times used for the fit.
    """

    sum: np.ndarray
    shifts: np.ndarray
    fitted: np.ndarray
    residual: np.ndarray
    residual_rms: float
    trajectory: DriftTrajectory
    quality: np.ndarray
    used: np.ndarray
    coverage: np.ndarray
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))


class TiltAccumulator:
    """Incremental drift correction of the frames of one tilt, one frame at a time as they arrive.

    Parameters
    ----------
    first_frame : (ny, nx) array_like
        Reference frame (frame 0 of the tilt).
    t_start_s : float, optional
        Start time of the first frame (time of its first row). Default 0.
    dwell_us, flyback_us : float, optional
        Pixel dwell time and per-line flyback time (microseconds). Without ``dwell_us`` the time unit is one
        frame, frames are assumed back to back and ``t_start_s`` of later frames defaults to their index.
    line_time_s : float, optional
        Time per scan line; overrides ``dwell_us``/``flyback_us``.
    model : str, optional
        Trajectory model for :func:`fit_drift_trajectory`. Default ``"linear"``.
    correct_distortion : bool, optional
        Remove scan distortion (within-frame drift) as well as translation. Default True.
    search_radius : float, optional
        Once two frames are known, only search the correlation peak within this many pixels of the shift
        predicted by the trajectory (guards against whole-unit-cell jumps). Default None (whole image).
    preview : bool, optional
        Keep a running corrected sum updated by :meth:`add` (one resampling per frame). Default True.
    order : int, optional
        Spline order of the resampling. Default 3.
    frames : FrameStore, optional
        Empty store for the float32 frames kept until :meth:`result` (every frame of the tilt). Default: a list in
        memory (``n * ny * nx * 4`` bytes); the service passes one that spills to disk above a budget.
    **registration
        Passed to :class:`Registrator` (``window``, ``refine``, ``upsample``, ``workers``).

    Examples
    --------
    >>> acc = TiltAccumulator(frames[0], dwell_us=4.0)
    >>> for i, f in enumerate(frames[1:], 1):
    ...     shift, quality = acc.add(f, t_start_s=t[i])
    >>> result = acc.result()
    """

    def __init__(
        self,
        first_frame: np.ndarray,
        *,
        t_start_s: float = 0.0,
        dwell_us: float | None = None,
        flyback_us: float = 0.0,
        line_time_s: float | None = None,
        model: str = "linear",
        correct_distortion: bool = True,
        search_radius: float | None = None,
        preview: bool = True,
        order: int = 3,
        frames: FrameStore | None = None,
        **registration: Any,
    ) -> None:
        first_frame = check_image(first_frame, "first_frame")
        ny, nx = first_frame.shape
        self.shape = (ny, nx)
        self.line_time_s = (
            float(line_time_s)
            if line_time_s is not None
            else line_time(nx, dwell_us=dwell_us, flyback_us=flyback_us, ny=ny)
        )
        self._frame_time = ny * self.line_time_s
        self.model = model
        self.correct_distortion = correct_distortion
        self.search_radius = search_radius
        self.order = order
        self._registrator = Registrator(first_frame, **registration)
        self._frames: FrameStore = [] if frames is None else frames
        if len(self._frames):
            raise ValueError("frames must be an empty store")
        self._frames.append(np.array(first_frame, dtype=np.float32))
        self._t_start: list[float] = [float(t_start_s)]
        self._shifts: list[np.ndarray] = [np.zeros(2)]
        self._quality: list[float] = [1.0]
        self._trajectory: DriftTrajectory | None = None
        self._preview = preview
        self._sum: np.ndarray | None = np.array(first_frame, dtype=np.float64) if preview else None
        self._count: np.ndarray | None = np.ones(self.shape, dtype=np.int32) if preview else None

    @property
    def n_frames(self) -> int:
        """Number of frames added so far (including the first)."""
        return len(self._frames)

    @property
    def shifts(self) -> np.ndarray:
        """Measured shifts so far, shape ``(n, 2)``."""
        return np.array(self._shifts)

    def _centre_times(self) -> np.ndarray:
        return np.array(self._t_start) + 0.5 * (self.shape[0] - 1) * self.line_time_s

    def add(self, frame: np.ndarray, *, t_start_s: float | None = None) -> Registration:
        """Register ``frame`` to the first frame, update the trajectory and the preview sum.

        Parameters
        ----------
        frame : (ny, nx) array_like
            Next frame of the tilt.
        t_start_s : float, optional
            Time of its first row; default: right after the previous frame.

        Returns
        -------
        Registration
            ``(shift, quality)`` of this frame relative to the first.
        """
        frame = check_image(frame, "frame")
        if frame.shape != self.shape:
            raise ValueError(f"frame has shape {frame.shape} but the first frame has shape {self.shape}")
        t = self._t_start[-1] + self._frame_time if t_start_s is None else float(t_start_s)
        tc = t + 0.5 * (self.shape[0] - 1) * self.line_time_s
        expected, radius = None, None
        if self._trajectory is not None and self.search_radius is not None:
            tc0 = self._centre_times()[0]
            expected = self._trajectory(tc) - self._trajectory(tc0)
            radius = self.search_radius
        reg = self._registrator.shift(frame, expected=expected, max_shift=radius)
        self._frames.append(np.array(frame, dtype=np.float32))
        self._t_start.append(t)
        self._shifts.append(reg.shift)
        self._quality.append(reg.quality)
        self._trajectory = fit_drift_trajectory(self._centre_times(), np.array(self._shifts), model=self.model)
        if self._preview:
            corrected, valid = self._correct(len(self._frames) - 1, self._trajectory, reg.shift)
            self._sum += np.where(valid, corrected, 0.0)
            self._count += valid
        return reg

    def _correct(self, i: int, trajectory: DriftTrajectory | None, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ny = self.shape[0]
        if self.correct_distortion:
            # measured translation + within-frame drift of the fit; frame 0 (shift 0) loses its own shear too,
            # so the output grid is frame 0 undistorted about its centre row
            d = row_displacements(trajectory, ny, t_start=self._t_start[i], line_time_s=self.line_time_s, shift=shift)
        else:
            d = np.broadcast_to(np.asarray(shift, dtype=float), (ny, 2))
        return correct_scan_distortion(self._frames[i], d, order=self.order, cval=0.0, return_valid=True)

    def preview(self) -> np.ndarray:
        """Running corrected sum (scaled to the number of frames added), cheap; see :meth:`result`."""
        if self._sum is None or self._count is None:
            raise RuntimeError("preview was disabled (preview=False)")
        return self._sum * (self.n_frames / np.maximum(self._count, 1))

    def result(self) -> AlignResult:
        """Final alignment: fit the trajectory to all shifts, correct every frame and sum."""
        times = self._centre_times()
        shifts = np.array(self._shifts)
        traj = fit_drift_trajectory(times, shifts, model=self.model)
        fitted = traj(times) - traj(times[0])
        used = np.where(traj.inliers[:, None], shifts, fitted)
        used[0] = 0.0
        total = np.zeros(self.shape)
        count = np.zeros(self.shape, dtype=np.int32)
        for i in range(self.n_frames):
            corrected, valid = self._correct(i, traj, used[i])
            total += np.where(valid, corrected, 0.0)
            count += valid
        n = self.n_frames
        summed = np.where(count > 0, total * n / np.maximum(count, 1), 0.0)
        return AlignResult(
            sum=summed,
            shifts=shifts,
            fitted=fitted,
            residual=shifts - fitted,
            residual_rms=traj.residual_rms,
            trajectory=traj,
            quality=np.array(self._quality),
            used=used,
            coverage=count,
            times=times,
        )


def align_and_sum(
    frames: np.ndarray,
    *,
    t_start_s: np.ndarray | None = None,
    dwell_us: float | None = None,
    flyback_us: float = 0.0,
    line_time_s: float | None = None,
    model: str = "linear",
    correct_distortion: bool = True,
    search_radius: float | None = None,
    order: int = 3,
    **registration: Any,
) -> AlignResult:
    """Register every frame to the first, fit the drift trajectory, correct each frame and sum.

    Parameters
    ----------
    frames : (n, ny, nx) array_like
        Frames of one tilt in acquisition order.
    t_start_s : (n,) array_like, optional
        Time of the first row of every frame. Default: frames back to back.
    dwell_us, flyback_us, line_time_s : float, optional
        Scan timing, see :class:`TiltAccumulator`. Without any, the time unit is one frame.
    model : str, optional
        Trajectory model. Default ``"linear"``.
    correct_distortion : bool, optional
        Also remove the scan distortion from the within-frame drift. Default True.
    search_radius : float, optional
        Peak search radius around the predicted shift, see :class:`TiltAccumulator`.
    order : int, optional
        Spline order of the resampling. Default 3.
    **registration
        Passed to :class:`Registrator`.

    Returns
    -------
    AlignResult
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be a (n, ny, nx) stack, got shape {frames.shape}")
    if frames.shape[0] < 1:
        raise ValueError("need at least one frame")
    n = frames.shape[0]
    if t_start_s is not None:
        t_start_s = np.asarray(t_start_s, dtype=float)
        if t_start_s.shape != (n,):
            raise ValueError(f"t_start_s must have shape ({n},), got {t_start_s.shape}")
    acc = TiltAccumulator(
        frames[0],
        t_start_s=0.0 if t_start_s is None else float(t_start_s[0]),
        dwell_us=dwell_us,
        flyback_us=flyback_us,
        line_time_s=line_time_s,
        model=model,
        correct_distortion=correct_distortion,
        search_radius=search_radius,
        preview=False,
        order=order,
        **registration,
    )
    for i in range(1, n):
        acc.add(frames[i], t_start_s=None if t_start_s is None else float(t_start_s[i]))
    return acc.result()




def sharpness(image: np.ndarray, lattice_period_px: float | None = None, *, n_peaks: int = 6) -> float:
    """Lattice contrast: mean amplitude of the strongest Fourier peaks relative to the mean intensity.

    The image is Hann-windowed; ``|F(k)|`` is taken at the ``n_peaks`` strongest local maxima of the spectrum
    with ``|k| >= k_min`` and divided by ``|F(0)|``. Misalignment of summed frames (or blur) damps the lattice
    reflections, so a better aligned sum scores higher. Independent of the intensity scale.

    Parameters
    ----------
    image : (ny, nx) array_like
    lattice_period_px : float, optional
        Lattice period in pixels; if given only frequencies ``|k| >= 0.7 / period`` count, otherwise
        ``|k| >= 4 / min(ny, nx)`` cycles/px.
    n_peaks : int, optional
        Number of peaks averaged. Default 6.

    Returns
    -------
    float
    """
    image = check_image(image, "image")
    ny, nx = image.shape
    w = apodization_window(image.shape, "hann", np.dtype(np.float64).str)
    f = np.abs(scipy.fft.rfft2(image * w))
    dc = f[0, 0]
    if dc <= 0:
        raise ValueError("sharpness needs an image with a positive mean")
    k = np.hypot(scipy.fft.fftfreq(ny)[:, None], scipy.fft.rfftfreq(nx)[None, :])
    kmin = 0.7 / lattice_period_px if lattice_period_px else 4.0 / min(ny, nx)
    f = np.where(k >= kmin, f, 0.0)
    peaks = (f == scipy.ndimage.maximum_filter(f, size=3, mode="wrap")) & (f > 0)
    vals = np.sort(f[peaks])[::-1][:n_peaks]
    return float(np.mean(vals) / dc) if vals.size else 0.0
