"""The dataset layout of a session file as the writer grows it: per-row column tables, the frame and spectrum
stores (chunked, buffered, with a committed-row count), growing result rows and long JSON texts.

Used by :class:`~stemlive.live.storage.session.SessionWriter`; the format is specified in
``docs/session-format.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from stemlive.live.storage.session_format import (
    COMMITTED,
    FRAME_ATTRS,
    FRAME_COLUMNS,
    SPECTRUM_ATTRS,
    SPECTRUM_COLUMNS,
)
from stemlive.live.storage.session_format import header_fields as _header_fields
from stemlive.live.wire.protocol import json_default

__all__ = ["Columns", "FrameStore", "SpectrumStore", "attr_value", "dumps", "fill_value", "h5_value", "per_row",
           "put_text", "write_result_row"]

_TEXT_ATTR_LIMIT = 32 * 1024  # longer JSON texts go to a root dataset (HDF5 compact attributes max out at 64 KiB)
_TARGET_CHUNK_BYTES = 1 << 20
_SPECTRUM_BLOCK_BYTES = 4 << 20


def dumps(obj: Any) -> str:
    """JSON text of a header or attribute value (numpy values included, NaN allowed)."""
    return json.dumps(obj, default=json_default, allow_nan=True)


def fill_value(dtype: str | np.dtype) -> Any:
    """Fill value of a per-row column: NaN for floats, -1 for integers."""
    return np.nan if np.dtype(dtype).kind == "f" else -1


def put_text(f: h5py.File, name: str, text: str) -> None:
    """Store a JSON text as a root attribute, or as a root string dataset when it is too long for one."""
    if len(text.encode()) <= _TEXT_ATTR_LIMIT:
        f.attrs[name] = text
    else:
        f.create_dataset(name, data=text, dtype=h5py.string_dtype())



def attr_value(value: Any) -> Any:
    """A result attribute as stored: scalars and strings as they are, anything else as a JSON string."""
    if isinstance(value, str | bytes | bool | int | float | np.number | np.bool_):
        return value
    return dumps(value)


def h5_value(value: np.ndarray) -> np.ndarray:
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



class Columns:
    """The 1-D per-row datasets of one group, with values buffered until the next block write."""

    def __init__(self, group: h5py.Group, columns: Mapping[str, str], chunk_rows: int) -> None:
        self.group = group
        self.columns = dict(columns)
        self.fills = {name: fill_value(dtype) for name, dtype in columns.items()}
        self._fill_items = tuple(self.fills.items())
        # one entry per row: a tuple in column order, or (add) the message header the row is taken from at the
        # next write -- per message, only a list append; the fields are picked out a block at a time
        self.pending: list[tuple[Any, ...] | Mapping[str, Any]] = []
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
        """Buffer one row (missing fields get the fill value). ``values`` must not change until :meth:`write`."""
        self.pending.append(values)

    def add_many(self, values: Mapping[str, Sequence[Any]]) -> None:
        """Buffer several rows given as equally long sequences."""
        self.pending.extend(zip(*(values[name] for name in self.columns), strict=True))

    def _rows(self) -> list[tuple[Any, ...]]:
        items = self._fill_items
        return [row if isinstance(row, tuple) else tuple([row.get(name, fill) for name, fill in items])
                for row in self.pending]

    def write(self) -> None:
        """Append the buffered rows to the datasets (``t`` last)."""
        k = self.n_pending
        if not k:
            return
        start, stop = self.n_written, self.n_written + k
        for (name, dtype), values in zip(self.columns.items(), zip(*self._rows(), strict=True), strict=True):
            ds = self.datasets[name]
            ds.resize((stop,))
            ds[start:stop] = np.asarray(values, dtype=dtype)
        self.pending.clear()
        self.n_written = stop

    def mark_committed(self) -> None:
        if self.n_committed != self.n_written:
            self.group.attrs[COMMITTED] = self.n_written
            self.n_committed = self.n_written


class FrameStore:
    """``/tilt_series``: each frame goes to disk as one chunk; its metadata row is buffered.

    ``hold`` > 0 keeps up to that many frames (zero-copy views of the received buffers) before writing them
    (:meth:`write_held`, also at every :meth:`write`): a caller that receives several frames at once then runs
    its per-message Python for all of them before the chunk writes evict it from the CPU caches. The chunks,
    their order and the file are the same as with ``hold=0`` (each frame written as it is appended).
    """

    def __init__(self, f: h5py.File, hold: int = 0) -> None:
        self.f = f
        self.frames: h5py.Dataset | None = None
        self.columns: Columns | None = None
        self.shape: tuple[int, ...] = ()
        self.n = 0  # frames appended (written or held)
        self.n_chunks = 0  # frames written
        self.hold = hold
        self.held: list[tuple[np.ndarray, Mapping[str, Any]]] = []

    def _create(self, shape: tuple[int, ...], header: Mapping[str, Any]) -> None:
        group = self.f.require_group("tilt_series")
        ny, nx = shape
        self.frames = group.create_dataset(
            "frames", shape=(0, ny, nx), dtype="<f4", maxshape=(None, ny, nx), chunks=(1, ny, nx), rdcc_nbytes=0
        )
        self.frames.attrs.update(_header_fields(header, FRAME_ATTRS))
        group.attrs.update(_header_fields(header, FRAME_ATTRS))
        self.columns = Columns(group, FRAME_COLUMNS, chunk_rows=1024)
        self.shape = (ny, nx)

    def append(self, payload: np.ndarray, header: Mapping[str, Any]) -> None:
        image = np.ascontiguousarray(payload, dtype="<f4")
        if image.ndim != 2:
            raise ValueError(f"frame payload must be a 2-D image, got shape {image.shape}")
        if self.frames is None:
            self._create(image.shape, header)
        assert self.columns is not None
        if image.shape != self.shape:
            raise ValueError(f"frame shape {image.shape} differs from the session's {self.shape}")
        self.held.append((image, header))
        self.n += 1
        if len(self.held) > self.hold:
            self.write_held()

    def write_held(self) -> None:
        """Write the frames held back, one chunk each, in order, and buffer their metadata rows.

        A frame gets its row only once its chunk is written. If a write fails (disk full), that frame and the
        ones held after it are dropped (never written nor counted) and the error propagates, as when a frame
        written at once fails.
        """
        held = self.held
        if not held:
            return
        assert self.frames is not None and self.columns is not None
        ident, add, n = self.frames.id, self.columns.add, self.n_chunks
        # low-level extent + whole chunks past the chunk cache (Dataset.resize re-checks its arguments: ~40 us)
        try:
            ident.set_extent((n + len(held), *self.shape))
            for image, header in held:
                ident.write_direct_chunk((n, 0, 0), image)
                add(header)
                n += 1
        except BaseException:
            self.n -= len(held) - (n - self.n_chunks)
            raise
        finally:
            self.n_chunks = n
            held.clear()

    def write(self) -> None:
        self.write_held()
        if self.columns is not None:
            self.columns.write()

    def mark_committed(self) -> None:
        if self.columns is not None:
            self.columns.mark_committed()


class SpectrumStore:
    """``/eels``: spectra and their metadata buffered in memory and written in blocks of whole chunks."""

    def __init__(self, f: h5py.File, settings: Mapping[str, Any]) -> None:
        self.f = f
        self.settings = settings
        self.spectra: h5py.Dataset | None = None
        self.columns: Columns | None = None
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
        self.columns = Columns(group, SPECTRUM_COLUMNS, chunk_rows=max(1024, chunk_rows))
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
            values = {name: per_row(header, name, fill, len(payload)) for name, fill in self.columns.fills.items()}
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


def per_row(header: Mapping[str, Any], name: str, fill: Any, k: int) -> Sequence[Any]:
    """A batch field: a list of length ``k``, or a scalar (repeated); ``seq`` is the message's seq for all rows."""
    value = header.get(name, fill)
    if isinstance(value, list | tuple | np.ndarray):
        if len(value) != k:
            raise ValueError(f"spectrum batch of {k} has {len(value)} values of {name!r}")
        return list(value)
    return [value] * k



def write_result_row(group: h5py.Group, name: str, value: np.ndarray, index: int) -> h5py.Dataset:
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
