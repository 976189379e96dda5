"""Transport over real ZeroMQ sockets (tcp loopback and ipc): lossless path, flow control, liveness, PUB/SUB."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from stemlive.live.wire.protocol import Message, encode
from stemlive.live.wire.transport import (
    FrameReceiver,
    FrameSender,
    ResultPublisher,
    ResultSubscriber,
    SessionStream,
    TransportError,
    check_bind_endpoint,
)

FRAME = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.05, "dwell_us": 4.0}
SPEC = {"dispersion_meV": 0.5, "exposure_ms": 300.0}


class Service:
    """A FrameReceiver served by its own thread (which owns the socket), recording what it returns."""

    def __init__(self, receiver: FrameReceiver, *, ack: bool = True, end_ack_delay_s: float = 0.0) -> None:
        self.receiver = receiver
        self.ack = ack
        self.end_ack_delay_s = end_ack_delay_s  # like the pipeline: the session_end is acknowledged after "analysis"
        self._end_acks: list[tuple[float, str, int]] = []
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.receiver.recv(timeout_s=0.02)
            for due, sid, seq in [e for e in self._end_acks if e[0] <= time.monotonic()]:
                self._end_acks.remove((due, sid, seq))
                self.receiver.acknowledge(sid, seq, final=True)
            if msg is None:
                continue
            self.messages.append(msg)
            if self.ack and msg.type == "session_end" and self.end_ack_delay_s > 0:
                self.receiver.acknowledge(msg.session, msg.seq - 1)
                self._end_acks.append((time.monotonic() + self.end_ack_delay_s, msg.session, msg.seq))
            elif self.ack:
                self.receiver.acknowledge(msg.session, msg.seq, final=msg.type == "session_end")
        self.receiver.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "tcp://127.0.0.1:*" if request.param == "tcp" else f"ipc://{tmp_path}/frames.ipc"


@pytest.fixture
def service(endpoint: str) -> Iterator[Service]:
    svc = Service(FrameReceiver(endpoint, heartbeat_interval_s=0.1))
    yield svc
    svc.stop()


def test_lossless_session_round_trip(service: Service) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.random((64, 48), dtype=np.float32) for _ in range(20)]
    batch = rng.random((8, 256), dtype=np.float32)
    with FrameSender(service.receiver.endpoint, heartbeat_interval_s=0.1, timeout_s=10) as sender:
        s = SessionStream(sender, "eels_line_scan", {"points": 8, "calibration": {"gain": np.float64(2.5)}})
        s.start()
        s.survey(frames[0], which="before", pixel_size_nm=0.5)
        for i, f in enumerate(frames):
            s.frame(f, frame_index=i, **FRAME)
        s.spectra(batch[0], point_index=0, frame_index=0, x_nm=0.0, y_nm=0.0, energy_offset_meV=0.0, **SPEC)
        s.spectra(batch, point_index=list(range(8)), frame_index=1, x_nm=np.arange(8) * 1.6, y_nm=0.0,
                  energy_offset_meV=0.0, **SPEC)
        s.heartbeat()
        s.end()  # returns only once the service acknowledged the session_end
        assert sender.acknowledged(s.session_id) == s.seq - 1
    got = service.messages
    assert [m.seq for m in got] == list(range(len(got))) and len(got) == s.messages_sent == 26
    assert [m.type for m in got[:3]] == ["session_start", "survey", "frame"]
    assert got[0].header["settings"]["calibration"]["gain"] == 2.5
    for m, f in zip(got[2:22], frames, strict=True):
        assert m.payload is not None and m.payload.tobytes() == f.tobytes()
    assert got[23].is_batch and got[23].payload is not None and got[23].payload.tobytes() == batch.tobytes()
    assert got[23].header["x_nm"][1] == pytest.approx(1.6) and got[23].header["frame_index"] == [1] * 8
    assert got[-1].header["messages"] == 26 and got[-1].header["status"] == "complete"
    assert service.receiver.rejected == {}


def test_flow_control_blocks_then_raises_and_drops_nothing(tmp_path: Path) -> None:
    hwm, kbuf = 4, 256 * 1024
    receiver = FrameReceiver("tcp://127.0.0.1:*", high_water_mark=hwm, kernel_buffer_bytes=kbuf)
    sender = FrameSender(receiver.endpoint, high_water_mark=hwm, timeout_s=0.3, heartbeat_interval_s=5,
                         kernel_buffer_bytes=kbuf)
    image = np.ones((512, 512), np.float32)  # 1 MiB
    s = SessionStream(sender, "tilt_series", {})
    s.start()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"send to tcp://127\.0\.0\.1:\d+ blocked for 0\.\d s") as info:
        for i in range(100):
            s.frame(image, frame_index=i, **FRAME)
    assert time.monotonic() - t0 < 5
    assert "nothing was dropped" in str(info.value)
    accepted = s.seq  # messages queued before the send that timed out (its seq was not consumed)
    # Memory bound: sender HWM + receiver HWM (+1 in flight) messages, plus <= 2 x 256 KiB kernel buffers.
    assert accepted <= 2 * hwm + 2
    got = []
    while (m := receiver.recv(timeout_s=0.5)) is not None:
        got.append(m)
    assert [m.seq for m in got] == list(range(accepted))
    # The stream resumes where it stopped: the failed frame is sent again with the same seq.
    s.frame(image, frame_index=99, **FRAME)
    m = receiver.recv(timeout_s=2)
    assert m is not None and m.seq == accepted
    sender.close(linger_s=0)
    receiver.close()


RECEIVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from stemlive.live.wire.transport import FrameReceiver
    rx = FrameReceiver(sys.argv[1], heartbeat_interval_s=0.1, auto_ack=True)
    print(rx.endpoint, flush=True)
    while True:
        rx.recv()
    """
)


