"""Export a session for other tools: ``stemlive export SESSION.h5 --format hspy|emd -o OUT``.

EELS sessions become HyperSpy/eXSpy files (``.hspy``); tilt series become a Tomviz-layout Berkeley EMD (the
layout itself is written by :func:`stemlive.live.apps.tomo.write_emd`) or a ``.hspy`` stack with the real angles.
File layouts and conventions: ``docs/export.md`` (EELS) and ``docs/tomography.md`` (tilt series).

HyperSpy, eXSpy and RosettaSciIO are optional: they are imported only when an ``.hspy`` file is written.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.exitcodes import CLIError, ExitCode
from stemlive.live.storage.session import SessionReader

__all__ = [
    "ExportError",
    "add_hyperspy_layout",
    "eels_axes",
    "eels_signals",
    "export",
    "tilt_series_signal",
    "write_eels_hspy",
]

FORMATS = ("hspy", "emd")
_RAW_COLUMNS = ("point_index", "frame_index", "x_nm", "y_nm", "energy_offset_meV", "t")


class ExportError(ValueError):
    """The session cannot be exported in the asked format (wrong kind, no analysis results, missing reader)."""


def _hyperspy() -> tuple[Any, Any]:
    try:
        with warnings.catch_warnings():  # exspy imports names HyperSpy 2.x deprecates: noise for our users
            warnings.simplefilter("ignore")
            import exspy
            import hyperspy.api as hs
    except ImportError as e:  # optional dependency
        raise ExportError(
            f"writing .hspy needs HyperSpy and eXSpy ({e.name} is not installed): pip install 'stemlive[io]'"
        ) from None
    return hs, exspy


# ------------------------------------------------------------------------------------------------------ axes
def _uniform(values: np.ndarray, rtol: float = 1e-6) -> tuple[float, float] | None:
    """``(offset, scale)`` if ``values`` are equally spaced (to ``rtol`` of the step), else None."""
    v = np.asarray(values, float)
    if v.size < 2:
        return (float(v[0]) if v.size else 0.0), 1.0
    step = np.diff(v)
    scale = float((v[-1] - v[0]) / (v.size - 1))
    if scale == 0 or not np.allclose(step, scale, rtol=0, atol=abs(scale) * rtol):
        return None
    return float(v[0]), scale


def _axis(name: str, units: str, values: np.ndarray, *, navigate: bool) -> dict[str, Any]:
    """A HyperSpy axis dict: uniform (offset/scale) where the values allow, else a non-uniform ``axis``, or an
    index axis (``"<name> index"``) if the values are not monotonic (the values are then in the metadata)."""
    values = np.asarray(values, float)
    uniform = _uniform(values)
    if uniform is None:
        step = np.diff(values)
        if not (np.all(step > 0) or np.all(step < 0)):  # HyperSpy axes must be monotonic: number the points
            return {"name": f"{name} index", "units": "", "offset": 0.0, "scale": 1.0, "size": int(values.size),
                    "navigate": navigate}
        return {"name": name, "units": units, "axis": values, "navigate": navigate}
    offset, scale = uniform
    return {"name": name, "units": units, "offset": offset, "scale": scale, "size": int(values.size),
            "navigate": navigate}


def _point_positions(table: Mapping[str, np.ndarray], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean probe position ``(x_nm, y_nm)`` of each point in ``points`` (NaN for a point without rows)."""
    pi = np.asarray(table["point_index"], np.int64)
    x, y = np.full(points.size, np.nan), np.full(points.size, np.nan)
    for k, p in enumerate(np.ravel(points)):
        rows = pi == p
        if rows.any():
            x[k], y[k] = float(np.mean(table["x_nm"][rows])), float(np.mean(table["y_nm"][rows]))
    return x, y


