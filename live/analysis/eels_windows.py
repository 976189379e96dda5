"""Energy axis and energy windows of vibrational EEL spectra: offset and dispersion of a batch, how far the
acquired range reaches on each side of the zero-loss peak, and windows intersected with it.

The energy axis is uniform, ``energy_meV[j] = energy_offset_meV + j * dispersion_meV`` (one axis for all
spectra or one per spectrum, ``(..., n_channels)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

_ROWS = 1024
"""Spectra per block of the row-wise steps that run on parallel threads (alignment, spill-model samples,
log-ratio bins): their temporaries stay in cache."""


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


# ---------------------------------------------------------------------------------------------- windows
class WindowError(ValueError):
    """An energy window that the acquired range (or the channel width) leaves too narrow to use.

    The message is the one-line reason, e.g. ``gain side ends at -120 meV: the zero-loss tail window 130-200
    meV has 0 meV left``.
    """


MIN_FRACTION = 0.5
"""Smallest part of a window's nominal width that must remain after intersecting it with the acquired range."""


@dataclass(frozen=True)
class Reach:
    """How far the acquired energy axis reaches beyond the zero-loss centre, for every spectrum of a batch.

    Attributes
    ----------
    loss_meV, gain_meV
        Smallest distance (meV, >= 0) from a spectrum's zero-loss centre to the last (first) channel.
    dispersion_meV
        Channel width.
    """

    loss_meV: float
    gain_meV: float
    dispersion_meV: float

    def side(self, side: str) -> float:
        """The reach of ``"loss"`` or ``"gain"``."""
        return self.loss_meV if side == "loss" else self.gain_meV


def reach(off: ArrayLike, disp: float, n: int, centre: ArrayLike) -> Reach:
    """:class:`Reach` of spectra with axis offsets ``off`` and zero-loss centres ``centre`` (meV, same shape)."""
    o = np.asarray(off, float).reshape(-1)
    c = np.broadcast_to(np.asarray(centre, float), o.shape)
    if o.size == 0:
        return Reach(0.0, 0.0, float(disp))
    loss = float(np.min(o + disp * (n - 1) - c))
    gain = float(np.min(c - o))
    return Reach(max(loss, 0.0), max(gain, 0.0), float(disp))


def axis_reach(energy_meV: ArrayLike, centre_meV: float = 0.0) -> Reach:
    """:class:`Reach` of one energy axis ``(n,)`` (or ``(..., n)``) whose zero-loss centre is ``centre_meV``."""
    e = np.asarray(energy_meV, float)
    n = e.shape[-1]
    disp = float(np.mean(e[..., 1] - e[..., 0])) if n > 1 else 1.0
    return reach(e[..., 0], disp, n, centre_meV)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.3g}"


def clip_window(
    window: tuple[float, float],
    where: Reach,
    side: str,
    label: str,
    *,
    min_channels: int = 3,
    min_fraction: float = MIN_FRACTION,
    margin_channels: float = 1.0,
) -> tuple[tuple[float, float] | None, str]:
    """Intersect an ``|E - centre|`` window with the range acquired on one side.

    Parameters
    ----------
    window
        ``(lo, hi)`` in meV from the zero-loss centre.
    where
        What the axis reaches (:func:`reach`).
    side
        ``"loss"`` or ``"gain"``.
    label
        Name of the window in the reason, e.g. ``"the zero-loss tail window"``.
    min_channels, min_fraction
        The window is usable if it keeps at least ``min_channels`` channels and ``min_fraction`` of its width.
    margin_channels
        Channels kept free at the end of the axis (interpolation partners, sub-channel centres).

    Returns
    -------
    window, reason
        The window used (``None`` if too narrow) and, if too narrow, the one-line reason.
    """
    lo, hi = float(window[0]), float(window[1])
    disp = where.dispersion_meV
    end = where.side(side) - margin_channels * disp
    top = min(hi, end)
    width = max(top - lo, 0.0)
    channels = int(np.floor(width / disp + 1e-9))
    name = f"{label} {_fmt(lo)}-{_fmt(hi)} meV"
    if channels < min_channels and width >= min_fraction * (hi - lo):
        return None, f"{name} spans {channels} channels at {disp:g} meV per channel (needs {min_channels})"
    if channels < min_channels or width < min_fraction * (hi - lo):
        sign = "+" if side == "loss" else "-"
        return None, f"{side} side ends at {sign}{_fmt(where.side(side))} meV: {name} has {_fmt(width)} meV left"
    return (lo, top), ""