def test_sender_notices_killed_service() -> None:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_SCRIPT, "tcp://127.0.0.1:*"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        with FrameSender(endpoint, heartbeat_interval_s=0.1, liveness=3, timeout_s=20) as sender:
            s = SessionStream(sender, "tilt_series", {})
            s.start()
            s.frame(np.zeros((16, 16), np.float32), frame_index=0, **FRAME)
            sender.wait_acknowledged(s.session_id, 1, timeout_s=10)
            proc.kill()
            proc.wait()
            t0 = time.monotonic()
            with pytest.raises(TransportError, match=f"service at {endpoint} not responding"):
                s.end()
            assert time.monotonic() - t0 < 3  # a few heartbeat intervals, not the 20 s timeout
    finally:
        proc.kill()
        proc.wait()


def test_receiver_flags_silent_sender_and_recovers() -> None:
    receiver = FrameReceiver("tcp://127.0.0.1:*", heartbeat_interval_s=0.05, liveness=3)
    sender = FrameSender(receiver.endpoint, heartbeat_interval_s=0)  # no heartbeat thread: goes silent when idle
    try:
        s = SessionStream(sender, "tilt_series", {})
        s.start()
        assert receiver.recv(timeout_s=2) is not None
        assert receiver.recv(timeout_s=0.4) is None
        assert receiver.silent_sessions() == {s.session_id}
        s.heartbeat()
        m = receiver.recv(timeout_s=2)
        assert m is not None and m.type == "heartbeat" and m.seq == 1
        assert receiver.silent_sessions() == frozenset()
    finally:
        sender.close(linger_s=0)
        receiver.close()


def test_idle_sender_with_heartbeats_is_not_silent() -> None:
    receiver = FrameReceiver("tcp://127.0.0.1:*", heartbeat_interval_s=0.05, liveness=3, auto_ack=True)
    with FrameSender(receiver.endpoint, heartbeat_interval_s=0.05) as sender:
        s = SessionStream(sender, "tilt_series", {})
        s.start()
        assert receiver.recv(timeout_s=2) is not None
        assert receiver.recv(timeout_s=0.5) is None  # link heartbeats are consumed, not returned
        assert receiver.silent_sessions() == frozenset()
        # ...and the idle sender kept hearing the service: no "not responding" on the next send.
        s.frame(np.zeros((4, 4), np.float32), frame_index=0, **FRAME)
    receiver.close()


