"""Resolution offset of the detailed-balance log ratio: the instrument blurs loss and gain alike, which
offsets ``log(L/G)`` from ``E / k_B T`` by a deterministic, shape-dependent amount."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .eels_spill import SignalModel
from .eels_windows import Array

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
