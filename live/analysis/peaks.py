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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
import scipy.optimize
from numpy.typing import ArrayLike, NDArray

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
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
KB_MEV_PER_K = 8.617333262e-2
# channel integration of the resolution: trapezoid over one channel width (5 sub-samples)
_SUB_OFFSETS = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])
_SUB_WEIGHTS = np.array([0.125, 0.25, 0.25, 0.25, 0.125])


def resolution_function(energy_meV: ArrayLike, fwhm_meV: float, m: float, dispersion_meV: float) -> Array:
    """Symmetric Pearson VII (peak 1 before integration) integrated over one channel of ``dispersion_meV``.

    The detector integrates over a channel; omitting it makes a Pearson VII fitted to the zero-loss core
    slightly too wide with a too-steep tail (+0.1 % FWHM, -0.9 % of the tail at 60 meV for 8.3 meV
    resolution), which at 18-25 meV, where the ZLP tail is 5-20x the phonon signal, moves the lowest
    peaks by up to 1.4 meV.
    """
    e = np.asarray(energy_meV, float)
    cc = 2.0 ** (1.0 / m) - 1.0
    out = np.zeros_like(e)
    for o, wt in zip(_SUB_OFFSETS * dispersion_meV, _SUB_WEIGHTS, strict=True):
        out += wt * (1.0 + 4.0 * cc * ((e + o) / fwhm_meV) ** 2) ** (-m)
    return out


def fit_resolution(
    energy_meV: ArrayLike, spectrum: ArrayLike, *, core_meV: float = 10.0, gain_side_only: bool = False
) -> Array:
    """Zero-loss peak ``A R(E - c)`` (:func:`resolution_function`) fitted to ``|E| <= core_meV``.

    Returns ``(c, A, fwhm, m)``.  With ``gain_side_only`` only ``-core_meV <= E <= 0`` is used and ``c = 0``
    is fixed (loss side background-subtracted; the aligned sums have their ZLP centre at 0).  Poisson
    weights from the data.
    """
    e = np.asarray(energy_meV, float)
    y = np.asarray(spectrum, float)
    disp = float(e[1] - e[0])
    m = (e >= -core_meV) & (e <= (0.0 if gain_side_only else core_meV))
    em, ym = e[m], y[m]
    sd = np.sqrt(np.maximum(ym, 1.0))
    i0 = int(np.argmax(ym))
    half = em[ym >= 0.5 * ym[i0]]
    fw0 = max(2 * disp, 2 * float(np.max(np.abs(half - em[i0]))) if gain_side_only else float(np.ptp(half)) + disp)
    if gain_side_only:

        def r1(q: Array) -> Array:
            return (q[0] * resolution_function(em, q[1], q[2], disp) - ym) / sd

        q = scipy.optimize.least_squares(r1, [ym[i0], fw0, 2.0], method="lm", x_scale="jac").x
        return np.array([0.0, q[0], abs(q[1]), q[2]])

    def r2(q: Array) -> Array:
        return (q[1] * resolution_function(em - q[0], q[2], q[3], disp) - ym) / sd

    q = scipy.optimize.least_squares(r2, [em[i0], ym[i0], fw0, 2.0], method="lm", x_scale="jac").x
    q[2] = abs(q[2])
    return q


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


# ------------------------------------------------------------------------------------------ the problems
@dataclass
class _Problem:
    """A least-squares problem with ``n`` peaks: ``p = [front..., (a, c, s) x n, back...]``."""

    e: Array  # fitted channels
    y: Array
    sd: Array
    front: Array  # start values of the parameters before the peaks
    back: Array  # ... and after them
    front_bounds: tuple[Array, Array]
    back_bounds: tuple[Array, Array]
    model: Callable[[Array, int], Array]
    jac: Callable[[Array, int], Array] | None  # residual Jacobian, or None for finite differences
    linear_back: NDArray[np.intp]  # back parameters that enter linearly (start by least squares)
    search: Array  # loss energies where a new peak may start (window)
    resolution_fwhm: float  # NaN: no resolution model

    @property
    def n_front(self) -> int:
        return self.front.size


