"""The double-tilt geometry of a projection: rotation from the stage's (alpha, beta) and an in-plane angle, its
inverse, and the projection of sample points into an image (the conventions of docs/tomography.md)."""

from __future__ import annotations

import numpy as np

from .reconstruct import axis_angle_matrix

__all__ = ["ALPHA_AXIS", "BETA_AXIS", "Z_AXIS", "euler_from_rotation", "project_points", "rotation_from_angles", "skew"]

ALPHA_AXIS = np.array([0.0, -1.0, 0.0])
BETA_AXIS = np.array([-1.0, 0.0, 0.0])
Z_AXIS = np.array([0.0, 0.0, 1.0])


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


def project_points(r_A: np.ndarray, rotation: np.ndarray, shift_px: np.ndarray, pixel_A: float) -> np.ndarray:
    """Image positions ``(n, 2)`` (row, col) of sample points ``r_A`` ``(n, 3)`` for one projection."""
    lab = np.asarray(r_A, float) @ np.asarray(rotation).T
    return lab[:, [1, 0]] / pixel_A + np.asarray(shift_px, float)
