"""Tilt-angle calibration from metal columns matched across the projections of a tilt series (pure numpy/scipy).

The least-squares problem of the reference experiment (Sci. Adv. 7, eabi6699, equation 1): the fitted 2D
positions ``u_ik`` (row, col, pixels) of metal atom ``i`` in projection ``k`` are modelled as

``u_ik = P (R_k r_i) / pixel + t_k,   R_k = Rz(gamma_k) R_[0,-1,0](alpha_k) R_[-1,0,0](beta_k)``

with ``P`` taking lab ``(y, x)`` to ``(row, col)``, ``r_i`` the 3D metal coordinates (Angstrom, sample frame),
``(alpha_k, beta_k)`` the actual stage angles, ``gamma_k`` an in-plane image rotation and ``t_k`` the image shift.
All ``r_i`` and all projection parameters are solved together by ``scipy.optimize.least_squares`` with the
analytic sparse Jacobian (each residual depends on one atom and one projection). The pixel size fixes the scale.

Gauge: a rigid motion of the model and the opposite motion of every projection change nothing. The solve holds
the reference projection (the one nearest zero nominal tilt) at its start orientation and shift; afterwards the
frame is moved to the sample frame of ``docs/tomography.md``: origin at the metals' centroid, the metal plane
(least-squares plane through the metal atoms: the monolayer's mean plane) horizontal, and the reference
projection without in-plane rotation (``gamma = 0``). Standard errors come from the Schur complement of the
Jacobian's atom blocks (the projection-parameter covariance at the fixed reference); the reference projection's
own angle errors are those of the fitted plane's normal.

Solver: the model is linear in the atoms, so they are eliminated in closed form (variable projection: a 3 x 3
least-squares solution per atom) and ``scipy.optimize.least_squares`` runs over the ``5 (n - 1)`` projection
parameters with the analytic reduced Jacobian (MINPACK ``lm``); at the reference size (2,700 metals, 12 tilts) a
solve takes ~1 s CPU, against ~8 s of the former sparse ``trf``/``lsmr`` solve over all coordinates.

Matching (:func:`_register`): a projection's metals are predicted from the current model and geometry (at first
the reference projection's metals at z = 0 and the nominal angles); the shift comes from cross-correlating
Gaussian-rendered point sets and the most frequent nearest-neighbour displacement of the central metals; then ICP
from the centre outwards (pair within a growing radius, fit the projection's angles and shift with the model
fixed), so the nominal angles' scale and shear errors (several pixels at the field's edge) never pair distant
columns wrongly; last the lattice translation: all shifts by up to two lattice vectors are tried and the one with
the smallest mean squared residual wins (a shift by a lattice vector pairs almost as well: the flake's
edges and the second lattice across the interface break the symmetry). Pairs are mutual nearest neighbours within
``match_fraction`` of the metal spacing. Solving and matching against the 3D model then alternate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, sparse
from scipy.spatial import cKDTree

from .reconstruct import axis_angle_matrix, cc_peak_shift
from .tilt_geometry import (
    ALPHA_AXIS,
    BETA_AXIS,
    Z_AXIS,
    euler_from_rotation,
    project_points,
    rotation_from_angles,
    skew,
)

__all__ = ["Calibration", "MetalObservations", "calibrate_tilts", "euler_from_rotation", "point_set_shift",
           "project_points", "recalibrate", "rotation_from_angles"]

@dataclass(frozen=True, eq=False)
class MetalObservations:
    """Metal columns of every projection.

    Attributes
    ----------
    position : list of ndarray (m_k, 2)
        Row, col (px) per projection.
    error : list of ndarray (m_k, 2)
        Standard errors (px).
    intensity : list of ndarray (m_k,)
        Integrated column intensity (used for matching).
    """

    position: Sequence[np.ndarray]
    error: Sequence[np.ndarray]
    intensity: Sequence[np.ndarray]


@dataclass(frozen=True, eq=False)
class Calibration:
    """Calibrated geometry and the 3D metal model.

    Attributes
    ----------
    alpha_deg, beta_deg, gamma_deg : ndarray (n,)
        Calibrated stage angles and in-plane image rotation.
    alpha_err_deg, beta_err_deg, gamma_err_deg : ndarray (n,)
        Standard errors.
    shift_px : ndarray (n, 2)
        ``t_k`` (row, col): image position of the sample origin.
    metals_A : ndarray (N, 3)
        3D metal coordinates, sample frame, Angstrom.
    observed : ndarray (N, n) int
        Index of the matched column in each projection (-1: not matched).
    rms_px : float
        RMS position residual.
    reference : int
        Reference projection.
    pixel_A : float
    """

    alpha_deg: np.ndarray
    beta_deg: np.ndarray
    gamma_deg: np.ndarray
    alpha_err_deg: np.ndarray
    beta_err_deg: np.ndarray
    gamma_err_deg: np.ndarray
    shift_px: np.ndarray
    metals_A: np.ndarray
    observed: np.ndarray
    rms_px: float
    reference: int
    pixel_A: float

    @property
    def rotations(self) -> np.ndarray:
        """``(n, 3, 3)`` sample-to-lab matrices including the in-plane rotation."""
        return rotation_from_angles(self.alpha_deg, self.beta_deg, self.gamma_deg)

    def project(self, r_A: np.ndarray, k: int) -> np.ndarray:
        """Image positions (row, col) of sample points in projection ``k``."""
        return project_points(r_A, self.rotations[k], self.shift_px[k], self.pixel_A)


# ------------------------------------------------------------------------------------------------ model
def _rotations(ang_rad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations ``(n, 3, 3)`` and their derivatives ``(n, 3, 3, 3)`` by (alpha, beta, gamma) (radians)."""
    deg = np.degrees(np.atleast_2d(ang_rad))
    rg = axis_angle_matrix(Z_AXIS, deg[:, 2])
    ra = axis_angle_matrix(ALPHA_AXIS, deg[:, 0])
    rb = axis_angle_matrix(BETA_AXIS, deg[:, 1])
    rot = rg @ ra @ rb
    d = np.stack([rg @ skew(ALPHA_AXIS) @ ra @ rb, rg @ ra @ skew(BETA_AXIS) @ rb, skew(Z_AXIS) @ rot], axis=1)
    return rot, d