def _unit_shapes(prob: _Problem, p: Array, n: int) -> Array:
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


def _linear_start(prob: _Problem, p: Array, n: int, allow_negative: bool) -> Array:
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


def _bounds(prob: _Problem, n: int, window: tuple[float, float], min_sigma: float, allow_negative: bool
            ) -> tuple[Array, Array]:
    # centres may go up to two resolution widths beyond the window: the tail of a mode just outside it is
    # modelled by a peak there (and not reported) rather than by one pinned at the window's edge
    beyond = 2.0 * prob.resolution_fwhm if np.isfinite(prob.resolution_fwhm) else 0.0
    lo_pk = np.tile([-np.inf if allow_negative else 0.0, window[0], min_sigma], n)
    hi_pk = np.tile([np.inf, window[1] + beyond, max(2 * min_sigma, (window[1] - window[0]) / FWHM_PER_SIGMA)], n)
    lo = np.concatenate([prob.front_bounds[0], lo_pk, prob.back_bounds[0]])
    hi = np.concatenate([prob.front_bounds[1], hi_pk, prob.back_bounds[1]])
    return lo, hi


def _solve(prob: _Problem, p0: Array, n: int, bounds: tuple[Array, Array], max_nfev: int
           ) -> tuple[scipy.optimize.OptimizeResult, bool]:
    lo, hi = bounds
    span = np.where(np.isfinite(hi - lo), hi - lo, np.maximum(np.abs(p0), 1.0))
    x0 = np.clip(p0, lo + 1e-6 * span, hi - 1e-6 * span)
    jac: Any = "2-point" if prob.jac is None else (lambda p: prob.jac(p, n))  # type: ignore[misc]
    res = scipy.optimize.least_squares(lambda p: (prob.model(p, n) - prob.y) / prob.sd, x0, jac=jac,
                                       bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=max_nfev)
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


def _new_centre(prob: _Problem, p: Array, n: int, taken: list[float], min_sep: float) -> float:
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
    prob: _Problem,
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


