"""The pipeline service end to end over real ZeroMQ sockets on loopback, with real session files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import pytest
import zmq
from counting_stage import CountingStage

from stemlive.live.config import ConfigError
from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.replay import replay_analyze, replay_to
from stemlive.live.pipeline.run import analyze_messages
from stemlive.live.pipeline.service import PipelineService
from stemlive.live.pipeline.stage import Result, Stage
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire import protocol, transport

ANY_PORT = "tcp://127.0.0.1:*"


class BrokenStage(Stage):
    name = "broken"
    kinds = frozenset({"tilt_series"})
    defaults: ClassVar[dict[str, Any]] = {}

    def process(self, msg: protocol.Message) -> Iterator[Result]:
        raise RuntimeError("deliberate analysis bug")


def small_tilt_session(stream: transport.SessionStream, n_tilts: int = 2, n_frames: int = 3, size: int = 32) -> None:
    stream.start()
    rng = np.random.default_rng(0)
    for tilt in range(n_tilts):
        for frame in range(n_frames):
            stream.frame(rng.random((size, size), dtype=np.float32), tilt_index=tilt, alpha_deg=5.0 * tilt,
                         beta_deg=-2.0 * tilt, frame_index=frame, pixel_size_nm=0.032, dwell_us=4.0)
    stream.end("complete")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[PipelineService]:
    svc = PipelineService(tmp_path / "sessions", {"counting": {"delay_s": 0.0}}, frame_endpoint=ANY_PORT,
                          result_endpoint=ANY_PORT, stage_classes={"counting": CountingStage})
    with svc:
        yield svc


def test_sessions_one_after_another_are_recorded_with_results(service: PipelineService) -> None:
    subscriber = transport.ResultSubscriber(service.result_endpoint)
    time.sleep(0.3)  # let the subscription reach the publisher (PUB drops for unknown subscribers)
    with transport.FrameSender(service.frame_endpoint, timeout_s=20) as sender:
        for _ in range(3):
            small_tilt_session(transport.SessionStream(sender, "tilt_series", {"operator": "test"}))
    files = service.wait_for_sessions(3, timeout_s=30)
    assert len(set(files)) == 3
    for path in files:
        with SessionReader(path) as r:
            assert r.status == "complete" and r.kind == "tilt_series"
            assert r.n_frames == 6
            assert r.settings == {"operator": "test"}
            results = r.results("counting")
            assert int(results["total"]) == 6
            np.testing.assert_array_equal(np.ravel(results["count"]), np.arange(1, 7))
    names = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = subscriber.recv(timeout_s=0.2)
        if msg is None:
            break
        names.add((msg.header["stage"], msg.header["name"]))
    subscriber.close()
    assert ("counting", "count") in names and ("counting", "total") in names


def test_a_failing_stage_costs_no_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"broken": BrokenStage, "counting": CountingStage})
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=20) as sender:
        small_tilt_session(transport.SessionStream(sender, "tilt_series", {}))
        (path,) = svc.wait_for_sessions(1, timeout_s=30)
    assert "deliberate analysis bug" in caplog.text
    with SessionReader(path) as r:
        assert r.status == "complete" and r.n_frames == 6
        assert int(r.results("counting")["total"]) == 6


SENDER_SCRIPT = r"""
import resource, sys, time
import numpy as np
from stemlive.live.wire import transport
endpoint, n = sys.argv[1], int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.monotonic()
with transport.FrameSender(endpoint, timeout_s=120) as sender:
    stream = transport.SessionStream(sender, "tilt_series", {})
    stream.start()
    for i in range(n):
        frame = np.full((512, 512), i, dtype=np.float32)
        stream.frame(frame, tilt_index=i // 100, alpha_deg=0.0, beta_deg=0.0, frame_index=i % 100,
                     pixel_size_nm=0.03, dwell_us=1.0)
    send_s = time.monotonic() - t0
    stream.end("complete", timeout_s=300)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{base} {peak} {send_s:.3f} {time.monotonic() - t0:.3f}")
