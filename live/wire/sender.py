"""Acquisition side of the lossless path: :class:`FrameSender` (DEALER, connects) and :class:`SessionStream`.

Queues are bounded by high-water marks counted in whole messages, so a slow service makes
:meth:`FrameSender.send` block; a send blocked longer than ``timeout_s`` raises :class:`TransportError`. Nothing
is ever dropped silently. The service acknowledges recorded messages back over the same connection (cumulative
per session) and both sides exchange link heartbeats to notice a dead peer.

Threads
    A :class:`FrameSender` may be used from one application thread at a time; its internal heartbeat thread
    touches the socket only while holding the sender's lock (a full memory barrier, as libzmq requires for
    moving a socket between threads) and only when the application thread is not inside a call.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from stemlive.live.wire.endpoints import DEFAULT_FRAME_ENDPOINT, TransportError, secure_client
from stemlive.live.wire.link import (
    ACK_INTERVAL_S,
    BACKCHANNEL_HWM,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_HIGH_WATER_MARK,
    DEFAULT_LIVENESS,
    link_heartbeat,
)
from stemlive.live.wire.protocol import LINK_SESSION, SESSION_KINDS, ProtocolError, decode, encode

log = logging.getLogger(__name__)

_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
#: How long ``SessionStream.end`` waits for the service to finish the analysis and close the file.
DEFAULT_CLOSE_TIMEOUT_S = 600.0


def new_session_id() -> str:
    """A unique, file-name-safe session id: UTC timestamp plus 8 random hex digits."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"



@dataclass
class Nack:
    """A rejection reported back by the service: message ``seq`` of ``session`` (None if unreadable).

    ``extra`` holds further fields of the nack, e.g. ``owner_session`` and ``owner_age_s`` with code ``busy``.
    """

    session: str | None
    seq: int | None
    code: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)



