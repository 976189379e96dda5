"""Vibrational EELS analysis: energy-drift alignment, zero-loss-peak fit, detailed-balance thermometry.

All functions are pure and vectorised over spectra: ``spectra`` is ``(..., n_channels)`` and the energy
axis is uniform, ``energy_meV[j] = energy_offset_meV + j * dispersion_meV`` (one axis for all spectra or
one per spectrum, ``(..., n_channels)``).  See ``docs/eels-analysis.md`` for the equations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
import scipy.signal
import scipy.sparse
from numpy.typing import ArrayLike, NDArray

from ._threads import row_blocks, thread_map

__all__ = [
    "KB_MEV_PER_K",
    "ZLPFit",
    "TemperatureResult",
    "zlp_centre",
    "xcorr_shifts",
    "shift_spectra",
    "align_spectra",
    "sum_aligned",
    "pearson7_model",
    "fit_zlp_pearson7",
    "power_law_background",
    "log_ratio_bins",
    "temperature",
    "counting_limit_sigma_T",
    "lucy_richardson",
]

KB_MEV_PER_K = 8.617333262e-2
"""Boltzmann constant in meV / K."""

Array = NDArray[np.float64]


# ---------------------------------------------------------------------------------------------- axes
def _axis(energy_meV: ArrayLike, n: int, batch: tuple[int, ...]) -> tuple[Array, float]:
    """Per-spectrum offset (batch) and the common dispersion of a uniform energy axis."""
    e = np.asarray(energy_meV, float)
    if e.shape[-1] != n:
        raise ValueError(f"energy axis has {e.shape[-1]} channels, spectra have {n}")
    disp = float(np.mean(e[..., 1] - e[..., 0]))
    if not np.allclose(np.diff(e, axis=-1), disp, rtol=1e-6, atol=1e-9 * abs(disp)):
        raise ValueError("energy axis must be uniform")
    off = np.broadcast_to(e[..., 0], batch).astype(float)
    return off, disp


def _floating(a: ArrayLike) -> Array:
    """``a`` as an array of float32 or float64 (other dtypes are converted to float64; no copy otherwise).

    Typed as float64: the functions that take it only gather channels and convert them.
    """
    arr = np.asarray(a)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(float)  # type: ignore[return-value]


def _log_parabola(ym: Array, y0: Array, yp: Array) -> Array:
    """Sub-sample peak offset in [-0.5, 0.5] from three samples (Gaussian / log-parabolic)."""
    lm, l0, lp = (np.log(np.maximum(v, 1e-30)) for v in (ym, y0, yp))
    den = lm - 2 * l0 + lp
    safe = np.where(den < 0, den, -1.0)
    return np.where(den < 0, np.clip(0.5 * (lm - lp) / safe, -0.5, 0.5), 0.0)


def zlp_centre(
    energy_meV: ArrayLike, spectra: ArrayLike, *, half_width_meV: float = 25.0, workers: int | None = None
) -> Array:
    """Position (meV) of the zero-loss peak of each spectrum, to a small fraction of a channel.

    The spectrum is correlated with its own mirror image over ``+-half_width_meV`` around the maximum
    (the correlation of a symmetric peak with its mirror image peaks at twice its centre); the peak of
    the correlation is located with a log-parabola through three samples.  Blocks of spectra run on
    ``workers`` threads (default: one per CPU).

    Returns
    -------
    centre_meV
        Array of shape ``spectra.shape[:-1]``.
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    flat = s.reshape(-1, n)
    hw = max(3, int(round(half_width_meV / disp)))
    m = 2 * (2 * hw + 1)
    nfft = scipy.fft.next_fast_len(2 * m)
    centre_ch = np.empty(flat.shape[0])

    def centres(rows: slice) -> None:
        imax = np.argmax(flat[rows], axis=1)
        idx = np.clip(imax[:, None] + np.arange(-hw, hw + 1)[None, :], 0, n - 1)
        win = np.take_along_axis(flat[rows], idx, axis=1).astype(float)
        fw = scipy.fft.rfft(win, nfft, axis=1)
        xc = scipy.fft.irfft(fw * fw, nfft, axis=1)  # correlation with the mirror image = self-convolution
        j = np.clip(np.argmax(xc[:, :m], axis=1), 1, m - 2)
        ym, y0, yp = (np.take_along_axis(xc, (j + d)[:, None], axis=1)[:, 0] for d in (-1, 0, 1))
        twice = j + _log_parabola(ym, y0, yp)  # = 2 * centre within the window
        centre_ch[rows] = imax - hw + 0.5 * twice

    thread_map(centres, row_blocks(flat.shape[0], _ROWS), workers)
    return (off.reshape(-1) + disp * centre_ch).reshape(batch)


_ROWS = 1024
"""Spectra per block of the row-wise steps that run on parallel threads (alignment, spill-model samples,
log-ratio bins): their temporaries stay in cache."""


def _xcorr_lags(
    win: NDArray[np.floating[Any]],
    taper: NDArray[np.floating[Any]],
    fr: NDArray[np.complexfloating[Any, Any]],
    nfft: int,
    n_pass: int,
    workers: int = -1,
) -> Array:
    """Lags (channels) of windows ``win`` ``(k, m)`` against the reference spectrum ``fr`` (see xcorr_shifts).

    The FFTs run in the dtype of ``win`` (float32 in :func:`xcorr_shifts`); the lags are accumulated in float64.
    """
    m = win.shape[1]
    cdt = np.result_type(win.dtype, np.complex64)
    total = np.zeros(win.shape[0])
    base = win - win.min(axis=1, keepdims=True)
    base_f = None
    cur = base
    rows = np.arange(win.shape[0])
    for i_pass in range(n_pass):
        spec = scipy.fft.rfft(cur * taper, nfft, axis=1, workers=workers)
        xc = scipy.fft.irfft(spec * fr, nfft, axis=1, workers=workers)
        j = np.argmax(xc, axis=1)  # lag l sits at index l mod nfft
        ym, y0, yp = (xc[rows, (j + d) % nfft] for d in (-1, 0, 1))
        lag = np.where(j > nfft // 2, j - nfft, j) + _log_parabola(
            *(np.maximum(v.astype(float), 1e-30) for v in (ym, y0, yp))
        )
        total = total + lag
        if i_pass == n_pass - 1:
            break
        if base_f is None:
            base_f = scipy.fft.rfft(base, nfft, axis=1, workers=workers)
        # Fourier shift by the current estimate: phase factors z^f, z = exp(2 pi i total / nfft), by a running
        # product (rounding ~nfft 1e-16, one complex exp per spectrum instead of one per frequency)
        # (float32: the running product's rounding stays ~nfft 6e-8, ~1e-5 channel)
        shift = np.empty(base_f.shape, cdt)
        shift[:, 0] = 1.0
        shift[:, 1:] = np.exp(2j * np.pi * total / nfft).astype(cdt)[:, None]
        np.cumprod(shift, axis=1, out=shift)
        shift *= base_f
        cur = scipy.fft.irfft(shift, nfft, axis=1, workers=workers)[:, :m]
    return total


def xcorr_shifts(
    spectra: ArrayLike,
    reference: ArrayLike,
    *,
    dispersion_meV: float = 1.0,
    half_width_channels: int = 64,
    refine: int = 4,
    workers: int | None = None,
) -> Array:
    """Shift (meV) of each spectrum's zero-loss peak relative to ``reference`` by cross-correlation.

    FFT cross-correlation of a window of ``+-half_width_channels`` around the reference maximum, a
    log-parabola through the three samples at the correlation peak, and ``refine`` further passes on the
    windows shifted (Fourier) by the current estimate, which removes the interpolator's bias.
    A positive shift means the spectrum's peak sits at higher channel than the reference's.  Blocks of
    spectra run on ``workers`` threads (default: one per CPU).
    """
    s = np.asarray(spectra)
    batch, n = s.shape[:-1], s.shape[-1]
    flat = s.reshape(-1, n)  # only the window is converted (to float32)
    ref = np.asarray(reference, float)
    i0 = int(np.argmax(ref))
    hw = int(min(half_width_channels, i0, n - 1 - i0))
    sl = slice(i0 - hw, i0 + hw + 1)
    rw = ref[sl]
    m = sl.stop - sl.start
    nfft = scipy.fft.next_fast_len(2 * m, real=True)
    taper = np.hanning(m + 2)[1:-1]
    fr = np.conj(scipy.fft.rfft((rw - rw.min()) * taper, nfft)).astype(np.complex64)
    taper = taper.astype(np.float32)
    total = np.empty(flat.shape[0])

    def lags(rows: slice) -> None:
        # float32 windows and FFTs (counts are exact in float32; the shifts change by ~1e-5 channel)
        win = np.asarray(flat[rows, sl], np.float32)
        total[rows] = _xcorr_lags(win, taper, fr, nfft, 1 + max(0, int(refine)), workers=1)

    # blocks (temporaries stay in cache, no page faults) on parallel threads
    thread_map(lags, row_blocks(flat.shape[0], _ROWS), workers)
    return (total * dispersion_meV).reshape(batch)


def shift_spectra(spectra: ArrayLike, shift_channels: ArrayLike, *, method: str = "fourier") -> Array:
    """Move each spectrum by ``-shift_channels`` (so a feature at j + shift goes to j).

    ``method="fourier"``: exact band-limited shift of the spectrum minus the straight line joining its
    end points (no wrap-around ringing), the line shifted analytically; ``"linear"``: linear interpolation
    (edges held).
    """
    s = np.asarray(spectra, float)
    batch, n = s.shape[:-1], s.shape[-1]
    flat = s.reshape(-1, n)
    sh = np.broadcast_to(np.asarray(shift_channels, float), batch).reshape(-1)
    j = np.arange(n)
    if method == "linear":
        pos = np.clip(j[None, :] + sh[:, None], 0, n - 1)
        i = np.minimum(np.floor(pos).astype(np.intp), n - 2)
        f = pos - i
        a = np.take_along_axis(flat, i, axis=1)
        b = np.take_along_axis(flat, i + 1, axis=1)
        return (a + f * (b - a)).reshape(s.shape)
    if method != "fourier":
        raise ValueError(f"unknown shift method {method!r}")
    slope = (flat[:, -1] - flat[:, 0]) / (n - 1)
    line = flat[:, :1] + slope[:, None] * j[None, :]
    nfft = scipy.fft.next_fast_len(2 * n)
    resid = np.zeros((flat.shape[0], nfft))
    resid[:, :n] = flat - line
    freq = np.fft.rfftfreq(nfft)
    out = scipy.fft.irfft(
        scipy.fft.rfft(resid, axis=1) * np.exp(2j * np.pi * freq[None, :] * sh[:, None]), nfft, axis=1
    )[:, :n]
    out += line + slope[:, None] * sh[:, None]
    return out.reshape(s.shape)


