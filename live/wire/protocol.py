"""stemlive wire protocol v1: encoding and decoding of messages.

A message is a ZeroMQ multipart message ``[header, payload?]``. The header is a UTF-8 JSON object; the optional
payload is the raw bytes of a C-contiguous numeric array described by the header's ``dtype`` and ``shape``.
Nothing is ever unpickled or evaluated: decoding is ``json.loads`` plus ``np.frombuffer`` after strict checks.

This module is the protocol's public face: :func:`encode`, :func:`decode`, and the schema's names that callers
need (:class:`Message`, :class:`ProtocolError`, :data:`PROTO`, the limits and codes) re-exported from
:mod:`stemlive.live.wire.schema`, where the header rules live. Per-connection stream checks are
:mod:`stemlive.live.wire.streamcheck`. The full specification, with every field and every rejection code, is
``docs/protocol.md``.

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
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from stemlive.live.wire.schema import (
    DTYPE_RE,
    LINK_SESSION,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    PROTO,
    REJECTION_CODES,
    SESSION_KINDS,
    Message,
    ProtocolError,
    fail,
    rejection,
    validate_header,
)

__all__ = ["LINK_SESSION", "MAX_HEADER_BYTES", "MAX_PAYLOAD_BYTES", "MESSAGE_TYPES", "PROTO", "REJECTION_CODES",
           "SESSION_KINDS", "Message", "ProtocolError", "decode", "encode", "json_default"]

# Header keys written first, in this order: SUB prefix subscriptions on result stage/name rely on it.
_LEADING_KEYS = ("proto", "type", "stage", "name", "session", "seq", "t")

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


# One encoder for all messages: json.dumps with any keyword builds a new encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _ordered(header: Mapping[str, Any]) -> dict[str, Any]:
    plain = _PLAIN  # plain values (nearly all of a header) without a call each
    out: dict[str, Any] = {}
    for k in _LEADING_KEYS:
        if k in header:
            v = header[k]
            out[k] = v if type(v) in plain else _jsonable(v)
    for k, v in header.items():
        if k not in out:
            out[k] = v if type(v) in plain else _jsonable(v)
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
        if not DTYPE_RE.fullmatch(arr.dtype.str):
            fail("bad_dtype", f"payload dtype {arr.dtype.str!r} is not a numeric int/uint/float", fields)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        fields["dtype"] = arr.dtype.str
        fields["shape"] = list(arr.shape)
        view = arr.reshape(-1).view(np.uint8).data
    else:
        fields.pop("dtype", None)
        fields.pop("shape", None)
    ordered = _ordered(fields)
    validate_header(ordered, None if view is None else view.nbytes)
    try:
        text = _ENCODER.encode(ordered)
    except (TypeError, ValueError) as e:
        fail("bad_value", f"header is not JSON-serialisable: {e}", ordered)
    data = text.encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        fail("header_too_large", f"{len(data)} bytes > {MAX_HEADER_BYTES}", ordered)
    return [data] if view is None else [data, view]


# ---------------------------------------------------------------- decoding


def _as_buffer(part: Any) -> memoryview:
    buf = getattr(part, "buffer", None)  # zmq.Frame: zero-copy view of the received message
    if buf is not None:
        part = buf
    try:
        return memoryview(part).cast("B")
    except TypeError as e:
        detail = f"part of type {type(part).__name__} is not a contiguous bytes-like buffer: {e}"
        raise rejection("bad_part", detail) from e


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


# One decoder for all messages: json.loads with any keyword builds a new decoder and scanner per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=float)


def _parse_header(raw: memoryview) -> dict[str, Any]:
    if raw.nbytes > MAX_HEADER_BYTES:
        fail("header_too_large", f"{raw.nbytes} bytes > {MAX_HEADER_BYTES}")
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as e:
        fail("bad_utf8", str(e))
    try:
        obj = _DECODER.decode(text)
    except _DuplicateKey as e:
        fail("duplicate_key", f"key {e.args[0]!r} appears more than once")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too large to convert, too deep
        fail("bad_json", f"{type(e).__name__}: {str(e)[:200]}")
    if not isinstance(obj, dict):
        fail("header_not_object", f"header JSON is a {type(obj).__name__}, not an object")
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
        fail("no_parts", "empty message")
    if len(parts) > 2:
        fail("too_many_parts", f"{len(parts)} parts; expected [header] or [header, payload]")
    header = _parse_header(_as_buffer(parts[0]))
    payload_buf = _as_buffer(parts[1]) if len(parts) == 2 else None
    validate_header(header, None if payload_buf is None else payload_buf.nbytes)
    if payload_buf is None:
        return Message(header, None)
    try:
        arr = np.frombuffer(payload_buf, dtype=np.dtype(header["dtype"])).reshape(header["shape"])
    except (TypeError, ValueError) as e:  # unreachable after the checks above; kept so decode never raises else
        fail("bad_shape", f"payload cannot be viewed as {header['dtype']} {header['shape']}: {e}", header)
    arr.flags.writeable = False
    return Message(header, arr)
