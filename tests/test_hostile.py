"""Hostile-message suite: >= 100 kinds of malformed or hostile message against a running service.

Each case asserts three things: the service is alive, the specific rejection code reached the offending
connection (a raw DEALER socket reading the service's link heartbeats), and a valid session sent by another
connection, open while the hostile message arrives, closed ``complete`` and bit-identical with its ``end()`` OK.

Outsider cases hit a service whose one session slot is held by the valid sender. Own-session cases need the
offender to own a session (shape or kind inconsistencies inside it), which the service records one at a time: the
valid session then runs right after the offender's, on the same service. The whole suite runs against one
in-thread :class:`PipelineService` (the real class, real sockets on loopback); a representative subset, the seven
single-message killers of the issue among them, runs against a real ``stemlive serve`` process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zmq
from commands import STEMLIVE
from counting_stage import CountingStage

from stemlive.live.pipeline.service import PipelineService
from stemlive.live.wire import protocol, transport

T0 = 1_700_000_000.0
SIZE = 16
FRAME = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "frame_index": 0, "pixel_size_nm": 0.1,
         "dwell_us": 2.0}
SPECTRUM = {"point_index": 0, "frame_index": 0, "x_nm": 0.0, "y_nm": 0.0, "energy_offset_meV": -1.0,
            "dispersion_meV": 0.5, "exposure_ms": 3.0}
GOOD = np.zeros((SIZE, SIZE), np.float32).tobytes()


# ------------------------------------------------------------------------------------------------ helpers


def raw(header: dict[str, Any], *payload: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *payload]


@dataclass
class Ctx:
    """What a case may refer to: the valid session open meanwhile, and a fresh id for the offender."""

    victim: str
    victim_seq: int
    own: str


def base(ctx: Ctx, mtype: str = "frame", **over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"proto": protocol.PROTO, "type": mtype, "session": ctx.own, "seq": 1, "t": T0}
    if mtype == "frame":
        h.update(FRAME, dtype="<f4", shape=[SIZE, SIZE])
    elif mtype == "spectrum":
        h.update(SPECTRUM, dtype="<f4", shape=[16])
    elif mtype == "session_start":
        h.update(seq=0, kind="tilt_series", settings={})
    elif mtype == "session_end":
        h.update(status="complete", messages=2)
    elif mtype == "result":
        h.update(stage="eels", name="temperature")
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()
SPEC = np.zeros(16, np.float32).tobytes()


def frame(ctx: Ctx, payload: bytes = GOOD, **over: Any) -> list[bytes]:
    return raw(base(ctx, "frame", **over), payload)


def hb(ctx: Ctx, **over: Any) -> list[bytes]:
    return raw(base(ctx, "heartbeat", **over))


Make = Callable[[Ctx], list[bytes]]

#: (code, make) for an offender that owns no session while the valid session is open.
OUTSIDER: list[tuple[str, Make]] = [
    # framing
    ("bad_json", lambda c: [b""]),
    ("too_many_parts", lambda c: frame(c) + [b"x"]),
    ("too_many_parts", lambda c: [b"{}"] * 10),
    ("header_too_large", lambda c: [b"{" + b" " * (1 << 20) + b"}"]),
    ("bad_utf8", lambda c: [b"\xff\xfe{}"]),
    ("bad_utf8", lambda c: [b'{"a": "\xc0\xaf"}']),
    ("bad_utf8", lambda c: [b'{"a": "\xed\xa0\x80"}']),
    ("bad_json", lambda c: [b"{not json"]),
    ("bad_json", lambda c: [b'{"a": 1']),
    ("bad_json", lambda c: [b"[" * 100_000 + b"]" * 100_000]),
    ("bad_json", lambda c: [b'{"seq": ' + b"9" * 100_000 + b"}"]),
    ("bad_json", lambda c: [b"\xef\xbb\xbf" + json.dumps(base(c, "heartbeat")).encode()]),
    ("header_not_object", lambda c: [b"[1, 2]"]),
    ("header_not_object", lambda c: [b'"frame"']),
    ("header_not_object", lambda c: [b"null"]),
    ("header_not_object", lambda c: [b"42"]),
    ("duplicate_key", lambda c: [b'{"proto": "stemlive/1", "proto": "stemlive/1"}']),
    ("duplicate_key", lambda c: [b'{"type": "frame", "type": "session_end"}']),
    ("missing_field", lambda c: [b"{}"]),
    ("unexpected_payload", lambda c: raw(base(c, "heartbeat"), GOOD)),
    ("unexpected_payload", lambda c: raw(base(c, "session_end"), GOOD)),
    ("unexpected_payload", lambda c: raw(base(c, "heartbeat", dtype="<f4", shape=[4]))),
    ("unexpected_payload", lambda c: raw(base(c, "session_start"), GOOD)),
    # proto, type, session, seq, t
    ("missing_field", lambda c: frame(c, proto=_DROP)),
    ("bad_proto", lambda c: frame(c, proto=1)),
    ("unsupported_version", lambda c: frame(c, proto="stemlive/2")),
    ("bad_proto", lambda c: frame(c, proto="stemlive/1\n")),
    ("bad_proto", lambda c: frame(c, proto="STEMLIVE/1")),
    ("missing_field", lambda c: frame(c, type=_DROP)),
    ("bad_field_type", lambda c: frame(c, type=7)),
    ("unknown_type", lambda c: frame(c, type="teleport")),
    ("unknown_type", lambda c: frame(c, type="frame\n")),
    ("missing_field", lambda c: frame(c, session=_DROP)),
    ("bad_field_type", lambda c: frame(c, session=5)),
    ("bad_session_id", lambda c: frame(c, session="")),
    ("bad_session_id", lambda c: frame(c, session=c.victim + "\n")),
    ("bad_session_id", lambda c: frame(c, session="../../etc/passwd")),
    ("bad_session_id", lambda c: frame(c, session="s" * 200)),
    ("bad_session_id", lambda c: frame(c, session="s\u00e9ance")),
    ("missing_field", lambda c: frame(c, seq=_DROP)),
    ("bad_field_type", lambda c: frame(c, seq="7")),
    ("bad_field_type", lambda c: frame(c, seq=1.0)),
    ("bad_field_type", lambda c: frame(c, seq=True)),
    ("bad_seq", lambda c: frame(c, seq=-1)),
    ("bad_seq", lambda c: frame(c, seq=2**63)),
    ("bad_seq", lambda c: frame(c, seq=10**30)),
    ("missing_field", lambda c: frame(c, t=_DROP)),
    ("bad_field_type", lambda c: frame(c, t="now")),
    ("bad_time", lambda c: frame(c, t=float("nan"))),
    ("bad_time", lambda c: frame(c, t=float("inf"))),
    ("bad_time", lambda c: frame(c, t=-1.0)),
    ("bad_time", lambda c: frame(c, t=1e300)),
    ("bad_time", lambda c: frame(c, t=1e12)),
    ("bad_field_type", lambda c: frame(c, t=True)),
    # payload metadata and sizes
    ("missing_field", lambda c: frame(c, dtype=_DROP)),
    ("bad_dtype", lambda c: frame(c, dtype="<f4\n")),
    ("bad_dtype", lambda c: frame(c, dtype="O")),
    ("bad_dtype", lambda c: frame(c, dtype="<U4")),
    ("bad_dtype", lambda c: frame(c, dtype="=f4")),
    ("bad_dtype", lambda c: frame(c, dtype="<c8")),
    ("bad_dtype", lambda c: frame(c, dtype="V8")),
    ("bad_field_type", lambda c: frame(c, dtype=4)),
    ("missing_field", lambda c: frame(c, shape=_DROP)),
    ("bad_shape", lambda c: frame(c, shape="16x16")),
    ("bad_shape", lambda c: frame(c, shape=[-16, -16])),
    ("bad_shape", lambda c: frame(c, shape=[16.0, 16])),
    ("bad_shape", lambda c: frame(c, shape=[1] * 9)),
    ("shape_too_large", lambda c: raw(base(c, "result", dtype="<f4", shape=[0, 2**70]), b"")),
    ("shape_too_large", lambda c: frame(c, shape=[2**20, 2**20])),  # 4 TiB
    ("shape_too_large", lambda c: raw(base(c, "spectrum", shape=[2**40]), SPEC)),  # 4 TiB
    ("shape_too_large", lambda c: frame(c, shape=[1, 2**31 + 1])),
    ("shape_too_large", lambda c: frame(c, dtype="<f8", shape=[16384, 16384])),  # 2 GiB
    ("bad_shape", lambda c: frame(c, b"", shape=[0, 16])),
    ("bad_ndim", lambda c: frame(c, shape=[SIZE * SIZE])),
    ("bad_ndim", lambda c: raw(base(c, "spectrum", shape=[2, 2, 4]), SPEC)),
    ("payload_size_mismatch", lambda c: frame(c, shape=[SIZE, SIZE - 1])),
    ("payload_size_mismatch", lambda c: frame(c, GOOD + b"\0")),
    ("missing_payload", lambda c: raw(base(c, "frame"))),
    ("missing_payload", lambda c: raw(base(c, "result", dtype="<f4", shape=[4]))),
    # field types and ranges
    ("bad_value", lambda c: frame(c, tilt_index=-1)),
    ("bad_value", lambda c: frame(c, tilt_index=2**31)),
    ("bad_field_type", lambda c: frame(c, tilt_index="0")),
    ("bad_field_type", lambda c: frame(c, tilt_index=1.5)),
    ("bad_value", lambda c: frame(c, alpha_deg=float("nan"))),
    ("bad_field_type", lambda c: frame(c, alpha_deg="x")),
    ("bad_value", lambda c: frame(c, pixel_size_nm=0)),
    ("bad_value", lambda c: frame(c, pixel_size_nm=-1.0)),
    ("bad_value", lambda c: frame(c, dwell_us=float("inf"))),
    ("missing_field", lambda c: frame(c, tilt_index=_DROP)),
    ("batch_length_mismatch", lambda c: raw(base(
        c, "spectrum", shape=[2, 16], point_index=[0, 1, 2], frame_index=[0, 0], x_nm=[0, 0], y_nm=[0, 0],
        energy_offset_meV=[0, 0], t=[T0, T0]), SPEC * 2)),
    ("bad_field_type", lambda c: raw(base(
        c, "spectrum", shape=[2, 16], point_index=[0, 1], frame_index=[0, 0], x_nm=0.0, y_nm=[0, 0],
        energy_offset_meV=[0, 0], t=[T0, T0]), SPEC * 2)),
    ("bad_value", lambda c: raw(base(c, "spectrum", dispersion_meV=0), SPEC)),
    ("unknown_kind", lambda c: raw(base(c, "session_start", kind="holography"))),
    ("bad_field_type", lambda c: raw(base(c, "session_start", settings="abc"))),
    ("bad_settings", lambda c: raw(base(c, "session_start", kind="eels_map", settings={"scan_shape": "abc"}))),
    ("bad_value", lambda c: raw(base(c, "session_start", settings=_nested(40)))),
    ("bad_time", lambda c: raw(base(c, "session_start", t=1e300))),
    ("bad_time", lambda c: raw(base(c, "session_start", t=1e12))),
    ("bad_status", lambda c: raw(base(c, "session_end", status="maybe"))),
    ("bad_message_count", lambda c: raw(base(c, "session_end", messages=7))),
    ("bad_field_type", lambda c: raw(base(c, "session_end", message=5))),
    ("unexpected_type", lambda c: raw(base(c, "result"))),
    ("bad_name", lambda c: raw(base(c, "result", name="../x"))),
    ("bad_name", lambda c: raw(base(c, "result", name="temperature\n"))),
    ("bad_field_type", lambda c: hb(c, acks=[1, 2])),
    # cross-connection tricks
    ("not_owner", lambda c: raw(base(c, "session_end", session=c.victim, seq=c.victim_seq,
                                     messages=c.victim_seq + 1))),
    ("not_owner", lambda c: frame(c, session=c.victim, seq=c.victim_seq)),
    ("not_owner", lambda c: frame(c, session=c.victim, seq=0)),
    ("not_owner", lambda c: hb(c, session=c.victim, seq=c.victim_seq)),
    ("not_owner", lambda c: raw(base(c, "session_start", session=c.victim))),
    ("not_owner", lambda c: raw(base(c, "survey", session=c.victim, seq=c.victim_seq, which="after",
                                      pixel_size_nm=0.1, dtype="<f4", shape=[SIZE, SIZE]), GOOD)),
    ("busy", lambda c: raw(base(c, "session_start"))),
    ("wrong_session", lambda c: frame(c)),
    ("wrong_session", lambda c: raw(base(c, "session_end"))),
    ("wrong_session", lambda c: hb(c)),
]


def _nested(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"a": out}
    return out


@dataclass
class Own:
    """An offender owning its own session: messages before the hostile one, the hostile one, its code."""

    code: str
    kind: str
    settings: dict[str, Any]
    make: Callable[[str], list[list[bytes]]]  # session id -> messages after its session_start (last: hostile)


def _f(sid: str, seq: int, shape: tuple[int, int] = (SIZE, SIZE), **over: Any) -> list[bytes]:
    h = {"proto": protocol.PROTO, "type": "frame", "session": sid, "seq": seq, "t": T0, **FRAME,
         "dtype": "<f4", "shape": list(shape), **over}
    return raw(h, np.zeros(shape, np.float32).tobytes())


def _s(sid: str, seq: int, channels: int = 16, **over: Any) -> list[bytes]:
    h = {"proto": protocol.PROTO, "type": "spectrum", "session": sid, "seq": seq, "t": T0, **SPECTRUM,
         "dtype": "<f4", "shape": [channels], **over}
    return raw(h, np.zeros(channels, np.float32).tobytes())


def _start(sid: str, seq: int = 0, kind: str = "tilt_series", **settings: Any) -> list[bytes]:
    return raw({"proto": protocol.PROTO, "type": "session_start", "session": sid, "seq": seq, "t": T0,
                "kind": kind, "settings": settings})


OWN: list[Own] = [
    Own("shape_mismatch", "tilt_series", {}, lambda s: [_f(s, 1), _f(s, 2, (SIZE, SIZE + 1))]),
    Own("shape_mismatch", "tilt_series", {}, lambda s: [_f(s, 1), _f(s, 2, (8, 8))]),
    Own("shape_mismatch", "eels_line_scan", {}, lambda s: [_s(s, 1), _s(s, 2, 17)]),
    Own("wrong_kind", "tilt_series", {}, lambda s: [_f(s, 1), _s(s, 2)]),
    Own("wrong_kind", "eels_line_scan", {}, lambda s: [_s(s, 1), _f(s, 2)]),
    Own("wrong_kind", "eels_map", {"scan_shape": [2, 3]}, lambda s: [_f(s, 1)]),
    Own("duplicate_seq", "tilt_series", {}, lambda s: [_f(s, 1), _f(s, 1)]),
    Own("session_already_open", "tilt_series", {}, lambda s: [_start(s + "-b")]),
    Own("duplicate_seq", "tilt_series", {}, lambda s: [_start(s)]),
    Own("wrong_session", "tilt_series", {}, lambda s: [_f(s + "-other", 1)]),
    Own("session_closed", "tilt_series", {}, lambda s: [raw({
        "proto": protocol.PROTO, "type": "session_end", "session": s, "seq": 1, "t": T0, "status": "complete",
        "messages": 2}), _f(s, 2)]),
    Own("session_reused", "tilt_series", {}, lambda s: [raw({
        "proto": protocol.PROTO, "type": "session_end", "session": s, "seq": 1, "t": T0, "status": "complete",
        "messages": 2}), _start(s)]),
    Own("bad_time", "tilt_series", {}, lambda s: [_f(s, 1), _f(s, 2, t=1e300)]),
]
# Offenders without a session at all.
NO_SESSION: list[tuple[str, list[bytes]]] = [
    ("no_session", _f("never-started", 1)),
    ("bad_start_seq", _start("late-start", seq=5)),
    ("bad_settings", _start("bad-map", kind="eels_map", scan_shape="abc")),
]


class Offender:
    """A raw DEALER connection that reads the nacks the service sends back to it."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self.sock.connect(endpoint)
        self.nacks: list[dict[str, Any]] = []
        self.acks: dict[str, int] = {}

    def send(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def read(self, timeout_s: float) -> None:
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            while True:
                try:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                h = protocol.decode(parts).header
                self.nacks.extend(h.get("nacks") or [])
                self.acks.update(h.get("acks") or {})

    def wait_nack(self, code: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for n in self.nacks:
                if n["code"] == code:
                    return n
            self.read(0.05)
        raise AssertionError(f"no nack {code!r} reached the offender; got {[n['code'] for n in self.nacks]}")

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass
class Target:
    """A running service: its frame endpoint, where its files go, and how to tell it is alive."""

    endpoint: str
    out_dir: Path
    alive: Callable[[], bool]


class Valid:
    """The valid sender: one FrameSender for the module, one session per case, checked bit for bit."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sender = transport.FrameSender(target.endpoint, timeout_s=20, heartbeat_interval_s=0.5)
        self.rng = np.random.default_rng(13)

    def open(self) -> tuple[transport.SessionStream, list[np.ndarray]]:
        stream = transport.SessionStream(self.sender, "tilt_series", {"note": "valid"})
        stream.start()
        frames = [self.rng.random((SIZE, SIZE), dtype=np.float32) for _ in range(3)]
        stream.frame(frames[0], **{**FRAME, "frame_index": 0})
        self.sender.wait_acknowledged(stream.session_id, 1, 10)  # the session is open in the service
        return stream, frames

    def finish(self, stream: transport.SessionStream, frames: list[np.ndarray]) -> None:
        for i, image in enumerate(frames[1:], 1):
            stream.frame(image, **{**FRAME, "frame_index": i})
        stream.end("complete", timeout_s=20)  # raises if the service rejected any of its messages
        (path,) = self.target.out_dir.glob(f"*_{stream.session_id}.h5")
        with h5py.File(path, "r") as f:
            assert f.attrs["status"] == "complete"
            stored = f["tilt_series/frames"][()]
        assert stored.dtype == np.float32 and stored.shape == (len(frames), SIZE, SIZE)
        assert stored.tobytes() == np.stack(frames).tobytes()  # bit-identical
        assert self.target.alive()

    def run(self) -> None:
        stream, frames = self.open()
        self.finish(stream, frames)


def outsider_case(target: Target, valid: Valid, code: str, make: Make) -> None:
    stream, frames = valid.open()
    offender = Offender(target.endpoint)
    try:
        ctx = Ctx(stream.session_id, stream.seq, f"intruder-{uuid.uuid4().hex[:8]}")
        offender.send(make(ctx))
        nack = offender.wait_nack(code)
        if code == "busy":
            assert nack["owner_session"] == stream.session_id and nack["owner_age_s"] >= 0
        valid.finish(stream, frames)
        assert not any(n["code"] != code for n in offender.nacks), offender.nacks
    finally:
        offender.close()


def own_case(target: Target, valid: Valid, case: Own) -> None:
    offender = Offender(target.endpoint)
    sid = f"own-{uuid.uuid4().hex[:8]}"
    try:
        offender.send(_start(sid, kind=case.kind, **case.settings))
        for parts in case.make(sid):
            offender.send(parts)
        offender.wait_nack(case.code)
        offender.send(raw({"proto": protocol.PROTO, "type": "session_end", "session": sid, "seq": 50, "t": T0,
                           "status": "aborted", "messages": 51}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list(target.out_dir.glob(f"*_{sid}.h5")):
            time.sleep(0.02)
        valid.run()  # the next sender gets a working service with its session recorded bit for bit
    finally:
        offender.close()


def no_session_case(target: Target, valid: Valid, code: str, parts: list[bytes]) -> None:
    offender = Offender(target.endpoint)
    try:
        offender.send(parts)
        offender.wait_nack(code)
        valid.run()
    finally:
        offender.close()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, Valid]]:
    out = tmp_path_factory.mktemp("hostile")
    svc = PipelineService(out, {}, frame_endpoint="tcp://127.0.0.1:*", result_endpoint="tcp://127.0.0.1:*",
                          stage_classes={"counting": CountingStage}, commit_interval_s=0.02, reserve_bytes=0)
    with svc:
        target = Target(svc.frame_endpoint, out, lambda: svc._error is None and all(
            t.is_alive() for t in svc._threads))
        valid = Valid(target)
        yield target, valid
        valid.sender.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, Valid]]:
    out = tmp_path_factory.mktemp("hostile-serve")
    frames = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [*STEMLIVE, "serve", "--frames", frames, "--results",
         f"tcp://127.0.0.1:{_free_port()}", "--out", str(out), "--reserve-mib", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert re.search("frames on", line), line
    target = Target(frames, out, lambda: proc.poll() is None)
    valid = Valid(target)
    try:
        yield target, valid
    finally:
        valid.sender.close()
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------------------------ tests


def test_at_least_100_hostile_kinds() -> None:
    assert len(OUTSIDER) + len(OWN) + len(NO_SESSION) >= 100
    codes = {c for c, _ in OUTSIDER} | {o.code for o in OWN} | {c for c, _ in NO_SESSION}
    assert len(codes) >= 30


@pytest.mark.parametrize(("code", "make"), OUTSIDER, ids=[f"{i:03d}-{c}" for i, (c, _) in enumerate(OUTSIDER)])
def test_outsider(service: tuple[Target, Valid], code: str, make: Make) -> None:
    outsider_case(*service, code, make)


@pytest.mark.parametrize("case", OWN, ids=[f"{i:02d}-{o.code}" for i, o in enumerate(OWN)])
def test_own_session(service: tuple[Target, Valid], case: Own) -> None:
    own_case(*service, case)


@pytest.mark.parametrize(("code", "parts"), NO_SESSION, ids=[c for c, _ in NO_SESSION])
def test_no_session(service: tuple[Target, Valid], code: str, parts: list[bytes]) -> None:
    no_session_case(*service, code, parts)


# The single-message killers and cross-connection tricks, against a real `stemlive serve` process.
PROCESS_SUBSET = [i for i, (c, _) in enumerate(OUTSIDER) if c in {"not_owner", "busy", "shape_too_large"}] + [
    i for i, (c, m) in enumerate(OUTSIDER) if c in {"bad_dtype", "bad_time", "bad_settings"}][:8]


@pytest.mark.parametrize("index", PROCESS_SUBSET, ids=[f"{i:03d}-{OUTSIDER[i][0]}" for i in PROCESS_SUBSET])
def test_outsider_against_stemlive_serve(serve_process: tuple[Target, Valid], index: int) -> None:
    outsider_case(*serve_process, *OUTSIDER[index])


@pytest.mark.parametrize("index", [0, 1, 3, 4], ids=[OWN[i].code for i in [0, 1, 3, 4]])
def test_own_session_against_stemlive_serve(serve_process: tuple[Target, Valid], index: int) -> None:
    own_case(*serve_process, OWN[index])


@pytest.mark.grid
@pytest.mark.parametrize(("code", "make"), OUTSIDER, ids=[f"{i:03d}-{c}" for i, (c, _) in enumerate(OUTSIDER)])
def test_every_outsider_against_stemlive_serve(serve_process: tuple[Target, Valid], code: str, make: Make) -> None:
    outsider_case(*serve_process, code, make)


@pytest.mark.grid
@pytest.mark.parametrize("case", OWN, ids=[f"{i:02d}-{o.code}" for i, o in enumerate(OWN)])
def test_every_own_session_case_against_stemlive_serve(serve_process: tuple[Target, Valid], case: Own) -> None:
    own_case(*serve_process, case)


def test_found_a_bad_scan_shape_followed_by_a_spectrum(service: tuple[Target, Valid]) -> None:
    """Found 1: an eels_map whose settings have scan_shape "abc", followed by a spectrum, stopped the service."""
    target, valid = service
    offender = Offender(target.endpoint)
    try:
        offender.send(_start("abc-map", kind="eels_map", scan_shape="abc"))
        offender.send(_s("abc-map", 1))
        offender.wait_nack("bad_settings")
        offender.wait_nack("no_session")
        valid.run()
        assert not list(target.out_dir.glob("*abc-map*"))
    finally:
        offender.close()


def test_a_flood_of_hostile_messages_from_many_connections(
    service: tuple[Target, Valid], caplog: pytest.LogCaptureFixture
) -> None:
    """5,000 hostile messages from 20 connections during a valid session: it completes bit for bit, every
    offender is told, and the log stays short (rate-limited)."""
    target, valid = service
    caplog.set_level("WARNING")
    stream, frames = valid.open()
    offenders = [Offender(target.endpoint) for _ in range(20)]
    try:
        ctx = Ctx(stream.session_id, stream.seq, "flood")
        kinds = [make for _, make in OUTSIDER if _ != "header_too_large"]
        for i in range(5000):
            offenders[i % 20].send(kinds[i % len(kinds)](ctx))
        for o in offenders:
            deadline = time.monotonic() + 20
            while len(o.nacks) < 250 and time.monotonic() < deadline:
                o.read(0.05)
            assert len(o.nacks) == 250, len(o.nacks)  # every message of every offender was answered
        valid.finish(stream, frames)
    finally:
        for o in offenders:
            o.close()
    rejected_lines = [r for r in caplog.records if "rejected message" in r.getMessage()]
    assert len(rejected_lines) < 200, len(rejected_lines)