def align_spectra(
    spectra: ArrayLike,
    *,
    dispersion_meV: float,
    method: str = "xcorr",
    reference: ArrayLike | None = None,
    shift_method: str = "fourier",
    half_width_channels: int = 64,
) -> tuple[Array, Array]:
    """Correct the energy drift: align every frame's zero-loss peak on a reference.

    Parameters
    ----------
    spectra
        ``(..., n_channels)`` frames.
    dispersion_meV
        meV per channel.
    method
        ``"xcorr"`` (cross-correlation with a reference, sub-channel) or ``"centre"`` (each frame's own
        ZLP centre from :func:`zlp_centre`, aligned on the reference's centre).
    reference
        Reference spectrum; default the sum of the frames after a whole-channel alignment on their maxima.
    shift_method
        Resampling used to apply the shifts (see :func:`shift_spectra`).

    Returns
    -------
    aligned
        Frames moved onto the reference's energy axis.
    shifts_meV
        ZLP position of each frame relative to the reference (a frame's ZLP sits ``shift`` higher).
    """
    s = np.asarray(spectra, float)
    batch, n = s.shape[:-1], s.shape[-1]
    flat = s.reshape(-1, n)
    if reference is None:
        imax = np.argmax(flat, axis=1)
        ref_i = int(np.median(imax))
        rolled = np.stack([np.roll(f, ref_i - i) for f, i in zip(flat, imax, strict=False)]) if len(flat) < 64 else None
        if rolled is None:
            idx = (np.arange(n)[None, :] - (ref_i - imax)[:, None]) % n
            rolled = np.take_along_axis(flat, idx, axis=1)
        reference = rolled.sum(axis=0)
    ref = np.asarray(reference, float)
    if method == "xcorr":
        sh = xcorr_shifts(flat, ref, dispersion_meV=1.0, half_width_channels=half_width_channels)
    elif method == "centre":
        ax = np.arange(n, dtype=float)
        sh = zlp_centre(ax, flat) - float(zlp_centre(ax, ref))
    else:
        raise ValueError(f"unknown alignment method {method!r}")
    aligned = shift_spectra(flat, sh, method=shift_method)
    return aligned.reshape(s.shape), (sh * dispersion_meV).reshape(batch)


def sum_aligned(
    spectra: ArrayLike,
    *,
    dispersion_meV: float,
    energy_offset_meV: ArrayLike = 0.0,
    method: str = "xcorr",
    shift_method: str = "fourier",
) -> tuple[Array, Array, Array]:
    """Align frames (``(..., n_frames, n_channels)``) and sum them per point on a common axis, ZLP at 0.

    Returns
    -------
    energy_meV
        ``(n_channels,)`` common energy axis, ``dispersion_meV * (j - j0)``: every sum has its zero-loss
        peak centre exactly at 0 meV (channel ``j0``, the median centre channel).
    summed
        ``(..., n_channels)`` summed counts.
    shifts_meV
        ``(..., n_frames)`` ZLP position of each frame on its nominal axis (``energy_offset_meV`` + j *
        dispersion).

    Notes
    -----
    Each point's frames are aligned on their own sum (:func:`align_spectra`), the sum's ZLP centre
    (:func:`zlp_centre`) is found and the sum is moved (``shift_method``) so that it sits at channel j0.
    ``energy_offset_meV`` may differ per frame (``(..., n_frames)``).
    """
    s = np.asarray(spectra, float)
    n = s.shape[-1]
    lead = s.shape[:-2]
    flat = s.reshape((-1,) + s.shape[-2:])
    off = np.broadcast_to(np.asarray(energy_offset_meV, float), s.shape[:-1]).reshape(flat.shape[:2])
    sums = np.empty((flat.shape[0], n))
    shifts = np.empty(flat.shape[:2])
    centre_ch = np.empty(flat.shape[0])
    ax = np.arange(n, dtype=float)
    for p in range(flat.shape[0]):
        frames = flat[p]
        known = (off[p] - off[p, 0]) / dispersion_meV
        if np.any(known != 0):
            frames = shift_spectra(frames, -known, method=shift_method)
        aligned, sh = align_spectra(frames, dispersion_meV=dispersion_meV, method=method, shift_method=shift_method)
        sums[p] = aligned.sum(axis=0)
        centre_ch[p] = float(zlp_centre(ax, sums[p]))
        shifts[p] = off[p, 0] + sh + dispersion_meV * centre_ch[p]
    j0 = float(np.round(np.median(centre_ch)))
    sums = shift_spectra(sums, centre_ch - j0, method=shift_method)
    energy = dispersion_meV * (ax - j0)
    return energy, sums.reshape(lead + (n,)), shifts.reshape(lead + s.shape[-2:-1])


# ---------------------------------------------------------------------------------------------- ZLP fit
PARAM_NAMES = ("amplitude", "centre_meV", "fwhm_meV", "m")


def pearson7_model(
    energy_meV: ArrayLike,
    params: ArrayLike,
    *,
    jacobian: bool = False,
) -> Array | tuple[Array, Array]:
    """Symmetric Pearson VII ``A (1 + 4 (2^(1/m) - 1) ((E - c) / w)^2)^(-m)`` (A = peak height, w = FWHM).

    ``params`` is ``(..., 4)`` = (A, c, w, m) and broadcasts against ``energy_meV`` ``(..., n)``.  With
    ``jacobian=True`` also returns the derivatives ``(..., n, 4)``.
    """
    p = np.asarray(params, float)
    a, c, w, m = (p[..., i, None] for i in range(4))
    d = np.asarray(energy_meV, float) - c
    cc = np.exp2(1.0 / m) - 1.0
    u = (d / w) ** 2
    q = 1.0 + 4.0 * cc * u
    lq = np.log(q)
    qm = np.exp(-m * lq)
    f = a * qm
    if not jacobian:
        return f
    g = a * m * qm / q * 8.0 * cc  # common factor of the c and w derivatives
    dcc_dm = -(cc + 1.0) * np.log(2.0) / m**2
    jac = np.stack([qm + 0 * d, g * d / w**2, g * u / w, f * (-lq - m * 4.0 * u * dcc_dm / q)], axis=-1)
    return f, jac


@dataclass
class ZLPFit:
    """Pearson VII fits of the zero-loss peak of many spectra.

    Attributes
    ----------
    params
        ``(..., 4)``: amplitude (counts per channel at the peak), centre_meV, fwhm_meV, m.
    cov
        ``(..., 4, 4)`` covariance (inverse of the weighted normal matrix, scaled by max(1, chi2_red) when
        ``scale_covariance``).
    chi2_red
        Reduced chi-square of the fit in the windows.
    n_iter
        Levenberg-Marquardt iterations used.
    windows_meV
        The |E - centre| windows fitted.
    signal
        The resolution-deconvolved phonon signal used to correct the fit windows for signal spilled into
        them (:class:`SignalModel`), or None (``signal_correction=0``).
    """

    params: Array
    cov: Array
    chi2_red: Array
    n_iter: int
    windows_meV: tuple[tuple[float, float], ...]
    signal: SignalModel | None = field(default=None, repr=False)

    @property
    def errors(self) -> Array:
        """One-sigma parameter errors ``(..., 4)``."""
        return np.sqrt(np.maximum(np.diagonal(self.cov, axis1=-2, axis2=-1), 0.0))

    def model(self, energy_meV: ArrayLike) -> Array:
        """The fitted ZLP on an energy axis (broadcast ``(..., n)``)."""
        return pearson7_model(energy_meV, self.params)  # type: ignore[return-value]


@dataclass
class SignalModel:
    """Resolution-deconvolved phonon signal of many spectra on a coarse axis relative to the ZLP centre.

    The deconvolution runs once per *group* of similar spectra (their amplitude-normalised mean); each
    spectrum's signal is its group's scaled by its own ZLP amplitude.

    Attributes
    ----------
    axis_meV
        ``(n,)`` symmetric coarse axis ``h * (j - J)`` (``h`` = ``coarse`` channels), 0 = ZLP centre.
    intrinsic
        ``(k, n)`` Lucy-Richardson estimate of each spectrum's signal before the resolution blur (counts per
        coarse sample), non-zero only in ``signal_range_meV`` (both sides).
    kernel_fft
        ``(g, nfft // 2 + 1)`` FFT of each group's unit-sum resolution function (the fitted ZLP shape).
    nfft
        FFT length of the (linear, not circular) convolutions.
    group
        ``(k,)`` group of each spectrum (row of ``kernel_fft`` / ``group_signal``).
    scale
        ``(k,)`` factor from the group's signal per unit ZLP amplitude to the spectrum's (its amplitude).
    group_signal
        ``(g, n)`` deconvolved signal per unit ZLP amplitude of each group.
    """

    axis_meV: Array
    intrinsic: Array
    kernel_fft: NDArray[np.complex128]
    nfft: int
    group: NDArray[np.intp] | None = None
    scale: Array | None = None
    group_signal: Array | None = None

    def _convolve(self, source: Array, kern: NDArray[np.complex128]) -> Array:
        n = self.axis_meV.size
        return scipy.fft.irfft(
            scipy.fft.rfft(source, self.nfft, axis=-1, workers=-1) * kern, self.nfft, axis=-1, workers=-1
        )[:, :n]

    def blur(self, source: Array) -> Array:
        """``source`` ``(k, n)`` on ``axis_meV`` (one row per spectrum) convolved with each one's resolution."""
        kern = self.kernel_fft
        if self.group is not None and len(kern) > 1:
            kern = kern[self.group]
        return self._convolve(source, kern)

    def blurred(self) -> Array:
        """``(k, n)`` each spectrum's deconvolved signal blurred again (one FFT pair per group, then scaled)."""
        if self.group_signal is None or self.group is None or self.scale is None:
            return self.blur(self.intrinsic)
        return self._convolve(self.group_signal, self.kernel_fft)[self.group] * self.scale[:, None]

    def sample(self, source_blurred: Array, e_meV: ArrayLike, rows: NDArray[np.intp] | None = None) -> Array:
        """Linear interpolation of ``(k, n)`` on ``axis_meV`` at relative energies ``e_meV`` ``(m,)`` or ``(k, m)``.

        With ``rows`` ``(k,)`` (and ``e_meV`` ``(k, m)``), row ``i`` of the result samples row ``rows[i]``
        of ``source_blurred`` (e.g. a per-group array sampled for every spectrum of the group).
        """
        ax = self.axis_meV
        h = ax[1] - ax[0]
        n = ax.size
        pos = (np.asarray(e_meV, float) - ax[0]) / h
        i = np.floor(pos)
        np.minimum(np.maximum(i, 0, out=i), n - 2, out=i)
        f = np.subtract(pos, i, out=pos)
        np.minimum(np.maximum(f, 0.0, out=f), 1.0, out=f)
        i = i.astype(np.intp)
        if pos.ndim == 1:
            return source_blurred[:, i] * (1 - f) + source_blurred[:, i + 1] * f
        if rows is not None:
            flat = source_blurred.reshape(-1)
            i += (rows * n)[:, None]
            a = flat[i].astype(float)
            b = flat[i + 1].astype(float)
        else:
            a = np.take_along_axis(source_blurred, i, axis=1)
            b = np.take_along_axis(source_blurred, i + 1, axis=1)
        return a + f * (b - a)


