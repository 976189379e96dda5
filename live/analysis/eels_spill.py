"""Spill model: the resolution-deconvolved phonon signal that predicts what the resolution tails spill
into the zero-loss-fit windows and how they offset the detailed-balance log ratio."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse
from numpy.typing import ArrayLike, NDArray

from ._threads import fft_workers, row_blocks, thread_map
from .eels_pearson7 import Nodes, channel_nodes
from .eels_windows import _ROWS, Array, Reach, _axis, _floating
from .eels_windows import reach as reach_of
from .eels_zlp_shapes import NPARAMS, PEAK, shape_f, zlp_model


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
        w = fft_workers()
        return scipy.fft.irfft(
            scipy.fft.rfft(source, self.nfft, axis=-1, workers=w) * kern, self.nfft, axis=-1, workers=w
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


def grouping_by_size(groups: int | ArrayLike | None, k: int) -> bool:
    """Whether ``groups`` asks for groups of similar spectra of about that size (rather than labels or none).

    Also for ``k`` up to the size: a batch of a few spectra (e.g. a row of a map of two materials) must not
    share one deconvolution unchecked either.
    """
    return np.ndim(groups) == 0 and groups is not None and 1 < int(groups) and k > 1  # type: ignore[arg-type]


EQUIVALENCE_Z = 3.0
"""Spectra share a group's deconvolution only if the reduced chi-square of their amplitude-normalised signal
against the group's mean is below ``1 + EQUIVALENCE_Z sqrt(2 / n_samples)`` (consistent with counting noise)."""
EQUIVALENCE_SHAPE = (0.01, 0.03)
"""... and their zero-loss FWHM and Pearson VII exponent m within these relative differences of the group's mean
(the group's resolution function blurs the signal of each member)."""


def _equivalent_groups(
    obs: Array, var: Array, amp: Array, shape: Array, loss: NDArray[np.bool_], size: int, rounds: int = 3
) -> tuple[NDArray[np.intp], int]:
    """Groups of about ``size`` spectra shown equivalent for the spill model; the others alone.

    Candidate groups of similar spectra come from :func:`_similar_groups` (principal components of the
    loss-side signal).  A member stays in its group only if its signal per unit ZLP amplitude ``obs / amp``
    agrees with the group's mean within its counting noise ``var / amp^2`` (:data:`EQUIVALENCE_Z`) and its
    resolution shape with the group's (:data:`EQUIVALENCE_SHAPE`); the group's mean is then recomputed from the
    members kept and the test repeated once.  The rejected spectra are grouped again among themselves
    (``rounds`` times); what remains is deconvolved one spectrum at a time.  So a map of several materials
    (or a gradient) never has a spectrum's spill and resolution offset predicted from another material's signal.
    """
    k, n_s = obs.shape
    f = obs / amp[:, None]
    inv_v = amp[:, None] ** 2 / var
    limit = 1.0 + EQUIVALENCE_Z * np.sqrt(2.0 / n_s)
    tol_w, tol_m = EQUIVALENCE_SHAPE
    final = np.full(k, -1, np.intp)
    n_final = 0
    todo = np.arange(k)
    for _ in range(int(rounds)):
        if todo.size < 2:
            break
        cand, n_cand = _similar_groups(f[todo][:, loss], size)
        ok = np.ones(todo.size, bool)
        for _check in range(2):
            g = np.where(ok, cand, n_cand)  # rejected members in an extra (ignored) group
            wsum = np.maximum(_group_sum(np.where(ok, amp[todo], 0.0)[:, None], g, n_cand + 1), 1e-300)
            mean = _group_sum(np.where(ok[:, None], obs[todo], 0.0), g, n_cand + 1) / wsum
            cnt = _group_sum(ok[:, None].astype(float), g, n_cand + 1)[:, 0]
            sh = _group_sum(np.where(ok[:, None], shape[todo], 0.0), g, n_cand + 1) / np.maximum(cnt, 1.0)[:, None]
            # a candidate group whose members were all rejected has a sum ~0: the ratios overflow to inf (not similar)
            with np.errstate(over="ignore"):
                # the member is part of the mean: the difference has variance (1 - its weight) var
                frac = np.clip(amp[todo] / wsum[cand, 0], 0.0, 1.0)
                rel = np.abs(shape[todo] / np.maximum(sh[cand], 1e-300) - 1.0)
            chi2 = np.einsum("kn,kn->k", (f[todo] - mean[cand]) ** 2, inv_v[todo]) / n_s / np.maximum(1.0 - frac, 1e-3)
            ok &= (chi2 <= limit) & (rel[:, 0] <= tol_w) & (rel[:, 1] <= tol_m) & (cnt[cand] >= 2)
        kept = todo[ok]
        if kept.size:
            _, ids = np.unique(cand[ok], return_inverse=True)
            final[kept] = n_final + ids.reshape(-1)
            n_final += int(ids.max()) + 1
        todo = todo[~ok]
    final[todo] = n_final + np.arange(todo.size)
    return final, n_final + todo.size


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
    order: int = 1,
    shape: str = "pearson7",
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
        their order, and a spectrum stays in its group only if its signal and resolution agree with the
        group's within the counting noise (:func:`_equivalent_groups`; else it is deconvolved alone); or
        ``(k,)`` labels of the groups (taken as given); ``None`` or 1: one deconvolution per spectrum.
    order
        Gauss-Legendre nodes per channel of the subtracted zero-loss model (``ZLPFit.order``; 1: channel centres).
    shape
        Zero-loss shape family of ``params`` (``ZLPFit.shape``).
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    return _signal_model(
        off.reshape(-1),
        disp,
        s.reshape(-1, n),
        np.asarray(params, float).reshape(-1, NPARAMS[shape]),
        signal_range_meV=signal_range_meV,
        extent_meV=extent_meV,
        coarse=coarse,
        iterations=iterations,
        groups=groups,
        nodes=channel_nodes(order, disp) if order > 1 else None,
        shape=shape,
    )


