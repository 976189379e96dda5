"""What a file needs to be read as a v1 session file, whoever wrote it (DESIGN.md, "Session file v1").

:func:`open_session_file` opens a path for reading and :func:`check_contract` checks an open file against the
contract. Both raise :class:`~stemlive.live.storage.session_format.SessionFormatError` (or :class:`FileNotFoundError`)
with one line that names the file and the problem, which ``stemlive`` prints as it is (exit code
``BAD_INPUT``). Only the contract's fields are required: a writer's extras (``session_start``, ``seq``,
``committed_rows``, results) are checked only when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.storage.session_format import COMMITTED, FINAL_STATUSES, KINDS, STATUSES, SessionFormatError
from stemlive.live.storage.session_format import as_str as _as_str
from stemlive.live.storage.session_format import get_text as _get_text

#: Root attributes of the contract (``format`` and ``format_version`` are checked by ``check_format``).
ROOT_ATTRS = ("session_id", "kind", "created", "status")
#: Per-row columns each data group must have (``seq`` is a writer's extra: without it, row order is arrival order).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "tilt_series": ("tilt_index", "frame_index", "alpha_deg", "beta_deg", "t"),
    "eels": ("point_index", "frame_index", "x_nm", "y_nm", "energy_offset_meV", "t"),
}
#: Calibration attributes of each data group: (name, must be finite and > 0).
REQUIRED_ATTRS: dict[str, tuple[tuple[str, bool], ...]] = {
    "tilt_series": (("pixel_size_nm", True), ("dwell_us", True)),  # the drift correction times scan lines with it
    "eels": (("dispersion_meV", True), ("exposure_ms", False)),
}
DATA = {"tilt_series": ("frames", 3, "(n, ny, nx)"), "eels": ("spectra", 2, "(n, n_channels)")}
GROUP_OF_KIND = {"tilt_series": "tilt_series", "eels_line_scan": "eels", "eels_map": "eels"}


def open_session_file(path: str | Path, *, locking: bool | None = None) -> h5py.File:
    """Open ``path`` read-only as HDF5, turning the ways this fails into one-line errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise SessionFormatError(f"{path}: is a directory, not a session file")
    size = path.stat().st_size
    if size == 0:
        raise SessionFormatError(f"{path}: empty file (0 bytes), not a stemlive session file")
    try:
        hdf5 = h5py.is_hdf5(path)
    except OSError as e:  # unreadable (permissions, ...)
        raise SessionFormatError(f"{path}: cannot be read ({_reason(e)})") from None
    if not hdf5:
        raise SessionFormatError(f"{path}: not a stemlive session file (not an HDF5 file)")
    try:
        return h5py.File(path, "r") if locking is None else h5py.File(path, "r", locking=locking)
    except OSError as e:
        text = str(e).lower()
        if "truncated" in text:
            raise SessionFormatError(f"{path}: truncated HDF5 file ({size} bytes; {_reason(e)})") from None
        if "unable to lock" in text or "file locking" in text:
            raise SessionFormatError(
                f"{path}: held open for writing by another process (HDF5 file lock); wait for it to close"
            ) from None
        raise SessionFormatError(f"{path}: damaged HDF5 file ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """The informative tail of an HDF5 error message, on one line."""
    text = " ".join(str(e).split())
    return text.split("(", 1)[1].rstrip(")") if text.startswith("Unable to") and "(" in text else text


def check_contract(f: h5py.File, name: str | Path | None = None) -> None:
    """Raise :class:`SessionFormatError` if the open file ``f`` breaks the v1 contract (after ``check_format``).

    Checks the root attributes, ``settings`` (and a stored ``session_start``) as JSON objects, and for the data
    group of the file's kind: the data dataset's rank and dtype, the per-row columns, their lengths (equal in a
    closed file), ``committed_rows``, the calibrations, and index and angle values of the rows.
    """
    where = str(name if name is not None else f.filename)

    def fail(problem: str) -> SessionFormatError:
        return SessionFormatError(f"{where}: {problem}")

    attrs = f.attrs
    missing = [a for a in ROOT_ATTRS if a not in attrs]
    if missing:
        raise fail(f"no root attribute {', '.join(missing)} (the v1 contract requires {', '.join(ROOT_ATTRS)})")
    kind, status = _as_str(attrs["kind"]), _as_str(attrs["status"])
    if kind not in KINDS:
        raise fail(f"kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
    if status not in STATUSES:
        raise fail(f"status {status!r} is not one of {', '.join(sorted(STATUSES))}")
    for text_name, required in (("settings", True), ("session_start", False)):
        text = _get_text(f, text_name)
        if text is None:
            if required:
                raise fail("no settings (root attribute or dataset with the session_start settings as JSON)")
            continue
        try:
            value = json.loads(text)
        except ValueError as e:
            raise fail(f"{text_name} is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise fail(f"{text_name} is JSON {type(value).__name__}, not an object")
    group_name = GROUP_OF_KIND[kind]
    other = "eels" if group_name == "tilt_series" else "tilt_series"
    if group_name not in f and other in f and DATA[other][0] in f[other]:
        raise fail(f"kind {kind!r} but the data is in /{other}, not /{group_name}")
    if group_name in f:
        _check_group(f, group_name, kind, closed=status in FINAL_STATUSES, fail=fail)


def _check_group(f: h5py.File, group_name: str, kind: str, *, closed: bool, fail: Any) -> None:
    group = f[group_name]
    if not isinstance(group, h5py.Group):
        raise fail(f"/{group_name} is not a group")
    data_name, ndim, shape_text = DATA[group_name]
    if data_name not in group:
        if group.keys():
            raise fail(f"/{group_name} has no {data_name} dataset")
        return  # an empty group: a session that recorded nothing
    data = group[data_name]
    if not isinstance(data, h5py.Dataset) or data.ndim != ndim:
        shape = getattr(data, "shape", None)
        raise fail(f"/{group_name}/{data_name} must be {shape_text}, got shape {shape}")
    if data.dtype.kind not in "fiu":
        raise fail(f"/{group_name}/{data_name} has dtype {data.dtype}, not a real number type")
    n = data.shape[0]
    for column in REQUIRED_COLUMNS[group_name]:
        if column not in group:
            required = ", ".join(REQUIRED_COLUMNS[group_name])
            raise fail(f"/{group_name} has no {column} dataset (the v1 contract requires {required})")
    columns = [c for c in (*REQUIRED_COLUMNS[group_name], "seq") if c in group]
    lengths = {}
    for column in columns:
        ds = group[column]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "fiu":
            raise fail(f"/{group_name}/{column} must be a 1-D numeric dataset, got {getattr(ds, 'shape', ds)}")
        lengths[column] = ds.shape[0]
    committed: int | None = None
    if COMMITTED in group.attrs:
        try:
            committed = int(np.asarray(group.attrs[COMMITTED]).item())
        except (TypeError, ValueError):
            raise fail(f"/{group_name} {COMMITTED} {group.attrs[COMMITTED]!r} is not an integer") from None
        if committed < 0:
            raise fail(f"/{group_name} {COMMITTED} is {committed}, negative")
        if committed > min([n, *lengths.values()]):
            raise fail(f"/{group_name} {COMMITTED} is {committed}, more than the {n} rows of {data_name}")
    if closed and committed is None:
        for column, length in lengths.items():
            if length != n:
                raise fail(f"/{group_name}/{column} has {length} rows, {data_name} has {n} (closed file)")
    for attr, positive in REQUIRED_ATTRS[group_name]:
        value = group.attrs.get(attr, data.attrs.get(attr))
        if value is None:
            raise fail(f"/{group_name} has no {attr} attribute")
        try:
            number = float(np.asarray(value).item())
        except (TypeError, ValueError):
            raise fail(f"/{group_name} {attr} {value!r} is not a number") from None
        if positive and not (np.isfinite(number) and number > 0):
            raise fail(f"/{group_name} {attr} is {number:g}, must be a positive number")
    rows = min([n, *lengths.values()] + ([committed] if committed is not None else []))
    if group_name == "eels":
        _check_eels_rows(group, kind, rows, fail)
    else:
        _check_tilt_rows(group, rows, fail)


def _check_tilt_rows(group: h5py.Group, rows: int, fail: Any) -> None:
    tilt = group["tilt_index"][:rows]
    if tilt.size and tilt.min() < 0:
        raise fail(f"/tilt_series/tilt_index has a negative value at row {int(np.argmax(tilt < 0))}")
    t = group["t"][:rows]
    written = np.isfinite(t) if t.dtype.kind == "f" else np.ones(t.shape, bool)
    for column in ("alpha_deg", "beta_deg"):
        angles = group[column][:rows]
        bad = written & ~np.isfinite(angles)
        if bad.any():
            raise fail(f"/tilt_series/{column} is not finite at row {int(np.argmax(bad))}")


def _check_eels_rows(group: h5py.Group, kind: str, rows: int, fail: Any) -> None:
    points = group["point_index"][:rows]
    if points.size and points.min() < 0:
        raise fail(f"/eels/point_index has a negative value at row {int(np.argmax(points < 0))}")
    if kind != "eels_map":
        return
    shape = group.attrs.get("scan_shape", group["spectra"].attrs.get("scan_shape"))
    try:
        ny, nx = (int(v) for v in np.asarray(shape).ravel())
    except (TypeError, ValueError):
        raise fail(f"/eels scan_shape {shape!r} is not [ny, nx] (required for an eels_map)") from None
    if ny < 1 or nx < 1:
        raise fail(f"/eels scan_shape [{ny}, {nx}] must be positive")
    if points.size and points.max() >= ny * nx:
        raise fail(f"/eels/point_index {int(points.max())} is outside scan_shape [{ny}, {nx}]")