class FrameSender:
    """Acquisition side of the lossless path (DEALER, connects).

    Parameters
    ----------
    endpoint : str
        Where the service's :class:`FrameReceiver` is bound.
    high_water_mark : int
        Messages queued in this process before :meth:`send` blocks (ZeroMQ counts whole multipart messages).
    timeout_s : float
        How long :meth:`send` may block, and :meth:`wait_acknowledged` wait, before raising TransportError.
    heartbeat_interval_s : float
        Link heartbeat period while idle; 0 disables the heartbeat thread.
    liveness : int
        The service is declared dead after ``liveness`` intervals without an ack or heartbeat while messages
        are unacknowledged.
    kernel_buffer_bytes : int, optional
        SO_SNDBUF for TCP; None keeps the OS default (Linux autotunes up to ``net.ipv4.tcp_wmem``).
    curve : stemlive.live.wire.keys.Curve, optional
        Client keys for a service that requires CURVE authentication (see ``stemlive keys``).
    context : zmq.Context, optional
        Defaults to the process-wide instance.

    Notes
    -----
    Payloads go zero-copy: the array handed to :meth:`send` is referenced until ZeroMQ has written it, so it
    must not be modified after the call (pass a copy if the acquisition reuses its buffer).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_FRAME_ENDPOINT,
        *,
        high_water_mark: int = DEFAULT_HIGH_WATER_MARK,
        timeout_s: float = 30.0,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        liveness: int = DEFAULT_LIVENESS,
        kernel_buffer_bytes: int | None = None,
        curve: Any = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.high_water_mark = high_water_mark
        self.timeout_s = timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.nacks: list[Nack] = []
        #: Problems the service reports about recorded messages (e.g. ``analysis_error``): not rejections.
        self.warnings: list[Nack] = []
        self._acked: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._link_seq = 0
        self._last_heard = self._last_sent = self._last_drain = self._pending_since = time.monotonic()
        self._closed = False
        self._sndtimeo = -1  # the SNDTIMEO set on the socket (ms)
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        secure_client(self._sock, curve)
        self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
        self._sock.setsockopt(zmq.RCVHWM, BACKCHANNEL_HWM)
        if kernel_buffer_bytes is not None:
            self._sock.setsockopt(zmq.SNDBUF, kernel_buffer_bytes)
        # A stable identity lets the service keep its per-connection state across TCP reconnects.
        self._sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        # A refused security handshake (no or unknown CURVE key) only shows as a socket event: watch for it so
        # that the caller is told "unauthorized" instead of waiting for a timeout.
        self.handshake_failure: str | None = None
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_FAILURES)
        self._sock.connect(endpoint)
        self._sendlink_heartbeat()  # introduces this peer to the service at once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_interval_s > 0:
            self._thread = threading.Thread(target=self._heartbeat_loop, name="stemlive-sender-heartbeat", daemon=True)
            self._thread.start()

    # ---- public API
    def send(self, header: Mapping[str, Any], payload: np.ndarray | None = None) -> None:
        """Send one message, blocking while the queue is full.

        Raises
        ------
        ProtocolError
            If the message is malformed (nothing sent).
        TransportError
            If the queue stays full for ``timeout_s`` or the service stopped responding. The message was not
            queued; nothing queued earlier was dropped by this sender.
        """
        parts = encode(header, payload)
        session, seq = header.get("session"), header.get("seq")
        with self._lock:
            self._check_open()
            if not self._sent:  # nothing unacknowledged yet: liveness counts from now, not from the last reply
                self._pending_since = time.monotonic()
            self._check_service_alive()
            self._send_blocking(parts)
            if isinstance(session, str) and session != LINK_SESSION and isinstance(seq, int):
                self._sent[session] = max(seq, self._sent.get(session, -1))
            now = time.monotonic()
            self._last_sent = now
            if now - self._last_drain > ACK_INTERVAL_S:
                self._drain()

    def wait_acknowledged(self, session_id: str, seq: int, timeout_s: float | None = None) -> None:
        """Block until the service acknowledged message ``seq`` of ``session_id`` (and all before it).

        Raises
        ------
        TransportError
            On timeout, dead service, or if the service rejected any message of the session.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._lock:
            self._check_open()
            while True:
                self._drain()
                self._raise_nacks(session_id)
                if self._acked.get(session_id, -1) >= seq:
                    return
                self._check_service_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"service at {self.endpoint} did not acknowledge session {session_id!r} up to seq {seq} "
                        f"within {timeout:.1f} s (acknowledged up to {self._acked.get(session_id, -1)})"
                    )
                # The heartbeat thread cannot take the lock while we wait (e.g. end() waiting minutes for the
                # final analysis): keep the link alive from here, or the service forgets this idle connection
                # and with it the session's final acknowledgement.
                self._heartbeat_if_due()
                self._sock.poll(int(min(left, self._poll_slice()) * 1000) + 1, zmq.POLLIN)

    def wait_recorded(self, timeout_s: float | None = None) -> None:
        """Block until every session message sent so far has been acknowledged (see :meth:`wait_acknowledged`)."""
        for session_id, seq in list(self._sent.items()):
            self.wait_acknowledged(session_id, seq, timeout_s)

    def acknowledged(self, session_id: str) -> int:
        """Highest seq of ``session_id`` the service has acknowledged as recorded (-1 if none)."""
        with self._lock:
            self._drain()
            return self._acked.get(session_id, -1)

    def unacknowledged(self) -> int:
        """Messages sent but not yet acknowledged, over all sessions."""
        return sum(max(0, s - self._acked.get(sid, -1)) for sid, s in self._sent.items())

    def close(self, linger_s: float = 1.0) -> None:
        """Stop the heartbeat thread and close the socket; queued messages get ``linger_s`` to leave."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._closed = True
            pending = self.unacknowledged()
            if pending:
                log.warning("closing sender to %s with %d unacknowledged messages", self.endpoint, pending)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=int(linger_s * 1000))

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---- internals (call with self._lock held)
    def _poll_slice(self) -> float:
        # a quarter interval, like the heartbeat thread: link heartbeats sent while waiting stay on time
        return self.heartbeat_interval_s / 4 if self.heartbeat_interval_s > 0 else 0.5

    def _heartbeat_if_due(self) -> None:
        if self.heartbeat_interval_s > 0 and time.monotonic() - self._last_sent >= self.heartbeat_interval_s:
            self._sendlink_heartbeat()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"sender to {self.endpoint} is closed")

    def _send_blocking(self, parts: list[bytes | memoryview]) -> None:
        start = time.monotonic()
        while True:
            left = self.timeout_s - (time.monotonic() - start)
            # A blocking send bounded by SNDTIMEO waits for queue space inside libzmq (GIL released): a sender
            # throttled by a slower service costs no Python wake-ups, exceptions and polls per message. Between
            # slices, acknowledgements are read and the service's liveness is checked. copy=False: large
            # payloads go zero-copy (pyzmq copies parts below its 64 KiB threshold anyway).
            timeout_ms = max(1, int(1000 * min(max(left, 0.0), self._poll_slice())))
            if timeout_ms != self._sndtimeo:
                self._sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
                self._sndtimeo = timeout_ms
            try:
                self._sock.send_multipart(parts, copy=False)
                return
            except zmq.Again:
                pass
            waited = time.monotonic() - start
            if waited >= self.timeout_s:
                raise TransportError(
                    f"send to {self.endpoint} blocked for {waited:.1f} s (timeout_s={self.timeout_s}): the service "
                    f"is not reading and the queue is full ({self.high_water_mark} messages); the message was not "
                    "sent and nothing was dropped"
                )
            self._drain()
            self._check_service_alive()

    def _drain(self) -> None:
        """Read acknowledgements and heartbeats (and handshake events) from the service without blocking."""
        self._last_drain = time.monotonic()
        self._read_monitor()
        while True:
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                msg = decode(parts)
            except ProtocolError as e:
                log.warning("malformed message from service at %s: %s", self.endpoint, e)
                continue
            for sid, seq in (msg.header.get("acks") or {}).items():
                if seq > self._acked.get(sid, -1):
                    self._acked[sid] = seq
                if self._sent.get(sid, -1) <= seq:
                    self._sent.pop(sid, None)  # fully acknowledged: keeps unacknowledged() cheap
            for w in msg.header.get("warnings") or ():
                if isinstance(w, dict) and len(self.warnings) < 10_000:
                    self.warnings.append(Nack(w.get("session"), w.get("seq"), str(w.get("code")),
                                              str(w.get("detail"))))
                    if len(self.warnings) <= 10:
                        log.warning("service at %s: message %s of session %s recorded, but: [%s] %s", self.endpoint,
                                    w.get("seq"), w.get("session"), w.get("code"), w.get("detail"))
            for n in msg.header.get("nacks") or ():
                known = ("session", "seq", "code", "detail")
                nack = Nack(n.get("session"), n.get("seq"), str(n.get("code")), str(n.get("detail")),
                            {k: v for k, v in n.items() if k not in known})
                self.nacks.append(nack)
                n_nacks = len(self.nacks)
                if n_nacks <= 10 or n_nacks & (n_nacks - 1) == 0:  # a flood of nacks logs a few lines
                    log.warning("service at %s rejected message %s of session %s: [%s] %s (%d so far)",
                                self.endpoint, nack.seq, nack.session, nack.code, nack.detail, n_nacks)

    def _raise_nacks(self, session_id: str) -> None:
        bad = [n for n in self.nacks if n.session in (session_id, None)]
        if bad:
            listed = "; ".join(f"seq {n.seq}: [{n.code}] {n.detail}" for n in bad[:5])
            raise TransportError(
                f"service at {self.endpoint} rejected {len(bad)} message(s) of session {session_id!r}: {listed}"
            )

    def _read_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.handshake_failure = "the service refused this client's key (CURVE authentication)"
            elif self.handshake_failure is None:
                self.handshake_failure = ("the security handshake failed: this client's CURVE keys (or their absence) "
                                          "do not match the service's")

    def _check_service_alive(self) -> None:
        # the monitor is read by _drain (at least every ACK_INTERVAL_S while sending): not once per message
        if self.handshake_failure is not None:
            raise TransportError(f"unauthorized: {self.handshake_failure} at {self.endpoint} (see `stemlive keys`, "
                                 "STEMLIVE_KEYS)")
        if self.heartbeat_interval_s <= 0:
            return
        silent = time.monotonic() - max(self._last_heard, self._pending_since)
        if silent <= self.liveness * self.heartbeat_interval_s:
            return
        pending = self.unacknowledged()
        if pending:
            raise TransportError(
                f"service at {self.endpoint} not responding: no acknowledgement or heartbeat for {silent:.1f} s "
                f"with {pending} unacknowledged message(s)"
            )

    def _sendlink_heartbeat(self) -> None:
        try:
            self._sock.send_multipart(link_heartbeat(self._link_seq), flags=zmq.NOBLOCK)
            self._link_seq += 1
            self._last_sent = time.monotonic()
        except zmq.Again:
            pass  # queue full: data is flowing, which is liveness enough

    def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_interval_s
        while not self._stop.wait(interval / 4):
            if not self._lock.acquire(blocking=False):
                continue  # the application thread is inside a call and services the socket itself
            try:
                if self._closed:
                    return
                self._drain()
                self._heartbeat_if_due()
            finally:
                self._lock.release()


class SessionStream:
    """Session bookkeeping over a :class:`FrameSender`: session id, contiguous seq, time stamps, message count.

    Parameters
    ----------
    sender : FrameSender
        One open session per sender at a time.
    kind : str
        One of ``tilt_series``, ``eels_line_scan``, ``eels_map``.
    settings : Mapping
        All settings and calibrations, sent in ``session_start`` (JSON-serialisable; numpy values are converted).
    session_id : str, optional
        Defaults to :func:`new_session_id`.

    Notes
    -----
    Every method except :meth:`end` returns once the message is queued. A method that raises leaves the seq
    unchanged, so a failed message can be retried.
    """

    def __init__(self, sender: FrameSender, kind: str, settings: Mapping[str, Any], session_id: str | None = None):
        if kind not in SESSION_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {sorted(SESSION_KINDS)}")
        self.sender = sender
        self.kind = kind
        self.settings = dict(settings)
        self.session_id = session_id or new_session_id()
        self.seq = 0  # seq of the next message == messages sent so far
        self.started = False
        self.ended = False

    @property
    def messages_sent(self) -> int:
        """Messages sent in this session so far."""
        return self.seq

    def _send(self, mtype: str, fields: Mapping[str, Any], payload: np.ndarray | None = None) -> int:
        if mtype != "session_start" and not self.started:
            raise RuntimeError(f"session {self.session_id}: call start() before sending {mtype}")
        if self.ended:
            raise RuntimeError(f"session {self.session_id} has ended")
        header = {"type": mtype, "session": self.session_id, "seq": self.seq, "t": time.time()}
        header.update(fields)
        self.sender.send(header, payload)
        self.seq += 1
        return self.seq - 1

    def start(self) -> None:
        """Send ``session_start`` with the kind and settings."""
        if self.started:
            raise RuntimeError(f"session {self.session_id} already started")
        self._send("session_start", {"kind": self.kind, "settings": self.settings})
        self.started = True

    def frame(self, image: np.ndarray, **fields: Any) -> None:
        """Send a 2-D image: ``tilt_index, alpha_deg, beta_deg, frame_index, pixel_size_nm, dwell_us`` [, ``t``]."""
        self._send("frame", fields, image)

    def spectra(self, spectra: np.ndarray, **fields: Any) -> None:
        """Send one spectrum (1-D) or a batch (2-D ``(k, n_channels)``).

        Fields: ``point_index, frame_index, x_nm, y_nm, energy_offset_meV, dispersion_meV, exposure_ms`` [, ``t``].
        For a batch, the per-spectrum fields (and ``t``) may be sequences of length k or scalars (repeated k times).
        """
        arr = np.asarray(spectra)
        if arr.ndim == 2:
            k = arr.shape[0]
            fields.setdefault("t", time.time())
            for name in ("point_index", "frame_index", "x_nm", "y_nm", "energy_offset_meV", "t"):
                v = fields.get(name)
                if v is not None and np.ndim(v) == 0:
                    fields[name] = [v] * k
        self._send("spectrum", fields, arr)

    def survey(self, image: np.ndarray, which: str = "before", **fields: Any) -> None:
        """Send a survey image taken ``which`` = ``before`` or ``after`` the scan (field ``pixel_size_nm``)."""
        self._send("survey", {"which": which, **fields}, image)

    def heartbeat(self) -> None:
        """Send an in-session heartbeat (consumes a seq; lets the service see the session is alive)."""
        self._send("heartbeat", {})

    def end(
        self, status: str = "complete", message: str = "", timeout_s: float | None = None,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        """Send ``session_end`` and wait until the service has recorded the session and closed its file.

        Two waits: every message before the ``session_end`` recorded (``timeout_s``, default the sender's), then
        the ``session_end`` itself, which the pipeline service acknowledges once the file is closed and fsync'ed,
        after the analysis, whose backlog it cuts with a stated reason ``end_analysis_budget_s`` after the end
        (``timeout_s`` if given, else ``close_timeout_s``; a dead service is still
        noticed within the sender's liveness interval).

        Raises
        ------
        TransportError
            If an acknowledgement does not come in time, the service is dead, or it rejected any message of this
            session.
        """
        fields: dict[str, Any] = {"status": status, "messages": self.seq + 1}
        if message:
            fields["message"] = message
        seq = self._send("session_end", fields)
        self.ended = True
        self.sender.wait_acknowledged(self.session_id, seq - 1, timeout_s)
        close = close_timeout_s if timeout_s is None else timeout_s
        self.sender.wait_acknowledged(self.session_id, seq, close)
