"""Service side of the lossless path: :class:`FrameReceiver` (ROUTER, binds), owned by one thread.

It decodes and validates every message, consumes link heartbeats, ties each session to the connection (ZeroMQ
routing id) that opened it, and sends acknowledgements, nacks and heartbeats back to the connection concerned.
ZeroMQ sockets are not thread-safe: a :class:`FrameReceiver` must be used from the one thread that calls its
methods.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import zmq

from stemlive.live.wire.endpoints import DEFAULT_FRAME_ENDPOINT, check_bind_endpoint, secure_server
from stemlive.live.wire.link import (
    ACK_INTERVAL_S,
    BACKCHANNEL_HWM,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_HIGH_WATER_MARK,
    DEFAULT_LIVENESS,
    link_heartbeat,
)
from stemlive.live.wire.protocol import (
    LINK_SESSION,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    Message,
    ProtocolError,
    decode,
)
from stemlive.live.wire.streamcheck import StreamChecker

log = logging.getLogger(__name__)


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
    burst : int
        Up to this many messages already waiting are received, decoded and checked in one go (the rest of them
        kept for the next :meth:`recv` calls): while a session streams faster than it is recorded, their
        Python runs back to back with warm CPU caches. 1: one message at a time.

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
        burst: int = 8,
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
        self._sock.setsockopt(zmq.SNDHWM, BACKCHANNEL_HWM)
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
        self.burst = max(1, burst)
        # accepted messages not yet returned: (message, its sender's routing id, its ownership claim)
        self._ready: deque[tuple[Message, bytes | None, tuple[str, str | None] | None]] = deque()

    # ---- public API
    def recv(self, timeout_s: float | None = None) -> Message | None:
        """Next valid message, or None after ``timeout_s`` (None: wait indefinitely).

        Malformed messages are logged with their reason, counted in :attr:`rejected`, reported back to the
        sender and skipped; this method never raises for bad input. Link heartbeats are consumed here;
        in-session heartbeats are returned (they carry a seq).
        """
        sock = self._sock
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._housekeeping(now)
        if not self._ready:
            self._receive_waiting()
        if self._ready:
            return self._pop()
        deadline = None if timeout_s is None else now + timeout_s
        while True:
            now = time.monotonic()
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            left = None if deadline is None else deadline - now
            # nothing waiting: one blocking receive (GIL released) bounded by the next housekeeping, instead of
            # polling
            wait_ms = int(1000 * min(self._next_housekeeping - now, ACK_INTERVAL_S if left is None else left)) + 1
            if left is not None and left <= 0:
                wait_ms = 0
            # waking up early only costs a loop: the socket option is set again only when it would wake up late,
            # or more than twice too early (not once per message)
            if wait_ms < self._rcvtimeo or wait_ms > 2 * self._rcvtimeo + 1 or self._rcvtimeo < 0:
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                self._take(self._recv_parts(0))
            except zmq.Again:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            self._receive_waiting()
            if self._ready:
                return self._pop()

    @property
    def ready(self) -> int:
        """Messages received and decoded but not yet returned by :meth:`recv` (the rest of a burst)."""
        return len(self._ready)

    def _receive_waiting(self) -> None:
        """Receive, decode and check the messages already waiting in the socket, up to ``burst`` in all.

        Handled back to back, their Python runs while its code and data are still in the CPU caches; one message
        at a time, each 1 MiB frame written to the file in between evicts them and the same work costs 3-4x.
        """
        for _ in range(self.burst - len(self._ready)):
            try:
                parts = self._recv_parts(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._take(parts)

    def _take(self, parts: list[Any]) -> None:
        msg = self._accept(parts)
        if msg is not None:
            self._ready.append((msg, self.last_sender, self._claim))

    def _pop(self) -> Message:
        # the sender and ownership claim of the message returned, for reject() and the caller's last_sender
        msg, self.last_sender, self._claim = self._ready.popleft()
        return msg

    def _recv_parts(self, flags: int) -> list[Any]:
        """One multipart message: the routing id (bytes), then the parts as zmq.Frame (zero-copy)."""
        sock = self._sock
        # recv_multipart asks the socket for RCVMORE through a Python-level option lookup per part; a Frame
        # carries the flag already. The routing id is always followed by at least one part.
        parts: list[Any] = [sock.recv(flags)]
        frame = sock.recv(copy=False)
        parts.append(frame)
        while frame.more:
            frame = sock.recv(copy=False)
            parts.append(frame)
        return parts

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

    def _accept(self, parts: list[Any]) -> Message | None:
        peer = self._peers.get(parts[0])
        if peer is None or peer.silent:
            peer = self._peer(parts[0], time.monotonic())
        else:  # a known sender that is not marked silent (the per-message case): only its time
            peer.last_seen = time.monotonic()
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
        header = msg.header
        mtype, sid = header["type"], header["session"]
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
            self._sock.send_multipart([peer.identity, *link_heartbeat(peer.link_seq, **fields)], zmq.NOBLOCK)
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
