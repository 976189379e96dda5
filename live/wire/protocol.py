"""stemlive wire protocol v1: message encoding, validation and per-session stream checks.

A message is a ZeroMQ multipart message ``[header, payload?]``. The header is a UTF-8 JSON object; the optional
payload is the raw bytes of a C-contiguous numeric array described by the header's ``dtype`` and ``shape``.
Nothing is ever unpickled or evaluated: decoding is ``json.loads`` plus ``np.frombuffer`` after strict checks.

The full specification, with every field and every rejection code, is ``docs/protocol.md``.

Examples
--------
>>> import numpy as np
>>> parts = encode({"type": "frame", "session": "s1", "seq": 1, "t": 1.7e9, "tilt_index": 0, "alpha_deg": 0.0,
...                 "beta_deg": 0.0, "frame_index": 0, "pixel_size_nm": 0.02, "dwell_us": 4.0},
...                np.zeros((4, 4), np.float32))
>>> decode(parts).payload.shape
(4, 4)
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, NoReturn

import numpy as np

log = logging.getLogger(__name__)

PROTO = "stemlive/1"
PROTO_MAJOR = 1
MESSAGE_TYPES: frozenset[str] = frozenset(
    {"session_start", "frame", "spectrum", "survey", "session_end", "heartbeat", "result"}
)
SESSION_KINDS: frozenset[str] = frozenset({"tilt_series", "eels_line_scan", "eels_map"})
END_STATUSES: frozenset[str] = frozenset({"complete", "aborted", "failed"})
SURVEY_WHICH: frozenset[str] = frozenset({"before", "after"})
#: Session kinds each data type may be recorded in (surveys belong to any kind).
DATA_KINDS: Mapping[str, frozenset[str]] = {
    "frame": frozenset({"tilt_series"}),
    "spectrum": frozenset({"eels_line_scan", "eels_map"}),
    "survey": SESSION_KINDS,
}
HEADER_ONLY_TYPES: frozenset[str] = frozenset({"session_start", "session_end", "heartbeat"})
#: Allowed payload ``ndim`` per type; ``result`` payloads are optional and may have 0..MAX_NDIM dimensions.
PAYLOAD_NDIM: Mapping[str, tuple[int, ...]] = {"frame": (2,), "survey": (2,), "spectrum": (1, 2)}
#: Per-spectrum fields that are lists of length k in a batch ``spectrum`` message (payload ``(k, n_channels)``).
BATCH_FIELDS: tuple[str, ...] = ("point_index", "frame_index", "x_nm", "y_nm", "energy_offset_meV", "t")
#: Session id of link-level heartbeats (transport liveness and acknowledgements, outside any session).
LINK_SESSION = ""

MAX_HEADER_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 31
MAX_NDIM = 8
MAX_INDEX = (1 << 31) - 1  # indices are stored as int32 in session files
MAX_SEQ = (1 << 63) - 1
MAX_SESSION_ID_LEN = 128
MAX_JSON_DEPTH = 32  # nesting of free-form objects (settings, value, attrs)
#: Largest payload accepted (bytes): one 8192 x 8192 float64 image. The recorder holds one payload at a time.
MAX_PAYLOAD_BYTES = 1 << 29
#: Acquisition times must lie in [0, MAX_TIME] Unix seconds (year 2100): a file's dates must stay printable.
MAX_TIME = 4102444800.0
#: Largest map a session may declare (settings ``scan_shape``), in probe positions.
MAX_SCAN_POINTS = 1 << 24

# Header keys written first, in this order: SUB prefix subscriptions on result stage/name rely on it.
_LEADING_KEYS = ("proto", "type", "stage", "name", "session", "seq", "t")
_PROTO_RE = re.compile(r"stemlive/(\d{1,6})(?:\.(\d{1,6}))?")
_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
# Explicit byte order for multi-byte types; '=' (native) is ambiguous on the wire and refused.
_DTYPE_RE = re.compile(r"(?:[<>](?:[iu][248]|f[248])|[<>|]?[iu]1)")
# All patterns are used with re.fullmatch: "$" in re.match also matches before a trailing newline ("<f4\n").

#: Every code a :class:`ProtocolError` can carry, with its meaning (documented in docs/protocol.md).
REJECTION_CODES: Mapping[str, str] = {
    "no_parts": "the message has no parts",
    "too_many_parts": "more than two parts (header, payload)",
    "bad_part": "a part is not a bytes-like buffer",
    "header_too_large": f"header longer than {MAX_HEADER_BYTES} bytes",
    "bad_utf8": "header is not valid UTF-8",
    "bad_json": "header is not valid JSON (or nests too deep, or has an out-of-range integer)",
    "duplicate_key": "header JSON repeats a key",
    "header_not_object": "header JSON is not an object",
    "missing_field": "a required header field is absent",
    "bad_field_type": "a header field has the wrong JSON type (e.g. a bool or float where an int is required)",
    "bad_proto": "proto is not of the form 'stemlive/<major>[.<minor>]'",
    "unsupported_version": "proto major version is not 1",
    "unknown_type": "type is not one of MESSAGE_TYPES",
    "bad_seq": "seq is negative or above 2**63-1",
    "bad_time": "t is not a finite number of Unix seconds in [0, MAX_TIME] (year 2100)",
    "bad_session_id": "session id is empty, too long or has characters outside [A-Za-z0-9._:-]",
    "bad_value": "a field is out of range (negative index, non-positive size, non-finite number, bad enum)",
    "unknown_kind": "session_start kind is not one of SESSION_KINDS",
    "bad_status": "session_end status is not complete, aborted or failed",
    "bad_message_count": "session_end messages is not seq + 1",
    "bad_name": "result stage or name is not a safe path of [A-Za-z0-9_.-] segments",
    "unexpected_payload": "payload, dtype or shape on a header-only type",
    "missing_payload": "no payload part where the type (or the header's dtype) requires one",
    "bad_dtype": "dtype is not an explicit-byte-order numeric int/uint/float string",
    "bad_shape": "shape is not a list of non-negative ints (positive for frames, surveys and spectra)",
    "shape_too_large": f"shape has more than {MAX_ELEMENTS} elements (or a dimension that large, even with a 0), "
    f"or the payload would exceed {MAX_PAYLOAD_BYTES} bytes",
    "bad_ndim": "payload ndim not allowed for the type",
    "payload_size_mismatch": "payload length is not prod(shape) * itemsize",
    "batch_length_mismatch": "a batch spectrum field list length differs from the batch size k",
    "unexpected_type": "a message type not accepted on this stream (e.g. result on the frame path)",
    "no_session": "message for a session that has not started",
    "session_already_open": "session_start while another session is open on this connection",
    "wrong_session": "message for a session other than the open one",
    "bad_start_seq": "session_start with seq other than 0",
    "session_reused": "session_start for a session id that was already used",
    "duplicate_seq": "seq already received (replay or duplicate)",
    "session_closed": "message after session_end (other than a late arrival filling a known gap)",
    "bad_settings": "a session_start setting the recorder relies on has the wrong type or range (e.g. scan_shape)",
    "wrong_kind": "a data type that does not belong to the session kind (a spectrum in a tilt series, a frame in "
    "an EELS session)",
    "shape_mismatch": "a frame shape or spectrum channel count differing from the session's first",
    # issued by the transport and the service (see docs/protocol.md), not by decode/StreamChecker:
    "not_owner": "message for a session another connection opened (only its owner may send data, heartbeats or "
    "session_end for it)",
    "busy": "session_start while another connection's session is being recorded (the detail names it and its age)",
    "disk_full": "free space below the service's reserve (or the disk is full): the session is closed 'failed'",
    "record_failed": "the recorder could not store a validated message; the session is closed 'failed'",
    "internal_error": "an unexpected error while handling the message (logged by the service, which goes on)",
    "unauthorized": "CURVE handshake refused (no or unknown key): raised by the sender, the service never sees it",
}


class ProtocolError(ValueError):
    """A message violates wire protocol v1: reject it, log the reason and keep running.

    Attributes
    ----------
    code : str
        Short stable slug, one of :data:`REJECTION_CODES`.
    detail : str
        Human-readable specifics (field name, offending value).
    session, seq
        The message's session id and seq where they could be read, for acknowledgement back-channels.
    """

    def __init__(
        self, code: str, detail: str, *, session: str | None = None, seq: int | None = None, **extra: Any
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.session = session
        self.seq = seq
        self.extra: dict[str, Any] = extra  # JSON fields for the nack (e.g. owner_session, owner_age_s for busy)


@dataclass(frozen=True, eq=False)
class Message:
    """A decoded, validated message.

    Attributes
    ----------
    header : dict
        The JSON header (treat as read-only).
    payload : numpy.ndarray or None
        Read-only array viewing the received buffer (zero-copy), or None for header-only messages.
    """

    header: dict[str, Any]
    payload: np.ndarray | None = None

    @property
    def type(self) -> str:
        """Message type, one of :data:`MESSAGE_TYPES`."""
        return str(self.header["type"])

    @property
    def session(self) -> str:
        """Session id (``""`` for link-level heartbeats)."""
        return str(self.header["session"])

    @property
    def seq(self) -> int:
        """Sequence number within the session."""
        return int(self.header["seq"])

    @property
    def t(self) -> float:
        """Acquisition time in Unix seconds; the first spectrum's time for a batch."""
        t = self.header["t"]
        return float(t[0]) if isinstance(t, list) else float(t)

    @property
    def is_batch(self) -> bool:
        """True for a batch ``spectrum`` message (2-D payload, per-spectrum fields as lists)."""
        return self.header["type"] == "spectrum" and self.payload is not None and self.payload.ndim == 2

    @property
    def batch_size(self) -> int:
        """Number of spectra (k) in a batch, 1 for a single spectrum, 0 for other types."""
        if self.header["type"] != "spectrum" or self.payload is None:
            return 0
        return int(self.payload.shape[0]) if self.payload.ndim == 2 else 1


