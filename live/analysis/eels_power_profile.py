"""The Pearson VII exponent of a zero-loss peak with power-law tails, profiled jointly with detailed balance.

Where the zero-loss model has symmetric power-law tails (:mod:`.eels_zlp_power`), its fit windows lie beyond the
core, and there the peak's own tail (``~ |E|^-2m``) and the power law trade off: the windows' chi-square is nearly
flat in ``m`` (2.15-2.55 within 2 units for a true 2.5), while the temperature is not (316 K at m = 2.1, 302 K at
2.5, for 300 K).  The log ratio of the thermometry window is a second measurement of the same model (its gain side
is mostly zero loss and tails): only the right ``m`` makes it a line through the origin (line chi-square 52 at
2.15, 16 at 2.5 on 33 bins).  So ``m`` is profiled on a grid, with the zero-loss fit repeated at each held ``m``
and the temperature computed from it, and marginalised: each ``m`` is weighted by ``exp(-Delta chi2 / 2)`` of the
joint chi-square (scaled by the Birge ratio; the grid's chi-square, temperature and error interpolated by cubic
splines), the fit and temperature repeated at the weighted mean ``m``, and the temperature's error gets the weighted
spread of ``T(m)``.  Not a parabola at the least chi-square: the windows' chi-square can have two minima (2.15 and
2.6 for a true 2.5, 17 units apart at most), where the parabola's curvature at one of them understated the ``m``
uncertainty (seed 3 of the corpus: two spectra at +2.8 and +3.1 sigma, pull RMS 1.32; marginalised 1.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .eels_windows import Array

M_GRID = tuple(float(v) for v in np.round(np.arange(1.8, 3.21, 0.1), 2))
"""Exponents m at which the zero-loss fit with power-law tails is repeated (held)."""


@dataclass(frozen=True)
class ExponentProfile:
    """The joint chi-square of each spectrum over the exponents m of :func:`profile_exponent`, kept so that the
    spectra of a session can share one m (:mod:`.eels_tail_pool`).

    ``chi2`` ``(..., len(grid))``: windows + log-ratio line, ``inf`` where not evaluated; ``birge2`` ``(...)`` the
    Birge ratio squared at the least; ``contained`` ``(...)``: m bounded within the grid.
    """

    grid: Array
    chi2: Array
    birge2: Array
    contained: Array

    def select(self, i: int | tuple[()]) -> ExponentProfile:
        """Spectrum ``i`` of a batch's profile (``()``: the whole)."""
        return ExponentProfile(self.grid, np.asarray(self.chi2)[i], np.asarray(self.birge2)[i],
                               np.asarray(self.contained)[i])


SPAN_CHI2 = 100.0
"""The profile's second pass uses the m whose joint chi-square is within this of the least (and two beyond)."""


