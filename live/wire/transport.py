"""ZeroMQ transport for wire protocol v1: the lossless acquisition path and the lossy result stream.

Lossless path (acquisition -> service)
    :class:`FrameSender` (DEALER, connects) -> :class:`FrameReceiver` (ROUTER, binds). Queues are bounded by
    high-water marks counted in whole messages, so a slow service makes :meth:`FrameSender.send` block; a send
    blocked longer than ``timeout_s`` raises :class:`TransportError`. Nothing is ever dropped silently. The
    service acknowledges recorded messages back over the same connection (cumulative per session) and both
    sides exchange link heartbeats to notice a dead peer.

Result stream (service -> Swift, viewers)
    :class:`ResultPublisher` (PUB, binds) -> :class:`ResultSubscriber` (SUB, connects), in
    :mod:`stemlive.live.wire.resultstream` (importable from here too). Lossy by design, with exact loss counts and
    re-requests of final results.

Threads
    ZeroMQ sockets are not thread-safe. A :class:`FrameReceiver`, :class:`ResultPublisher` and
    :class:`ResultSubscriber` must each be used from one thread only (the one that calls its methods).
    A :class:`FrameSender` may be used from one application thread at a time; its internal heartbeat thread
    touches the socket only while holding the sender's lock (a full memory barrier, as libzmq requires for
    moving a socket between threads) and only when the application thread is not inside a call.

The protocol is specified in ``docs/protocol.md``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from stemlive.live.wire.endpoints import DEFAULT_FRAME_ENDPOINT as DEFAULT_FRAME_ENDPOINT
from stemlive.live.wire.endpoints import DEFAULT_RESULT_ENDPOINT as DEFAULT_RESULT_ENDPOINT
from stemlive.live.wire.endpoints import TransportError as TransportError
from stemlive.live.wire.endpoints import check_bind_endpoint as check_bind_endpoint
from stemlive.live.wire.endpoints import is_loopback as is_loopback
from stemlive.live.wire.endpoints import secure_client, secure_server
from stemlive.live.wire.protocol import (
    LINK_SESSION,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    SESSION_KINDS,
    Message,
    ProtocolError,
    StreamChecker,
    decode,
    encode,
)

# The result stream lives in resultstream.py; its names stay importable from here.
from stemlive.live.wire.resultstream import DEFAULT_RESULT_HIGH_WATER_MARK as DEFAULT_RESULT_HIGH_WATER_MARK
from stemlive.live.wire.resultstream import ResultPublisher as ResultPublisher
from stemlive.live.wire.resultstream import ResultRecovery as ResultRecovery
from stemlive.live.wire.resultstream import ResultSubscriber as ResultSubscriber
from stemlive.live.wire.resultstream import result_topic as result_topic

log = logging.getLogger(__name__)

#: Messages queued by the sender before ``send`` blocks (64 x 1 MiB frames = 64 MiB).
DEFAULT_HIGH_WATER_MARK = 64
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
#: A peer silent for this many heartbeat intervals is considered dead (sender) or silent (receiver).
DEFAULT_LIVENESS = 5
#: The receiver flushes pending acknowledgements at least this often while it is being polled.
ACK_INTERVAL_S = 0.05
_BACKCHANNEL_HWM = 1000
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
#: How long ``SessionStream.end`` waits for the service to finish the analysis and close the file.
DEFAULT_CLOSE_TIMEOUT_S = 600.0


def new_session_id() -> str:
    """A unique, file-name-safe session id: UTC timestamp plus 8 random hex digits."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _link_heartbeat(seq: int, **fields: Any) -> list[bytes | memoryview]:
    return encode({"type": "heartbeat", "session": LINK_SESSION, "seq": seq, "t": time.time(), **fields})


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


