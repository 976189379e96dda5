"""Session files: one HDF5 file per acquisition session (format ``stemlive-session`` v1).

:class:`SessionWriter` records the wire messages of one session (frames, spectra, surveys) and the pipeline's
results; :class:`SessionReader` reads a file back, trimmed to its complete rows, and reconstructs the wire
sequence for replay; :func:`describe` is the text of ``stemlive info``. The format is specified in
``docs/session-format.md``.

Crash safety
------------
The file is a plain HDF5 file (default library version, no SWMR). Rows are appended to chunked datasets and
the file is flushed at *commit points*; after each flush the writer records the number of complete rows in the
attribute ``committed_rows`` of ``/tilt_series`` and ``/eels`` and flushes again. When :meth:`SessionWriter.commit`
returns, everything appended before it survives a kill of the writing process (SIGKILL, crash; not a power
loss, the writer does not fsync). The writer commits by itself in :meth:`SessionWriter.append` once
``commit_interval_s`` has passed since the last commit (and every ``commit_every`` messages if given), so a
crash loses at most the messages appended since the last commit. A reader of a file whose ``status`` is still
``"recording"`` uses ``committed_rows`` (and stops at the first row whose ``t`` is NaN) to find the complete
rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import h5py
import numpy as np

from .problems import describe_lines as _problem_lines
from .protocol import json_default

log = logging.getLogger(__name__)

FORMAT = "stemlive-session"
FORMAT_VERSION = 1
KINDS = frozenset({"tilt_series", "eels_line_scan", "eels_map"})
FINAL_STATUSES = frozenset({"complete", "aborted", "failed"})
STATUSES = FINAL_STATUSES | {"recording"}
SURVEYS = ("before", "after")

#: Per-frame columns of ``/tilt_series`` in write order (``t`` last: a row with a finite ``t`` was written whole).
FRAME_COLUMNS: dict[str, str] = {
    "tilt_index": "<i4",
    "frame_index": "<i4",
    "alpha_deg": "<f8",
    "beta_deg": "<f8",
    "seq": "<i8",
    "t": "<f8",
}
#: Per-spectrum columns of ``/eels`` in write order (``t`` last).
SPECTRUM_COLUMNS: dict[str, str] = {
    "point_index": "<i4",
    "frame_index": "<i4",
    "x_nm": "<f8",
    "y_nm": "<f8",
    "energy_offset_meV": "<f8",
    "seq": "<i8",
    "t": "<f8",
}
#: ``/eels`` attributes taken from the first spectrum message.
SPECTRUM_ATTRS = ("dispersion_meV", "exposure_ms")
#: ``/tilt_series`` attributes taken from the first frame message.
FRAME_ATTRS = ("pixel_size_nm", "dwell_us")

COMMITTED = "committed_rows"
_TEXT_ATTR_LIMIT = 32 * 1024  # longer JSON texts go to a root dataset (HDF5 compact attributes max out at 64 KiB)
_TARGET_CHUNK_BYTES = 1 << 20
_SPECTRUM_BLOCK_BYTES = 4 << 20


class SessionFormatError(ValueError):
    """The file is not a stemlive session file, or one of a format version this reader does not support."""


class MessageLike(Protocol):
    """What the writer needs of a :class:`stemlive.live.protocol.Message`."""

    @property
    def header(self) -> Mapping[str, Any]: ...

    @property
    def payload(self) -> np.ndarray | None: ...


class ResultLike(Protocol):
    """What the writer needs of a :class:`stemlive.live.pipeline.Result`."""

    @property
    def stage(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> np.ndarray: ...

    @property
    def index(self) -> int | None: ...

    @property
    def attrs(self) -> Mapping[str, Any]: ...


# ------------------------------------------------------------------------------------------------------------
# small helpers


def _iso(t: float) -> str:
    """ISO 8601 (UTC, with offset) of a Unix time."""
    return datetime.fromtimestamp(t, UTC).isoformat()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default, allow_nan=True)


def _fill(dtype: str | np.dtype) -> Any:
    """Fill value of a per-row column: NaN for floats, -1 for integers."""
    return np.nan if np.dtype(dtype).kind == "f" else -1


def _put_text(f: h5py.File, name: str, text: str) -> None:
    """Store a JSON text as a root attribute, or as a root string dataset when it is too long for one."""
    if len(text.encode()) <= _TEXT_ATTR_LIMIT:
        f.attrs[name] = text
    else:
        f.create_dataset(name, data=text, dtype=h5py.string_dtype())


def _get_text(f: h5py.File, name: str) -> str | None:
    if name in f.attrs:
        return _as_str(f.attrs[name])
    if name in f and isinstance(f[name], h5py.Dataset):
        return _as_str(f[name][()])
    return None


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr_value(value: Any) -> Any:
    """A result attribute as stored: scalars and strings as they are, anything else as a JSON string."""
    if isinstance(value, str | bytes | bool | int | float | np.number | np.bool_):
        return value
    return _dumps(value)


def _h5_value(value: np.ndarray) -> np.ndarray:
    """``value`` with numpy unicode (``U``) data, also inside structured dtypes, turned into HDF5 strings."""
    if value.dtype.kind == "U":
        return value.astype(h5py.string_dtype())
    if value.dtype.names and any(value.dtype[n].kind == "U" for n in value.dtype.names):
        fields = [(n, h5py.string_dtype() if value.dtype[n].kind == "U" else value.dtype[n]) for n in value.dtype.names]
        out = np.empty(value.shape, dtype=fields)
        for n in value.dtype.names:
            out[n] = value[n].astype(object) if value.dtype[n].kind == "U" else value[n]
        return out
    return value


def _check_name(text: str, what: str) -> str:
    """A result stage or name: ``/``-separated non-empty segments, none of them ``.`` or ``..``."""
    if not isinstance(text, str) or any(part in {"", ".", ".."} for part in text.split("/")):
        raise ValueError(f"invalid result {what} {text!r}: needs non-empty '/'-separated names, no '.' or '..'")
    return text


# ------------------------------------------------------------------------------------------------------------
# writer: per-row tables


class _Columns:
    """The 1-D per-row datasets of one group, with values buffered until the next block write."""

    def __init__(self, group: h5py.Group, columns: Mapping[str, str], chunk_rows: int) -> None:
        self.group = group
        self.columns = dict(columns)
        self.fills = {name: _fill(dtype) for name, dtype in columns.items()}
        self._fill_items = tuple(self.fills.items())
        self.pending: list[tuple[Any, ...]] = []  # one tuple per row, in column order
        self.datasets = {
            name: group.create_dataset(
                name, shape=(0,), dtype=dtype, maxshape=(None,), chunks=(chunk_rows,), fillvalue=self.fills[name]
            )
            for name, dtype in columns.items()
        }
        self.n_written = 0
        self.n_committed = 0
        group.attrs[COMMITTED] = 0

    @property
    def n_pending(self) -> int:
        return len(self.pending)

    def add(self, values: Mapping[str, Any]) -> None:
        """Buffer one row (missing fields get the fill value)."""
        get = values.get
        self.pending.append(tuple([get(name, fill) for name, fill in self._fill_items]))

    def add_many(self, values: Mapping[str, Sequence[Any]]) -> None:
        """Buffer several rows given as equally long sequences."""
        self.pending.extend(zip(*(values[name] for name in self.columns), strict=True))

    def write(self) -> None:
        """Append the buffered rows to the datasets (``t`` last)."""
        k = self.n_pending
        if not k:
            return
        start, stop = self.n_written, self.n_written + k
        for (name, dtype), values in zip(self.columns.items(), zip(*self.pending, strict=True), strict=True):
            ds = self.datasets[name]
            ds.resize((stop,))
            ds[start:stop] = np.asarray(values, dtype=dtype)
        self.pending.clear()
        self.n_written = stop

    def mark_committed(self) -> None:
        if self.n_committed != self.n_written:
            self.group.attrs[COMMITTED] = self.n_written
            self.n_committed = self.n_written


def _header_fields(header: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: header[name] for name in names if name in header and header[name] is not None}


class _FrameStore:
    """``/tilt_series``: each frame goes straight to disk as one chunk; its metadata row is buffered."""

    def __init__(self, f: h5py.File) -> None:
        self.f = f
        self.frames: h5py.Dataset | None = None
        self.columns: _Columns | None = None
        self.shape: tuple[int, ...] = ()
        self.n = 0

    def _create(self, shape: tuple[int, ...], header: Mapping[str, Any]) -> None:
        group = self.f.require_group("tilt_series")
        ny, nx = shape
        self.frames = group.create_dataset(
            "frames", shape=(0, ny, nx), dtype="<f4", maxshape=(None, ny, nx), chunks=(1, ny, nx), rdcc_nbytes=0
        )
        self.frames.attrs.update(_header_fields(header, FRAME_ATTRS))
        group.attrs.update(_header_fields(header, FRAME_ATTRS))
        self.columns = _Columns(group, FRAME_COLUMNS, chunk_rows=1024)
        self.shape = (ny, nx)

    def append(self, payload: np.ndarray, header: Mapping[str, Any]) -> None:
        image = np.ascontiguousarray(payload, dtype="<f4")
        if image.ndim != 2:
            raise ValueError(f"frame payload must be a 2-D image, got shape {image.shape}")
        if self.frames is None:
            self._create(image.shape, header)
        assert self.frames is not None and self.columns is not None
        if image.shape != self.shape:
            raise ValueError(f"frame shape {image.shape} differs from the session's {self.shape}")
        # low-level extent + one whole chunk past the chunk cache (Dataset.resize re-checks its arguments: ~40 us)
        self.frames.id.set_extent((self.n + 1, *self.shape))
        self.frames.id.write_direct_chunk((self.n, 0, 0), image)
        self.n += 1
        self.columns.add(header)

    def write(self) -> None:
        if self.columns is not None:
            self.columns.write()

    def mark_committed(self) -> None:
        if self.columns is not None:
            self.columns.mark_committed()


class _SpectrumStore:
    """``/eels``: spectra and their metadata buffered in memory and written in blocks of whole chunks."""

    def __init__(self, f: h5py.File, settings: Mapping[str, Any]) -> None:
        self.f = f
        self.settings = settings
        self.spectra: h5py.Dataset | None = None
        self.columns: _Columns | None = None
        self.buffer = np.empty((0, 0), dtype="<f4")
        self.n_channels = 0
        self.n_buffered = 0

    @property
    def n(self) -> int:
        """Spectra appended so far (written or buffered)."""
        return 0 if self.columns is None else self.columns.n_written + self.n_buffered

    def _create(self, n_channels: int, header: Mapping[str, Any]) -> None:
        group = self.f.require_group("eels")
        row_bytes = 4 * n_channels
        chunk_rows = int(min(256, max(16, _TARGET_CHUNK_BYTES // row_bytes)))
        self.spectra = group.create_dataset(
            "spectra",
            shape=(0, n_channels),
            dtype="<f4",
            maxshape=(None, n_channels),
            chunks=(chunk_rows, n_channels),
            rdcc_nbytes=4 * chunk_rows * row_bytes,
            rdcc_w0=1.0,
        )
        attrs = _header_fields(header, SPECTRUM_ATTRS)
        scan_shape = self.settings.get("scan_shape")
        if scan_shape is not None:
            attrs["scan_shape"] = np.asarray(scan_shape, dtype="<i8")
        group.attrs.update(attrs)
        self.spectra.attrs.update(attrs)
        self.columns = _Columns(group, SPECTRUM_COLUMNS, chunk_rows=max(1024, chunk_rows))
        block_rows = max(chunk_rows, (_SPECTRUM_BLOCK_BYTES // (chunk_rows * row_bytes)) * chunk_rows)
        self.buffer = np.empty((block_rows, n_channels), dtype="<f4")
        self.n_channels = n_channels

    def append(self, payload: np.ndarray, header: Mapping[str, Any]) -> None:
        if payload.ndim not in (1, 2):
            raise ValueError(f"spectrum payload must be 1-D or 2-D (a batch), got shape {payload.shape}")
        if self.columns is None:
            self._create(payload.shape[-1], header)
        assert self.columns is not None
        if payload.shape[-1] != self.n_channels:
            raise ValueError(f"spectrum has {payload.shape[-1]} channels, the session {self.n_channels}")
        if payload.ndim == 1:
            self.buffer[self.n_buffered] = payload
            self.columns.add(header)
            self.n_buffered += 1
            if self.n_buffered == len(self.buffer):
                self.write()
        else:
            values = {name: _per_row(header, name, fill, len(payload)) for name, fill in self.columns.fills.items()}
            self._buffer_many(payload, values)

    def _buffer_many(self, rows: np.ndarray, values: Mapping[str, Sequence[Any]]) -> None:
        assert self.columns is not None
        done = 0
        while done < len(rows):
            k = min(len(rows) - done, len(self.buffer) - self.n_buffered)
            self.buffer[self.n_buffered : self.n_buffered + k] = rows[done : done + k]
            self.columns.add_many({name: v[done : done + k] for name, v in values.items()})
            self.n_buffered += k
            done += k
            if self.n_buffered == len(self.buffer):
                self.write()

    def write(self) -> None:
        """Write the buffered block: spectra first, then the columns (``t`` last)."""
        if self.spectra is None or self.columns is None or not self.n_buffered:
            return
        start = self.columns.n_written
        stop = start + self.n_buffered
        self.spectra.resize(stop, axis=0)
        self.spectra[start:stop] = self.buffer[: self.n_buffered]
        self.columns.write()
        self.n_buffered = 0

    def mark_committed(self) -> None:
        if self.columns is not None:
            self.columns.mark_committed()


def _per_row(header: Mapping[str, Any], name: str, fill: Any, k: int) -> Sequence[Any]:
    """A batch field: a list of length ``k``, or a scalar (repeated); ``seq`` is the message's seq for all rows."""
    value = header.get(name, fill)
    if isinstance(value, list | tuple | np.ndarray):
        if len(value) != k:
            raise ValueError(f"spectrum batch of {k} has {len(value)} values of {name!r}")
        return list(value)
    return [value] * k