def profile_exponent(zlp: Any, refit: Callable[[Array], Any], thermometry: Callable[[Any], Any],
                     grid: tuple[float, ...] = M_GRID) -> Any:
    """Temperature with the zero-loss exponent m chosen by the joint chi-square (see the module docstring).

    Parameters
    ----------
    zlp
        The zero-loss fit with power-law tails (:class:`~.eels_zlp.ZLPFit`, family ``pearson7_power``).
    refit
        ``refit(params)`` -> the same fit from ``params`` ``(..., 6)`` with m held.
    thermometry
        ``thermometry(zlp)`` -> :class:`~.eels_thermometry.TemperatureResult` from that zero-loss fit.
    grid
        The exponents tried.

    Returns
    -------
    TemperatureResult
        At the weighted mean m, with the spread of ``T(m)`` added to ``T_err_K`` and ``T_err_zlp_K``; NaN where
        the joint chi-square at either end of the grid is within ``8 birge^2`` of its least (m not bounded by the
        grid: ``m_unbounded``).
    """
    params = np.asarray(zlp.params, float)
    batch = params.shape[:-1]
    flat = params.reshape(-1, params.shape[-1])
    k = len(flat)
    g = np.asarray(grid, float)
    window = np.empty((g.size, k))
    temps = np.empty((g.size, k))
    fitted = np.empty((g.size,) + flat.shape)
    per_bin: list[Array] = []
    for i, m in enumerate(g):
        start = flat.copy()
        start[:, 3] = m
        z = refit(start.reshape(batch + (6,)))
        t = thermometry(z)
        window[i] = np.asarray(z.chi2_red).reshape(k) * z.dof
        temps[i] = np.asarray(t.T_K).reshape(k)
        fitted[i] = np.asarray(z.params).reshape(k, -1)
        w = np.asarray(t.weights).reshape(k, -1)
        resid = np.asarray(t.log_ratio).reshape(k, -1) - np.asarray(t.slope_per_meV).reshape(k, 1) * t.energy_meV
        per_bin.append(np.where(w > 0, w * resid**2, np.nan))
    # the line's chi-square over the bins used at every m (bins whose gain signal falls below min_snr at some m
    # come and go with T: counted everywhere or nowhere, else the profile jumps by their share); then again over
    # the m within SPAN_CHI2 of the least (and two beyond): bins lost only at m far from it count there too
    bins = np.stack(per_bin)
    rows = np.arange(k)
    used = np.ones((g.size, k), bool)
    for _ in range(2):
        common = np.all(np.isfinite(bins) | ~used[:, :, None], axis=0)
        line = np.where(common, bins, 0.0).sum(-1)
        joint = np.where(np.isfinite(window + line) & (common.sum(-1) > 1) & used, window + line, np.inf)
        best = np.argmin(joint, axis=0)
        with np.errstate(invalid="ignore"):  # no finite profile (inf - inf): nothing near, judged below
            near = joint - joint[best, rows] < SPAN_CHI2
        lo = np.clip(np.argmax(near, axis=0) - 2, 0, None)
        hi = np.clip(g.size + 1 - np.argmax(near[::-1], axis=0), None, g.size - 1)
        used = (np.arange(g.size)[:, None] >= lo) & (np.arange(g.size)[:, None] <= hi)
    dofs = z.dof + np.maximum(common.sum(-1) - 1, 1)
    birge2 = np.maximum(1.0, joint[best, rows] / np.maximum(dofs, 1))
    m_mean, var_t = _marginal(g, joint, temps, birge2)
    ends = np.stack([joint[np.argmax(np.isfinite(joint), axis=0), rows],
                     joint[g.size - 1 - np.argmax(np.isfinite(joint[::-1]), axis=0), rows]])
    with np.errstate(invalid="ignore"):  # a spectrum with no finite profile (inf - inf): not contained, no T
        contained = np.all(ends - joint[best, rows] > 8.0 * birge2, axis=0)
    start = fitted[best, rows].copy()
    start[:, 3] = np.where(np.isfinite(m_mean), m_mean, g[best])
    final = thermometry(refit(start.reshape(batch + (6,))))
    # an m not bounded by the grid (the weight reaches its ends) has no honest error: no temperature there
    extra = np.where(contained, np.sqrt(var_t), np.nan).reshape(batch)
    t_err = np.sqrt(np.asarray(final.T_err_K) ** 2 + extra**2)
    scale = np.where(np.asarray(final.T_err_K) > 0, t_err / np.asarray(final.T_err_K), 1.0)
    return replace(final, T_K=np.where(np.isfinite(extra), np.asarray(final.T_K), np.nan), T_err_K=t_err,
                   m_unbounded=~contained.reshape(batch),
                   T_err_zlp_K=np.sqrt(np.asarray(final.T_err_zlp_K) ** 2 + extra**2),
                   slope_err_per_meV=np.asarray(final.slope_err_per_meV) * scale,
                   m_profile=ExponentProfile(g, joint.T.reshape(batch + (g.size,)), birge2.reshape(batch),
                                             contained.reshape(batch)))


def _marginal(g: Array, joint: Array, temps: Array, birge2: Array, step: float = 0.005) -> tuple[Array, Array]:
    """Weighted mean ``m`` and variance of ``T(m)`` ``(k,)`` under weights ``exp(-(chi2 - min) / (2 birge2))``.

    ``joint``, ``temps`` ``(len(g), k)``; cubic splines through the finite nodes where they are a contiguous run of
    4 or more, the finite nodes alone elsewhere.  NaN where no node is finite.
    """
    from scipy.interpolate import CubicSpline

    k = joint.shape[1]
    m_mean, var_t = np.full(k, np.nan), np.full(k, np.nan)
    ok = np.isfinite(joint) & np.isfinite(temps)
    for c in np.flatnonzero(ok.any(axis=0)):
        run = np.flatnonzero(ok[:, c])
        if run.size >= 4 and run[-1] - run[0] == run.size - 1:  # a contiguous run of m: splines through it
            fine = np.arange(g[run[0]], g[run[-1]] + 0.5 * step, step)
            m, j, t = fine, CubicSpline(g[run], joint[run, c])(fine), CubicSpline(g[run], temps[run, c])(fine)
        else:  # the finite nodes alone
            m, j, t = g[run], joint[run, c], temps[run, c]
        w = np.exp(-(j - j.min()) / (2.0 * birge2[c]))
        w /= w.sum()
        m_mean[c] = (w * m).sum()
        var_t[c] = (w * (t - (w * t).sum()) ** 2).sum()
    return m_mean, var_t