def _fail(code: str, detail: str, header: Mapping[str, Any] | None = None) -> NoReturn:
    session = seq = None
    if header is not None:
        s, q = header.get("session"), header.get("seq")
        session = s if isinstance(s, str) else None
        seq = q if type(q) is int else None
    raise ProtocolError(code, detail, session=session, seq=seq)


# ---------------------------------------------------------------- encoding


_PLAIN = (str, int, float, bool, type(None))


def json_default(obj: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, and paths, as plain JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _jsonable(value: Any) -> Any:
    """Plain JSON types for numpy scalars/arrays, tuples and nested containers (no-op for plain values)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if all(type(v) in _PLAIN for v in value):  # the common case (batch field lists): no per-item calls
            return value if type(value) is list else list(value)
        return [_jsonable(v) for v in value]
    return value  # json.dumps reports anything else


def _ordered(header: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: _jsonable(header[k]) for k in _LEADING_KEYS if k in header}
    for k, v in header.items():
        if k not in out:
            out[k] = _jsonable(v)
    return out


def encode(header: Mapping[str, Any], payload: np.ndarray | None = None) -> list[bytes | memoryview]:
    """Encode a message into ZeroMQ parts, validating it as :func:`decode` would.

    Parameters
    ----------
    header : Mapping
        Header fields. ``proto`` defaults to :data:`PROTO`; ``dtype`` and ``shape`` are set from ``payload``.
    payload : numpy.ndarray, optional
        Numeric array. Sent zero-copy when C-contiguous (otherwise one contiguous copy is made). Do not modify
        it until the transport has sent it.

    Returns
    -------
    list
        ``[header_bytes]`` or ``[header_bytes, memoryview]``; the memoryview aliases ``payload``.

    Raises
    ------
    ProtocolError
        If the message would be rejected by a receiver.
    """
    fields = dict(header)
    fields.setdefault("proto", PROTO)
    view: memoryview | None = None
    if payload is not None:
        arr = np.asarray(payload)
        if not _DTYPE_RE.fullmatch(arr.dtype.str):
            _fail("bad_dtype", f"payload dtype {arr.dtype.str!r} is not a numeric int/uint/float", fields)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        fields["dtype"] = arr.dtype.str
        fields["shape"] = list(arr.shape)
        view = arr.reshape(-1).view(np.uint8).data
    else:
        fields.pop("dtype", None)
        fields.pop("shape", None)
    ordered = _ordered(fields)
    _validate_header(ordered, None if view is None else view.nbytes)
    try:
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        _fail("bad_value", f"header is not JSON-serialisable: {e}", ordered)
    data = text.encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        _fail("header_too_large", f"{len(data)} bytes > {MAX_HEADER_BYTES}", ordered)
    return [data] if view is None else [data, view]


# ---------------------------------------------------------------- decoding


def _as_buffer(part: Any) -> memoryview:
    buf = getattr(part, "buffer", None)  # zmq.Frame: zero-copy view of the received message
    if buf is not None:
        part = buf
    try:
        return memoryview(part).cast("B")
    except TypeError as e:
        _fail("bad_part", f"part of type {type(part).__name__} is not a contiguous bytes-like buffer: {e}")


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


class _DuplicateKey(Exception):
    pass


def _parse_header(raw: memoryview) -> dict[str, Any]:
    if raw.nbytes > MAX_HEADER_BYTES:
        _fail("header_too_large", f"{raw.nbytes} bytes > {MAX_HEADER_BYTES}")
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as e:
        _fail("bad_utf8", str(e))
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=float)
    except _DuplicateKey as e:
        _fail("duplicate_key", f"key {e.args[0]!r} appears more than once")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too large to convert, too deep
        _fail("bad_json", f"{type(e).__name__}: {str(e)[:200]}")
    if not isinstance(obj, dict):
        _fail("header_not_object", f"header JSON is a {type(obj).__name__}, not an object")
    return obj


def decode(parts: Sequence[Any]) -> Message:
    """Decode and validate the parts of one received message.

    Parameters
    ----------
    parts : sequence of bytes, memoryview or zmq.Frame
        ``[header]`` or ``[header, payload]`` as received (``recv_multipart(copy=False)`` keeps it zero-copy).

    Returns
    -------
    Message
        With a read-only payload array viewing the received buffer.

    Raises
    ------
    ProtocolError
        With a specific ``code`` for anything malformed; nothing else is raised for any input.
    """
    if len(parts) == 0:
        _fail("no_parts", "empty message")
    if len(parts) > 2:
        _fail("too_many_parts", f"{len(parts)} parts; expected [header] or [header, payload]")
    header = _parse_header(_as_buffer(parts[0]))
    payload_buf = _as_buffer(parts[1]) if len(parts) == 2 else None
    _validate_header(header, None if payload_buf is None else payload_buf.nbytes)
    if payload_buf is None:
        return Message(header, None)
    try:
        arr = np.frombuffer(payload_buf, dtype=np.dtype(header["dtype"])).reshape(header["shape"])
    except (TypeError, ValueError) as e:  # unreachable after the checks above; kept so decode never raises else
        _fail("bad_shape", f"payload cannot be viewed as {header['dtype']} {header['shape']}: {e}", header)
    arr.flags.writeable = False
    return Message(header, arr)


# ---------------------------------------------------------------- header validation


def _get(h: Mapping[str, Any], name: str) -> Any:
    if name not in h:
        _fail("missing_field", f"{h.get('type')} message needs {name!r}", h)
    return h[name]


def _check_int(h: Mapping[str, Any], name: str, v: Any, maximum: int = MAX_INDEX) -> int:
    if type(v) is not int:
        _fail("bad_field_type", f"{name} must be an integer, got {type(v).__name__} {v!r}"[:200], h)
    if not 0 <= v <= maximum:
        _fail("bad_value", f"{name}={v} outside [0, {maximum}]", h)
    return v


_NUMBER = (int, float)


def _check_number(h: Mapping[str, Any], name: str, v: Any, *, positive: bool = False) -> float:
    if type(v) not in _NUMBER:
        _fail("bad_field_type", f"{name} must be a number, got {type(v).__name__} {v!r}"[:200], h)
    if not math.isfinite(v):
        _fail("bad_value", f"{name}={v} is not finite", h)
    if positive and v <= 0:
        _fail("bad_value", f"{name}={v} must be > 0", h)
    return float(v)


def _check_str(h: Mapping[str, Any], name: str, v: Any) -> str:
    if type(v) is not str:
        _fail("bad_field_type", f"{name} must be a string, got {type(v).__name__}", h)
    return v


def _check_finite_tree(h: Mapping[str, Any], name: str, v: Any, depth: int = 0) -> None:
    """Free-form JSON (settings, values) must not smuggle NaN/Infinity into session files."""
    if depth > MAX_JSON_DEPTH:
        _fail("bad_value", f"{name} nests deeper than {MAX_JSON_DEPTH} levels", h)
    if type(v) is float and not math.isfinite(v):
        _fail("bad_value", f"{name} contains a non-finite number", h)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_finite_tree(h, f"{name}.{k}", x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_finite_tree(h, name, x, depth + 1)


def _check_common(h: Mapping[str, Any]) -> str:
    proto = _get(h, "proto")
    m = None if proto == PROTO or type(proto) is not str else _PROTO_RE.fullmatch(proto)
    if m is None and proto != PROTO:
        _fail("bad_proto", f"proto {str(proto)[:50]!r} is not 'stemlive/<major>[.<minor>]'", h)
    if m is not None and int(m.group(1)) != PROTO_MAJOR:
        _fail("unsupported_version", f"proto {proto!r}: this receiver speaks major version {PROTO_MAJOR}", h)
    mtype = _check_str(h, "type", _get(h, "type"))
    if mtype not in MESSAGE_TYPES:
        _fail("unknown_type", f"type {mtype[:50]!r} is not one of {sorted(MESSAGE_TYPES)}", h)
    session = _check_str(h, "session", _get(h, "session"))
    link = session == LINK_SESSION and mtype == "heartbeat"
    if not link and session not in _valid_sessions and not _remember_session(session):
        _fail("bad_session_id", f"session id {session[:50]!r} must match [A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}", h)
    seq = _get(h, "seq")
    if type(seq) is not int:
        _fail("bad_field_type", f"seq must be an integer, got {type(seq).__name__}", h)
    if not 0 <= seq <= MAX_SEQ:
        _fail("bad_seq", f"seq={seq} outside [0, 2**63-1]", h)
    t = _get(h, "t")
    if not (mtype == "spectrum" and isinstance(t, list)):
        _check_time(h, t)
    return mtype


_valid_sessions: set[str] = set()  # ids already validated: the regex runs once per session, not per message


def _remember_session(session: str) -> bool:
    if len(session) > MAX_SESSION_ID_LEN or not _SESSION_RE.fullmatch(session):
        return False
    if len(_valid_sessions) > 4096:
        _valid_sessions.clear()
    _valid_sessions.add(session)
    return True


def _check_time(h: Mapping[str, Any], t: Any) -> None:
    if type(t) not in (int, float):
        _fail("bad_field_type", f"t must be a number (Unix seconds), got {type(t).__name__}", h)
    if not (0 <= t <= MAX_TIME):  # False for NaN too
        _fail("bad_time", f"t={t!r:.30} is not a Unix time in [0, {MAX_TIME:.0f}]", h)


def _check_payload_meta(h: Mapping[str, Any], mtype: str, nbytes: int | None) -> None:
    has_meta = "dtype" in h or "shape" in h
    if mtype in HEADER_ONLY_TYPES:
        if nbytes is not None or has_meta:
            _fail("unexpected_payload", f"{mtype} messages carry no payload, dtype or shape", h)
        return
    if nbytes is None:
        if mtype != "result" or has_meta:
            _fail("missing_payload", f"{mtype} message without a payload part", h)
        return
    dtype = _check_str(h, "dtype", _get(h, "dtype"))
    if not _DTYPE_RE.fullmatch(dtype):
        _fail("bad_dtype", f"dtype {dtype[:20]!r} not allowed: numeric int/uint/float with explicit byte order", h)
    shape = _get(h, "shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        _fail("bad_shape", f"shape {str(shape)[:80]} is not a list of at most {MAX_NDIM} non-negative ints", h)
    # every dimension bounded on its own: [0, 2**70] has no elements but cannot be reshaped to
    if any(n > MAX_ELEMENTS for n in shape) or math.prod(max(n, 1) for n in shape) > MAX_ELEMENTS:
        _fail("shape_too_large", f"shape {str(shape)[:80]} exceeds {MAX_ELEMENTS} elements (or has such a dimension)",
              h)
    count = math.prod(shape)
    if count * int(dtype[-1]) > MAX_PAYLOAD_BYTES:
        _fail("shape_too_large", f"shape {shape} x {dtype} needs more than {MAX_PAYLOAD_BYTES} bytes", h)
    allowed = PAYLOAD_NDIM.get(mtype)
    if allowed is not None:
        if len(shape) not in allowed:
            _fail("bad_ndim", f"{mtype} payload must have ndim in {allowed}, got shape {shape}", h)
        if count == 0:
            _fail("bad_shape", f"{mtype} payload shape {shape} is empty", h)
    expected = count * int(dtype[-1])
    if nbytes != expected:
        _fail("payload_size_mismatch", f"payload has {nbytes} bytes; shape {shape} x {dtype} needs {expected}", h)


def _check_session_start(h: Mapping[str, Any]) -> None:
    kind = _check_str(h, "kind", _get(h, "kind"))
    if kind not in SESSION_KINDS:
        _fail("unknown_kind", f"kind {kind[:50]!r} is not one of {sorted(SESSION_KINDS)}", h)
    settings = _get(h, "settings")
    if not isinstance(settings, dict):
        _fail("bad_field_type", f"settings must be an object, got {type(settings).__name__}", h)
    _check_finite_tree(h, "settings", settings)
    _check_settings(h, kind, settings)


def _check_settings(h: Mapping[str, Any], kind: str, settings: Mapping[str, Any]) -> None:
    """The settings the recorder and the stages rely on; other settings are free-form JSON."""
    scan_shape = settings.get("scan_shape")
    if scan_shape is not None:
        if not (isinstance(scan_shape, list) and len(scan_shape) == 2
                and all(type(n) is int and 0 < n <= MAX_SCAN_POINTS for n in scan_shape)
                and scan_shape[0] * scan_shape[1] <= MAX_SCAN_POINTS):
            _fail("bad_settings", f"settings.scan_shape {str(scan_shape)[:60]} must be [ny, nx] positive ints with "
                  f"ny * nx <= {MAX_SCAN_POINTS}", h)
    analysis = settings.get("analysis")
    if analysis is not None and not isinstance(analysis, dict):
        _fail("bad_settings", f"settings.analysis must be an object, got {type(analysis).__name__}", h)


def _check_frame(h: Mapping[str, Any]) -> None:
    for name in ("tilt_index", "frame_index"):
        _check_int(h, name, _get(h, name))
    for name in ("alpha_deg", "beta_deg"):
        _check_number(h, name, _get(h, name))
    for name in ("pixel_size_nm", "dwell_us"):
        _check_number(h, name, _get(h, name), positive=True)


def _check_spectrum(h: Mapping[str, Any]) -> None:
    for name in ("dispersion_meV", "exposure_ms"):
        _check_number(h, name, _get(h, name), positive=True)
    shape = h["shape"]
    if len(shape) == 1:
        for name in ("point_index", "frame_index"):
            _check_int(h, name, _get(h, name))
        for name in ("x_nm", "y_nm", "energy_offset_meV"):
            _check_number(h, name, _get(h, name))
        return
    k = shape[0]
    for name in BATCH_FIELDS:
        v = _get(h, name)
        if not isinstance(v, list):
            _fail("bad_field_type", f"batch spectrum (k={k}) needs {name} as a list, got {type(v).__name__}", h)
        if len(v) != k:
            _fail("batch_length_mismatch", f"{name} has {len(v)} entries for a batch of {k} spectra", h)
    # Whole-list checks (C loops) keep large batches cheap; the first bad entry is then located for the detail.
    for name in ("point_index", "frame_index"):
        v = h[name]
        if not (all(type(x) is int for x in v) and 0 <= min(v) and max(v) <= MAX_INDEX):
            for x in v:
                _check_int(h, name, x)
    for name in ("x_nm", "y_nm", "energy_offset_meV", "t"):
        v = h[name]
        ok = all(type(x) in _NUMBER for x in v) and all(map(math.isfinite, v))
        if not ok or (name == "t" and not (0 <= min(v) and max(v) <= MAX_TIME)):
            for x in v:
                _check_time(h, x) if name == "t" else _check_number(h, name, x)


def _check_survey(h: Mapping[str, Any]) -> None:
    which = _check_str(h, "which", _get(h, "which"))
    if which not in SURVEY_WHICH:
        _fail("bad_value", f"which={which[:20]!r} must be 'before' or 'after'", h)
    _check_number(h, "pixel_size_nm", _get(h, "pixel_size_nm"), positive=True)


def _check_session_end(h: Mapping[str, Any]) -> None:
    status = _check_str(h, "status", _get(h, "status"))
    if status not in END_STATUSES:
        _fail("bad_status", f"status {status[:20]!r} is not one of {sorted(END_STATUSES)}", h)
    messages = _check_int(h, "messages", _get(h, "messages"), maximum=MAX_SEQ)
    if messages != h["seq"] + 1:
        _fail("bad_message_count", f"messages={messages} but seq={h['seq']}: a session's count is last seq + 1", h)
    if "message" in h:
        _check_str(h, "message", h["message"])


def _check_heartbeat(h: Mapping[str, Any]) -> None:
    acks = h.get("acks")
    if acks is not None:
        if not isinstance(acks, dict):
            _fail("bad_field_type", "acks must be an object {session: seq}", h)
        for sid, seq in acks.items():
            _check_int(h, f"acks[{sid[:40]!r}]", seq, maximum=MAX_SEQ)
    nacks = h.get("nacks")
    if nacks is not None:
        if not isinstance(nacks, list) or not all(isinstance(n, dict) for n in nacks):
            _fail("bad_field_type", "nacks must be a list of objects", h)


def _check_result(h: Mapping[str, Any]) -> None:
    for name in ("stage", "name"):
        v = _check_str(h, name, _get(h, name))
        if len(v) > 200 or not _NAME_RE.fullmatch(v) or any(p in (".", "..") for p in v.split("/")):
            _fail("bad_name", f"result {name} {v[:50]!r} is not a safe path of [A-Za-z0-9_.-] segments", h)
    for name in ("index", "topic_seq"):
        if h.get(name) is not None:
            _check_int(h, name, h[name], maximum=MAX_SEQ)
    for name in ("value", "attrs"):
        if name in h:
            _check_finite_tree(h, name, h[name])
    if "attrs" in h and not isinstance(h["attrs"], dict):
        _fail("bad_field_type", "attrs must be an object", h)


_TYPE_CHECKS = {
    "session_start": _check_session_start,
    "frame": _check_frame,
    "spectrum": _check_spectrum,
    "survey": _check_survey,
    "session_end": _check_session_end,
    "heartbeat": _check_heartbeat,
    "result": _check_result,
}


def _validate_header(h: Mapping[str, Any], payload_nbytes: int | None) -> None:
    mtype = _check_common(h)
    _check_payload_meta(h, mtype, payload_nbytes)
    if mtype == "spectrum" and isinstance(h["t"], list) and len(h["shape"]) == 1:
        _fail("bad_field_type", "t must be a number for a single (1-D) spectrum", h)
    _TYPE_CHECKS[mtype](h)


# ---------------------------------------------------------------- stream checks


@dataclass
class SessionState:
    """What a :class:`StreamChecker` knows about one session.

    Attributes
    ----------
    session, kind
        Session id and kind from ``session_start``.
    next_seq
        The seq expected next (one past the highest seq seen).
    received
        Messages accepted so far, session_start and session_end included.
    gaps
        Unfilled missing seq ranges ``(first, last)``, inclusive, in order.
    closed, end_status, declared_messages
        Set by ``session_end`` (or :meth:`StreamChecker.abandon`, which leaves ``end_status`` None).
    """

    session: str
    kind: str
    next_seq: int = 1
    received: int = 1
    gaps: list[tuple[int, int]] = field(default_factory=list)
    closed: bool = False
    end_status: str | None = None
    declared_messages: int | None = None
    frame_shape: tuple[int, ...] | None = None
    n_channels: int | None = None
    n_gap_warnings: int = 0

    @property
    def missing(self) -> int:
        """Number of messages in unfilled gaps."""
        return sum(b - a + 1 for a, b in self.gaps)


class StreamChecker:
    """Stateful checks over the messages of one connection (one open session at a time).

    ``check`` raises :class:`ProtocolError` for a message to reject (log it, keep running). A seq *gap* is not
    a rejection: the message is accepted, the missing range is logged, returned and kept in :meth:`gaps` until
    late arrivals fill it. Link-level heartbeats (session ``""``) are ignored.

    Parameters
    ----------
    max_closed : int
        Closed sessions remembered (for duplicate/late-arrival handling); older ones are forgotten.
    """

    def __init__(self, *, max_closed: int = 64) -> None:
        self._open: SessionState | None = None
        self._closed: OrderedDict[str, SessionState] = OrderedDict()
        self._max_closed = max_closed

    @property
    def open_session(self) -> str | None:
        """Id of the session currently open, if any."""
        return None if self._open is None else self._open.session

    def state(self, session_id: str) -> SessionState | None:
        """State of an open or remembered closed session."""
        if self._open is not None and self._open.session == session_id:
            return self._open
        return self._closed.get(session_id)

    def gaps(self, session_id: str) -> list[tuple[int, int]]:
        """Unfilled missing seq ranges ``(first, last)`` (inclusive) of a session; empty if none or unknown."""
        st = self.state(session_id)
        return [] if st is None else list(st.gaps)

    def abandon(self, session_id: str) -> None:
        """Close an open session without a ``session_end`` (e.g. its sender went silent); later messages for it
        are rejected with ``session_closed`` and a new session may start."""
        if self._open is not None and self._open.session == session_id:
            self._close(self._open)

    def check(self, msg: Message) -> tuple[int, int] | None:
        """Check one decoded message against the stream state and record it.

        Returns
        -------
        tuple or None
            The newly detected missing seq range ``(first, last)`` if ``msg`` skipped ahead, else None.

        Raises
        ------
        ProtocolError
            For a message to reject; the state is unchanged.
        """
        mtype, sid = msg.header["type"], msg.header["session"]
        if mtype == "heartbeat" and sid == LINK_SESSION:
            return None
        if mtype == "result":
            _fail("unexpected_type", "result messages do not belong on the acquisition stream", msg.header)
        if mtype == "session_start" and not (self._open is not None and self._open.session == sid):
            self._start(msg)
            return None
        st = self.state(sid)
        if st is None:
            if self._open is not None:
                _fail("wrong_session", f"message for session {sid!r} while {self._open.session!r} is open", msg.header)
            _fail("no_session", f"{mtype} for session {sid!r} which has not started", msg.header)
        if msg.payload is not None:
            self._check_data(st, msg)
        gap = self._sequence(st, msg)
        self._note_shape(st, msg)
        if mtype == "session_end" and not st.closed:
            st.end_status = msg.header["status"]
            st.declared_messages = msg.header["messages"]
            self._close(st)
            if st.gaps:
                log.warning("session %s ended (%s) with %d missing messages in %d seq ranges (first: %s)",
                            sid, st.end_status, st.missing, len(st.gaps), st.gaps[:5])
        return gap

    @staticmethod
    def _check_data(st: SessionState, msg: Message) -> None:
        """Data kind and shape consistency: what the recorder could not store is refused here."""
        h, payload = msg.header, msg.payload
        assert payload is not None
        mtype = h["type"]
        kinds = DATA_KINDS.get(mtype)
        if kinds is not None and st.kind not in kinds:
            _fail("wrong_kind", f"a {mtype} does not belong in a {st.kind} session", h)
        if mtype == "frame" and st.frame_shape is not None and payload.shape != st.frame_shape:
            _fail("shape_mismatch", f"frame shape {list(payload.shape)} differs from the session's "
                  f"{list(st.frame_shape)}", h)
        if mtype == "spectrum" and st.n_channels is not None and payload.shape[-1] != st.n_channels:
            _fail("shape_mismatch", f"spectrum has {payload.shape[-1]} channels, the session {st.n_channels}", h)

    @staticmethod
    def _note_shape(st: SessionState, msg: Message) -> None:
        payload = msg.payload
        if payload is None:
            return
        if msg.header["type"] == "frame" and st.frame_shape is None:
            st.frame_shape = tuple(payload.shape)
        elif msg.header["type"] == "spectrum" and st.n_channels is None:
            st.n_channels = int(payload.shape[-1])

    def _start(self, msg: Message) -> None:
        sid = msg.header["session"]
        if self._open is not None:
            _fail("session_already_open", f"session_start {sid!r} while {self._open.session!r} is open", msg.header)
        if sid in self._closed:
            _fail("session_reused", f"session id {sid!r} was already used on this connection", msg.header)
        if msg.header["seq"] != 0:
            _fail("bad_start_seq", f"session_start must have seq 0, got {msg.header['seq']}", msg.header)
        self._open = SessionState(sid, msg.header["kind"])

    def _sequence(self, st: SessionState, msg: Message) -> tuple[int, int] | None:
        seq = msg.header["seq"]
        if st.closed:
            if not self._fill(st, seq):
                _fail("session_closed", f"{msg.header['type']} seq {seq} after session {st.session!r} ended",
                      msg.header)
            return None
        if seq == st.next_seq:
            st.next_seq += 1
            st.received += 1
            return None
        if seq > st.next_seq:
            gap = (st.next_seq, seq - 1)
            st.gaps.append(gap)
            st.next_seq = seq + 1
            st.received += 1
            st.n_gap_warnings += 1
            n = st.n_gap_warnings
            if n <= 10 or n & (n - 1) == 0:  # a flood of gaps logs its first ten and then powers of two
                log.warning("session %s: seq gap, messages %d..%d missing (accepted seq %d; gap %d of the session)",
                            st.session, *gap, seq, n)
            return gap
        if not self._fill(st, seq):
            _fail("duplicate_seq", f"seq {seq} of session {st.session!r} already received", msg.header)
        return None

    @staticmethod
    def _fill(st: SessionState, seq: int) -> bool:
        for i, (a, b) in enumerate(st.gaps):
            if a <= seq <= b:
                st.gaps[i : i + 1] = [g for g in ((a, seq - 1), (seq + 1, b)) if g[0] <= g[1]]
                st.received += 1
                log.debug("session %s: late seq %d filled a gap", st.session, seq)
                return True
        return False

    def _close(self, st: SessionState) -> None:
        st.closed = True
        self._open = None
        self._closed[st.session] = st
        while len(self._closed) > self._max_closed:
            self._closed.popitem(last=False)
