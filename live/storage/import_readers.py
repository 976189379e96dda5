"""Readers of ``stemlive import``: Nion Swift data items and RosettaSciIO files (and HyperSpy signals) as
:class:`Source` objects, the data with its axes in array order and the role of each axis (frames, scan
positions, the spectrum or image), plus the calibrations found in the metadata. See :mod:`.importer`.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ENERGY_UNITS = {"mev": 1.0, "ev": 1e3, "kev": 1e6}
LENGTH_UNITS = {"nm": 1.0, "å": 0.1, "a": 0.1, "angstrom": 0.1, "pm": 1e-3, "µm": 1e3, "um": 1e3, "μm": 1e3,
                "mm": 1e6, "m": 1e9}
ANGLE_UNITS = {"deg": 1.0, "°": 1.0, "degree": 1.0, "degrees": 1.0, "rad": 180.0 / math.pi, "mrad": 0.18 / math.pi}
TIME_WORDS = ("time", "frame", "sequence", "seq", "exposure")
TIME_UNITS = ("s", "ms", "us", "µs", "ns", "min", "frame", "frames")


class ImportInputError(ValueError):
    """The input cannot become a session file (the message names the file and the problem)."""


@dataclass
class Axis:
    """One array axis: ``offset + index * scale`` in ``units``."""

    size: int
    scale: float = 1.0
    offset: float = 0.0
    units: str = ""
    name: str = ""


@dataclass
class Source:
    """Data read from one file (or given in memory), its axes in array order, and what each axis is."""

    data: Any  # a numpy array, or a dask array for a source read lazily (large files stay on disk)
    axes: list[Axis]
    roles: list[str]  # per axis: "sequence" | "navigation" | "signal"
    name: str
    reader: str
    metadata: dict[str, Any] = field(default_factory=dict)
    t0: float | None = None
    exposure_ms: float | None = None
    dwell_us: float | None = None
    angles_deg: tuple[float, float] | None = None  # stage (alpha, beta) of a single image

    @property
    def signal_dims(self) -> int:
        return self.roles.count("signal")


# ------------------------------------------------------------------------------------------------ readers


def read_file(path: str | Path) -> list[Source]:
    """Read a Nion Swift data item or anything RosettaSciIO reads into :class:`Source` objects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ImportInputError(f"{path}: is a directory, not a data file")
    if path.stat().st_size == 0:
        raise ImportInputError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".ndata":
        return [_read_ndata(path)]
    if suffix == ".h5":
        swift = _read_swift_h5(path)
        if swift is not None:
            return [swift]
    return _read_rsciio(path)


def _read_ndata(path: Path) -> Source:
    from nion.swift.model import NDataHandler

    handler = NDataHandler.NDataHandler(path)
    try:
        properties = handler.read_properties()
        data = handler.read_data()
    except Exception as e:  # a damaged zip: Swift's parser raises whatever it meets
        raise ImportInputError(f"{path}: not a readable Nion Swift .ndata file ({type(e).__name__}: {e})") from None
    finally:
        handler.close()
    if data is None:
        raise ImportInputError(f"{path}: Nion Swift data item without data")
    return _from_swift(np.asarray(data), properties, path, "nion swift ndata")


def _read_swift_h5(path: Path) -> Source | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f.get("data")
            if not isinstance(ds, h5py.Dataset) or "properties" not in ds.attrs:
                if "format" in f.attrs and str(f.attrs["format"]) == "stemlive-session":
                    raise ImportInputError(f"{path}: already a stemlive session file (use it as it is)")
                return None
            properties = json.loads(ds.attrs["properties"])
            data = ds[()]
    except OSError as e:
        raise ImportInputError(f"{path}: damaged HDF5 file ({' '.join(str(e).split())})") from None
    return _from_swift(np.asarray(data), properties, path, "nion swift h5")


