"""Session files: one HDF5 file per acquisition session (format ``stemlive-session`` v1).

:class:`SessionWriter` records the wire messages of one session (frames, spectra, surveys) and the pipeline's
results, growing the datasets of :mod:`.session_layout`. The reading side is in :mod:`.session_reader`
(:class:`SessionReader`: a file trimmed to its complete rows, and the wire sequence for replay) and
:mod:`.session_info` (:func:`describe`, the text of ``stemlive info``); both are re-exported here.
The format is specified in ``docs/session-format.md``.

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

import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import h5py
import numpy as np

from stemlive.live.storage.session_format import (
    COMMITTED,
    FINAL_STATUSES,
    FORMAT,
    FORMAT_VERSION,
    FRAME_ATTRS,
    FRAME_COLUMNS,
    KINDS,
    SPECTRUM_ATTRS,
    SPECTRUM_COLUMNS,
    STATUSES,
    SURVEYS,
    SessionFormatError,
)
from stemlive.live.storage.session_format import header_fields as _header_fields
from stemlive.live.storage.session_format import iso as _iso

# The reading side lives in its own modules (session_reader, session_info); describe, Rows, SessionReader,
# check_format and validate stay importable from here. The dataset layout the writer grows is session_layout.
from stemlive.live.storage.session_info import describe
from stemlive.live.storage.session_layout import (
    FrameStore,
    SpectrumStore,
    attr_value,
    dumps,
    h5_value,
    put_text,
    write_result_row,
)
from stemlive.live.storage.session_reader import Rows, SessionReader, check_format, validate

log = logging.getLogger(__name__)


class MessageLike(Protocol):
    """What the writer needs of a :class:`stemlive.live.wire.protocol.Message`."""

    @property
    def header(self) -> Mapping[str, Any]: ...

    @property
    def payload(self) -> np.ndarray | None: ...


class ResultLike(Protocol):
    """What the writer needs of a :class:`stemlive.live.pipeline.stage.Result`."""

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


def _check_name(text: str, what: str) -> str:
    """A result stage or name: ``/``-separated non-empty segments, none of them ``.`` or ``..``."""
    if not isinstance(text, str) or any(part in {"", ".", ".."} for part in text.split("/")):
        raise ValueError(f"invalid result {what} {text!r}: needs non-empty '/'-separated names, no '.' or '..'")
    return text


# ------------------------------------------------------------------------------------------------------------
# writer



def _same_attr(a: Any, b: Any) -> bool:
    """Whether two stored attribute values (scalars or strings, :func:`attr_value`) are the same."""
    return type(a) is type(b) and bool(a == b)

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
    hold_frames
        Frames :meth:`append` may keep (zero-copy, referencing the caller's arrays) before writing them; they are
        written by :meth:`write_held`, by every commit, or when more are appended. 0: each frame at once. The
        file is the same either way; nothing held is committed (or acknowledged by the service).

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
        hold_frames: int = 0,
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
        self.status = "recording"
        try:
            self._f = h5py.File(self.path, "x")
        except BaseException as e:  # e.g. disk full while creating: no empty file left behind (it did not exist)
            if not isinstance(e, FileExistsError):  # never remove a file another writer made meanwhile
                self.path.unlink(missing_ok=True)
            raise
        try:
            self._write_root(header)
            self._frames = FrameStore(self._f, hold=hold_frames)
            self._spectra = SpectrumStore(self._f, self.settings)
            self._surveys_done: list[str] = []
            # per-row results: dataset handle, rows, row shape and the attributes last written (a row costs
            # ~0.3 ms of h5py lookups and ~0.1 ms per attribute rewritten; an EELS map writes 3 rows per point)
            self._rows: dict[tuple[str, str], tuple[h5py.Dataset, list[int], tuple[int, ...], dict[str, Any]]] = {}
            self._since_commit = 0
            self._last_commit = time.monotonic()
            self.commit()
        except BaseException:  # e.g. disk full: leave no empty or half-made file behind
            self.status = "failed"
            try:
                self._f.close()
            except Exception:
                pass
            self.path.unlink(missing_ok=True)
            raise

    def _write_root(self, header: Mapping[str, Any]) -> None:
        attrs = self._f.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = np.int64(FORMAT_VERSION)
        attrs["session_id"] = self.session_id
        attrs["kind"] = self.kind
        attrs["created"] = _iso(float(header["t"]))
        attrs["status"] = "recording"
        put_text(self._f, "settings", dumps(self.settings))
        put_text(self._f, "session_start", dumps(header))

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
            put_text(self._f, "session_end", dumps(dict(header)))
        elif mtype not in {"heartbeat", "result"}:
            raise ValueError(f"cannot record a message of type {mtype!r}")
        self.message_counts[mtype] = self.message_counts.get(mtype, 0) + 1
        self._since_commit += 1
        self._maybe_commit()

    def write_held(self) -> None:
        """Write the frames held back (``hold_frames``); durable at the next commit."""
        self._check_open()
        self._frames.write_held()

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
        ds.attrs["header"] = dumps(dict(header))
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
        key = (str(result.stage), str(result.name))
        value = h5_value(np.asarray(result.value))
        cached = self._rows.get(key) if result.index is not None else None
        if cached is not None and cached[2] == value.shape and int(result.index) >= 0:  # type: ignore[arg-type]
            ds, length, _shape, written = cached
            index = int(result.index)  # type: ignore[arg-type]
            if index >= length[0]:
                ds.resize(index + 1, axis=0)
                length[0] = index + 1
            ds[index] = value
        else:
            group = self._f.require_group("results").require_group(_check_name(result.stage, "stage"))
            name = _check_name(result.name, "name")
            self._rows.pop(key, None)
            written = {}
            if result.index is None:
                if name in group:
                    del group[name]
                ds = group.create_dataset(name, data=value)
            else:
                ds = write_result_row(group, name, value, int(result.index))
                self._rows[key] = (ds, [int(ds.shape[0])], value.shape, written)
        for attr_key, attr in result.attrs.items():
            stored = attr_value(attr)
            if attr_key in written and _same_attr(written[attr_key], stored):
                continue  # unchanged since this dataset's last row
            ds.attrs[attr_key] = stored
            written[attr_key] = stored

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
            self._f["survey"].attrs["committed"] = dumps(self._surveys_done)
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
            attrs["message"] = _bounded(str(message))
            if len(gaps) > MAX_GAPS_STORED:  # a bounded attribute: the count and the first ranges
                attrs["gaps_total"] = np.int64(len(gaps))
            attrs["gaps"] = dumps([[int(a) for a in gap] for gap in list(gaps)[:MAX_GAPS_STORED]])
            attrs["n_messages"] = np.int64(sum(self.message_counts.values()))
            attrs["message_counts"] = dumps(self.message_counts)
            attrs["n_frames"] = np.int64(self.n_frames)
            attrs["n_spectra"] = np.int64(self.n_spectra)
            attrs["status"] = status
            self._f.flush()
        finally:
            self.status = status
            self._f.close()
        _fsync(self.path)

    def fail(self, reason: str) -> str:
        """Close the file as ``failed`` with ``reason`` without raising, also after a write error (disk full).

        Data committed before the error stays readable. If closing the open handle fails (HDF5 after ENOSPC),
        the file is reopened and only the status and message attributes are written: they fit into space HDF5
        already allocated for the root attributes or into the service's disk reserve.

        Returns
        -------
        str
            The status the file ends with: ``"failed"``, or ``"recording"`` if even that could not be written
            (readers then use the committed rows).
        """
        if self.closed:
            return self.status
        try:
            self.close("failed", message=reason)
            return "failed"
        except Exception as e:  # the handle is closed by close()'s finally; mark the file from a new one
            log.warning("session %s: closing %s after an error failed (%s); marking it from a new handle",
                        self.session_id, self.path, e)
        try:
            with h5py.File(self.path, "r+") as f:
                f.attrs["message"] = _bounded(reason)
                f.attrs["closed"] = datetime.now(UTC).isoformat()
                f.attrs["status"] = "failed"
            _fsync(self.path)
            return "failed"
        except Exception as e:
            log.error("session %s: could not mark %s as failed (%s); it stays 'recording' and is readable up to its "
                      "last committed rows", self.session_id, self.path, e)
            return "recording"

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


MAX_GAPS_STORED = 1000
_MESSAGE_LIMIT = 4096


def _bounded(text: str) -> str:
    """A file's ``message`` attribute stays small: long notes (gap lists) are cut with a marker."""
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 20] + " ... (truncated)"


def _fsync(path: Path) -> None:
    """Make a closed file (and its directory entry) durable: acknowledged sessions survive a power loss."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
        try:
            fd = os.open(target, flags)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _check_start(header: Mapping[str, Any]) -> None:
    if header.get("type") != "session_start":
        raise ValueError(f"a session file starts with a session_start message, not {header.get('type')!r}")
    if header.get("kind") not in KINDS:
        raise ValueError(f"unknown session kind {header.get('kind')!r}; expected one of {sorted(KINDS)}")
    for key in ("session", "t"):
        if header.get(key) is None:
            raise ValueError(f"session_start without {key!r}")


__all__ = [
    "COMMITTED", "FINAL_STATUSES", "FORMAT", "FORMAT_VERSION", "FRAME_ATTRS", "FRAME_COLUMNS", "KINDS",
    "SPECTRUM_ATTRS", "SPECTRUM_COLUMNS", "STATUSES", "SURVEYS", "MessageLike", "ResultLike", "Rows",
    "SessionFormatError", "SessionReader", "SessionWriter", "check_format", "describe", "validate",
]