# ------------------------------------------------------------------------------------------------------------
# writer


class SessionWriter:
    """Write one session file.

    Parameters
    ----------
    path
        File to create; an existing file is never overwritten (:class:`FileExistsError`).
    start
        The ``session_start`` message: ``session``, ``t``, ``kind`` and ``settings`` are recorded.
    commit_interval_s
        :meth:`append` commits when this much time has passed since the last commit, bounding what a crash of
        the writing process can lose to the messages of that window.
    commit_every
        If given, :meth:`append` also commits after this many appended messages.

    Notes
    -----
    Not thread-safe: use one thread, or a lock. Use as a context manager: leaving the block closes the file as
    ``"complete"``, or as ``"failed"`` when an exception escapes the block (the exception propagates).
    """

    def __init__(
        self,
        path: str | Path,
        start: MessageLike,
        *,
        commit_interval_s: float = 0.2,
        commit_every: int | None = None,
    ) -> None:
        header = dict(start.header)
        _check_start(header)
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; refusing to overwrite a session file")
        self.session_id = str(header["session"])
        self.kind = str(header["kind"])
        self.settings: dict[str, Any] = dict(header.get("settings") or {})
        self.commit_interval_s = float(commit_interval_s)
        self.commit_every = commit_every
        self.message_counts: dict[str, int] = {"session_start": 1}
        self._f = h5py.File(self.path, "x")
        self._write_root(header)
        self._frames = _FrameStore(self._f)
        self._spectra = _SpectrumStore(self._f, self.settings)
        self._surveys_done: list[str] = []
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self.status = "recording"
        self.commit()

    def _write_root(self, header: Mapping[str, Any]) -> None:
        attrs = self._f.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = np.int64(FORMAT_VERSION)
        attrs["session_id"] = self.session_id
        attrs["kind"] = self.kind
        attrs["created"] = _iso(float(header["t"]))
        attrs["status"] = "recording"
        _put_text(self._f, "settings", _dumps(self.settings))
        _put_text(self._f, "session_start", _dumps(header))

    # --- properties ---
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self.status != "recording"

    @property
    def n_frames(self) -> int:
        return self._frames.n

    @property
    def n_spectra(self) -> int:
        return self._spectra.n

    # --- appending ---
    def append(self, msg: MessageLike) -> None:
        """Record one message of the session.

        ``frame`` -> ``/tilt_series``; ``spectrum`` (one 1-D spectrum, or a 2-D batch with list-valued
        per-spectrum fields) -> ``/eels``; ``survey`` -> ``/survey/before|after``; ``session_end`` is kept for
        replay (close the writer with :meth:`close`); ``heartbeat`` and ``result`` are only counted.

        Raises
        ------
        ValueError
            For a message of another session, an unknown type, a payload of the wrong shape.
        """
        self._check_open()
        header = msg.header
        mtype = str(header.get("type"))
        if header.get("session") != self.session_id:
            raise ValueError(f"message of session {header.get('session')!r} in session {self.session_id!r}")
        if mtype in {"frame", "spectrum", "survey"}:
            if msg.payload is None:
                raise ValueError(f"{mtype} message without payload (seq {header.get('seq')})")
            payload = np.asarray(msg.payload)
            if mtype == "frame":
                self._frames.append(payload, header)
            elif mtype == "spectrum":
                self._spectra.append(payload, header)
            else:
                self._append_survey(payload, header)
        elif mtype == "session_end":
            _put_text(self._f, "session_end", _dumps(dict(header)))
        elif mtype not in {"heartbeat", "result"}:
            raise ValueError(f"cannot record a message of type {mtype!r}")
        self.message_counts[mtype] = self.message_counts.get(mtype, 0) + 1
        self._since_commit += 1
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        due = time.monotonic() - self._last_commit >= self.commit_interval_s
        if due or (self.commit_every is not None and self._since_commit >= self.commit_every):
            self.commit()

    def _append_survey(self, payload: np.ndarray, header: Mapping[str, Any]) -> None:
        which = str(header.get("which") or ("before" if "before" not in self._surveys_done else "after"))
        if which not in SURVEYS:
            raise ValueError(f"survey 'which' must be one of {SURVEYS}, not {which!r}")
        if which in self._surveys_done:
            log.warning("session %s: second %r survey (seq %s) ignored", self.session_id, which, header.get("seq"))
            return
        image = np.ascontiguousarray(payload, dtype="<f4")
        ds = self._f.require_group("survey").create_dataset(which, data=image)
        ds.attrs.update(_header_fields(header, ("t", "seq", "pixel_size_nm")))
        ds.attrs["header"] = _dumps(dict(header))
        self._surveys_done.append(which)

    # --- results ---
    def write_result(self, result: ResultLike) -> None:
        """Store a pipeline result in ``/results/<stage>/<name>``.

        ``index is None`` (re)creates the dataset from ``value`` (a numeric or structured array); an integer
        ``index`` writes row ``index`` of a dataset growing along axis 0 (rows not yet written hold NaN for
        floats, 0 otherwise). ``attrs`` become dataset attributes; values that are not scalars or strings are
        stored as JSON strings. Durable at the next commit.
        """
        self._check_open()
        group = self._f.require_group("results").require_group(_check_name(result.stage, "stage"))
        name = _check_name(result.name, "name")
        value = _h5_value(np.asarray(result.value))
        if result.index is None:
            if name in group:
                del group[name]
            ds = group.create_dataset(name, data=value)
        else:
            ds = _result_row(group, name, value, int(result.index))
        for key, attr in result.attrs.items():
            ds.attrs[key] = _attr_value(attr)

    # --- commit / close ---
    def commit(self) -> None:
        """Write all buffered data and flush: everything appended so far survives a crash of this process."""
        self._check_open()
        self._frames.write()
        self._spectra.write()
        self._f.flush()
        self._frames.mark_committed()
        self._spectra.mark_committed()
        if "survey" in self._f:
            self._f["survey"].attrs["committed"] = _dumps(self._surveys_done)
        self._f.flush()
        self._since_commit = 0
        self._last_commit = time.monotonic()

    def close(
        self,
        status: str = "complete",
        *,
        gaps: Sequence[Sequence[int]] = (),
        message: str = "",
    ) -> None:
        """Commit, record the final ``status`` and close the file. Idempotent: later calls do nothing.

        Parameters
        ----------
        status
            ``"complete"``, ``"aborted"`` or ``"failed"``.
        gaps
            ``seq`` ranges ``(first, last)`` missing on the wire (stored as JSON in the attribute ``gaps``).
        message
            A note for the reader of the file (attribute ``message``).
        """
        if self.closed:
            return
        if status not in FINAL_STATUSES:
            raise ValueError(f"close status must be one of {sorted(FINAL_STATUSES)}, not {status!r}")
        try:
            self.commit()
            attrs = self._f.attrs
            attrs["closed"] = datetime.now(UTC).isoformat()
            attrs["message"] = str(message)
            attrs["gaps"] = _dumps([[int(a) for a in gap] for gap in gaps])
            attrs["n_messages"] = np.int64(sum(self.message_counts.values()))
            attrs["message_counts"] = _dumps(self.message_counts)
            attrs["n_frames"] = np.int64(self.n_frames)
            attrs["n_spectra"] = np.int64(self.n_spectra)
            attrs["status"] = status
            self._f.flush()
        finally:
            self.status = status
            self._f.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"session file {self.path} is closed ({self.status})")

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close("complete")
        else:
            self.close("failed", message=f"{type(exc).__name__}: {exc}")