def eels_axes(kind: str, table: Mapping[str, np.ndarray], points: np.ndarray) -> list[dict[str, Any]]:
    """Navigation axes (HyperSpy order: fastest first) of per-point EELS results.

    Parameters
    ----------
    kind : {"eels_line_scan", "eels_map"}
    table : mapping
        The session's spectrum table (``point_index``, ``x_nm``, ``y_nm`` per row).
    points : ndarray
        ``results/eels/point_index``: ``(n_points,)`` for a line (or an incomplete map), ``(ny, nx)`` for a map.

    Returns
    -------
    list of dict
        A map: ``x`` then ``y`` in nm (the mean probe positions along the scan rows and columns). A line:
        ``position``, the distance in nm along the line from its first point (projected on the line's
        direction). An incomplete map: ``point`` (index), positions in the metadata.
    """
    x, y = _point_positions(table, points)
    if points.ndim == 2:
        ny, nx = points.shape
        xs = np.nanmean(x.reshape(ny, nx), axis=0) if ny else np.zeros(nx)
        ys = np.nanmean(y.reshape(ny, nx), axis=1) if nx else np.zeros(ny)
        return [_axis("x", "nm", xs, navigate=True), _axis("y", "nm", ys, navigate=True)]
    if kind == "eels_line_scan":
        d = np.column_stack([x - x[0], y - y[0]])
        length = float(np.hypot(*d[-1])) if len(d) > 1 else 0.0
        direction = d[-1] / length if length > 0 else np.array([1.0, 0.0])
        return [_axis("position", "nm", d @ direction, navigate=True)]
    return [{"name": "point", "units": "", "offset": 0.0, "scale": 1.0, "size": int(points.size), "navigate": True}]


def _energy_axis(energy_meV: np.ndarray) -> dict[str, Any]:
    return _axis("Energy loss", "meV", energy_meV, navigate=False)


def _columns(table: np.ndarray) -> dict[str, np.ndarray]:
    """A compound (structured) array as ``{column: array}`` (HyperSpy metadata stores plain arrays)."""
    return {name: np.asarray(table[name]) for name in (table.dtype.names or ())}


# ------------------------------------------------------------------------------------------------------ EELS
def _session_metadata(r: SessionReader) -> dict[str, Any]:
    return {"session_id": r.session_id, "kind": r.kind, "status": r.status, "created": r.created,
            "settings": json.dumps(r.settings), "source": str(r.path)}


