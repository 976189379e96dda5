"""Scanning-window SIRT at the calibrated geometry, and its comparison with the true potential (pure numpy/scipy).

The calibration (:mod:`.tilt_calibration`) gives every projection's rotation ``R_k`` (stage angles plus in-plane
rotation) and the image position ``t_k`` of the sample origin. The reconstruction code
(:mod:`.reconstruct`) expects images whose rotation centre is pixel ``(ny // 2, nx // 2)``: each image is shifted by
``(ny // 2, nx // 2) - t_k`` and reconstructed with ``R_k`` by :func:`.reconstruct.reconstruct_windowed` (windows
in parallel on a ``dask.distributed`` client when one is given, central parts stitched).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from . import reconstruct as rc

__all__ = ["atoms_volume", "centre_on_origin", "reconstruct_at_calibration"]


def centre_on_origin(sums: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Shift every image so that the sample origin ``shifts_px[k]`` (row, col) lands on ``(ny // 2, nx // 2)``."""
    data = np.asarray(sums, np.float32)
    ny, nx = data.shape[1:]
    move = np.array([ny // 2, nx // 2], float) - np.asarray(shifts_px, float)
    return rc.apply_shifts(data, move)


def reconstruct_at_calibration(sums: np.ndarray, rotations: np.ndarray, shifts_px: np.ndarray, *, window: int = 60,
                               step: int = 30, nz: int = 32, n_iter: int = 20, client: Any = None,
                               support_z: int | None = None) -> np.ndarray:
    """Windowed SIRT volume ``(nz, ny, nx)`` (voxel = pixel) of the sums at the given geometry.

    Parameters
    ----------
    sums : ndarray (n, ny, nx)
    rotations : ndarray (n, 3, 3)
        Sample-to-lab rotations (calibrated, or nominal for comparison).
    shifts_px : ndarray (n, 2)
        Image position (row, col) of the sample origin per projection.
    window, step, nz : int
        Window size, step and depth in voxels.
    n_iter : int
        SIRT iterations per window.
    client : dask.distributed.Client, optional
        Windows run on the cluster when given.
    support_z : int, optional
        Central slices kept (thin sample).
    """
    centred = centre_on_origin(sums, shifts_px)
    # a constant background would be smeared through the whole volume: remove it
    centred = centred - np.percentile(centred, 1.0, axis=(1, 2), keepdims=True)
    return rc.reconstruct_windowed(centred, rotations, window=window, step=step, nz=nz, client=client,
                                   n_iter=n_iter, support_z=support_z)


def atoms_volume(positions_A: np.ndarray, weight: np.ndarray, shape_zyx: tuple[int, int, int], voxel_A: float,
                 sigma_A: float, origin_A: np.ndarray | None = None) -> np.ndarray:
    """Atoms (``weight`` each, e.g. Z^1.7) splatted on a voxel grid whose centre ``n // 2`` is ``origin_A`` and
    blurred by a Gaussian of ``sigma_A``: the potential a reconstruction is compared with."""
    pos = np.asarray(positions_A, float) - (0.0 if origin_A is None else np.asarray(origin_A, float))
    nz, ny, nx = shape_zyx
    idx = np.rint(pos[:, [2, 1, 0]] / voxel_A + np.array([nz // 2, ny // 2, nx // 2])).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(shape_zyx)), axis=1)
    vol = np.zeros(shape_zyx, np.float32)
    np.add.at(vol, tuple(idx[inside].T), np.asarray(weight, float)[inside])
    return ndimage.gaussian_filter(vol, max(sigma_A / voxel_A, 0.5))