def both_sides(
    window: tuple[float, float],
    where: Reach,
    label: str,
    *,
    min_channels: int = 3,
    min_fraction: float = MIN_FRACTION,
    margin_channels: float = 1.0,
) -> tuple[float, float]:
    """``window`` intersected with the range acquired on both sides (the narrower one); raises :class:`WindowError`."""
    used: list[tuple[float, float]] = []
    for side in ("loss", "gain"):
        w, reason = clip_window(window, where, side, label, min_channels=min_channels, min_fraction=min_fraction,
                                margin_channels=margin_channels)
        if w is None:
            raise WindowError(reason)
        used.append(w)
    return used[0][0], min(used[0][1], used[1][1])


def zlp_windows(
    windows: tuple[tuple[float, float], ...], where: Reach, *, min_channels: int = 3
) -> tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]]:
    """The zero-loss fit windows used on the loss and the gain side.

    Each window is intersected with each side's range and kept on the sides where it stays usable
    (:func:`clip_window`); every window must remain on one side at least (the near window fixes the
    width, the tail window the shape of the symmetric model), else :class:`WindowError` says why.
    """
    loss: list[tuple[float, float]] = []
    gain: list[tuple[float, float]] = []
    for i, win in enumerate(windows):
        label = "the zero-loss window" if i == 0 else "the zero-loss tail window"
        kept, reasons = 0, []
        for side, out in (("loss", loss), ("gain", gain)):
            w, reason = clip_window(win, where, side, label, min_channels=min_channels)
            if w is None:
                reasons.append(reason)
            else:
                out.append(w)
                kept += 1
        if not kept:
            if "spans" in reasons[0]:  # too few channels: the same on both sides
                raise WindowError(reasons[0])
            disp = where.dispersion_meV
            left = [max(min(win[1], where.side(s) - disp) - win[0], 0.0) for s in ("loss", "gain")]
            raise WindowError(
                f"{label} {_fmt(win[0])}-{_fmt(win[1])} meV is too narrow on both sides: loss side ends at "
                f"+{_fmt(where.loss_meV)} meV ({_fmt(left[0])} meV left), gain side at -{_fmt(where.gain_meV)} meV "
                f"({_fmt(left[1])} meV left)"
            )
    return tuple(loss), tuple(gain)


def loss_window(
    window: tuple[float, float], where: Reach, label: str, *, min_channels: int = 3, min_fraction: float = MIN_FRACTION
) -> tuple[float, float]:
    """``window`` (energies on the loss side) intersected with the acquired range; raises :class:`WindowError`."""
    w, reason = clip_window(window, where, "loss", label, min_channels=min_channels, min_fraction=min_fraction,
                            margin_channels=0.0)
    if w is None:
        raise WindowError(reason)
    return w


def near_window_for_resolution(
    windows: tuple[tuple[float, float], ...], fwhm_meV: float, *, fwhm_multiple: float | None, max_meV: float,
    from_meV: float,
) -> tuple[tuple[float, float], ...]:
    """The zero-loss fit windows with the near one (the first) reaching at least ``fwhm_multiple`` FWHM.

    The zero-loss peak's shape (its exponent m above all) is measured on its flank, about 1-3 FWHM from the
    centre; a fixed near window (6-30 meV) covers 0.7-3.6 FWHM at 8.3 meV resolution but only 0.4-2 FWHM at
    15 meV, where the tail under the thermometry window is then extrapolated from too little flank.  The upper
    end becomes ``fwhm_multiple x fwhm_meV`` rounded to 5 meV (so that one spectrum and a batch whose starting
    widths differ slightly get the same window), at most ``max_meV``, where that reaches ``from_meV`` (the start
    of the spill model's signal range, which then starts at the window's end); otherwise, and with
    ``fwhm_multiple=None``, the windows stay as given.
    """
    if fwhm_multiple is None or not windows or not np.isfinite(fwhm_meV):
        return windows
    lo, hi = windows[0]
    reach_meV = 5.0 * round(float(fwhm_multiple) * float(fwhm_meV) / 5.0)
    if reach_meV < max(float(from_meV), float(hi)):
        return windows
    new_hi = min(float(max_meV), reach_meV)
    return ((float(lo), new_hi),) + tuple(windows[1:])