def _interp_uniform(flat: Array, pos0: Array, step: int, count: int) -> Array:
    """Linear interpolation of ``flat`` ``(k, n)`` at ``pos0[:, None] + step * arange(count)`` (integer step).

    One contiguous window per spectrum is copied (instead of a gather per point); positions off the axis
    fall back to :func:`_interp_channels`.
    """
    k, n = flat.shape
    base = np.floor(pos0).astype(np.intp)
    width = step * (count - 1) + 2
    if k == 0 or base.min() < 0 or base.max() + width > n:
        return _interp_channels(flat, pos0[:, None] + step * np.arange(count)[None, :])
    win = np.lib.stride_tricks.sliding_window_view(flat, width, axis=1)[np.arange(k), base]
    a = win[:, 0 : width - 1 : step].astype(float)
    b = win[:, 1:width:step].astype(float)
    b -= a
    b *= (pos0 - base)[:, None]
    b += a
    return b


def _interp_channels(flat: Array, pos: Array) -> Array:
    """Linear interpolation of ``flat`` ``(k, n)`` at fractional channel positions ``pos`` ``(k, m)``."""
    n = flat.shape[1]
    i = np.clip(np.floor(pos).astype(np.intp), 0, n - 2)
    f = np.clip(pos - i, 0.0, 1.0)
    a = np.take_along_axis(flat, i, axis=1).astype(float)
    b = np.take_along_axis(flat, i + 1, axis=1).astype(float)
    return a + f * (b - a)


def _groups(groups: int | ArrayLike | None, k: int) -> tuple[NDArray[np.intp], int]:
    """Group index ``(k,)`` and number of groups from a chunk size (consecutive spectra) or labels."""
    if groups is None:
        return np.arange(k), k
    if np.ndim(groups) == 0:
        size = max(1, int(groups))  # type: ignore[arg-type]
        return np.arange(k) // size, (k + size - 1) // size
    lab = np.asarray(groups).reshape(-1)
    if lab.size != k:
        raise ValueError(f"{lab.size} group labels for {k} spectra")
    _, inv = np.unique(lab, return_inverse=True)
    return inv.reshape(-1).astype(np.intp), int(inv.max()) + 1