def test_end_waiting_long_for_the_final_acknowledgement_keeps_the_link_alive() -> None:
    """end() may wait far longer than the liveness for the service's analysis (the pipeline acknowledges the
    session_end only once the file is closed): the waiting sender must go on sending link heartbeats, or the
    service forgets the idle connection (after 10 x liveness), stops heartbeating it and cannot route the final
    acknowledgement, and the sender reports the service "not responding"."""
    receiver = FrameReceiver("tcp://127.0.0.1:*", heartbeat_interval_s=0.05, liveness=2)  # forgets after 1 s
    svc = Service(receiver, end_ack_delay_s=1.5)
    try:
        with FrameSender(receiver.endpoint, heartbeat_interval_s=0.05, liveness=2) as sender:
            s = SessionStream(sender, "tilt_series", {})
            s.start()
            s.frame(np.zeros((4, 4), np.float32), frame_index=0, **FRAME)
            t0 = time.monotonic()
            s.end(timeout_s=10)  # before the fix: TransportError "not responding" after ~1.1 s
            waited = time.monotonic() - t0
            assert sender.acknowledged(s.session_id) == s.seq - 1
            assert 1.4 < waited < 8, waited
    finally:
        svc.stop()


def test_end_times_out_without_acknowledgement(service: Service) -> None:
    service.ack = False  # the service records nothing: end() must not claim success
    with FrameSender(service.receiver.endpoint, heartbeat_interval_s=0.1) as sender:
        s = SessionStream(sender, "tilt_series", {})
        s.start()
        with pytest.raises(TransportError, match=r"did not acknowledge session .* up to seq 0 within 0\.3 s"):
            s.end(timeout_s=0.3)


def test_malformed_input_is_counted_nacked_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    receiver = FrameReceiver("tcp://127.0.0.1:*", heartbeat_interval_s=10)
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(receiver.endpoint)
    try:
        dealer.send_multipart([b"not json"])
        dealer.send_multipart([json.dumps({"proto": "stemlive/2", "type": "heartbeat"}).encode()])
        dealer.send_multipart([b"{}", b"x", b"y"])
        good = encode({"type": "session_start", "session": "s1", "seq": 0, "t": 1.0, "kind": "eels_map",
                       "settings": {}})
        dealer.send_multipart(good)
        with caplog.at_level(logging.WARNING, logger="stemlive.live.wire.transport"):
            m = receiver.recv(timeout_s=2)
        assert m is not None and m.type == "session_start"
        assert receiver.rejected == {"bad_json": 1, "unsupported_version": 1, "too_many_parts": 1}
        assert "[bad_json]" in caplog.text and "[unsupported_version]" in caplog.text
        nacks = []
        while dealer.poll(1000):
            nacks += json.loads(dealer.recv_multipart()[0]).get("nacks", [])
            if len(nacks) == 3:
                break
        assert [n["code"] for n in nacks] == ["bad_json", "unsupported_version", "too_many_parts"]
    finally:
        dealer.close(linger=0)
        receiver.close()


def test_stream_rejection_reaches_sender_end() -> None:
    svc = Service(FrameReceiver("tcp://127.0.0.1:*", heartbeat_interval_s=0.1, check_stream=True))
    try:
        with FrameSender(svc.receiver.endpoint, heartbeat_interval_s=0.1) as sender:
            s = SessionStream(sender, "tilt_series", {})
            s.start()
            sender.send({"type": "heartbeat", "session": s.session_id, "seq": 0, "t": 1.0})  # replayed seq
            with pytest.raises(TransportError, match=r"rejected 1 message.*seq 0: \[duplicate_seq\]"):
                s.end()
        assert svc.receiver.rejected == {"duplicate_seq": 1}
    finally:
        svc.stop()


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp://127.0.0.1:7710", "tcp://127.0.0.1:7710"),
        ("tcp://127.4.5.6:*", "tcp://127.4.5.6:*"),
        ("tcp://[::1]:7710", "tcp://[::1]:7710"),
        ("tcp://localhost:7710", "tcp://127.0.0.1:7710"),
        ("ipc:///tmp/x.ipc", "ipc:///tmp/x.ipc"),
        ("inproc://frames", "inproc://frames"),
    ],
)
def test_check_bind_endpoint_accepts_local(endpoint: str, expected: str) -> None:
    assert check_bind_endpoint(endpoint, allow_remote=False) == expected


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:7710", "tcp://*:7710", "tcp://eth0:7710",
                                      "tcp://192.168.1.5:7710", "tcp://[::]:7710"])
def test_check_bind_endpoint_refuses_remote(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="not a loopback address.*allow_remote=True"):
        check_bind_endpoint(endpoint, allow_remote=False)
    with caplog.at_level(logging.WARNING, logger="stemlive.live.wire.transport"):
        assert check_bind_endpoint(endpoint, allow_remote=True) == endpoint
    assert "non-loopback interface" in caplog.text


