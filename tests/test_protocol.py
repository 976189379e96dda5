"""Wire protocol v1: encoding, validation (every rejection code), fuzzing, stream checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemlive.live.wire import protocol
from stemlive.live.wire.protocol import MESSAGE_TYPES, PROTO, REJECTION_CODES, Message, ProtocolError, decode, encode
from stemlive.live.wire.streamcheck import StreamChecker

T0 = 1_700_000_000.0
FRAME = {"tilt_index": 2, "alpha_deg": -12.5, "beta_deg": 0.0, "frame_index": 3, "pixel_size_nm": 0.02, "dwell_us": 4}
SPECTRUM = {"point_index": 5, "frame_index": 7, "x_nm": 8.0, "y_nm": 0.0, "energy_offset_meV": -1.5,
            "dispersion_meV": 0.5, "exposure_ms": 300}


def hdr(mtype: str, seq: Any = 1, session: str = "s1", **fields: Any) -> dict[str, Any]:
    """A valid header of ``mtype`` (payload metadata excluded), overridable field by field."""
    base: dict[str, Any] = {"type": mtype, "session": session, "seq": seq, "t": T0}
    defaults: dict[str, dict[str, Any]] = {
        "session_start": {"kind": "tilt_series", "settings": {"tilts_deg": [0, 10], "calibration": {"a": 1.5}}},
        "frame": FRAME,
        "spectrum": SPECTRUM,
        "survey": {"which": "before", "pixel_size_nm": 0.1},
        "session_end": {"status": "complete", "messages": seq + 1 if isinstance(seq, int) else 2},
        "heartbeat": {},
        "result": {"stage": "eels", "name": "temperature", "index": 3},
    }
    return {**base, **defaults[mtype], **fields}


def raw(header: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    """Hand-built parts that bypass encode()'s checks."""
    h = {"proto": PROTO, **header}
    parts = [json.dumps(h).encode()]
    return parts if payload is None else [*parts, payload]


def raw_array(header: dict[str, Any], arr: np.ndarray) -> list[bytes]:
    return raw({**header, "dtype": arr.dtype.str, "shape": list(arr.shape)}, arr.tobytes())


def code_of(parts: list[Any]) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    assert info.value.code in REJECTION_CODES
    return info.value.code


IMG = np.arange(12, dtype=np.float32).reshape(3, 4)
SPEC = np.linspace(0, 1, 16, dtype=np.float32)

# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    ("mtype", "payload"),
    [
        ("session_start", None),
        ("frame", IMG),
        ("spectrum", SPEC),
        ("survey", IMG),
        ("session_end", None),
        ("heartbeat", None),
        ("result", None),
        ("result", np.arange(5.0)),
    ],
)
def test_round_trip_every_type(mtype: str, payload: np.ndarray | None) -> None:
    header = hdr(mtype)
    msg = decode(encode(header, payload))
    assert msg.type == mtype and msg.session == "s1" and msg.seq == 1 and msg.t == T0
    assert msg.header["proto"] == PROTO
    for k, v in header.items():
        assert msg.header[k] == v
    if payload is None:
        assert msg.payload is None
    else:
        assert msg.payload is not None
        np.testing.assert_array_equal(msg.payload, payload)


def test_message_types_cover_spec() -> None:
    assert {"session_start", "frame", "spectrum", "survey", "session_end", "heartbeat", "result"} == MESSAGE_TYPES


@pytest.mark.parametrize("dtype", ["<f4", "<u2", "<i4", ">f8", "|u1", ">i2"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_payload_bit_identical(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 200, size=shape).astype(dtype)
    if arr.dtype.kind == "f":
        arr.reshape(-1)[0] = -0.0  # bit patterns, not just values
    msg = decode(encode(hdr("result"), arr))
    assert msg.payload is not None
    assert msg.payload.dtype == np.dtype(dtype) and msg.payload.shape == shape
    assert msg.payload.tobytes() == arr.tobytes()


def test_encode_is_zero_copy_and_decode_is_read_only_view() -> None:
    arr = np.zeros((64, 64), np.float32)
    parts = encode(hdr("frame"), arr)
    assert isinstance(parts[1], memoryview)
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), arr)
    msg = decode(parts)
    assert msg.payload is not None and not msg.payload.flags.writeable
    assert np.shares_memory(msg.payload, arr)
    with pytest.raises(ValueError, match="read-only"):
        msg.payload[0, 0] = 1


