"""Tomography pipeline: export a tilt-series session for GENFIRE/Tomviz, and the reference SIRT reconstruction.

Geometry, alignment and SIRT are pure functions in :mod:`stemlive.live.analysis.reconstruct`; reading in
:mod:`.tomo_input`, the files in :mod:`.tomo_files`. Conventions: ``docs/tomography.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.analysis import reconstruct as rc
from stemlive.live.analysis.windowed import centre_on_origin
from stemlive.live.apps.tomo_files import (
    read_emd_tilt_series,
    write_astra_vectors,
    write_emd,
    write_emd_volume,
    write_genfire_inputs,
)
from stemlive.live.apps.tomo_input import _attr_str, read_calibrated_geometry, read_tilt_series

__all__ = ["ALIGN_METHODS", "export", "reconstruct", "save_slices_png"]

ALIGN_METHODS = ("cross_correlation", "com", "none")


def export(
    session_path: str | Path,
    out_dir: str | Path,
    *,
    align: str = "cross_correlation",
    angles: str | Path | None = None,
) -> dict[str, Path]:
    """Export a tilt-series session for tomography.

    Parameters
    ----------
    session_path : path
        Session file v1 with ``/results/tilt_series/sums`` and per-tilt angles.
    out_dir : path
        Created if missing.
    align : {"cross_correlation", "com", "none"}
        Cross-tilt alignment: ``cross_correlation`` (each tilt to its angularly nearest already-aligned tilt,
        common offset centred by centre of mass), ``com`` (centre of mass to the image centre) or none.
    angles : path, optional
        Actual angles (ground-truth JSON or two-column text) overriding the file's angles.

    Returns
    -------
    dict
        ``{"emd": ..., "genfire_projections": ..., "genfire_angles": ..., "astra_vectors": ...}`` paths.
    """
    if align not in ALIGN_METHODS:
        raise ValueError(f"align must be one of {ALIGN_METHODS}, got {align!r}")
    series = read_tilt_series(session_path, angles=angles)
    directions = rc.projection_direction(series.alpha_deg, series.beta_deg)
    aligned, shifts = rc.align_tilt_series(series.sums, align, directions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(session_path).stem
    paths = {"emd": write_emd(out / f"{stem}_tilt_series.emd", series, aligned, shifts, align=align)}
    paths.update(write_genfire_inputs(out, stem, aligned, series.genfire_euler_deg))
    paths["astra_vectors"] = write_astra_vectors(out / f"{stem}_astra_vectors.txt", series.rotations,
                                                 aligned.shape[1:])
    return paths


def _is_session(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return _attr_str(f.attrs.get("format", "")) == "stemlive-session" or "kind" in f.attrs


def reconstruct(
    source: str | Path,
    out_dir: str | Path,
    *,
    n_iter: int = 50,
    thickness_px: int | None = None,
    align: str = "cross_correlation",
    angles: str | Path | None = None,
    window: int | None = None,
    step: int | None = None,
    client: Any = None,
    png: bool = True,
    accelerate: bool = False,
    progress: Callable[[int, int, float], Any] | None = None,
) -> dict[str, Path]:
    """Reference SIRT reconstruction of an exported EMD or directly of a session file.

    Parameters
    ----------
    source : path
        ``*_tilt_series.emd`` from :func:`export` (already aligned), or a session file: with the geometry
        ``stemlive tomo atoms`` calibrated (``/results/tomo``: angles, in-plane rotations, the sample origin in
        every projection and the image distortion; used unless ``angles`` is given) each image is shifted so that
        the origin lands on the rotation centre, and undistorted,
        otherwise the images are aligned with ``align`` at the file's (or ``angles``') angles.
    out_dir : path
        Output folder; writes ``<stem>_reconstruction.emd`` (:func:`write_emd_volume`: ``/data/tomography``,
        ``(y, z, x)``) and, with ``png``, ``<stem>_slices.png``.
    n_iter : int
        SIRT iterations.
    thickness_px : int, optional
        Volume depth along z in pixels; default ``min(ny, nx)``.
    window, step : int, optional
        Scanning-window reconstruction (e.g. 60 and 30 as in the reference); whole field of view if ``window``
        is None.
    client : dask.distributed.Client, optional
        Runs the windows on a cluster.
    accelerate : bool
        Accelerated (FISTA) SIRT (``reconstruct_sirt(momentum=True)``): far closer to convergence in the same
        number of iterations.
    progress : callable, optional
        ``progress(i, n, residual)``.

    Returns
    -------
    dict
        ``{"volume": ..., "png": ...}`` paths.
    """
    src = Path(source)
    if _is_session(src):
        series = read_tilt_series(src, angles=angles)
        geometry = read_calibrated_geometry(src, len(series.sums)) if angles is None else None
        geometry_note = (", calibrated geometry (/results/tomo)" if geometry is not None
                         else f", {series.angle_source} angles")
        if geometry is not None:
            rots, origin, distortion = geometry
            projections = centre_on_origin(series.sums, origin, distortion)
        else:
            dirs = rc.projection_direction(series.alpha_deg, series.beta_deg)
            projections, _ = rc.align_tilt_series(series.sums, align, dirs)
            rots = series.rotations
        pixel = series.pixel_size_nm
    else:
        projections, rots, pixel = read_emd_tilt_series(src)
        geometry_note = ""
    n, ny, nx = projections.shape
    nz = int(thickness_px or min(ny, nx))
    if window:
        volume = rc.reconstruct_windowed(
            projections,
            rots,
            window=window,
            step=step or window // 2,
            nz=nz,
            client=client,
            n_iter=n_iter,
            progress=progress,
            momentum=accelerate,
        )
    else:
        volume = rc.reconstruct_sirt(projections, rots, n_iter=n_iter, shape_zyx=(nz, ny, nx), progress=progress,
                                     momentum=accelerate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = src.stem.removesuffix("_tilt_series")
    vol_path = write_emd_volume(
        out / f"{stem}_reconstruction.emd", volume, pixel,
        algorithm=("accelerated " if accelerate else "") + f"SIRT, {n_iter} iterations"
        + (f", windows {window}/{step}" if window else "") + geometry_note,
    )
    paths = {"volume": vol_path}
    if png:
        paths["png"] = save_slices_png(volume, out / f"{stem}_slices.png", voxel_size_nm=pixel)
    return paths


def save_slices_png(
    volume: np.ndarray,
    path: str | Path,
    *,
    z_index: int | None = None,
    voxel_size_nm: float | None = None,
    title: str | None = None,
    marks_yx: np.ndarray | None = None,
) -> Path:
    """Save an x-y slice (default: the z slice of highest total intensity, e.g. the metal plane) and the x-z
    and y-z central sections to a PNG (matplotlib, Agg).

    Parameters
    ----------
    volume : ndarray
        ``(nz, ny, nx)``.
    z_index : int, optional
        x-y slice to show.
    voxel_size_nm : float, optional
        Axis labels in nm instead of voxels.
    marks_yx : ndarray, optional
        ``(m, 2)`` voxel positions to outline on the x-y slice (e.g. true atom sites).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    vol = np.asarray(volume, float)
    nz, ny, nx = vol.shape
    if z_index is None:
        z_index = int(np.argmax(vol.sum(axis=(1, 2))))
    s = voxel_size_nm or 1.0
    unit = "nm" if voxel_size_nm else "voxel"
    fig = Figure(figsize=(11, 4), dpi=120)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1]})
    panels = [
        (vol[z_index], f"x-y slice z={z_index}", (-nx // 2 * s, (nx - nx // 2) * s, (ny - ny // 2) * s, -ny // 2 * s)),
        (vol[:, ny // 2, :], "x-z section", (-nx // 2 * s, (nx - nx // 2) * s, (nz - nz // 2) * s, -nz // 2 * s)),
        (vol[:, :, nx // 2], "y-z section", (-ny // 2 * s, (ny - ny // 2) * s, (nz - nz // 2) * s, -nz // 2 * s)),
    ]
    for ax, (img, label, extent) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap="inferno", extent=extent, interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel(unit)
    if marks_yx is not None and len(marks_yx):
        m = np.asarray(marks_yx, float)
        axes[0].scatter(
            (m[:, 1] - nx // 2) * s, (m[:, 0] - ny // 2) * s, s=30, facecolors="none", edgecolors="cyan", linewidths=0.6
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