# ============================================================== sender


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
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        secure_client(self._sock, curve)
        self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
        self._sock.setsockopt(zmq.RCVHWM, _BACKCHANNEL_HWM)
        if kernel_buffer_bytes is not None:
            self._sock.setsockopt(zmq.SNDBUF, kernel_buffer_bytes)
        # A stable identity lets the service keep its per-connection state across TCP reconnects.
        self._sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        # A refused security handshake (no or unknown CURVE key) only shows as a socket event: watch for it so
        # that the caller is told "unauthorized" instead of waiting for a timeout.
        self.handshake_failure: str | None = None
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_FAILURES)
        self._sock.connect(endpoint)
        self._send_link_heartbeat()  # introduces this peer to the service at once
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
            self._send_link_heartbeat()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"sender to {self.endpoint} is closed")

    def _send_blocking(self, parts: list[bytes | memoryview]) -> None:
        start = time.monotonic()
        while True:
            try:
                # copy=False: large payloads go zero-copy (pyzmq copies parts below its 64 KiB threshold anyway).
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
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
            left = self.timeout_s - waited
            self._sock.poll(int(min(left, self._poll_slice()) * 1000) + 1, zmq.POLLOUT | zmq.POLLIN)
            self._drain()
            self._check_service_alive()

    def _drain(self) -> None:
        """Read acknowledgements and heartbeats from the service without blocking."""
        self._last_drain = time.monotonic()
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
        self._read_monitor()
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

    def _send_link_heartbeat(self) -> None:
        try:
            self._sock.send_multipart(_link_heartbeat(self._link_seq), flags=zmq.NOBLOCK)
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
        the ``session_end`` itself, which the pipeline service acknowledges once the analysis has finished and
        the file is closed and fsync'ed (``timeout_s`` if given, else ``close_timeout_s``; a dead service is still
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


# ============================================================== receiver


@dataclass
class _Peer:
    identity: bytes
    last_seen: float
    last_sent: float = 0.0
    link_seq: int = 0
    open_session: str | None = None
    silent: bool = False
    pending_acks: dict[str, int] = field(default_factory=dict)
    checker: StreamChecker | None = None


