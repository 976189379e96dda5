"""Well-posed Gaussian peak fits of vibrational EELS spectra (e.g. cluster means), with or without starting centres.

Each peak is a Gaussian at the loss energy, convolved with the instrument resolution (the fitted zero-loss
peak) when the spectrum contains it.  The fit is bounded so that it cannot degenerate: intrinsic widths not
below a quarter of the resolution (narrower peaks are indistinguishable from it), heights not negative unless
asked, centres inside the peak window.  Without starting centres the number of peaks is chosen by an
information criterion (BIC by default) from 1 to ``n_peaks``, adding one peak at a time where the smoothed
residual is largest.  Errors come from the covariance ``(J^T J)^-1`` (pseudo-inverse: always finite), scaled by
the reduced chi-square; a fit that does not converge is marked in the table's ``converged`` column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
from numpy.typing import ArrayLike, NDArray

from .peak_models import FWHM_PER_SIGMA, Problem, plain_problem, zlp_problem
from .peak_resolution import fit_resolution, resolution_function

__all__ = [
    "PEAK_DTYPE",
    "PeakFit",
    "fit_peaks",
    "fit_gaussians",
    "fit_resolution",
    "resolution_function",
]

Array = NDArray[np.float64]

PEAK_DTYPE = np.dtype(
    [
        ("cluster", "i4"),
        ("centre_meV", "f8"),
        ("centre_err_meV", "f8"),
        ("fwhm_meV", "f8"),
        ("fwhm_err_meV", "f8"),
        ("area", "f8"),
        ("area_err", "f8"),
        ("converged", "i1"),  # 1: the optimiser converged; 0: it stopped (evaluation cap, non-finite model)
    ]
)


@dataclass
class PeakFit:
    """A peak fit with what it was fitted to, for figures and checks.

    Attributes
    ----------
    table
        ``PEAK_DTYPE`` rows sorted by centre (intrinsic, deconvolved centres, widths and areas).
    energy_meV, data, model, sigma
        The fitted channels, the data there, the model as fitted (convolved with the resolution, zero-loss
        peak and components included) and the standard deviations used as weights.
    n_peaks
        Number of peaks in the table (chosen by ``criterion`` unless fixed; peaks fitted beyond the window,
        for the tails of modes outside it, are part of the model but not of the table).
    criterion
        ``{n: value}`` of the information criterion for every number of peaks tried (empty when fixed).
    converged
        Whether the optimiser converged.
    resolution_fwhm_meV
        Resolution FWHM used for the lower bound of the widths (NaN without a resolution model).
    baseline
        The part of ``model`` that is not peaks (zero-loss peak, components, power law): ``data - baseline``
        shows the peaks.
    """

    table: NDArray[np.void]
    energy_meV: Array
    data: Array
    model: Array
    sigma: Array
    n_peaks: int
    criterion: dict[int, float] = field(default_factory=dict)
    converged: bool = True
    resolution_fwhm_meV: float = float("nan")
    baseline: Array = field(default_factory=lambda: np.zeros(0))



# ------------------------------------------------------------------------------------------ the fit
def _unit_shapes(prob: Problem, p: Array, n: int) -> Array:
    """Model columns for unit heights of the ``n`` peaks (linear in the heights)."""
    cols = []
    base = p.copy()
    f = prob.n_front
    base[f : f + 3 * n : 3] = 0.0
    m0 = prob.model(base, n)
    for i in range(n):
        q = base.copy()
        q[f + 3 * i] = 1.0
        cols.append(prob.model(q, n) - m0)
    return np.array(cols).reshape(n, -1)


def _linear_start(prob: Problem, p: Array, n: int, allow_negative: bool) -> Array:
    """Heights (and linear back parameters) by weighted linear least squares at fixed centres and widths."""
    f = prob.n_front
    q = p.copy()
    q[f : f + 3 * n : 3] = 0.0
    lin = f + 3 * n + prob.linear_back
    q[lin] = 0.0
    base = prob.model(q, n)
    cols = list(_unit_shapes(prob, q, n))
    for j in lin:
        r = q.copy()
        r[j] = 1.0
        cols.append(prob.model(r, n) - base)
    if not cols:
        return p
    a = np.array(cols).T / prob.sd[:, None]
    coef, *_ = np.linalg.lstsq(a, (prob.y - base) / prob.sd, rcond=None)
    out = p.copy()
    h = coef[:n]
    out[f : f + 3 * n : 3] = h if allow_negative else np.maximum(h, 0.0)
    out[lin] = coef[n:]
    return out


def _bounds(prob: Problem, n: int, window: tuple[float, float], min_sigma: float, allow_negative: bool
            ) -> tuple[Array, Array]:
    # centres may go up to two resolution widths beyond the window: the tail of a mode just outside it is
    # modelled by a peak there (and not reported) rather than by one pinned at the window's edge
    beyond = 2.0 * prob.resolution_fwhm if np.isfinite(prob.resolution_fwhm) else 0.0
    lo_pk = np.tile([-np.inf if allow_negative else 0.0, window[0], min_sigma], n)
    hi_pk = np.tile([np.inf, window[1] + beyond, max(2 * min_sigma, (window[1] - window[0]) / FWHM_PER_SIGMA)], n)
    lo = np.concatenate([prob.front_bounds[0], lo_pk, prob.back_bounds[0]])
    hi = np.concatenate([prob.front_bounds[1], hi_pk, prob.back_bounds[1]])
    return lo, hi


def _solve(prob: Problem, p0: Array, n: int, bounds: tuple[Array, Array], max_nfev: int
           ) -> tuple[scipy.optimize.OptimizeResult, bool]:
    lo, hi = bounds
    span = np.where(np.isfinite(hi - lo), hi - lo, np.maximum(np.abs(p0), 1.0))
    x0 = np.clip(p0, lo + 1e-6 * span, hi - 1e-6 * span)
    jac: Any = "2-point" if prob.jac is None else (lambda p: prob.jac(p, n))  # type: ignore[misc]
    res = scipy.optimize.least_squares(lambda p: (prob.model(p, n) - prob.y) / prob.sd, x0, jac=jac,
                                       bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=max_nfev,
                                       ftol=1e-12, xtol=1e-12, gtol=1e-12)
    ok = bool(res.status > 0 and np.all(np.isfinite(res.x)) and np.all(np.isfinite(res.fun)))
    return res, ok


def _covariance(jac: Array, chi2_red: float, absolute: bool) -> Array:
    s2 = max(1.0, chi2_red) if absolute else chi2_red
    jtj = jac.T @ jac
    if not np.all(np.isfinite(jtj)):
        return np.full(jtj.shape, np.nan)
    return np.asarray(np.linalg.pinv(jtj, rcond=1e-12, hermitian=True) * s2, dtype=np.float64)


def _table(p: Array, cov: Array, n: int, offset: int, cluster: int, converged: bool) -> NDArray[np.void]:
    out = np.zeros(n, PEAK_DTYPE)
    for i in range(n):
        j = offset + 3 * i
        a, c, s = p[j : j + 3]
        ca = cov[j : j + 3, j : j + 3]
        s = abs(s)
        area = a * s * np.sqrt(2 * np.pi)
        ga = np.array([s, 0.0, a]) * np.sqrt(2 * np.pi)
        out[i] = (
            cluster,
            c,
            np.sqrt(max(ca[1, 1], 0.0)),
            FWHM_PER_SIGMA * s,
            FWHM_PER_SIGMA * np.sqrt(max(ca[2, 2], 0.0)),
            area,
            np.sqrt(max(float(ga @ ca @ ga), 0.0)),
            int(converged),
        )
    return np.sort(out, order="centre_meV")


def _new_centre(prob: Problem, p: Array, n: int, taken: list[float], min_sep: float) -> float:
    """Loss energy of the largest smoothed positive residual in the search window, away from ``taken``."""
    r = (prob.y - prob.model(p, n)) / prob.sd
    e = prob.e
    disp = float(np.median(np.diff(e))) if e.size > 1 else 1.0
    width = prob.resolution_fwhm if np.isfinite(prob.resolution_fwhm) else 4 * disp
    k = np.exp(-0.5 * (np.arange(-3 * width, 3 * width + disp / 2, disp) / (width / FWHM_PER_SIGMA)) ** 2)
    rs = np.convolve(r, k / k.sum(), mode="same")
    inside = (e >= prob.search[0]) & (e <= prob.search[1])
    for t in taken:
        inside &= np.abs(e - t) >= min_sep
    if not np.any(inside):
        inside = (e >= prob.search[0]) & (e <= prob.search[1])
    cand = np.nonzero(inside)[0]
    return float(e[cand[int(np.argmax(rs[cand]))]])


def _run(
    prob: Problem,
    n_peaks: int,
    initial: ArrayLike | None,
    window: tuple[float, float],
    min_fwhm: float,
    select: str | None,
    allow_negative: bool,
    absolute_sigma: bool,
    cluster: int,
    max_nfev: int,
) -> PeakFit:
    min_sigma = min_fwhm / FWHM_PER_SIGMA
    f = prob.n_front
    start_sigma = max(3.0 / FWHM_PER_SIGMA, 1.5 * min_sigma)

    def assemble(centres: Array, sigmas: Array, heights: Array | None, prev: Array | None) -> Array:
        front = prob.front if prev is None else prev[:f]
        back = prob.back if prev is None else prev[prev.size - prob.back.size :]
        pk = np.ravel(np.column_stack([np.ones(centres.size) if heights is None else heights, centres, sigmas]))
        return np.concatenate([front, pk, back])

    def fit(n: int, p0: Array, need_linear: bool) -> tuple[Array, float, bool, Array]:
        bounds = _bounds(prob, n, window, min_sigma, allow_negative)
        if need_linear:
            p0 = _linear_start(prob, np.clip(p0, bounds[0], bounds[1]), n, allow_negative)
        res, ok = _solve(prob, p0, n, bounds, max_nfev)
        chi2 = float(res.fun @ res.fun)
        return res.x, chi2, ok, res.jac

    if initial is not None:
        ini = np.asarray(initial, float)
        if ini.ndim == 1:
            p0 = assemble(ini, np.full(ini.size, start_sigma), None, None)
            x, chi2, ok, jac = fit(ini.size, p0, True)
        else:
            p0 = assemble(ini[:, 1], ini[:, 2] / FWHM_PER_SIGMA, ini[:, 0], None)
            x, chi2, ok, jac = fit(len(ini), p0, False)
        n_best, crit = int(np.size(ini, 0)), {}
    else:
        sols: dict[int, tuple[Array, float, bool, Array]] = {}
        prev: Array | None = None  # the solution with one peak fewer
        min_sep = max(min_fwhm, 0.5 * (prob.resolution_fwhm if np.isfinite(prob.resolution_fwhm) else 0.0))
        for n in range(1, max(1, int(n_peaks)) + 1):
            if prev is None:
                base, old = assemble(np.zeros(0), np.zeros(0), None, None), np.zeros((0, 3))
            else:
                base, old = prev, prev[f : f + 3 * (n - 1)].reshape(-1, 3)
            c_new = _new_centre(prob, base, n - 1, list(old[:, 1]), min_sep)
            p0 = assemble(np.append(old[:, 1], c_new), np.append(old[:, 2], start_sigma),
                          np.append(old[:, 0], 0.0), prev)
            sols[n] = fit(n, p0, True)
            prev = sols[n][0]
        n_data = prob.y.size
        # quasi-likelihood criterion: chi-square scaled by the largest model's reduced chi-square (>= 1),
        # so that a model mismatch at very high counts does not pay for spurious peaks
        n_max = max(sols)
        k_max = sols[n_max][0].size
        c_hat = max(1.0, sols[n_max][1] / max(1, n_data - k_max))
        pen = np.log(n_data) if (select or "bic").lower() == "bic" else 2.0
        if (select or "bic").lower() not in {"bic", "aic"}:
            raise ValueError(f"unknown information criterion {select!r} (bic or aic)")
        crit = {n: s[1] / c_hat + pen * s[0].size for n, s in sols.items()}
        n_best = min(crit, key=lambda n: crit[n])
        x, chi2, ok, jac = sols[n_best]
    dof = max(1, prob.y.size - x.size)
    cov = _covariance(jac, chi2 / dof, absolute_sigma)
    table = _table(x, cov, n_best, f, cluster, ok)
    if initial is None:  # peaks beyond the window model the tails of modes outside it: not reported
        table = table[table["centre_meV"] <= window[1]]
    bare = x.copy()
    bare[f : f + 3 * n_best : 3] = 0.0
    return PeakFit(table, prob.e, prob.y, prob.model(x, n_best), prob.sd, len(table), crit, ok,
                   prob.resolution_fwhm, prob.model(bare, n_best))


def fit_peaks(
    energy_meV: ArrayLike,
    spectrum: ArrayLike,
    n_peaks: int = 5,
    *,
    initial: ArrayLike | None = None,
    window_meV: tuple[float, float] = (18.0, 60.0),
    sigma: ArrayLike | None = None,
    cluster: int = 0,
    resolution: str | tuple[float, float] | None = "auto",
    select: str | None = "bic",
    fixed: bool = False,
    allow_negative: bool = False,
    min_fwhm_meV: float | None = None,
    background_subtracted: bool | None = None,
    temperature_K: float = 300.0,
    components: ArrayLike | None = None,
    core_meV: float = 10.0,
    kernel_extent_meV: float = 100.0,
    max_nfev: int = 2000,
) -> PeakFit:
    """Fit Gaussian peaks (convolved with the instrument resolution) to one spectrum; see :class:`PeakFit`.

    Model (``resolution="auto"`` and the spectrum contains its zero-loss peak, ZLP), for a spectrum whose ZLP
    sits near 0 meV::

        y(E) = A R(E - c0) + [R (*) (sum_i a_i g_i(E - c0) B(E - c0))](E) [+ sum_j b_j S_j(E)] [- P E^-r]

    ``R`` is the resolution, a channel-integrated Pearson VII (:func:`resolution_function`) fitted to the ZLP
    core ``|E| <= core_meV`` and refined with the peaks; ``g_i`` are Gaussians at ``|E|`` and ``B = 1`` on the
    loss side, ``exp(-|E| / k_B T)`` on the gain side (detailed balance, T free), so the gain side constrains
    the same modes.  The fit covers ``-window_meV[1] <= E <= window_meV[1]``.  ``S_j`` are optional
    ``components`` (spectra of neighbouring regions, their own ZLP removed) with free coefficients.  A loss
    side with a power law subtracted (detected, or ``background_subtracted=True``) is fitted from
    ``window_meV[0]`` with the subtracted power law ``P E^-r`` a free part of the model.

    Well-posedness: heights ``a_i >= 0`` (unless ``allow_negative``), centres inside ``window_meV``, intrinsic
    FWHM >= ``min_fwhm_meV`` (default: a quarter of the fitted resolution FWHM, or two channels without a
    resolution model).  Bounded trust-region least squares (``scipy.optimize.least_squares``, ``trf``).

    Number of peaks: with ``initial`` the peaks are those given; with ``fixed=True`` exactly ``n_peaks``;
    otherwise 1..``n_peaks`` peaks are fitted, each adding one where the resolution-smoothed residual is
    largest, and the number minimising ``select`` (``"bic"``: ``chi2 / c + k ln N``; ``"aic"``: ``chi2 / c +
    2 k``; ``c`` the reduced chi-square of the largest model, at least 1, so that the model mismatch of very
    high-count spectra does not buy spurious peaks) is kept.

    Parameters
    ----------
    energy_meV, spectrum
        Uniform axis ``(n,)`` and one spectrum ``(n,)`` (e.g. a cluster mean).
    n_peaks
        Largest number of peaks (or the number, with ``fixed``).
    initial
        Starting centres (meV), or ``(n, 3)`` rows of (height, centre, FWHM): fixes the number of peaks.
    window_meV
        Peaks are sought (centres bounded) in this loss-energy window.
    sigma
        Per-channel standard deviations (absolute: errors scaled by ``max(1, chi2_red)``); default
        Poisson-like ``sqrt(max(y, 1))`` with the errors scaled by the reduced chi-square.
    cluster
        Written into the table's ``cluster`` column.
    resolution
        ``"auto"``: the model above when the spectrum contains its ZLP (covers ``+-core_meV`` with the maximum
        within 2 meV of 0), else plain Gaussians; ``(fwhm, m)``: Gaussians convolved with that resolution in
        ``window_meV`` (no ZLP); ``None``: plain Gaussians in ``window_meV``.
    select, fixed, allow_negative, min_fwhm_meV
        See above.
    background_subtracted, temperature_K, components, core_meV, kernel_extent_meV
        See the model.
    max_nfev
        Cap on model evaluations per fit; a fit that reaches it is marked not converged.
    """
    e_all = np.asarray(energy_meV, float)
    y_all = np.asarray(spectrum, float)
    window = (float(window_meV[0]), float(window_meV[1]))
    disp = float(e_all[1] - e_all[0])
    has_zlp = bool(
        e_all[0] <= -core_meV
        and e_all[-1] >= core_meV
        and abs(e_all[int(np.argmax(np.where(np.abs(e_all) <= core_meV, y_all, -np.inf)))]) <= 2.0
    )
    if isinstance(resolution, str):
        if resolution != "auto":
            raise ValueError(f"unknown resolution {resolution!r}")
        prob = (zlp_problem(e_all, y_all, window, sigma, background_subtracted, temperature_K, components,
                             core_meV, kernel_extent_meV) if has_zlp
                else plain_problem(e_all, y_all, window, sigma, None, kernel_extent_meV))
    else:
        prob = plain_problem(e_all, y_all, window, sigma, None if resolution is None else
                              (float(resolution[0]), float(resolution[1])), kernel_extent_meV)
    if min_fwhm_meV is None:
        min_fwhm_meV = 0.25 * prob.resolution_fwhm if np.isfinite(prob.resolution_fwhm) else 2.0 * disp
    if fixed and initial is None:
        ini = np.linspace(window[0], window[1], int(n_peaks) + 2)[1:-1]
        return _run(prob, n_peaks, ini, window, float(min_fwhm_meV), None, allow_negative, sigma is not None,
                    cluster, max_nfev)
    return _run(prob, n_peaks, initial, window, float(min_fwhm_meV), select, allow_negative, sigma is not None,
                cluster, max_nfev)


def fit_gaussians(energy_meV: ArrayLike, spectrum: ArrayLike, n_peaks: int = 5, **kwargs: Any) -> NDArray[np.void]:
    """The peak table of :func:`fit_peaks` (same arguments): ``PEAK_DTYPE`` rows sorted by centre.

    Columns: cluster, centre_meV (relative to the ZLP centre with the resolution model), centre_err_meV,
    fwhm_meV, fwhm_err_meV, area, area_err (intrinsic, deconvolved Gaussians), converged.
    """
    return fit_peaks(energy_meV, spectrum, n_peaks, **kwargs).table
