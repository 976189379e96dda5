"""stemlive wire protocol v1: the message schema -- types, limits, rejection codes and header validation.

What a valid message is, independent of its bytes: :func:`validate_header` checks a parsed header (and its
payload's size) against every rule of ``docs/protocol.md`` and raises :class:`ProtocolError` with a specific
code. Encoding and decoding (:mod:`stemlive.live.wire.protocol`) call it on every message; per-connection
stream checks (session lifecycle, seq order, consistency within a session) are :mod:`stemlive.live.wire.streamcheck`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

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

_PROTO_RE = re.compile(r"stemlive/(\d{1,6})(?:\.(\d{1,6}))?")
_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
# Explicit byte order for multi-byte types; '=' (native) is ambiguous on the wire and refused.
DTYPE_RE = re.compile(r"(?:[<>](?:[iu][248]|f[248])|[<>|]?[iu]1)")
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


def rejection(code: str, detail: str, header: Mapping[str, Any] | None = None) -> ProtocolError:
    """:class:`ProtocolError` ``code``, with the session id and seq of ``header`` where readable (to raise)."""
    session = seq = None
    if header is not None:
        s, q = header.get("session"), header.get("seq")
        session = s if isinstance(s, str) else None
        seq = q if type(q) is int else None
    return ProtocolError(code, detail, session=session, seq=seq)


def fail(code: str, detail: str, header: Mapping[str, Any] | None = None) -> NoReturn:
    """Raise :func:`rejection` ``code``."""
    raise rejection(code, detail, header)


# ---------------------------------------------------------------- header validation


def _get(h: Mapping[str, Any], name: str) -> Any:
    if name not in h:
        fail("missing_field", f"{h.get('type')} message needs {name!r}", h)
    return h[name]


def _check_int(h: Mapping[str, Any], name: str, v: Any, maximum: int = MAX_INDEX) -> int:
    if type(v) is not int:
        fail("bad_field_type", f"{name} must be an integer, got {type(v).__name__} {v!r}"[:200], h)
    if not 0 <= v <= maximum:
        fail("bad_value", f"{name}={v} outside [0, {maximum}]", h)
    return v


_NUMBER = (int, float)


def _check_number(h: Mapping[str, Any], name: str, v: Any, *, positive: bool = False) -> float:
    if type(v) not in _NUMBER:
        fail("bad_field_type", f"{name} must be a number, got {type(v).__name__} {v!r}"[:200], h)
    if not math.isfinite(v):
        fail("bad_value", f"{name}={v} is not finite", h)
    if positive and v <= 0:
        fail("bad_value", f"{name}={v} must be > 0", h)
    return float(v)


def _check_str(h: Mapping[str, Any], name: str, v: Any) -> str:
    if type(v) is not str:
        fail("bad_field_type", f"{name} must be a string, got {type(v).__name__}", h)
    return v


def _check_finite_tree(h: Mapping[str, Any], name: str, v: Any, depth: int = 0) -> None:
    """Free-form JSON (settings, values) must not smuggle NaN/Infinity into session files."""
    if depth > MAX_JSON_DEPTH:
        fail("bad_value", f"{name} nests deeper than {MAX_JSON_DEPTH} levels", h)
    if type(v) is float and not math.isfinite(v):
        fail("bad_value", f"{name} contains a non-finite number", h)
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
        fail("bad_proto", f"proto {str(proto)[:50]!r} is not 'stemlive/<major>[.<minor>]'", h)
    if m is not None and int(m.group(1)) != PROTO_MAJOR:
        fail("unsupported_version", f"proto {proto!r}: this receiver speaks major version {PROTO_MAJOR}", h)
    mtype = _check_str(h, "type", _get(h, "type"))
    if mtype not in MESSAGE_TYPES:
        fail("unknown_type", f"type {mtype[:50]!r} is not one of {sorted(MESSAGE_TYPES)}", h)
    session = _check_str(h, "session", _get(h, "session"))
    link = session == LINK_SESSION and mtype == "heartbeat"
    if not link and session not in _valid_sessions and not _remember_session(session):
        fail("bad_session_id", f"session id {session[:50]!r} must match [A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}", h)
    seq = _get(h, "seq")
    if type(seq) is not int:
        fail("bad_field_type", f"seq must be an integer, got {type(seq).__name__}", h)
    if not 0 <= seq <= MAX_SEQ:
        fail("bad_seq", f"seq={seq} outside [0, 2**63-1]", h)
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
        fail("bad_field_type", f"t must be a number (Unix seconds), got {type(t).__name__}", h)
    if not (0 <= t <= MAX_TIME):  # False for NaN too
        fail("bad_time", f"t={t!r:.30} is not a Unix time in [0, {MAX_TIME:.0f}]", h)


def _check_payload_meta(h: Mapping[str, Any], mtype: str, nbytes: int | None) -> None:
    has_meta = "dtype" in h or "shape" in h
    if mtype in HEADER_ONLY_TYPES:
        if nbytes is not None or has_meta:
            fail("unexpected_payload", f"{mtype} messages carry no payload, dtype or shape", h)
        return
    if nbytes is None:
        if mtype != "result" or has_meta:
            fail("missing_payload", f"{mtype} message without a payload part", h)
        return
    dtype = _check_str(h, "dtype", _get(h, "dtype"))
    if not DTYPE_RE.fullmatch(dtype):
        fail("bad_dtype", f"dtype {dtype[:20]!r} not allowed: numeric int/uint/float with explicit byte order", h)
    shape = _get(h, "shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        fail("bad_shape", f"shape {str(shape)[:80]} is not a list of at most {MAX_NDIM} non-negative ints", h)
    # every dimension bounded on its own: [0, 2**70] has no elements but cannot be reshaped to
    if any(n > MAX_ELEMENTS for n in shape) or math.prod(max(n, 1) for n in shape) > MAX_ELEMENTS:
        fail("shape_too_large", f"shape {str(shape)[:80]} exceeds {MAX_ELEMENTS} elements (or has such a dimension)",
              h)
    count = math.prod(shape)
    if count * int(dtype[-1]) > MAX_PAYLOAD_BYTES:
        fail("shape_too_large", f"shape {shape} x {dtype} needs more than {MAX_PAYLOAD_BYTES} bytes", h)
    allowed = PAYLOAD_NDIM.get(mtype)
    if allowed is not None:
        if len(shape) not in allowed:
            fail("bad_ndim", f"{mtype} payload must have ndim in {allowed}, got shape {shape}", h)
        if count == 0:
            fail("bad_shape", f"{mtype} payload shape {shape} is empty", h)
    expected = count * int(dtype[-1])
    if nbytes != expected:
        fail("payload_size_mismatch", f"payload has {nbytes} bytes; shape {shape} x {dtype} needs {expected}", h)


def _check_session_start(h: Mapping[str, Any]) -> None:
    kind = _check_str(h, "kind", _get(h, "kind"))
    if kind not in SESSION_KINDS:
        fail("unknown_kind", f"kind {kind[:50]!r} is not one of {sorted(SESSION_KINDS)}", h)
    settings = _get(h, "settings")
    if not isinstance(settings, dict):
        fail("bad_field_type", f"settings must be an object, got {type(settings).__name__}", h)
    _check_finite_tree(h, "settings", settings)
    _check_settings(h, kind, settings)


def _check_settings(h: Mapping[str, Any], kind: str, settings: Mapping[str, Any]) -> None:
    """The settings the recorder and the stages rely on; other settings are free-form JSON."""
    scan_shape = settings.get("scan_shape")
    if scan_shape is not None:
        if not (isinstance(scan_shape, list) and len(scan_shape) == 2
                and all(type(n) is int and 0 < n <= MAX_SCAN_POINTS for n in scan_shape)
                and scan_shape[0] * scan_shape[1] <= MAX_SCAN_POINTS):
            fail("bad_settings", f"settings.scan_shape {str(scan_shape)[:60]} must be [ny, nx] positive ints with "
                  f"ny * nx <= {MAX_SCAN_POINTS}", h)
    analysis = settings.get("analysis")
    if analysis is not None and not isinstance(analysis, dict):
        fail("bad_settings", f"settings.analysis must be an object, got {type(analysis).__name__}", h)


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
            fail("bad_field_type", f"batch spectrum (k={k}) needs {name} as a list, got {type(v).__name__}", h)
        if len(v) != k:
            fail("batch_length_mismatch", f"{name} has {len(v)} entries for a batch of {k} spectra", h)
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
        fail("bad_value", f"which={which[:20]!r} must be 'before' or 'after'", h)
    _check_number(h, "pixel_size_nm", _get(h, "pixel_size_nm"), positive=True)


def _check_session_end(h: Mapping[str, Any]) -> None:
    status = _check_str(h, "status", _get(h, "status"))
    if status not in END_STATUSES:
        fail("bad_status", f"status {status[:20]!r} is not one of {sorted(END_STATUSES)}", h)
    messages = _check_int(h, "messages", _get(h, "messages"), maximum=MAX_SEQ)
    if messages != h["seq"] + 1:
        fail("bad_message_count", f"messages={messages} but seq={h['seq']}: a session's count is last seq + 1", h)
    if "message" in h:
        _check_str(h, "message", h["message"])


def _check_heartbeat(h: Mapping[str, Any]) -> None:
    acks = h.get("acks")
    if acks is not None:
        if not isinstance(acks, dict):
            fail("bad_field_type", "acks must be an object {session: seq}", h)
        for sid, seq in acks.items():
            _check_int(h, f"acks[{sid[:40]!r}]", seq, maximum=MAX_SEQ)
    nacks = h.get("nacks")
    if nacks is not None:
        if not isinstance(nacks, list) or not all(isinstance(n, dict) for n in nacks):
            fail("bad_field_type", "nacks must be a list of objects", h)


def _check_result(h: Mapping[str, Any]) -> None:
    for name in ("stage", "name"):
        v = _check_str(h, name, _get(h, name))
        if len(v) > 200 or not _NAME_RE.fullmatch(v) or any(p in (".", "..") for p in v.split("/")):
            fail("bad_name", f"result {name} {v[:50]!r} is not a safe path of [A-Za-z0-9_.-] segments", h)
    for name in ("index", "topic_seq"):
        if h.get(name) is not None:
            _check_int(h, name, h[name], maximum=MAX_SEQ)
    for name in ("value", "attrs"):
        if name in h:
            _check_finite_tree(h, name, h[name])
    if "attrs" in h and not isinstance(h["attrs"], dict):
        fail("bad_field_type", "attrs must be an object", h)


_TYPE_CHECKS = {
    "session_start": _check_session_start,
    "frame": _check_frame,
    "spectrum": _check_spectrum,
    "survey": _check_survey,
    "session_end": _check_session_end,
    "heartbeat": _check_heartbeat,
    "result": _check_result,
}


#: Every dtype string :data:`DTYPE_RE` accepts (a small finite set), with its item size.
_DTYPE_SIZES: Mapping[str, int] = {
    d: int(d[-1]) for d in (o + k + n for o in ("", "<", ">", "|") for k in "iuf" for n in "1248")
    if DTYPE_RE.fullmatch(d)
}


def _plain_frame(h: Mapping[str, Any], nbytes: int | None) -> bool:
    """True if ``h`` is a frame header that passes every rule below, checked in one pass (no calls per field).

    The per-message fast path: it only ever accepts, with the same rules as the full validation; anything it
    does not recognise as plainly valid (a new session id, an integer where floats are usual, any doubt) goes
    to the full validation, which accepts it or raises with its specific code.
    """
    try:
        if h["proto"] != PROTO or nbytes is None:
            return False
        session, seq, t, shape = h["session"], h["seq"], h["t"], h["shape"]
        size = _DTYPE_SIZES[h["dtype"]]
        tilt_index, frame_index = h["tilt_index"], h["frame_index"]
        alpha, beta, pixel, dwell = h["alpha_deg"], h["beta_deg"], h["pixel_size_nm"], h["dwell_us"]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype
        return False
    if not (type(session) is str and session in _valid_sessions and type(seq) is int and 0 <= seq <= MAX_SEQ
            and type(t) is float and 0.0 <= t <= MAX_TIME):
        return False
    if not (type(shape) is list and len(shape) == 2):
        return False
    ny, nx = shape
    if not (type(ny) is int and type(nx) is int and 0 < ny <= MAX_ELEMENTS and 0 < nx <= MAX_ELEMENTS
            and ny * nx <= MAX_ELEMENTS and ny * nx * size <= MAX_PAYLOAD_BYTES and nbytes == ny * nx * size):
        return False
    if not (type(tilt_index) is int and 0 <= tilt_index <= MAX_INDEX and type(frame_index) is int
            and 0 <= frame_index <= MAX_INDEX):
        return False
    # floats only (an int goes the long way: math.isfinite of a 400-digit int raises there, as it always did)
    if not (type(alpha) is float and type(beta) is float and type(pixel) is float and type(dwell) is float):
        return False
    return (math.isfinite(alpha) and math.isfinite(beta) and math.isfinite(pixel) and math.isfinite(dwell)
            and pixel > 0 and dwell > 0)


def validate_header(h: Mapping[str, Any], payload_nbytes: int | None) -> None:
    """Check a parsed header (and the byte length of its payload part, None if absent) against protocol v1.

    Raises
    ------
    ProtocolError
        With the specific code of the first rule broken.
    """
    if h.get("type") == "frame" and _plain_frame(h, payload_nbytes):
        return
    mtype = _check_common(h)
    _check_payload_meta(h, mtype, payload_nbytes)
    if mtype == "spectrum" and isinstance(h["t"], list) and len(h["shape"]) == 1:
        fail("bad_field_type", "t must be a number for a single (1-D) spectrum", h)
    _TYPE_CHECKS[mtype](h)
