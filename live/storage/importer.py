"""``stemlive import``: v1 session files from other programs' data (Nion Swift, RosettaSciIO, numpy, HyperSpy).

Readers (:mod:`.import_readers`)
--------------------------------
- Nion Swift data items: ``.ndata`` (read with Swift's own ``NDataHandler``) and Swift's ``.h5`` (dataset
  ``data`` with the JSON attribute ``properties``; read with plain h5py, read-only, because Swift's
  ``HDF5Handler`` opens files for appending). The data descriptor (``is_sequence``,
  ``collection_dimension_count``, ``datum_dimension_count``) says which axes are frames, scan positions and
  the spectrum or image; ``dimensional_calibrations`` give offsets and scales in eV/meV and nm.
- Everything RosettaSciIO reads (HyperSpy ``.hspy``/``.zspy``, DigitalMicrograph ``.dm3``/``.dm4``, EMD, ...):
  axes flagged ``navigate`` are scan positions (or frames: an axis named or measured in time or frames, or the
  outermost of three), the others the spectrum or image.
- numpy arrays (:func:`import_arrays`) and HyperSpy signals (:func:`import_signal`).

What becomes of the data
------------------------
One signal axis with energy units: an EELS session (``eels_map`` with two scan axes, else ``eels_line_scan``),
rows point after point (row-major over ``[ny, nx]``), the frames of each point one after another; energies in
meV (``energy_offset_meV`` = the axis offset, ``dispersion_meV`` = its scale) and positions in nm. Two signal
axes: a tilt series, one frame per image, with the (alpha, beta) of each image from ``angles`` (a CSV or array),
a stack axis in degrees, or the files' stage metadata; consecutive images at the same angles form one tilt. The
file is written by :class:`~stemlive.live.storage.session.SessionWriter` from the wire messages a live acquisition would
have sent, so it replays and analyses exactly like a recorded one. Times ``t`` are the source's acquisition time
plus one exposure (or frame time) per row where the source has no per-frame times.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.exitcodes import CLIError, ExitCode
from stemlive.live.storage.import_readers import (
    ANGLE_UNITS,
    ENERGY_UNITS,
    LENGTH_UNITS,
    Axis,
    ImportInputError,
    Source,
    from_signal,
    jsonable,
    parse_time,
    read_file,
)

__all__ = ["ImportInputError", "Axis", "Source", "from_signal", "read_file", "import_arrays", "import_files",
           "import_signal", "load_angles", "to_session", "add_subcommand", "cmd_import"]

KIND_CHOICES = ("eels_line_scan", "eels_map", "tilt_series")
#: spectra of a lazily read source are read this many bytes at a time
BLOCK_BYTES = 64 << 20
#: calibrations ``--set`` can give or override; every other key goes into the session's settings
CALIBRATION_KEYS = ("exposure_ms", "dwell_us", "pixel_size_nm", "dispersion_meV", "energy_offset_meV", "step_nm",
                    "session_id", "t0")


# ------------------------------------------------------------------------------------------------ to a session
# (the readers, from files and HyperSpy signals, are in .import_readers)


def load_angles(path: str | Path, n: int) -> np.ndarray:
    """``(n, 2)`` (alpha, beta) in degrees from a CSV/text file: one row per image, columns ``alpha[, beta]``
    (a header row with names is skipped; commas, semicolons, tabs or spaces separate values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows: list[list[float]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        cells = [c for c in re.split(r"[,;\s]+", line.strip()) if c]
        if not cells or cells[0].startswith("#"):
            continue
        try:
            rows.append([float(c) for c in cells[:2]])
        except ValueError:
            if rows:  # only a first (header) row may hold names
                raise ImportInputError(f"{path}: line {number} is not numbers: {line.strip()!r}") from None
    if not rows:
        raise ImportInputError(f"{path}: no angles")
    table = np.array([r + [0.0] * (2 - len(r)) for r in rows], float)
    if len(table) != n:
        raise ImportInputError(f"{path}: {len(table)} angle rows for {n} images")
    return table


def to_session(
    sources: Sequence[Source],
    out: str | Path,
    *,
    kind: str | None = None,
    angles: str | Path | np.ndarray | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write the session file ``out`` from one or more sources (several: frames of the same points, or more images).

    Parameters
    ----------
    kind
        ``eels_line_scan``, ``eels_map`` or ``tilt_series``; default from the data (one signal axis: EELS, a map
        with two scan axes; two: a tilt series).
    angles
        Tilt series: ``(n, 2)`` (alpha, beta) or ``(n,)`` alpha in degrees per image, or a CSV file of them.
    settings
        Calibrations (:data:`CALIBRATION_KEYS`, e.g. ``exposure_ms``, ``pixel_size_nm``) that the sources lack
        or that override them; all other keys are stored in the session's ``settings``.

    Raises
    ------
    ImportInputError
        If the data cannot become the session asked for (the message names the source and the problem).
    FileExistsError
        If ``out`` exists.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite a session file")
    if not sources:
        raise ImportInputError("nothing to import")
    options = dict(settings or {})
    dims = {s.signal_dims for s in sources}
    if len(dims) != 1:
        raise ImportInputError(f"{sources[0].name}: the inputs mix spectra and images")
    (signal_dims,) = dims
    if kind is None:
        kind = "tilt_series" if signal_dims == 2 else "eels_map" if _nav_dims(sources[0]) == 2 else "eels_line_scan"
    if kind not in KIND_CHOICES:
        raise ImportInputError(f"kind {kind!r} is not one of {', '.join(KIND_CHOICES)}")
    if kind == "tilt_series":
        if signal_dims != 2:
            raise ImportInputError(f"{sources[0].name}: holds {signal_dims}-D signals, a tilt series needs images")
        return _write_tilt_series(sources, out, angles, options)
    if signal_dims != 1:
        raise ImportInputError(f"{sources[0].name}: holds {signal_dims}-D signals, {kind} needs spectra")
    return _write_eels(sources, out, kind, options)


def _nav_dims(source: Source) -> int:
    return source.roles.count("navigation")


def _clean(value: float) -> float:
    """A converted calibration without binary noise (0.00044 eV -> 0.44 meV exactly, as written in meV)."""
    return float(f"{value:.12g}")


def _factor(units: str, table: Mapping[str, float], what: str, source: Source, hint: str) -> float:
    key = units.strip().lower().replace("\u00c5", "å")
    if key in table:
        return table[key]
    raise ImportInputError(f"{source.name}: {what} axis units {units!r} are not one of {', '.join(table)}; "
                           f"give {hint}")


def _start(kind: str, options: dict[str, Any], sources: Sequence[Source], extra: Mapping[str, Any]) -> dict[str, Any]:
    t0 = options.pop("t0", None)
    t0 = parse_time(t0) if isinstance(t0, str) else t0
    if t0 is None:
        t0 = next((s.t0 for s in sources if s.t0 is not None), None)
    if t0 is None:
        t0 = min(Path(s.name).stat().st_mtime for s in sources) if all(Path(s.name).exists() for s in sources) else 0.0
    session_id = str(options.pop("session_id", None) or f"import-{uuid.uuid4().hex[:12]}")
    settings = {k: v for k, v in options.items() if k not in CALIBRATION_KEYS}
    settings.update(extra)
    settings["source"] = {
        "files": [s.name for s in sources], "readers": sorted({s.reader for s in sources}),
        "title": sources[0].metadata.get("title", ""), "metadata": jsonable(sources[0].metadata.get("metadata", {})),
    }
    return {"proto": "stemlive/1", "type": "session_start", "session": session_id, "seq": 0, "t": float(t0),
            "kind": kind, "settings": settings}


def _eels_block(source: Source) -> tuple[np.ndarray, list[Axis], Axis]:
    """``(frames, points, channels)`` of one EELS source, its scan axes and its energy axis."""
    order = [i for i, r in enumerate(source.roles) if r == "sequence"]
    nav = [i for i, r in enumerate(source.roles) if r == "navigation"]
    signal = [i for i, r in enumerate(source.roles) if r == "signal"]
    if len(order) > 1:
        raise ImportInputError(f"{source.name}: more than one frame axis")
    if len(nav) > 2:
        raise ImportInputError(f"{source.name}: {len(nav)} scan axes (a line has one, a map two)")
    data = np.transpose(source.data, order + nav + signal)
    n_frames = data.shape[0] if order else 1
    return data.reshape(n_frames, -1, data.shape[-1]), [source.axes[i] for i in nav], source.axes[signal[0]]


def _write_eels(sources: Sequence[Source], out: Path, kind: str, options: dict[str, Any]) -> Path:
    from stemlive.live.storage.session import SessionWriter
    from stemlive.live.wire.protocol import Message

    blocks = [_eels_block(s) for s in sources]
    first, nav_axes, energy = blocks[0][0], blocks[0][1], blocks[0][2]
    for source, (block, _nav, e) in zip(sources, blocks, strict=True):
        if block.shape[1:] != first.shape[1:] or (e.scale, e.offset, e.units) != (energy.scale, energy.offset,
                                                                                    energy.units):
            raise ImportInputError(f"{source.name}: points, channels or energy axis differ from {sources[0].name}")
    data = blocks[0][0] if len(blocks) == 1 else np.concatenate([b[0] for b in blocks], axis=0)  # (F, P, C)
    n_frames, n_points, n_channels = data.shape
    if n_points == 0 or n_frames == 0 or n_channels < 2:
        raise ImportInputError(f"{sources[0].name}: no spectra (shape {data.shape})")
    source = sources[0]
    if "dispersion_meV" in options and "energy_offset_meV" in options:
        dispersion, offset = float(options["dispersion_meV"]), float(options["energy_offset_meV"])
    else:
        f_e = _factor(energy.units, ENERGY_UNITS, "energy", source,
                      "--set dispersion_meV=... --set energy_offset_meV=...")
        dispersion = float(options.get("dispersion_meV", _clean(energy.scale * f_e)))
        offset = float(options.get("energy_offset_meV", _clean(energy.offset * f_e)))
    if not dispersion > 0:
        raise ImportInputError(f"{source.name}: energy axis scale {energy.scale} {energy.units} is not increasing")
    shape = [a.size for a in nav_axes]
    if kind == "eels_map" and len(shape) != 2:
        raise ImportInputError(f"{source.name}: an eels_map needs two scan axes, the data has {len(shape)}")
    x_nm, y_nm = _positions(nav_axes, n_points, options, source)
    exposure = options.get("exposure_ms", next((s.exposure_ms for s in sources if s.exposure_ms), None))
    exposure_ms = float(exposure) if exposure is not None else math.nan
    extra: dict[str, Any] = {"scan_shape": shape} if kind == "eels_map" else {}
    start = _start(kind, options, sources, extra)
    dt = exposure_ms / 1e3 if math.isfinite(exposure_ms) and exposure_ms > 0 else 1.0
    t0, session = float(start["t"]), start["session"]
    seq = 0
    # points in blocks of BLOCK_BYTES: a lazy source is read block by block, never whole
    per_block = max(1, BLOCK_BYTES // max(1, n_frames * n_channels * 4))
    block, block_start = np.empty((n_frames, 0, n_channels), "<f4"), 0
    with SessionWriter(out, Message(start), commit_interval_s=3600.0) as writer:
        for p in range(n_points):
            if p >= block_start + block.shape[1]:
                block_start = p
                block = np.asarray(data[:, p : p + per_block, :])
            seq += 1
            rows = p * n_frames + np.arange(n_frames)
            header = {
                "proto": "stemlive/1", "type": "spectrum", "session": session, "seq": seq,
                "point_index": [p] * n_frames, "frame_index": list(range(n_frames)),
                "x_nm": [float(x_nm[p])] * n_frames, "y_nm": [float(y_nm[p])] * n_frames,
                "energy_offset_meV": [offset] * n_frames, "t": [t0 + dt * (r + 1) for r in rows.tolist()],
                "dispersion_meV": dispersion, "exposure_ms": exposure_ms,
            }
            payload = np.ascontiguousarray(block[:, p - block_start, :], dtype="<f4")
            if n_frames == 1:  # one spectrum: a single-spectrum message, as the acquisition sends it
                header = {k: (v[0] if isinstance(v, list) else v) for k, v in header.items()}
                payload = payload[0]
            header.update({"dtype": "<f4", "shape": list(payload.shape)})
            writer.append(Message(header, payload))
        writer.append(Message({"proto": "stemlive/1", "type": "session_end", "session": session, "seq": seq + 1,
                               "t": t0 + dt * (n_points * n_frames + 1), "status": "complete",
                               "messages": seq + 2}))
    return out


def _positions(nav: Sequence[Axis], n_points: int, options: Mapping[str, Any],
               source: Source) -> tuple[np.ndarray, np.ndarray]:
    """Probe positions (nm) of the points, row-major over ``[ny, nx]`` (a line: along x)."""
    coords = []
    for axis in nav:
        if "step_nm" in options:
            coords.append(float(options["step_nm"]) * np.arange(axis.size))
            continue
        factor = _factor(axis.units, LENGTH_UNITS, f"scan ({axis.name or 'position'})", source, "--set step_nm=...")
        coords.append(_clean(axis.offset * factor) + _clean(axis.scale * factor) * np.arange(axis.size))
    if not coords:
        return np.zeros(n_points), np.zeros(n_points)
    if len(coords) == 1:
        return coords[0], np.zeros(n_points)
    yy, xx = np.meshgrid(coords[0], coords[1], indexing="ij")
    return xx.ravel(), yy.ravel()


def _write_tilt_series(sources: Sequence[Source], out: Path, angles: str | Path | np.ndarray | None,
                       options: dict[str, Any]) -> Path:
    from stemlive.live.storage.session import SessionWriter
    from stemlive.live.wire.protocol import Message

    stacks, stack_axes = [], []
    for s in sources:
        signal = [i for i, r in enumerate(s.roles) if r == "signal"]
        other = [i for i in range(s.data.ndim) if i not in signal]
        data = np.transpose(s.data, other + signal)
        stacks.append(data.reshape(-1, *data.shape[-2:]))
        stack_axes.append(s.axes[other[0]] if len(other) == 1 else None)
    if len({st.shape[1:] for st in stacks}) != 1:
        raise ImportInputError(f"{sources[0].name}: the images differ in size")
    images = np.concatenate(stacks)
    n = len(images)
    source = sources[0]
    ax = source.axes[[i for i, r in enumerate(source.roles) if r == "signal"][-1]]
    pixel = options.get("pixel_size_nm")
    if pixel is None:
        pixel = _clean(ax.scale * _factor(ax.units, LENGTH_UNITS, "image", source, "--set pixel_size_nm=..."))
    if not float(pixel) > 0:
        raise ImportInputError(f"{source.name}: pixel size {pixel} nm is not positive (give --set pixel_size_nm=...)")
    dwell = options.get("dwell_us", next((s.dwell_us for s in sources if s.dwell_us), None))
    dwell_us = float(dwell) if dwell is not None else math.nan
    if not dwell_us > 0:  # the drift correction times every scan line with it
        raise ImportInputError(f"{source.name}: no pixel dwell time in the metadata; give --set dwell_us=...")
    table = _tilt_angles(sources, stacks, stack_axes, angles, n)
    start = _start("tilt_series", options, sources, {})
    t0, session = float(start["t"]), start["session"]
    ny, nx = images.shape[1:]
    dt = dwell_us * 1e-6 * ny * nx
    new_tilt = np.r_[True, np.any(np.diff(table, axis=0) != 0, axis=1)]
    tilt_index = np.cumsum(new_tilt) - 1
    starts = np.flatnonzero(new_tilt)
    frame_index = np.arange(n) - starts[tilt_index]
    with SessionWriter(out, Message(start), commit_interval_s=3600.0) as writer:
        for i in range(n):
            image = np.ascontiguousarray(np.asarray(images[i]), dtype="<f4")
            writer.append(Message({
                "proto": "stemlive/1", "type": "frame", "session": session, "seq": i + 1, "t": t0 + dt * (i + 1),
                "tilt_index": int(tilt_index[i]), "frame_index": int(frame_index[i]),
                "alpha_deg": float(table[i, 0]), "beta_deg": float(table[i, 1]),
                "pixel_size_nm": float(pixel), "dwell_us": dwell_us, "dtype": "<f4", "shape": [ny, nx],
            }, image))
        writer.append(Message({"proto": "stemlive/1", "type": "session_end", "session": session, "seq": n + 1,
                               "t": t0 + dt * (n + 1), "status": "complete", "messages": n + 2}))
    return out


def _tilt_angles(sources: Sequence[Source], stacks: Sequence[np.ndarray], stack_axes: Sequence[Axis | None],
                 angles: str | Path | np.ndarray | None, n: int) -> np.ndarray:
    """(alpha, beta) per image: given > a stack axis in angle units > the stage angles of single images."""
    if angles is not None:
        if isinstance(angles, str | Path):
            return load_angles(angles, n)
        table = np.asarray(angles, float)
        table = np.column_stack([table, np.zeros(len(table))]) if table.ndim == 1 else table
        if table.shape != (n, 2):
            raise ImportInputError(f"{len(table)} angles for {n} images")
        return table
    rows: list[np.ndarray] = []
    for s, stack, axis in zip(sources, stacks, stack_axes, strict=True):
        if axis is not None and axis.units.strip().lower() in ANGLE_UNITS:
            f = ANGLE_UNITS[axis.units.strip().lower()]
            alpha = (axis.offset + axis.scale * np.arange(axis.size)) * f
            rows.append(np.column_stack([alpha, np.zeros(axis.size)]))
        elif s.angles_deg is not None and len(stack) == 1:
            rows.append(np.array([s.angles_deg], float))
        else:
            raise ImportInputError(f"{s.name}: no tilt angles (a stack axis in degrees or the stage tilt of each "
                                   "image); give them with --angles CSV (columns alpha, beta in degrees)")
    return np.concatenate(rows)


# ------------------------------------------------------------------------------------------------ public API


def import_files(paths: Sequence[str | Path], out: str | Path, *, kind: str | None = None,
                 angles: str | Path | np.ndarray | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """Write the v1 session file ``out`` from data files (see the module docstring); returns ``out``."""
    sources = [s for p in paths for s in read_file(p)]
    if len(sources) > 1 and len(paths) == 1:  # a file with several data sets: take the first that fits
        sources = sources[:1]
    return to_session(sources, out, kind=kind, angles=angles, settings=settings)


def import_signal(signal: Any, out: str | Path, *, kind: str | None = None,
                  angles: str | Path | np.ndarray | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """Write a session file from a HyperSpy signal: an (eXSpy) EELS spectrum, line, map or spectrum-image
    sequence in eV or meV, or an image stack (with ``angles``, or a stack axis in degrees)."""
    return to_session([from_signal(signal)], out, kind=kind, angles=angles, settings=settings)


def import_arrays(
    data: np.ndarray,
    out: str | Path,
    *,
    kind: str,
    dispersion_meV: float | None = None,
    energy_offset_meV: float = 0.0,
    step_nm: float = 1.0,
    pixel_size_nm: float | None = None,
    angles: np.ndarray | str | Path | None = None,
    frames_axis: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write a session file from a numpy array.

    Parameters
    ----------
    data
        EELS: ``([frames,] points, channels)`` for a line, ``([frames,] ny, nx, channels)`` for a map (set
        ``frames_axis`` when the first axis is frames). Tilt series: ``(n_images, ny, nx)``.
    kind
        ``eels_line_scan``, ``eels_map`` or ``tilt_series``.
    dispersion_meV, energy_offset_meV
        The energy axis: channel j is at ``energy_offset_meV + j * dispersion_meV``.
    step_nm
        Distance between scan positions.
    pixel_size_nm, angles
        Tilt series: pixel size and (alpha, beta) or alpha per image in degrees.
    settings
        As for :func:`to_session` (e.g. ``exposure_ms``, ``dwell_us``).
    """
    data = np.asarray(data)
    if kind not in KIND_CHOICES:
        raise ImportInputError(f"kind {kind!r} is not one of {', '.join(KIND_CHOICES)}")
    options = dict(settings or {})
    if kind == "tilt_series":
        if data.ndim != 3:
            raise ImportInputError(f"a tilt series is (n_images, ny, nx), got shape {data.shape}")
        if pixel_size_nm is None:
            raise ImportInputError("a tilt series needs pixel_size_nm")
        axes = [Axis(data.shape[0], name="image"), Axis(data.shape[1], pixel_size_nm, 0.0, "nm"),
                Axis(data.shape[2], pixel_size_nm, 0.0, "nm")]
        roles = ["sequence", "signal", "signal"]
    else:
        if dispersion_meV is None:
            raise ImportInputError("EELS data needs dispersion_meV")
        nav = 2 if kind == "eels_map" else 1
        if data.ndim != nav + 1 + int(frames_axis):
            raise ImportInputError(f"{kind} data of shape {data.shape}: expected "
                                   f"{'[frames,] ' if frames_axis else ''}{'ny, nx' if nav == 2 else 'points'}, "
                                   "channels")
        axes = ([Axis(data.shape[0], name="frame")] if frames_axis else [])
        axes += [Axis(size, step_nm, 0.0, "nm") for size in data.shape[int(frames_axis):-1]]
        axes.append(Axis(data.shape[-1], dispersion_meV, energy_offset_meV, "meV"))
        roles = ["sequence"] * int(frames_axis) + ["navigation"] * nav + ["signal"]
    source = Source(data=data, axes=axes, roles=roles, name="<array>", reader="numpy")
    return to_session([source], out, kind=kind, angles=angles, settings=options)


# ------------------------------------------------------------------------------------------------ command line


def add_subcommand(subparsers: Any) -> None:
    """Register ``stemlive import``."""
    p = subparsers.add_parser(
        "import", help="write a session file from Nion Swift, HyperSpy, DigitalMicrograph, EMD... data",
        description="Write a v1 session file from Nion Swift data items (.ndata, .h5) or any file RosettaSciIO reads "
                    "(.hspy, .zspy, .dm3, .dm4, .emd, ...): EELS spectra, lines, maps and spectrum-image sequences "
                    "(energies to meV, positions to nm), or image stacks as tilt series.",
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="data files (several: more frames or images)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="SESSION.h5", help="session file to write")
    p.add_argument("--kind", choices=KIND_CHOICES, help="session kind (default: from the data)")
    p.add_argument("--angles", type=Path, metavar="CSV",
                   help="tilt series: alpha[, beta] in degrees, one row per image")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="calibration or setting, e.g. --set exposure_ms=300 --set pixel_size_nm=0.05 (repeatable; "
                        f"calibrations: {', '.join(CALIBRATION_KEYS)}; values parse as JSON where they can)")
    p.set_defaults(func=cmd_import)


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values parse as JSON where they can, else stay text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {item!r}: expected KEY=VALUE", ExitCode.USAGE)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def cmd_import(args: Any) -> int:
    """Run ``stemlive import``."""
    settings = parse_settings(args.overrides)
    if args.out.exists():
        raise CLIError(f"{args.out} exists; refusing to overwrite a session file", ExitCode.USAGE)
    try:
        out = import_files(args.files, args.out, kind=args.kind, angles=args.angles, settings=settings)
    except BaseException as e:
        if args.out.exists():  # nothing half-written stays behind (the file did not exist before: checked above)
            args.out.unlink()
        if isinstance(e, ImportInputError):
            raise CLIError(str(e), ExitCode.BAD_INPUT) from None
        raise
    from stemlive.live.storage.session_reader import SessionReader

    with SessionReader(out) as r:
        what = f"{r.n_frames} frames" if r.kind == "tilt_series" else f"{r.n_spectra} spectra"
        print(f"imported {len(args.files)} file(s) -> {out} ({r.kind}, {what})")
    return 0