@pytest.mark.parametrize("endpoint", ["127.0.0.1:7710", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "udp://x:1"])
def test_check_bind_endpoint_malformed(endpoint: str) -> None:
    with pytest.raises(ValueError):
        check_bind_endpoint(endpoint, allow_remote=True)


def test_receiver_and_publisher_refuse_remote_bind() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FrameReceiver("tcp://0.0.0.0:*")
    with pytest.raises(ValueError, match="loopback"):
        ResultPublisher("tcp://0.0.0.0:*")


def _connected(pub: ResultPublisher, sub: ResultSubscriber) -> None:
    """Wait out the PUB/SUB slow-joiner window with probe results."""
    for _ in range(200):
        pub.publish({"session": "probe", "stage": "probe", "name": "x"})
        if sub.recv(timeout_s=0.02) is not None:
            while sub.recv(timeout_s=0.05) is not None:
                pass
            return
    raise AssertionError("subscriber never connected")


def test_pub_sub_results_and_drop_counting() -> None:
    pub = ResultPublisher("tcp://127.0.0.1:*", high_water_mark=10)
    sub = ResultSubscriber(pub.endpoint, high_water_mark=10)
    try:
        _connected(pub, sub)
        n = 3000
        for i in range(n):
            seq = pub.publish({"session": "s1", "stage": "eels", "name": "spectrum", "index": i},
                              np.full(512, i, np.float32))  # publish never blocks on the idle subscriber
            assert seq == i
        got: list[Any] = []
        while (m := sub.recv(timeout_s=0.3)) is not None:
            got.append(m)
        assert 0 < len(got) < n
        first, last = got[0].seq, got[-1].seq
        assert sub.dropped == (last - first + 1) - len(got) > 0
        assert sub.dropped_by_session["s1"] == sub.dropped
        assert all(m.payload is not None and m.payload[0] == m.header["index"] for m in got)
    finally:
        sub.close()
        pub.close()


def test_pub_sub_topics_and_small_values() -> None:
    pub = ResultPublisher("tcp://127.0.0.1:*")
    probe = ResultSubscriber(pub.endpoint)
    sub = ResultSubscriber(pub.endpoint, topics=["tilt_series/drift", "probe"])
    try:
        _connected(pub, probe)
        _connected(pub, sub)
        for i in range(5):
            pub.publish({"session": "s1", "stage": "eels", "name": "temperature", "value": [300.0 + i]})
            pub.publish({"session": "s1", "stage": "tilt_series", "name": "drift", "value": {"dy": i, "dx": -i}})
        got = []
        while (m := sub.recv(timeout_s=0.3)) is not None:
            got.append(m)
        assert [m.header["value"]["dy"] for m in got] == list(range(5))
        assert {m.header["name"] for m in got} == {"drift"}
        assert sub.dropped == 0  # results filtered out by topic are not losses
    finally:
        probe.close()
        sub.close()
        pub.close()


