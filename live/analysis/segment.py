"""Segmentation of EELS line scans / maps: correlation k-means and Gaussian peak fits of cluster means."""

from __future__ import annotations

import numpy as np
import scipy.optimize
from numpy.typing import ArrayLike, NDArray

__all__ = ["znormalise", "kmeans_correlation", "cluster_means", "fit_gaussians", "PEAK_DTYPE"]

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
    order = np.argsort([np.mean(np.nonzero(labels == j)[0]) if np.any(labels == j) else np.inf for j in range(k)])
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


def fit_gaussians(
    energy_meV: ArrayLike,
    spectrum: ArrayLike,
    n_peaks: int = 5,
    *,
    initial: ArrayLike | None = None,
    window_meV: tuple[float, float] = (18.0, 60.0),
    sigma: ArrayLike | None = None,
    cluster: int = 0,
) -> NDArray[np.void]:
    """Fit a sum of ``n_peaks`` Gaussians by Levenberg-Marquardt (no bounds) in ``window_meV``.

    Parameters
    ----------
    initial
        Initial centres (meV), or ``(n_peaks, 3)`` rows of (height, centre, fwhm); default: centres at
        the largest local maxima of the spectrum, FWHM 5 meV.
    sigma
        Per-channel standard deviations (default: unweighted, errors scaled by the residual).

    Returns
    -------
    peaks
        Structured array (``PEAK_DTYPE``), sorted by centre: cluster, centre_meV, centre_err_meV, fwhm_meV,
        fwhm_err_meV, area, area_err; errors from the covariance ``(J^T J)^-1`` scaled by the reduced
        chi-square.
    """
    e = np.asarray(energy_meV, float)
    y = np.asarray(spectrum, float)
    m = (e >= window_meV[0]) & (e <= window_meV[1])
    e, y = e[m], y[m]
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
    p = res.x
    jac = res.jac
    dof = max(1, len(y) - len(p))
    s2 = float(res.fun @ res.fun) / dof if sigma is None else max(1.0, float(res.fun @ res.fun) / dof)
    try:
        cov = np.linalg.inv(jac.T @ jac) * s2
    except np.linalg.LinAlgError:
        cov = np.full((len(p), len(p)), np.nan)
    out = np.zeros(n_peaks, PEAK_DTYPE)
    for i in range(n_peaks):
        a, c, s = p[3 * i : 3 * i + 3]
        ca = cov[3 * i : 3 * i + 3, 3 * i : 3 * i + 3]
        s = abs(s)
        area = a * s * np.sqrt(2 * np.pi)
        ga = np.array([s, 0.0, a]) * np.sqrt(2 * np.pi)
        out[i] = (
            cluster,
            c,
            np.sqrt(ca[1, 1]),
            FWHM_PER_SIGMA * s,
            FWHM_PER_SIGMA * np.sqrt(ca[2, 2]),
            area,
            np.sqrt(max(ga @ ca @ ga, 0.0)),
        )
    return np.sort(out, order="centre_meV")