def _fit_projection(r: np.ndarray, u: np.ndarray, ang: np.ndarray, t: np.ndarray, pixel_A: float,
                    max_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta, gamma) (rad) and shift of one projection fitted to paired points, the model ``r`` fixed.

    Five parameters against thousands of points: Levenberg-Marquardt on the 5 x 5 normal equations, with
    soft-L1 weights (scale 1 px, iteratively reweighted) so that a few wrong pairs do not pull the fit.
    (``scipy.optimize.least_squares`` spent most of its time in an SVD of the full Jacobian per iteration:
    this is called ~25 times per projection while matching.)
    """
    if len(r) < 4:
        return ang, t
    q = np.concatenate([ang, t]).astype(float)

    def evaluate(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rot, d = _rotations(q[None, :3])
        res = (r @ rot[0].T)[:, [1, 0]] / pixel_A + q[3:] - u
        rho = 2.0 * (np.sqrt(1.0 + np.sum(res**2, axis=1)) - 1.0)  # soft-L1 of the distance
        return res, rho

    res, rho = evaluate(q)
    cost, lam = float(rho.sum()), 1e-3
    for _ in range(max_iter):
        _, d = _rotations(q[None, :3])
        jac = np.empty((len(r), 2, 5))
        for j in range(3):
            jac[:, :, j] = (r @ d[0, j].T)[:, [1, 0]] / pixel_A
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


# ------------------------------------------------------------------------------------------------ matching
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


def _lattice_vectors(xy: np.ndarray) -> np.ndarray:
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


def _register(r: np.ndarray, meas: np.ndarray, tree: cKDTree, ang: np.ndarray, t: np.ndarray, pixel_A: float,
              lattice_A: np.ndarray, tol: float, radii: Sequence[float], reach: int, mode_shift: bool = False,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Pair the model metals ``r`` with one projection's measured metals and fit the projection's geometry.

    ICP from the centre outwards (pair the metals within a growing radius of the model's centre, fit the
    projection with the model fixed), then the lattice translation: on a crystal a shift by a lattice vector
    pairs almost as well, so every translation ``i a1 + j a2`` (``|i|, |j| <= reach``) is tried (pair, refit)
    and, among those pairing at least 95 % of the most, the one with the smallest mean squared residual wins (the
    field's edges cut both point sets, so a wrong translation can pair a few more metals): a second lattice (the
    interface's vernier) and the flake's edges break the symmetry.

    With ``mode_shift`` the shift is first corrected by the most frequent displacement from the central
    predicted metals to their nearest measured ones (a cross-correlation blurred by the nominal angles' scale
    error can land between columns).

    Returns angles (rad), shift, the measured index of every model metal (-1: none) and the score margin of the
    chosen translation over the next best (px^2).
    """
    xy = r[:, :2] - r[:, :2].mean(axis=0)
    rho = np.hypot(xy[:, 0], xy[:, 1])
    if mode_shift:
        rot, _ = _rotations(ang[None])
        t = t + _displacement_mode(project_points(r[rho <= radii[0] * rho.max()], rot[0], t, pixel_A), meas, tree,
                                   tol)
    for frac in radii:
        sel = rho <= frac * rho.max()
        rot, _ = _rotations(ang[None])
        idx, _ = _pairs(project_points(r[sel], rot[0], t, pixel_A), tree, tol)
        ok = idx >= 0
        ang, t = _fit_projection(r[sel][ok], meas[idx[ok]], ang, t, pixel_A)
    trials: list[tuple[int, float, np.ndarray, np.ndarray, np.ndarray]] = []
    steps = range(-reach, reach + 1)
    for i in steps:
        for j in steps:
            rot, _ = _rotations(ang[None])
            shift = (rot[0] @ (i * lattice_A[0] + j * lattice_A[1]))[[1, 0]] / pixel_A
            a_c, t_c = ang, t + shift
            idx, _ = _pairs(project_points(r, rot[0], t_c, pixel_A), tree, tol)
            ok = idx >= 0
            a_c, t_c = _fit_projection(r[ok], meas[idx[ok]], a_c, t_c, pixel_A, max_iter=10)
            rot, _ = _rotations(a_c[None])
            idx, d = _pairs(project_points(r, rot[0], t_c, pixel_A), tree, tol)
            n_pairs = int((idx >= 0).sum())
            trials.append((n_pairs, float(np.mean(d[idx >= 0] ** 2)) if n_pairs else np.inf, a_c, t_c, idx))
    # the field's edges cut both point sets, so a wrong translation can pair a few more metals: compare the mean
    # squared residual of the translations that pair at least 95 % of the most
    most = max(tr[0] for tr in trials)
    best = sorted((tr for tr in trials if tr[0] >= 0.95 * most), key=lambda tr: tr[1])
    margin = (best[1][1] - best[0][1]) * best[0][0] if len(best) > 1 else np.inf
    return best[0][2], best[0][3], best[0][4], float(margin)


