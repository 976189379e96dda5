"""The result stream (service -> Swift, viewers): lossy PUB/SUB with exact loss counts and re-requests.

:class:`ResultPublisher` (PUB, binds) -> :class:`ResultSubscriber` (SUB, connects). Lossy by design: a slow
subscriber loses results, the publisher never blocks. Every result carries ``stream``/``stream_seq`` (exact loss
counts) and the publisher keeps the latest whole result of each (stage, name) to answer re-requests on a ROUTER
beside the PUB (:meth:`ResultSubscriber.recover`, :class:`ResultRecovery`). Specified in ``docs/protocol.md`` 5.
Each publisher and subscriber belongs to one thread.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import numpy as np
import zmq

from stemlive.live.wire.endpoints import (
    DEFAULT_RESULT_ENDPOINT,
    TransportError,
    check_bind_endpoint,
    reachable,
    secure_client,
    secure_server,
    sibling_endpoint,
)
from stemlive.live.wire.protocol import PROTO, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

DEFAULT_RESULT_HIGH_WATER_MARK = 256
#: Bytes of whole results the publisher keeps so that missed final results can be asked for again.
DEFAULT_RESULT_HISTORY_BYTES = 64 * 2**20


class ResultHistory:
    """The latest whole result of each (stage, name) of recent sessions, as encoded parts, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[str, dict[tuple[str, str], list[bytes]]] = OrderedDict()
        self._closed: set[str] = set()
        self._bytes = 0

    def keep(self, session: str, topic: tuple[str, str], parts: list[bytes | memoryview]) -> None:
        copied = [bytes(p) for p in parts]
        size = sum(len(p) for p in copied)
        if size > self.max_bytes:
            return
        kept = self._sessions.setdefault(session, {})
        self._sessions.move_to_end(session)
        old = kept.pop(topic, None)
        self._bytes += size - (sum(len(p) for p in old) if old else 0)
        kept[topic] = copied
        while self._bytes > self.max_bytes and self._sessions:
            sid, oldest = next(iter(self._sessions.items()))
            victim = next(iter(oldest))
            self._bytes -= sum(len(p) for p in oldest.pop(victim))
            if not oldest:
                del self._sessions[sid]
                self._closed.discard(sid)

    def close(self, session: str) -> None:
        self._closed.add(session)

    def latest(self) -> str | None:
        return next(reversed(self._sessions), None)

    def get(self, session: str) -> tuple[list[list[bytes]], bool]:
        return list(self._sessions.get(session, {}).values()), session in self._closed


def result_topic(stage: str, name: str | None = None) -> bytes:
    """SUB prefix selecting results of ``stage`` (and ``name``): encoders write proto, type, stage, name first."""
    prefix = f'{{"proto":{json.dumps(PROTO)},"type":"result","stage":{json.dumps(stage)},'
    if name is not None:
        prefix += f'"name":{json.dumps(name)},'
    return prefix.encode("utf-8")