def _from_swift(data: np.ndarray, properties: Mapping[str, Any], path: Path, reader: str) -> Source:
    """A Swift data item: the data descriptor says which axes are frames, scan positions and the datum."""
    descriptor = dict(properties.get("data_descriptor") or {})
    is_sequence = bool(descriptor.get("is_sequence", properties.get("is_sequence", False)))
    ndim = data.ndim
    collection = descriptor.get("collection_dimension_count", properties.get("collection_dimension_count"))
    datum = descriptor.get("datum_dimension_count", properties.get("datum_dimension_count"))
    if collection is None:
        collection = 2 if ndim - is_sequence in (3, 4) else 0
    if datum is None:
        datum = ndim - is_sequence - int(collection)
    if is_sequence + int(collection) + int(datum) != ndim:
        raise ImportInputError(f"{path}: data descriptor (sequence {is_sequence}, collection {collection}, datum "
                               f"{datum}) does not match the data's {ndim} dimensions")
    roles = ["sequence"] * is_sequence + ["navigation"] * int(collection) + ["signal"] * int(datum)
    calibrations = properties.get("dimensional_calibrations", properties.get("spatial_calibrations")) or []
    axes = []
    for i, size in enumerate(data.shape):
        c = calibrations[i] if i < len(calibrations) and isinstance(calibrations[i], Mapping) else {}
        axes.append(Axis(int(size), float(c.get("scale", 1.0)), float(c.get("offset", 0.0)), str(c.get("units", ""))))
    metadata = dict(properties.get("metadata") or {})
    hardware = metadata.get("hardware_source") or {}
    exposure_s = _find(metadata, ("exposure",)) if "exposure" not in hardware else hardware["exposure"]
    pixel_time = _find(metadata, ("pixel_time_us",))
    alpha, beta = _find(metadata, ("StageOutA",)), _find(metadata, ("StageOutB",))
    return Source(
        data=data, axes=axes, roles=roles, name=str(path), reader=reader,
        metadata={"title": properties.get("title", ""), "metadata": metadata,
                  "intensity_calibration": properties.get("intensity_calibration")},
        t0=parse_time(properties.get("created")),
        exposure_ms=1e3 * float(exposure_s) if exposure_s is not None else None,
        dwell_us=float(pixel_time) if pixel_time is not None else None,
        angles_deg=(math.degrees(float(alpha)), math.degrees(float(beta or 0.0))) if alpha is not None else None,
    )