def _similar_groups(features: Array, size: int) -> tuple[NDArray[np.intp], int]:
    """Groups of about ``size`` spectra with similar signal shape, independent of their order.

    The spectra are ranked by their scores on the first two principal components of ``features`` (the
    amplitude-normalised loss signal): cut into ``~sqrt(k / size)`` strata along the first, each stratum
    into chunks of ``size`` along the second.
    """
    k = len(features)
    f = features - features.mean(0)
    _, vec = np.linalg.eigh(f.T @ f)
    sc = f @ vec[:, -2:]
    n_groups = -(-k // size)
    n1 = max(1, int(round(np.sqrt(n_groups))))
    group = np.empty(k, np.intp)
    gid = 0
    for stratum in np.array_split(np.argsort(sc[:, 1], kind="stable"), n1):
        o = stratum[np.argsort(sc[stratum, 0], kind="stable")]
        for chunk in np.array_split(o, max(1, -(-len(o) // size))):
            group[chunk] = gid
            gid += 1
    return group, gid


def _group_sum(values: Array, group: NDArray[np.intp], n_groups: int) -> Array:
    """Sum of the rows of ``values`` ``(k, m)`` per group -> ``(n_groups, m)``."""
    k = len(group)
    if n_groups == k and np.array_equal(group, np.arange(k)):
        return values.copy()
    # one sparse (n_groups, k) indicator product: a single pass over values, no sorted copy
    indicator = scipy.sparse.csr_array((np.ones(k, values.dtype), (group, np.arange(k))), shape=(n_groups, k))
    return np.asarray(indicator @ values)


def signal_model(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    params: ArrayLike,
    *,
    signal_range_meV: tuple[float, float] = (40.0, 130.0),
    extent_meV: float = 210.0,
    coarse: int = 3,
    iterations: int = 30,
    groups: int | ArrayLike | None = 16,
) -> SignalModel:
    """Lucy-Richardson estimate of the unblurred phonon signal, with the fitted ZLP as resolution function.

    The ZLP model is subtracted, the remainder is averaged over ``coarse`` channels and sampled on an
    axis centred on the fitted ZLP (``+-extent_meV``); the signal source is restricted to
    ``signal_range_meV`` in ``|E|`` (both sides) and fitted to the data in the same range only (masked LR,
    normalised by the blurred mask), so that its blur *outside* the range predicts what the resolution
    tails spill into the ZLP-fit windows.  Used only for smooth, deterministic corrections (spill into
    the ZLP windows; the resolution offset of the detailed-balance log-ratio), never as the measured signal.

    The deconvolution is done once per group of similar spectra: the group's remainders are summed and
    divided by the summed ZLP amplitudes (signal per unit ZLP amplitude; the noise of one spectrum's LR
    estimate is irrelevant for the blurred predictions, so pooling costs nothing in accuracy), deconvolved
    with the group's mean resolution, and scaled back by each spectrum's amplitude.

    Parameters
    ----------
    energy_meV, spectra
        As for :func:`fit_zlp_pearson7`.
    params
        ``(..., 4)`` fitted Pearson VII parameters (amplitude, centre, FWHM, m).
    iterations
        LR iterations (30: the peaks are close to fully deconvolved; noise is irrelevant for the blurred
        predictions that use it).
    groups
        Group size: spectra are grouped by the shape of their signal (:func:`_similar_groups`, the first two
        principal components of the amplitude-normalised loss signal), about ``groups`` per group, whatever
        their order; or ``(k,)`` labels of the groups (e.g. the regions of a segmentation); ``None`` or 1:
        one deconvolution per spectrum.
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    return _signal_model(
        off.reshape(-1),
        disp,
        s.reshape(-1, n),
        np.asarray(params, float).reshape(-1, 4),
        signal_range_meV=signal_range_meV,
        extent_meV=extent_meV,
        coarse=coarse,
        iterations=iterations,
        groups=groups,
    )


def _signal_model(
    off: Array,
    disp: float,
    flat: Array,
    p: Array,
    *,
    signal_range_meV: tuple[float, float],
    extent_meV: float,
    coarse: int,
    iterations: int,
    groups: int | ArrayLike | None,
    workers: int | None = None,
) -> SignalModel:
    """:func:`signal_model` on ``(k, n)`` spectra with offsets ``(k,)`` and parameters ``(k, 4)``."""
    k = len(p)
    h = coarse * disp
    jn = int(np.ceil(extent_meV / h))
    ax = h * np.arange(-jn, jn + 1)
    c = p[:, 1]
    # coarse samples: mean of the data interpolated at c + e -+ (coarse - 1) disp / 2, minus the ZLP model
    pos0 = (c + ax[0] - off) / disp  # channel position of the first coarse sample; then +coarse each
    half = 0.5 * (coarse - 1)
    pz = p.copy()
    pz[:, 1] = 0.0
    lo, hi = signal_range_meV
    # only the samples in the signal range (both sides) are used: the LR source and data live there
    cols = np.flatnonzero((np.abs(ax) >= lo) & (np.abs(ax) <= hi))
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if cols.size else []
    obs = np.empty((k, cols.size))

    def observe(rows: slice) -> None:
        done = 0
        for run in runs:
            start, count = pos0[rows] + coarse * run[0], run.size
            if coarse > 1:
                data = _interp_uniform(flat[rows], start - half, coarse, count)
                data += _interp_uniform(flat[rows], start + half, coarse, count)
                data *= 0.5
            else:
                data = _interp_uniform(flat[rows], start, coarse, count)
            data -= _p7_f(np.broadcast_to(ax[run], data.shape), pz[rows])
            obs[rows, done : done + count] = data
            done += count

    thread_map(observe, row_blocks(k, _ROWS), workers)
    amp = np.maximum(p[:, 0], 1e-30)
    if np.ndim(groups) == 0 and groups is not None and 1 < int(groups) < k:  # type: ignore[arg-type]
        group, n_groups = _similar_groups(obs[:, ax[cols] > 0] / amp[:, None], int(groups))  # type: ignore[arg-type]
    else:
        group, n_groups = _groups(groups, k)
    cnt = np.maximum(_group_sum(np.ones((k, 1)), group, n_groups), 1.0)
    obs_g = np.zeros((n_groups, ax.size))
    obs_g[:, cols] = _group_sum(obs, group, n_groups) / np.maximum(_group_sum(amp[:, None], group, n_groups), 1e-30)
    shape_g = _group_sum(p[:, 2:], group, n_groups) / cnt
    mask = ((np.abs(ax) >= lo) & (np.abs(ax) <= hi)).astype(float)
    nfft = scipy.fft.next_fast_len(2 * ax.size)
    lag = np.arange(nfft)
    lag = np.where(lag < nfft // 2, lag, lag - nfft) * h
    kern = pearson7_model(lag[None, :], np.column_stack([np.ones(n_groups), np.zeros(n_groups), shape_g]))
    kern = kern / kern.sum(-1, keepdims=True)  # type: ignore[union-attr]
    kf = scipy.fft.rfft(kern.astype(np.float32), axis=-1, workers=-1)
    model = SignalModel(np.asarray(ax, dtype=np.float64), np.zeros((0, ax.size)), kf, nfft)
    mask = mask.astype(np.float32)
    o = (np.maximum(obs_g, 0.0) * mask).astype(np.float32)
    # The LR source and the data it is fitted to both live in the masked range only (channels i0:i1), and
    # only the estimate there is used: the iterations run on that sub-axis with a circular convolution just
    # long enough for lags +-(L - 1) (the same sums as the full linear convolution; ~40 % fewer FFT points).
    sup = np.flatnonzero(mask)
    i0, i1 = (int(sup[0]), int(sup[-1]) + 1) if sup.size else (0, ax.size)
    size = i1 - i0
    n_sub = scipy.fft.next_fast_len(2 * size - 1, real=True)
    if n_sub < nfft:
        ks = np.zeros((n_groups, n_sub), np.float32)
        ks[:, :size] = kern[:, :size]  # lags 0 .. L - 1
        if size > 1:
            ks[:, n_sub - size + 1 :] = kern[:, nfft - size + 1 :]  # lags -(L - 1) .. -1
        sub = SignalModel(ax[i0:i1].astype(float), np.zeros((0, size)), scipy.fft.rfft(ks, axis=-1, workers=-1), n_sub)
    else:
        sub, i0, i1 = model, 0, ax.size
    ms = mask[i0:i1]
    os_ = o[:, i0:i1]
    norm = np.maximum(sub._convolve(np.broadcast_to(ms, os_.shape), sub.kernel_fft), 1e-12)
    u = np.maximum(os_, 1e-9 * np.maximum(o.max(-1, keepdims=True), 1e-30)) * ms
    inv_norm = ms / norm
    for _ in range(int(iterations)):
        est = sub._convolve(u, sub.kernel_fft)
        np.maximum(est, 1e-30, out=est)
        np.divide(os_, est, out=est)
        u *= sub._convolve(est, sub.kernel_fft)
        u *= inv_norm
    if sub is not model:
        u_full = np.zeros((n_groups, ax.size), np.float32)
        u_full[:, i0:i1] = u
        u = u_full
    model.group = group
    model.scale = amp
    model.group_signal = u
    model.intrinsic = u[group] * amp[:, None].astype(np.float32)
    return model


def _window_index(
    off: Array, disp: float, centre: Array, n: int, windows: tuple[tuple[float, float], ...]
) -> NDArray[np.intp]:
    """Channel indices (k, m) of the |E - centre| windows on both sides, same count for every spectrum."""
    cols = []
    for lo, hi in windows:
        cnt = max(1, int(np.floor((hi - lo) / disp)))
        start_loss = np.ceil((centre + lo - off) / disp).astype(np.intp)
        start_gain = np.floor((centre - lo - off) / disp).astype(np.intp)
        cols.append(start_loss[:, None] + np.arange(cnt)[None, :])
        cols.append(start_gain[:, None] - np.arange(cnt)[None, :])
    idx = np.concatenate(cols, axis=1)
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError("ZLP fit windows run off the energy axis")
    return idx


_BLOCK = 1 << 14
"""Elements per array in the cache-blocked Pearson VII evaluation (keeps the temporaries in L2)."""


def _p7_fj(x: NDArray[Any], p: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Pearson VII ``(k, n)`` and its Jacobian ``(k, 4, n)`` for ``p`` ``(k, 4)``, in the dtype of ``x``.

    Evaluated in blocks of rows so that the ~10 temporaries stay in cache (the full-size version is
    bound by memory bandwidth: ~25 passes over ``k n`` doubles).
    """
    k, n = x.shape
    dt = x.dtype
    f = np.empty((k, n), dt)
    jac = np.empty((k, 4, n), dt)
    step = max(1, _BLOCK // max(n, 1))
    ln2 = np.log(2.0)
    for i in range(0, k, step):
        sl = slice(i, min(k, i + step))
        a, c, w, m = (p[sl, j, None].astype(dt) for j in range(4))
        cc = np.exp2(1.0 / m) - 1.0
        t = np.subtract(x[sl], c)
        t /= w  # (E - c) / w
        u = t * t
        q = u * (4.0 * cc)
        q += 1.0
        lq = np.log(q)
        qm = jac[sl, 0]
        np.multiply(lq, -m, out=qm)
        np.exp(qm, out=qm)  # dF/da = q^-m
        fs = f[sl]
        np.multiply(qm, a, out=fs)
        g = np.divide(qm, q)
        g *= 8.0 * a * m * cc / w  # common factor of the c and w derivatives
        np.multiply(g, t, out=jac[sl, 1])
        np.multiply(g, u, out=jac[sl, 2])
        u *= 4.0 * m * (-(cc + 1.0) * ln2 / m**2)  # 4 m dcc/dm u
        u /= q
        u += lq
        u *= fs
        np.negative(u, out=jac[sl, 3])
    return f, jac


def _normal_j(jac: Array, wt: Array, r: Array | None = None) -> tuple[Array, Array | None]:
    """Weighted normal matrix ``(k, 4, 4)`` (and gradient ``(k, 4)``) from a Jacobian ``(k, 4, n)``."""
    jw = jac * wt[:, None, :]
    # einsum, not matmul: the (4, n) x (n, 4) products are too small for BLAS, whose threads only add
    # overhead (and contend on a shared machine)
    h = np.einsum("kin,kjn->kij", jw, jac)
    g = None if r is None else np.einsum("kin,kn->ki", jw, r)
    return h, g


def _lm(
    x: Array,
    y: Array,
    wt: Array,
    p0: Array,
    *,
    max_iter: int,
    tol: float = 1e-6,
    lam0: float = 1e-3,
    init: tuple[Array, Array] | None = None,
    cov: bool = True,
) -> tuple[Array, Array | None, Array, int, Array, Array]:
    """Batched Levenberg-Marquardt for the Pearson VII.

    Returns params, normal matrix (float64, for the covariance; None with ``cov=False``, e.g. a first pass
    whose result is refitted), chi2, iterations, and the model ``(k, n)`` and float32 Jacobian
    ``(k, 4, n)`` at the returned params; ``init`` = (model, Jacobian) at ``p0`` when already known
    (a refit with other weights starts where the previous fit ended).

    ``lam0`` is the initial damping (relative to the normal matrix's diagonal): 1e-3 from a rough start;
    from a start near the optimum 1e-5, since the amplitude, FWHM and m are strongly correlated and a
    damping of 1e-3 shrinks the steps along their poorly determined combination for several iterations.

    Only the spectra that have not converged (relative chi-square change of the last step below ``tol``)
    are carried to the next iteration.  The model and Jacobian are evaluated once per iteration, at
    the trial point (kept when the step is accepted).
    """
    p = p0.copy()
    k = len(p)
    # model and Jacobian in float32 (rounding 6e-8 relative, far below the Poisson noise of any count);
    # residuals, chi-square and the solve in float64
    x32 = x.astype(np.float32)
    if init is None:
        f, jac = _p7_fj(x32, p)
    else:
        f, jac = init[0], init[1].copy()
    r = y - f
    chi2 = np.einsum("kn,kn->k", wt * r, r)
    # state of the active (not yet converged) spectra, compacted when some converge
    act = np.arange(k)
    xa, ya, wa, w32a = x32, y, wt, wt.astype(np.float32)
    pa, ja, ra, chi2a = p.copy(), jac, r, chi2.copy()
    lam = np.full(k, lam0)
    it = 0
    eye = np.eye(4)

    def retire(finished: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """Store the finished spectra's results; compact the active state to the others (returned mask)."""
        nonlocal act, xa, ya, wa, w32a, pa, ja, ra, chi2a, lam
        fin = act[finished]
        p[fin], chi2[fin], jac[fin], r[fin] = pa[finished], chi2a[finished], ja[finished], ra[finished]
        keep = ~finished
        act = act[keep]
        xa, ya, wa, w32a = xa[keep], ya[keep], wa[keep], w32a[keep]
        pa, ja, ra, chi2a, lam = pa[keep], ja[keep], ra[keep], chi2a[keep], lam[keep]
        return keep

    for n_it in range(1, max_iter + 1):
        it = n_it
        jw = ja * w32a[:, None, :]
        h = np.matmul(jw, ja.transpose(0, 2, 1)).astype(float)
        g = np.matmul(jw, ra.astype(np.float32)[:, :, None]).astype(float)
        diag = np.einsum("kii->ki", h)
        h += (lam[:, None] * np.maximum(diag, 1e-300))[:, :, None] * eye
        dp = np.linalg.solve(h, g)[..., 0]
        # converged already where the (nearly undamped) Gauss-Newton step predicts a chi2 decrease
        # ``dp . g`` below tol / 2: the model need not be evaluated there again
        flat_ = (lam < 1e-2) & (np.einsum("ki,ki->k", dp, g[..., 0]) < 0.5 * tol * chi2a)
        if flat_.any():
            dp = dp[retire(flat_)]
            if act.size == 0:
                break
        pt = pa + dp
        np.maximum(pt[:, 0], 1e-3 * pa[:, 0], out=pt[:, 0])
        np.minimum(np.maximum(pt[:, 2], 0.2 * pa[:, 2]), 5.0 * pa[:, 2], out=pt[:, 2])
        np.minimum(np.maximum(pt[:, 3], 0.55), 200.0, out=pt[:, 3])
        ft32, jt = _p7_fj(xa, pt)
        ft = ft32.astype(float)
        # the amplitude is linear: re-solve it exactly (removes its strong correlation with FWHM and m)
        wf = wa * ft
        sc = np.einsum("kn,kn->k", wf, ya) / np.maximum(np.einsum("kn,kn->k", wf, ft), 1e-300)
        sc = np.where(sc > 0, sc, 1.0)
        pt[:, 0] *= sc
        ft *= sc[:, None]
        jt[:, 1:] *= sc.astype(np.float32)[:, None, None]  # d/da does not depend on a
        rt = np.subtract(ya, ft, out=ft)
        chi2t = np.einsum("kn,kn->k", wa * rt, rt)
        acc = chi2t <= chi2a
        rel = np.abs(chi2a - chi2t) / np.maximum(chi2a, 1e-300)
        if acc.all():
            pa, chi2a, ra, ja = pt, chi2t, rt, jt
        else:
            pa[acc] = pt[acc]
            chi2a[acc] = chi2t[acc]
            ra[acc] = rt[acc]
            ja[acc] = jt[acc]
        lam = np.where(acc, np.maximum(lam / 5.0, 1e-7), lam * 5.0)
        # converged: a step (accepted or not) changes chi2 by less than tol (rounding of the float32 model)
        done = (rel < tol) | (lam > 1e8)
        if done.any():
            retire(done)
            if act.size == 0:
                break
    if act.size:
        p[act], chi2[act], jac[act], r[act] = pa, chi2a, ja, ra
    h_cov = _normal_j(jac.astype(float), wt)[0] if cov else None  # the covariance from a float64 normal matrix
    return p, h_cov, chi2, it, y - r, jac


_LM_ROWS = 256
"""Spectra per block of the batched Levenberg-Marquardt (the spectra are independent; blocks keep the
``(rows, 4, n)`` Jacobians and temporaries in cache instead of streaming them from memory every iteration,
and few enough numpy calls per spectrum that their overhead does not dominate)."""


def fit_zlp_pearson7(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    *,
    windows_meV: tuple[tuple[float, float], ...] = ((15.0, 30.0), (130.0, 200.0)),
    initial: ArrayLike | None = None,
    max_iter: int = 30,
    read_noise_counts: float = 0.0,
    scale_covariance: bool = True,
    signal_correction: int = 1,
    signal_range_meV: tuple[float, float] = (40.0, 130.0),
    lr_iterations: int = 30,
    tol: float = 3e-5,
    spill_uncertainty: float = 0.5,
    signal_groups: int | ArrayLike | None = 16,
    workers: int | None = None,
    reweight_tol: float = 0.05,
) -> ZLPFit:
    """Fit a symmetric Pearson VII to the zero-loss peak in ``|E - centre|`` windows on both sides.

    A batched Levenberg-Marquardt over blocks of spectra (normal equations ``(k, 4, 4)`` solved with
    ``np.linalg.solve``).  Weights are Poisson, ``1 / (model + read_noise^2)``: a first fit weighted by
    the starting model, then a refit weighted by that fit's model (no bias towards low counts) -- for a
    large batch (shared starting shape, see ``initial``) only where those weights differ from the first
    fit's by more than ``reweight_tol``: elsewhere the refit would move the parameters by < 0.1 sigma.

    Parameters
    ----------
    energy_meV
        Uniform energy axis ``(n,)`` or ``(..., n)``, ZLP near 0 up to drift.
    spectra
        Counts ``(..., n)``.
    windows_meV
        ``|E - centre|`` intervals fitted, on the loss and the gain side alike.
    initial
        Optional ``(..., 4)`` or ``(4,)`` starting parameters; default: centre from :func:`zlp_centre`,
        shape from a fit of the mean spectrum, and for more than ``_START_ROWS`` spectra the median shape
        of that many evenly spaced spectra fitted first (with the spill correction), amplitude re-solved
        per spectrum: the fits then converge in 2-3 iterations.
    read_noise_counts
        Gaussian read noise added to the Poisson variance.
    scale_covariance
        Multiply the covariance by ``max(1, chi2_red)``.
    signal_correction
        Number of refits after removing from the windows the phonon signal spilled into them by the
        resolution function: the signal in ``signal_range_meV`` (both sides) is deconvolved
        (:func:`signal_model`, ``lr_iterations`` masked Lucy-Richardson iterations with the fitted ZLP) and
        blurred again; its part outside the range is subtracted from the windows (0 = plain fit).
    spill_uncertainty
        Relative systematic error of that spill estimate, added to the channel variances (``(f spill)^2``):
        window channels dominated by spilled signal (loss side above 130 meV next to a 116 meV mode) then
        carry little weight instead of biasing the width.
    lr_iterations
        Lucy-Richardson iterations of the spill model.
    signal_groups
        Spectra that share one deconvolution of the spill model (:func:`signal_model` ``groups``): a group
        size (default 16, spectra grouped by signal shape), ``(k,)`` labels, or None (one per spectrum).
    tol
        Convergence threshold (relative chi-square change) of the Levenberg-Marquardt iterations.  At 3e-5
        (chi-square ~400: a change of ~0.01) the parameters lie within 0.1 sigma of full convergence, 0.03
        sigma RMS (measured on a 10,000-spectrum map against tol = 1e-7).
    workers
        Threads fitting blocks of spectra side by side (default: one per CPU); the result does not depend on it.
    reweight_tol
        Largest relative change of any window channel's weight for which a spectrum of a large batch is not
        refitted (0: always refit).  At 0.05 about 2 % of a 10,000-spectrum map is refitted; parameters
        differ from always refitting by <= 0.07 sigma, their errors by <= 2 %.

    Returns
    -------
    ZLPFit
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    flat = s.reshape(-1, n)
    off = off.reshape(-1)
    k = flat.shape[0]
    rn2 = float(read_noise_counts) ** 2
    if initial is None:
        centre = off + disp * zlp_centre(np.arange(n, dtype=float), flat, workers=workers)
        p0 = _initial_from_mean(flat, off, disp, centre, windows_meV, rn2)
    else:
        p0 = np.broadcast_to(np.asarray(initial, float), (k, 4)).copy()
        centre = p0[:, 1]
    idx = _window_index(off, disp, centre, n, windows_meV)
    # Poisson weights from the model (no bias towards low counts); the phonon signal spilled into the
    # windows is estimated from the current parameters and removed before each fit.  After the spill model
    # (all spectra), everything runs per block of ``_LM_ROWS`` spectra: windows, spill, weights and the fits,
    # so that no (k, window) temporaries are allocated (first-touch page faults cost more than the arithmetic).
    sc = int(signal_correction)
    fits_per_model = [2] if sc <= 1 else [1] * sc  # refits per spill model (2 passes at least)
    p = p0.copy()
    h = np.empty((k, 4, 4))
    chi2 = np.empty(k)
    sig: SignalModel | None = None
    n_it = 0
    good_start = False

    def block(rows: slice | NDArray[np.intp], p_at: Array, gb: Array | None, full: Array | None) -> tuple[
        Array, Array, Array
    ]:
        """Energies, spill-corrected counts and systematic variance of the windows of ``rows``."""
        ix = idx[rows]
        xb = off[rows, None] + disp * ix
        yb = np.take_along_axis(flat[rows], ix, axis=1).astype(float)
        if sig is None:
            return xb, yb, np.full(yb.shape, rn2)
        if gb is not None:
            # sampled from the blurred group signals (small, in cache), scaled by each amplitude
            assert sig.group is not None and sig.scale is not None
            spill = sig.sample(gb, xb - p_at[rows, 1:2], rows=sig.group[rows]) * sig.scale[rows, None]
        else:
            assert full is not None
            spill = sig.sample(full[rows], xb - p_at[rows, 1:2])
        yb -= spill
        # the spill model is uncertain (its blur depends on the fitted width itself): channels it dominates
        # are down-weighted by a relative systematic error ``spill_uncertainty``
        spill *= spill_uncertainty
        spill *= spill
        spill += rn2
        return xb, yb, spill

    def fit_rows(
        sl: slice, *, p_at: Array, gb: Array | None, full: Array | None, start_amp: bool, n_fit: int, good_start: bool
    ) -> NDArray[np.int_]:
        """Fit the spectra ``sl``: independent of every other block (blocks run on parallel threads)."""
        its = np.zeros(n_fit, int)
        xb, yb, vb = block(sl, p_at, gb, full)
        pb = p_at[sl].copy()
        model: tuple[Array, Array] | None = None
        if start_amp:  # shared shape: amplitude re-solved; model and Jacobian there reused by the fit
            pb[:, 0], model = _solve_amplitude(xb, yb, vb, pb)
        wt = 1.0 / (np.maximum(_p7_f(xb, pb) if model is None else model[0], 1e-3) + vb)
        pb, _, chi2b, its[0], fb, jb = _lm(
            xb, yb, wt, pb, max_iter=max_iter, tol=tol, lam0=1e-5 if good_start else 1e-3, init=model, cov=False
        )
        if n_fit > 1:
            # refit weighted by the fit's own model (no bias towards low counts), where the weights moved
            wt_fit = 1.0 / (np.maximum(fb, 1e-3) + vb)
            if start_amp:
                redo = np.flatnonzero(np.max(np.abs(wt_fit / wt - 1.0), axis=1) > reweight_tol)
            else:
                redo = np.arange(len(pb))
            if redo.size:
                pr, _, chi2b[redo], its[1], fr, jr = _lm(
                    xb[redo], yb[redo], wt_fit[redo], pb[redo], max_iter=max_iter, tol=tol, lam0=1e-5,
                    init=(fb[redo], jb[redo]), cov=False,
                )
                pb[redo], fb[redo], jb[redo], wt[redo] = pr, fr, jr, wt_fit[redo]
        h[sl] = _normal_j(jb.astype(float), wt)[0]  # the covariance from a float64 normal matrix
        chi2[sl] = chi2b
        p[sl] = pb
        return its

    for i_model, n_fit in enumerate(fits_per_model):
        p_at = p.copy()  # the spill of this round is sampled around these centres
        gb = full = None
        if sc > 0:
            sig = _signal_model(
                off,
                disp,
                flat,
                p_at,
                signal_range_meV=signal_range_meV,
                extent_meV=210.0,
                coarse=3,
                iterations=lr_iterations,
                groups=signal_groups,
                workers=workers,
            )
            if sig.group_signal is not None and sig.group is not None and sig.scale is not None:
                gb = sig._convolve(sig.group_signal, sig.kernel_fft)
            else:
                full = sig.blurred()
        start_amp = False
        if i_model == 0 and initial is None and k > _START_ROWS:
            sub = np.unique(np.linspace(0, k - 1, _START_ROWS).round().astype(np.intp))
            p_at[:, 2:] = _shared_shape(*block(sub, p_at, gb, full), p_at[sub], max_iter=max_iter, tol=tol)
            start_amp = good_start = True
        fit = functools.partial(
            fit_rows, p_at=p_at, gb=gb, full=full, start_amp=start_amp, n_fit=n_fit, good_start=good_start
        )
        its = np.max(thread_map(fit, row_blocks(k, _LM_ROWS), workers), axis=0)
        n_it += int(its.sum())
        good_start = True
    dof = max(1, idx.shape[1] - 4)
    chi2_red = chi2 / dof
    cov = np.linalg.inv(h + 1e-300 * np.eye(4))
    if scale_covariance:
        cov = cov * np.maximum(1.0, chi2_red)[:, None, None]
    return ZLPFit(
        params=p.reshape(batch + (4,)),
        cov=np.asarray(cov, dtype=np.float64).reshape(batch + (4, 4)),
        chi2_red=chi2_red.reshape(batch),
        n_iter=n_it,
        windows_meV=tuple(windows_meV),
        signal=sig,
    )


_START_ROWS = 64
"""Spectra (evenly spaced) whose individual fits give the shared starting shape of a large batch."""


def _p7_f(x: Array, p: Array) -> Array:
    """Pearson VII ``(k, n)`` at ``x`` ``(k, n)`` for ``p`` ``(k, 4)``, computed in float32 blocks, as float64."""
    k, n = x.shape
    out = np.empty((k, n))
    step = max(1, 4 * _BLOCK // max(n, 1))
    for i in range(0, k, step):
        sl = slice(i, min(k, i + step))
        a, c, w, m = (p[sl, j, None].astype(np.float32) for j in range(4))
        t = x[sl].astype(np.float32)
        t -= c
        t /= w
        t *= t
        t *= 4.0 * (np.exp2(1.0 / m) - 1.0)
        t += 1.0
        np.log(t, out=t)
        t *= -m
        np.exp(t, out=t)
        t *= a
        out[sl] = t
    return out


def _shared_shape(x: Array, y: Array, var_sys: Array, p0: Array, *, max_iter: int, tol: float) -> Array:
    """Starting shape of a large batch: the median (FWHM, m) of a few spectra fitted individually.

    The ZLP shape is an instrument property that varies little across a map, so every spectrum starts from
    the median shape of ``_START_ROWS`` evenly spaced spectra fitted first (same windows, weights and spill
    correction; ``x``, ``y``, ``var_sys``, ``p0`` are theirs), its centre from ``zlp_centre`` and its amplitude
    re-solved linearly (:func:`_solve_amplitude`); the full fit then needs 2-3 iterations instead of ~15
    from the shape of the (uncorrected) mean spectrum.
    """
    wt = 1.0 / (np.maximum(_p7_f(x, p0), 1e-3) + var_sys)
    ps = _lm(x, y, wt, p0, max_iter=max_iter, tol=tol, cov=False)[0]
    return np.median(ps[:, 2:], axis=0)


def _solve_amplitude(x: Array, y: Array, var_sys: Array, p: Array) -> tuple[Array, tuple[Array, Array]]:
    """Weighted least-squares amplitude of the Pearson VII shape ``p`` (weights from its model at ``p``).

    Returns the amplitudes ``(k,)`` and the model ``(k, n)`` with its float32 Jacobian ``(k, 4, n)`` at
    ``p`` with those amplitudes (the starting point of the fit, as :func:`_lm`'s ``init``).
    """
    unit = p.copy()
    unit[:, 0] = 1.0
    f32, jac = _p7_fj(x.astype(np.float32), unit)
    f = f32.astype(float)
    wf = f / (np.maximum(f * p[:, :1], 1e-3) + var_sys)
    amp = np.einsum("kn,kn->k", wf, y) / np.maximum(np.einsum("kn,kn->k", wf, f), 1e-300)
    amp = np.where(amp > 0, amp, p[:, 0])
    f *= amp[:, None]
    jac[:, 1:] *= amp.astype(np.float32)[:, None, None]  # d/da does not depend on a
    return amp, (f, jac)


def _initial_from_mean(
    flat: Array, off: Array, disp: float, centre: Array, windows: tuple[tuple[float, float], ...], rn2: float
) -> Array:
    """Starting parameters: a fit of the centre-aligned mean spectrum, amplitude scaled per spectrum."""
    k, n = flat.shape
    c_ch = (centre - off) / disp
    ref_ch = float(np.round(np.median(c_ch)))
    sel = np.abs(c_ch - ref_ch) < 0.5 * n
    # integer-channel alignment is enough for a starting point
    use = np.flatnonzero(sel)[:256]
    roll = np.round(c_ch[use] - ref_ch).astype(np.intp)
    idx = np.clip(np.arange(n)[None, :] + roll[:, None], 0, n - 1)
    mean = np.take_along_axis(flat[use], idx, axis=1).mean(axis=0, dtype=float)
    e = disp * (np.arange(n) - ref_ch)
    peak = float(mean[int(ref_ch)])
    half = np.nonzero(mean >= 0.5 * peak)[0]
    fwhm = max(2 * disp, disp * (half[-1] - half[0] + 1))
    pm = np.array([[peak, 0.0, fwhm, 1.5]])
    cen = np.zeros(1)
    ix = _window_index(np.array([e[0]]), disp, cen, n, windows)
    y = mean[ix]
    x = np.asarray(e[ix], dtype=np.float64)
    pm, _, _, _, _, _ = _lm(x, y, 1.0 / (np.maximum(y, 1.0) + rn2), pm, max_iter=100, cov=False)
    i_max = np.clip(np.round(c_ch).astype(np.intp), 0, n - 1)
    amp = np.take_along_axis(flat, i_max[:, None], axis=1)[:, 0].astype(float)
    scale = amp / max(float(np.asarray(pearson7_model(np.zeros((1, 1)), pm))[0, 0]), 1e-30)
    p0 = np.empty((k, 4))
    p0[:, 0] = pm[0, 0] * scale
    p0[:, 1] = centre
    p0[:, 2] = pm[0, 2]
    p0[:, 3] = pm[0, 3]
    return p0


# ---------------------------------------------------------------------------------------------- background
def power_law_background(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    *,
    windows_meV: tuple[tuple[float, float], ...] = ((16.0, 20.0), (60.0, 70.0)),
) -> tuple[Array, Array]:
    """Power-law background ``A E^-r`` fitted (least squares in log-log) in the loss-side windows.

    Returns
    -------
    background
        ``(..., n)`` model on the whole axis (0 where E <= 0).
    params
        ``(..., 2)``: A, r.
    """
    s = np.asarray(spectra, float)
    batch, _n = s.shape[:-1], s.shape[-1]
    e = np.broadcast_to(np.asarray(energy_meV, float), s.shape)
    mask = np.zeros(s.shape, bool)
    for lo, hi in windows_meV:
        mask |= (e >= lo) & (e <= hi)
    lx = np.log(np.where(mask, e, 1.0))
    ly = np.log(np.where(mask, np.maximum(s, 1e-30), 1.0))
    w = mask.astype(float)
    sw = w.sum(-1)
    mx = (w * lx).sum(-1) / sw
    my = (w * ly).sum(-1) / sw
    slope = (w * (lx - mx[..., None]) * (ly - my[..., None])).sum(-1) / (w * (lx - mx[..., None]) ** 2).sum(-1)
    inter = my - slope * mx
    params = np.stack([np.exp(inter), -slope], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bg = np.where(e > 0, np.exp(inter[..., None]) * np.where(e > 0, e, 1.0) ** slope[..., None], 0.0)
    return bg, params.reshape(batch + (2,))


# ---------------------------------------------------------------------------------------------- thermometry
@dataclass
class TemperatureResult:
    """Detailed-balance temperatures of many spectra (arrays of the batch shape).

    Attributes
    ----------
    T_K
        Temperature from the slope of the line through the origin, ``T = 1 / (k_B slope)``.
    T_err_K
        Total one-sigma error: counting (Poisson of every detected electron) and the ZLP fit's
        covariance propagated through the slope, in quadrature.
    T_err_counting_K, T_err_zlp_K
        The two parts.
    slope_per_meV, slope_err_per_meV
        ``1 / (k_B T)`` and its error.
    chi2_red
        Reduced chi-square of the line fit.
    n_bins
        Bins used.
    zlp
        The ZLP fit.
    energy_meV, log_ratio, weights
        Bin centres ``(n_bins,)``, ``log(L/G)`` and weights ``(..., n_bins)`` (0 = excluded bin).
    """

    T_K: Array
    T_err_K: Array
    T_err_counting_K: Array
    T_err_zlp_K: Array
    slope_per_meV: Array
    slope_err_per_meV: Array
    chi2_red: Array
    n_bins: NDArray[np.int64]
    zlp: ZLPFit
    energy_meV: Array = field(repr=False)
    log_ratio: Array = field(repr=False)
    weights: Array = field(repr=False)


def _gather_side(flat: Array, pos0: Array, step: int, count: int) -> tuple[Array, Array, NDArray[np.intp]]:
    """Channels ``floor(pos0) + step * i`` (i = 0..count) and the fractional part of ``pos0``."""
    base = np.floor(pos0).astype(np.intp)
    frac = pos0 - base
    idx = base[:, None] + step * np.arange(count + 1)[None, :]
    return np.take_along_axis(flat, np.clip(idx, 0, flat.shape[1] - 1), axis=1).astype(float), frac, idx


def _bin_interp(v: Array, frac: Array, step: int, nb: int, b: int) -> tuple[Array, Array]:
    """Bin sums of the linear interpolation ``(1 - f) v_i + f v_(i+step)`` over ``b`` samples per bin.

    ``v`` holds channels ``base + step * i`` for step=+1 (interpolate towards +1) or step=-1 (then the
    interpolation partner of sample i is the previous channel, i.e. ``v_(i-1)``; handled by the caller
    passing the reversed fraction).  Returns the bin sums and the sum-of-squared-coefficients weights
    needed for the variance (as sums over channels with those coefficients).
    """
    k = v.shape[0]
    core = v[:, : nb * b].reshape(k, nb, b).sum(-1)
    first = v[:, 0 : nb * b : b]
    after = v[:, b : nb * b + 1 : b]
    f = frac[:, None]
    sums = core + f * (after - first)
    var = core - first + (1 - f) ** 2 * first + f**2 * after
    return sums, var


def log_ratio_bins(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    zlp: ZLPFit,
    *,
    window_min_meV: float = 55.0,
    window_max_meV: float | None = None,
    bin_meV: float = 2.2,
    read_noise_counts: float = 0.0,
    workers: int | None = None,
) -> dict[str, Array]:
    """Loss and gain signals in energy bins ``|E - centre|`` with ZLP subtracted, variances, derivatives.

    The loss side is sampled at ``centre + e`` and the gain side at ``centre - e`` (linear interpolation
    between channels, the same for data and model), summed in bins of ``bin_meV``.  Blocks of spectra run
    on ``workers`` threads (default: one per CPU).

    Returns
    -------
    dict
        ``e`` bin centres (n_bins,), ``L``, ``G`` (signals), ``SL``, ``SG`` (detected counts), ``vL``,
        ``vG`` (their Poisson + read-noise variances), ``ZL``, ``ZG`` (ZLP model) and ``dL``, ``dG``
        ``(k, n_bins, 4)`` (derivatives of L and G with respect to the ZLP parameters).
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    flat = s.reshape(-1, n)
    off = off.reshape(-1)
    p = zlp.params.reshape(-1, 4)
    c = p[:, 1]
    b = max(1, int(round(bin_meV / disp)))
    avail = min(float(np.min((off + disp * (n - 1)) - c)), float(np.min(c - off))) - 2 * disp
    upper = window_max_meV
    if upper is None:
        upper = (
            min(w[0] for w in zlp.windows_meV if w[0] > window_min_meV)
            if any(w[0] > window_min_meV for w in zlp.windows_meV)
            else avail
        )
    upper = min(upper, avail)
    nb = int(np.floor((upper - window_min_meV) / (b * disp)))
    if nb < 1:
        raise ValueError("no energy bins between window_min_meV and window_max_meV")
    count = nb * b
    e_pts = window_min_meV + disp * np.arange(count)
    e_bins = e_pts.reshape(nb, b).mean(-1)
    rn2 = float(read_noise_counts) ** 2

    def rows(sl: slice) -> dict[str, Array]:
        return _log_ratio_rows(flat[sl], off[sl], p[sl], disp, window_min_meV, nb, b, rn2)

    # blocks of spectra (temporaries stay in cache) on parallel threads
    parts = thread_map(rows, row_blocks(max(len(p), 1), _ROWS), workers)  # one block at least (its keys)
    shp = batch + (nb,)
    out: dict[str, Array] = {"e": np.asarray(e_bins, float), "e_points": np.asarray(e_pts.reshape(nb, b), float)}
    for key in parts[0]:
        v = np.concatenate([part[key] for part in parts])
        out[key] = v.reshape(shp + v.shape[2:])
    return out


def _log_ratio_rows(
    flat: Array, off: Array, p: Array, disp: float, window_min_meV: float, nb: int, b: int, rn2: float
) -> dict[str, Array]:
    """:func:`log_ratio_bins` for spectra ``flat`` ``(k, n)`` with offsets ``(k,)``, ZLP parameters ``(k, 4)``."""
    c = p[:, 1]
    count = nb * b
    # loss: positions (c + e - off) / disp increasing by 1 per sample
    posL = (c + window_min_meV - off) / disp
    vL_raw, fL, iL = _gather_side(flat, posL, +1, count)
    # gain: positions (c - e - off) / disp decreasing by 1 per sample; interpolate between floor and floor+1
    posG = (c - window_min_meV - off) / disp
    baseG = np.floor(posG).astype(np.intp)
    fG = posG - baseG
    # with u_i = channel baseG + 1 - i, the gain sample is (1 - g) u_i + g u_(i+1) with g = 1 - fG
    vG_raw, _, iG = _gather_side(flat, (baseG + 1.0).astype(np.float64), -1, count)
    gG = 1.0 - fG
    SL, varL = _bin_interp(vL_raw, fL, 1, nb, b)
    SG, varG = _bin_interp(vG_raw, gG, 1, nb, b)
    varL = varL + rn2 * _coef2(fL, nb, b)
    varG = varG + rn2 * _coef2(gG, nb, b)
    # model at the same channels, same interpolation (float32, cache-blocked: rounding 6e-8 of a ZLP tail)
    ZL = _bin_sums(_p7_f(off[:, None] + disp * iL, p), fL, nb, b)
    ZG = _bin_sums(_p7_f(off[:, None] + disp * iG, p), gG, nb, b)
    # derivatives (for the ZLP covariance only): smooth across a bin, so b x the Jacobian at the bin centre
    # (the bin's points are pos +- (j b + i), i = 0..b-1, on the loss / gain side)
    mid = b * np.arange(nb) + 0.5 * (b - 1)
    dZL = b * _p7_fj((off[:, None] + disp * (posL[:, None] + mid)).astype(np.float32), p)[1].transpose(0, 2, 1)
    dZG = b * _p7_fj((off[:, None] + disp * (posG[:, None] - mid)).astype(np.float32), p)[1].transpose(0, 2, 1)
    # moving the centre moves the data sampling points too: d(data)/dc = slope of the detected spectrum;
    # the ZLP part of that slope is exact (the model's), so the data sampling cancels the model's
    # centre derivative for the ZLP and only the signal's own slope (neglected) would remain.
    dZL[..., 1] = 0.0
    dZG[..., 1] = 0.0
    return {
        "SL": SL,
        "SG": SG,
        "vL": varL,
        "vG": varG,
        "ZL": ZL,
        "ZG": ZG,
        "L": SL - ZL,
        "G": SG - ZG,
        "dL": -dZL,
        "dG": -dZG,
    }


def _bin_sums(v: Array, frac: Array, nb: int, b: int) -> Array:
    """Bin sums (``(..., nb)``) of the linear interpolation of ``v`` ``(..., nb b + 1)`` (as :func:`_bin_interp`).

    ``frac`` broadcasts against ``v.shape[:-1]``.
    """
    first = v[..., 0 : nb * b : b]
    core = first.copy()
    for j in range(1, b):  # strided adds: faster than a reshape copy and a sum over a short axis
        core += v[..., j : nb * b : b]
    after = v[..., b : nb * b + 1 : b]
    core += frac[..., None] * (after - first)
    return core


def _coef2(f: Array, nb: int, b: int) -> Array:
    """Sum of squared interpolation coefficients per bin (for read noise)."""
    return (b - 1 + (1 - f) ** 2 + f**2)[:, None] * np.ones(nb)


_SLOPE_NODE = 0.1
"""Relative half-range of the slope nodes at which each group's resolution offset is computed."""


def _offset_rows(sig: SignalModel, u: Array, kern: NDArray[np.complex128], slope: Array, pts: Array,
                 nb: int, e: Array) -> Array:
    """``log(L_c / G_c) - slope e`` ``(r, nb)`` of detailed-balance sources built from ``u`` ``(r, n)``.

    Each row's source is its loss signal (``axis > 0``) plus its mirror times ``exp(-slope |E|)``, blurred
    with its kernel (``kern`` ``(r, nfft // 2 + 1)``) and summed over the bins' points ``pts``; bins with a
    non-positive blurred loss or gain give 0.
    """
    ax = sig.axis_meV
    loss = np.where(ax > 0, u, 0.0)
    mirror = np.where(ax < 0, u[:, ::-1], 0.0)
    src = loss + mirror * np.exp(np.minimum(slope[:, None] * ax[None, :], 0.0))
    blurred = sig._convolve(src, kern)
    lc = sig.sample(blurred, pts).reshape(len(u), nb, -1).sum(-1)
    gc = sig.sample(blurred, -pts).reshape(len(u), nb, -1).sum(-1)
    ok = (lc > 0) & (gc > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, np.log(np.where(ok, lc, 1.0) / np.where(ok, gc, 1.0)) - slope[:, None] * e, 0.0)


def _resolution_offset(
    sig: SignalModel, e_points: Array, slope: Array, *, iterations: int, y: Array, w: Array, e: Array
) -> Array:
    """Offset ``c_i = log(L_c,i / G_c,i) - slope e_i`` of the binned log-ratio caused by the resolution blur.

    The detailed-balance source is built from the deconvolved loss signal ``u(E)`` (E > 0) and its mirror
    ``u(E) exp(-slope E)`` on the gain side, blurred with each spectrum's resolution function and summed
    over the same points as the data bins.  The slope is refitted through the origin on ``y - c`` and the
    offset recomputed ``iterations`` times.  Returns ``c`` ``(k, n_bins)``.

    With a grouped signal model (:func:`signal_model`) the offset of a spectrum depends only on its group
    (signal shape per unit amplitude and resolution function; the amplitude cancels in the ratio) and its
    slope: it is computed at three slopes per group, ``s_g (1 + (-1, 0, 1) _SLOPE_NODE)`` around the group's
    median slope of the first pass (once: the refits move the slopes by a few %), and interpolated
    quadratically in the slope (error ~1e-7 in ``log(L/G)``); spectra whose slope lies outside the nodes get
    their own exact computation.
    """
    pts = e_points.reshape(-1)
    nb = e_points.shape[0]
    swee = np.maximum((w * e * e).sum(-1), 1e-300)
    off = np.zeros_like(y)
    grouped = sig.group is not None and sig.group_signal is not None and sig.scale is not None
    grouped = grouped and 3 * len(sig.group_signal) < len(slope)  # type: ignore[arg-type]  # else one exact blur per spectrum is cheaper
    nodes: tuple[Array, Array] | None = None
    for _ in range(int(iterations)):
        if not grouped:
            kern = sig.kernel_fft[sig.group] if sig.group is not None and len(sig.kernel_fft) > 1 else sig.kernel_fft
            off = _offset_rows(sig, sig.intrinsic, kern, slope, pts, nb, e)
        else:
            if nodes is None:  # once: the refitted slopes move by a few %, well inside the +-10 % nodes
                nodes = _offset_nodes(sig, slope, pts, nb, e)
            off = _grouped_offset(sig, nodes, slope, pts, nb, e)
        slope = (w * e * (y - off)).sum(-1) / swee
    return off


def _group_kernels(sig: SignalModel) -> NDArray[np.complex128]:
    """The resolution FFT of each group ``(g, nfft // 2 + 1)`` (one shared row broadcast to all groups)."""
    assert sig.group_signal is not None
    n_groups = len(sig.group_signal)
    if len(sig.kernel_fft) == n_groups:
        return sig.kernel_fft
    return np.broadcast_to(sig.kernel_fft, (n_groups,) + sig.kernel_fft.shape[1:])


def _offset_nodes(sig: SignalModel, slope: Array, pts: Array, nb: int, e: Array) -> tuple[Array, Array]:
    """Each group's offset ``(g, 3, nb)`` at three slopes around its median slope, and its centre slope ``(g,)``."""
    assert sig.group is not None and sig.group_signal is not None
    group = sig.group
    n_groups = len(sig.group_signal)
    kf = _group_kernels(sig)
    # median slope of each group
    order = np.lexsort((slope, group))
    g_sorted = group[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    centre = np.ones(n_groups)
    med = 0.5 * (slope[order][starts + (counts - 1) // 2] + slope[order][starts + counts // 2])
    centre[g_sorted[starts]] = med
    centre = np.where(centre > 0, centre, np.maximum(np.median(slope), 1e-30))
    at = centre[:, None] * (1.0 + _SLOPE_NODE * np.array([-1.0, 0.0, 1.0]))[None, :]  # (g, 3)
    rows = np.repeat(np.arange(n_groups), 3)
    f = _offset_rows(sig, sig.group_signal[rows], kf[rows], at.reshape(-1), pts, nb, e).reshape(n_groups, 3, nb)
    return f, centre


def _grouped_offset(
    sig: SignalModel, nodes: tuple[Array, Array], slope: Array, pts: Array, nb: int, e: Array
) -> Array:
    """:func:`_resolution_offset`'s offset for a grouped signal model: quadratic in the slope between the
    group's ``nodes`` (:func:`_offset_nodes`); exact for spectra whose slope lies outside them."""
    assert sig.group is not None and sig.group_signal is not None
    group = sig.group
    f, centre = nodes
    t = (slope / centre[group] - 1.0) / _SLOPE_NODE
    fg = f[group]  # (k, 3, nb)
    off = (0.5 * t * (t - 1.0))[:, None] * fg[:, 0] + (1.0 - t * t)[:, None] * fg[:, 1] + (
        0.5 * t * (t + 1.0)
    )[:, None] * fg[:, 2]
    valid = np.all(f != 0.0, axis=1)[group]  # per group, then per spectrum
    off = np.where(valid, off, 0.0)
    out = np.flatnonzero(~(np.abs(t) <= 1.0) | ~np.all(valid, axis=1))
    if out.size:
        g = group[out]
        off[out] = _offset_rows(sig, sig.group_signal[g], _group_kernels(sig)[g], slope[out], pts, nb, e)
    return off


def temperature(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    *,
    window_min_meV: float = 55.0,
    window_max_meV: float | None = None,
    bin_meV: float = 2.2,
    zlp_windows_meV: tuple[tuple[float, float], ...] = ((15.0, 30.0), (130.0, 200.0)),
    zlp: ZLPFit | None = None,
    deconvolve: bool = False,
    lr_iterations: int = 5,
    read_noise_counts: float = 0.0,
    min_snr: float = 2.0,
    bias_correction: bool = True,
    scale_by_chi2: bool | None = None,
    resolution_correction: bool | None = None,
    lr_correction_iterations: int = 30,
    workers: int | None = None,
) -> TemperatureResult:
    """Temperature from detailed balance, ``log(I_loss(E) / I_gain(E)) = E / (k_B T)``.

    Steps: Pearson VII ZLP fit (:func:`fit_zlp_pearson7`, unless ``zlp`` is given), ZLP subtracted from
    both sides, loss and gain signals binned at ``|E - centre|`` from ``window_min_meV`` to
    ``window_max_meV`` (default: the start of the next ZLP-fit window, 130 meV, or the end of the data),
    then a weighted least-squares line through the origin.

    Weights ``w = 1 / (var(L)/L^2 + var(G)/G^2)`` with the variances of all detected counts in the bins and
    L, G from a first pass split of L + G by the first slope (so the weights do not correlate with the
    noise of y); ``y`` gets the second-order correction ``var(L)/(2L^2) - var(G)/(2G^2)`` of the log bias.
    Bins where the expected gain signal is below ``min_snr`` standard deviations are dropped.

    Resolution correction (default on unless ``deconvolve``): the instrument blurs loss and gain alike,
    which offsets ``log(L/G)`` from ``E / k_B T`` by a deterministic, shape-dependent amount (several %
    in the slope at 10-12 meV resolution).  The loss signal is deconvolved once (:func:`signal_model`,
    masked LR with the fitted ZLP; reused from ``zlp.signal``), a detailed-balance source at the current
    slope is blurred with the fitted resolution, its offset ``c_i = log(L_c,i / G_c,i) - slope E_i`` in
    the same bins is subtracted from ``y`` and the line through the origin refitted (3 times).  Noise enters
    the offset only through the smooth, high-count loss side, so the scatter stays at the counting limit.

    The slope's error adds the counting error ``1 / sqrt(sum w E^2)`` and the ZLP fit's covariance
    propagated through the slope (``J C J^T`` with ``J = d slope / d params``) in quadrature.

    Parameters
    ----------
    scale_by_chi2
        Multiply the counting variance by ``max(1, chi2_red)`` of the line fit (Birge ratio); default on
        with ``deconvolve`` (LR correlates and amplifies the noise, which the Poisson weights ignore).
    deconvolve
        Run :func:`lucy_richardson` (``lr_iterations``) on the ZLP-subtracted signal (clipped at 0) with
        the fitted ZLP as PSF first (the reference's optional step; off by default).  The errors are then
        those of the raw data (an approximation).
    resolution_correction
        Remove the resolution offset of the log-ratio as above (default: ``not deconvolve``).
    lr_correction_iterations
        LR iterations of :func:`signal_model` when ``zlp.signal`` is absent.
    workers
        Threads for the blocks of spectra (default: one per CPU); the result does not depend on it.
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    if zlp is None:
        zlp = fit_zlp_pearson7(
            energy_meV, s, windows_meV=zlp_windows_meV, read_noise_counts=read_noise_counts, workers=workers
        )
    work = s
    if deconvolve:
        off, disp = _axis(energy_meV, n, batch)
        e = off[..., None] + disp * np.arange(n)
        psf = zlp.model(e)
        sig = lucy_richardson(
            np.maximum(s - psf, 1e-3),
            psf,
            iterations=lr_iterations,
            centre_channels=((zlp.params[..., 1] - off) / disp),
        )
        work = psf + sig
    d = log_ratio_bins(
        energy_meV,
        work,
        zlp,
        window_min_meV=window_min_meV,
        window_max_meV=window_max_meV,
        bin_meV=bin_meV,
        read_noise_counts=read_noise_counts,
        workers=workers,
    )
    e = d["e"]
    L, G, vL, vG = d["L"], d["G"], d["vL"], d["vG"]
    # pass 1: observed weights
    ok = (L > 0) & (G > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(ok, np.log(np.where(ok, L / np.where(ok, G, 1), 1)), 0.0)
        w = np.where(ok, 1.0 / (vL / np.where(ok, L, 1) ** 2 + vG / np.where(ok, G, 1) ** 2), 0.0)
    slope = (w * e * y).sum(-1) / np.maximum((w * e * e).sum(-1), 1e-300)
    slope = np.clip(slope, 1.0 / (KB_MEV_PER_K * 1e5), 1.0 / (KB_MEV_PER_K * 1.0))
    # pass 2: model-based signals from L + G and the first slope
    tot = L + G
    ex = np.exp(slope[..., None] * e)
    Lh = tot * ex / (1.0 + ex)
    Gh = tot / (1.0 + ex)
    good = ok & (Lh > 0) & (Gh > min_snr * np.sqrt(np.maximum(vG, 1e-300)))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(np.where(good, L, 1.0) / np.where(good, G, 1.0))
        rl = vL / np.where(good, Lh, 1.0) ** 2
        rg = vG / np.where(good, Gh, 1.0) ** 2
    if bias_correction:
        y = y + 0.5 * (rl - rg)
    w = np.where(good, 1.0 / (rl + rg), 0.0)
    y = np.where(good, y, 0.0)
    swee = np.maximum((w * e * e).sum(-1), 1e-300)
    slope = (w * e * y).sum(-1) / swee
    offset = np.zeros_like(y)
    if resolution_correction is None:
        resolution_correction = not deconvolve
    if resolution_correction:
        signal = zlp.signal
        if signal is None:
            signal = signal_model(energy_meV, s, zlp.params, iterations=lr_correction_iterations)
        offset = _resolution_offset(signal, d["e_points"], slope.reshape(-1), iterations=3, y=y.reshape(-1, e.size),
                                    w=w.reshape(-1, e.size), e=e)
        offset = offset.reshape(y.shape)
        slope = (w * e * (y - offset)).sum(-1) / swee
    y = np.where(good, y - offset, 0.0)
    nbin = good.sum(-1)
    resid = y - slope[..., None] * e
    chi2_red = (w * resid**2).sum(-1) / np.maximum(nbin - 1, 1)
    var_count = 1.0 / swee
    if scale_by_chi2 is None:
        scale_by_chi2 = deconvolve
    if scale_by_chi2:
        var_count = var_count * np.maximum(1.0, chi2_red)
    # ZLP covariance through the slope: dy/dp = dL/dp / L - dG/dp / G
    with np.errstate(divide="ignore", invalid="ignore"):
        dy = d["dL"] / np.where(good, Lh, 1.0)[..., None] - d["dG"] / np.where(good, Gh, 1.0)[..., None]
    jb = ((w * e)[..., None] * dy).sum(-2) / swee[..., None]
    var_zlp = np.einsum("...i,...ij,...j->...", jb, zlp.cov, jb)
    var = var_count + var_zlp
    slope_safe = np.where(slope > 0, slope, np.nan)
    T = 1.0 / (KB_MEV_PER_K * slope_safe)
    conv = 1.0 / (KB_MEV_PER_K * slope_safe**2)
    return TemperatureResult(
        T_K=T,
        T_err_K=np.sqrt(var) * conv,
        T_err_counting_K=np.sqrt(var_count) * conv,
        T_err_zlp_K=np.sqrt(np.maximum(var_zlp, 0)) * conv,
        slope_per_meV=slope,
        slope_err_per_meV=np.sqrt(var),
        chi2_red=chi2_red,
        n_bins=nbin,
        zlp=zlp,
        energy_meV=e,
        log_ratio=y,
        weights=w,
    )


def counting_limit_sigma_T(
    energy_meV: ArrayLike,
    loss: ArrayLike,
    gain: ArrayLike,
    var_loss: ArrayLike,
    var_gain: ArrayLike,
    temperature_K: ArrayLike,
) -> Array:
    """Counting-statistics limit of the temperature error of a line-through-origin fit.

    ``sigma_T = k_B T^2 / sqrt(sum_i E_i^2 w_i)``, ``w_i = 1 / (var(L_i)/L_i^2 + var(G_i)/G_i^2)``, with
    ``L_i``, ``G_i`` the (expected) background-subtracted loss and gain signals and the variances counting
    every detected electron in the channel or bin.  Sums over the last axis.
    """
    e = np.asarray(energy_meV, float)
    L = np.asarray(loss, float)
    G = np.asarray(gain, float)
    w = 1.0 / (np.asarray(var_loss, float) / L**2 + np.asarray(var_gain, float) / G**2)
    T = np.asarray(temperature_K, float)
    return KB_MEV_PER_K * T**2 / np.sqrt((e**2 * w).sum(-1))


def lucy_richardson(
    spectra: ArrayLike, psf: ArrayLike, *, iterations: int = 5, centre_channels: ArrayLike | None = None
) -> Array:
    """Lucy-Richardson deconvolution of spectra by a point-spread function (vectorised, FFT).

    Parameters
    ----------
    spectra
        ``(..., n)`` counts (negative values are clipped at a small positive floor).
    psf
        ``(..., n)`` PSF on the same axis (e.g. the fitted ZLP); normalised to unit sum here.
    iterations
        Number of LR iterations (5 by default, as in the reference).
    centre_channels
        Channel of the PSF's centre (default: its maximum); the PSF is rolled so the centre is at 0.

    Returns
    -------
    deconvolved
        ``(..., n)`` with the same total counts.
    """
    s = np.maximum(np.asarray(spectra, float), 1e-6)
    h = np.broadcast_to(np.asarray(psf, float), s.shape)
    n = s.shape[-1]
    h = h / h.sum(-1, keepdims=True)
    if centre_channels is None:
        centre = np.argmax(h, axis=-1).astype(float)
    else:
        centre = np.broadcast_to(np.asarray(centre_channels, float), s.shape[:-1])
    nfft = scipy.fft.next_fast_len(2 * n)
    freq = np.fft.rfftfreq(nfft)
    hf = scipy.fft.rfft(h, nfft, axis=-1) * np.exp(2j * np.pi * freq * centre[..., None])
    hfc = np.conj(hf)

    def conv(a: Array, kern: Any) -> Array:
        return scipy.fft.irfft(scipy.fft.rfft(a, nfft, axis=-1) * kern, nfft, axis=-1)[..., :n]

    u = s.copy()
    for _ in range(int(iterations)):
        est = np.maximum(conv(u, hf), 1e-12)
        u = u * conv(s / est, hfc)
    return u
