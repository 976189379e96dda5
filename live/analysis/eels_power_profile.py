"""The Pearson VII exponent of a zero-loss peak with power-law tails, profiled jointly with detailed balance.

Where the zero-loss model has symmetric power-law tails (:mod:`.eels_zlp_power`), its fit windows lie beyond the
core, and there the peak's own tail (``~ |E|^-2m``) and the power law trade off: the windows' chi-square is nearly
flat in ``m`` (2.15-2.55 within 2 units for a true 2.5), while the temperature is not (316 K at m = 2.1, 302 K at
2.5, for 300 K).  The log ratio of the thermometry window is a second measurement of the same model (its gain side
is mostly zero loss and tails): only the right ``m`` makes it a line through the origin (line chi-square 52 at
2.15, 16 at 2.5 on 33 bins).  So ``m`` is profiled on a grid, with the zero-loss fit repeated at each held ``m``
and the temperature computed from it; the ``m`` of the least joint chi-square (windows + line) is refined by a
parabola, the fit and temperature repeated there, and the temperature's error gets the profile's ``m``
uncertainty (``Delta chi2 = 1``, scaled by the Birge ratio) times ``dT/dm`` along the profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from .eels_windows import Array

M_GRID = tuple(float(v) for v in np.round(np.arange(1.8, 3.21, 0.1), 2))
"""Exponents m at which the zero-loss fit with power-law tails is repeated (held)."""


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
        At the chosen m, with the m uncertainty added to ``T_err_K`` and ``T_err_zlp_K``.
    """
    params = np.asarray(zlp.params, float)
    batch = params.shape[:-1]
    flat = params.reshape(-1, params.shape[-1])
    k = len(flat)
    g = np.asarray(grid, float)
    step = float(g[1] - g[0])
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
    # come and go with T: counted everywhere or nowhere, else the profile jumps by their share)
    bins = np.stack(per_bin)
    common = np.all(np.isfinite(bins), axis=0)
    line = np.where(common, bins, 0.0).sum(-1)
    joint = np.where(np.isfinite(window + line) & (common.sum(-1) > 1), window + line, np.inf)
    dofs = z.dof + np.maximum(common.sum(-1) - 1, 1)
    rows = np.arange(k)
    best = np.argmin(joint, axis=0)
    inner = np.clip(best, 1, g.size - 2)
    jm, j0, jp = joint[inner - 1, rows], joint[inner, rows], joint[inner + 1, rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        curv = (jm + jp - 2.0 * j0) / (2.0 * step**2)
        shift = np.where(curv > 0, (jm - jp) / (4.0 * curv * step), 0.0)
        m_best = np.where((best == inner) & np.isfinite(shift), g[inner] + np.clip(shift, -step, step), g[best])
        birge = np.sqrt(np.maximum(1.0, j0 / np.maximum(dofs, 1)))
        sigma_m = np.where((curv > 0) & (best == inner), birge / np.sqrt(curv), step)
        dt_dm = (temps[inner + 1, rows] - temps[inner - 1, rows]) / (2.0 * step)
    start = fitted[best, rows].copy()
    start[:, 3] = m_best
    final = thermometry(refit(start.reshape(batch + (6,))))
    extra = np.where(np.isfinite(dt_dm), dt_dm * sigma_m, np.nan).reshape(batch)
    t_err = np.sqrt(np.asarray(final.T_err_K) ** 2 + extra**2)
    scale = np.where(np.asarray(final.T_err_K) > 0, t_err / np.asarray(final.T_err_K), 1.0)
    return replace(final, T_err_K=t_err, T_err_zlp_K=np.sqrt(np.asarray(final.T_err_zlp_K) ** 2 + extra**2),
                   slope_err_per_meV=np.asarray(final.slope_err_per_meV) * scale)
