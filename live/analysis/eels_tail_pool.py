"""One shape of the zero-loss peak's power-law tails for all the spectra of a session.

With power-law tails (:mod:`.eels_zlp_power`) each spectrum's temperature is limited by how well its own windows
and log ratio fix the Pearson VII exponent m (``dT/dm`` ~ -27 K per unit at 300 K; profiled and marginalised in
:mod:`.eels_power_profile`): on the corpus's background_power_law line the scatter is 1.3-1.5x the counting limit,
1.0-1.2x with the true m.  The exponents m and p describe the spectrometer's resolution function, not the
specimen, and every spectrum of a line scan or map is taken with the same spectrometer within minutes: the
session's spectra measure one m and one p.  Pooled, they are known to ~1/sqrt(N) of one spectrum's uncertainty:

* m from the sum of the spectra's joint chi-square profiles (each Birge-scaled, its least subtracted): the
  profile likelihood of a common m, its error where the sum rises by 1 (times the Birge ratio of the sum);
* p, with m held there, as the inverse-variance mean of the spectra's fitted p.

The tails' height (per unit peak height) stays free per spectrum: it follows each sum's core, which the energy
alignment blurs differently (its spread is ~1.4-1.9x the fit errors on the corpus).  Whether the spectra agree is
tested, not assumed: where the summed profile at the common m, or the p's spread, exceeds its chi-square's
99.9 % point, the shape is not shared and each spectrum keeps its own temperature (the reason is stated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from .eels_power_profile import ExponentProfile
from .eels_windows import Array
from .eels_zlp import fit_zlp_pearson7
from .eels_zlp_shapes import POWER

MIN_SPECTRA = 8
"""Fewest spectra with a bounded m profile for a shared tail shape."""

M_STEP = 0.02
"""Step in m of the finite differences (the pooled p's slope ``dp_dm``; T's dependence on m): T and p are linear in m
over it."""

P_STEP = 0.01
"""Step in p of T's finite difference."""

CONSISTENCY_P = 1e-3
"""The spectra share the tail shape unless their spread has a smaller chi-square probability than this."""


@dataclass(frozen=True)
class TailShape:
    """The shared exponents of the zero-loss peak (m) and of its power-law tails (p), with their errors.

    ``shared`` is False where they could not be pooled (``reason`` says why); ``m``, ``p`` are then NaN.
    ``chi2_m``/``chi2_p`` are the spread of the spectra around them, for ``n - 1`` degrees of freedom.  ``dp_dm``:
    how the pooled p follows m (the windows trade the two off: with p held, T moves ~6x more with m than with p
    following it, so an error in m is propagated along ``p(m)``; ``p_err`` is p's error at the pooled m).
    """

    m: float
    m_err: float
    p: float
    p_err: float
    n: int
    dp_dm: float = 0.0
    chi2_m: float = float("nan")
    chi2_p: float = float("nan")
    reason: str = ""

    @property
    def shared(self) -> bool:
        return np.isfinite(self.m) and np.isfinite(self.p)

    def attrs(self) -> dict[str, float | int | str]:
        """The shape as result attributes (``zlp_m``, ``zlp_m_err``, ``zlp_p``, ``zlp_p_err``, ``zlp_shape_spectra``,
        or ``zlp_shape_not_shared`` with the reason)."""
        if not self.shared:
            return {"zlp_shape_not_shared": self.reason}
        return {"zlp_m": self.m, "zlp_m_err": self.m_err, "zlp_p": self.p, "zlp_p_err": self.p_err,
                "zlp_shape_spectra": self.n}


def _not_shared(n: int, reason: str, **kw: float) -> TailShape:
    return TailShape(np.nan, np.nan, np.nan, np.nan, n, reason=reason, **kw)


def pool_exponent(grid: ArrayLike, chi2: ArrayLike, birge2: ArrayLike,
                  step: float = 0.001) -> tuple[float, float, float]:
    """The common m of spectra with joint chi-square profiles ``chi2`` ``(k, len(grid))`` over ``grid``.

    Returns ``(m, m_err, spread)``: the least of the summed Birge-scaled profiles (a cubic spline through the grid
    nodes finite for every spectrum, in steps of ``step``), the half-width where it rises by 1 (times the sum's Birge
    ratio where ``spread / (k - 1) > 1``; NaN where that interval reaches the grid's end) and ``spread``, the sum at
    ``m`` (the spectra's disagreement; ~ chi-square of ``k - 1`` degrees of freedom when they share m).  All NaN
    where fewer than 4 contiguous nodes are finite.
    """
    from scipy.interpolate import CubicSpline

    g = np.asarray(grid, float)
    c = np.asarray(chi2, float).reshape(-1, g.size)
    rel = (c - np.min(c, axis=1, keepdims=True)) / np.asarray(birge2, float).reshape(-1, 1)
    total = rel.sum(axis=0)
    finite = np.flatnonzero(np.isfinite(total))
    if finite.size < 4 or finite[-1] - finite[0] != finite.size - 1:
        return np.nan, np.nan, np.nan
    fine = np.arange(g[finite[0]], g[finite[-1]] + 0.5 * step, step)
    prof = CubicSpline(g[finite], total[finite])(fine)
    i = int(np.argmin(prof))
    spread = float(prof[i])
    scale = max(1.0, spread / max(len(c) - 1, 1))
    inside = fine[prof - spread <= scale]
    if inside[0] == fine[0] or inside[-1] == fine[-1]:  # the interval reaches the grid's end: m not bounded
        return float(fine[i]), np.nan, spread
    return float(fine[i]), float(0.5 * (inside[-1] - inside[0])), spread


