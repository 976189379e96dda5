"""The lossless link's shared parameters and its link-level heartbeat (sender and receiver sides)."""

from __future__ import annotations

import time
from typing import Any

from stemlive.live.wire.protocol import LINK_SESSION, encode

#: Messages queued by a receiver before its senders' queues fill (:class:`FrameReceiver`'s default; the service
#: sets its own, ``RECEIVE_HIGH_WATER_MARK``).
DEFAULT_HIGH_WATER_MARK = 64
#: What the sender queues in its own process before ``send`` blocks, in bytes (ZeroMQ bounds whole messages,
#: not bytes, and only before the socket connects): 256 MiB = 256 512x512 float32 frames. Room for the
#: acquisition to run ahead of a recorder that shares its CPU (docs/benchmarks.md, "tcp queues").
SENDER_QUEUE_BYTES = 256 * 2**20
#: The sender's default high-water mark: :data:`SENDER_QUEUE_BYTES` of 512x512 float32 frames (1 MiB).
DEFAULT_SENDER_HIGH_WATER_MARK = 256


def sender_high_water_mark(message_bytes: int, queue_bytes: int = SENDER_QUEUE_BYTES) -> int:
    """A sender high-water mark that queues about ``queue_bytes`` of messages of ``message_bytes`` each.

    For acquisitions with frames larger than 1 MiB: ``FrameSender(ep, high_water_mark=sender_high_water_mark(
    frame.nbytes))`` keeps the sender's queue at 256 MiB (at least 4 messages, at most ZeroMQ's default 1000).
    """
    return max(4, min(1000, queue_bytes // max(1, message_bytes)))
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
#: A peer silent for this many heartbeat intervals is considered dead (sender) or silent (receiver).
DEFAULT_LIVENESS = 5
#: The receiver flushes pending acknowledgements at least this often while it is being polled.
ACK_INTERVAL_S = 0.05
#: Queue bound of the back channel (acknowledgements, nacks, heartbeats) in messages.
BACKCHANNEL_HWM = 1000


def link_heartbeat(seq: int, **fields: Any) -> list[bytes | memoryview]:
    """A link heartbeat (session ``""``) carrying ``fields``: acknowledgements, nacks, warnings."""
    return encode({"type": "heartbeat", "session": LINK_SESSION, "seq": seq, "t": time.time(), **fields})
