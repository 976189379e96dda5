"""Drift measurement and correction for fast STEM frame series (tilt series).

Pure functions over numpy arrays (numpy + scipy only).

Convention (contract)
---------------------
A drift or shift ``(dy, dx)`` is in pixels: a feature at ``(y, x)`` in the reference (first) frame is at
``(y + dy, x + dx)`` in the moving frame.  This is the *opposite* sign of
``skimage.registration.phase_cross_correlation``, which returns the shift that moves ``moving`` back onto
``reference``.

Method (see docs/drift-correction.md)
-------------------------------------
1. :func:`register_translation` / :class:`Registrator`: mean-subtracted, Hann-windowed images; plain
   (un-normalised) cross-correlation computed with float32 real FFTs, the reference spectrum cached; integer
   peak chosen among the near-equal lattice peaks by interpolated height (optionally only near an expected
   shift); the sub-pixel maximum of the band-limited (trigonometric) interpolant of the correlation found by
   Newton iterations whose gradient and Hessian are exact DFT sums over the strongest reference frequencies,
   so no upsampling grid is needed.
2. :func:`fit_drift_trajectory`: robust (Theil-Sen start, Tukey biweight IRLS) polynomial fit of shift
   against frame time, default linear.
3. :func:`correct_scan_distortion`: every scan row ``r`` is displaced by the drift at its acquisition time;
   the frame is resampled onto drift-corrected positions along the slow scan axis with
   :func:`scipy.ndimage.map_coordinates`.
4. :func:`align_and_sum` and the incremental :class:`TiltAccumulator`: register every frame to the first,
   fit the trajectory, correct each frame (translation + scan distortion) and sum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

__all__ = [
    "AlignResult",
    "DriftTrajectory",
    "Registration",
    "Registrator",
    "TiltAccumulator",
    "align_and_sum",
    "correct_scan_distortion",
    "fit_drift_trajectory",
    "line_time",
    "register_translation",
    "row_displacements",
    "sharpness",
]


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------


class Registration(NamedTuple):
    """Result of one registration (unpacks as ``shift, quality``).

    Attributes
    ----------
    shift : ndarray, shape (2,)
        ``(dy, dx)`` in pixels, contract convention: a feature at ``(y, x)`` in the reference is at
        ``(y + dy, x + dx)`` in the moving image.
    quality : float
        Normalised cross-correlation coefficient of the windowed images at the integer peak, in ``[-1, 1]``
        (1: identical up to the shift).
        Low values (e.g. < 0.1) flag frames that should not be trusted.
    """

    shift: np.ndarray
    quality: float


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got an array with shape {image.shape}")
    if image.shape[0] < 4 or image.shape[1] < 4:
        raise ValueError(f"{name} must be at least 4x4 pixels, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {image.dtype}")
    return image


@functools.lru_cache(maxsize=16)
def _window(shape: tuple[int, int], name: str | None, dtype: str) -> np.ndarray:
    if name is None or name == "none":
        w = np.ones(shape, dtype=dtype)
    else:
        wy = scipy.signal.get_window(name, shape[0], fftbins=False)
        wx = scipy.signal.get_window(name, shape[1], fftbins=False)
        w = np.outer(wy, wx).astype(dtype)
    w.setflags(write=False)
    return w


def _prepare(image: np.ndarray, window: np.ndarray, dtype: type, window_sum: float | None = None) -> np.ndarray:
    img: np.ndarray = np.asarray(image, dtype=dtype)
    # subtract the window-weighted mean so the window itself does not correlate (einsum: no threaded BLAS)
    if window_sum is None:
        window_sum = float(np.sum(window, dtype=np.float64))
    mean = np.einsum("ij,ij->", window, img) / window_sum
    out = img - np.asarray(mean, dtype=dtype)
    out *= window
    return out


def _rfft2(a: np.ndarray, workers: int) -> np.ndarray:
    """``scipy.fft.rfft2`` done as two 1-D passes, the second in place (same result, less memory traffic)."""
    return scipy.fft.fft(scipy.fft.rfft(a, axis=1, workers=workers), axis=0, overwrite_x=True, workers=workers)


def _irfft2(x: np.ndarray, nx: int, workers: int) -> np.ndarray:
    """``scipy.fft.irfft2`` as two 1-D passes in place; overwrites ``x``. ~1.5-2x faster at 2048x2048."""
    y = scipy.fft.ifft(x, axis=0, overwrite_x=True, workers=workers)
    return scipy.fft.irfft(y, n=nx, axis=1, overwrite_x=True, workers=workers)


def _frequency_set(power: np.ndarray, shape: tuple[int, int], n_max: int | None) -> tuple[np.ndarray, ...]:
    """The half-spectrum frequencies used for the sub-pixel refinement: the ``n_max`` strongest of ``power``.

    Returns flat indices, ``2 pi fy``, ``2 pi fx`` (cycles/px times 2 pi) and the Hermitian weights (2 for columns
    standing for a conjugate pair, 1 for the zero and Nyquist columns).
    """
    ny, nx = shape
    nkx = power.shape[1]
    wx = np.full(nkx, 2.0)
    wx[0] = 1.0
    if nx % 2 == 0:
        wx[-1] = 1.0
    flat = (power * wx).ravel()
    if n_max is None or n_max >= flat.size:
        idx = np.arange(flat.size)
    else:
        # threshold from a strided subsample (cheap), then all frequencies above it
        step = max(1, flat.size // 262144)
        sample = flat[::step]
        k = min(max(1, n_max // step), sample.size)
        thr = np.partition(sample, sample.size - k)[sample.size - k]
        idx = np.flatnonzero(flat >= thr)
        if idx.size > 2 * n_max:
            idx = idx[np.argpartition(flat[idx], idx.size - n_max)[idx.size - n_max :]]
    iy, ix = np.divmod(idx, nkx)
    fy = scipy.fft.fftfreq(ny)[iy]
    fx = ix / nx
    return idx, 2 * np.pi * fy, 2 * np.pi * fx, wx[ix]


def _subpixel_newton(
    xk: np.ndarray,
    freqs: tuple[np.ndarray, ...],
    start: np.ndarray,
    *,
    tol: float = 1e-4,
    max_iter: int = 10,
) -> tuple[np.ndarray, float]:
    """Maximise the trigonometric interpolant of the correlation from its spectrum ``xk`` at ``freqs``.

    ``c(p) = sum_k w_k Re(X_k exp(i (ky p_y + kx p_x)))``; gradient and Hessian are exact sums over the same
    frequencies. Returns the position and the correlation value there (times ny * nx).
    """
    _, ky, kx, w = freqs
    xw = xk.astype(np.complex128) * w
    p = np.asarray(start, dtype=np.float64).copy()
    value = np.nan
    for _ in range(max_iter):
        z = xw * np.exp(1j * (ky * p[0] + kx * p[1]))
        zr, zi = z.real, z.imag
        value = zr.sum()
        # plain sums, not BLAS dot products: threaded BLAS on tiny products is slow on a busy machine
        g = -np.array([(ky * zi).sum(), (kx * zi).sum()])
        kyr, kxr = ky * zr, kx * zr
        hyy, hxx, hxy = -(ky * kyr).sum(), -(kx * kxr).sum(), -(kx * kyr).sum()
        det = hyy * hxx - hxy**2
        if hyy < 0 and det > 0:  # negative definite: Newton step
            step = -np.array([hxx * g[0] - hxy * g[1], hyy * g[1] - hxy * g[0]]) / det
        else:  # not at a concave spot: small gradient-ascent step
            gn = np.hypot(*g)
            step = 0.1 * g / gn if gn > 0 else np.zeros(2)
        norm = np.hypot(*step)
        if norm > 0.5:
            step *= 0.5 / norm
        p += step
        if norm < tol:
            break
    return p, float(value)


def _upsampled_dft(xspec: np.ndarray, shape: tuple[int, int], start: np.ndarray, upsample: int) -> np.ndarray:
    """Guizar-Sicairos local upsampling: the correlation on a 1.5 px box around ``start`` at 1/upsample px."""
    ny, nx = shape
    nkx = xspec.shape[1]
    n_up = int(np.ceil(upsample * 1.5))
    offs = (np.arange(n_up) - n_up // 2) / upsample
    py = start[0] + offs
    px = start[1] + offs
    fy = scipy.fft.fftfreq(ny)
    fx = np.arange(nkx) / nx
    wx = np.full(nkx, 2.0)
    wx[0] = 1.0
    if nx % 2 == 0:
        wx[-1] = 1.0
    ey = np.exp(2j * np.pi * np.outer(py, fy)).astype(xspec.dtype)
    ex = (wx * np.exp(2j * np.pi * np.outer(px, fx))).astype(xspec.dtype)
    c = ((ey @ xspec) @ ex.T).real
    iy, ix = np.unravel_index(np.argmax(c), c.shape)
    return np.array([py[iy], px[ix]])


def _best_peak(corr: np.ndarray, region: tuple[np.ndarray, np.ndarray] | None, tolerance: float) -> tuple[int, int]:
    """Integer position of the correlation peak with the highest *interpolated* height.

    On a lattice the correlation has a peak at every lattice vector, all nearly equally high (only the window
    and defects favour the true one), so the plain integer argmax picks a neighbour whenever it happens to be
    sampled closer to its centre. All local maxima within ``tolerance`` of the maximum are compared by the
    height of a separable Gaussian (log-parabola) through their 3x3 neighbourhood.
    """
    ny, nx = corr.shape
    if region is None:
        cmax = float(corr.max())
        cand = np.flatnonzero(corr >= cmax * (1 - tolerance)) if cmax > 0 else np.array([int(np.argmax(corr))])
        cy, cx = np.divmod(cand, nx)
    else:
        sub = corr[np.ix_(*region)]
        cmax = float(sub.max())
        if cmax > 0:
            jy, jx = np.nonzero(sub >= cmax * (1 - tolerance))
        else:
            jy, jx = np.unravel_index([int(np.argmax(sub))], sub.shape)
        cy, cx = region[0][jy], region[1][jx]
    if cy.size > 20000:  # keep the strongest pixels only
        keep = np.argpartition(corr[cy, cx], -20000)[-20000:]
        cy, cx = cy[keep], cx[keep]
    z = corr[cy, cx]
    ym, yp = corr[(cy - 1) % ny, cx], corr[(cy + 1) % ny, cx]
    xm, xp = corr[cy, (cx - 1) % nx], corr[cy, (cx + 1) % nx]
    d1 = corr[(cy - 1) % ny, (cx - 1) % nx], corr[(cy - 1) % ny, (cx + 1) % nx]
    d2 = corr[(cy + 1) % ny, (cx - 1) % nx], corr[(cy + 1) % ny, (cx + 1) % nx]
    is_max = (z >= ym) & (z >= yp) & (z >= xm) & (z >= xp) & (z >= d1[0]) & (z >= d1[1]) & (z >= d2[0]) & (z >= d2[1])
    if not np.any(is_max):
        k = int(np.argmax(z))
        return int(cy[k]), int(cx[k])
    cy, cx, z, ym, yp, xm, xp = (a[is_max] for a in (cy, cx, z, ym, yp, xm, xp))
    if cy.size == 1:
        return int(cy[0]), int(cx[0])
    tiny = np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        lz = np.log(np.maximum(z, tiny))
        gain = np.zeros(z.size)
        for lm, lp in (
            (np.log(np.maximum(ym, tiny)), np.log(np.maximum(yp, tiny))),
            (np.log(np.maximum(xm, tiny)), np.log(np.maximum(xp, tiny))),
        ):
            den = lm - 2 * lz + lp
            g = -((lm - lp) ** 2) / (8 * den)
            gain += np.where(den < 0, np.clip(g, 0, 0.5), 0.0)
    k = int(np.argmax(lz + gain))
    return int(cy[k]), int(cx[k])


def _parabola(c: np.ndarray, iy: int, ix: int) -> np.ndarray:
    """Separable 3-point parabola vertex around the integer peak (periodic indices)."""
    ny, nx = c.shape
    cy = c[[(iy - 1) % ny, iy, (iy + 1) % ny], ix]
    cx = c[iy, [(ix - 1) % nx, ix, (ix + 1) % nx]]
    out = np.zeros(2)
    for k, (m, z, p) in enumerate((cy, cx)):
        den = m - 2 * z + p
        out[k] = 0.5 * (m - p) / den if den < 0 else 0.0
    return np.clip(out, -0.5, 0.5)


class Registrator:
    """Register many frames to one reference; the reference spectrum and window are computed once.

    Parameters
    ----------
    reference : (ny, nx) array_like
        Reference image (e.g. the first frame of a tilt).
    window : str or None, optional
        Separable window applied after subtracting the weighted mean (any name accepted by
        :func:`scipy.signal.get_window`); ``None`` for no window. Default ``"hann"``.
    refine : {"newton", "upsampled", "parabola"}, optional
        Sub-pixel method. ``"newton"`` (default): maximum of the band-limited (trigonometric) interpolant of the
        correlation, by Newton iterations on exact DFT sums over the ``refine_frequencies`` strongest reference
        frequencies (no grid, converged to 1e-4 px). ``"upsampled"``: Guizar-Sicairos local DFT upsampling on a
        1.5 px box (precision ``1/upsample``; slower). ``"parabola"``: separable 3-point parabola on the integer
        correlation (fastest, ~2x less accurate).
    upsample : int, optional
        Upsampling factor for ``refine="upsampled"``. Default 100.
    workers : int, optional
        Threads for :mod:`scipy.fft` (``-1``: all cores). Default 1: on a busy 2-core machine one thread was faster
        than two (benchmarks/registration.py); ``-1`` can help for 2048x2048 on an idle machine.
    dtype : numpy dtype, optional
        Working precision of the FFTs, float32 (default) or float64.
    peak_tolerance : float, optional
        Integer correlation maxima within this fraction of the highest are compared by their interpolated height
        (a lattice has a near-equal peak at every lattice vector). Default 0.15.
    refine_frequencies : int or None, optional
        Number of half-spectrum frequencies (the strongest in the reference) used by ``refine="newton"``; ``None``
        for all. Restricting the sum is a real, even weighting of the cross-power spectrum, so it does not bias
        the peak; it drops noise-dominated frequencies and makes each iteration O(K). Default 4096.

    Examples
    --------
    >>> reg = Registrator(frames[0])
    >>> shift, quality = reg.shift(frames[1])
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        window: str | None = "hann",
        refine: str = "newton",
        upsample: int = 100,
        workers: int = 1,
        dtype: type = np.float32,
        peak_tolerance: float = 0.15,
        refine_frequencies: int | None = 4096,
    ) -> None:
        reference = _check_image(reference, "reference")
        if refine not in ("newton", "upsampled", "parabola"):
            raise ValueError(f"refine must be 'newton', 'upsampled' or 'parabola', got {refine!r}")
        if upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {upsample}")
        self.shape: tuple[int, int] = reference.shape
        self.refine = refine
        self.upsample = int(upsample)
        self.workers = workers
        self.peak_tolerance = float(peak_tolerance)
        self.dtype = np.dtype(dtype).type
        self._window = _window(self.shape, window, np.dtype(dtype).str)
        self._window_sum = float(np.sum(self._window, dtype=np.float64))
        ref = _prepare(reference, self._window, self.dtype, self._window_sum)
        self._ref_energy = float(np.einsum("ij,ij->", ref, ref))
        spec = _rfft2(ref, workers)
        self._ref_spec_conj = np.conj(spec)
        self._freqs = _frequency_set(np.abs(spec) ** 2, self.shape, refine_frequencies)

    def shift(
        self,
        moving: np.ndarray,
        *,
        expected: tuple[float, float] | np.ndarray | None = None,
        max_shift: float | None = None,
    ) -> Registration:
        """Shift of ``moving`` relative to the reference (contract convention).

        Parameters
        ----------
        moving : (ny, nx) array_like
            Image to register; same shape as the reference.
        expected : (dy, dx), optional
            Centre of the peak search, e.g. the shift predicted from the drift trajectory. Default (0, 0).
        max_shift : float, optional
            Only correlation peaks within this many pixels (per axis) of ``expected`` are considered. Use it to
            avoid whole-unit-cell jumps on periodic lattices at low dose. Default: the whole image.

        Returns
        -------
        Registration
            ``(shift, quality)``; see :class:`Registration`.
        """
        moving = _check_image(moving, "moving")
        if moving.shape != self.shape:
            raise ValueError(f"moving has shape {moving.shape} but the reference has shape {self.shape}")
        mov = _prepare(moving, self._window, self.dtype, self._window_sum)
        mov_energy = float(np.einsum("ij,ij->", mov, mov))
        xspec = _rfft2(mov, self.workers)
        xspec *= self._ref_spec_conj
        xk = xspec.ravel()[self._freqs[0]]  # copy: the inverse FFT below may overwrite xspec
        ny, nx = self.shape
        corr = _irfft2(xspec.copy() if self.refine == "upsampled" else xspec, nx, self.workers)

        if max_shift is None:
            iy, ix = _best_peak(corr, None, self.peak_tolerance)
        else:
            e = np.zeros(2) if expected is None else np.asarray(expected, dtype=float)
            m = int(np.ceil(max_shift))
            ry = np.arange(int(round(e[0])) - m, int(round(e[0])) + m + 1) % ny
            rx = np.arange(int(round(e[1])) - m, int(round(e[1])) + m + 1) % nx
            iy, ix = _best_peak(corr, (ry, rx), self.peak_tolerance)
        coarse = np.array([iy if iy <= ny // 2 else iy - ny, ix if ix <= nx // 2 else ix - nx], dtype=float)
        start = coarse + _parabola(corr, iy, ix)

        if self.refine == "parabola":
            shift = start
        elif self.refine == "upsampled":
            shift = _upsampled_dft(xspec, self.shape, coarse, self.upsample)
        else:
            shift, _ = _subpixel_newton(xk, self._freqs, start)
            if np.any(np.abs(shift - coarse) > 1.0):  # wandered off to another peak: keep the robust start
                shift = start
        denom = np.sqrt(self._ref_energy * mov_energy)
        quality = float(corr[iy, ix] / denom) if denom > 0 else 0.0
        return Registration(np.asarray(shift, dtype=float), quality)


def register_translation(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    upsample: int = 100,
    window: str | None = "hann",
    refine: str = "newton",
    expected: tuple[float, float] | np.ndarray | None = None,
    max_shift: float | None = None,
    workers: int = 1,
) -> Registration:
    """Sub-pixel translation of ``moving`` relative to ``reference``.

    Contract convention: a feature at ``(y, x)`` in ``reference`` is at ``(y + dy, x + dx)`` in ``moving``
    (the negative of :func:`skimage.registration.phase_cross_correlation`).

    Parameters
    ----------
    reference, moving : (ny, nx) array_like
        Real images of the same shape.
    upsample : int, optional
        Upsampling factor, used only with ``refine="upsampled"``. Default 100.
    window : str or None, optional
        Window name for :func:`scipy.signal.get_window` (separable), or ``None``. Default ``"hann"``.
    refine : {"newton", "upsampled", "parabola"}, optional
        Sub-pixel method, see :class:`Registrator`. Default ``"newton"``.
    expected : (dy, dx), optional
        Centre of the peak search. Default (0, 0).
    max_shift : float, optional
        Search radius (pixels per axis) around ``expected``. Default: the whole image.
    workers : int, optional
        Threads for :mod:`scipy.fft`. Default 1.

    Returns
    -------
    Registration
        Named tuple ``(shift, quality)``: ``shift`` is ``(dy, dx)`` in pixels, ``quality`` the normalised
        cross-correlation at the peak.

    Notes
    -----
    The cross-correlation is not phase-normalised: on noisy lattice images phase normalisation whitens the
    shot noise and degrades accuracy by one to two orders of magnitude (see docs/drift-correction.md). To
    register many frames to one reference use :class:`Registrator`, which caches the reference spectrum.
    """
    reference = _check_image(reference, "reference")
    moving = _check_image(moving, "moving")
    if reference.shape != moving.shape:
        raise ValueError(f"reference and moving must have the same shape, got {reference.shape} and {moving.shape}")
    reg = Registrator(reference, window=window, refine=refine, upsample=upsample, workers=workers)
    return reg.shift(moving, expected=expected, max_shift=max_shift)


# ----------------------------------------------------------------------------------------------------------------
# Trajectory
# ----------------------------------------------------------------------------------------------------------------

_MODELS = {"constant": 0, "linear": 1, "quadratic": 2}


@dataclass(frozen=True)
class DriftTrajectory:
    """Polynomial drift trajectory ``d(t) = sum_k coef[k] * (t - t0)**k`` (pixels, shape (2,) per time).

    Attributes
    ----------
    t0 : float
        Time origin of the polynomial (the first time given to the fit).
    coef : ndarray, shape (degree + 1, 2)
        Polynomial coefficients for ``(dy, dx)``; ``coef[1]`` is the velocity (px per time unit) for a linear fit.
    residuals : ndarray, shape (n, 2)
        Measured minus fitted shifts.
    inliers : ndarray of bool, shape (n,)
        Points kept by the robust fit (outliers, e.g. whole-unit-cell jumps, have zero weight).
    residual_rms : float
        RMS length of the residual vectors over the inliers (pixels).
    """

    t0: float
    coef: np.ndarray
    residuals: np.ndarray
    inliers: np.ndarray
    residual_rms: float

    @property
    def velocity(self) -> np.ndarray:
        """Drift rate ``(vy, vx)`` at ``t0`` in pixels per time unit (0 for a constant model)."""
        return self.coef[1].copy() if len(self.coef) > 1 else np.zeros(2)

    def __call__(self, t: float | np.ndarray) -> np.ndarray:
        """Fitted shift at time(s) ``t``: shape ``(2,)`` for a scalar, ``(n, 2)`` for an array."""
        tt = np.asarray(t, dtype=float) - self.t0
        powers = tt[..., None] ** np.arange(len(self.coef))
        return powers @ self.coef


def fit_drift_trajectory(
    times: np.ndarray,
    shifts: np.ndarray,
    *,
    model: str = "linear",
    robust: bool = True,
    min_scale: float = 0.02,
) -> DriftTrajectory:
    """Robust polynomial fit of measured shifts against time (or frame index).

    Parameters
    ----------
    times : (n,) array_like
        Time of each shift, e.g. frame centre times in seconds or frame indices.
    shifts : (n, 2) array_like
        Measured ``(dy, dx)`` in pixels.
    model : {"linear", "constant", "quadratic"}, optional
        Polynomial degree. Reduced automatically when there are too few points. Default ``"linear"``.
    robust : bool, optional
        Tukey-biweight iteratively reweighted least squares started from a Theil-Sen fit, so that isolated
        outliers (e.g. whole-unit-cell registration jumps) get zero weight. Default True.
    min_scale : float, optional
        Lower bound (pixels) on the robust noise scale, so near-perfect data does not flag tiny deviations as
        outliers. Default 0.02.

    Returns
    -------
    DriftTrajectory
    """
    t = np.asarray(times, dtype=float)
    s = np.asarray(shifts, dtype=float)
    if t.ndim != 1 or s.shape != (t.size, 2):
        raise ValueError(f"times must be (n,) and shifts (n, 2); got {t.shape} and {s.shape}")
    if t.size == 0:
        raise ValueError("need at least one shift to fit a trajectory")
    if model not in _MODELS:
        raise ValueError(f"model must be one of {sorted(_MODELS)}, got {model!r}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(s))):
        raise ValueError("times and shifts must be finite")
    degree = min(_MODELS[model], len(np.unique(t)) - 1)
    t0 = float(t[0])
    tt = t - t0
    a = tt[:, None] ** np.arange(degree + 1)
    w = np.ones(t.size)

    def wls(weights: np.ndarray) -> np.ndarray:
        sw = np.sqrt(weights)[:, None]
        return np.linalg.lstsq(a * sw, s * sw, rcond=None)[0]

    if degree == 1 and robust and t.size >= 3:  # Theil-Sen start: median pairwise slope
        i, j = np.triu_indices(t.size, 1)
        ok = tt[j] != tt[i]
        slopes = (s[j][ok] - s[i][ok]) / (tt[j][ok] - tt[i][ok])[:, None]
        slope = np.median(slopes, axis=0)
        coef = np.stack([np.median(s - slope * tt[:, None], axis=0), slope])
    elif degree == 0 and robust:
        coef = np.median(s, axis=0)[None, :]
    else:
        coef = wls(w)
    if robust and t.size > degree + 1:
        for _ in range(20):
            r = np.hypot(*(s - a @ coef).T)
            scale = max(1.4826 * np.median(r), min_scale)
            u = r / (4.685 * scale)
            w = np.where(u < 1, (1 - u**2) ** 2, 0.0)
            if np.count_nonzero(w) < degree + 1:
                w = np.ones(t.size)
                break
            new = wls(w)
            if np.allclose(new, coef, atol=1e-9):
                coef = new
                break
            coef = new
    coef = np.asarray(coef, dtype=float).reshape(degree + 1, 2)
    res = s - a @ coef
    inliers = w > 0
    rms = float(np.sqrt(np.mean(np.sum(res[inliers] ** 2, axis=1)))) if inliers.any() else float("nan")
    return DriftTrajectory(t0=t0, coef=coef, residuals=res, inliers=inliers, residual_rms=rms)


# ----------------------------------------------------------------------------------------------------------------
# Scan distortion
# ----------------------------------------------------------------------------------------------------------------


def line_time(nx: int, *, dwell_us: float | None = None, flyback_us: float = 0.0, ny: int | None = None) -> float:
    """Time per scan line in seconds: ``nx * dwell + flyback``.

    Without ``dwell_us`` the time unit is one frame: returns ``1 / ny`` (frames back to back).
    """
    if dwell_us is None:
        if ny is None:
            raise ValueError("give dwell_us, or ny to use one frame as the time unit")
        return 1.0 / ny
    return (nx * dwell_us + flyback_us) * 1e-6


def row_displacements(
    trajectory: DriftTrajectory | None,
    ny: int,
    *,
    t_start: float,
    line_time_s: float,
    shift: np.ndarray | None = None,
    reference_time: float | None = None,
) -> np.ndarray:
    """Displacement ``(dy, dx)`` of every scan row of one frame, shape ``(ny, 2)``.

    Row ``r`` is acquired at ``t_r = t_start + r * line_time_s``. With ``shift`` given (the measured shift of the
    frame, which belongs to its centre time ``t_c = t_start + (ny - 1) / 2 * line_time_s``) the rows are
    ``shift + d(t_r) - d(t_c)``: the measured translation plus the within-frame drift of the fitted trajectory.
    Without it they are ``d(t_r) - d(reference_time)``.
    """
    t_rows = t_start + np.arange(ny) * line_time_s
    if trajectory is None:
        base = np.zeros((ny, 2))
    else:
        base = trajectory(t_rows)
    if shift is not None:
        t_c = t_start + 0.5 * (ny - 1) * line_time_s
        ref = trajectory(t_c) if trajectory is not None else np.zeros(2)
        return base - ref + np.asarray(shift, dtype=float)
    if reference_time is None:
        raise ValueError("give shift or reference_time")
    ref = trajectory(reference_time) if trajectory is not None else np.zeros(2)
    return base - ref


@overload
def correct_scan_distortion(
    frame: np.ndarray,
    drift: np.ndarray | tuple[float, float],
    *,
    reference_row: float | None = ...,
    order: int = ...,
    cval: float = ...,
    return_valid: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def correct_scan_distortion(
    frame: np.ndarray,
    drift: np.ndarray | tuple[float, float],
    *,
    reference_row: float | None = ...,
    order: int = ...,
    cval: float = ...,
    return_valid: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def correct_scan_distortion(
    frame: np.ndarray,
    drift: np.ndarray | tuple[float, float],
    *,
    reference_row: float | None = ...,
    order: int = ...,
    cval: float = ...,
    return_valid: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...


def correct_scan_distortion(
    frame: np.ndarray,
    drift: np.ndarray | tuple[float, float],
    *,
    reference_row: float | None = None,
    order: int = 3,
    cval: float = np.nan,
    return_valid: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Resample a frame whose scan rows were displaced by drift onto the undistorted grid.

    Row ``r`` of ``frame`` shows the sample displaced by ``D_r = (dy_r, dx_r)``: a feature at true position
    ``(y, x)`` is recorded at ``(y + dy_r, x + dx_r)``. The output shows the feature at ``(y, x)``. For each output
    row ``y`` the source row ``r`` solves ``r - dy_r = y`` (monotonic for |d dy_r / dr| < 1) and the source column is
    ``x + dx_r``; the frame is sampled there with a separable cubic B-spline (the same values as
    :func:`scipy.ndimage.map_coordinates` with ``order=3, mode="nearest"``, about 5x faster).

    Parameters
    ----------
    frame : (ny, nx) array_like
        Raw frame, slow scan axis along axis 0.
    drift : (2,) or (ny, 2) array_like
        Either a drift rate ``(dy, dx)`` in pixels per scan row, giving ``D_r = rate * (r - reference_row)``, or
        the displacement of every row (e.g. from :func:`row_displacements`), which also carries a translation.
    reference_row : float, optional
        Row that stays in place for a rate; default the centre row ``(ny - 1) / 2``.
    order : int, optional
        Spline order: 1 or 3 (separable, fast); other orders go through :func:`scipy.ndimage.map_coordinates`.
        Default 3.
    cval : float, optional
        Value for output pixels whose source lies outside the frame. Default NaN.
    return_valid : bool, optional
        Also return the boolean mask of output pixels with a source inside the frame.

    Returns
    -------
    corrected : (ny, nx) ndarray of float
    valid : (ny, nx) ndarray of bool
        Only with ``return_valid=True``.
    """
    frame = _check_image(frame, "frame")
    ny, nx = frame.shape
    d = np.asarray(drift, dtype=float)
    rows = np.arange(ny, dtype=float)
    if d.shape == (2,):
        r0 = 0.5 * (ny - 1) if reference_row is None else float(reference_row)
        d = (rows - r0)[:, None] * d[None, :]
    elif d.shape != (ny, 2):
        raise ValueError(f"drift must have shape (2,) or ({ny}, 2), got {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("drift must be finite")
    y_true = rows - d[:, 0]  # true row position seen by each scan row
    steps = np.diff(y_true)
    if np.any(steps <= 0):
        raise ValueError("row displacements must change by less than 1 px per row (slow axis must stay monotonic)")
    # source row for every output row: invert y_true(r) (linear extrapolation beyond the ends)
    src_r = np.interp(rows, y_true, rows)
    lo, hi = rows < y_true[0], rows > y_true[-1]
    src_r[lo] = (rows[lo] - y_true[0]) / steps[0]
    src_r[hi] = ny - 1 + (rows[hi] - y_true[-1]) / steps[-1]
    src_dx = np.interp(src_r, rows, d[:, 1])
    data = frame if np.issubdtype(frame.dtype, np.floating) else frame.astype(np.float64)
    out = _resample_rows(data, src_r, src_dx, order)
    eps = 1e-6
    src_c = np.arange(nx, dtype=float)[None, :] + src_dx[:, None]
    valid = ((src_r >= -eps) & (src_r <= ny - 1 + eps))[:, None] & (src_c >= -eps) & (src_c <= nx - 1 + eps)
    out[~valid] = cval
    return (out, valid) if return_valid else out


def _taps(pos: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer base, tap offsets and weights ``(n, taps)`` of the spline kernel at 1-D fractional positions."""
    base = np.floor(pos)
    t = (pos - base)[:, None]
    if order == 1:
        offs = np.array([0, 1])
        w = np.hstack([1 - t, t])
    else:  # cubic B-spline
        offs = np.array([-1, 0, 1, 2])
        w = np.hstack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3]) / 6.0
    return base.astype(np.int64), offs, w


def _resample_rows(data: np.ndarray, src_r: np.ndarray, src_dx: np.ndarray, order: int) -> np.ndarray:
    """``out[y, x] = f(src_r[y], x + src_dx[y])`` for the spline interpolant ``f`` of ``data``.

    Same result as :func:`scipy.ndimage.map_coordinates` with ``mode="nearest"`` (up to float32 rounding), but
    separable: the source row depends on ``y`` only and the column offset is constant along a row, so one pass of
    whole-row copies along y and one along x (on the 2-D spline coefficients) replace the 16-tap 2-D evaluation.
    """
    ny, nx = data.shape
    if order not in (1, 3):
        coords = np.empty((2, ny, nx))
        coords[0] = src_r[:, None]
        coords[1] = np.arange(nx)[None, :] + src_dx[:, None]
        return scipy.ndimage.map_coordinates(data, coords, order=order, mode="nearest").astype(
            np.result_type(data.dtype, np.float32), copy=False
        )
    dtype = np.result_type(data.dtype, np.float32)
    coef = scipy.ndimage.spline_filter(data, order=3, output=dtype, mode="nearest") if order == 3 else data
    base, offs, w = _taps(src_r, order)
    w = w.astype(dtype)
    rows = np.zeros((ny, nx), dtype=dtype)
    for k, o in enumerate(offs):
        rows += w[:, k : k + 1] * coef[np.clip(base + o, 0, ny - 1)]
    base, offs, w = _taps(src_dx, order)
    w = w.astype(dtype)
    pad = int(np.max(np.abs(base))) + 3
    padded = np.pad(rows, ((0, 0), (pad, pad)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, nx, axis=1)  # (ny, 2 pad + 1, nx), no copy
    ar = np.arange(ny)
    out = np.zeros((ny, nx), dtype=dtype)
    for k, o in enumerate(offs):
        out += w[:, k : k + 1] * windows[ar, np.clip(pad + base + o, 0, 2 * pad)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Align and sum
# ----------------------------------------------------------------------------------------------------------------


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
        **registration: Any,
    ) -> None:
        first_frame = _check_image(first_frame, "first_frame")
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
        self._frames: list[np.ndarray] = [np.array(first_frame, dtype=np.float32)]
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
        frame = _check_image(frame, "frame")
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


# ----------------------------------------------------------------------------------------------------------------
# Sharpness
# ----------------------------------------------------------------------------------------------------------------


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
    image = _check_image(image, "image")
    ny, nx = image.shape
    w = _window(image.shape, "hann", np.dtype(np.float64).str)
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
