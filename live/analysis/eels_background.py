"""Power-law background of vibrational EEL spectra."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .eels_windows import Array


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
