"""ZeroMQ transport for wire protocol v1: the lossless acquisition path and the lossy result stream.

The transport layer's public names, importable from here; each lives in the module of its concept.

Lossless path (acquisition -> service)
    :class:`FrameSender` and :class:`SessionStream` (:mod:`stemlive.live.wire.sender`, DEALER, connects) ->
    :class:`FrameReceiver` (:mod:`stemlive.live.wire.receiver`, ROUTER, binds); their shared parameters and the
    link heartbeat are :mod:`stemlive.live.wire.link`. Queues are bounded by high-water marks counted in whole
    messages, so a slow service makes :meth:`FrameSender.send` block; a send blocked longer than ``timeout_s``
    raises :class:`TransportError`. Nothing is ever dropped silently. The service acknowledges recorded messages
    back over the same connection (cumulative per session) and both sides exchange link heartbeats to notice a
    dead peer.

Result stream (service -> Swift, viewers)
    :class:`ResultPublisher` (PUB, binds) -> :class:`ResultSubscriber` (SUB, connects), in
    :mod:`stemlive.live.wire.resultstream`. Lossy by design, with exact loss counts and re-requests of final
    results.

Endpoints and security
    :mod:`stemlive.live.wire.endpoints` (loopback-only binds unless allowed, CURVE keys applied to sockets).

Threads
    ZeroMQ sockets are not thread-safe. A :class:`FrameReceiver`, :class:`ResultPublisher` and
    :class:`ResultSubscriber` must each be used from one thread only (the one that calls its methods).
    A :class:`FrameSender` may be used from one application thread at a time (see its module).

The protocol is specified in ``docs/protocol.md``.
"""

from __future__ import annotations

from stemlive.live.wire.endpoints import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_RESULT_ENDPOINT,
    TransportError,
    check_bind_endpoint,
    is_loopback,
)
from stemlive.live.wire.link import (
    ACK_INTERVAL_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_HIGH_WATER_MARK,
    DEFAULT_LIVENESS,
)
from stemlive.live.wire.receiver import FrameReceiver
from stemlive.live.wire.resultstream import (
    DEFAULT_RESULT_HIGH_WATER_MARK,
    ResultPublisher,
    ResultRecovery,
    ResultSubscriber,
    result_topic,
)
from stemlive.live.wire.sender import DEFAULT_CLOSE_TIMEOUT_S, FrameSender, Nack, SessionStream, new_session_id

__all__ = [
    "ACK_INTERVAL_S", "DEFAULT_CLOSE_TIMEOUT_S", "DEFAULT_FRAME_ENDPOINT", "DEFAULT_HEARTBEAT_INTERVAL_S",
    "DEFAULT_HIGH_WATER_MARK", "DEFAULT_LIVENESS", "DEFAULT_RESULT_ENDPOINT", "DEFAULT_RESULT_HIGH_WATER_MARK",
    "FrameReceiver", "FrameSender", "Nack", "ResultPublisher", "ResultRecovery", "ResultSubscriber",
    "SessionStream", "TransportError", "check_bind_endpoint", "is_loopback", "new_session_id", "result_topic",
]
