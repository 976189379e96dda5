"""Segmentation of EELS line scans / maps: correlation k-means; the peak fits of cluster means are in
:mod:`.peaks` (re-exported here)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .peaks import PEAK_DTYPE, PeakFit, fit_gaussians, fit_peaks, fit_resolution, resolution_function

__all__ = [
    "znormalise",
    "kmeans_correlation",
    "cluster_means",
    "fit_gaussians",
    "fit_peaks",
    "PeakFit",
    "fit_resolution",
    "resolution_function",
    "PEAK_DTYPE",
]

Array = NDArray[np.float64]

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
