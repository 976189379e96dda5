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

Matching: each projection's metals are predicted from the current model and geometry, the shift is found by
cross-correlating Gaussian-rendered point sets weighted by column intensity (the interface and the flake edges
make it unique on the lattice), and nearest neighbours closer than ``match_fraction`` of the metal spacing are
paired; matching and calibration alternate (the first pass uses the nominal angles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, sparse
from scipy.spatial import cKDTree

from .reconstruct import axis_angle_matrix, cc_peak_shift

__all__ = ["Calibration", "MetalObservations", "calibrate_tilts", "euler_from_rotation", "point_set_shift",
           "project_points", "recalibrate", "rotation_from_angles"]

_ALPHA_AXIS = np.array([0.0, -1.0, 0.0])
_BETA_AXIS = np.array([-1.0, 0.0, 0.0])
_Z_AXIS = np.array([0.0, 0.0, 1.0])


def _skew(n: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])


def rotation_from_angles(alpha_deg: np.ndarray, beta_deg: np.ndarray, gamma_deg: np.ndarray) -> np.ndarray:
    """``Rz(gamma) R_[0,-1,0](alpha) R_[-1,0,0](beta)``, shape ``(n, 3, 3)``."""
    a, b, g = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, float)) for v in (alpha_deg, beta_deg, gamma_deg)))
    return axis_angle_matrix(_Z_AXIS, g) @ axis_angle_matrix(_ALPHA_AXIS, a) @ axis_angle_matrix(_BETA_AXIS, b)