def test_encode_non_contiguous_and_numpy_scalars() -> None:
    arr = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    msg = decode(encode(hdr("frame", tilt_index=np.int64(4), alpha_deg=np.float32(1.5)), arr))
    assert msg.payload is not None
    np.testing.assert_array_equal(msg.payload, arr)
    assert msg.header["tilt_index"] == 4 and type(msg.header["tilt_index"]) is int


def test_batch_spectra() -> None:
    k = 4
    batch = np.arange(k * 16, dtype=np.float32).reshape(k, 16)
    fields: dict[str, Any] = {"point_index": [0, 1, 2, 3], "frame_index": [0] * k, "x_nm": [0.0, 1.6, 3.2, 4.8],
                              "y_nm": [0.0] * k, "energy_offset_meV": [0.1, 0.2, 0.3, 0.4],
                              "t": [T0 + i for i in range(k)]}
    msg = decode(encode(hdr("spectrum", **fields), batch))
    assert msg.is_batch and msg.batch_size == k and msg.t == T0
    assert msg.header["x_nm"] == fields["x_nm"]
    assert msg.payload is not None
    np.testing.assert_array_equal(msg.payload, batch)
    single = decode(encode(hdr("spectrum"), SPEC))
    assert not single.is_batch and single.batch_size == 1


def test_minor_version_accepted() -> None:
    msg = decode(raw({**hdr("heartbeat"), "proto": "stemlive/1.7", "future_field": {"x": 1}}))
    assert msg.header["future_field"] == {"x": 1}


def test_link_heartbeat_may_have_empty_session_and_acks() -> None:
    msg = decode(encode(hdr("heartbeat", session="", acks={"s1": 5}, nacks=[])))
    assert msg.session == "" and msg.header["acks"] == {"s1": 5}


def test_result_header_starts_with_topic_keys() -> None:
    text = encode({"session": "s", "seq": 0, "t": T0, "name": "n", "stage": "eels", "type": "result"})[0]
    assert bytes(text).startswith(b'{"proto":"stemlive/1","type":"result","stage":"eels","name":"n",')


# ------------------------------------------------------------------ rejections by decode


def _frame(**fields: Any) -> list[bytes]:
    return raw_array(hdr("frame", **fields), IMG)


