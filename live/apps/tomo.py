"""Tomography hand-off: tilt-series session -> Berkeley EMD + GENFIRE inputs, and a reference reconstruction.

Geometry, alignment and the SIRT reconstruction are pure functions in :mod:`stemlive.live.analysis.reconstruct`;
this module does the file I/O. Conventions and file layouts: ``docs/tomography.md``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.analysis import reconstruct as rc

__all__ = [
    "TiltSeries",
    "TomoInputError",
    "astra_parallel3d_vec",
    "export",
    "load_angles",
    "read_emd_layout",
    "read_emd_tilt_series",
    "read_emd_volume",
    "read_tilt_series",
    "reconstruct",
    "save_slices_png",
    "write_emd",
    "write_astra_vectors",
    "write_emd_volume",
    "write_genfire_inputs",
]

SUMS = "/results/tilt_series/sums"
ALPHA = "/results/tilt_series/tilt_alpha_deg"
BETA = "/results/tilt_series/tilt_beta_deg"
ALPHA_CAL = "/results/tilt_series/tilt_alpha_calibrated_deg"
BETA_CAL = "/results/tilt_series/tilt_beta_calibrated_deg"
EMD_GROUP = "data/tomography"  # what Tomviz opens
EMD_GROUP_V1 = "data/tilt_series"  # layout before the Tomviz one (still read)
ALIGN_METHODS = ("cross_correlation", "com", "none")


class TomoInputError(ValueError):
    """The input cannot be exported or reconstructed (not a tilt series, no per-tilt sums, bad angles)."""


@dataclass(frozen=True)
class TiltSeries:
    """Per-tilt summed images and their angles.

    Attributes
    ----------
    sums : ndarray
        ``(n, ny, nx)`` float32.
    alpha_deg, beta_deg : ndarray
        ``(n,)`` stage angles used for the geometry (nominal, calibrated or from ``--angles``).
    pixel_size_nm : float
    session_id : str
    angle_source : str
        ``"nominal"``, ``"calibrated"`` or the path of the angles file.
    """

    sums: np.ndarray
    alpha_deg: np.ndarray
    beta_deg: np.ndarray
    pixel_size_nm: float
    session_id: str
    angle_source: str

    @property
    def rotations(self) -> np.ndarray:
        """``(n, 3, 3)`` sample-to-lab matrices."""
        return rc.stage_rotation(self.alpha_deg, self.beta_deg)

    @property
    def genfire_euler_deg(self) -> np.ndarray:
        """``(n, 3)`` GENFIRE ``(phi, theta, psi)`` for a ``(ny, nx, n)`` projection stack."""
        return np.atleast_2d(rc.stage_to_genfire_euler(self.alpha_deg, self.beta_deg))


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _truth_tilt_angles(records: list[Mapping[str, Any]], nominal: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Actual angles per tilt from the simulator's stage-move records.

    The instrument records every axis move, so one tilt leaves several records (alpha, then beta, possibly a
    re-confirm). Consecutive records with the same nominal pair form one tilt; its last record is the state
    the frames saw. With ``nominal`` (the session's tilts, in acquisition order) the groups are matched to them
    in order, skipping moves that belong to no tilt (e.g. the return to the starting tilt after an abort).
    """
    ordered = sorted(records, key=lambda r: r.get("index", 0))
    groups: list[Mapping[str, Any]] = []
    for rec in ordered:
        pair = (round(float(rec["nominal_alpha_deg"]), 6), round(float(rec["nominal_beta_deg"]), 6))
        if groups and (round(float(groups[-1]["nominal_alpha_deg"]), 6),
                       round(float(groups[-1]["nominal_beta_deg"]), 6)) == pair:
            groups[-1] = rec
        else:
            groups.append(rec)
    if nominal is not None:
        chosen: list[Mapping[str, Any]] = []
        g = 0
        for alpha, beta in nominal:
            while g < len(groups) and not (abs(float(groups[g]["nominal_alpha_deg"]) - alpha) < 1e-6
                                           and abs(float(groups[g]["nominal_beta_deg"]) - beta) < 1e-6):
                g += 1
            if g == len(groups):
                raise TomoInputError(f"no stage move to nominal ({alpha:g}, {beta:g}) deg in the ground truth")
            chosen.append(groups[g])
            g += 1
        groups = chosen
    alpha = np.array([r["actual_alpha_deg"] for r in groups], float)
    beta = np.array([r["actual_beta_deg"] for r in groups], float)
    return alpha, beta