def euler_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_from_angles`: ``(..., 3, 3)`` -> ``(..., 3)`` ``(alpha, beta, gamma)`` degrees.

    ``R = Rz(gamma) Ry(-alpha) Rx(-beta)`` is a ZYX Euler form.
    """
    r = np.asarray(rotation, float)
    y = np.arcsin(np.clip(-r[..., 2, 0], -1.0, 1.0))
    z = np.arctan2(r[..., 1, 0], r[..., 0, 0])
    x = np.arctan2(r[..., 2, 1], r[..., 2, 2])
    return np.degrees(np.stack([-y, -x, z], axis=-1))


def project_points(r_A: np.ndarray, rotation: np.ndarray, shift_px: np.ndarray, pixel_A: float) -> np.ndarray:
    """Image positions ``(n, 2)`` (row, col) of sample points ``r_A`` ``(n, 3)`` for one projection."""
    lab = np.asarray(r_A, float) @ np.asarray(rotation).T
    return lab[:, [1, 0]] / pixel_A + np.asarray(shift_px, float)


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


def _match(pred: np.ndarray, meas: np.ndarray, tol: float) -> np.ndarray:
    """Index of the measured point paired with each predicted point (-1: none), one-to-one nearest neighbours."""
    out = np.full(len(pred), -1)
    if not len(meas) or not len(pred):
        return out
    d, j = cKDTree(meas).query(pred, distance_upper_bound=tol)
    ok = np.isfinite(d)
    # keep the closest claim of each measured point
    order = np.argsort(np.where(ok, d, np.inf))
    taken = np.zeros(len(meas), bool)
    for i in order[: ok.sum()]:
        if not taken[j[i]]:
            out[i] = j[i]
            taken[j[i]] = True
    return out


# ------------------------------------------------------------------------------------------------ solver
def _solve(r0: np.ndarray, ang0: np.ndarray, t0: np.ndarray, obs: np.ndarray, u: np.ndarray, s: np.ndarray,
           ref: int, pixel_A: float, max_nfev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """Least squares over all atoms and all projections except the reference's parameters.

    ``obs`` (m, 2): (atom, projection) of every measurement ``u`` (m, 2) with errors ``s`` (m, 2).
    Returns atoms, angles (n, 3) rad, shifts (n, 2), rms (px) and the (n, 6) standard errors (rad, px).
    """
    n_atoms, n_proj = len(r0), len(ang0)
    free = np.array([k for k in range(n_proj) if k != ref])
    slot = np.full(n_proj, -1)
    slot[free] = np.arange(len(free))
    ai, pk = obs[:, 0], obs[:, 1]
    m = len(obs)
    n_par = 3 * n_atoms + 6 * len(free)
    ka, kb, kz = _skew(_ALPHA_AXIS), _skew(_BETA_AXIS), _skew(_Z_AXIS)

    def unpack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = p[: 3 * n_atoms].reshape(n_atoms, 3)
        q = p[3 * n_atoms:].reshape(-1, 6)
        ang, t = ang0.copy(), t0.copy()
        ang[free], t[free] = q[:, :3], q[:, 3:5] if q.size else t[free]
        return r, ang, t

    def mats(ang: np.ndarray) -> tuple[np.ndarray, ...]:
        deg = np.degrees(ang)
        rg = axis_angle_matrix(_Z_AXIS, deg[:, 2])
        ra = axis_angle_matrix(_ALPHA_AXIS, deg[:, 0])
        rb = axis_angle_matrix(_BETA_AXIS, deg[:, 1])
        return rg, ra, rb

    def fun(p: np.ndarray) -> np.ndarray:
        r, ang, t = unpack(p)
        rg, ra, rb = mats(ang)
        rot = rg @ ra @ rb
        lab = np.einsum("mij,mj->mi", rot[pk], r[ai])
        pred = lab[:, [1, 0]] / pixel_A + t[pk]
        return ((pred - u) / s).ravel()

    def jac(p: np.ndarray) -> sparse.csr_matrix:
        r, ang, t = unpack(p)
        rg, ra, rb = mats(ang)
        rot = rg @ ra @ rb
        d_a = rg @ ka @ ra @ rb
        d_b = rg @ ra @ kb @ rb
        d_g = kz @ rot
        rows = np.arange(2 * m).reshape(m, 2)
        w = 1.0 / s / pixel_A  # (m, 2)
        blocks_v, blocks_c = [], []
        for j in range(3):  # atom coordinates
            blocks_v.append(rot[pk][:, [1, 0], j] * w)
            blocks_c.append(np.broadcast_to((3 * ai + j)[:, None], (m, 2)))
        fr = slot[pk]
        has = fr >= 0
        base = 3 * n_atoms + 6 * np.maximum(fr, 0)
        for j, dm in enumerate((d_a, d_b, d_g)):
            blocks_v.append(np.einsum("mij,mj->mi", dm[pk], r[ai])[:, [1, 0]] * w * has[:, None])
            blocks_c.append(np.broadcast_to((base + j)[:, None], (m, 2)))
        eye = np.eye(2)
        for j in range(2):
            blocks_v.append(eye[j][None, :] / s * has[:, None])
            blocks_c.append(np.broadcast_to((base + 3 + j)[:, None], (m, 2)))
        vals = np.concatenate([v.ravel() for v in blocks_v])
        cols = np.concatenate([np.asarray(c).ravel() for c in blocks_c])
        rr = np.tile(rows.ravel(), len(blocks_v))
        return sparse.csr_matrix((vals, (rr, cols)), shape=(2 * m, n_par + 0))

    q0 = np.column_stack([ang0[free], t0[free], np.zeros(len(free))]) if len(free) else np.zeros((0, 6))
    p0 = np.concatenate([r0.ravel(), q0.ravel()])
    res = optimize.least_squares(fun, p0, jac=jac, method="trf", tr_solver="lsmr", x_scale="jac",  # type: ignore
                                 max_nfev=max_nfev, xtol=1e-10, ftol=1e-12)
    r, ang, t = unpack(res.x)
    resid = (res.fun.reshape(m, 2) * s)
    rms = float(np.sqrt(np.mean(resid**2)))
    chi2 = float(res.fun @ res.fun) / max(2 * m - n_par, 1)
    errors = np.zeros((n_proj, 6))
    if len(free):
        j = jac(res.x).tocsc()
        ja, jp = j[:, : 3 * n_atoms], j[:, 3 * n_atoms:]
        jpd = jp.toarray()
        # Schur complement of the block-diagonal atom part: S = Jp'Jp - Jp'Ja (Ja'Ja)^-1 Ja'Jp
        jtj_a = (ja.T @ ja).toarray() if n_atoms * 3 <= 3000 else None
        if jtj_a is not None:
            inv_a = np.linalg.pinv(jtj_a)
        else:
            inv_a = _block_diag_inverse(ja, n_atoms)
        b = (ja.T @ jpd)
        schur = jpd.T @ jpd - b.T @ (inv_a @ b)
        cov = np.linalg.pinv(schur) * chi2
        e = np.sqrt(np.clip(np.diag(cov), 0.0, None)).reshape(-1, 6)
        errors[free] = e
    return r, ang, t, rms, errors


def _block_diag_inverse(ja: sparse.csc_matrix, n_atoms: int) -> np.ndarray:
    """Inverse of the block-diagonal ``Ja' Ja`` (3 x 3 per atom) as a dense matrix."""
    jtj = (ja.T @ ja).tocsr()
    out = np.zeros((3 * n_atoms, 3 * n_atoms))
    for i in range(n_atoms):
        s = slice(3 * i, 3 * i + 3)
        out[s, s] = np.linalg.pinv(jtj[s, s].toarray())
    return out


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
    v = np.cross(normal, _Z_AXIS)
    sv, cv = np.linalg.norm(v), float(normal @ _Z_AXIS)
    q = np.eye(3) if sv < 1e-15 else np.eye(3) + _skew(v) + _skew(v) @ _skew(v) * ((1 - cv) / sv**2)
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
    return axis_angle_matrix(_Z_AXIS, angle_deg)


# ------------------------------------------------------------------------------------------------ driver
def calibrate_tilts(metals: MetalObservations, nominal_alpha_deg: np.ndarray, nominal_beta_deg: np.ndarray,
                    pixel_A: float, shape: tuple[int, int], *, reference: int | None = None,
                    match_fraction: float = 0.3, rounds: int = 3, min_projections: int = 3,
                    max_nfev: int = 50) -> Calibration:
    """Match metal columns across projections and solve equation 1 for the 3D metals and every projection's
    angles, shift and in-plane rotation.

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
        Match-calibrate rounds after the first, which pairs only metals within 30 % of the field size (at least
        25 A) of the
        centre.
    min_projections : int
        Metals seen in fewer projections are left out.
    max_nfev : int
        Solver iterations per round.

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
    spacing = _spacing(p_ref)
    # start model: the reference projection at z = 0
    r = np.column_stack([(p_ref[:, 1] - centre[1]) * pixel_A, (p_ref[:, 0] - centre[0]) * pixel_A,
                         np.zeros(len(p_ref))])
    w_ref = np.asarray(metals.intensity[ref], float)
    ang = np.column_stack([np.radians(al), np.radians(be), np.zeros(n)])
    t = np.tile(centre, (n, 1))
    order = np.argsort(np.hypot(al - al[ref], be - be[ref]))
    idx = np.full((len(r), n), -1)
    idx[:, ref] = np.arange(len(r))
    rms, errors = np.nan, np.zeros((n, 6))
    # the first round pairs only the central metals: with nominal angles the predicted positions far from the
    # centre are off by several pixels (wrong pairs there spoil the first solve)
    radius0 = max(0.3 * min(shape) * pixel_A, 25.0)
    central = np.hypot(r[:, 0] - r[:, 0].mean(), r[:, 1] - r[:, 1].mean()) < radius0
    for rnd in range(rounds + 1):
        rot = rotation_from_angles(*np.degrees(ang).T)
        for k in order:
            if k == ref:
                continue
            meas = np.asarray(metals.position[k], float)
            pred = project_points(r, rot[k], t[k], pixel_A)
            if rnd == 0:
                t[k] = t[k] + point_set_shift(pred, w_ref, meas, np.asarray(metals.intensity[k], float), shape)
                pred = project_points(r, rot[k], t[k], pixel_A)
            idx[:, k] = _match(pred, meas, match_fraction * spacing)
            if rnd == 0:  # refine the shift on the central matches before the solve
                ok = (idx[:, k] >= 0) & central
                if ok.any():
                    t[k] = t[k] + np.median(meas[idx[ok, k]] - pred[ok], axis=0)
                    idx[:, k] = _match(project_points(r, rot[k], t[k], pixel_A), meas, match_fraction * spacing)
                idx[~central, k] = -1
        if rnd == 0:
            idx[~central, ref] = -1
        elif rnd == 1:
            idx[:, ref] = np.arange(len(r))
        seen = (idx >= 0).sum(axis=1) >= min_projections
        if seen.sum() < 10:
            raise ValueError(f"only {int(seen.sum())} metal columns matched in >= {min_projections} projections")
        keep = np.flatnonzero(seen)
        ai, pk = np.nonzero(idx[keep] >= 0)
        u = np.array([metals.position[int(k)][idx[keep][i, k]] for i, k in zip(ai, pk, strict=True)])
        s = np.array([metals.error[int(k)][idx[keep][i, k]] for i, k in zip(ai, pk, strict=True)])
        s = np.maximum(np.nan_to_num(s, nan=1.0, posinf=1.0), 0.01)
        r_k, ang, t, rms, errors = _solve(r[keep], ang, t, np.column_stack([ai, pk]), u, s, ref, pixel_A, max_nfev)
        r = r.copy()
        r[keep] = r_k
    rot = rotation_from_angles(*np.degrees(ang).T)
    keep = np.flatnonzero((idx >= 0).sum(axis=1) >= min_projections)
    r_s, rot_s, t_s, plane_err = _to_sample_frame(r[keep], rot, t, ref, pixel_A)
    e = euler_from_rotation(rot_s)
    err_deg = np.degrees(errors[:, :3])
    # the reference projection's orientation is known as well as the plane normal (x slope ~ alpha, y ~ beta)
    err_deg[ref, 0], err_deg[ref, 1] = np.degrees(plane_err[0]), np.degrees(plane_err[1])
    return Calibration(e[:, 0], e[:, 1], e[:, 2], err_deg[:, 0], err_deg[:, 1], err_deg[:, 2], t_s, r_s,
                       idx[keep], rms, ref, float(pixel_A))


def recalibrate(calibration: Calibration, metal_px: np.ndarray, metal_err_px: np.ndarray,
                max_nfev: int = 50) -> Calibration:
    """Solve equation 1 again with known correspondences (e.g. metals refitted at their predicted positions).

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
    keep = np.flatnonzero(valid.sum(axis=1) >= 3)
    ai, pk = np.nonzero(valid[keep])
    u = metal_px[keep][ai, pk]
    s = np.maximum(metal_err_px[keep][ai, pk], 0.01)
    ang = np.radians(np.column_stack([calibration.alpha_deg, calibration.beta_deg, calibration.gamma_deg]))
    r, ang, t, rms, errors = _solve(calibration.metals_A[keep], ang, calibration.shift_px.copy(),
                                    np.column_stack([ai, pk]), u, s, ref, calibration.pixel_A, max_nfev)
    rot = rotation_from_angles(*np.degrees(ang).T)
    r_s, rot_s, t_s, plane_err = _to_sample_frame(r, rot, t, ref, calibration.pixel_A)
    e = euler_from_rotation(rot_s)
    err_deg = np.degrees(errors[:, :3])
    err_deg[ref, 0], err_deg[ref, 1] = np.degrees(plane_err[0]), np.degrees(plane_err[1])
    observed = np.where(valid[keep], np.arange(len(keep))[:, None], -1)
    return Calibration(e[:, 0], e[:, 1], e[:, 2], err_deg[:, 0], err_deg[:, 1], err_deg[:, 2], t_s, r_s,
                       observed, rms, ref, calibration.pixel_A)


def _spacing(p: np.ndarray) -> float:
    if len(p) < 3:
        return 10.0
    d, _ = cKDTree(p).query(p, k=2)
    return float(np.median(d[:, 1]))
