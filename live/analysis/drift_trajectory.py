"""Drift trajectory of a frame series: a robust polynomial fit of the measured shifts against frame time.

Pure functions over numpy arrays. :func:`fit_drift_trajectory`: Theil-Sen start, Tukey biweight IRLS; default
linear. Shifts follow the contract of :mod:`~stemlive.live.analysis.registration`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DriftTrajectory", "fit_drift_trajectory"]


_MODELS = {"constant": 0, "linear": 1, "quadratic": 2}


@dataclass(frozen=True)
class DriftTrajectory:
    """Polynomial drift trajectory ``d(t) = sum_k coef[k] * (t - t0)**k`` (pixels, shape (2,) per time).

    Attributes
    ----------
    t0 : float
        Time origin of the polynomial (the first time given to the fit).
    coef : ndarray, shape (degree + 1, 2)
        Polynomial coefficients for ``(dy, dx)``; ``coef[1]`` is the velocity (px per time unit) for a linear fit.
    residuals : ndarray, shape (n, 2)
        Measured minus fitted shifts.
    inliers : ndarray of bool, shape (n,)
        Points kept by the robust fit (outliers, e.g. whole-unit-cell jumps, have zero weight).
    residual_rms : float
        RMS length of the residual vectors over the inliers (pixels).
    """

    t0: float
    coef: np.ndarray
    residuals: np.ndarray
    inliers: np.ndarray
    residual_rms: float

    @property
    def velocity(self) -> np.ndarray:
        """Drift rate ``(vy, vx)`` at ``t0`` in pixels per time unit (0 for a constant model)."""
        return self.coef[1].copy() if len(self.coef) > 1 else np.zeros(2)

    def __call__(self, t: float | np.ndarray) -> np.ndarray:
        """Fitted shift at time(s) ``t``: shape ``(2,)`` for a scalar, ``(n, 2)`` for an array."""
        tt = np.asarray(t, dtype=float) - self.t0
        powers = tt[..., None] ** np.arange(len(self.coef))
        return powers @ self.coef


#: Points the Theil-Sen start of a linear fit uses at most (evenly spaced; the IRLS that follows uses all).
THEIL_SEN_POINTS = 256


def fit_drift_trajectory(
    times: np.ndarray,
    shifts: np.ndarray,
    *,
    model: str = "linear",
    robust: bool = True,
    min_scale: float = 0.02,
) -> DriftTrajectory:
    """Robust polynomial fit of measured shifts against time (or frame index).

    Parameters
    ----------
    times : (n,) array_like
        Time of each shift, e.g. frame centre times in seconds or frame indices.
    shifts : (n, 2) array_like
        Measured ``(dy, dx)`` in pixels.
    model : {"linear", "constant", "quadratic"}, optional
        Polynomial degree. Reduced automatically when there are too few points. Default ``"linear"``.
    robust : bool, optional
        Tukey-biweight iteratively reweighted least squares started from a Theil-Sen fit, so that isolated
        outliers (e.g. whole-unit-cell registration jumps) get zero weight. Default True.
    min_scale : float, optional
        Lower bound (pixels) on the robust noise scale, so near-perfect data does not flag tiny deviations as
        outliers. Default 0.02.

    Returns
    -------
    DriftTrajectory
    """
    t = np.asarray(times, dtype=float)
    s = np.asarray(shifts, dtype=float)
    if t.ndim != 1 or s.shape != (t.size, 2):
        raise ValueError(f"times must be (n,) and shifts (n, 2); got {t.shape} and {s.shape}")
    if t.size == 0:
        raise ValueError("need at least one shift to fit a trajectory")
    if model not in _MODELS:
        raise ValueError(f"model must be one of {sorted(_MODELS)}, got {model!r}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(s))):
        raise ValueError("times and shifts must be finite")
    degree = min(_MODELS[model], len(np.unique(t)) - 1)
    t0 = float(t[0])
    tt = t - t0
    a = tt[:, None] ** np.arange(degree + 1)
    w = np.ones(t.size)

    def wls(weights: np.ndarray) -> np.ndarray:
        sw = np.sqrt(weights)[:, None]
        return np.linalg.lstsq(a * sw, s * sw, rcond=None)[0]

    if degree == 1 and robust and t.size >= 3:  # Theil-Sen start: median pairwise slope
        # over at most THEIL_SEN_POINTS evenly spaced points: all pairs of n points cost O(n^2) per fit, and a
        # live tilt refits on every frame (52 ms per frame at 850 frames in one tilt); the IRLS then uses all points
        sub = np.unique(np.linspace(0, t.size - 1, min(t.size, THEIL_SEN_POINTS)).round().astype(int))
        i, j = np.triu_indices(sub.size, 1)
        i, j = sub[i], sub[j]
        ok = tt[j] != tt[i]
        slopes = (s[j][ok] - s[i][ok]) / (tt[j][ok] - tt[i][ok])[:, None]
        slope = np.median(slopes, axis=0)
        coef = np.stack([np.median(s - slope * tt[:, None], axis=0), slope])
    elif degree == 0 and robust:
        coef = np.median(s, axis=0)[None, :]
    else:
        coef = wls(w)
    if robust and t.size > degree + 1:
        for _ in range(20):
            r = np.hypot(*(s - a @ coef).T)
            scale = max(1.4826 * np.median(r), min_scale)
            u = r / (4.685 * scale)
            w = np.where(u < 1, (1 - u**2) ** 2, 0.0)
            if np.count_nonzero(w) < degree + 1:
                w = np.ones(t.size)
                break
            new = wls(w)
            if np.allclose(new, coef, atol=1e-9):
                coef = new
                break
            coef = new
    coef = np.asarray(coef, dtype=float).reshape(degree + 1, 2)
    res = s - a @ coef
    inliers = w > 0
    rms = float(np.sqrt(np.mean(np.sum(res[inliers] ** 2, axis=1)))) if inliers.any() else float("nan")
    return DriftTrajectory(t0=t0, coef=coef, residuals=res, inliers=inliers, residual_rms=rms)