def eels_signals(session_path: str | Path) -> dict[str, Any]:
    """The analysed EELS session as HyperSpy signals.

    Returns
    -------
    dict
        ``spectrum``: :class:`exspy.signals.EELSSpectrum` of the aligned per-point sums (navigation in nm,
        energy loss in meV; ``metadata.stemlive`` holds the peak table, cluster means, interface fit and the
        session's settings); ``temperature``: temperature (K) per point with the squared standard error as
        ``metadata.Signal.Noise_properties.variance``; ``labels``: k-means cluster per point (if analysed);
        ``raw``: the recorded spectra, one row per frame, bit for bit, with the per-row table (``point_index``,
        ``frame_index``, ``x_nm``, ``y_nm``, ``energy_offset_meV``, ``t``) in ``metadata.stemlive.rows``; the
        signal axis starts at row 0's ``energy_offset_meV`` (the other rows' offsets differ by the drift).

    Raises
    ------
    ExportError
        Not an EELS session, or no ``/results/eels`` (run ``stemlive replay --analyze`` first).
    """
    hs, exspy = _hyperspy()
    with SessionReader(session_path) as r:
        if r.kind not in ("eels_line_scan", "eels_map"):
            raise ExportError(f"{r.path}: session kind is {r.kind!r}, not an EELS session")
        res = r.results("eels")
        missing = [name for name in ("sum", "energy_meV", "point_index") if name not in res]
        if missing:
            raise ExportError(f"{r.path}: no /results/eels/{missing[0]} (status {r.status}); "
                              "run the EELS analysis first (stemlive replay --analyze)")
        table = r.spectrum_table()
        raw = np.asarray(r.spectra()[:])
        eels_attrs = r.attrs("eels")
        session_md = _session_metadata(r)
    points = np.asarray(res["point_index"])
    nav = eels_axes(session_md["kind"], table, points)
    # HyperSpy lists axes fastest first; numpy data is (slowest..., channels)
    data = np.asarray(res["sum"], np.float32)
    spectrum = exspy.signals.EELSSpectrum(data, axes=[*nav[::-1], _energy_axis(res["energy_meV"])])
    title = f"{session_md['session_id']} aligned sums"
    spectrum.metadata.General.title = title
    spectrum.metadata.General.original_filename = Path(session_md["source"]).name
    dispersion = float(eels_attrs.get("dispersion_meV", np.nan))
    exposure_ms = float(eels_attrs.get("exposure_ms", np.nan))
    n_frames = np.bincount(np.asarray(table["point_index"], np.int64)) if raw.shape[0] else np.zeros(0, int)
    if np.isfinite(exposure_ms):
        spectrum.metadata.set_item("Acquisition_instrument.TEM.Detector.EELS.exposure", exposure_ms * 1e-3)
    if n_frames.size:
        spectrum.metadata.set_item("Acquisition_instrument.TEM.Detector.EELS.frame_number", int(np.max(n_frames)))
    md: dict[str, Any] = {"session": session_md, "dispersion_meV": dispersion, "exposure_ms": exposure_ms,
                          "point_index": points}
    x, y = _point_positions(table, points)  # mean probe position of each point, in the navigation shape
    md["x_nm"], md["y_nm"] = x.reshape(points.shape), y.reshape(points.shape)
    for name in ("peaks", "interface"):
        if name in res and res[name].dtype.names:
            md[name] = _columns(res[name])
    if "cluster_mean" in res:
        md["cluster_mean"] = np.asarray(res["cluster_mean"])
    spectrum.metadata.set_item("stemlive", md)
    out: dict[str, Any] = {"spectrum": spectrum}

    def per_point(values: np.ndarray, what: str, quantity: str) -> Any:
        arr = np.asarray(values)
        sig = hs.signals.Signal2D(arr) if arr.ndim == 2 else hs.signals.Signal1D(arr)
        for i, ax in enumerate(nav):  # per-point values: the scan axes are the signal axes (an image/profile)
            a = sig.axes_manager.signal_axes[i]
            a.name, a.units = ax["name"], ax["units"]
            if "axis" in ax:
                sig.axes_manager.signal_axes[i].convert_to_non_uniform_axis()
                sig.axes_manager.signal_axes[i].axis = np.asarray(ax["axis"])
            else:
                a.offset, a.scale = ax["offset"], ax["scale"]
        sig.metadata.General.title = f"{session_md['session_id']} {what}"
        sig.metadata.Signal.quantity = quantity
        return sig

    if "temperature_K" in res:
        temp = per_point(res["temperature_K"].astype(np.float64), "temperature", "Temperature (K)")
        err = np.asarray(res.get("temperature_err_K", np.full(points.shape, np.nan)), np.float64)
        var = temp._deepcopy_with_new_data(err**2)
        var.metadata.General.title = "variance (standard error squared)"
        var.metadata.Signal.quantity = "Temperature variance (K^2)"
        temp.metadata.set_item("Signal.Noise_properties.variance", var)
        temp.metadata.set_item("stemlive", {"session": session_md, "point_index": points})
        out["temperature"] = temp
    if "labels" in res:
        labels = per_point(res["labels"].astype(np.int32), "labels", "Cluster")
        labels.metadata.set_item("stemlive", {k: v for k, v in md.items() if k in ("session", "point_index", "peaks")})
        out["labels"] = labels
    raw_sig = hs.signals.Signal1D(raw)
    raw_sig.axes_manager.navigation_axes[0].name = "row" if raw.ndim == 2 else None
    e_axis = raw_sig.axes_manager.signal_axes[0]
    e_axis.name, e_axis.units = "Energy loss", "meV"
    if raw.shape[0]:
        e_axis.offset = float(table["energy_offset_meV"][0])
    e_axis.scale = dispersion if np.isfinite(dispersion) else 1.0
    raw_sig.metadata.General.title = f"{session_md['session_id']} raw spectra"
    raw_sig.metadata.set_item("stemlive", {"session": session_md, "dispersion_meV": dispersion,
                                           "exposure_ms": exposure_ms,
                                           "rows": {c: np.asarray(table[c]) for c in _RAW_COLUMNS if c in table}})
    out["raw"] = raw_sig
    return out