class ResultPublisher:
    """Lossy result stream (PUB, binds). Never blocks; slow subscribers lose messages (they count the gaps).

    Parameters
    ----------
    endpoint : str
        Bind endpoint (loopback unless ``allow_remote``).
    allow_remote : bool
        Allow binding a non-loopback interface.
    high_water_mark : int
        Messages queued per subscriber before newer ones are dropped for it.
    kernel_buffer_bytes : int, optional
        SO_SNDBUF for TCP; None keeps the OS default (Linux autotunes it up to ``net.ipv4.tcp_wmem``, so how many
        results a stalled subscriber's connection absorbs before drops start varies with timing).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_RESULT_ENDPOINT,
        *,
        allow_remote: bool = False,
        high_water_mark: int = DEFAULT_RESULT_HIGH_WATER_MARK,
        request_endpoint: str | None = None,
        history_bytes: int = DEFAULT_RESULT_HISTORY_BYTES,
        curve: Any = None,
        context: zmq.Context[Any] | None = None,
        kernel_buffer_bytes: int | None = None,
    ) -> None:
        bind = check_bind_endpoint(endpoint, allow_remote)
        ctx = context or zmq.Context.instance()
        self._seq: dict[str, int] = {}
        self._topic_seq: dict[tuple[str, str, str], int] = {}
        self.stream = uuid.uuid4().hex[:12]  # tells subscribers a restarted publisher from a gap
        self._stream_seq = 0
        self._sock = ctx.socket(zmq.PUB)
        secure_server(self._sock, curve)
        self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
        if kernel_buffer_bytes is not None:
            self._sock.setsockopt(zmq.SNDBUF, kernel_buffer_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # Final results can be asked for again on a ROUTER beside the PUB (lossless request/reply).
        self._history = ResultHistory(history_bytes)
        self._requests = ctx.socket(zmq.ROUTER)
        secure_server(self._requests, curve)
        self._requests.setsockopt(zmq.LINGER, 0)
        self._requests.setsockopt(zmq.SNDHWM, 100_000)
        req = request_endpoint or sibling_endpoint(self.endpoint)
        self._requests.bind(check_bind_endpoint(req, allow_remote))
        self.request_endpoint: str = self._requests.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, header_fields: Mapping[str, Any], payload: np.ndarray | None = None) -> int:
        """Publish a ``result`` message; ``session``, ``stage`` and ``name`` are required.

        ``seq`` (per session, from 0) and ``topic_seq`` (per session, stage and name, from 0) are assigned here;
        ``t`` defaults to now. Small values may travel in a JSON ``value`` field instead of a payload.

        Returns
        -------
        int
            The seq assigned.
        """
        session = str(header_fields.get("session", ""))
        topic = (session, str(header_fields.get("stage", "")), str(header_fields.get("name", "")))
        seq, topic_seq = self._seq.get(session, 0), self._topic_seq.get(topic, 0)
        header = {"type": "result", "t": time.time(), **header_fields, "session": session, "seq": seq,
                  "topic_seq": topic_seq, "stream": self.stream, "stream_seq": self._stream_seq,
                  "resend": self.request_endpoint}
        parts = encode(header, payload)
        self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)  # PUB drops at HWM, never EAGAIN
        self._stream_seq += 1
        self._seq[session] = seq + 1
        self._topic_seq[topic] = topic_seq + 1
        if header_fields.get("index") is None:  # a whole result (not a row): the latest one can be asked for
            self._history.keep(session, topic[1:], parts)
        return seq

    def session_closed(self, session: str) -> None:
        """Mark ``session`` closed: a request for its final results then says so (``closed: true``)."""
        self._history.close(session)

    def serve_requests(self) -> int:
        """Answer pending result requests without blocking (call it from the publisher's thread).

        A request is one JSON part ``{"session": <id> | null}`` (null: the latest session). The reply is every
        kept whole result of the session, each as published (same ``stream_seq``), then one JSON part
        ``{"done": true, "session", "count", "closed", "stream", "last_stream_seq", "last_seq"}`` (``last_seq``: the
        session's last result seq, -1 if none). Returns the requests served.
        """
        served = 0
        while True:
            try:
                identity, *body = self._requests.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            served += 1
            try:
                request = json.loads(body[0]) if len(body) == 1 and len(body[0]) < 4096 else None
            except ValueError:
                request = None
            sid = request.get("session") if isinstance(request, dict) else None
            if sid is None or not isinstance(sid, str):
                sid = self._history.latest()
            kept, closed = self._history.get(sid or "")
            try:
                for parts in kept:
                    self._requests.send_multipart([identity, *parts], zmq.NOBLOCK)
                done = {"done": True, "session": sid, "count": len(kept), "closed": closed, "stream": self.stream,
                        "last_stream_seq": self._stream_seq - 1, "last_seq": self._seq.get(sid or "", 0) - 1,
                        "bad_request": not isinstance(request, dict)}
                self._requests.send_multipart([identity, json.dumps(done).encode()], zmq.NOBLOCK)
            except zmq.ZMQError:  # requester gone or flooding: it asks again
                continue

    def close(self) -> None:
        """Close the sockets (undelivered results are dropped)."""
        self._sock.close(linger=0)
        self._requests.close(linger=0)

    def __enter__(self) -> ResultPublisher:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ResultSubscriber:
    """Result stream consumer (SUB, connects). Owned by one thread.

    Parameters
    ----------
    endpoint : str
        The publisher's endpoint.
    topics : iterable of str, optional
        ``"stage"`` or ``"stage/name"`` filters (see :func:`result_topic`); default: all results.
    high_water_mark : int
        Messages queued here before newer ones are dropped.
    kernel_buffer_bytes : int, optional
        SO_RCVBUF for TCP; None keeps the OS default (Linux autotunes up to ``net.ipv4.tcp_rmem``).

    Attributes
    ----------
    dropped : int
        Results lost. Subscribed to everything: exactly the gaps in the publisher's ``stream_seq`` (every result
        it published since the first one seen, minus those received), including lost results at the end once
        :meth:`sync` has asked the publisher for its last ``stream_seq``. With topic filters: the sum of gaps in
        ``topic_seq`` per (session, stage, name), so filtered-out results do not count as loss. Joining late is
        not a loss; a new ``stream`` id (publisher restart) starts the count again.
    dropped_by_session : collections.Counter
    rejected : collections.Counter
        Malformed messages by code (logged and skipped).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_RESULT_ENDPOINT,
        topics: Iterable[str] | None = None,
        *,
        high_water_mark: int = 1000,
        request_endpoint: str | None = None,
        curve: Any = None,
        context: zmq.Context[Any] | None = None,
        kernel_buffer_bytes: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.dropped = 0
        self.dropped_by_session: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.request_endpoint = request_endpoint
        self._context = context or zmq.Context.instance()
        self._curve = curve
        self._expected: dict[tuple[str, str, str], int] = {}
        self._all = topics is None
        self._stream: str | None = None
        self._next_stream_seq: int | None = None
        self._next_seq: dict[str, int] = {}  # per session, subscribed to everything
        self._last_session = ""
        self._sock = self._context.socket(zmq.SUB)
        secure_client(self._sock, curve)
        self._sock.setsockopt(zmq.RCVHWM, high_water_mark)
        if kernel_buffer_bytes is not None:
            self._sock.setsockopt(zmq.RCVBUF, kernel_buffer_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        for topic in topics if topics is not None else [None]:
            if topic is None:
                prefix = f'{{"proto":"{PROTO}","type":"result",'.encode()
            else:
                stage, _, name = topic.partition("/")
                prefix = result_topic(stage, name or None)
            self._sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self._sock.connect(endpoint)

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """Next valid result, or None after ``timeout_s`` (None: wait indefinitely)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000), zmq.POLLIN):
                return None
            parts = self._sock.recv_multipart(copy=False)
            try:
                msg = decode(parts)
                if msg.type != "result":
                    raise ProtocolError("unexpected_type", f"{msg.type} message on the result stream")
            except ProtocolError as e:
                self.rejected[e.code] += 1
                log.warning("rejected message on result stream %s: [%s] %s", self.endpoint, e.code, e.detail)
                continue
            self._count_drops(msg)
            return msg

    def _count_drops(self, msg: Message) -> None:
        h = msg.header
        resend = h.get("resend")
        if isinstance(resend, str) and self.request_endpoint is None:
            self.request_endpoint = reachable(resend, self.endpoint)
        self._last_session = msg.session
        stream, stream_seq = h.get("stream"), h.get("stream_seq")
        if self._all and isinstance(stream, str) and type(stream_seq) is int:
            # the total from the stream-wide seq, each session's share from its own seq: both exact
            if stream != self._stream:
                self._stream, self._next_stream_seq, self._next_seq = stream, None, {}
            if self._next_stream_seq is not None and stream_seq > self._next_stream_seq:
                self.dropped += stream_seq - self._next_stream_seq
            if self._next_stream_seq is None or stream_seq >= self._next_stream_seq:
                self._next_stream_seq = stream_seq + 1
            expected = self._next_seq.get(msg.session)
            if expected is not None and msg.seq > expected:
                self.dropped_by_session[msg.session] += msg.seq - expected
            if expected is None or msg.seq >= expected:
                self._next_seq[msg.session] = msg.seq + 1
                if len(self._next_seq) > 64:  # remember the recent sessions only
                    del self._next_seq[next(iter(self._next_seq))]
            return
        seq = h.get("topic_seq", h["seq"])
        key = (msg.session, h["stage"], h["name"])
        expected = self._expected.get(key)
        if expected is not None and seq > expected:
            self._lost(msg.session, seq - expected)
        elif expected is not None and seq < expected:
            log.info("results %s restarted at %d (publisher restart)", key, seq)
        self._expected[key] = seq + 1

    def _lost(self, session: str, n: int) -> None:
        self.dropped += n
        self.dropped_by_session[session] += n

    def _request(self, session: str | None, timeout_s: float) -> tuple[list[Message], dict[str, Any]]:
        if self.request_endpoint is None:
            raise TransportError(f"no request endpoint known for results at {self.endpoint}: no result received yet "
                                 "and none given")
        sock = self._context.socket(zmq.DEALER)
        secure_client(sock, self._curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.request_endpoint)
        try:
            sock.send(json.dumps({"session": session}).encode())
            out: list[Message] = []
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    raise TransportError(f"no answer from {self.request_endpoint} within {timeout_s} s")
                parts = sock.recv_multipart()
                if len(parts) == 1 and parts[0].startswith(b'{"done"'):
                    return out, json.loads(parts[0])
                try:
                    out.append(decode(parts))
                except ProtocolError as e:
                    self.rejected[e.code] += 1
        finally:
            sock.close(linger=0)

    def sync(self, session: str | None = None, timeout_s: float = 5.0) -> int:
        """Ask the publisher for its last ``stream_seq`` (and ``session``'s last seq) and count the results lost at
        the end of the stream.

        Results lost after the last one received show no gap until something newer arrives; call this when the
        stream has gone quiet (e.g. a session ended) to make :attr:`dropped` and ``dropped_by_session[session]``
        (default: the session of the last result received) exact. Subscribed to everything only; with topic
        filters nothing changes. Returns :attr:`dropped`.
        """
        sid = session or self._last_session
        _, done = self._request(sid or None, timeout_s)
        if not self._all or done.get("stream") != self._stream:
            return self.dropped
        last, last_seq = done.get("last_stream_seq"), done.get("last_seq")
        if self._next_stream_seq is not None and type(last) is int and last >= self._next_stream_seq:
            self.dropped += last + 1 - self._next_stream_seq
            self._next_stream_seq = last + 1
        expected = self._next_seq.get(sid)
        if expected is not None and type(last_seq) is int and last_seq >= expected:
            self.dropped_by_session[sid] += last_seq + 1 - expected
            self._next_seq[sid] = last_seq + 1
        return self.dropped

    def sessions_seen(self) -> list[str]:
        """Sessions this subscriber has received results of (subscribed to everything), oldest first."""
        return list(self._next_seq)

    def recover(self, session: str | None = None, timeout_s: float = 5.0) -> list[Message]:
        """Ask the publisher again for the whole (final) results of ``session`` (default: the latest).

        Returns every kept result of the session (the latest of each stage and name), as published.
        Does not change :attr:`dropped`.
        """
        return self._request(session, timeout_s)[0]

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)

    def __enter__(self) -> ResultSubscriber:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ResultRecovery:
    """Ask again for the whole results a :class:`ResultSubscriber` missed, once its stream has gone quiet.

    Call :meth:`received` for every result read and :meth:`idle` when a read found nothing; ``idle`` returns the
    recovered results (to apply like received ones) at most once per quiet period: after ``quiet_s`` without
    results it asks the publisher for its last ``stream_seq`` (:meth:`ResultSubscriber.sync`, which makes the
    drop count exact), and for each session with new losses fetches its kept whole results
    (:meth:`ResultSubscriber.recover`). Used by the viewer and the Swift plug-in's result receiver.
    """

    def __init__(self, subscriber: ResultSubscriber, quiet_s: float = 0.5, timeout_s: float = 1.0) -> None:
        self.subscriber = subscriber
        self.quiet_s = quiet_s
        self.timeout_s = timeout_s
        self.recovered = 0
        self._last = time.monotonic()
        self._pending = False
        self._handled: dict[str, int] = {}

    def received(self) -> None:
        """A result was read: the stream is not quiet."""
        self._last = time.monotonic()
        self._pending = True

    def idle(self) -> list[Message]:
        """Results recovered now (empty unless the stream went quiet after losing some)."""
        if not self._pending or time.monotonic() - self._last < self.quiet_s:
            return []
        self._pending = False
        sub = self.subscriber
        out: list[Message] = []
        try:
            for sid in sub.sessions_seen()[-4:]:  # the recent sessions: their losses at the end become known
                sub.sync(sid, self.timeout_s)
            for sid, n in list(sub.dropped_by_session.items()):
                if n > self._handled.get(sid, 0):
                    out.extend(sub.recover(sid, self.timeout_s))
                    self._handled[sid] = n
        except TransportError as e:
            log.warning("could not ask %s for missed results: %s", sub.request_endpoint, e)
        if out:
            log.info("recovered %d whole result(s) missed on the stream %s", len(out), sub.endpoint)
        self.recovered += len(out)
        return out
