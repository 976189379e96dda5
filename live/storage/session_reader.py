"""Reading session files (v1): :class:`SessionReader` trims a file to its complete rows and rebuilds the wire
sequence for replay; :func:`check_format` and :func:`validate` tell session files from other files.

Any file that follows the v1 contract of DESIGN.md is read, whoever wrote it (:mod:`.session_contract` checks
it): without ``seq`` datasets, arrival order is row order; without a stored ``session_start``, the header is
rebuilt from the root attributes and ``settings``; without ``committed_rows``, the ``status`` attribute decides
(a closed file: all rows; a file still ``recording``: the rows up to the first one without a finite ``t``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.storage.session_contract import check_contract, open_session_file
from stemlive.live.storage.session_format import (
    COMMITTED,
    FORMAT,
    FORMAT_VERSION,
    FRAME_ATTRS,
    FRAME_COLUMNS,
    SPECTRUM_ATTRS,
    SPECTRUM_COLUMNS,
    SURVEYS,
    SessionFormatError,
)
from stemlive.live.storage.session_format import as_str as _as_str
from stemlive.live.storage.session_format import get_text as _get_text
from stemlive.live.storage.session_format import header_fields as _header_fields

#: Longest spectrum batch replayed from a file without ``seq`` (runs of one probe position are cut into these).
BATCH_ROWS = 256


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
        For HDF5 files that are not stemlive session files (or too new), for v1 files that break the contract,
        and for files that are not HDF5 (empty, truncated, directories). The message names the file.
    FileNotFoundError
        If there is no such file.
    """
    path = Path(path)
    with open_session_file(path) as f:
        version = check_format(f)
        check_contract(f, path)
        return version


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
        If the file is not a stemlive session file, is of a newer format version or breaks the v1 contract
        (one line naming the file and the problem).
    FileNotFoundError
        If there is no such file.
    """

    def __init__(self, path: str | Path, *, locking: bool | None = None) -> None:
        self.path = Path(path)
        self._f = open_session_file(self.path, locking=locking)
        try:
            self.format_version = check_format(self._f)
            check_contract(self._f, self.path)
        except BaseException:
            self._f.close()
            raise
        attrs = self._f.attrs
        self.kind = _as_str(attrs.get("kind", ""))
        self.status = _as_str(attrs.get("status", "recording"))
        self.session_id = _as_str(attrs.get("session_id", ""))
        self.created = _as_str(attrs.get("created", ""))
        self.settings: dict[str, Any] = json.loads(_get_text(self._f, "settings") or "{}")
        self.n_frames = self._complete_rows("tilt_series", "frames")
        self.n_spectra = self._complete_rows("eels", "spectra")
        stored = json.loads(_get_text(self._f, "session_start") or "{}")
        #: whether the file holds the writer's own ``session_start`` (else it is rebuilt: :meth:`_rebuilt_start`)
        self.stored_start = stored.get("type") == "session_start"
        self.start_header: dict[str, Any] = stored if self.stored_start else self._rebuilt_start()
        #: whether arrival order comes from stored ``seq`` values (else it is row order)
        self.stored_seq = self._has_seq()
        self._seq_cache: dict[str, Any] | None = None

    def _rebuilt_start(self) -> dict[str, Any]:
        """``session_start`` from the root attributes and ``settings`` (a file without a stored header)."""
        settings = dict(self.settings)
        if self.kind == "eels_map" and "scan_shape" not in settings:
            shape = self.attrs("eels").get("scan_shape")
            if shape is not None:
                settings["scan_shape"] = [int(v) for v in np.asarray(shape).ravel()]
        try:
            t0 = datetime.fromisoformat(self.created).timestamp()
        except ValueError:
            t0 = math.nan
        if not math.isfinite(t0):
            t = np.concatenate(
                [self._column("tilt_series", "t", self.n_frames), self._column("eels", "t", self.n_spectra)]
            )
            t = t[np.isfinite(t)]
            t0 = float(t.min()) if t.size else 0.0
        return {"proto": "stemlive/1", "type": "session_start", "session": self.session_id, "seq": 0, "t": t0,
                "kind": self.kind, "settings": settings}

    def _has_seq(self) -> bool:
        for group_name, n in (("tilt_series", self.n_frames), ("eels", self.n_spectra)):
            if n and "seq" not in self._f[group_name]:
                return False
        group = self._f.get("survey")
        return all("seq" in group[w].attrs for w in self._surveys()) if group is not None else True

    def _column(self, group_name: str, column: str, n: int) -> np.ndarray:
        group = self._f.get(group_name)
        if group is None or column not in group:
            return np.empty(0)
        return np.asarray(group[column][:n])

    def require_data(self) -> None:
        """Raise :class:`SessionFormatError` if the file has no complete frame or spectrum (nothing to analyse)."""
        if self.n_frames or self.n_spectra:
            return
        what = "frames" if self.kind == "tilt_series" else "spectra"
        note = "" if self.closed else "; the writer stopped before committing any"
        raise SessionFormatError(f"{self.path}: no complete {what} (kind {self.kind}, status {self.status}{note}): "
                                 "nothing to replay or analyse")

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
        if not self.closed and "t" in group and n:  # still recording: complete rows have a finite t
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
        table = {
            c: (group[c][:n] if group is not None and c in group else np.empty(0, dtype=dtype))
            for c, dtype in columns.items()
        }
        if not self.stored_seq and n:  # arrival order is row order: the seq each row is replayed with
            table["seq"] = self._synthetic_seq()[group_name][:n]
        return table

    def _synthetic_seq(self) -> dict[str, Any]:
        """``seq`` in row order for a file without stored ``seq``: the survey before, the frames one message
        each, the spectra in runs of consecutive rows of one probe position (at most :data:`BATCH_ROWS` rows per
        message), then the survey after."""
        if self._seq_cache is None:
            surveys = self._surveys()
            seq = 1 + ("before" in surveys)
            frames = np.arange(seq, seq + self.n_frames, dtype="<i8")
            seq += self.n_frames
            spectra = np.empty(self.n_spectra, dtype="<i8")
            if self.n_spectra:
                points = self._f["eels/point_index"][: self.n_spectra]
                start = np.r_[True, np.diff(points) != 0]  # a new probe position
                starts = np.flatnonzero(start)
                position_in_run = np.arange(self.n_spectra) - starts[np.cumsum(start) - 1]
                spectra[:] = seq - 1 + np.cumsum(position_in_run % BATCH_ROWS == 0)
                seq = int(spectra[-1]) + 1
            self._seq_cache = {
                "tilt_series": frames,
                "eels": spectra,
                "survey": {"before": 1, "after": seq} if surveys else {},
            }
        return self._seq_cache

    def attrs(self, group_name: str) -> dict[str, Any]:
        """Attributes of ``/tilt_series`` or ``/eels`` (calibrations; those of the data dataset where the group
        has none), ``{}`` if the group is absent."""
        group = self._f.get(group_name)
        if group is None:
            return {}
        data = group.get("frames" if group_name == "tilt_series" else "spectra")
        return {**(dict(data.attrs) if isinstance(data, h5py.Dataset) else {}), **dict(group.attrs)}

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
            stored = self._f["survey"][which].attrs.get("seq", -1)
            seq = stored if self.stored_seq else self._synthetic_seq()["survey"][which]
            events.append((int(seq), "survey", which))
        events.sort(key=lambda e: e[0])
        return events

    def messages(self) -> Iterator[Any]:
        """The recorded wire sequence as :class:`~stemlive.live.wire.protocol.Message` objects, ordered by ``seq``.

        ``session_start`` (the stored header), then the frames, spectra and surveys, and ``session_end`` if the
        file was closed (the stored one, or one made from the final status). Spectra are re-batched as they
        arrived: consecutive rows with the same ``seq`` form one message; a run of one row is a single-spectrum
        message (1-D payload, scalar fields), a longer run a batch (2-D payload, the per-spectrum fields
        :data:`~stemlive.live.wire.protocol.BATCH_FIELDS`, ``t`` included, as lists). A batch of one spectrum is
        therefore replayed as a single spectrum. Payloads are float32 as stored. Heartbeats and results are
        not recorded and so not replayed.
        """
        from stemlive.live.wire.protocol import Message

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
        calib = _header_fields(self.attrs("tilt_series"), FRAME_ATTRS)
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
        if "header" in ds.attrs:
            header = json.loads(_as_str(ds.attrs["header"]))
        else:  # another writer's survey: the header from what the contract has
            header = {"proto": self.start_header.get("proto", "stemlive/1"), "type": "survey",
                      "session": self.session_id, "which": which,
                      "t": _py(ds.attrs.get("t", self.start_header.get("t", 0.0)))}
            header.update({k: _py(ds.attrs[k]) for k in ("seq", "pixel_size_nm") if k in ds.attrs})
        if not self.stored_seq:
            header["seq"] = int(self._synthetic_seq()["survey"][which])
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

