"""Segmentation of EELS line scans / maps: correlation k-means and Gaussian peak fits of cluster means."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft
import scipy.optimize
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "znormalise",
    "kmeans_correlation",
    "cluster_means",
    "fit_gaussians",
    "fit_resolution",
    "resolution_function",
    "PEAK_DTYPE",
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
    ]
)
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def znormalise(spectra: ArrayLike) -> Array:
    """Centre each spectrum to zero mean and scale to unit standard deviation (last axis)."""
    s = np.asarray(spectra, float)
    s = s - s.mean(-1, keepdims=True)
    sd = s.std(-1, keepdims=True)
    return s / np.where(sd > 0, sd, 1.0)


def _one_run(z: Array, k: int, rng: np.random.Generator, max_iter: int) -> tuple[NDArray[np.intp], Array, float]:
    n, c = z.shape
    # k-means++ on the correlation distance d = 1 - r = |a - b|^2 / (2c) for z-normalised vectors
    centres = np.empty((k, c))
    centres[0] = z[rng.integers(n)]
    d = 1.0 - z @ centres[0] / c
    for j in range(1, k):
        p = np.maximum(d, 0.0) ** 2
        tot = p.sum()
        i = rng.integers(n) if tot <= 0 else rng.choice(n, p=p / tot)
        centres[j] = z[i]
        d = np.minimum(d, 1.0 - z @ centres[j] / c)
    labels = np.full(n, -1)
    for _ in range(max_iter):
        dist = 1.0 - z @ centres.T / c
        new = np.argmin(dist, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = z[labels == j]
            if len(members) == 0:  # re-seed an empty cluster with the worst-fitted point
                far = int(np.argmax(dist[np.arange(n), labels]))
                centres[j] = z[far]
                labels[far] = j
            else:
                centres[j] = znormalise(members.mean(0))
    dist = 1.0 - z @ centres.T / c
    inertia = float(dist[np.arange(n), labels].sum())
    return labels, centres, inertia


def kmeans_correlation(
    spectra: ArrayLike, k: int = 3, *, n_restarts: int = 10, seed: int = 0, max_iter: int = 100
) -> tuple[NDArray[np.intp], Array, float]:
    """k-means with the distance ``1 - Pearson correlation`` between a spectrum and a centroid.

    Spectra are z-normalised (zero mean, unit standard deviation); a centroid is the component-wise mean
    of its members, re-z-normalised for the correlation.  k-means++ initialisation; the best of
    ``n_restarts`` runs (lowest summed distance) is kept; reproducible with ``seed``.  Labels are ordered by
    the mean index of each cluster's members (so a line scan reads left, middle, right as 0, 1, 2).

    Returns
    -------
    labels
        ``(n,)`` cluster of each spectrum.
    centroids
        ``(k, c)`` z-normalised centroids.
    inertia
        Sum of the distances of the spectra to their centroids.
    """
    z = znormalise(np.asarray(spectra, float).reshape(-1, np.shape(spectra)[-1]))
    rng = np.random.default_rng(seed)
    best: tuple[NDArray[np.intp], Array, float] | None = None
    for _ in range(max(1, int(n_restarts))):
        run = _one_run(z, k, rng, max_iter)
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    labels, centres, inertia = best
    mean_index = [float(np.mean(np.nonzero(labels == j)[0])) if np.any(labels == j) else np.inf for j in range(k)]
    order = np.argsort(mean_index)
    remap = np.empty(k, np.intp)
    remap[order] = np.arange(k)
    return remap[labels], centres[order], inertia


def cluster_means(spectra: ArrayLike, labels: ArrayLike, k: int | None = None) -> Array:
    """Mean spectrum ``(k, c)`` of each cluster (NaN for an empty cluster)."""
    s = np.asarray(spectra, float).reshape(-1, np.shape(spectra)[-1])
    lab = np.asarray(labels).reshape(-1)
    k = int(lab.max()) + 1 if k is None else k
    out = np.full((k, s.shape[1]), np.nan)
    for j in range(k):
        if np.any(lab == j):
            out[j] = s[lab == j].mean(0)
    return out


def _gauss_sum(e: Array, p: Array) -> Array:
    a, c, s = p[0::3], p[1::3], p[2::3]
    return (a[:, None] * np.exp(-0.5 * ((e[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)


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


def _initial_centres(e: Array, y: Array, n_peaks: int, window: tuple[float, float], disp: float) -> list[float]:
    """Centres at the ``n_peaks`` deepest minima of the smoothed second derivative inside ``window``."""
    k = np.exp(-0.5 * (np.arange(-6, 7) * disp / 1.0) ** 2)
    sm = np.convolve(y, k / k.sum(), mode="same")
    d2 = np.gradient(np.gradient(sm, e), e)
    inside = (e >= window[0]) & (e <= window[1])
    loc = np.nonzero((d2[1:-1] < d2[:-2]) & (d2[1:-1] <= d2[2:]) & (d2[1:-1] < 0) & inside[1:-1])[0] + 1
    loc = loc[np.argsort(d2[loc])][:n_peaks]
    cen = sorted(float(e[i]) for i in loc)
    fill = np.linspace(window[0], window[1], n_peaks + 2)[1:-1]
    for f in fill:
        if len(cen) >= n_peaks:
            break
        if all(abs(f - c) > 2.0 for c in cen):
            cen.append(float(f))
    while len(cen) < n_peaks:
        cen.append(float(fill[len(cen) % len(fill)]))
    return sorted(cen)


def _peak_table(p: Array, cov: Array, n_peaks: int, cluster: int, offset: int = 0) -> NDArray[np.void]:
    out = np.zeros(n_peaks, PEAK_DTYPE)
    for i in range(n_peaks):
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
            np.sqrt(max(ga @ ca @ ga, 0.0)),
        )
    return np.sort(out, order="centre_meV")


def _covariance(res: scipy.optimize.OptimizeResult, n_data: int, absolute: bool) -> tuple[Array, float]:
    jac = res.jac
    dof = max(1, n_data - jac.shape[1])
    chi2_red = float(res.fun @ res.fun) / dof
    s2 = max(1.0, chi2_red) if absolute else chi2_red
    try:
        cov = np.linalg.inv(jac.T @ jac) * s2
    except np.linalg.LinAlgError:
        cov = np.full((jac.shape[1], jac.shape[1]), np.nan)
    return cov, chi2_red


def fit_gaussians(
    energy_meV: ArrayLike,
    spectrum: ArrayLike,
    n_peaks: int = 5,
    *,
    initial: ArrayLike | None = None,
    window_meV: tuple[float, float] = (18.0, 60.0),
    sigma: ArrayLike | None = None,
    cluster: int = 0,
    resolution: str | tuple[float, float] | None = "auto",
    background_subtracted: bool | None = None,
    temperature_K: float = 300.0,
    components: ArrayLike | None = None,
    core_meV: float = 10.0,
    kernel_extent_meV: float = 100.0,
    max_nfev: int = 4000,
) -> NDArray[np.void]:
    """Fit ``n_peaks`` Gaussians by Levenberg-Marquardt (no bounds), convolved with the instrument resolution.

    Model (``resolution`` not None), for a spectrum whose zero-loss peak (ZLP) sits near 0 meV::

        y(E) = A R(E - c0) + [R (*) (sum_i a_i g_i(E - c0) B(E - c0))](E) [+ sum_j b_j S_j(E)] [- P E^-r]

    ``R`` is the resolution function, a channel-integrated Pearson VII (:func:`resolution_function`) whose
    (c0, A, FWHM, m) are fitted to the ZLP core ``|E| <= core_meV`` first (the ZLP is the resolution) and
    then held; ``g_i`` are Gaussians at ``|E|`` (loss side E > 0) and ``B = 1`` on the loss side,
    ``exp(-|E| / k_B T)`` on the gain side (detailed balance, T free, start ``temperature_K``), so the gain
    side constrains the same modes.  The fit covers ``-window_meV[1] <= E <= window_meV[1]`` (the ZLP tail
    under the peaks is the fitted ZLP, not a free background).  ``S_j`` are optional ``components``
    (spectra of neighbouring regions on the same axis, their own ZLP removed here) with free coefficients:
    for an interface spectrum that contains delocalised signal of both sides.  When the spectrum's loss side
    is power-law background-subtracted (:func:`stemlive.live.analysis.eels.power_law_background`; detected
    from the loss-side core, or ``background_subtracted=True``), the resolution comes from the gain-side
    core, the loss side is fitted from ``window_meV[0]`` only and the subtracted power law ``P E^-r`` is a
    free part of the model.

    Parameters
    ----------
    energy_meV, spectrum
        Uniform axis ``(n,)`` and one spectrum ``(n,)`` (e.g. a cluster mean).
    n_peaks
        Number of Gaussians.
    initial
        Initial centres (meV), or ``(n_peaks, 3)`` rows of (height, centre, fwhm); default: the deepest
        minima of the smoothed second derivative (ZLP removed) in ``window_meV``.
    window_meV
        Peaks are sought in this loss-energy window; see above for the fitted range.
    sigma
        Per-channel standard deviations; default Poisson-like ``sqrt(max(y, 1))`` with the errors scaled
        by the reduced chi-square.
    cluster
        Written into the table's ``cluster`` column.
    resolution
        ``"auto"`` (default): the resolution-convolved model above when the spectrum contains its ZLP
        (covers ``+-core_meV`` with the maximum within 2 meV of 0), else plain Gaussians; ``(fwhm, m)``:
        that resolution, ZLP not modelled (spectrum without ZLP, e.g. background-subtracted signal);
        ``None``: plain Gaussians in ``window_meV`` (no resolution, the former behaviour).
    background_subtracted
        Whether the loss side had a power law subtracted (None: detected).
    temperature_K
        Start value of the detailed-balance temperature of the gain side.
    components
        ``(j, n)`` spectra added with free coefficients (see above).
    core_meV
        Half-width of the ZLP core used to fit the resolution.
    kernel_extent_meV
        Half-width of the sampled resolution kernel.
    max_nfev
        Cap on model evaluations.

    Returns
    -------
    peaks
        Structured array (``PEAK_DTYPE``), sorted by centre: cluster, centre_meV (relative to the ZLP centre
        with the resolution model), centre_err_meV, fwhm_meV, fwhm_err_meV, area, area_err.  With a
        resolution model the FWHM and area are the intrinsic (deconvolved) Gaussian's; errors from the
        covariance ``(J^T J)^-1`` scaled by the reduced chi-square (by max(1, chi2_red) with ``sigma``).
    """
    e_all = np.asarray(energy_meV, float)
    y_all = np.asarray(spectrum, float)
    has_zlp = bool(
        e_all[0] <= -core_meV
        and e_all[-1] >= core_meV
        and abs(e_all[int(np.argmax(np.where(np.abs(e_all) <= core_meV, y_all, -np.inf)))]) <= 2.0
    )
    if isinstance(resolution, str):
        if resolution != "auto":
            raise ValueError(f"unknown resolution {resolution!r}")
        if not has_zlp:
            resolution = None
    if resolution is None:
        return _fit_plain(e_all, y_all, n_peaks, initial, window_meV, sigma, cluster)
    if isinstance(resolution, str):
        return _fit_with_zlp(
            e_all,
            y_all,
            n_peaks,
            initial,
            window_meV,
            sigma,
            cluster,
            background_subtracted,
            temperature_K,
            components,
            core_meV,
            kernel_extent_meV,
            max_nfev,
        )
    fw, mm = (float(v) for v in resolution)  # type: ignore[union-attr]
    return _fit_convolved(
        e_all, y_all, n_peaks, initial, window_meV, sigma, cluster, fw, mm, kernel_extent_meV, max_nfev
    )


def _p0_peaks(
    e: Array, y: Array, n_peaks: int, initial: ArrayLike | None, window: tuple[float, float], disp: float
) -> tuple[Array, Array, Array | None]:
    """Initial centres and sigmas (and heights when given) of the peaks."""
    if initial is None:
        cen = np.array(_initial_centres(e, y, n_peaks, window, disp))
        return cen, np.full(n_peaks, 3.0 / FWHM_PER_SIGMA), None
    ini = np.asarray(initial, float)
    if ini.ndim == 1:
        if ini.size != n_peaks:
            raise ValueError(f"{ini.size} initial centres for {n_peaks} peaks")
        return ini.copy(), np.full(n_peaks, 3.0 / FWHM_PER_SIGMA), None
    return ini[:, 1].copy(), ini[:, 2] / FWHM_PER_SIGMA, ini[:, 0].copy()


def _fit_with_zlp(
    e_all: Array,
    y_all: Array,
    n_peaks: int,
    initial: ArrayLike | None,
    window: tuple[float, float],
    sigma: ArrayLike | None,
    cluster: int,
    background_subtracted: bool | None,
    temperature_K: float,
    components: ArrayLike | None,
    core_meV: float,
    ext: float,
    max_nfev: int,
) -> NDArray[np.void]:
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
    # components: neighbouring spectra with their own ZLP removed
    comp = np.zeros((0, ew.size))
    if components is not None:
        cs = np.atleast_2d(np.asarray(components, float))
        rows = []
        for c_spec in cs:
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
    zlp0 = np.array([amp, fw, mm, c0])[:n_z]

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

    def model(p: Array) -> Array:
        t = p[0]
        z = p[1 : 1 + n_z]
        za, zw, zm = z[0], abs(z[1]), z[2]
        zc = z[3] if n_z == 4 else c0
        pk = p[1 + n_z : 1 + n_z + 3 * n_peaks]
        a, c, s = pk[0::3], pk[1::3], pk[2::3]
        x = grid - zc
        ax = np.abs(x)
        g = (a[:, None] * np.exp(-0.5 * ((ax[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)
        g = np.where(x > 0, g, g * np.exp(-ax / (KB_MEV_PER_K * abs(t))))
        conv = scipy.fft.irfft(scipy.fft.rfft(g, nfft) * kernel_fft(zw, zm), nfft)[nk:][take]
        out = za * zlp_shape(zc, zw, zm) + conv
        q = p[1 + n_z + 3 * n_peaks :]
        if n_comp:
            out = out + q[:n_comp] @ comp
        if n_pl:
            out = out - np.where(ew > 0, q[n_comp] * (pl_x / 30.0) ** (-q[n_comp + 1]), 0.0)
        return out

    cen, sig, heights = _p0_peaks(ew, np.where(ew > 0, yw - zlp, 0.0), n_peaks, initial, window, disp)
    ipk = 1 + n_z  # first peak parameter
    p0 = np.concatenate([[temperature_K], zlp0, np.ravel(np.column_stack([np.ones(n_peaks), cen, sig]))])
    extra0 = np.zeros(n_comp + n_pl)
    if n_pl:
        extra0[n_comp + 1] = 4.0
    p0 = np.concatenate([p0, extra0])
    # linear start for the heights, the component coefficients and the power-law amplitude
    if heights is None:
        cols = []
        for i in range(n_peaks):
            pi = p0.copy()
            pi[ipk : ipk + 3 * n_peaks : 3] = 0.0
            pi[ipk + 3 * i] = 1.0
            pi[ipk + 3 * n_peaks :] = 0.0
            if n_pl:
                pi[-1] = 4.0
            cols.append(model(pi) - zlp)
        for j in range(n_comp):
            cols.append(comp[j])
        if n_pl:
            cols.append(-np.where(ew > 0, (pl_x / 30.0) ** -4.0, 0.0))
        a_mat = np.array(cols).T / sd[:, None]
        coef, *_ = np.linalg.lstsq(a_mat, (yw - zlp) / sd, rcond=None)
        p0[ipk : ipk + 3 * n_peaks : 3] = np.abs(coef[:n_peaks]) + 1e-12
        p0[ipk + 3 * n_peaks :][:n_comp] = coef[n_peaks : n_peaks + n_comp]
        if n_pl:
            p0[-2] = coef[-1]
    else:
        p0[ipk : ipk + 3 * n_peaks : 3] = heights

    inv_sd = 1.0 / sd
    n_fd = 1 + n_z  # temperature and ZLP parameters: forward differences; the rest analytic

    def jacobian(p: Array) -> Array:
        """Residual Jacobian: peaks, components and power law analytic (one batched FFT convolution of
        the Gaussian derivatives with the resolution kernel), temperature and ZLP by forward differences."""
        jac = np.empty((ew.size, p.size))
        f0 = model(p)
        for j in range(n_fd):
            step = 1.49e-8 * max(abs(p[j]), 1.0)
            pj = p.copy()
            pj[j] += step
            jac[:, j] = (model(pj) - f0) / step
        t = p[0]
        z = p[1 : 1 + n_z]
        zw, zm = abs(z[1]), z[2]
        zc = z[3] if n_z == 4 else c0
        pk = p[ipk : ipk + 3 * n_peaks]
        a, c, sg = pk[0::3, None], pk[1::3, None], pk[2::3, None]
        x = grid - zc
        ax = np.abs(x)
        bose = np.where(x > 0, 1.0, np.exp(-ax / (KB_MEV_PER_K * abs(t))))
        d = (ax[None, :] - c) / sg
        gb = np.exp(-0.5 * d * d) * bose[None, :]
        parts = np.empty((3 * n_peaks, grid.size))
        parts[0::3] = gb
        parts[1::3] = gb * (a * d / sg)
        parts[2::3] = gb * (a * d * d / sg)
        conv = scipy.fft.irfft(
            scipy.fft.rfft(parts, nfft, axis=-1) * kernel_fft(zw, zm), nfft, axis=-1
        )[:, nk:][:, take]
        jac[:, ipk : ipk + 3 * n_peaks] = conv.T
        q = p[ipk + 3 * n_peaks :]
        col = ipk + 3 * n_peaks
        if n_comp:
            jac[:, col : col + n_comp] = comp.T
        if n_pl:
            xr = pl_x / 30.0
            powr = np.where(ew > 0, xr ** (-q[n_comp + 1]), 0.0)
            jac[:, col + n_comp] = -powr
            jac[:, col + n_comp + 1] = q[n_comp] * powr * np.log(xr)
        return jac * inv_sd[:, None]

    res = scipy.optimize.least_squares(
        lambda p: (model(p) - yw) * inv_sd, p0, jac=jacobian, method="lm", x_scale="jac", max_nfev=max_nfev
    )
    cov, _ = _covariance(res, yw.size, sigma is not None)
    return _peak_table(res.x, cov, n_peaks, cluster, offset=ipk)


def _fit_convolved(
    e_all: Array,
    y_all: Array,
    n_peaks: int,
    initial: ArrayLike | None,
    window: tuple[float, float],
    sigma: ArrayLike | None,
    cluster: int,
    fw: float,
    mm: float,
    ext: float,
    max_nfev: int,
) -> NDArray[np.void]:
    """Gaussians convolved with a given resolution ``(fwhm, m)`` in ``window`` (no ZLP in the spectrum)."""
    disp = float(e_all[1] - e_all[0])
    sel = (e_all >= window[0]) & (e_all <= window[1])
    ew, yw = e_all[sel], y_all[sel]
    sd = np.ones_like(yw) if sigma is None else np.asarray(sigma, float)[sel]
    nk = int(round(ext / disp))
    grid = ew[0] + disp * np.arange(-nk, ew.size + nk)
    kern = resolution_function(disp * np.arange(-nk, nk + 1), fw, mm, disp)
    kern /= kern.sum()

    def model(p: Array) -> Array:
        g = np.where(grid > 0, _gauss_sum(grid, p), 0.0)
        return np.convolve(g, kern, mode="valid")

    cen, sig, heights = _p0_peaks(ew, yw, n_peaks, initial, window, disp)
    h0 = np.interp(cen, ew, yw) if heights is None else heights
    p0 = np.ravel(np.column_stack([h0, cen, sig]))
    res = scipy.optimize.least_squares(
        lambda p: (model(p) - yw) / sd, p0, method="lm", x_scale="jac", max_nfev=max_nfev
    )
    cov, _ = _covariance(res, yw.size, sigma is not None)
    return _peak_table(res.x, cov, n_peaks, cluster)


def _fit_plain(
    e_all: Array,
    y_all: Array,
    n_peaks: int,
    initial: ArrayLike | None,
    window: tuple[float, float],
    sigma: ArrayLike | None,
    cluster: int,
) -> NDArray[np.void]:
    """Plain sum of Gaussians in ``window`` (no resolution)."""
    m = (e_all >= window[0]) & (e_all <= window[1])
    e, y = e_all[m], y_all[m]
    sg = np.ones_like(y) if sigma is None else np.asarray(sigma, float)[m]
    if initial is None:
        loc = np.nonzero((y[1:-1] > y[:-2]) & (y[1:-1] >= y[2:]))[0] + 1
        loc = loc[np.argsort(y[loc])[::-1][:n_peaks]]
        cen = list(e[loc])
        while len(cen) < n_peaks:
            cen.append(float(np.linspace(e[0], e[-1], n_peaks + 2)[len(cen) + 1]))
        p0 = np.ravel([[np.interp(c, e, y), c, 5.0 / FWHM_PER_SIGMA] for c in cen])
    else:
        ini = np.asarray(initial, float)
        if ini.ndim == 1:
            p0 = np.ravel([[np.interp(c, e, y), c, 5.0 / FWHM_PER_SIGMA] for c in ini])
        else:
            p0 = np.ravel([[h, c, w / FWHM_PER_SIGMA] for h, c, w in ini])

    def resid(p: Array) -> Array:
        return (_gauss_sum(e, p) - y) / sg

    res = scipy.optimize.least_squares(resid, p0, method="lm", x_scale="jac", max_nfev=20000)
    cov, _ = _covariance(res, y.size, sigma is not None)
    return _peak_table(res.x, cov, n_peaks, cluster)