def _check_start(header: Mapping[str, Any]) -> None:
    if header.get("type") != "session_start":
        raise ValueError(f"a session file starts with a session_start message, not {header.get('type')!r}")
    if header.get("kind") not in KINDS:
        raise ValueError(f"unknown session kind {header.get('kind')!r}; expected one of {sorted(KINDS)}")
    for key in ("session", "t"):
        if header.get(key) is None:
            raise ValueError(f"session_start without {key!r}")


def _result_row(group: h5py.Group, name: str, value: np.ndarray, index: int) -> h5py.Dataset:
    """Write row ``index`` of the growing dataset ``group[name]``, creating or extending it as needed."""
    if index < 0:
        raise ValueError(f"result row index must be >= 0, got {index}")
    if name not in group:
        row_bytes = max(1, value.nbytes)
        chunk_rows = int(max(1, min(1024, _TARGET_CHUNK_BYTES // row_bytes)))
        fill = np.nan if value.dtype.kind in "fc" else None
        ds = group.create_dataset(
            name,
            shape=(index + 1, *value.shape),
            dtype=value.dtype,
            maxshape=(None, *value.shape),
            chunks=(chunk_rows, *value.shape) if value.shape else (chunk_rows,),
            fillvalue=fill,
        )
    else:
        ds = group[name]
        if ds.maxshape[0] is not None or ds.shape[1:] != value.shape:
            raise ValueError(
                f"result {group.name}/{name}: cannot write a row of shape {value.shape} into a dataset of shape "
                f"{ds.shape} (maxshape {ds.maxshape})"
            )
        if index >= ds.shape[0]:
            ds.resize(index + 1, axis=0)
    ds[index] = value
    return ds


# ------------------------------------------------------------------------------------------------------------
# reader


def check_format(f: h5py.File) -> int:
    """Check that an open HDF5 file is a stemlive session file this code can read; return its format version.

    Raises
    ------
    SessionFormatError
        ``"not a stemlive session file"`` or ``"format_version N is newer than this reader supports"``.
    """
    fmt = f.attrs.get("format")
    if fmt is None or _as_str(fmt) != FORMAT:
        raise SessionFormatError(f"{f.filename}: not a stemlive session file (no format={FORMAT!r} attribute)")
    try:
        version = int(f.attrs["format_version"])
    except (KeyError, TypeError, ValueError) as e:
        raise SessionFormatError(f"{f.filename}: stemlive session file without a valid format_version") from e
    if version > FORMAT_VERSION:
        raise SessionFormatError(
            f"{f.filename}: format_version {version} is newer than this reader supports ({FORMAT_VERSION}); "
            "update stemlive"
        )
    if version < 1:
        raise SessionFormatError(f"{f.filename}: invalid format_version {version}")
    return version


def validate(path: str | Path) -> int:
    """Open ``path`` and :func:`check_format` it; returns the format version.

    Raises
    ------
    SessionFormatError
        For HDF5 files that are not stemlive session files (or too new), and for files that are not HDF5.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise SessionFormatError(f"{path}: not a stemlive session file (not an HDF5 file)")
    with h5py.File(path, "r") as f:
        return check_format(f)


class Rows:
    """Read-only view of the first ``n`` rows of a dataset: the complete rows of a frames/spectra dataset.

    Supports ``len``, ``shape``, ``dtype``, ``np.asarray(view)`` and indexing along the first axis with an
    integer, a slice or a sequence of integers (further axes as h5py allows). Reads happen on indexing.
    """

    def __init__(self, dataset: h5py.Dataset | np.ndarray, n: int) -> None:
        self.dataset = dataset
        self.n = n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.dataset.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.n

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.dataset[: self.n]
        return data if dtype is None else data.astype(dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.n):
            yield self.dataset[i]

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, int | np.integer):
            i = int(first) + self.n if first < 0 else int(first)
            if not 0 <= i < self.n:
                raise IndexError(f"row {first} out of range for {self.n} rows")
            return self.dataset[(i, *rest)]
        if isinstance(first, slice):
            start, stop, step = first.indices(self.n)
            if step > 0:
                return self.dataset[(slice(start, max(start, stop), step), *rest)]
            return self[(np.arange(start, stop, step), *rest)]
        index = np.asarray(first)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + self.n, index)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"row index out of range for {self.n} rows")
        unique, inverse = np.unique(index, return_inverse=True)
        return self.dataset[(unique, *rest)][inverse]

    def __repr__(self) -> str:
        return f"<Rows {self.shape} {self.dtype} of {getattr(self.dataset, 'name', 'nothing')}>"


class SessionReader:
    """Read a session file, trimmed to its complete rows. Use as a context manager (or call :meth:`close`).

    Opens the file with plain ``h5py.File(path, "r")``. A file whose ``status`` is still ``"recording"``
    (its writer was killed, or is still running) is read up to its last committed row. To look at a file
    that a live writer in another process holds open, pass ``locking=False`` (HDF5 file locking otherwise
    refuses the second open); such a view is a snapshot of the last commit before opening.

    Parameters
    ----------
    path
        The session file.
    locking
        Passed to :class:`h5py.File` when given.

    Raises
    ------
    SessionFormatError
        If the file is not a stemlive session file or is of a newer format version.
    """

    def __init__(self, path: str | Path, *, locking: bool | None = None) -> None:
        self.path = Path(path)
        self._f = h5py.File(self.path, "r") if locking is None else h5py.File(self.path, "r", locking=locking)
        try:
            self.format_version = check_format(self._f)
        except BaseException:
            self._f.close()
            raise
        attrs = self._f.attrs
        self.kind = _as_str(attrs.get("kind", ""))
        self.status = _as_str(attrs.get("status", "recording"))
        self.session_id = _as_str(attrs.get("session_id", ""))
        self.created = _as_str(attrs.get("created", ""))
        self.settings: dict[str, Any] = json.loads(_get_text(self._f, "settings") or "{}")
        self.start_header: dict[str, Any] = json.loads(_get_text(self._f, "session_start") or "{}")
        self.n_frames = self._complete_rows("tilt_series", "frames")
        self.n_spectra = self._complete_rows("eels", "spectra")

    # --- basics ---
    @property
    def closed(self) -> bool:
        """Whether the writer closed the file (``status`` is not ``"recording"``)."""
        return self.status != "recording"

    @property
    def file(self) -> h5py.File:
        """The open h5py file."""
        return self._f

    @property
    def closed_at(self) -> str | None:
        """ISO 8601 time the writer closed the file."""
        return _as_str(self._f.attrs["closed"]) if "closed" in self._f.attrs else None

    @property
    def message(self) -> str:
        return _as_str(self._f.attrs.get("message", ""))

    @property
    def gaps(self) -> list[list[int]]:
        """``seq`` ranges ``[first, last]`` that were missing on the wire."""
        return json.loads(_as_str(self._f.attrs.get("gaps", "[]")))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SessionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- rows ---
    def _complete_rows(self, group_name: str, data_name: str) -> int:
        if group_name not in self._f or data_name not in self._f[group_name]:
            return 0
        group = self._f[group_name]
        columns = FRAME_COLUMNS if group_name == "tilt_series" else SPECTRUM_COLUMNS
        lengths = [group[data_name].shape[0]] + [group[c].shape[0] for c in columns if c in group]
        n = min(lengths)
        if COMMITTED in group.attrs:
            n = min(n, int(group.attrs[COMMITTED]))
        elif not self.closed:
            n = 0  # not written by a committing writer and not closed: nothing is known to be complete
        if not self.closed and "t" in group and n:
            incomplete = ~np.isfinite(group["t"][:n])
            if incomplete.any():
                n = int(np.argmax(incomplete))
        return n

    def frames(self) -> Rows:
        """The complete frames, ``(n_frames, ny, nx)`` float32 (lazy: rows are read when indexed)."""
        return self._rows("tilt_series", "frames", self.n_frames)

    def spectra(self) -> Rows:
        """The complete spectra, ``(n_spectra, n_channels)`` float32 (lazy)."""
        return self._rows("eels", "spectra", self.n_spectra)

    def _rows(self, group_name: str, data_name: str, n: int) -> Rows:
        group = self._f.get(group_name)
        if group is None or data_name not in group:  # nothing recorded (yet): an empty view
            ndim = 3 if data_name == "frames" else 2
            return Rows(np.empty((0,) * ndim, dtype="<f4"), 0)
        return Rows(group[data_name], n)

    def frame_table(self) -> dict[str, np.ndarray]:
        """Per-frame columns (``tilt_index``, ``frame_index``, ``alpha_deg``, ``beta_deg``, ``seq``, ``t``)."""
        return self._table("tilt_series", FRAME_COLUMNS, self.n_frames)

    def spectrum_table(self) -> dict[str, np.ndarray]:
        """Per-spectrum columns (``point_index``, ``frame_index``, ``x_nm``, ``y_nm``, ``energy_offset_meV``,
        ``seq``, ``t``)."""
        return self._table("eels", SPECTRUM_COLUMNS, self.n_spectra)

    def _table(self, group_name: str, columns: Mapping[str, str], n: int) -> dict[str, np.ndarray]:
        group = self._f.get(group_name)
        return {
            c: (group[c][:n] if group is not None and c in group else np.empty(0, dtype=dtype))
            for c, dtype in columns.items()
        }

    def attrs(self, group_name: str) -> dict[str, Any]:
        """Attributes of ``/tilt_series`` or ``/eels`` (calibrations), ``{}`` if the group is absent."""
        group = self._f.get(group_name)
        return {} if group is None else dict(group.attrs)

    def survey(self, which: str) -> np.ndarray | None:
        """The ``"before"`` or ``"after"`` survey image, or ``None`` if there is none (or it was not committed)."""
        if which not in SURVEYS:
            raise ValueError(f"survey must be one of {SURVEYS}, not {which!r}")
        return None if which not in self._surveys() else self._f["survey"][which][()]

    def _surveys(self) -> list[str]:
        group = self._f.get("survey")
        if group is None:
            return []
        if self.closed:
            return [w for w in SURVEYS if w in group]
        committed = json.loads(_as_str(group.attrs.get("committed", "[]")))
        return [w for w in SURVEYS if w in group and w in committed]

    # --- results ---
    def result_names(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{stage: {name: shape}}`` of the stored results."""
        group = self._f.get("results")
        if group is None:
            return {}
        names: dict[str, dict[str, tuple[int, ...]]] = {}

        def visit(path: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and "/" in path:
                stage, name = path.split("/", 1)
                names.setdefault(stage, {})[name] = obj.shape

        group.visititems(visit)
        return names

    def results(self, stage: str) -> dict[str, np.ndarray]:
        """All result datasets of ``stage`` (``/results/<stage>/*``) read into arrays; ``{}`` if none."""
        group = self._f.get(f"results/{stage}")
        if group is None:
            return {}
        out: dict[str, np.ndarray] = {}
        group.visititems(
            lambda name, obj: out.update({name: _read_dataset(obj)}) if isinstance(obj, h5py.Dataset) else None
        )
        return out

    def result_attrs(self, stage: str, name: str) -> dict[str, Any]:
        """Attributes of ``/results/<stage>/<name>`` (non-scalar values are JSON strings as stored)."""
        return dict(self._f[f"results/{stage}/{name}"].attrs)

    # --- time ---
    @property
    def time_span(self) -> tuple[float, float] | None:
        """``(first, last)`` acquisition time ``t`` over the complete frames and spectra, or ``None``."""
        ts = [self.frame_table()["t"], self.spectrum_table()["t"]]
        t = np.concatenate(ts)
        t = t[np.isfinite(t)]
        return None if not t.size else (float(t.min()), float(t.max()))

    # --- replay ---
    @property
    def n_messages(self) -> int:
        """Number of messages :meth:`messages` yields."""
        return len(self._events()) + 1 + (1 if self.closed else 0)

    def _events(self) -> list[tuple[int, str, Any]]:
        """Data messages as ``(seq, type, where)`` sorted by ``seq``."""
        events: list[tuple[int, str, Any]] = []
        frame_seq = self.frame_table()["seq"]
        events += [(int(s), "frame", i) for i, s in enumerate(frame_seq)]
        spectrum_seq = self.spectrum_table()["seq"]
        if spectrum_seq.size:
            bounds = np.flatnonzero(np.diff(spectrum_seq) != 0) + 1
            starts = np.concatenate([[0], bounds])
            stops = np.concatenate([bounds, [spectrum_seq.size]])
            events += [(int(spectrum_seq[a]), "spectrum", (int(a), int(b))) for a, b in zip(starts, stops, strict=True)]
        for which in self._surveys():
            events.append((int(self._f["survey"][which].attrs.get("seq", -1)), "survey", which))
        events.sort(key=lambda e: e[0])
        return events

    def messages(self) -> Iterator[Any]:
        """The recorded wire sequence as :class:`~stemlive.live.protocol.Message` objects, ordered by ``seq``.

        ``session_start`` (the stored header), then the frames, spectra and surveys, and ``session_end`` if the
        file was closed (the stored one, or one made from the final status). Spectra are re-batched as they
        arrived: consecutive rows with the same ``seq`` form one message; a run of one row is a single-spectrum
        message (1-D payload, scalar fields), a longer run a batch (2-D payload, the per-spectrum fields
        :data:`~stemlive.live.protocol.BATCH_FIELDS`, ``t`` included, as lists). A batch of one spectrum is
        therefore replayed as a single spectrum. Payloads are float32 as stored. Heartbeats and results are
        not recorded and so not replayed.
        """
        from .protocol import Message

        proto = self.start_header.get("proto", "stemlive/1")
        yield Message(dict(self.start_header), None)
        last_seq = int(self.start_header.get("seq", 0))
        last_t = float(self.start_header.get("t", 0.0))
        spectra = _BlockReader(self._f["eels/spectra"]) if self.n_spectra else None
        frames = self._frame_messages(proto)
        for seq, kind, where in self._events():
            if kind == "frame":
                header, payload = frames(where)
            elif kind == "spectrum":
                assert spectra is not None
                header, payload = self._spectrum_message(proto, where, spectra)
            else:
                header, payload = self._survey_message(where)
            last_seq, last_t = max(last_seq, seq), _last_t(header, last_t)
            payload.flags.writeable = False
            yield Message(header, payload)
        if self.closed:
            yield Message(self._end_header(proto, last_seq, last_t), None)

    def _frame_messages(self, proto: str) -> Any:
        table = self.frame_table() if self.n_frames else {}
        group = self._f.get("tilt_series")
        calib = _header_fields(dict(group.attrs), FRAME_ATTRS) if group is not None else {}
        calib = {k: _py(v) for k, v in calib.items()}

        def message(i: int) -> tuple[dict[str, Any], np.ndarray]:
            image = self._f["tilt_series/frames"][i]
            header: dict[str, Any] = {"proto": proto, "type": "frame", "session": self.session_id}
            header.update({c: _py(table[c][i]) for c in FRAME_COLUMNS})
            header.update(calib)
            header.update({"dtype": image.dtype.str, "shape": list(image.shape)})
            return header, image

        return message

    def _spectrum_message(
        self, proto: str, rows: tuple[int, int], spectra: _BlockReader
    ) -> tuple[dict[str, Any], np.ndarray]:
        a, b = rows
        table = self._spectrum_table_cached()
        calib = {k: _py(v) for k, v in _header_fields(self.attrs("eels"), SPECTRUM_ATTRS).items()}
        header: dict[str, Any] = {"proto": proto, "type": "spectrum", "session": self.session_id}
        payload = spectra.rows(a, b)
        if b - a == 1:
            header.update({c: _py(table[c][a]) for c in SPECTRUM_COLUMNS})
            payload = payload[0]
        else:
            header.update({c: [_py(v) for v in table[c][a:b]] for c in SPECTRUM_COLUMNS})
            header["seq"] = _py(table["seq"][a])
        header.update(calib)
        header.update({"dtype": payload.dtype.str, "shape": list(payload.shape)})
        return header, payload

    def _spectrum_table_cached(self) -> dict[str, np.ndarray]:
        if getattr(self, "_spectrum_table", None) is None:
            self._spectrum_table: dict[str, np.ndarray] | None = self.spectrum_table()
        assert self._spectrum_table is not None
        return self._spectrum_table

    def _survey_message(self, which: str) -> tuple[dict[str, Any], np.ndarray]:
        ds = self._f["survey"][which]
        image = ds[()]
        header = json.loads(_as_str(ds.attrs["header"])) if "header" in ds.attrs else {}
        header.update({"dtype": image.dtype.str, "shape": list(image.shape)})
        return header, image

    def _end_header(self, proto: str, last_seq: int, last_t: float) -> dict[str, Any]:
        stored = _get_text(self._f, "session_end")
        if stored is not None:
            return json.loads(stored)
        return {
            "proto": proto,
            "type": "session_end",
            "session": self.session_id,
            "seq": last_seq + 1,
            "t": last_t,
            "status": self.status,
            "messages": last_seq + 2,
            "message": self.message,
        }


def _last_t(header: Mapping[str, Any], default: float) -> float:
    t = header.get("t", default)
    values = t if isinstance(t, list) else [t]
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return max([default, *finite])


def _py(value: Any) -> Any:
    """numpy scalar -> Python scalar (for JSON headers)."""
    return value.item() if isinstance(value, np.generic) else value


class _BlockReader:
    """Reads rows of a 2-D dataset through a cache of consecutive blocks (replay reads rows in order)."""

    def __init__(self, dataset: h5py.Dataset, block_rows: int = 4096) -> None:
        self.dataset = dataset
        self.block_rows = block_rows
        self.start = 0
        self.block = dataset[0:0]

    def rows(self, a: int, b: int) -> np.ndarray:
        if not (self.start <= a and b <= self.start + len(self.block)):
            self.start = a
            self.block = self.dataset[a : max(b, a + self.block_rows)]
        return self.block[a - self.start : b - self.start].copy()


def _read_dataset(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[()], dtype=object)
    return np.asarray(ds[()])


# ------------------------------------------------------------------------------------------------------------
# describe


def describe(path: str | Path) -> str:
    """A human-readable summary of a session file: the output of ``stemlive info FILE``.

    Raises
    ------
    SessionFormatError
        If the file is not a stemlive session file (or of a newer format version).
    """
    path = Path(path)
    validate(path)
    with SessionReader(path) as r:
        lines = [f"{path}", f"  kind:        {r.kind}", f"  status:      {r.status}"]
        if not r.closed:
            lines.append(f"  NOT CLOSED: writer stopped while recording; {_recovered(r)} recovered")
        elif r.message:
            lines.append(f"  message:     {r.message}")
        if r.gaps:
            lines.append(f"  seq gaps:    {r.gaps}")
        lines += [f"  session id:  {r.session_id}", f"  created:     {r.created}"]
        if r.closed_at:
            lines.append(f"  closed:      {r.closed_at}")
        lines += _describe_data(r)
        lines += _describe_results(r)
        lines += _problem_lines(r.file)  # analysis status and problems, one line each
        lines.append(f"  file size:   {_size(os.path.getsize(path))}")
    return "\n".join(lines)


def _recovered(r: SessionReader) -> str:
    parts = []
    if r.kind == "tilt_series" or r.n_frames:
        parts.append(f"{r.n_frames} complete frames")
    if r.kind != "tilt_series" or r.n_spectra:
        parts.append(f"{r.n_spectra} complete spectra")
    return " and ".join(parts)


def _describe_data(r: SessionReader) -> list[str]:
    lines: list[str] = []
    if "tilt_series" in r.file:
        frames = r.frames()
        a = r.attrs("tilt_series")
        tilts = np.unique(r.frame_table()["tilt_index"]).size
        lines.append(
            f"  frames:      {frames.shape[0]} x {frames.shape[1]} x {frames.shape[2]} {frames.dtype} ({tilts} tilts)"
        )
        lines.append(f"    pixel size {_num(a.get('pixel_size_nm'))} nm, dwell {_num(a.get('dwell_us'))} us")
    if "eels" in r.file:
        spectra = r.spectra()
        a = r.attrs("eels")
        points = np.unique(r.spectrum_table()["point_index"]).size
        lines.append(f"  spectra:     {spectra.shape[0]} x {spectra.shape[1]} {spectra.dtype} ({points} points)")
        calib = f"    dispersion {_num(a.get('dispersion_meV'))} meV/channel, exposure {_num(a.get('exposure_ms'))} ms"
        if "scan_shape" in a:
            calib += f", scan shape {list(np.asarray(a['scan_shape']).tolist())}"
        lines.append(calib)
    surveys = [w for w in SURVEYS if r.survey(w) is not None]
    if surveys:
        lines.append("  surveys:     " + ", ".join(f"{w} {r.file['survey'][w].shape}" for w in surveys))
    span = r.time_span
    if span is not None:
        lines.append(f"  time span:   {_iso(span[0])} .. {_iso(span[1])} ({span[1] - span[0]:.3f} s)")
    return lines


def _describe_results(r: SessionReader) -> list[str]:
    names = r.result_names()
    if not names:
        return ["  results:     none"]
    lines = ["  results:"]
    for stage, entries in names.items():
        for name, shape in entries.items():
            lines.append(f"    {stage}/{name} {shape} {r.file['results'][stage][name].dtype}")
    return lines


def _num(value: Any) -> str:
    return "?" if value is None else f"{float(value):g}"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