def pool_tail_shape(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    profile: ExponentProfile,
    *,
    zlp_windows_meV: tuple[tuple[float, float], ...],
    read_noise_counts: float = 0.0,
    workers: int | None = None,
) -> TailShape:
    """The tail shape shared by ``spectra`` ``(k, n)`` (see the module docstring).

    Parameters
    ----------
    energy_meV
        The common energy axis ``(n,)``.
    spectra
        The session's summed spectra whose zero-loss model has power-law tails.
    profile
        Their m profiles (``TemperatureResult.m_profile`` of each, stacked: ``chi2`` ``(k, len(grid))``).
    zlp_windows_meV
        The zero-loss fit windows asked for (as for :func:`~.eels_thermometry.temperature`).

    Returns
    -------
    TailShape
        Not shared (with the reason) for fewer than :data:`MIN_SPECTRA` spectra with a bounded m, an m not bounded by
        the summed profile, or spectra that disagree (:data:`CONSISTENCY_P`).
    """
    s = np.asarray(spectra)
    use = np.asarray(profile.contained, bool).reshape(-1)
    k = int(use.sum())
    if k < MIN_SPECTRA:
        return _not_shared(k, f"{k} spectra with a bounded exponent m (needs {MIN_SPECTRA})")
    chi2 = np.asarray(profile.chi2, float).reshape(len(use), -1)[use]
    m, m_err, spread = pool_exponent(profile.grid, chi2, np.asarray(profile.birge2, float).reshape(-1)[use])
    if np.isfinite(spread) and stats.chi2.sf(spread, k - 1) < CONSISTENCY_P:
        return _not_shared(k, f"the spectra's zero-loss exponents m disagree (chi2 {spread:.1f} for {k - 1} degrees "
                              f"of freedom at m = {m:.3f}): each keeps its own", chi2_m=spread)
    if not np.isfinite(m_err):
        return _not_shared(k, f"the summed m profile of {k} spectra is not bounded within "
                              f"{profile.grid[0]:g}-{profile.grid[-1]:g}", chi2_m=spread)
    z0 = fit_zlp_pearson7(energy_meV, s[use], windows_meV=zlp_windows_meV, read_noise_counts=read_noise_counts,
                          workers=workers)
    if z0.shape != POWER:
        return _not_shared(k, f"the zero-loss fit of the {k} spectra together is {z0.shape}, not power-law tails")

    def tail_exponents(m_held: float) -> tuple[Array, Array]:  # each spectrum's p and its variance, m held
        start = np.array(z0.params, float).reshape(k, -1).copy()
        start[:, 3] = m_held
        z = fit_zlp_pearson7(energy_meV, s[use], windows_meV=z0.windows_meV, initial=start, shapes=(POWER,),
                             held_m=True, near_window_fwhm=None, signal_range_meV=z0.signal_range_meV, max_iter=100,
                             tol=1e-9, read_noise_counts=read_noise_counts, workers=workers)
        return np.asarray(z.params, float).reshape(k, -1)[:, 5], np.asarray(z.cov, float).reshape(k, 6, 6)[:, 5, 5]

    p_i, var = tail_exponents(m)
    ok = np.isfinite(p_i) & np.isfinite(var) & (var > 0)
    if ok.sum() < MIN_SPECTRA:
        return _not_shared(k, f"{int(ok.sum())} of {k} spectra have a finite tail exponent p at m = {m:.3f}",
                           chi2_m=spread)
    w = 1.0 / var[ok]
    p = float(np.sum(w * p_i[ok]) / w.sum())
    chi2_p = float(np.sum(w * (p_i[ok] - p) ** 2))
    if stats.chi2.sf(chi2_p, ok.sum() - 1) < CONSISTENCY_P:
        return _not_shared(k, f"the spectra's tail exponents p disagree (chi2 {chi2_p:.1f} for {int(ok.sum()) - 1} "
                              f"degrees of freedom at p = {p:.3f}): each keeps its own", chi2_m=spread, chi2_p=chi2_p)
    p_err = float(np.sqrt(max(1.0, chi2_p / (ok.sum() - 1)) / w.sum()))
    p_step = tail_exponents(m + M_STEP)[0][ok]
    dp_dm = float(np.sum(w * (p_step - p_i[ok])) / w.sum() / M_STEP)
    return TailShape(m, m_err, p, p_err, k, dp_dm=dp_dm, chi2_m=spread, chi2_p=chi2_p)


def stack_profiles(profiles: list[ExponentProfile]) -> ExponentProfile:
    """Profiles of single spectra (or batches) on one grid, stacked to ``(k, len(grid))``."""
    g = profiles[0].grid
    return ExponentProfile(g, np.concatenate([np.asarray(p.chi2, float).reshape(-1, g.size) for p in profiles]),
                           np.concatenate([np.asarray(p.birge2, float).reshape(-1) for p in profiles]),
                           np.concatenate([np.asarray(p.contained, bool).reshape(-1) for p in profiles]))


def shape_error_K(t0: Array, t_m: Array, t_p: Array, shape: TailShape) -> Array:
    """The temperature error from the shared shape's errors, in quadrature: ``T`` at ``(m + M_STEP, p + dp_dm
    M_STEP)`` (``t_m``) and at ``(m, p + P_STEP)`` (``t_p``) against ``t0``, times ``m_err`` and ``p_err`` (common
    to every spectrum: it does not average down over a line)."""
    return np.hypot((np.asarray(t_m) - t0) / M_STEP * shape.m_err, (np.asarray(t_p) - t0) / P_STEP * shape.p_err)