def _zlp_problem(
    e_all: Array,
    y_all: Array,
    window: tuple[float, float],
    sigma: ArrayLike | None,
    background_subtracted: bool | None,
    temperature_K: float,
    components: ArrayLike | None,
    core_meV: float,
    ext: float,
) -> _Problem:
    """Model with the zero-loss peak (see :func:`fit_peaks`): ``A R(E - c0) + R (*) [peaks x detailed balance]
    + components - power law``."""
    disp = float(e_all[1] - e_all[0])
    if background_subtracted is None:
        # a power law fitted at 16-70 meV explodes towards 0: the loss-side core falls far below the mirror
        pos = (e_all > 0.25 * core_meV) & (e_all <= core_meV)
        mirror = np.interp(-e_all[pos], e_all, y_all)
        background_subtracted = bool(np.any(y_all[pos] < 0.5 * mirror))
    c0, amp, fw, mm = fit_resolution(e_all, y_all, core_meV=core_meV, gain_side_only=background_subtracted)
    hi = float(window[1])
    if background_subtracted:
        sel = ((e_all >= -hi) & (e_all <= 0.0)) | ((e_all >= window[0]) & (e_all <= hi))
    else:
        sel = (e_all >= -hi) & (e_all <= hi)
    ew, yw = e_all[sel], y_all[sel]
    zlp = amp * resolution_function(ew - c0, fw, mm, disp)
    if sigma is None:
        var = np.maximum(yw, 0.0)
        if background_subtracted:
            var = np.where(ew > 0, np.maximum(yw, 0.0) + zlp, var)
        sd = np.sqrt(np.maximum(var, 1.0))
    else:
        sd = np.asarray(sigma, float)[sel]
    comp = np.zeros((0, ew.size))
    if components is not None:
        rows = []
        for c_spec in np.atleast_2d(np.asarray(components, float)):
            q = fit_resolution(e_all, c_spec, core_meV=core_meV, gain_side_only=background_subtracted)
            sig_j = (c_spec - q[1] * resolution_function(e_all - q[0], q[2], q[3], disp))[sel]
            # only the phonon range: the core residual of a ZLP fit is not signal
            rows.append(np.where(np.abs(ew) >= window[0], sig_j, 0.0))
        comp = np.array(rows)
    n_comp = comp.shape[0]
    # regular grid under the fitted range (the gap of a background-subtracted fit included), padded by the kernel
    nk = int(round(ext / disp))
    i_lo = int(np.round((ew[0] - e_all[0]) / disp))
    i_hi = int(np.round((ew[-1] - e_all[0]) / disp))
    grid = e_all[0] + disp * np.arange(i_lo - nk, i_hi + nk + 1)
    take = np.round((ew - grid[0]) / disp).astype(np.intp)  # + nk below: the kernel is centred
    lag = disp * np.arange(-nk, nk + 1)
    nfft = scipy.fft.next_fast_len(grid.size + lag.size)
    pl_x = np.where(ew > 0, ew, 1.0)
    n_pl = 2 if background_subtracted else 0
    n_z = 3 if background_subtracted else 4  # ZLP parameters refined with the peaks (c0 fixed at 0 if gain only)
    nf = 1 + n_z
    cache: dict[tuple[Any, ...], Array] = {}

    def kernel_fft(zw: float, zm: float) -> Array:
        """FFT of the unit-sum resolution kernel; the last one is kept (most evaluations share it)."""
        key = ("k", zw, zm)
        if key not in cache:
            for old in [q for q in cache if q[0] == "k"]:
                del cache[old]
            kern = resolution_function(lag, zw, zm, disp)
            cache[key] = scipy.fft.rfft(kern / kern.sum(), nfft)
        return cache[key]

    def zlp_shape(zc: float, zw: float, zm: float) -> Array:
        key = ("z", zc, zw, zm)
        if key not in cache:
            for old in [q for q in cache if q[0] == "z"]:
                del cache[old]
            cache[key] = resolution_function(ew - zc, zw, zm, disp)
        return cache[key]

    def unpack(p: Array, n: int) -> tuple[float, float, float, float, float, Array, Array]:
        z = p[1:nf]
        zc = z[3] if n_z == 4 else c0
        return p[0], z[0], z[1], z[2], zc, p[nf : nf + 3 * n], p[nf + 3 * n :]

    def model(p: Array, n: int) -> Array:
        t, za, zw, zm, zc, pk, q = unpack(p, n)
        x = grid - zc
        ax = np.abs(x)
        a, c, s = pk[0::3], pk[1::3], pk[2::3]
        g = (a[:, None] * np.exp(-0.5 * ((ax[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)
        g = np.where(x > 0, g, g * np.exp(-ax / (KB_MEV_PER_K * t)))
        conv = scipy.fft.irfft(scipy.fft.rfft(g, nfft) * kernel_fft(zw, zm), nfft)[nk:][take]
        out = za * zlp_shape(zc, zw, zm) + conv
        if n_comp:
            out = out + q[:n_comp] @ comp
        if n_pl:
            out = out - np.where(ew > 0, q[n_comp] * (pl_x / 30.0) ** (-q[n_comp + 1]), 0.0)
        return out

    inv_sd = 1.0 / sd

    def jacobian(p: Array, n: int) -> Array:
        """Residual Jacobian: peaks, components and power law analytic (one batched FFT convolution of
        the Gaussian derivatives with the resolution kernel), temperature and ZLP by forward differences."""
        jac = np.empty((ew.size, p.size))
        f0 = model(p, n)
        for j in range(nf):
            step = 1.49e-8 * max(abs(p[j]), 1.0)
            pj = p.copy()
            pj[j] += step
            jac[:, j] = (model(pj, n) - f0) / step
        t, _za, zw, zm, zc, pk, q = unpack(p, n)
        a, c, sg = pk[0::3, None], pk[1::3, None], pk[2::3, None]
        x = grid - zc
        ax = np.abs(x)
        bose = np.where(x > 0, 1.0, np.exp(-ax / (KB_MEV_PER_K * t)))
        d = (ax[None, :] - c) / sg
        gb = np.exp(-0.5 * d * d) * bose[None, :]
        parts = np.empty((3 * n, grid.size))
        parts[0::3] = gb
        parts[1::3] = gb * (a * d / sg)
        parts[2::3] = gb * (a * d * d / sg)
        if n:
            conv = scipy.fft.irfft(scipy.fft.rfft(parts, nfft, axis=-1) * kernel_fft(zw, zm), nfft, axis=-1)
            jac[:, nf : nf + 3 * n] = conv[:, nk:][:, take].T
        col = nf + 3 * n
        if n_comp:
            jac[:, col : col + n_comp] = comp.T
        if n_pl:
            xr = pl_x / 30.0
            powr = np.where(ew > 0, xr ** (-q[n_comp + 1]), 0.0)
            jac[:, col + n_comp] = -powr
            jac[:, col + n_comp + 1] = q[n_comp] * powr * np.log(xr)
        return jac * inv_sd[:, None]

    front = np.array([temperature_K, amp, fw, mm, c0])[:nf]
    f_lo = np.array([1.0, 0.0, 0.25 * fw, 0.5, c0 - 3.0])[:nf]
    f_hi = np.array([1e5, np.inf, 4.0 * fw, 100.0, c0 + 3.0])[:nf]
    back = np.zeros(n_comp + n_pl)
    b_lo = np.full(back.size, -np.inf)
    b_hi = np.full(back.size, np.inf)
    if n_pl:
        back[-1], b_lo[-1], b_hi[-1] = 4.0, 0.0, 12.0
    linear = np.arange(n_comp + (1 if n_pl else 0))
    return _Problem(ew, yw, sd, front, back, (f_lo, f_hi), (b_lo, b_hi), model, jacobian, linear,
                    np.array(window, float), float(fw))


def _plain_problem(e_all: Array, y_all: Array, window: tuple[float, float], sigma: ArrayLike | None,
                   resolution: tuple[float, float] | None, ext: float) -> _Problem:
    """Gaussians in ``window`` (no zero-loss peak), convolved with a given resolution ``(fwhm, m)`` or not."""
    disp = float(e_all[1] - e_all[0])
    sel = (e_all >= window[0]) & (e_all <= window[1])
    ew, yw = e_all[sel], y_all[sel]
    sd = np.ones_like(yw) if sigma is None else np.asarray(sigma, float)[sel]
    if resolution is None:

        def model(p: Array, n: int) -> Array:
            a, c, s = p[0 : 3 * n : 3], p[1 : 3 * n : 3], p[2 : 3 * n : 3]
            return (a[:, None] * np.exp(-0.5 * ((ew[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)

        fwhm = float("nan")
    else:
        fwhm, mm = (float(v) for v in resolution)
        nk = int(round(ext / disp))
        grid = ew[0] + disp * np.arange(-nk, ew.size + nk)
        kern = resolution_function(disp * np.arange(-nk, nk + 1), fwhm, mm, disp)
        kern /= kern.sum()

        def model(p: Array, n: int) -> Array:
            a, c, s = p[0 : 3 * n : 3], p[1 : 3 * n : 3], p[2 : 3 * n : 3]
            g = (a[:, None] * np.exp(-0.5 * ((grid[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)
            return np.convolve(np.where(grid > 0, g, 0.0), kern, mode="valid")

    empty = np.zeros(0)
    return _Problem(ew, yw, sd, empty, empty, (empty, empty), (empty, empty), model, None,
                    np.zeros(0, np.intp), np.array(window, float), fwhm)


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
        prob = (_zlp_problem(e_all, y_all, window, sigma, background_subtracted, temperature_K, components,
                             core_meV, kernel_extent_meV) if has_zlp
                else _plain_problem(e_all, y_all, window, sigma, None, kernel_extent_meV))
    else:
        prob = _plain_problem(e_all, y_all, window, sigma, None if resolution is None else
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