def _read_rsciio(path: Path) -> list[Source]:
    try:
        from rsciio import IO_PLUGINS
    except ImportError:  # pragma: no cover - rosettasciio is a dependency
        raise ImportInputError(f"{path}: reading this format needs rosettasciio (pip install rosettasciio)") from None
    ext = path.suffix.lower().lstrip(".")
    plugins = [p for p in IO_PLUGINS if ext in [e.lower() for e in p.get("file_extensions", [])]]
    if not plugins:
        raise ImportInputError(f"{path}: no reader for .{ext} files (Nion Swift .ndata/.h5 or a RosettaSciIO format)")
    errors = []
    for plugin in plugins:
        try:
            reader = importlib.import_module(plugin["api"]).file_reader
            try:  # lazily where the reader can: a spectrum-image sequence may not fit in memory
                items = reader(str(path), lazy=True)
            except TypeError:
                items = reader(str(path))
        except Exception as e:  # a reader that does not match raises whatever it meets: try the next one
            errors.append(f"{plugin['name']}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            continue
        sources = [_from_rsciio(item, path, str(plugin["name"])) for item in items]
        return [s for s in sources if s is not None] or _none_usable(path, items)
    raise ImportInputError(f"{path}: cannot be read ({'; '.join(errors)})")


def _none_usable(path: Path, items: Sequence[Any]) -> list[Source]:
    raise ImportInputError(f"{path}: none of its {len(items)} data sets is a spectrum, line, map or image stack")


def _from_rsciio(item: Mapping[str, Any], path: Path, reader: str) -> Source | None:
    data = item["data"]
    data = data if _is_lazy(data) else np.asarray(data)
    if data.dtype.kind not in "fiu":
        return None
    axes_dicts = list(item.get("axes") or [])
    if "index_in_array" in (axes_dicts[0] if axes_dicts else {}):
        axes_dicts.sort(key=lambda a: a["index_in_array"])
    axes, navigate = [], []
    for size, a in zip(data.shape, axes_dicts or [{}] * data.ndim, strict=True):
        scale, offset = a.get("scale", 1.0), a.get("offset", 0.0)
        if "axis" in a and a.get("axis") is not None and len(a["axis"]) > 1:  # a non-uniform axis: need uniform
            values = np.asarray(a["axis"], float)
            steps = np.diff(values)
            if not np.allclose(steps, steps[0], rtol=1e-6):
                raise ImportInputError(f"{path}: axis {a.get('name', '?')!r} is not uniform")
            scale, offset = float(steps[0]), float(values[0])
        axes.append(Axis(int(size), float(scale), float(offset), _units(a.get("units")), str(a.get("name") or "")))
        navigate.append(bool(a.get("navigate", False)))
    roles = _rsciio_roles(axes, navigate)
    md = item.get("metadata") or {}
    general = md.get("General") or {}
    tem = (md.get("Acquisition_instrument") or {}).get("TEM") or {}
    eels_md = ((tem.get("Detector") or {}).get("EELS")) or {}
    stage = tem.get("Stage") or {}
    exposure = eels_md.get("exposure", tem.get("exposure"))
    if exposure is None:  # DigitalMicrograph keeps it in its own tags (ImageTags.EELS.Acquisition)
        exposure = _find(item.get("original_metadata") or {}, ("Exposure (s)",))
    dwell = tem.get("dwell_time", eels_md.get("dwell_time"))
    alpha = stage.get("tilt_alpha")
    return Source(
        data=data, axes=axes, roles=roles, name=str(path), reader=f"rosettasciio {reader}",
        metadata={"title": general.get("title", ""), "metadata": jsonable(md)},
        t0=_hyperspy_time(general),
        exposure_ms=1e3 * float(exposure) if exposure is not None else None,
        dwell_us=1e6 * float(dwell) if dwell is not None else None,
        angles_deg=(float(alpha), float(stage.get("tilt_beta", 0.0) or 0.0)) if alpha is not None else None,
    )


def _is_lazy(data: Any) -> bool:
    return type(data).__module__.startswith("dask")


def _rsciio_roles(axes: Sequence[Axis], navigate: Sequence[bool]) -> list[str]:
    """Navigation axes are scan positions, except frame/time axes and the outermost of three (the sequence).

    An axis in energy units is the spectrum whatever the flags say (some readers, e.g. EMD, flag no axis); without
    flags and energy units, the last two axes are an image and any others the stack.
    """
    energy = [i for i, a in enumerate(axes) if a.units.strip().lower() in ENERGY_UNITS]
    if energy:
        roles = ["signal" if i == energy[-1] else "navigation" for i in range(len(axes))]
    elif not any(navigate):
        roles = ["signal" if i >= len(axes) - 2 else "sequence" for i in range(len(axes))]
    else:
        roles = ["navigation" if nav else "signal" for nav in navigate]
    nav = [i for i, r in enumerate(roles) if r == "navigation"]
    for i in nav:
        if _is_time_axis(axes[i]):
            roles[i] = "sequence"
    nav = [i for i, r in enumerate(roles) if r == "navigation"]
    if len(nav) >= 3 and "sequence" not in roles:
        roles[nav[0]] = "sequence"
    signal = [i for i, r in enumerate(roles) if r == "signal"]
    if len(signal) == 2:  # images: every other axis is the stack
        roles = ["signal" if r == "signal" else "sequence" for r in roles]
    return roles


def _is_time_axis(axis: Axis) -> bool:
    name, units = axis.name.lower(), axis.units.lower()
    return any(w in name for w in TIME_WORDS) or units in TIME_UNITS


def _units(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text in {"<undefined>", "Undefined", "None"} else text


def _find(tree: Any, keys: Sequence[str]) -> Any:
    """The first value under any of ``keys`` anywhere in a nested dict (depth first)."""
    if isinstance(tree, Mapping):
        for k in keys:
            if k in tree and not isinstance(tree[k], Mapping):
                return tree[k]
        for v in tree.values():
            found = _find(v, keys)
            if found is not None:
                return found
    return None


def parse_time(text: Any) -> float | None:
    """Swift's ``created`` (UTC, ISO 8601 without offset) as Unix time."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _hyperspy_time(general: Mapping[str, Any]) -> float | None:
    date, time_ = general.get("date"), general.get("time")
    if not date:
        return None
    zone = general.get("time_zone")
    t = parse_time(f"{date}T{time_ or '00:00:00'}")
    if t is not None and zone not in (None, "UTC", "utc", "Z"):
        try:
            from zoneinfo import ZoneInfo

            local = datetime.fromisoformat(f"{date}T{time_ or '00:00:00'}").replace(tzinfo=ZoneInfo(str(zone)))
            t = local.timestamp()
        except (ValueError, KeyError, ImportError):
            pass
    return t


def jsonable(tree: Any) -> Any:
    """Metadata as JSON-safe values (arrays to lists, unknown objects to their text)."""
    if isinstance(tree, Mapping):
        return {str(k): jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [jsonable(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return tree.tolist() if tree.size <= 4096 else f"<array {tree.shape} {tree.dtype}>"
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, str | int | float | bool):
        return tree
    return str(tree)


# ------------------------------------------------------------------------------------------------ in memory


def from_signal(signal: Any, name: str = "<signal>") -> Source:
    """A HyperSpy signal (e.g. an eXSpy ``EELSSpectrum``) as a :class:`Source` (navigation axes as in
    :func:`_rsciio_roles`)."""
    axes_dicts = []
    for ax in sorted(signal.axes_manager._axes, key=lambda a: a.index_in_array):
        d = {"size": ax.size, "name": str(ax.name), "units": ax.units, "navigate": bool(ax.navigate)}
        if getattr(ax, "is_uniform", True):
            d.update({"scale": float(ax.scale), "offset": float(ax.offset)})
        else:
            d["axis"] = np.asarray(ax.axis)
        axes_dicts.append(d)
    item = {"data": np.asarray(signal.data), "axes": axes_dicts, "metadata": signal.metadata.as_dictionary()}
    source = _from_rsciio(item, Path(name), "hyperspy signal")
    if source is None:
        raise ImportInputError(f"{name}: the signal's data is not real numbers ({signal.data.dtype})")
    source.reader = "hyperspy signal"
    return source
