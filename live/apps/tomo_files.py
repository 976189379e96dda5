"""Tomography files: Berkeley EMD (Tomviz's tilt-series and volume layouts), GENFIRE inputs, ASTRA vectors.

Writers and readers only; conventions and layouts: ``docs/tomography.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.analysis import reconstruct as rc
from stemlive.live.apps.tomo_input import TiltSeries, TomoInputError, _attr_str

__all__ = ["EMD_GROUP", "EMD_GROUP_V1", "VOLUME_AXES", "astra_parallel3d_vec", "read_emd_layout",
           "read_emd_tilt_series", "read_emd_volume", "write_astra_vectors", "write_emd", "write_emd_volume",
           "write_genfire_inputs"]

EMD_GROUP = "data/tomography"  # what Tomviz opens
EMD_GROUP_V1 = "data/tilt_series"  # layout before the Tomviz one (still read)


def astra_parallel3d_vec(rotations: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """ASTRA ``parallel3d_vec`` rows for our projections of a volume of ``shape_zyx`` (voxel = pixel = 1).

    ASTRA's 3-D volume ``(Z, Y, X)`` (``astra.create_vol_geom(Y, X, Z)``) is centred on the origin, voxel
    ``(iz, iy, ix)`` at ``(ix - (X-1)/2, iy - (Y-1)/2, iz - (Z-1)/2)``; a projection is ``(ny, nx)`` =
    ``(det_row_count, det_col_count)``. Each row is ``(ray, d, u, v)``: ray direction ``R.T e_z``, detector
    centre ``d``, ``u = R.T e_x`` (pixel ``(0,0)`` -> ``(0,1)``, image x) and ``v = R.T e_y`` (``(0,0)`` ->
    ``(1,0)``, image y), in the sample frame, so that our rotation centre (voxel ``n // 2`` on every axis)
    projects to pixel ``(ny // 2, nx // 2)``, as in our model.

    Parameters
    ----------
    rotations : ndarray
        ``(n, 3, 3)`` sample-to-lab matrices ``R`` (:func:`~stemlive.live.analysis.reconstruct.stage_rotation`).
    shape_zyx : tuple of int
        Volume shape; ``ny``, ``nx`` are also the detector rows and columns.

    Returns
    -------
    ndarray
        ``(n, 12)``.
    """
    rt = np.swapaxes(np.asarray(rotations, float).reshape(-1, 3, 3), -1, -2)
    nz, ny, nx = shape_zyx
    # our centre n//2 sits half a voxel off ASTRA's (n-1)/2 for even n
    centre = np.array([nx // 2 - (nx - 1) / 2, ny // 2 - (ny - 1) / 2, nz // 2 - (nz - 1) / 2])
    ray, u, v = rt[:, :, 2], rt[:, :, 0], rt[:, :, 1]
    d = centre - centre[0] * u - centre[1] * v
    return np.concatenate([ray, d, u, v], axis=1)


def _f4_dim(group: h5py.Group, key: str, values: np.ndarray, name: str, units: str) -> None:
    # Tomviz's C++ reader accepts dims stored as float32 only
    d = group.create_dataset(key, data=np.asarray(values, np.float32))
    d.attrs["name"] = name
    d.attrs["units"] = units


def _emd_root(f: h5py.File) -> h5py.Group:
    f.attrs.create("version_major", 0, dtype="uint32")
    f.attrs.create("version_minor", 2, dtype="uint32")
    grp = f.create_group(EMD_GROUP)
    grp.attrs.create("emd_group_type", 1, dtype="uint32")
    return grp


def _write_raw_frames(f: h5py.File, session_path: str | Path) -> None:
    """Copy the recorded frames and their per-frame table bit for bit into ``/stemlive/raw`` (ignored by
    Tomviz, ncempy and HyperSpy, which read only EMD groups)."""
    from stemlive.live.storage.session import SessionReader

    with SessionReader(session_path) as r:
        if r.n_frames == 0:
            return
        raw = f.create_group("stemlive/raw")
        raw.attrs["session_id"] = r.session_id
        raw.attrs["settings"] = json.dumps(r.settings)
        ds = raw.create_dataset("frames", shape=r.frames().shape, dtype=r.frames().dtype,
                                chunks=(1, *r.frames().shape[1:]))
        frames = r.frames()
        for i in range(len(frames)):
            ds[i] = frames[i]
        for name, values in r.frame_table().items():
            raw.create_dataset(name, data=values)
        for name, value in r.attrs("tilt_series").items():
            if name in ("pixel_size_nm", "dwell_us"):
                ds.attrs[name] = value


def write_emd(
    path: str | Path,
    series: TiltSeries,
    aligned: np.ndarray,
    shifts: np.ndarray,
    *,
    align: str = "none",
    raw_session: str | Path | None = None,
) -> Path:
    """Write the aligned tilt series as a Berkeley EMD v0.2 file in Tomviz's tilt-series layout.

    Group ``/data/tomography`` (``emd_group_type = 1``, what Tomviz opens): ``data`` float32
    ``(n, nx, ny)`` = the images transposed, so that Tomviz (which reverses the axes to ``(X, Y, angle)``)
    has its tilt axis, the stage alpha axis (image y), along its X as its reconstructions require; ``dim1``
    the angle of each projection (name ``angles``, units ``[deg]``, the stage alpha), ``dim2`` image x,
    ``dim3`` image y in nm (``[n_m]``, centred on the rotation centre); all dims float32. Extra datasets:
    ``alpha_deg``, ``beta_deg``, ``rotation_matrices`` ``(n, 3, 3)`` (``r_lab = R r_sample``),
    ``euler_zyz_deg`` (GENFIRE), ``astra_vectors`` ``(n, 12)`` (:func:`astra_parallel3d_vec`),
    ``shifts_px`` ``(n, 2)``. With ``raw_session`` the recorded frames are copied to ``/stemlive/raw``.
    Conventions: ``docs/tomography.md``.
    """
    path = Path(path)
    n, ny, nx = aligned.shape
    nz = max(ny, nx)
    with h5py.File(path, "w") as f:
        grp = _emd_root(f)
        grp.attrs["session_id"] = series.session_id
        grp.attrs["angle_source"] = series.angle_source
        grp.attrs["alignment"] = align
        grp.attrs["layout"] = "data[k, ix, iy] = projection k at image (y=iy, x=ix); Tomviz X = image y"
        grp.attrs["convention"] = (
            "r_lab = R r_sample, R = R_[0,-1,0](alpha) R_[-1,0,0](beta); euler_zyz_deg: GENFIRE (phi, theta, psi), "
            "Rz(phi) Ry(theta) Rz(psi) = S R^T S, S swaps x/y, for projections stacked (ny, nx, n); "
            "astra_vectors: ASTRA parallel3d_vec (ray, d, u, v) in the sample frame, u = image x, v = image y"
        )
        grp.attrs["astra_vol_geom_yxz"] = np.array([ny, nx, nz])
        data = grp.create_dataset("data", data=np.ascontiguousarray(np.swapaxes(aligned, 1, 2), np.float32),
                                  chunks=(1, nx, ny))
        data.attrs["name"] = "tilt_series"
        _f4_dim(grp, "dim1", series.alpha_deg, "angles", "[deg]")
        _f4_dim(grp, "dim2", (np.arange(nx) - nx // 2) * series.pixel_size_nm, "x", "[n_m]")
        _f4_dim(grp, "dim3", (np.arange(ny) - ny // 2) * series.pixel_size_nm, "y", "[n_m]")
        grp.create_group("tomviz_scalars")["tilt_series"] = h5py.SoftLink(data.name)
        grp.create_dataset("alpha_deg", data=series.alpha_deg.astype(np.float64))
        grp.create_dataset("beta_deg", data=series.beta_deg.astype(np.float64))
        grp.create_dataset("euler_zyz_deg", data=series.genfire_euler_deg)
        grp.create_dataset("rotation_matrices", data=series.rotations)
        grp.create_dataset("astra_vectors", data=astra_parallel3d_vec(series.rotations, (nz, ny, nx)))
        grp.create_dataset("shifts_px", data=np.asarray(shifts, float))
        f.create_group("microscope").attrs["pixel_size_nm"] = series.pixel_size_nm
        f.create_group("comments").attrs["stemlive"] = f"exported from session {series.session_id}"
        if raw_session is not None:
            _write_raw_frames(f, raw_session)
    return path


# Tomviz's reconstruction frame for our exported tilt series: its X is the tilt (alpha) axis = our y, and its
# reconstructions put the beam (at zero tilt) along their second axis: (X, Y, Z) = our (y, z, x), a rotation
VOLUME_AXES = (1, 0, 2)  # (z, y, x) -> (y, z, x); its own inverse


def write_emd_volume(path: str | Path, volume_zyx: np.ndarray, voxel_nm: float, *, algorithm: str = "") -> Path:
    """Write a reconstruction as EMD v0.2 in Tomviz's layout and frame: ``/data/tomography/data`` float32
    ``(ny, nz, nx)``, i.e. Tomviz's ``(X, Y, Z)`` = our ``(y, z, x)``: the frame of the volume Tomviz's own
    reconstructions make from the exported tilt series (tilt axis X, beam along Y at zero tilt), so the two
    overlay voxel for voxel. Float32 dims ``y``, ``z``, ``x`` in nm, centred on voxel ``n // 2``."""
    path = Path(path)
    vol = np.ascontiguousarray(np.asarray(volume_zyx, np.float32).transpose(VOLUME_AXES))
    with h5py.File(path, "w") as f:
        g = _emd_root(f)
        g.attrs["algorithm"] = algorithm
        g.attrs["voxel_size_nm"] = float(voxel_nm)  # exact (the dims are float32)
        g.attrs["layout"] = "data[iy, iz, ix] = volume at (x, y, z) of the sample frame; Tomviz (X, Y, Z) = (y, z, x)"
        data = g.create_dataset("data", data=vol)
        data.attrs["name"] = "reconstruction"
        for i, (size, name) in enumerate(zip(vol.shape, "yzx", strict=True), start=1):
            _f4_dim(g, f"dim{i}", (np.arange(size) - size // 2) * voxel_nm, name, "[n_m]")
        g.create_group("tomviz_scalars")["reconstruction"] = h5py.SoftLink(data.name)
    return path


def read_emd_volume(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a reconstruction written by :func:`write_emd_volume`: ``(volume (z, y, x), voxel_nm)``."""
    with h5py.File(path, "r") as f:
        if EMD_GROUP not in f:
            raise TomoInputError(f"{path}: no /{EMD_GROUP} group (not a stemlive/Tomviz EMD)")
        g = f[EMD_GROUP]
        vol = np.asarray(g["data"][()], np.float32).transpose(VOLUME_AXES)
        x = g["dim1"][()]
        voxel = float(g.attrs.get("voxel_size_nm", x[1] - x[0] if x.size > 1 else 1.0))
    return np.ascontiguousarray(vol), voxel


def read_emd_layout(path: str | Path) -> dict[str, Any]:
    """Everything :func:`write_emd` stored, with the projections back as ``(n, ny, nx)``.

    Keys: ``projections``, ``alpha_deg``, ``beta_deg``, ``rotation_matrices``, ``euler_zyz_deg``,
    ``astra_vectors`` (if stored), ``shifts_px``, ``pixel_size_nm``, ``session_id``, ``convention``. Also
    reads the earlier layout (``/data/tilt_series``, ``(n, ny, nx)``).
    """
    with h5py.File(path, "r") as f:
        if EMD_GROUP in f and "angles" in _attr_str(f[EMD_GROUP]["dim1"].attrs.get("name", "")):
            g = f[EMD_GROUP]
            projections = np.swapaxes(np.asarray(g["data"][()], np.float32), 1, 2)
            y = g["dim3"][()]
        elif EMD_GROUP_V1 in f:
            g = f[EMD_GROUP_V1]
            projections = np.asarray(g["data"][()], np.float32)
            y = g["dim2"][()]
        else:
            raise TomoInputError(f"{path}: no tilt series in /{EMD_GROUP} (not written by stemlive export)")
        out: dict[str, Any] = {"projections": np.ascontiguousarray(projections)}
        for key in ("alpha_deg", "beta_deg", "rotation_matrices", "euler_zyz_deg", "astra_vectors", "shifts_px"):
            if key in g:
                out[key] = np.asarray(g[key][()])
        if "rotation_matrices" not in out:
            out["rotation_matrices"] = rc.stage_rotation(out["alpha_deg"], out["beta_deg"])
        pixel = f["microscope"].attrs.get("pixel_size_nm") if "microscope" in f else None  # exact (dims are f4)
        out["pixel_size_nm"] = float(pixel) if pixel is not None else float(y[1] - y[0]) if y.size > 1 else 1.0
        out["session_id"] = _attr_str(g.attrs.get("session_id", ""))
        out["convention"] = _attr_str(g.attrs.get("convention", ""))
    return out


def write_genfire_inputs(out_dir: str | Path, stem: str, aligned: np.ndarray, euler_deg: np.ndarray) -> dict[str, Path]:
    """Write GENFIRE inputs: ``<stem>_projections.npy`` ``(N, N, n)`` float32 and ``<stem>_euler.txt`` ``(n, 3)``.

    GENFIRE-Python's Fourier gridding assumes square projections (``N x N``, volume ``N^3``), so images are
    cropped centrally to ``N = min(ny, nx)`` (the rotation centre ``n // 2`` stays at ``N // 2``). Axis 0 of the
    stack is image y, axis 1 image x; the angles are :func:`~stemlive.live.analysis.reconstruct.stage_to_genfire_euler`.
    """
    out = Path(out_dir)
    n, ny, nx = aligned.shape
    size = min(ny, nx)
    y0, x0 = ny // 2 - size // 2, nx // 2 - size // 2
    stack = np.ascontiguousarray(np.moveaxis(aligned[:, y0 : y0 + size, x0 : x0 + size], 0, -1), dtype=np.float32)
    proj_path = out / f"{stem}_projections.npy"
    ang_path = out / f"{stem}_euler.txt"
    np.save(proj_path, stack)
    np.savetxt(
        ang_path,
        np.asarray(euler_deg, float).reshape(n, 3),
        fmt="%.6f",
        header="GENFIRE Euler angles phi theta psi (deg), ZYZ: Rz(phi) Ry(theta) Rz(psi); one row per projection",
    )
    return {"genfire_projections": proj_path, "genfire_angles": ang_path}



def write_astra_vectors(path: str | Path, rotations: np.ndarray, shape_yx: tuple[int, ...]) -> Path:
    """Write :func:`astra_parallel3d_vec` rows (``n x 12``, text) for projections ``(ny, nx)`` and a volume
    ``(max(ny, nx), ny, nx)``, next to GENFIRE's Euler angles."""
    ny, nx = int(shape_yx[0]), int(shape_yx[1])
    nz = max(ny, nx)
    path = Path(path)
    np.savetxt(
        path, astra_parallel3d_vec(rotations, (nz, ny, nx)), fmt="%.9f",
        header=(f"ASTRA parallel3d_vec: rayX rayY rayZ dX dY dZ uX uY uZ vX vY vZ, one row per projection; "
                f"astra.create_vol_geom({ny}, {nx}, {nz}), detector {ny} rows x {nx} columns, projection data "
                "(rows, n, columns); sample frame, u = image x, v = image y (docs/tomography.md)"),
    )
    return path


def read_emd_tilt_series(path: str | Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Read an exported EMD: ``(projections (n, ny, nx), rotations (n, 3, 3), pixel_size_nm)``."""
    g = read_emd_layout(path)
    return g["projections"], np.asarray(g["rotation_matrices"], float), float(g["pixel_size_nm"])


