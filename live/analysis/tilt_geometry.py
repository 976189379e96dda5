"""The double-tilt geometry of a projection: rotation from the stage's (alpha, beta) and an in-plane angle, its
inverse, the linear image distortion common to a series, and the projection of sample points into an image (the
conventions of docs/tomography.md).

Image distortion: ``u = D P(R r) / pixel + t`` with ``D = I + E`` the same in every projection (the drift during
a frame, scan-coil non-orthogonality). Of the four components of ``E`` two are not identifiable from the
projections: an isotropic scale (the same as a scaled model: the pixel size is the scale reference) and a rotation
(the same as adding it to every projection's in-plane rotation gamma). The gauge that fixes them is the scan's:
the fast scan axis (columns) is undistorted, since a line takes ~1/ny of a frame and the drift within it is
negligible, and it carries the calibrated pixel size and the image orientation; the identifiable two components
are the slow axis's column of ``E`` (:data:`DISTORTION_BASIS`): ``a = E_rr`` (rows stretched) and ``b = E_cr``
(rows sheared sideways). The drift during a frame, ``E = v (line time, dwell)`` per pixel, has exactly this form up
to the dwell/line ratio (1/nx).
"""

from __future__ import annotations

import numpy as np

from .reconstruct import axis_angle_matrix

__all__ = ["ALPHA_AXIS", "BETA_AXIS", "DISTORTION_BASIS", "Z_AXIS", "distortion_matrix", "euler_from_rotation",
           "identifiable_distortion", "project_points", "rotation_from_angles", "rotations_and_derivatives", "skew"]

ALPHA_AXIS = np.array([0.0, -1.0, 0.0])
BETA_AXIS = np.array([-1.0, 0.0, 0.0])
Z_AXIS = np.array([0.0, 0.0, 1.0])
DISTORTION_BASIS = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])
"""``dE / d(a, b)``: the slow (row) axis stretched, and sheared along the fast (col) axis (row, col image axes)."""


def skew(n: np.ndarray) -> np.ndarray:
    """The cross-product matrix of ``n``: ``skew(n) @ v == cross(n, v)``."""
    return np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])


def rotation_from_angles(alpha_deg: np.ndarray, beta_deg: np.ndarray, gamma_deg: np.ndarray) -> np.ndarray:
    """``Rz(gamma) R_[0,-1,0](alpha) R_[-1,0,0](beta)``, shape ``(n, 3, 3)``."""
    a, b, g = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, float)) for v in (alpha_deg, beta_deg, gamma_deg)))
    return axis_angle_matrix(Z_AXIS, g) @ axis_angle_matrix(ALPHA_AXIS, a) @ axis_angle_matrix(BETA_AXIS, b)


def euler_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_from_angles`: ``(..., 3, 3)`` -> ``(..., 3)`` ``(alpha, beta, gamma)`` degrees.

    ``R = Rz(gamma) Ry(-alpha) Rx(-beta)`` is a ZYX Euler form.
    """
    r = np.asarray(rotation, float)
    y = np.arcsin(np.clip(-r[..., 2, 0], -1.0, 1.0))
    z = np.arctan2(r[..., 1, 0], r[..., 0, 0])
    x = np.arctan2(r[..., 2, 1], r[..., 2, 2])
    return np.degrees(np.stack([-y, -x, z], axis=-1))


def rotations_and_derivatives(ang_rad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations ``(n, 3, 3)`` and their derivatives ``(n, 3, 3, 3)`` by (alpha, beta, gamma) (radians)."""
    deg = np.degrees(np.atleast_2d(ang_rad))
    rg = axis_angle_matrix(Z_AXIS, deg[:, 2])
    ra = axis_angle_matrix(ALPHA_AXIS, deg[:, 0])
    rb = axis_angle_matrix(BETA_AXIS, deg[:, 1])
    rot = rg @ ra @ rb
    d = np.stack([rg @ skew(ALPHA_AXIS) @ ra @ rb, rg @ ra @ skew(BETA_AXIS) @ rb, skew(Z_AXIS) @ rot], axis=1)
    return rot, d


def distortion_matrix(e: np.ndarray) -> np.ndarray:
    """``D = I + a B1 + b B2`` ``(2, 2)`` of the identifiable distortion ``e = (a, b)`` (:data:`DISTORTION_BASIS`)."""
    return np.eye(2) + np.tensordot(np.asarray(e, float), DISTORTION_BASIS, axes=1)


def identifiable_distortion(e_matrix: np.ndarray) -> np.ndarray:
    """What a tilt series can measure of a distortion ``E`` ``(2, 2)`` (``u = (I + E) p``), in the fast-axis gauge:
    ``(a, b) = (E_rr - E_cc, E_cr + E_rc)``, the slow-axis column of ``E`` once the scale ``E_cc`` and the rotation
    ``-E_rc`` that make the fast axis undistorted are taken out."""
    e = np.asarray(e_matrix, float)
    return np.array([e[0, 0] - e[1, 1], e[1, 0] + e[0, 1]])


def project_points(r_A: np.ndarray, rotation: np.ndarray, shift_px: np.ndarray, pixel_A: float,
                   distortion: np.ndarray | None = None) -> np.ndarray:
    """Image positions ``(n, 2)`` (row, col) of sample points ``r_A`` ``(n, 3)`` for one projection;
    ``distortion`` is the image distortion ``D`` ``(2, 2)`` (None: the identity)."""
    lab = np.asarray(r_A, float) @ np.asarray(rotation).T
    img = lab[:, [1, 0]] / pixel_A
    if distortion is not None:
        img = img @ np.asarray(distortion, float).T
    return img + np.asarray(shift_px, float)