def load_angles(path: str | Path, n: int, nominal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read actual ``(alpha, beta)`` per tilt from a file.

    Accepted: a simulator ground truth ``<session>.truth.json`` (stage-move records ``records.tilt[*]``, grouped
    per tilt and matched to ``nominal`` ``(n, 2)`` when given); a JSON object with ``alpha_deg`` and ``beta_deg``
    lists; or a text file with two columns ``alpha beta`` (degrees, ``#`` comments).

    Raises
    ------
    TomoInputError
        Unknown layout or a number of tilts different from ``n``.
    """
    p = Path(path)
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and "records" in data and data["records"].get("tilt"):
            alpha, beta = _truth_tilt_angles(data["records"]["tilt"], nominal)
        elif isinstance(data, Mapping) and "alpha_deg" in data and "beta_deg" in data:
            alpha, beta = np.asarray(data["alpha_deg"], float), np.asarray(data["beta_deg"], float)
        else:
            raise TomoInputError(f"{p}: no tilt angles (expected records.tilt[] or alpha_deg/beta_deg)")
    else:
        arr = np.atleast_2d(np.loadtxt(p, dtype=float, comments="#"))
        if arr.shape[1] != 2:
            raise TomoInputError(f"{p}: expected two columns 'alpha beta', got {arr.shape[1]}")
        alpha, beta = arr[:, 0], arr[:, 1]
    if alpha.shape != (n,) or beta.shape != (n,):
        raise TomoInputError(f"{p}: {alpha.size} tilt angles for {n} tilts")
    return alpha, beta


def read_tilt_series(session_path: str | Path, *, angles: str | Path | None = None) -> TiltSeries:
    """Read per-tilt sums and angles from a session file (v1, plain h5py).

    Angle priority: ``angles`` file > ``/results/tilt_series/tilt_*_calibrated_deg`` > nominal.

    Raises
    ------
    TomoInputError
        Not a tilt-series session, or no ``/results/tilt_series/sums``.
    """
    path = Path(session_path)
    with h5py.File(path, "r") as f:
        kind = _attr_str(f.attrs.get("kind", ""))
        if kind != "tilt_series":
            raise TomoInputError(f"{path}: session kind is {kind!r}, not 'tilt_series'")
        if SUMS not in f:
            raise TomoInputError(
                f"{path}: no {SUMS} (status {_attr_str(f.attrs.get('status', '?'))!s}); "
                "run the tilt-series analysis first (stemlive replay --analyze)"
            )
        sums = np.asarray(f[SUMS][()], dtype=np.float32)
        if sums.ndim != 3 or sums.shape[0] == 0:
            raise TomoInputError(f"{path}: {SUMS} must be (n_tilts, ny, nx), got {sums.shape}")
        n = sums.shape[0]
        if ALPHA_CAL in f and BETA_CAL in f:
            alpha, beta, source = f[ALPHA_CAL][()], f[BETA_CAL][()], "calibrated"
        elif ALPHA in f and BETA in f:
            alpha, beta, source = f[ALPHA][()], f[BETA][()], "nominal"
        else:
            raise TomoInputError(f"{path}: no {ALPHA} / {BETA}")
        frames = f.get("tilt_series/frames")
        pixel = frames.attrs.get("pixel_size_nm") if frames is not None else None
        pixel = float(pixel) if pixel is not None else float(f[SUMS].attrs.get("pixel_size_nm", 1.0))
        session_id = _attr_str(f.attrs.get("session_id", path.stem))
    if angles is not None:
        nominal = np.column_stack([np.ravel(alpha), np.ravel(beta)]) if source == "nominal" else None
        alpha, beta = load_angles(angles, n, nominal)
        source = str(angles)
    alpha, beta = np.asarray(alpha, float).reshape(-1), np.asarray(beta, float).reshape(-1)
    if alpha.shape != (n,) or beta.shape != (n,):
        raise TomoInputError(f"{path}: {alpha.size} angles for {n} tilts")
    return TiltSeries(sums, alpha, beta, pixel, session_id, source)


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
    progress: Callable[[int, int, float], Any] | None = None,
) -> dict[str, Path]:
    """Reference SIRT reconstruction of an exported EMD or directly of a session file.

    Parameters
    ----------
    source : path
        ``*_tilt_series.emd`` from :func:`export` (already aligned), or a session file (aligned here with
        ``align``, angles overridden by ``angles``).
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
        dirs = rc.projection_direction(series.alpha_deg, series.beta_deg)
        projections, _ = rc.align_tilt_series(series.sums, align, dirs)
        rots, pixel = series.rotations, series.pixel_size_nm
    else:
        projections, rots, pixel = read_emd_tilt_series(src)
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
        )
    else:
        volume = rc.reconstruct_sirt(projections, rots, n_iter=n_iter, shape_zyx=(nz, ny, nx), progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = src.stem.removesuffix("_tilt_series")
    vol_path = write_emd_volume(
        out / f"{stem}_reconstruction.emd", volume, pixel,
        algorithm=f"SIRT, {n_iter} iterations" + (f", windows {window}/{step}" if window else ""),
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


# ---------------------------------------------------------------------------------------------- command line
def add_subcommand(subparsers: Any) -> None:
    """Register ``stemlive tomo export|reconstruct|atoms``."""
    p = subparsers.add_parser("tomo", help="tomography hand-off: export a tilt series, reference reconstruction")
    sub = p.add_subparsers(dest="tomo_command", metavar="ACTION", required=True)
    e = sub.add_parser("export", help="write the aligned per-tilt sums as Berkeley EMD and GENFIRE inputs")
    e.add_argument("session", type=Path, help="tilt-series session file (.h5) with /results/tilt_series/sums")
    e.add_argument("-o", "--out", type=Path, help="output folder (default: next to the session)")
    e.add_argument("--align", choices=("cross_correlation", "com", "none"), default="cross_correlation")
    e.add_argument("--angles", type=Path, help="calibrated angles: simulator truth JSON or two-column text")
    e.set_defaults(func=_cmd_export)
    r = sub.add_parser("reconstruct", help="reference SIRT reconstruction for double-tilt geometry (CPU)")
    r.add_argument("source", type=Path, help="exported .emd file or a tilt-series session file")
    r.add_argument("-o", "--out", type=Path, help="output folder (default: next to the source)")
    r.add_argument("--iterations", type=int, default=50)
    r.add_argument("--thickness", type=int, help="support along the beam in voxels (default: auto)")
    r.add_argument("--align", choices=("cross_correlation", "com", "none"), default="cross_correlation")
    r.add_argument("--angles", type=Path)
    r.add_argument("--window", type=int, help="scanning-window size in voxels (default: whole field)")
    r.add_argument("--step", type=int, help="scanning-window step in voxels")
    r.add_argument("--scheduler", help="Dask scheduler address for windowed reconstruction (default: local)")
    r.add_argument("--no-png", action="store_true", help="do not save slice images")
    r.set_defaults(func=_cmd_reconstruct)
    from stemlive.live.apps import atoms  # ``tomo atoms``: calibrated angles and the 3D atomic model (issue 14)

    atoms.add_parser(sub)


def _default_out(path: Path, out: Path | None) -> Path:
    return out if out is not None else path.parent / f"{path.stem}_tomo"


def _check_source(path: Path) -> None:
    """Refuse a missing, empty, truncated or non-session input with the one-line errors of every command."""
    from stemlive.live.storage.session_contract import check_contract, open_session_file
    from stemlive.live.storage.session_reader import check_format

    with open_session_file(path) as f:
        if path.suffix.lower() != ".emd" or "format" in f.attrs:
            check_format(f)
            check_contract(f, path)


def _cmd_export(args: Any) -> int:
    from stemlive.live.exitcodes import CLIError, ExitCode

    _check_source(args.session)
    try:
        paths = export(args.session, _default_out(args.session, args.out), align=args.align, angles=args.angles)
    except TomoInputError as e:
        raise CLIError(str(e), ExitCode.BAD_INPUT) from None
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


def _cmd_reconstruct(args: Any) -> int:
    from stemlive.live.apps.console import show_progress
    from stemlive.live.exitcodes import CLIError, ExitCode

    for option, value in (("iterations", args.iterations), ("thickness", args.thickness), ("window", args.window),
                          ("step", args.step)):
        if value is not None and value < 1:
            raise CLIError(f"--{option} {value}: must be >= 1", ExitCode.USAGE)
    if args.step is not None and args.window is None:
        raise CLIError("--step needs --window (the scanning-window size)", ExitCode.USAGE)
    _check_source(args.source)
    client = None
    if args.scheduler:
        from dask.distributed import Client

        client = Client(args.scheduler)

    bar = show_progress(args, sys.stdout)  # carriage returns only on a terminal

    def progress(i: int, n: int, err: float) -> None:
        if bar:
            print(f"\r  iteration {i}/{n}, residual {err:.3g}", end="" if i < n else "\n", flush=True)

    try:
        paths = reconstruct(
            args.source, _default_out(args.source, args.out), n_iter=args.iterations, thickness_px=args.thickness,
            align=args.align, angles=args.angles, window=args.window, step=args.step, client=client,
            png=not args.no_png, progress=progress,
        )
    except TomoInputError as e:
        raise CLIError(str(e), ExitCode.BAD_INPUT) from None
    finally:
        if client is not None:
            client.close()
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0
