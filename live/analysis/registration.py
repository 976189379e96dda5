"""Sub-pixel registration of two STEM images (translation): :func:`register_translation`, :class:`Registrator`.

Pure functions over numpy arrays (numpy + scipy only); see docs/drift-correction.md.

Convention (contract)
---------------------
A drift or shift ``(dy, dx)`` is in pixels: a feature at ``(y, x)`` in the reference (first) frame is at
``(y + dy, x + dx)`` in the moving frame.  This is the *opposite* sign of
``skimage.registration.phase_cross_correlation``, which returns the shift that moves ``moving`` back onto
``reference``.

Method: mean-subtracted, Hann-windowed images; plain (un-normalised) cross-correlation computed with float32 real
FFTs, the reference spectrum cached; integer peak chosen among the near-equal lattice peaks by interpolated height
(optionally only near an expected shift); the sub-pixel maximum of the band-limited (trigonometric) interpolant of
the correlation found by Newton iterations whose gradient and Hessian are exact DFT sums over the strongest
reference frequencies, so no upsampling grid is needed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import scipy.fft
import scipy.signal

__all__ = ["Registration", "Registrator", "apodization_window", "check_image", "register_translation"]



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


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got an array with shape {image.shape}")
    if image.shape[0] < 4 or image.shape[1] < 4:
        raise ValueError(f"{name} must be at least 4x4 pixels, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {image.dtype}")
    return image


@functools.lru_cache(maxsize=16)
def apodization_window(shape: tuple[int, int], name: str | None, dtype: str) -> np.ndarray:
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
        reference = check_image(reference, "reference")
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
        self._window = apodization_window(self.shape, window, np.dtype(dtype).str)
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
        moving = check_image(moving, "moving")
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
    reference = check_image(reference, "reference")
    moving = check_image(moving, "moving")
    if reference.shape != moving.shape:
        raise ValueError(f"reference and moving must have the same shape, got {reference.shape} and {moving.shape}")
    reg = Registrator(reference, window=window, refine=refine, upsample=upsample, workers=workers)
    return reg.shift(moving, expected=expected, max_shift=max_shift)