"""


def test_no_silent_loss_with_a_ten_times_slower_analysis(tmp_path: Path) -> None:
    """2,000 frames of 512x512 float32 (2 GiB) into a service whose stage is ~10x slower than the sender.

    Mechanism: the analysis backlog is bounded (here 64 MiB); past it the receiver stops reading, the
    socket's high-water mark (64 messages) fills and the sender's send() blocks. Bound on the sender's
    memory: high-water mark x frame size (64 MiB) + kernel socket buffers (< 40 MiB on Linux).
    """
    n = 2000
    svc = PipelineService(tmp_path, {"counting": {"delay_s": 0.004}}, frame_endpoint=ANY_PORT,
                          result_endpoint=ANY_PORT, stage_classes={"counting": CountingStage},
                          analysis_buffer_bytes=64 * 2**20)
    with svc:
        proc = subprocess.run([sys.executable, "-c", SENDER_SCRIPT, svc.frame_endpoint, str(n)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        base_kib, peak_kib, send_s, total_s = proc.stdout.split()
        (path,) = svc.wait_for_sessions(1, timeout_s=120)
    growth_mib = (int(peak_kib) - int(base_kib)) / 1024
    assert growth_mib < 64 + 40 + 16, f"sender memory grew by {growth_mib:.0f} MiB"
    with SessionReader(path) as r:
        assert r.status == "complete"
        assert r.n_frames == n
        table = r.frame_table()
        np.testing.assert_array_equal(table["tilt_index"] * 100 + table["frame_index"], np.arange(n))
        frames = r.frames()
        for i in (0, 1, 999, 1500, n - 1):
            assert float(frames[i][0, 0]) == i and float(frames[i][-1, -1]) == i
        assert int(r.results("counting")["total"]) == n
    # The stage needed >= n * 4 ms; the sender alone would have been far faster, so back-pressure acted.
    assert float(total_s) >= n * 0.004 * 0.9


def raw_parts(header: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    parts = [json.dumps(header).encode()]
    if payload is not None:
        parts.append(payload)
    return parts


def test_malformed_messages_are_rejected_while_a_valid_session_is_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage})
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    with svc:
        sock.connect(svc.frame_endpoint)
        sid = "valid-session"
        seq = 0

        def valid(mtype: str, payload: np.ndarray | None = None, **fields: Any) -> None:
            nonlocal seq
            header = {"proto": "stemlive/1", "type": mtype, "session": sid, "seq": seq, "t": time.time(), **fields}
            sock.send_multipart(protocol.encode(header, payload))
            seq += 1

        frame = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
        fields = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.1, "dwell_us": 2.0}

        def base(**over: Any) -> dict[str, Any]:
            h = {"proto": "stemlive/1", "type": "frame", "session": sid, "seq": seq, "t": time.time(),
                 "frame_index": 99, "dtype": "<f4", "shape": [16, 16], **fields}
            h.update(over)
            return h

        good = frame.tobytes()
        malformed: list[tuple[str, list[bytes]]] = [
            ("bad_utf8", [b"\xff\xfe{", good]),
            ("bad_json", [b"{not json", good]),
            ("header_not_object", [b"[1, 2, 3]"]),
            ("missing_field", raw_parts({k: v for k, v in base().items() if k != "seq"}, good)),
            ("missing_field", raw_parts({k: v for k, v in base().items() if k != "tilt_index"}, good)),
            ("unsupported_version", raw_parts(base(proto="stemlive/2"), good)),
            ("bad_proto", raw_parts(base(proto="other/1"), good)),
            ("unknown_type", raw_parts(base(type="teleport"), good)),
            ("payload_size_mismatch", raw_parts(base(shape=[16, 15]), good)),
            ("bad_shape", raw_parts(base(shape=[-16, -16]), good)),
            ("shape_too_large", raw_parts(base(shape=[2**20, 2**20]), good)),
            ("bad_dtype", raw_parts(base(dtype="O"), good)),
            ("bad_dtype", raw_parts(base(dtype="<U4"), good)),
            ("missing_payload", raw_parts(base())),
            ("unexpected_payload", raw_parts(base(type="heartbeat"), good)),
            ("bad_time", raw_parts(base(t=float("nan")), good)),  # json.dumps writes NaN
            ("bad_field_type", raw_parts(base(seq="7"), good)),
            ("bad_field_type", raw_parts(base(tilt_index=True), good)),
            ("bad_ndim", raw_parts(base(shape=[256]), good)),
            ("too_many_parts", raw_parts(base(), good) + [b"extra"]),
            ("duplicate_key", [b'{"proto": "stemlive/1", "proto": "stemlive/1"}']),
            ("session_already_open", raw_parts({"proto": "stemlive/1", "type": "session_start", "session": "intruder",
                                                "seq": 0, "t": time.time(), "kind": "tilt_series", "settings": {}})),
            ("wrong_session", raw_parts(base(session="another"), good)),
            ("duplicate_seq", raw_parts(base(seq=0), good)),
            ("unknown_kind", raw_parts({"proto": "stemlive/1", "type": "session_start", "session": "x2",
                                        "seq": 0, "t": time.time(), "kind": "holography", "settings": {}})),
            ("bad_status", raw_parts({"proto": "stemlive/1", "type": "session_end", "session": sid, "seq": 10**6,
                                      "t": time.time(), "status": "maybe", "messages": 10**6 + 1})),
        ]
        valid("session_start", kind="tilt_series", settings={"note": "interleaved"})
        for i, (_code, parts) in enumerate(malformed):
            valid("frame", frame + i, frame_index=i, **fields)
            sock.send_multipart(parts)
        valid("session_end", status="complete", messages=seq + 1)
        (path,) = svc.wait_for_sessions(1, timeout_s=30)
        assert svc.stats.rejected + sum(svc._receiver.rejected.values()) >= len(malformed) - 0
    sock.close()
    codes = {code for code, _ in malformed}
    assert len(malformed) >= 20 and len(codes) >= 20
    for code in codes:
        assert code in caplog.text, f"no log line names the rejection reason {code!r}"
    with SessionReader(path) as r:
        assert r.status == "complete"
        assert r.n_frames == len(malformed)
        np.testing.assert_array_equal(r.frame_table()["frame_index"], np.arange(len(malformed)))
        for i in range(len(malformed)):
            np.testing.assert_array_equal(r.frames()[i], frame + i)


def record_session(tmp_path: Path, sender_fn: Any) -> Path:
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage})
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=20) as sender:
        sender_fn(sender)
        (path,) = svc.wait_for_sessions(1, timeout_s=30)
    return path


def eels_session(sender: transport.FrameSender) -> None:
    stream = transport.SessionStream(sender, "eels_map", {"scan_shape": [2, 3]})
    stream.start()
    rng = np.random.default_rng(1)
    stream.survey(rng.random((16, 16), dtype=np.float32), which="before", pixel_size_nm=0.5)
    for point in range(6):
        batch = rng.poisson(50, (4, 64)).astype(np.float32)
        stream.spectra(batch, point_index=point, frame_index=list(range(4)), x_nm=0.5 * point, y_nm=0.0,
                       energy_offset_meV=[-20.0, -20.1, -19.9, -20.0], dispersion_meV=0.44, exposure_ms=3.0,
                       t=[time.time() + 0.01 * i for i in range(4)])
    stream.survey(rng.random((16, 16), dtype=np.float32), which="after", pixel_size_nm=0.5)
    stream.end("complete")


def test_replay_at_max_speed_reproduces_frames_and_metadata(tmp_path: Path) -> None:
    original = record_session(tmp_path / "a", eels_session)
    svc = PipelineService(tmp_path / "b", {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage})
    with svc:
        replay_to(original, svc.frame_endpoint, speed=float("inf"))
        (copy,) = svc.wait_for_sessions(1, timeout_s=30)
    with SessionReader(original) as a, SessionReader(copy) as b:
        assert (a.kind, a.status, a.session_id, a.settings) == (b.kind, b.status, b.session_id, b.settings)
        ta, tb = a.spectrum_table(), b.spectrum_table()
        assert ta.keys() == tb.keys()
        for key in ta:
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
        np.testing.assert_array_equal(a.spectra()[:], b.spectra()[:])
        for which in ("before", "after"):
            np.testing.assert_array_equal(a.survey(which), b.survey(which))
    with h5py.File(original) as fa, h5py.File(copy) as fb:
        for name in ("dispersion_meV", "exposure_ms", "scan_shape"):
            np.testing.assert_array_equal(fa["eels/spectra"].attrs[name], fb["eels/spectra"].attrs[name])


def test_replay_analyze_runs_the_same_stages_in_process(tmp_path: Path) -> None:
    original = record_session(tmp_path / "a", eels_session)
    params = make_params(overrides=["eels.k=2"])
    out = tmp_path / "analysed.h5"
    with SessionReader(original) as reader:
        analyze_messages(reader.messages(), out, {"counting": {"delay_s": 0.0}},
                         stage_classes={"counting": CountingStage})
    with SessionReader(out) as r:
        assert r.status == "complete" and r.n_spectra == 24
        assert int(r.results("counting")["total"]) == 6 + 2  # six batched spectrum messages + two surveys
    with pytest.raises(FileExistsError):
        replay_analyze(original, out, params)


def test_parameters_from_file_and_command_line(tmp_path: Path) -> None:
    config = tmp_path / "analysis.toml"
    config.write_text("[eels]\nk = 4\nwindow_min_meV = 60.0\n")
    params = make_params(config, ["eels.k=5", "tilt_series.correct_distortion=false"])
    assert params["eels"]["k"] == 5 and params["eels"]["window_min_meV"] == 60.0
    assert params["tilt_series"]["correct_distortion"] is False
    with pytest.raises(ConfigError, match="unknown parameter eels.kk"):
        make_params(overrides=["eels.kk=3"])
    with pytest.raises(ConfigError, match="unknown analysis stage"):
        make_params(overrides=["nope.k=3"])
    with pytest.raises(ConfigError, match="STAGE.PARAM=VALUE"):
        make_params(overrides=["k3"])
    config.write_text("[eels\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_params(config)


def test_service_refuses_a_non_loopback_bind_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback|allow"):
        PipelineService(tmp_path, {}, frame_endpoint="tcp://0.0.0.0:*", result_endpoint=ANY_PORT,
                        stage_classes={}).start()


def test_a_session_can_carry_its_own_analysis_parameters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from stemlive.live.pipeline.stage import session_params

    params = {"counting": {"delay_s": 0.0}}

    def start(settings: dict[str, Any]) -> protocol.Message:
        return protocol.Message({"proto": "stemlive/1", "type": "session_start", "session": "s", "seq": 0, "t": 1.0,
                                 "kind": "tilt_series", "settings": settings}, None)

    assert session_params(params, start({}))["counting"]["delay_s"] == 0.0
    assert session_params(params, start({"analysis": {"counting": {"delay_s": 0.5}}}))["counting"]["delay_s"] == 0.5
    assert params["counting"]["delay_s"] == 0.0  # the service's own parameters are untouched
    assert session_params(params, start({"analysis": {"counting": {"typo": 1}}})) == params
    assert "analysis settings ignored" in caplog.text and "typo" in caplog.text


# ------------------------------------------------------------------ issue 13: ownership, idle sessions, gap floods

FRAME_FIELDS = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.1, "dwell_us": 2.0}


def intruder(endpoint: str) -> zmq.Socket[Any]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def nack_codes(sock: zmq.Socket[Any], timeout_s: float = 3.0, want: str | None = None) -> list[dict[str, Any]]:
    nacks: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (want and any(n["code"] == want for n in nacks)):
        if sock.poll(50, zmq.POLLIN):
            nacks.extend(protocol.decode(sock.recv_multipart()).header.get("nacks") or [])
    return nacks


def test_found_another_connection_can_neither_end_nor_feed_nor_take_over_a_session(tmp_path: Path) -> None:
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage}, commit_interval_s=0.05)
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=20, heartbeat_interval_s=0.2,
                                    liveness=5) as sender:
        svc._receiver.heartbeat_interval_s = 0.2  # the service declares a silent owner dead after 1 s
        stream = transport.SessionStream(sender, "tilt_series", {})
        stream.start()
        sender.wait_acknowledged(stream.session_id, 0, 10)
        evil = intruder(svc.frame_endpoint)
        sid, t = stream.session_id, time.time()
        frame = np.full((8, 8), 7, np.float32)
        evil.send_multipart(raw_parts({"proto": "stemlive/1", "type": "session_end", "session": sid, "seq": 1,
                                       "t": t, "status": "complete", "messages": 2}))
        evil.send_multipart(raw_parts({"proto": "stemlive/1", "type": "frame", "session": sid, "seq": 2, "t": t,
                                       "frame_index": 0, "dtype": "<f4", "shape": [8, 8], **FRAME_FIELDS},
                                      frame.tobytes()))
        evil.send_multipart(raw_parts({"proto": "stemlive/1", "type": "session_start", "session": sid, "seq": 0,
                                       "t": t, "kind": "tilt_series", "settings": {}}))
        nacks = nack_codes(evil, want=None, timeout_s=1.0)
        assert [n["code"] for n in nacks] == ["not_owner"] * 3
        rng = np.random.default_rng(2)
        sent = []
        for i in range(24):  # the owner keeps sending for longer than the service's liveness limit
            sent.append(rng.random((8, 8), dtype=np.float32))
            stream.frame(sent[-1], frame_index=i, **FRAME_FIELDS)
            time.sleep(0.06)
        stream.end("complete")  # OK: no nack of the intruder's was routed to the owner
        (path,) = svc.wait_for_sessions(1)
        evil.close()
    assert not sender.nacks
    with SessionReader(path) as r:
        assert r.status == "complete" and r.n_frames == 24
        np.testing.assert_array_equal(np.asarray(r.frames()), np.stack(sent))


def test_found_heartbeats_alone_do_not_hold_the_service(tmp_path: Path) -> None:
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage}, idle_timeout_s=1.0)
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=10) as holder, \
            transport.FrameSender(svc.frame_endpoint, timeout_s=10) as other:
        held = transport.SessionStream(holder, "tilt_series", {})
        t_start = time.monotonic()
        held.start()
        holder.wait_acknowledged(held.session_id, 0, 10)
        waiting = transport.SessionStream(other, "tilt_series", {})
        waiting.start()
        with pytest.raises(transport.TransportError, match="busy"):
            other.wait_acknowledged(waiting.session_id, 0, 5)
        (busy,) = [n for n in other.nacks if n.code == "busy"]
        assert busy.extra["owner_session"] == held.session_id and 0 <= busy.extra["owner_age_s"] < 5
        t0 = time.monotonic()
        while not svc.stats.sessions_done and time.monotonic() - t0 < 10:
            held.heartbeat()  # heartbeats alone: the service still closes the session
            time.sleep(0.1)
        (aborted,) = svc.wait_for_sessions(1)
        assert 0.9 < time.monotonic() - t_start < 5
        small_tilt_session(transport.SessionStream(other, "tilt_series", {}))  # the slot is free again
        paths = svc.wait_for_sessions(2)
    with SessionReader(aborted) as r:
        assert r.status == "aborted" and "no data for" in r.message
    with SessionReader(paths[1]) as r:
        assert r.status == "complete" and r.n_frames == 6


def test_found_a_gap_flood_is_summarised_not_logged_line_by_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage})
    with svc:
        sock = intruder(svc.frame_endpoint)
        t = time.time()
        sock.send_multipart(raw_parts({"proto": "stemlive/1", "type": "session_start", "session": "gappy", "seq": 0,
                                       "t": t, "kind": "tilt_series", "settings": {}}))
        for i in range(6000):  # every other message lost on the wire: 6,000 gaps
            sock.send_multipart(raw_parts({"proto": "stemlive/1", "type": "heartbeat", "session": "gappy",
                                           "seq": 2 * i + 2, "t": t}))
        sock.send_multipart(raw_parts({"proto": "stemlive/1", "type": "session_end", "session": "gappy",
                                       "seq": 12002, "t": t, "status": "complete", "messages": 12003}))
        (path,) = svc.wait_for_sessions(1)
    sock.close()
    gap_lines = [r for r in caplog.records if "gap" in r.getMessage()]
    assert len(gap_lines) <= 30, len(gap_lines)
    with h5py.File(path, "r") as f:
        message = str(f.attrs["message"])
        assert "6001 seq gap(s)" in message and len(message) < 1000
        assert int(f.attrs["gaps_total"]) == 6001 and len(json.loads(f.attrs["gaps"])) == 1000


class UnstorableResultStage(Stage):
    """A stage bug the stage's own guard cannot see: a result the session file cannot store."""

    name = "unstorable"
    kinds = frozenset({"tilt_series"})
    defaults: ClassVar[dict[str, Any]] = {}

    def process(self, msg: protocol.Message) -> Iterator[Result]:
        yield Result(self.name, "../escape", np.zeros(2))


def test_an_analysis_error_is_told_to_the_sender_without_failing_its_recorded_session(tmp_path: Path) -> None:
    svc = PipelineService(tmp_path, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage, "unstorable": UnstorableResultStage})
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=20) as sender:
        stream = transport.SessionStream(sender, "tilt_series", {})
        small_tilt_session(stream)  # end() OK: the frames are recorded
        (path,) = svc.wait_for_sessions(1)
        deadline = time.monotonic() + 5
        while len(sender.warnings) < 6 and time.monotonic() < deadline:
            sender.acknowledged(stream.session_id)  # reads what the service sent
            time.sleep(0.05)
        assert svc.stats.errors["analysis_error"] == 6 and svc._error is None
    assert [w.code for w in sender.warnings] == ["analysis_error"] * 6
    assert all(w.session == stream.session_id and "escape" in w.detail for w in sender.warnings)
    assert not sender.nacks
    with SessionReader(path) as r:
        assert r.status == "complete" and r.n_frames == 6
        assert int(r.results("counting")["total"]) == 6
