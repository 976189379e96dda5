"""A Pearson VII zero-loss peak with symmetric power-law tails: ``A (P7(E - c; w, m) + b (|E - c| / E_ref)^-p)``.

A detector's point-spread function has wings that fall as a power of the distance (charge spreading, scattered
light in the scintillator), and they are the same on the energy-loss and the energy-gain side: a term
``b |E|^-p`` that the Pearson VII and the pseudo-Voigt do not have.  Being symmetric, it is subtracted from both
sides like the peak itself, so detailed balance stays exact; a background on one side only is not described (the
fit's chi-square then refuses it).

Six parameters ``(A, c, w, m, b, p)``: the Pearson VII's four, ``b`` the tails' height at ``|E - c| = E_ref``
(:data:`E_REF_MEV`) per unit peak height (the whole model stays linear in ``A``: the fit re-solves it exactly) and
``p`` their exponent.  The tails are fitted where they are a power law, beyond the resolution-limited core (where
their onset is not known), so the core's width is not in the fit windows: the FWHM is held at its start (its
Jacobian column is 0, :data:`FIXED`) and taken from a fit of the peak alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from .eels_pearson7 import Nodes, _p7_fj
from .eels_windows import Array

E_REF_MEV = 50.0
"""Energy at which the tails' height ``b`` is given."""

B_BOUNDS = (0.0, 1.0)
"""Range of ``b`` (tails per unit peak height at :data:`E_REF_MEV`): not negative (no tails is the peak alone)."""

P_BOUNDS = (1.0, 4.5)
"""Range of the exponent ``p``: steeper than 1 (a finite integral), flatter than the Pearson VII's own tail
(``2 m`` = 5 at m = 2.5), from which it could otherwise not be told apart."""

P_START = 3.0
"""Starting exponent."""

FIXED = (0, 2)
"""Parameters held at their starting values, the peak height and the FWHM (:func:`core_of`): the core is not in the
fit windows, and the Pearson VII's tail there is otherwise a second power law that the fit cannot tell apart from
the tails (8.3 meV peak under tails of 2e-4 per meV at 50 meV: height 3x low, bias +3.7 %, pull 3.7)."""


def _pw_fj(x: NDArray[Any], p: NDArray[Any], nodes: Nodes | None = None) -> tuple[NDArray[Any], NDArray[Any]]:
    """Model ``(k, n)`` and Jacobian ``(k, 6, n)`` (held columns 0) for ``p`` ``(k, 6)`` in the dtype of ``x``.

    Inside ``1.5 w`` of the centre (never in the fit windows, where the peak dominates) the tails are held at their
    value there (finite at the centre).
    """
    k, n = x.shape
    dt = x.dtype
    f4, j4 = _p7_fj(x, np.ascontiguousarray(p[:, :4]), nodes)
    f = f4
    jac = np.zeros((k, 6, n), dt)
    jac[:, :4] = j4
    jac[:, list(FIXED)] = 0.0
    a, c, w, _, b, q = (p[:, j, None].astype(dt) for j in range(6))
    offs, wts = nodes if nodes is not None else (np.zeros(1), np.ones(1))
    for off, wt in zip(offs, wts, strict=True):
        d = x + dt.type(off) - c
        t = np.maximum(np.abs(d), dt.type(1.5) * w)
        lt = np.log(t / dt.type(E_REF_MEV))
        tail = np.exp(-q * lt) * dt.type(wt)  # (|E - c| / E_ref)^-p, times the node's weight
        f += a * b * tail
        jac[:, 1] += np.where(np.abs(d) > 1.5 * w, a * b * q * tail * np.sign(d) / t, 0.0).astype(dt)
        jac[:, 4] += a * tail
        jac[:, 5] -= a * b * tail * lt
    return f, jac


def _pw_f(x: Array, p: Array, nodes: Nodes | None = None, *, dtype: Any = np.float32) -> Array:
    """The model ``(k, n)`` at ``x`` ``(k, n)`` for ``p`` ``(k, 6)``, computed in ``dtype``, as float64."""
    return _pw_fj(np.asarray(x).astype(dtype), np.asarray(p, float), nodes)[0].astype(np.float64)


def tails_start(x: Array, y: Array, amp: Array, centre: Array) -> Array:
    """Starting ``b`` ``(k,)`` from window channels far from the peak (``x``, ``y`` ``(k, n)``): the median of
    ``y / (A (|E - c| / E_ref)^-p)`` at :data:`P_START` over the channels beyond 100 meV (all where none are)."""
    d = np.abs(x - centre[:, None])
    r = y / np.maximum(amp[:, None], 1e-30) * (np.maximum(d, 1e-3) / E_REF_MEV) ** P_START
    far = d > 100.0
    r = np.where(far, r, np.nan) if far.any(axis=1).all() else r
    return np.clip(np.nanmedian(r, axis=1), 1e-9, B_BOUNDS[1])


def core_of(flat: Array, off: Array, disp: float, centre: Array) -> tuple[Array, Array]:
    """Peak height and FWHM ``(k,)`` of each spectrum: the vertex of a parabola through the three highest channels
    and the distance between the half-maximum crossings (linear interpolation between channels).

    The width the tails' fit holds: it is set by the core, which the power-law fit windows leave out, and the
    crossings are where the peak is ~100x any tails (a Pearson VII fit over windows with tails in them widens
    the peak instead: 18.8 meV for an 8.3 meV peak under tails of 2e-4 per meV at 50 meV).
    """
    k, n = flat.shape
    c_ch = np.clip(np.round((centre - off) / disp).astype(np.intp), 0, n - 1)
    reach = max(3, int(np.ceil(60.0 / disp)))
    j = np.arange(-reach, reach + 1)
    ix = np.clip(c_ch[:, None] + j[None, :], 0, n - 1)
    y = np.take_along_axis(flat, ix, axis=1).astype(float)
    top = np.clip(np.argmax(y[:, reach - 3 : reach + 4], axis=1) + reach - 3, 1, 2 * reach - 1)
    rows = np.arange(k)
    ym, y0, yp = y[rows, top - 1], y[rows, top], y[rows, top + 1]
    curv = np.minimum(ym + yp - 2.0 * y0, -1e-30)
    height = y0 - 0.125 * (yp - ym) ** 2 / curv
    half = 0.5 * height
    below = y < half[:, None]
    out = np.empty(k)
    for r in range(k):  # the first channel under half the peak on each side of the top
        left = np.flatnonzero(below[r, : top[r]])
        right = np.flatnonzero(below[r, top[r] :])
        if not left.size or not right.size:
            out[r] = np.nan
            continue
        i0, i1 = left[-1], top[r] + right[0]
        x0 = i0 + (half[r] - y[r, i0]) / (y[r, i0 + 1] - y[r, i0])
        x1 = i1 - 1 + (half[r] - y[r, i1 - 1]) / (y[r, i1] - y[r, i1 - 1])
        out[r] = disp * (x1 - x0)
    return height, out