class FrameReceiver:
    """Service side of the lossless path (ROUTER, binds). Owned by one thread.

    Parameters
    ----------
    endpoint : str
        Bind endpoint; must be loopback/ipc/inproc unless ``allow_remote`` (see :func:`check_bind_endpoint`).
        ``tcp://127.0.0.1:*`` binds an ephemeral port; :attr:`endpoint` then holds the actual one.
    allow_remote : bool
        Allow binding a non-loopback interface.
    high_water_mark : int
        Messages queued on the receiving side before the sender's queue starts to fill.
    heartbeat_interval_s, liveness
        Heartbeats go to every connected sender each interval; a sender with an open session that is silent
        for ``liveness`` intervals is reported in :meth:`silent_sessions` (and logged once).
    auto_ack : bool
        Acknowledge each message as soon as :meth:`recv` returns it (for consumers that do not record).
        The recording service leaves this False and calls :meth:`acknowledge` after committing.
    check_stream : bool
        Also run a :class:`StreamChecker` per sender connection and reject (count, log, nack) stream errors.
        Leave False when the caller runs its own StreamChecker.
    kernel_buffer_bytes : int, optional
        SO_RCVBUF for TCP; None keeps the OS default (Linux autotunes up to ``net.ipv4.tcp_rmem``).
    curve : stemlive.live.wire.keys.Curve, optional
        Server keys: only clients with an authorised key can connect (see ``stemlive keys``).
    max_message_bytes : int
        ZMQ_MAXMSGSIZE: a connection sending a larger part is dropped by libzmq before the part is allocated.

    Attributes
    ----------
    rejected : collections.Counter
        Rejected messages by :class:`~stemlive.live.wire.protocol.ProtocolError` code.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_FRAME_ENDPOINT,
        *,
        allow_remote: bool = False,
        high_water_mark: int = DEFAULT_HIGH_WATER_MARK,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        liveness: int = DEFAULT_LIVENESS,
        auto_ack: bool = False,
        check_stream: bool = False,
        kernel_buffer_bytes: int | None = None,
        curve: Any = None,
        max_message_bytes: int = MAX_PAYLOAD_BYTES + MAX_HEADER_BYTES,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        bind = check_bind_endpoint(endpoint, allow_remote)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.auto_ack = auto_ack
        self.check_stream = check_stream
        self.rejected: Counter[str] = Counter()
        self._peers: dict[bytes, _Peer] = {}
        self._session_peer: dict[str, bytes] = {}  # session id -> routing id of the connection that owns it
        #: Routing id of the connection that sent the message :meth:`recv` returned last.
        self.last_sender: bytes | None = None
        self._claim: tuple[str, str | None] | None = None  # (session, owner's previous open session) of that message
        self._silent: set[str] = set()
        self._next_housekeeping = 0.0
        self._sock = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        secure_server(self._sock, curve)
        self._sock.setsockopt(zmq.RCVHWM, high_water_mark)
        self._sock.setsockopt(zmq.SNDHWM, _BACKCHANNEL_HWM)
        if kernel_buffer_bytes is not None:
            self._sock.setsockopt(zmq.RCVBUF, kernel_buffer_bytes)
        # A part larger than any valid one drops its connection inside libzmq, before it is allocated: a peer
        # cannot make the service hold a terabyte (or 600 MiB) it would reject anyway.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable acks raise instead of vanishing
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting sender takes over its identity
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._rcvtimeo = -1  # the RCVTIMEO set on the socket (ms)

    # ---- public API
    def recv(self, timeout_s: float | None = None) -> Message | None:
        """Next valid message, or None after ``timeout_s`` (None: wait indefinitely).

        Malformed messages are logged with their reason, counted in :attr:`rejected`, reported back to the
        sender and skipped; this method never raises for bad input. Link heartbeats are consumed here;
        in-session heartbeats are returned (they carry a seq).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            left = None if deadline is None else deadline - now
            # one blocking receive (GIL released) bounded by the next housekeeping, instead of a non-blocking
            # attempt, an exception and a poll for every message that is not there yet
            wait_ms = int(1000 * min(self._next_housekeeping - now, ACK_INTERVAL_S if left is None else left)) + 1
            if left is not None and left <= 0:
                wait_ms = 0
            if wait_ms != self._rcvtimeo:
                self._sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                parts = self._sock.recv_multipart(copy=False)
            except zmq.Again:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            msg = self._accept(parts)
            if msg is not None:
                return msg

    def acknowledge(self, session_id: str, seq: int, *, final: bool = False) -> None:
        """Tell the sender that messages up to ``seq`` of ``session_id`` are recorded (durably).

        Acknowledgements are cumulative and sent with the next flush (every ``ACK_INTERVAL_S`` while
        :meth:`recv` is polled); ``final=True`` (use it for the session_end) sends at once.
        """
        identity = self._session_peer.get(session_id)
        peer = self._peers.get(identity) if identity is not None else None
        if peer is None:
            log.debug("acknowledge: no connected sender for session %s", session_id)
            return
        if seq > peer.pending_acks.get(session_id, -1):
            peer.pending_acks[session_id] = seq
        if final:
            self._send_to(peer, time.monotonic())

    def reject(self, msg: Message, error: ProtocolError, *, sender: bytes | None = None) -> None:
        """Count, log and report back a message the caller's own checks rejected (e.g. its StreamChecker).

        The nack goes to ``sender`` (a routing id), by default to the connection that sent the message
        :meth:`recv` returned last: always the offender, never the owner of the session id it named. A rejected
        ``session_start`` gives up the ownership its arrival claimed.
        """
        identity = self.last_sender if sender is None else sender
        peer = self._peers.get(identity) if identity is not None else None
        if self._claim is not None and msg.type == "session_start" and self._claim[0] == msg.session:
            sid, previous = self._claim
            if self._session_peer.get(sid) == identity:
                del self._session_peer[sid]
            if peer is not None and peer.open_session == sid:
                peer.open_session = previous
            self._claim = None
        self._reject(peer, error)

    def owner(self, session_id: str) -> bytes | None:
        """Routing id of the connection that opened ``session_id`` (None if unknown)."""
        return self._session_peer.get(session_id)

    def notify(self, identity: bytes, **fields: Any) -> None:
        """Send a link heartbeat with extra ``fields`` (e.g. ``nacks``) to one connection at once."""
        peer = self._peers.get(identity)
        if peer is not None:
            self._send_to(peer, time.monotonic(), **fields)

    def keepalive(self) -> None:
        """Send due heartbeats and acknowledgements without reading.

        A service that deliberately stops calling :meth:`recv` (back-pressure) should call this at least once
        per heartbeat interval so senders block on flow control instead of declaring it dead.
        """
        self._housekeeping(time.monotonic())

    def silent_sessions(self) -> frozenset[str]:
        """Open sessions whose sender has been silent for ``liveness`` heartbeat intervals."""
        return frozenset(self._silent)

    def gaps(self, session_id: str) -> list[tuple[int, int]]:
        """Unfilled seq gaps of a session (only with ``check_stream=True``)."""
        for peer in self._peers.values():
            if peer.checker is not None and peer.checker.state(session_id) is not None:
                return peer.checker.gaps(session_id)
        return []

    def close(self) -> None:
        """Close the socket (pending acknowledgements are discarded)."""
        self._sock.close(linger=0)

    def __enter__(self) -> FrameReceiver:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---- internals
    def _peer(self, identity: bytes, now: float) -> _Peer:
        peer = self._peers.get(identity)
        if peer is None:
            peer = self._peers[identity] = _Peer(identity, now)
            if self.check_stream:
                peer.checker = StreamChecker()
            log.debug("sender %s connected", identity.hex())
        peer.last_seen = now
        if peer.silent:
            peer.silent = False
            self._silent.discard(peer.open_session or "")
            log.warning("sender of session %s is heard again", peer.open_session)
        return peer

    def _accept(self, parts: list[zmq.Frame]) -> Message | None:
        peer = self._peer(parts[0].bytes, time.monotonic())
        self._claim = None
        try:
            msg = decode(parts[1:])
        except ProtocolError as e:
            self._reject(peer, e)
            return None
        except Exception as e:  # decode raises only ProtocolError by contract; contain a bug all the same
            log.exception("decoding a message from sender %s failed", peer.identity.hex())
            self._reject(peer, ProtocolError("internal_error", f"{type(e).__name__}: {e}"))
            return None
        mtype, sid = msg.type, msg.session
        if mtype == "heartbeat" and sid == LINK_SESSION:
            return None
        # A session belongs to the connection that opened it: nobody else may send into it, end it, keep it
        # alive, or take over its acknowledgements with a duplicate session_start.
        owner = self._session_peer.get(sid)
        if owner is not None and owner != peer.identity:
            self._reject(peer, ProtocolError(
                "not_owner", f"session {sid[:60]!r} belongs to another connection", session=sid, seq=msg.seq))
            return None
        if peer.checker is not None:
            try:
                peer.checker.check(msg)
            except ProtocolError as e:
                self._reject(peer, e)
                return None
        if mtype == "session_start" and owner is None:
            self._claim = (sid, peer.open_session)
            peer.open_session = sid
            self._session_peer[sid] = peer.identity
        elif mtype == "session_end" and peer.open_session == sid:
            peer.open_session = None
        if self.auto_ack:
            self.acknowledge(sid, msg.seq, final=mtype == "session_end")
        self.last_sender = peer.identity
        return msg

    def _reject(self, peer: _Peer | None, e: ProtocolError) -> None:
        self.rejected[e.code] += 1
        n = self.rejected[e.code]
        total = sum(self.rejected.values())
        # A flood costs a bounded log: the first of every code, up to 5 of each among the first 100 rejections,
        # then only every power of two of the total.
        if n == 1 or (n <= 5 and total <= 100) or total & (total - 1) == 0:
            who = peer.identity.hex() if peer is not None else "?"
            log.warning("rejected message from sender %s (session %r, seq %r): [%s] %s (%d of this code, %d in all)",
                        who, e.session, e.seq, e.code, e.detail, n, total)
        if peer is not None:
            nack = {**e.extra, "session": e.session, "seq": e.seq, "code": e.code, "detail": e.detail[:500]}
            self._send_to(peer, time.monotonic(), nacks=[nack])

    def _send_to(self, peer: _Peer, now: float, **extra: Any) -> None:
        fields: dict[str, Any] = dict(extra)
        if peer.pending_acks:
            fields["acks"] = dict(peer.pending_acks)
        try:
            self._sock.send_multipart([peer.identity, *_link_heartbeat(peer.link_seq, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN): acks are resent later
            return
        peer.link_seq += 1
        peer.last_sent = now
        peer.pending_acks.clear()

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + ACK_INTERVAL_S
        limit = self.liveness * self.heartbeat_interval_s
        for identity, peer in list(self._peers.items()):
            if peer.pending_acks or now - peer.last_sent >= self.heartbeat_interval_s:
                self._send_to(peer, now)
            silent_for = now - peer.last_seen
            if peer.open_session is not None and not peer.silent and silent_for > limit:
                peer.silent = True
                self._silent.add(peer.open_session)
                log.warning("sender of session %s silent for %.1f s (no data or heartbeat)",
                            peer.open_session, silent_for)
            elif peer.open_session is None and silent_for > 10 * limit:
                del self._peers[identity]  # long-gone sender without an open session
                for sid in [s for s, i in self._session_peer.items() if i == identity]:
                    del self._session_peer[sid]