def test_stalled_subscriber_counts_exactly_the_results_it_missed_and_recovers_the_final_ones() -> None:
    """Issue 13 Found 6: a stalled subscriber lost 1,229 of 2,509 results, every final one, and counted 0.

    The stall must cost final results for the recovery to be shown: with the OS's autotuned TCP buffers a
    stalled connection absorbs a varying number of results (under load, sometimes all the finals as well), so
    both ends get small fixed kernel buffers, and the rows are published in two parts with a pause between, in
    which the I/O threads fill the buffers: the rows after it fill the publisher's queue for this subscriber,
    and the finals after them are dropped. The counts asserted are exact whatever got through."""
    pub = ResultPublisher("tcp://127.0.0.1:*", high_water_mark=10, kernel_buffer_bytes=16384)
    sub = ResultSubscriber(pub.endpoint, high_water_mark=10, kernel_buffer_bytes=16384)
    stop = threading.Event()
    try:
        _connected(pub, sub)
        n_rows, finals = 2500, [("eels", "labels"), ("eels", "peaks"), ("eels", "temperature_map"),
                                ("tilt_series", "sums"), ("tilt_series", "total"), ("segment", "labels"),
                                ("segment", "centres"), ("pipeline", "analysis_finished"), ("eels", "energy_meV")]
        for i in range(n_rows):  # the subscriber does not read meanwhile (stalled)
            if i in (n_rows - 40, n_rows - 20):
                time.sleep(0.2)  # still stalled: the I/O threads move what the buffers take
            pub.publish({"session": "s1", "stage": "eels", "name": "sum", "index": i}, np.full(256, i, np.float32))
        for k, (stage, name) in enumerate(finals):
            pub.publish({"session": "s1", "stage": stage, "name": name}, np.full(64, k, np.float32))
        n = n_rows + len(finals)
        # the publisher's thread answers requests from now on (its sockets move with it)
        server = threading.Thread(target=lambda: [pub.serve_requests() or time.sleep(0.005)
                                                  for _ in iter(stop.is_set, True)])
        server.start()
        got = []
        while (m := sub.recv(timeout_s=1.0)) is not None:  # all that got through, even on a loaded machine
            got.append(m)
        assert 0 < len(got) < n
        seen_finals = {(m.header["stage"], m.header["name"]) for m in got} & set(finals)
        assert len(seen_finals) < len(finals)  # the stall cost final results
        assert sub.sync() == n - len(got)  # every missed result counted, also those after the last received
        assert sub.dropped_by_session["s1"] == n - len(got)
        recovered = sub.recover("s1")
        assert [(m.header["stage"], m.header["name"]) for m in recovered] == finals
        for k, m in enumerate(recovered):
            assert m.payload is not None and np.all(m.payload == k)
        assert sub.dropped == n - len(got)  # recovery does not change the count
    finally:
        stop.set()
        sub.close()
        if "server" in locals():
            server.join()
        pub.close()


def test_an_oversized_part_drops_only_its_connection() -> None:
    """A part above max_message_bytes is never allocated: libzmq drops that peer; other senders go on."""
    receiver = FrameReceiver("tcp://127.0.0.1:*", max_message_bytes=1 << 20, auto_ack=True)
    service = Service(receiver)
    big = zmq.Context.instance().socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    try:
        big.connect(receiver.endpoint)
        big.send_multipart([b"{}", b"\0" * (2 << 20)])  # 2 MiB: over the limit
        with FrameSender(receiver.endpoint, timeout_s=10) as sender:
            s = SessionStream(sender, "tilt_series", {})
            s.start()
            s.frame(np.ones((64, 64), np.float32), frame_index=0, **FRAME)
            s.end(timeout_s=10)
        assert sum(receiver.rejected.values()) == 0  # the oversized message never reached decode
    finally:
        big.close()
        service.stop()


def test_a_burst_keeps_each_message_with_its_own_sender() -> None:
    """Messages waiting together are received as a burst (decoded before the first is returned); each message is
    still returned with the connection that sent it, for acknowledgements and nacks."""
    receiver = FrameReceiver("tcp://127.0.0.1:*", burst=8)
    senders = [FrameSender(receiver.endpoint, timeout_s=10, heartbeat_interval_s=0) for _ in range(2)]
    try:
        streams = [SessionStream(s, "tilt_series", {}) for s in senders]
        image = np.zeros((8, 8), np.float32)
        for stream in streams:
            stream.start()
            for i in range(6):
                stream.frame(image, tilt_index=0, alpha_deg=0.0, beta_deg=0.0, frame_index=i, pixel_size_nm=0.1,
                             dwell_us=1.0)
        time.sleep(0.5)  # all 14 messages (and the link heartbeats) are waiting in the socket now
        got, most_ready = [], 0
        while (msg := receiver.recv(timeout_s=0.5)) is not None:
            most_ready = max(most_ready, receiver.ready)
            got.append((msg.session, msg.seq, receiver.last_sender))
            receiver.acknowledge(msg.session, msg.seq)
        assert 1 <= most_ready <= 7  # a burst of at most 8 was taken at once
        assert sorted((sid, seq) for sid, seq, _ in got) == sorted((s.session_id, q) for s in streams
                                                                   for q in range(7))
        for sid, _seq, sender in got:
            assert sender is not None and sender == receiver.owner(sid)
        assert receiver.owner(streams[0].session_id) != receiver.owner(streams[1].session_id)
        receiver.recv(timeout_s=0.2)  # flush the acknowledgements to their own connections
        for sender, stream in zip(senders, streams, strict=True):
            sender.wait_acknowledged(stream.session_id, 6, timeout_s=5)
    finally:
        for s in senders:
            s.close(linger_s=0)
        receiver.close()
