"""Matching the metal columns of a projection to a 3D metal model (pure numpy/scipy; used by
:mod:`.tilt_calibration`).

A projection's metals are predicted from the current model and geometry (at first the reference projection's
metals at z = 0 and the nominal angles); the shift comes from cross-correlating Gaussian-rendered point sets
(:func:`point_set_shift`) and the most frequent nearest-neighbour displacement of the central metals; then ICP
from the centre outwards (pair within a growing radius, fit the projection's angles and shift with the model
fixed: :func:`fit_projection`), so the nominal angles' scale and shear errors (several pixels at the field's
edge) never pair distant columns wrongly; last the lattice translation: all shifts by up to two lattice vectors
are tried and the one with the smallest mean squared residual wins (a shift by a lattice vector pairs almost as
well: the flake's edges and the second lattice across the interface break the symmetry). Pairs are mutual
nearest neighbours within a fraction of the metal spacing (:func:`register`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from .reconstruct import cc_peak_shift
from .tilt_geometry import project_points, rotations_and_derivatives

__all__ = ["fit_projection", "lattice_vectors", "point_set_shift", "register"]


def fit_projection(r: np.ndarray, u: np.ndarray, ang: np.ndarray, t: np.ndarray, pixel_A: float,
                   max_iter: int = 30, distortion: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta, gamma) (rad) and shift of one projection fitted to paired points, the model ``r`` and the
    image distortion ``D`` ``(2, 2)`` (None: identity) fixed.

    Five parameters against thousands of points: Levenberg-Marquardt on the 5 x 5 normal equations, with
    soft-L1 weights (scale 1 px, iteratively reweighted) so that a few wrong pairs do not pull the fit.
    (``scipy.optimize.least_squares`` spent most of its time in an SVD of the full Jacobian per iteration:
    this is called ~25 times per projection while matching.)
    """
    if len(r) < 4:
        return ang, t
    q = np.concatenate([ang, t]).astype(float)
    dmat = np.eye(2) if distortion is None else np.asarray(distortion, float)

    def evaluate(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rot, _ = rotations_and_derivatives(q[None, :3])
        res = (r @ rot[0].T)[:, [1, 0]] / pixel_A @ dmat.T + q[3:] - u
        rho = 2.0 * (np.sqrt(1.0 + np.sum(res**2, axis=1)) - 1.0)  # soft-L1 of the distance
        return res, rho

    res, rho = evaluate(q)
    cost, lam = float(rho.sum()), 1e-3
    for _ in range(max_iter):
        _, d = rotations_and_derivatives(q[None, :3])
        jac = np.empty((len(r), 2, 5))
        for j in range(3):
            jac[:, :, j] = (r @ d[0, j].T)[:, [1, 0]] / pixel_A @ dmat.T
        jac[:, :, 3:] = np.eye(2)
        w = 1.0 / np.sqrt(1.0 + np.sum(res**2, axis=1))
        jw = jac * w[:, None, None]
        a = np.einsum("mai,maj->ij", jw, jac)
        g = np.einsum("mai,ma->i", jw, res)
        while True:
            step = -np.linalg.solve(a + lam * np.diag(np.diag(a)) + 1e-12 * np.trace(a) * np.eye(5), g)
            res_t, rho_t = evaluate(q + step)
            if float(rho_t.sum()) <= cost or lam > 1e8:
                break
            lam *= 10.0
        if lam > 1e8:
            break
        q, res, decrease = q + step, res_t, cost - float(rho_t.sum())
        cost, lam = float(rho_t.sum()), max(lam / 10.0, 1e-9)
        if decrease <= 1e-10 * max(cost, 1e-300) or np.abs(step).max() < 1e-10:
            break
    return q[:3], q[3:]


def _render_points(pos: np.ndarray, weight: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy import ndimage

    img = np.zeros(shape)
    idx = np.rint(pos).astype(int)
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < shape[0]) & (idx[:, 1] >= 0) & (idx[:, 1] < shape[1])
    np.add.at(img, (idx[ok, 0], idx[ok, 1]), weight[ok])
    return ndimage.gaussian_filter(img, sigma)


def point_set_shift(predicted: np.ndarray, w_pred: np.ndarray, measured: np.ndarray, w_meas: np.ndarray,
                    shape: tuple[int, int]) -> np.ndarray:
    """Shift ``(drow, dcol)`` that moves ``predicted`` onto ``measured`` (FFT cross-correlation, padded canvas)."""
    pad = (2 * shape[0], 2 * shape[1])
    off = np.array([shape[0] // 2, shape[1] // 2])
    a = _render_points(predicted + off, w_pred, pad, 1.5)
    b = _render_points(measured + off, w_meas, pad, 1.5)
    return cc_peak_shift(np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))).real)