def _stem(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.name.removesuffix(out.suffix)}{suffix}")


def write_eels_hspy(session_path: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write the EELS export: ``OUT.hspy`` (the aligned sums) and ``OUT_temperature``/``_labels``/``_raw.hspy``.

    Each file reads with ``hyperspy.api.load``; see :func:`eels_signals` for what each holds.
    """
    out = Path(out)
    if out.suffix != ".hspy":
        out = out.with_name(out.name + ".hspy")
    signals = eels_signals(session_path)
    paths = {"spectrum": out}
    for name in ("temperature", "labels", "raw"):
        if name in signals:
            paths[name] = _stem(out, f"_{name}.hspy")
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        signals[name].save(path, overwrite=True)
    return paths


# ------------------------------------------------------------------------------------------------ tilt series
def _angle_axis(alpha: np.ndarray) -> dict[str, Any]:
    """The navigation axis of a tilt series: the stage alpha (deg) where HyperSpy can hold it, i.e. strictly
    monotonic in acquisition order (a single-axis series); else the projection number (double tilt: two
    angles per projection, which a HyperSpy axis cannot hold; they are in ``metadata.stemlive``)."""
    alpha = np.asarray(alpha, float)
    if alpha.size == 1:
        return {"name": "alpha", "units": "deg", "offset": float(alpha[0]), "scale": 1.0, "size": 1, "navigate": True}
    step = np.diff(alpha)
    if np.all(step > 0) or np.all(step < 0):
        return _axis("alpha", "deg", alpha, navigate=True)
    return {"name": "projection", "units": "", "offset": 0.0, "scale": 1.0, "size": int(alpha.size), "navigate": True}


def tilt_series_signal(emd_path: str | Path) -> Any:
    """The exported tilt series (Tomviz EMD written by :func:`stemlive.live.apps.tomo.write_emd`) as a HyperSpy
    :class:`~hyperspy.signals.Signal2D`: navigation axis the real stage alpha (deg; non-uniform where needed)
    for a single-axis series, else the projection number; image y/x in nm as signal axes; alpha, beta, Euler
    angles, rotation matrices and ASTRA vectors in ``metadata.stemlive``."""
    from stemlive.live.apps import tomo

    hs, _ = _hyperspy()
    g = tomo.read_emd_layout(emd_path)
    images = g["projections"]
    _, ny, nx = images.shape
    axes = [
        _angle_axis(g["alpha_deg"]),
        _axis("y", "nm", (np.arange(ny) - ny // 2) * g["pixel_size_nm"], navigate=False),
        _axis("x", "nm", (np.arange(nx) - nx // 2) * g["pixel_size_nm"], navigate=False),
    ]
    sig = hs.signals.Signal2D(images, axes=axes)
    sig.metadata.General.title = f"{g['session_id']} tilt series"
    sig.metadata.set_item("stemlive", {k: g[k] for k in ("alpha_deg", "beta_deg", "euler_zyz_deg",
                                                          "rotation_matrices", "astra_vectors", "shifts_px",
                                                          "session_id", "convention") if k in g})
    return sig


def add_hyperspy_layout(emd_path: str | Path) -> None:
    """Add HyperSpy's own layout (``/Experiments``, root ``file_format``) of :func:`tilt_series_signal` to an
    exported EMD, so that ``hs.load(path, file_format="hspy")`` reads the real angles from the same file
    (RosettaSciIO's EMD reader, the default for ``.emd``, makes every axis uniform)."""
    import tempfile

    import h5py

    sig = tilt_series_signal(emd_path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "series.hspy"
        sig.save(tmp_path, overwrite=True)
        with h5py.File(tmp_path, "r") as src, h5py.File(emd_path, "a") as dst:
            for key in src:
                src.copy(src[key], dst, name=key)
            for key, value in src.attrs.items():
                dst.attrs[key] = value


def _export_tilt(session_path: Path, out: Path, fmt: str, *, align: str, angles: Path | None,
                 overwrite: bool) -> dict[str, Path]:
    from stemlive.live.analysis import reconstruct as rc
    from stemlive.live.apps import tomo

    target = out if out.suffix == f".{fmt}" else out.with_name(f"{out.name}.{fmt}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; refusing to overwrite it")
    try:
        series = tomo.read_tilt_series(session_path, angles=angles)
    except tomo.TomoInputError as e:
        raise ExportError(str(e)) from None
    hs_available = True
    try:
        _hyperspy()
    except ExportError:
        if fmt == "hspy":
            raise
        hs_available = False
    directions = rc.projection_direction(series.alpha_deg, series.beta_deg)
    aligned, shifts = rc.align_tilt_series(series.sums, align, directions)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "emd":
        tomo.write_emd(target, series, aligned, shifts, align=align, raw_session=session_path)
        if hs_available:
            add_hyperspy_layout(target)
        return {"emd": target}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp_emd = Path(tmp) / "series.emd"
        tomo.write_emd(tmp_emd, series, aligned, shifts, align=align)
        sig = tilt_series_signal(tmp_emd)
    sig.save(target, overwrite=True)
    return {"hspy": target}


def export(
    session_path: str | Path,
    out: str | Path,
    fmt: str = "hspy",
    *,
    align: str = "cross_correlation",
    angles: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export an analysed session for HyperSpy/eXSpy (``hspy``) or Tomviz/ncempy/HyperSpy (``emd``).

    Parameters
    ----------
    session_path : path
        Session file v1 with analysis results (``/results/eels`` or ``/results/tilt_series``).
    out : path
        Output file (``.hspy`` or ``.emd``; EELS writes companion files next to it, see
        :func:`write_eels_hspy`).
    fmt : {"hspy", "emd"}
        EELS sessions: ``hspy`` only. Tilt series: ``emd`` (Tomviz layout plus the raw frames) or ``hspy``
        (aligned stack with the real angles).
    align, angles
        Tilt series only: cross-tilt alignment and an angles file, as for ``stemlive tomo export``.
    overwrite : bool
        Replace existing output files.

    Returns
    -------
    dict
        ``{what: path}`` of the files written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    session_path, out = Path(session_path), Path(out)
    with SessionReader(session_path) as r:
        kind = r.kind
    if kind in ("eels_line_scan", "eels_map"):
        if fmt != "hspy":
            raise ExportError(f"{session_path}: EELS sessions export as hspy (eXSpy EELSSpectrum), not {fmt}")
        return write_eels_hspy(session_path, out, overwrite=overwrite)
    if kind == "tilt_series":
        return _export_tilt(session_path, out, fmt, align=align, angles=Path(angles) if angles else None,
                            overwrite=overwrite)
    raise ExportError(f"{session_path}: session kind {kind!r} cannot be exported")


# ------------------------------------------------------------------------------------------------ command line
def add_subcommand(subparsers: Any) -> None:
    """Register ``stemlive export``."""
    p = subparsers.add_parser(
        "export", help="write an analysed session for HyperSpy/eXSpy (.hspy) or Tomviz/ncempy (.emd)")
    p.add_argument("session", type=Path, help="analysed session file (.h5)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, required=True,
                   help="hspy: eXSpy EELSSpectrum / HyperSpy stack; emd: Tomviz tilt series (tilt series only)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output file (.hspy or .emd)")
    p.add_argument("--align", choices=("cross_correlation", "com", "none"), default="cross_correlation",
                   help="tilt series: cross-tilt alignment (default cross_correlation)")
    p.add_argument("--angles", type=Path, help="tilt series: calibrated angles (truth JSON or two-column text)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``stemlive export``."""
    try:
        paths = export(args.session, args.out, args.fmt, align=args.align, angles=args.angles,
                       overwrite=args.overwrite)
    except FileExistsError as e:
        raise CLIError(str(e), ExitCode.USAGE) from None
    except (ExportError, OSError, ValueError) as e:
        raise CLIError(str(e), ExitCode.BAD_INPUT) from None
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0
