"""Power-law background of vibrational EEL spectra."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .eels_windows import Array, axis_reach, loss_window


def power_law_background(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    *,
    windows_meV: tuple[tuple[float, float], ...] = ((16.0, 20.0), (60.0, 70.0)),
) -> tuple[Array, Array]:
    """Power-law background ``A E^-r`` fitted (least squares in log-log) in the loss-side windows.

    The windows are intersected with the acquired range (:func:`background_windows`); a window left too
    narrow raises :class:`~.eels_windows.WindowError` with the reason.

    Returns
    -------
    background
        ``(..., n)`` model on the whole axis (0 where E <= 0).
    params
        ``(..., 2)``: A, r.
    """
    windows = background_windows(energy_meV, windows_meV)
    e_axis = np.asarray(energy_meV, float)
    if e_axis.ndim == 1:
        return _power_law_common_axis(e_axis, spectra, windows)
    s = np.asarray(spectra, float)
    batch, _n = s.shape[:-1], s.shape[-1]
    e = np.broadcast_to(e_axis, s.shape)
    mask = np.zeros(s.shape, bool)
    for lo, hi in windows:
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


def _power_law_common_axis(
    e: Array, spectra: ArrayLike, windows: tuple[tuple[float, float], ...]
) -> tuple[Array, Array]:
    """:func:`power_law_background` on one axis for all spectra: the fit reads only the window channels and
    the model is evaluated once per spectrum (no full-size temporaries: a 256x256 map of 2048 channels is 1 GB
    per float64 array)."""
    s = np.asarray(spectra)
    batch, n = s.shape[:-1], s.shape[-1]
    flat = s.reshape(-1, n)
    mask = np.zeros(n, bool)
    for lo, hi in windows:
        mask |= (e >= lo) & (e <= hi)
    lx = np.log(e[mask])
    ly = np.log(np.maximum(flat[:, mask].astype(float), 1e-30))
    dx = lx - lx.mean()
    my = ly.mean(-1)
    slope = ((ly - my[:, None]) @ dx) / (dx @ dx)
    inter = my - slope * lx.mean()
    params = np.stack([np.exp(inter), -slope], axis=-1)
    pos = e > 0
    bg = np.zeros((flat.shape[0], n))
    bg[:, pos] = np.exp(inter[:, None] + slope[:, None] * np.log(e[pos])[None, :])
    return bg.reshape(batch + (n,)), params.reshape(batch + (2,))


def background_windows(
    energy_meV: ArrayLike, windows_meV: tuple[tuple[float, float], ...], *, min_channels: int = 2
) -> tuple[tuple[float, float], ...]:
    """The loss-side background windows intersected with the acquired axis (ZLP at 0 meV).

    Every window must keep ``min_channels`` channels and half its width (each one pins the power law at
    its energy), else :class:`~.eels_windows.WindowError` says which and why.
    """
    where = axis_reach(energy_meV)
    return tuple(loss_window((float(lo), float(hi)), where, "the background window", min_channels=min_channels)
                 for lo, hi in windows_meV)
