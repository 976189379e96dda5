"""Tilt-angle calibration from metal columns matched across the projections of a tilt series (pure numpy/scipy).

The least-squares problem of the reference experiment (Sci. Adv. 7, eabi6699, equation 1), with a linear image
distortion common to all projections: the fitted 2D positions ``u_ik`` (row, col, pixels) of metal atom ``i`` in
projection ``k`` are modelled as

``u_ik = D P (R_k r_i) / pixel + t_k,   R_k = Rz(gamma_k) R_[0,-1,0](alpha_k) R_[-1,0,0](beta_k),   D = I + E``

with ``P`` taking lab ``(y, x)`` to ``(row, col)``, ``r_i`` the 3D metal coordinates (Angstrom, sample frame),
``(alpha_k, beta_k)`` the actual stage angles, ``gamma_k`` an in-plane image rotation, ``t_k`` the image shift
and ``E`` the scan's linear distortion (coil non-orthogonality, the drift during a frame: the same in every
projection). All ``r_i``, all projection parameters and ``E`` are solved together. The pixel size fixes the scale.

Gauge: a rigid motion of the model and the opposite motion of every projection change nothing. The solve holds
the reference projection (the one nearest zero nominal tilt) at its start orientation and shift; afterwards the
frame is moved to the sample frame of ``docs/tomography.md``: origin at the metals' centroid, the metal plane
(least-squares plane through the metal atoms: the monolayer's mean plane) horizontal, and the reference
projection without in-plane rotation (``gamma = 0``). Of ``E``, an isotropic scale (the same as a scaled model)
and a rotation (the same as adding it to every ``gamma_k``) are degenerate; the scan fixes them: the fast scan
axis is undistorted (pixel size and image orientation), and the slow axis's stretch ``a = E_rr`` and shear
``b = E_cr`` are fitted (:mod:`.tilt_geometry`). For a flat sample these are nearly degenerate with a uniform
in-plane strain of the model: the two differ only through the foreshortening, to second order in the tilt
(``1 - cos theta``), so they need tilts of 15-25 deg and many metals (a 512^2 field: errors ~1e-4; on a 128^2
field ~1e-3, more than the drift's distortion there). Standard errors
come from the Schur complement of the Jacobian's atom blocks (the covariance of the projection parameters and
``e`` at the fixed reference); the reference projection's own angle errors are those of the fitted plane's
normal.

Solver: the model is linear in the atoms, so they are eliminated in closed form (variable projection: a 3 x 3
least-squares solution per atom) and ``scipy.optimize.least_squares`` runs over the ``5 (n - 1) + 2``
projection and distortion parameters with the analytic reduced Jacobian (MINPACK ``lm``); at the reference size
(2,700 metals, 12 tilts) a solve takes ~1 s CPU, against ~8 s of the former sparse ``trf``/``lsmr`` solve over
all coordinates.

Matching (:mod:`.tilt_matching`): every projection's metals are paired with the model's predicted ones, from the
centre outwards, with a lattice-translation search. Solving and matching against the 3D model then alternate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import optimize, sparse
from scipy.spatial import cKDTree

from .reconstruct import axis_angle_matrix
from .tilt_geometry import (
    DISTORTION_BASIS,
    Z_AXIS,
    distortion_matrix,
    euler_from_rotation,
    identifiable_distortion,
    project_points,
    rotation_from_angles,
    rotations_and_derivatives,
    skew,
)
from .tilt_matching import lattice_vectors, point_set_shift, register

__all__ = ["Calibration", "MetalObservations", "calibrate_tilts", "euler_from_rotation", "point_set_shift",
           "project_points", "recalibrate", "rotation_from_angles"]

# the matching's names as they were before the split into tilt_matching (used by the tests)
_register, _lattice_vectors = register, lattice_vectors


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
    distortion : ndarray (2, 2)
        ``E`` of the image distortion ``D = I + E`` common to all projections (row, col: ``u = D p + t``); its
        slow-axis column is fitted, the fast axis is the gauge (pixel size and image orientation: ``E[:, 1] = 0``).
    distortion_err : ndarray (2, 2)
        Standard errors of the elements of ``E``.
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
    distortion: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))
    distortion_err: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))

    @property
    def distortion_matrix(self) -> np.ndarray:
        """``D = I + E`` ``(2, 2)``."""
        return np.eye(2) + self.distortion

    @property
    def rotations(self) -> np.ndarray:
        """``(n, 3, 3)`` sample-to-lab matrices including the in-plane rotation."""
        return rotation_from_angles(self.alpha_deg, self.beta_deg, self.gamma_deg)

    def project(self, r_A: np.ndarray, k: int) -> np.ndarray:
        """Image positions (row, col) of sample points in projection ``k``."""
        return project_points(r_A, self.rotations[k], self.shift_px[k], self.pixel_A, self.distortion_matrix)


# ------------------------------------------------------------------------------------------------ solver
def _solve(r0: np.ndarray, ang0: np.ndarray, t0: np.ndarray, e0: np.ndarray, obs: np.ndarray, u: np.ndarray,
           s: np.ndarray, ref: int, pixel_A: float, max_nfev: int, fit_distortion: bool = True) -> _Solution:
    """Least squares of equation 1 over all atoms, all projections except the reference's parameters and the
    identifiable image distortion ``(a, b)`` common to all projections (``fit_distortion``; else ``e0`` fixed).

    Variable projection: the model is linear in the atom coordinates, so for given projection parameters each
    atom's ``(x, y, z)`` is a 3 x 3 weighted least-squares solution, and ``scipy.optimize.least_squares`` runs over
    the projection parameters alone (``5 (n - 1)`` and ``e``) with the Jacobian ``(I - Ja (Ja'Ja)^-1 Ja') Jp``
    (Kaufman's; a Gauss-Newton step of it equals the joint step with the atoms eliminated by the Schur complement).

    ``obs`` (m, 2): (atom, projection) of every measurement ``u`` (m, 2) with errors ``s`` (m, 2).
    ``r0`` is used only for atoms without observations.
    """
    n_atoms, n_proj = len(r0), len(ang0)
    free = np.array([k for k in range(n_proj) if k != ref], int)
    slot = np.full(n_proj, -1)
    slot[free] = np.arange(len(free))
    ai, pk = obs[:, 0], obs[:, 1]
    m = len(obs)
    n_q = 5 * len(free)
    n_e = 2 if fit_distortion else 0
    w = 1.0 / s
    seg = sparse.csr_matrix((np.ones(m), (ai, np.arange(m))), shape=(n_atoms, m))
    eye3 = np.eye(3)

    def geometry(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ang, t = ang0.copy(), t0.copy()
        qq = q[:n_q].reshape(-1, 5)
        ang[free], t[free] = qq[:, :3], qq[:, 3:]
        e = q[n_q:] if n_e else np.asarray(e0, float)
        rot, d = rotations_and_derivatives(ang)
        return ang, t, e, distortion_matrix(e), rot, d

    def atoms(rot: np.ndarray, dmat: np.ndarray, t: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        proj = np.einsum("ab,kbj->kaj", dmat, rot[:, [1, 0], :]) / pixel_A  # (n, 2, 3) d(row, col)/d(x, y, z)
        aw = proj[pk] * w[..., None]
        mm = (seg @ np.einsum("mai,maj->mij", aw, aw).reshape(m, 9)).reshape(n_atoms, 3, 3)
        b = seg @ np.einsum("mai,ma->mi", aw, (u - t[pk]) * w)
        seen = np.trace(mm, axis1=1, axis2=2) > 0
        mm[~seen] = eye3
        r = np.linalg.solve(mm + 1e-9 * np.trace(mm, axis1=1, axis2=2)[:, None, None] * eye3, b[..., None])[..., 0]
        r[~seen] = r0[~seen]
        return r, aw, mm, proj

    def fun(q: np.ndarray) -> np.ndarray:
        _, t, _, dmat, rot, _ = geometry(q)
        r, _, _, proj = atoms(rot, dmat, t)
        pred = np.einsum("mij,mj->mi", proj[pk], r[ai]) + t[pk]
        return ((pred - u) * w).ravel()

    def jac(q: np.ndarray) -> np.ndarray:
        _, t, _, dmat, rot, d = geometry(q)
        r, aw, mm, _ = atoms(rot, dmat, t)
        has = slot[pk] >= 0
        local = np.empty((m, 2, 5))
        for j in range(3):
            local[:, :, j] = np.einsum("mij,mj->mi", d[pk, j], r[ai])[:, [1, 0]] / pixel_A @ dmat.T
        local[:, :, 3:] = np.eye(2)
        local *= w[..., None]
        jp4 = np.zeros((m, 2, len(free), 5))
        jp4[np.flatnonzero(has), :, slot[pk[has]], :] = local[has]
        jp = np.zeros((m, 2, n_q + n_e))
        jp[:, :, :n_q] = jp4.reshape(m, 2, n_q)
        if n_e:  # d u / d e_j = B_j P(R_k r) / pixel, in every projection (the reference's too)
            img = np.einsum("mij,mj->mi", rot[pk][:, [1, 0], :], r[ai]) / pixel_A
            for j in range(n_e):
                jp[:, :, n_q + j] = img @ DISTORTION_BASIS[j].T * w
        n_c = n_q + n_e
        c = (seg @ np.einsum("mai,maq->miq", aw, jp).reshape(m, 3 * n_c)).reshape(n_atoms, 3, n_c)
        g = np.linalg.solve(mm + 1e-9 * np.trace(mm, axis1=1, axis2=2)[:, None, None] * eye3, c)
        return (jp - np.einsum("mai,miq->maq", aw, g[ai])).reshape(2 * m, n_c)

    q0 = np.concatenate([np.column_stack([ang0[free], t0[free]]).ravel(), np.asarray(e0, float)[:n_e]])
    res = optimize.least_squares(fun, q0, jac=jac, method="lm", x_scale="jac",
                                 max_nfev=max_nfev, xtol=1e-10, ftol=1e-10, gtol=1e-10)
    ang, t, e, dmat, rot, _ = geometry(res.x)
    r, _, _, _ = atoms(rot, dmat, t)
    resid = res.fun.reshape(m, 2) / w
    rms = float(np.sqrt(np.mean(resid**2)))
    n_par = 3 * int((np.bincount(ai, minlength=n_atoms) > 0).sum()) + n_q + n_e
    chi2 = float(res.fun @ res.fun) / max(2 * m - n_par, 1)
    errors = np.zeros((n_proj, 5))
    e_err, wald = np.zeros(2), 0.0
    if n_q + n_e:
        jj = np.asarray(res.jac)
        cov = np.linalg.pinv(jj.T @ jj) * chi2
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        errors[free] = sd[:n_q].reshape(-1, 5)
        e_err[:n_e] = sd[n_q:]
        if n_e:
            wald = float(e @ np.linalg.pinv(cov[n_q:, n_q:]) @ e)
    return _Solution(r, ang, t, np.array(e, float), rms, errors, e_err, resid, wald)


def _solve_distortion_if_significant(r0: np.ndarray, ang0: np.ndarray, t0: np.ndarray, e0: np.ndarray,
                                     obs: np.ndarray, u: np.ndarray, s: np.ndarray, ref: int, pixel_A: float,
                                     max_nfev: int, fit_distortion: bool, chi2_min: float) -> _Solution:
    """:func:`_solve` with the distortion, kept only when it differs from none significantly (Wald
    ``e' C^-1 e >= chi2_min``, 2 degrees of freedom); otherwise solved again with ``D = I`` (the fit's standard
    errors of ``e`` are kept: the precision the data have for it).

    On a small field the distortion's errors (~1e-3 at 128^2) exceed the drift's distortion, and in the scan's gauge
    its noise moves the model's scale and orientation (measured at 128^2: in-plane RMSD 2.2 pm with the noisy
    estimate against 0.9 pm without)."""
    sol = _solve(r0, ang0, t0, e0, obs, u, s, ref, pixel_A, max_nfev, fit_distortion)
    if not fit_distortion or sol.wald >= chi2_min:
        return sol
    plain = _solve(r0, ang0, t0, np.zeros(2), obs, u, s, ref, pixel_A, max_nfev, False)
    return plain._replace(e_err=sol.e_err, wald=sol.wald)


class _Solution(NamedTuple):
    """:func:`_solve`: atoms, angles (n, 3) rad, shifts (n, 2), distortion ``(a, b)``, rms (px), the (n, 5)
    standard errors (rad, px) of (alpha, beta, gamma, t), those of ``e``, the residuals (m, 2) px and ``e``'s
    Wald statistic."""

    r: np.ndarray
    ang: np.ndarray
    t: np.ndarray
    e: np.ndarray
    rms: float
    errors: np.ndarray
    e_err: np.ndarray
    resid: np.ndarray
    wald: float = 0.0


def _to_sample_frame(r: np.ndarray, rot: np.ndarray, t: np.ndarray, ref: int, pixel_A: float,
                     dmat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    # shifts: u = D P(R r)/px + t = D P(R' r')/px + D P(R c)/px + t
    shift_c = np.einsum("kij,j->ki", rot, c)[:, [1, 0]] / pixel_A @ dmat.T
    return r_new, rot_new, t + shift_c, np.sqrt(np.clip(np.diag(cov), 0, None))


def _rz(angle_deg: float) -> np.ndarray:
    return axis_angle_matrix(Z_AXIS, angle_deg)


def _calibration(sol: _Solution, observed: np.ndarray, ref: int, pixel_A: float) -> Calibration:
    rot = rotation_from_angles(*np.degrees(sol.ang).T)
    r_s, rot_s, t_s, plane_err = _to_sample_frame(sol.r, rot, sol.t, ref, pixel_A, distortion_matrix(sol.e))
    e = euler_from_rotation(rot_s)
    err_deg = np.degrees(sol.errors[:, :3])
    # the reference projection's orientation is known as well as the plane normal (x slope ~ alpha, y ~ beta)
    err_deg[ref, 0], err_deg[ref, 1] = np.degrees(plane_err[0]), np.degrees(plane_err[1])
    return Calibration(e[:, 0], e[:, 1], e[:, 2], err_deg[:, 0], err_deg[:, 1], err_deg[:, 2], t_s, r_s,
                       observed, sol.rms, ref, float(pixel_A), distortion_matrix(sol.e) - np.eye(2),
                       np.abs(np.tensordot(sol.e_err, DISTORTION_BASIS, axes=1)))


def _outliers(resid: np.ndarray, floor_px: float = 0.5) -> np.ndarray:
    """Measurements off by more than 6 robust standard deviations (and ``floor_px``)."""
    d = np.hypot(resid[:, 0], resid[:, 1])
    return d > max(6.0 * 1.4826 * float(np.median(d)), floor_px)


# ------------------------------------------------------------------------------------------------ driver
def calibrate_tilts(metals: MetalObservations, nominal_alpha_deg: np.ndarray, nominal_beta_deg: np.ndarray,
                    pixel_A: float, shape: tuple[int, int], *, reference: int | None = None,
                    match_fraction: float = 0.3, rounds: int = 2, min_projections: int = 3,
                    max_nfev: int = 30, reach: int = 2, translation_min_metals: int = 200,
                    distortion: bool = False, distortion_chi2: float = 11.8, distortion_min_metals: int = 1000,
                    ) -> Calibration:
    """Match metal columns across projections and solve equation 1 for the 3D metals and every projection's
    angles, shift and in-plane rotation.

    Matching (:func:`_register`, every projection in order of its beam direction's angle from the reference):
    the start model is the reference projection's metals at z = 0; the shift from the cross-correlation of the
    point sets; then ICP from the centre outwards (radii 30, 55, 100 % of the field) fitting the projection's
    (alpha, beta, gamma, t) with the model fixed, so the nominal angles' scale and shear errors never pair
    distant columns wrongly; last the lattice translation (the best of ``(2 reach + 1)^2`` lattice vectors).
    Then ``rounds`` times: solve equation 1 over all tilts (:func:`_solve`, with the common image distortion),
    drop outliers, register every projection again against the 3D model (the ripple and the distortion are now in
    the prediction).

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
    distortion : bool
        Also fit the identifiable part of a linear image distortion common to all projections
        (:mod:`.tilt_geometry`: the slow scan axis's stretch and shear); False (default): none (``D = I``). Off
        by default: on the column fits of simulated 512^2 sums the estimate came out 13-40 standard errors from
        the true distortion (systematic column errors swamp its second-order signal: docs/tomography.md).
    distortion_chi2 : float
        The distortion is kept only when its Wald statistic (2 degrees of freedom) reaches this: 11.8, a
        false-positive rate of 0.27 % ("3 sigma"); below it ``D = I`` (:func:`_solve_distortion_if_significant`).
    distortion_min_metals : int
        Fewest metals in the reference projection for the distortion fit. Its information grows with the number of
        metals times the field's size (standard errors ~1e-4 at 2,700 metals, ~1.5e-3 at 170 on a 128^2 field,
        above the drift's distortion there), and on small fields the first pass's column biases (unresolved
        neighbours) came out as a "significant" distortion that moved the model's scale and orientation (104^2,
        6 tilts: angles 0.48 deg off against < 0.2 without).

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
    if len(p_ref) < distortion_min_metals:
        distortion = False
    # start model: the reference projection at z = 0
    r = np.column_stack([(p_ref[:, 1] - centre[1]) * pixel_A, (p_ref[:, 0] - centre[0]) * pixel_A,
                         np.zeros(len(p_ref))])
    lattice = lattice_vectors(r[:, :2])
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
        ang[k], t[k], idx[:, k], _ = register(r, meas[k], trees[k], ang[k], t[k], pixel_A, lattice, tol,
                                              (0.3, 0.55, 1.0), reach, mode_shift=True)
    e = np.zeros(2)
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
        sol = _solve_distortion_if_significant(r[keep], ang, t, e, np.column_stack([ai, pk]), u, s, ref, pixel_A,
                                               max_nfev, distortion, distortion_chi2)
        ang, t, e = sol.ang, sol.t, sol.e
        r = r.copy()
        r[keep] = sol.r
        if rnd == rounds:
            break
        out = _outliers(sol.resid)
        bad[:] = False
        bad[keep[ai[out]], pk[out]] = True
        for k in order:  # register again against the 3D model: only the translation's neighbours
            ang[k], t[k], idx[:, k], _ = register(r, meas[k], trees[k], ang[k], t[k], pixel_A, lattice, tol,
                                                  (1.0,), min(reach, 1), distortion=distortion_matrix(e))
    observed = np.where(((idx >= 0) & ~bad)[keep], idx[keep], -1)
    return _calibration(sol, observed, ref, pixel_A)


def recalibrate(calibration: Calibration, metal_px: np.ndarray, metal_err_px: np.ndarray,
                max_nfev: int = 30, distortion: bool = False, distortion_chi2: float = 11.8,
                distortion_min_metals: int = 1000) -> Calibration:
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
    distortion : bool
        Fit the common image distortion (started at the calibration's); False (default): keep the calibration's.
    distortion_chi2, distortion_min_metals : float, int
        Significance threshold of the distortion and fewest metals to fit it (:func:`calibrate_tilts`).
    """
    ref = calibration.reference
    valid = np.all(np.isfinite(metal_px), axis=-1) & np.all(np.isfinite(metal_err_px), axis=-1)
    ang = np.radians(np.column_stack([calibration.alpha_deg, calibration.beta_deg, calibration.gamma_deg]))
    t = calibration.shift_px.copy()
    r = calibration.metals_A
    e = identifiable_distortion(calibration.distortion)
    distortion = distortion and len(r) >= distortion_min_metals
    for attempt in range(2):
        keep = np.flatnonzero(valid.sum(axis=1) >= 3)
        ai, pk = np.nonzero(valid[keep])
        u = metal_px[keep][ai, pk]
        s = np.maximum(metal_err_px[keep][ai, pk], 0.01)
        sol = _solve_distortion_if_significant(r[keep], ang, t, e, np.column_stack([ai, pk]), u, s, ref,
                                               calibration.pixel_A, max_nfev, distortion, distortion_chi2)
        ang, t, e = sol.ang, sol.t, sol.e
        out = _outliers(sol.resid)
        if attempt or not out.any():
            break
        valid = valid.copy()
        valid[keep[ai[out]], pk[out]] = False
    observed = np.where(valid[keep], np.arange(len(keep))[:, None], -1)
    return _calibration(sol, observed, ref, calibration.pixel_A)


def _spacing(p: np.ndarray) -> float:
    if len(p) < 3:
        return 10.0
    d, _ = cKDTree(p).query(p, k=2)
    return float(np.median(d[:, 1]))