CASES: list[tuple[str, Any]] = [
    ("no_parts", lambda: []),
    ("too_many_parts", lambda: [*_frame(), b"extra"]),
    ("bad_part", lambda: [123]),
    ("header_too_large", lambda: [b" " * (protocol.MAX_HEADER_BYTES + 1)]),
    ("bad_utf8", lambda: [b'{"type": "\xff"}']),
    ("bad_json", lambda: [b'{"type": "frame",']),
    ("bad_json", lambda: [b"[" * 100_000]),
    ("bad_json", lambda: [b'{"seq": 1' + b"0" * 5000 + b"}"]),
    ("duplicate_key", lambda: [b'{"type": "heartbeat", "type": "frame"}']),
    ("header_not_object", lambda: [b"[1, 2]"]),
    ("header_not_object", lambda: [b'"frame"']),
    ("missing_field", lambda: raw({k: v for k, v in hdr("heartbeat").items() if k != "seq"})),
    ("missing_field", lambda: raw_array({k: v for k, v in hdr("frame").items() if k != "dwell_us"}, IMG)),
    ("missing_field", lambda: raw({k: v for k, v in hdr("frame").items()}, IMG.tobytes())),
    ("bad_field_type", lambda: _frame(tilt_index=True)),
    ("bad_field_type", lambda: _frame(frame_index=1.0)),
    ("bad_field_type", lambda: _frame(alpha_deg="0")),
    ("bad_field_type", lambda: raw(hdr("heartbeat", seq="1"))),
    ("bad_field_type", lambda: raw(hdr("session_start", settings=[1]))),
    ("bad_proto", lambda: raw({**hdr("heartbeat"), "proto": "stemlive-1"})),
    ("bad_proto", lambda: raw({**hdr("heartbeat"), "proto": 1})),
    ("unsupported_version", lambda: raw({**hdr("heartbeat"), "proto": "stemlive/2"})),
    ("unsupported_version", lambda: raw({**hdr("heartbeat"), "proto": "stemlive/0.9"})),
    ("unknown_type", lambda: raw({**hdr("heartbeat"), "type": "reboot"})),
    ("bad_seq", lambda: raw(hdr("heartbeat", seq=-1))),
    ("bad_seq", lambda: raw(hdr("heartbeat", seq=2**63))),
    ("bad_time", lambda: raw(hdr("heartbeat", t=-5))),
    ("bad_time", lambda: [b'{"proto":"stemlive/1","type":"heartbeat","session":"s","seq":0,"t":NaN}']),
    ("bad_time", lambda: [b'{"proto":"stemlive/1","type":"heartbeat","session":"s","seq":0,"t":1e999}']),
    ("bad_session_id", lambda: raw(hdr("frame", session=""))),
    ("bad_session_id", lambda: raw(hdr("heartbeat", session="../../etc/passwd"))),
    ("bad_session_id", lambda: raw(hdr("heartbeat", session="x" * 200))),
    ("bad_value", lambda: _frame(tilt_index=-1)),
    ("bad_value", lambda: _frame(pixel_size_nm=0)),
    ("bad_value", lambda: raw_array(hdr("survey", which="during"), IMG)),
    ("bad_value", lambda: [b'{"proto":"stemlive/1","type":"session_start","session":"s","seq":0,"t":1,'
                           b'"kind":"eels_map","settings":{"gain":Infinity}}']),
    ("unknown_kind", lambda: raw(hdr("session_start", kind="movie"))),
    ("bad_status", lambda: raw(hdr("session_end", status="done"))),
    ("bad_message_count", lambda: raw(hdr("session_end", seq=9, messages=3))),
    ("bad_name", lambda: raw(hdr("result", name="../x"))),
    ("bad_name", lambda: raw(hdr("result", stage="eels/../../etc"))),
    ("unexpected_payload", lambda: raw(hdr("heartbeat"), b"abcd")),
    ("unexpected_payload", lambda: raw({**hdr("session_end"), "dtype": "<f4", "shape": [1]})),
    ("missing_payload", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": [3, 4]})),
    ("missing_payload", lambda: raw({**hdr("result"), "dtype": "<f4", "shape": [1]})),
    ("bad_dtype", lambda: raw({**hdr("frame"), "dtype": "|O8", "shape": [1, 1]}, b"\0" * 8)),
    ("bad_dtype", lambda: raw({**hdr("frame"), "dtype": "=f4", "shape": [1, 1]}, b"\0" * 4)),
    ("bad_dtype", lambda: raw({**hdr("frame"), "dtype": "<U1", "shape": [1, 1]}, b"\0" * 4)),
    ("bad_dtype", lambda: raw({**hdr("frame"), "dtype": "[('a','<f4')]", "shape": [1, 1]}, b"\0" * 4)),
    ("bad_dtype", lambda: raw({**hdr("frame"), "dtype": "<c8", "shape": [1, 1]}, b"\0" * 8)),
    ("bad_shape", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": [2, -2]}, b"\0" * 16)),
    ("bad_shape", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": "3x4"}, b"\0" * 48)),
    ("bad_shape", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": [2.0, 2]}, b"\0" * 16)),
    ("bad_shape", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": [0, 4]}, b"")),
    ("shape_too_large", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": [2**20, 2**20]}, b"\0" * 16)),
    ("bad_ndim", lambda: raw_array(hdr("frame"), SPEC)),
    ("bad_ndim", lambda: raw_array(hdr("spectrum"), np.zeros((2, 2, 2), np.float32))),
    ("payload_size_mismatch", lambda: raw({**hdr("frame"), "dtype": "<f4", "shape": [3, 4]}, b"\0" * 47)),
    ("bad_settings", lambda: raw(hdr("session_start", seq=0, settings={"scan_shape": "abc"}))),
    ("batch_length_mismatch", lambda: raw_array(
        hdr("spectrum", point_index=[0, 1, 2], frame_index=[0, 0], x_nm=[0, 0], y_nm=[0, 0],
            energy_offset_meV=[0, 0], t=[T0, T0]), np.zeros((2, 8), np.float32))),
]


@pytest.mark.parametrize(("code", "make"), CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_decode_rejects_with_specific_code(code: str, make: Any) -> None:
    assert code_of(make()) == code


def test_batch_fields_must_be_lists_and_valid() -> None:
    batch = np.zeros((2, 8), np.float32)
    ok: dict[str, Any] = {"point_index": [0, 1], "frame_index": [0, 0], "x_nm": [0, 1], "y_nm": [0, 0],
          "energy_offset_meV": [0, 0], "t": [T0, T0]}
    decode(raw_array(hdr("spectrum", **ok), batch))
    assert code_of(raw_array(hdr("spectrum", **{**ok, "x_nm": 0.0}), batch)) == "bad_field_type"
    assert code_of(raw_array(hdr("spectrum", **{**ok, "point_index": [0, -1]}), batch)) == "bad_value"
    assert code_of(raw_array(hdr("spectrum", **{**ok, "t": [T0, -1]}), batch)) == "bad_time"
    assert code_of(raw_array(hdr("spectrum", t=[T0]), SPEC)) == "bad_field_type"


def test_error_carries_session_and_seq_when_readable() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_frame(tilt_index=-3))
    e = info.value
    assert (e.code, e.session, e.seq) == ("bad_value", "s1", 1)
    assert isinstance(e, ValueError) and "tilt_index" in e.detail  # type: ignore[attr-defined]


def test_encode_validates_too() -> None:
    with pytest.raises(ProtocolError) as info:
        encode(hdr("frame"), np.array([[object()]]))
    assert info.value.code == "bad_dtype"
    with pytest.raises(ProtocolError) as info:
        encode(hdr("frame", t=float("nan")), IMG)
    assert info.value.code == "bad_time"
    with pytest.raises(ProtocolError) as info:
        encode(hdr("session_start", settings={"f": object()}))
    assert info.value.code == "bad_value"


def test_at_least_22_codes_exercised_and_documented() -> None:
    decode_codes = {c for c, _ in CASES}
    stream_codes = {"no_session", "session_already_open", "wrong_session", "bad_start_seq", "session_reused",
                    "duplicate_seq", "session_closed", "unexpected_type", "wrong_kind", "shape_mismatch"}
    # issued by the transport and the service: exercised in test_hostile.py, test_disk_full.py, test_curve.py
    service_codes = {"not_owner", "busy", "disk_full", "record_failed", "internal_error", "unauthorized"}
    assert decode_codes | stream_codes | service_codes == set(REJECTION_CODES)
    assert len(REJECTION_CODES) >= 22
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")
    missing = [c for c in REJECTION_CODES if f"`{c}`" not in doc]
    assert not missing


# ------------------------------------------------------------------ fuzzing

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _valid_parts(mtype: str) -> list[bytes]:
    payload = {"frame": IMG, "survey": IMG, "spectrum": SPEC}.get(mtype)
    return [bytes(p) for p in encode(hdr(mtype), payload)]


def _decode_or_protocol_error(parts: list[Any]) -> None:
    try:
        msg = decode(parts)
    except ProtocolError as e:
        assert e.code in REJECTION_CODES
        return
    assert isinstance(msg, Message) and msg.type in MESSAGE_TYPES
    # A decoded message re-encodes, i.e. it is fully valid.
    encode(msg.header, msg.payload)


FUZZ = settings(
    max_examples=int(os.environ.get("STEMLIVE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_random_bytes(parts: list[bytes]) -> None:
    _decode_or_protocol_error(parts)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted({*FRAME, *SPECTRUM, "proto", "type", "session", "seq", "t", "dtype",
                                                 "shape", "kind", "settings", "status", "messages", "which", "stage",
                                                 "name", "index", "acks", "nacks"})), _json_values, max_size=12),
       st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_random_json_headers(header: dict[str, Any], payload: bytes | None) -> None:
    text = json.dumps(header, allow_nan=True).encode()
    _decode_or_protocol_error([text] if payload is None else [text, payload])


@FUZZ
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
def test_fuzz_mutated_valid_messages(mtype: str, data: st.DataObject) -> None:
    parts = _valid_parts(mtype)
    header = json.loads(parts[0])
    action = data.draw(st.sampled_from(["drop", "set", "bytes"]))
    if action == "drop" and header:
        del header[data.draw(st.sampled_from(sorted(header)))]
    elif action == "set":
        header[data.draw(st.sampled_from(sorted(header)))] = data.draw(_json_values)
    head = json.dumps(header, allow_nan=True).encode()
    if action == "bytes":
        i = data.draw(st.integers(0, len(head) - 1))
        head = head[:i] + bytes([data.draw(st.integers(0, 255))]) + head[i + 1 :]
    tail: list[bytes] = parts[1:]
    truncate: bool = data.draw(st.booleans())
    if tail and truncate:
        tail = [tail[0][: data.draw(st.integers(0, len(tail[0])))]]
    _decode_or_protocol_error([head, *tail])


# ------------------------------------------------------------------ stream checks


def m(mtype: str, seq: int, session: str = "s1", **fields: Any) -> Message:
    payload = {"frame": IMG, "survey": IMG, "spectrum": SPEC}.get(mtype)
    return decode(encode(hdr(mtype, seq=seq, session=session, **fields), payload))


def check_code(checker: StreamChecker, msg: Message) -> str:
    with pytest.raises(ProtocolError) as info:
        checker.check(msg)
    return info.value.code


def test_stream_happy_path() -> None:
    c = StreamChecker()
    assert c.check(m("session_start", 0)) is None
    for seq in range(1, 5):
        assert c.check(m("frame", seq)) is None
    assert c.check(m("heartbeat", 5)) is None
    assert c.check(m("heartbeat", 0, session="")) is None  # link heartbeat: ignored
    c.check(m("session_end", 6))
    st_ = c.state("s1")
    assert st_ is not None and st_.closed and st_.received == 7 and st_.declared_messages == 7 and not st_.gaps
    assert c.open_session is None


def test_stream_rejections() -> None:
    c = StreamChecker()
    assert check_code(c, m("frame", 1)) == "no_session"
    assert check_code(c, m("session_start", 3)) == "bad_start_seq"
    c.check(m("session_start", 0))
    assert check_code(c, m("session_start", 0, session="s2")) == "session_already_open"
    assert check_code(c, m("session_start", 0)) == "duplicate_seq"
    assert check_code(c, m("frame", 1, session="s2")) == "wrong_session"
    assert check_code(c, m("result", 1)) == "unexpected_type"
    c.check(m("frame", 1))
    assert check_code(c, m("frame", 1)) == "duplicate_seq"
    c.check(m("session_end", 2))
    assert check_code(c, m("frame", 3)) == "session_closed"
    assert check_code(c, m("session_end", 2)) == "session_closed"
    assert check_code(c, m("session_start", 0)) == "session_reused"
    c.check(m("session_start", 0, session="s2"))  # a new session may start after the end


def test_stream_gap_accepted_recorded_and_filled() -> None:
    c = StreamChecker()
    c.check(m("session_start", 0))
    c.check(m("frame", 1))
    assert c.check(m("frame", 5)) == (2, 4)
    assert c.check(m("frame", 8)) == (6, 7)
    assert c.gaps("s1") == [(2, 4), (6, 7)]
    assert c.check(m("frame", 3)) is None  # late arrival fills the middle of a gap
    assert c.gaps("s1") == [(2, 2), (4, 4), (6, 7)]
    assert check_code(c, m("frame", 3)) == "duplicate_seq"
    c.check(m("session_end", 9))
    c.check(m("frame", 6))  # late arrival after session_end, still filling a known gap
    st_ = c.state("s1")
    assert st_ is not None
    assert c.gaps("s1") == [(2, 2), (4, 4), (7, 7)] and st_.missing == 3 and st_.received == 7
    assert check_code(c, m("frame", 10)) == "session_closed"


def test_stream_abandon() -> None:
    c = StreamChecker()
    c.check(m("session_start", 0))
    c.abandon("s1")
    assert c.open_session is None
    assert check_code(c, m("frame", 1)) == "session_closed"
    c.check(m("session_start", 0, session="s2"))


# ------------------------------------------------------------------ issue 13 "Found" list, one test per item


@pytest.mark.parametrize(("code", "parts"), [
    ("bad_dtype", raw({**hdr("frame"), "dtype": "<f4\n", "shape": [3, 4]}, IMG.tobytes())),
    ("shape_too_large", raw({**hdr("result"), "dtype": "<f4", "shape": [0, 2**70]}, b"")),
    ("shape_too_large", raw({**hdr("result"), "dtype": "<f4", "shape": [0, 2**40]}, b"")),
    ("shape_too_large", raw({**hdr("frame"), "dtype": "<f8", "shape": [2**20, 2**20]}, b"")),  # 8 TiB
    ("shape_too_large", raw({**hdr("frame"), "dtype": "<f8", "shape": [16384, 16384]}, b"")),  # 2 GiB > 512 MiB
    ("bad_time", raw(hdr("session_start", seq=0, t=1e300))),
    ("bad_time", raw(hdr("session_start", seq=0, t=1e12))),
    ("bad_time", raw_array(hdr("frame", t=1e300), IMG)),
    ("bad_settings", raw(hdr("session_start", seq=0, kind="eels_map", settings={"scan_shape": "abc"}))),
    ("bad_settings", raw(hdr("session_start", seq=0, kind="eels_map", settings={"scan_shape": [0, 3]}))),
    ("bad_settings", raw(hdr("session_start", seq=0, kind="eels_map", settings={"scan_shape": [2**20, 2**20]}))),
    ("bad_settings", raw(hdr("session_start", seq=0, settings={"analysis": [1, 2]}))),
    ("bad_session_id", raw_array(hdr("frame", session="s1\n"), IMG)),
    ("bad_proto", [json.dumps({**hdr("heartbeat"), "proto": "stemlive/1\n"}).encode()]),
    ("bad_name", raw(hdr("result", name="temperature\n"))),
])
def test_found_messages_that_stopped_the_service_are_rejected(code: str, parts: list[bytes]) -> None:
    assert code_of(parts) == code


def test_found_frame_shape_and_channel_count_must_stay_the_same_within_a_session() -> None:
    c = StreamChecker()
    c.check(m("session_start", 0))
    c.check(m("frame", 1))
    assert check_code(c, decode(raw_array(hdr("frame", seq=2), np.zeros((4, 3), np.float32)))) == "shape_mismatch"
    c.check(m("frame", 2))  # the rejection left the state unchanged: seq 2 is still expected
    e = StreamChecker()
    e.check(m("session_start", 0, kind="eels_line_scan", settings={}))
    e.check(m("spectrum", 1))
    assert check_code(e, decode(raw_array(hdr("spectrum", seq=2), np.zeros(17, np.float32)))) == "shape_mismatch"
    batch = hdr("spectrum", seq=2, point_index=[0, 1], frame_index=[0, 0], x_nm=[0, 0], y_nm=[0, 0],
                energy_offset_meV=[0, 0], t=[T0, T0])
    assert check_code(e, decode(raw_array(batch, np.zeros((2, 15), np.float32)))) == "shape_mismatch"
    e.check(decode(raw_array(batch, np.zeros((2, 16), np.float32))))


def test_found_data_kinds_must_match_the_session_kind() -> None:
    c = StreamChecker()
    c.check(m("session_start", 0))  # tilt series
    assert check_code(c, m("spectrum", 1)) == "wrong_kind"
    c.check(m("survey", 1))  # surveys belong to any kind
    e = StreamChecker()
    e.check(m("session_start", 0, kind="eels_map", settings={"scan_shape": [2, 3]}))
    assert check_code(e, m("frame", 1)) == "wrong_kind"
    e.check(m("spectrum", 1))


def test_found_gap_flood_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    c = StreamChecker()
    c.check(m("session_start", 0))
    with caplog.at_level("WARNING", logger="stemlive.live.wire.protocol"):
        for i in range(3000):
            c.check(m("heartbeat", 2 * i + 2))  # every other seq missing
        c.check(m("session_end", 6002))
    assert len(c.gaps("s1")) == 3001  # seq 1, 3, ..., 6001
    assert len(caplog.records) <= 25, len(caplog.records)


# ------------------------------------------------------------------ the frame fast path of validation

_HOSTILE_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63, 10**400, 0.0, -0.5, 1e300, float("nan"),
                              float("inf"), float("-inf"), "", "x", "<f4\n", [], [1], [3, 4], [0, 4], [3, 0],
                              [3, 4, 1], [2**40, 2**40], [True, 4], {}, {"a": 1}, "stemlive/1", "frame", "<f4",
                              ">f8", "|u1", "s1"]


def _frame_header(**fields: Any) -> dict[str, Any]:
    return {"proto": PROTO, **hdr("frame", t=float(T0), alpha_deg=-12.5, beta_deg=0.0, pixel_size_nm=0.02,
                                  dwell_us=4.0), "dtype": "<f4", "shape": [3, 4], **fields}


def _verdict(h: dict[str, Any], nbytes: int | None, fast: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    from stemlive.live.wire import schema

    with monkeypatch.context() as m:
        if not fast:
            m.setattr(schema, "_plain_frame", lambda h, n: False)
        try:
            schema.validate_header(h, nbytes)
        except ProtocolError as e:
            return e.code
        except Exception as e:  # the full validation's own behaviour (e.g. a 400-digit int), kept as it was
            return type(e).__name__
    return "ok"


def test_frame_fast_path_accepts_only_what_the_full_validation_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every frame-header field replaced by each hostile value, deleted, or with a wrong payload size: the fast
    path gives the same verdict (accepted, or the same rejection code) as the full validation alone."""
    from stemlive.live.wire import schema

    base = _frame_header()
    decode(raw_array({k: v for k, v in base.items() if k not in ("dtype", "shape")}, IMG))  # session id now known
    assert schema._plain_frame(base, 48), "the plain frame must take the fast path"
    cases: list[tuple[dict[str, Any], int | None]] = [(base, 48), (base, 47), (base, None), (base, 96)]
    for key in base:
        cases.append(({k: v for k, v in base.items() if k != key}, 48))
        for value in _HOSTILE_VALUES:
            cases.append(({**base, key: value}, 48))
    cases.append(({**base, "session": "never-seen-before-id"}, 48))  # valid, but not yet known: the long way
    cases.append(({**base, "extra_field": [1, 2]}, 48))
    accepted = 0
    for h, nbytes in cases:
        fast, full = _verdict(h, nbytes, True, monkeypatch), _verdict(h, nbytes, False, monkeypatch)
        assert fast == full, (h, nbytes, fast, full)
        accepted += fast == "ok"
    assert 5 < accepted < len(cases) - 300  # both verdicts exercised