def _pairs(pred: np.ndarray, tree: cKDTree, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours closer than ``tol``: index of the measured point of each predicted point (-1:
    none) and the distances."""
    n_meas = tree.n
    out = np.full(len(pred), -1)
    if not len(pred) or not n_meas:
        return out, np.full(len(pred), np.inf)
    d, j = tree.query(pred, distance_upper_bound=tol)
    ok = np.isfinite(d)
    _, back = cKDTree(pred).query(tree.data)
    ok &= back[np.minimum(j, n_meas - 1)] == np.arange(len(pred))
    out[ok] = j[ok]
    return out, np.where(ok, d, np.inf)


def lattice_vectors(xy: np.ndarray) -> np.ndarray:
    """Two metal lattice vectors ``(2, 3)`` (60 deg apart, z = 0) of a hexagonal point set ``(n, 2)`` (x, y)."""
    d, j = cKDTree(xy).query(xy, k=min(7, len(xy)))
    a = float(np.median(d[:, 1]))
    v = (xy[j[:, 1:]] - xy[:, None, :]).reshape(-1, 2)
    v = v[np.abs(np.hypot(v[:, 0], v[:, 1]) - a) < 0.2 * a]
    phase = np.angle(np.mean(np.exp(6j * np.arctan2(v[:, 1], v[:, 0])))) / 6.0
    ph = phase + np.array([0.0, np.pi / 3.0])
    return np.column_stack([a * np.cos(ph), a * np.sin(ph), np.zeros(2)])


def _displacement_mode(pred: np.ndarray, meas: np.ndarray, tree: cKDTree, tol: float) -> np.ndarray:
    """Most frequent displacement (px) from ``pred`` to the nearest measured point (2D histogram, 0.25 tol bins),
    refined by the mean of the displacements near it."""
    from scipy import ndimage

    if not len(pred) or not tree.n:
        return np.zeros(2)
    _, j = tree.query(pred)
    disp = meas[j] - pred
    reach = 3.5 * tol  # the nearest neighbour is at most ~half a metal spacing (~1.7 tol) away
    nb = int(np.ceil(2 * reach / (0.25 * tol)))
    hist, ey, ex = np.histogram2d(disp[:, 0], disp[:, 1], bins=nb, range=[[-reach, reach], [-reach, reach]])
    hist = ndimage.gaussian_filter(hist, 1.0)
    iy, ix = np.unravel_index(int(np.argmax(hist)), hist.shape)
    mode = np.array([(ey[iy] + ey[iy + 1]) / 2, (ex[ix] + ex[ix + 1]) / 2])
    near = np.hypot(*(disp - mode).T) < 0.5 * tol
    return disp[near].mean(axis=0) if near.any() else mode


def register(r: np.ndarray, meas: np.ndarray, tree: cKDTree, ang: np.ndarray, t: np.ndarray, pixel_A: float,
             lattice_A: np.ndarray, tol: float, radii: Sequence[float], reach: int, mode_shift: bool = False,
             distortion: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Pair the model metals ``r`` with one projection's measured metals and fit the projection's geometry.

    ICP from the centre outwards (pair the metals within a growing radius of the model's centre, fit the
    projection with the model fixed), then the lattice translation: on a crystal a shift by a lattice vector
    pairs almost as well, so every translation ``i a1 + j a2`` (``|i|, |j| <= reach``) is tried (pair, refit)
    and, among those pairing at least 95 % of the most, the one with the smallest mean squared residual wins (the
    field's edges cut both point sets, so a wrong translation can pair a few more metals): a second lattice (the
    interface's vernier) and the flake's edges break the symmetry.

    With ``mode_shift`` the shift is first corrected by the most frequent displacement from the central
    predicted metals to their nearest measured ones (a cross-correlation blurred by the nominal angles' scale
    error can land between columns). ``distortion``: the image distortion ``D`` ``(2, 2)`` of every projection
    (None: identity).

    Returns angles (rad), shift, the measured index of every model metal (-1: none) and the score margin of the
    chosen translation over the next best (px^2).
    """
    xy = r[:, :2] - r[:, :2].mean(axis=0)
    rho = np.hypot(xy[:, 0], xy[:, 1])
    if mode_shift:
        rot, _ = rotations_and_derivatives(ang[None])
        central = project_points(r[rho <= radii[0] * rho.max()], rot[0], t, pixel_A, distortion)
        t = t + _displacement_mode(central, meas, tree, tol)
    for frac in radii:
        sel = rho <= frac * rho.max()
        rot, _ = rotations_and_derivatives(ang[None])
        idx, _ = _pairs(project_points(r[sel], rot[0], t, pixel_A, distortion), tree, tol)
        ok = idx >= 0
        ang, t = fit_projection(r[sel][ok], meas[idx[ok]], ang, t, pixel_A, distortion=distortion)
    trials: list[tuple[int, float, np.ndarray, np.ndarray, np.ndarray]] = []
    steps = range(-reach, reach + 1)
    for i in steps:
        for j in steps:
            rot, _ = rotations_and_derivatives(ang[None])
            shift = (rot[0] @ (i * lattice_A[0] + j * lattice_A[1]))[[1, 0]] / pixel_A
            if distortion is not None:
                shift = distortion @ shift
            a_c, t_c = ang, t + shift
            idx, _ = _pairs(project_points(r, rot[0], t_c, pixel_A, distortion), tree, tol)
            ok = idx >= 0
            a_c, t_c = fit_projection(r[ok], meas[idx[ok]], a_c, t_c, pixel_A, max_iter=10,
                                      distortion=distortion)
            rot, _ = rotations_and_derivatives(a_c[None])
            idx, d = _pairs(project_points(r, rot[0], t_c, pixel_A, distortion), tree, tol)
            n_pairs = int((idx >= 0).sum())
            trials.append((n_pairs, float(np.mean(d[idx >= 0] ** 2)) if n_pairs else np.inf, a_c, t_c, idx))
    # the field's edges cut both point sets, so a wrong translation can pair a few more metals: compare the mean
    # squared residual of the translations that pair at least 95 % of the most
    most = max(tr[0] for tr in trials)
    best = sorted((tr for tr in trials if tr[0] >= 0.95 * most), key=lambda tr: tr[1])
    margin = (best[1][1] - best[0][1]) * best[0][0] if len(best) > 1 else np.inf
    return best[0][2], best[0][3], best[0][4], float(margin)