# ------------------------------------------------------------------------------------------------ solver
def _solve(r0: np.ndarray, ang0: np.ndarray, t0: np.ndarray, obs: np.ndarray, u: np.ndarray, s: np.ndarray,
           ref: int, pixel_A: float, max_nfev: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """Least squares of equation 1 over all atoms and all projections except the reference's parameters.

    Variable projection: the model is linear in the atom coordinates, so for given projection parameters each
    atom's ``(x, y, z)`` is a 3 x 3 weighted least-squares solution, and ``scipy.optimize.least_squares`` runs over
    the projection parameters alone (``5 (n - 1)``) with the Jacobian ``(I - Ja (Ja'Ja)^-1 Ja') Jp`` (Kaufman's;
    a Gauss-Newton step of it equals the joint step with the atoms eliminated by the Schur complement).

    ``obs`` (m, 2): (atom, projection) of every measurement ``u`` (m, 2) with errors ``s`` (m, 2).
    Returns atoms, angles (n, 3) rad, shifts (n, 2), rms (px), the (n, 5) standard errors (rad, px) of
    (alpha, beta, gamma, t) and the residuals (m, 2) px. ``r0`` is used only for atoms without observations.
    """
    n_atoms, n_proj = len(r0), len(ang0)
    free = np.array([k for k in range(n_proj) if k != ref], int)
    slot = np.full(n_proj, -1)
    slot[free] = np.arange(len(free))
    ai, pk = obs[:, 0], obs[:, 1]
    m = len(obs)
    n_q = 5 * len(free)
    w = 1.0 / s
    seg = sparse.csr_matrix((np.ones(m), (ai, np.arange(m))), shape=(n_atoms, m))
    eye3 = np.eye(3)

    def geometry(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ang, t = ang0.copy(), t0.copy()
        qq = q.reshape(-1, 5)
        ang[free], t[free] = qq[:, :3], qq[:, 3:]
        rot, d = _rotations(ang)
        return ang, t, rot, d

    def atoms(rot: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        aw = rot[pk][:, [1, 0], :] / pixel_A * w[..., None]  # (m, 2, 3) weighted d(row, col)/d(x, y, z)
        mm = (seg @ np.einsum("mai,maj->mij", aw, aw).reshape(m, 9)).reshape(n_atoms, 3, 3)
        b = seg @ np.einsum("mai,ma->mi", aw, (u - t[pk]) * w)
        seen = np.trace(mm, axis1=1, axis2=2) > 0
        mm[~seen] = eye3
        r = np.linalg.solve(mm + 1e-9 * np.trace(mm, axis1=1, axis2=2)[:, None, None] * eye3, b[..., None])[..., 0]
        r[~seen] = r0[~seen]
        return r, aw, mm

    def fun(q: np.ndarray) -> np.ndarray:
        _, t, rot, _ = geometry(q)
        r, _, _ = atoms(rot, t)
        pred = np.einsum("mij,mj->mi", rot[pk], r[ai])[:, [1, 0]] / pixel_A + t[pk]
        return ((pred - u) * w).ravel()

    def jac(q: np.ndarray) -> np.ndarray:
        _, t, rot, d = geometry(q)
        r, aw, mm = atoms(rot, t)
        has = slot[pk] >= 0
        local = np.empty((m, 2, 5))
        for j in range(3):
            local[:, :, j] = np.einsum("mij,mj->mi", d[pk, j], r[ai])[:, [1, 0]] / pixel_A
        local[:, :, 3:] = np.eye(2)
        local *= w[..., None]
        jp4 = np.zeros((m, 2, len(free), 5))
        jp4[np.flatnonzero(has), :, slot[pk[has]], :] = local[has]
        jp = jp4.reshape(m, 2, n_q)
        c = (seg @ np.einsum("mai,maq->miq", aw, jp).reshape(m, 3 * n_q)).reshape(n_atoms, 3, n_q)
        g = np.linalg.solve(mm + 1e-9 * np.trace(mm, axis1=1, axis2=2)[:, None, None] * eye3, c)
        return (jp - np.einsum("mai,miq->maq", aw, g[ai])).reshape(2 * m, n_q)

    q0 = np.column_stack([ang0[free], t0[free]]).ravel()
    res = optimize.least_squares(fun, q0, jac=jac, method="lm", x_scale="jac",
                                 max_nfev=max_nfev, xtol=1e-10, ftol=1e-10, gtol=1e-10)
    ang, t, rot, _ = geometry(res.x)
    r, _, _ = atoms(rot, t)
    resid = res.fun.reshape(m, 2) / w
    rms = float(np.sqrt(np.mean(resid**2)))
    n_par = 3 * int((np.bincount(ai, minlength=n_atoms) > 0).sum()) + n_q
    chi2 = float(res.fun @ res.fun) / max(2 * m - n_par, 1)
    errors = np.zeros((n_proj, 5))
    if n_q:
        jj = np.asarray(res.jac)
        cov = np.linalg.pinv(jj.T @ jj) * chi2
        errors[free] = np.sqrt(np.clip(np.diag(cov), 0.0, None)).reshape(-1, 5)
    return r, ang, t, rms, errors, resid


def _to_sample_frame(r: np.ndarray, rot: np.ndarray, t: np.ndarray, ref: int,
                     pixel_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Move the solution to the sample frame (centroid origin, horizontal metal plane, gamma_ref = 0).

    Returns atoms, rotations, shifts and the plane-normal standard error (rad) per axis (x, y slopes).
    """
    c = r.mean(axis=0)
    rc = r - c
    # plane z = a x + b y through the centroid
    a_mat = rc[:, :2]
    coef, *_ = np.linalg.lstsq(a_mat, rc[:, 2], rcond=None)
    resid = rc[:, 2] - a_mat @ coef
    dof = max(len(rc) - 3, 1)
    cov = np.linalg.pinv(a_mat.T @ a_mat) * float(resid @ resid) / dof
    normal = np.array([-coef[0], -coef[1], 1.0])
    normal /= np.linalg.norm(normal)
    # rotation taking the normal to z (smallest rotation)
    v = np.cross(normal, Z_AXIS)
    sv, cv = np.linalg.norm(v), float(normal @ Z_AXIS)
    q = np.eye(3) if sv < 1e-15 else np.eye(3) + skew(v) + skew(v) @ skew(v) * ((1 - cv) / sv**2)
    # then about z so that the reference projection has gamma = 0
    # (right-multiplying by Rz about the sample normal equals the image rotation only to first order: iterate)
    for _ in range(4):
        q = _rz(euler_from_rotation(rot[ref] @ q.T)[2]) @ q
    r_new = rc @ q.T
    rot_new = rot @ q.T
    # shifts: u = P(R r)/px + t = P(R' r')/px + P(R c)/px + t
    shift_c = np.einsum("kij,j->ki", rot, c)[:, [1, 0]] / pixel_A
    return r_new, rot_new, t + shift_c, np.sqrt(np.clip(np.diag(cov), 0, None))


def _rz(angle_deg: float) -> np.ndarray:
    return axis_angle_matrix(Z_AXIS, angle_deg)


def _calibration(r: np.ndarray, ang: np.ndarray, t: np.ndarray, errors: np.ndarray, observed: np.ndarray,
                 rms: float, ref: int, pixel_A: float) -> Calibration:
    rot = rotation_from_angles(*np.degrees(ang).T)
    r_s, rot_s, t_s, plane_err = _to_sample_frame(r, rot, t, ref, pixel_A)
    e = euler_from_rotation(rot_s)
    err_deg = np.degrees(errors[:, :3])
    # the reference projection's orientation is known as well as the plane normal (x slope ~ alpha, y ~ beta)
    err_deg[ref, 0], err_deg[ref, 1] = np.degrees(plane_err[0]), np.degrees(plane_err[1])
    return Calibration(e[:, 0], e[:, 1], e[:, 2], err_deg[:, 0], err_deg[:, 1], err_deg[:, 2], t_s, r_s,
                       observed, rms, ref, float(pixel_A))


def _outliers(resid: np.ndarray, floor_px: float = 0.5) -> np.ndarray:
    """Measurements off by more than 6 robust standard deviations (and ``floor_px``)."""
    d = np.hypot(resid[:, 0], resid[:, 1])
    return d > max(6.0 * 1.4826 * float(np.median(d)), floor_px)


# ------------------------------------------------------------------------------------------------ driver
def calibrate_tilts(metals: MetalObservations, nominal_alpha_deg: np.ndarray, nominal_beta_deg: np.ndarray,
                    pixel_A: float, shape: tuple[int, int], *, reference: int | None = None,
                    match_fraction: float = 0.3, rounds: int = 2, min_projections: int = 3,
                    max_nfev: int = 30, reach: int = 2, translation_min_metals: int = 200) -> Calibration:
    """Match metal columns across projections and solve equation 1 for the 3D metals and every projection's
    angles, shift and in-plane rotation.

    Matching (:func:`_register`, every projection in order of its beam direction's angle from the reference):
    the start model is the reference projection's metals at z = 0; the shift from the cross-correlation of the
    point sets; then ICP from the centre outwards (radii 30, 55, 100 % of the field) fitting the projection's
    (alpha, beta, gamma, t) with the model fixed, so the nominal angles' scale and shear errors never pair
    distant columns wrongly; last the lattice translation (the best of ``(2 reach + 1)^2`` lattice vectors).
    Then ``rounds`` times: solve equation 1 over all tilts (:func:`_solve`), drop outliers, register every
    projection again against the 3D model (the ripple is now in the prediction).

    Parameters
    ----------
    metals : MetalObservations
        Fitted metal columns of each projection (:func:`stemlive.live.analysis.columns.find_columns`).
    nominal_alpha_deg, nominal_beta_deg : ndarray (n,)
        Start values.
    pixel_A : float
        Pixel size (the fixed scale).
    shape : (ny, nx)
        Image shape.
    reference : int, optional
        Reference projection; default the smallest nominal total tilt.
    match_fraction : float
        Pairing tolerance as a fraction of the metal spacing.
    rounds : int
        Solve-and-register rounds.
    min_projections : int
        Metals seen in fewer projections are left out.
    max_nfev : int
        Solver iterations per round.
    reach : int
        Lattice translations tried per projection: ``i a1 + j a2`` with ``|i|, |j| <= reach``.
    translation_min_metals : int
        Fewest metals in the reference projection for the lattice-translation search.  On a small field the
        angle fit absorbs a lattice translation and the edges do not break the symmetry (measured on a 2.6 nm
        flake, ~70 metals, 6 tilts: a tilt 2.75 deg off with the search, all within 0.33 deg without it).

    Raises
    ------
    ValueError
        Too few metals matched to constrain the geometry.
    """
    al = np.asarray(nominal_alpha_deg, float)
    be = np.asarray(nominal_beta_deg, float)
    n = len(al)
    ref = int(np.argmin(np.hypot(al, be))) if reference is None else int(reference)
    centre = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0])
    p_ref = np.asarray(metals.position[ref], float)
    if len(p_ref) < 10:
        raise ValueError(f"only {len(p_ref)} metal columns in the reference projection")
    tol = match_fraction * _spacing(p_ref)
    if len(p_ref) < translation_min_metals:
        reach = 0
    # start model: the reference projection at z = 0
    r = np.column_stack([(p_ref[:, 1] - centre[1]) * pixel_A, (p_ref[:, 0] - centre[0]) * pixel_A,
                         np.zeros(len(p_ref))])
    lattice = _lattice_vectors(r[:, :2])
    w_ref = np.asarray(metals.intensity[ref], float)
    ang = np.column_stack([np.radians(al), np.radians(be), np.zeros(n)])
    t = np.tile(centre, (n, 1))
    beam = rotation_from_angles(al, be, np.zeros(n))[:, 2, :]
    order = [int(k) for k in np.argsort(-(beam @ beam[ref])) if k != ref]
    meas = [np.asarray(p, float).reshape(-1, 2) for p in metals.position]
    errs = [np.asarray(e, float).reshape(-1, 2) for e in metals.error]
    trees = [cKDTree(p) for p in meas]
    idx = np.full((len(r), n), -1)
    idx[:, ref] = np.arange(len(r))
    for k in order:
        rot = rotation_from_angles(*np.degrees(ang[k]))[0]
        pred = project_points(r, rot, t[k], pixel_A)
        t[k] = t[k] + point_set_shift(pred, w_ref, meas[k], np.asarray(metals.intensity[k], float), shape)
        ang[k], t[k], idx[:, k], _ = _register(r, meas[k], trees[k], ang[k], t[k], pixel_A, lattice, tol,
                                               (0.3, 0.55, 1.0), reach, mode_shift=True)
    rms, errors = np.nan, np.zeros((n, 5))
    bad = np.zeros(idx.shape, bool)
    for rnd in range(rounds + 1):
        obs_ok = (idx >= 0) & ~bad
        keep = np.flatnonzero(obs_ok.sum(axis=1) >= min_projections)
        if len(keep) < 10:
            raise ValueError(f"only {len(keep)} metal columns matched in >= {min_projections} projections")
        ai, pk = np.nonzero(obs_ok[keep])
        jm = idx[keep][ai, pk]
        u, s = np.zeros((len(ai), 2)), np.ones((len(ai), 2))
        for k in range(n):
            on = pk == k
            u[on] = meas[k][jm[on]]
            s[on] = errs[k][jm[on]]
        s = np.maximum(np.nan_to_num(s, nan=1.0, posinf=1.0), 0.01)
        r_k, ang, t, rms, errors, resid = _solve(r[keep], ang, t, np.column_stack([ai, pk]), u, s, ref, pixel_A,
                                                 max_nfev)
        r = r.copy()
        r[keep] = r_k
        if rnd == rounds:
            break
        out = _outliers(resid)
        bad[:] = False
        bad[keep[ai[out]], pk[out]] = True
        for k in order:  # register again against the 3D model: only the translation's neighbours
            ang[k], t[k], idx[:, k], _ = _register(r, meas[k], trees[k], ang[k], t[k], pixel_A, lattice, tol,
                                                   (1.0,), min(reach, 1))
    observed = np.where(((idx >= 0) & ~bad)[keep], idx[keep], -1)
    return _calibration(r[keep], ang, t, errors, observed, rms, ref, pixel_A)


def recalibrate(calibration: Calibration, metal_px: np.ndarray, metal_err_px: np.ndarray,
                max_nfev: int = 30) -> Calibration:
    """Solve equation 1 again with known correspondences (e.g. metals refitted at their predicted positions).

    Measurements off by more than 6 robust standard deviations are dropped and the problem solved again.

    Parameters
    ----------
    calibration : Calibration
        Start geometry and metals (same order as ``metal_px``).
    metal_px : ndarray (N, n, 2)
        Measured (row, col) of metal i in projection k; NaN where not measured.
    metal_err_px : ndarray (N, n, 2)
        Standard errors.
    max_nfev : int
        Solver iterations.
    """
    ref = calibration.reference
    valid = np.all(np.isfinite(metal_px), axis=-1) & np.all(np.isfinite(metal_err_px), axis=-1)
    ang = np.radians(np.column_stack([calibration.alpha_deg, calibration.beta_deg, calibration.gamma_deg]))
    t = calibration.shift_px.copy()
    r = calibration.metals_A
    for attempt in range(2):
        keep = np.flatnonzero(valid.sum(axis=1) >= 3)
        ai, pk = np.nonzero(valid[keep])
        u = metal_px[keep][ai, pk]
        s = np.maximum(metal_err_px[keep][ai, pk], 0.01)
        r_k, ang, t, rms, errors, resid = _solve(r[keep], ang, t, np.column_stack([ai, pk]), u, s, ref,
                                                 calibration.pixel_A, max_nfev)
        out = _outliers(resid)
        if attempt or not out.any():
            break
        valid = valid.copy()
        valid[keep[ai[out]], pk[out]] = False
    observed = np.where(valid[keep], np.arange(len(keep))[:, None], -1)
    return _calibration(r_k, ang, t, errors, observed, rms, ref, calibration.pixel_A)


def _spacing(p: np.ndarray) -> float:
    if len(p) < 3:
        return 10.0
    d, _ = cKDTree(p).query(p, k=2)
    return float(np.median(d[:, 1]))