ACCELERATE = True
"""Lucy-Richardson iterations of the spill model with Biggs-Andrews acceleration (about 3x fewer iterations for
the same convergence of the resolution offset)."""


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
    reach: Reach | None = None,
    accelerate: bool = ACCELERATE,
    nodes: Nodes | None = None,
    shape: str = "pearson7",
) -> SignalModel:
    """:func:`signal_model` on ``(k, n)`` spectra with offsets ``(k,)`` and parameters ``(k, 4)``.

    ``reach``: the acquired range on each side (default: from the axis); samples beyond it are not used.
    ``nodes``: channel integration of the subtracted zero-loss model (:func:`~.eels_pearson7.channel_nodes`).
    """
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
    if reach is None:
        reach = reach_of(off, disp, flat.shape[1], c)
    # only the samples in the signal range (both sides) that were acquired are used: the LR source and the
    # data live there (a sample reaches half a coarse step and one interpolation partner beyond its energy)
    edge = 0.5 * h + disp
    in_range = (np.abs(ax) >= lo) & (np.abs(ax) <= hi) & (ax <= reach.loss_meV - edge) & (ax >= edge - reach.gain_meV)
    cols = np.flatnonzero(in_range)
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if cols.size else []
    obs = np.empty((k, cols.size))
    var = np.empty((k, cols.size)) if grouping_by_size(groups, k) else None

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
            if var is not None:  # Poisson variance of the sample: the counts over min(coarse, 2) channels
                var[rows, done : done + count] = np.maximum(data, 1.0) / min(coarse, 2)
            data -= shape_f(shape)(np.broadcast_to(ax[run], data.shape), pz[rows], nodes)
            obs[rows, done : done + count] = data
            done += count

    thread_map(observe, row_blocks(k, _ROWS), workers)
    amp = np.maximum(p[:, 0], 1e-30)
    features = obs[:, ax[cols] > 0]
    if var is not None and features.shape[1] >= 2:
        group, n_groups = _equivalent_groups(obs, var, amp, p[:, 2:4], ax[cols] > 0, int(groups))  # type: ignore[arg-type]
    else:
        group, n_groups = _groups(groups, k)
    cnt = np.maximum(_group_sum(np.ones((k, 1)), group, n_groups), 1.0)
    obs_g = np.zeros((n_groups, ax.size))
    obs_g[:, cols] = _group_sum(obs, group, n_groups) / np.maximum(_group_sum(amp[:, None], group, n_groups), 1e-30)
    shape_g = _group_sum(p[:, 2:4], group, n_groups) / cnt  # the resolution: the peak alone (no tails)
    mask = in_range.astype(float)
    nfft = scipy.fft.next_fast_len(2 * ax.size)
    lag = np.arange(nfft)
    lag = np.where(lag < nfft // 2, lag, lag - nfft) * h
    kern = zlp_model(lag[None, :], np.column_stack([np.ones(n_groups), np.zeros(n_groups), shape_g]), PEAK[shape])
    kern = kern / kern.sum(-1, keepdims=True)  # type: ignore[union-attr]
    kf = scipy.fft.rfft(kern.astype(np.float32), axis=-1, workers=fft_workers())
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
        ks_fft = scipy.fft.rfft(ks, axis=-1, workers=fft_workers())
        sub = SignalModel(ax[i0:i1].astype(float), np.zeros((0, size)), ks_fft, n_sub)
    else:
        sub, i0, i1 = model, 0, ax.size
    ms = mask[i0:i1]
    os_ = o[:, i0:i1]
    norm = np.maximum(sub._convolve(np.broadcast_to(ms, os_.shape), sub.kernel_fft), 1e-12)
    u = np.maximum(os_, 1e-9 * np.maximum(o.max(-1, keepdims=True), 1e-30)) * ms
    inv_norm = ms / norm
    floor = 1e-9 * np.maximum(o.max(-1, keepdims=True), 1e-30) * ms
    u_prev = g_prev = None
    y = u
    for _ in range(int(iterations)):
        est = sub._convolve(y, sub.kernel_fft)
        np.maximum(est, 1e-30, out=est)
        np.divide(os_, est, out=est)
        new = y * sub._convolve(est, sub.kernel_fft)
        new *= inv_norm
        if not accelerate:
            u = y = new
            continue
        # Biggs-Andrews vector extrapolation: the next iterate starts from u + alpha (u - u_prev), alpha from
        # the correlation of successive LR steps (per group, in [0, 0.95]); positivity kept by a floor
        g = new - y
        alpha = np.zeros((len(g), 1), np.float32)
        if g_prev is not None:
            num = np.einsum("kn,kn->k", g, g_prev)
            den = np.maximum(np.einsum("kn,kn->k", g_prev, g_prev), 1e-30)
            alpha = np.clip(num / den, 0.0, 0.95).astype(np.float32)[:, None]
        u_prev, u, g_prev = u, new, g
        y = np.maximum(u + alpha * (u - u_prev), floor).astype(np.float32) if alpha.any() else u
    if sub is not model:
        u_full = np.zeros((n_groups, ax.size), np.float32)
        u_full[:, i0:i1] = u
        u = u_full
    model.group = group
    model.scale = amp
    model.group_signal = u
    model.intrinsic = u[group] * amp[:, None].astype(np.float32)
    return model
