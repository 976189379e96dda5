"""The lossless link's shared parameters and its link-level heartbeat (sender and receiver sides)."""

from __future__ import annotations

import time
from typing import Any

from stemlive.live.wire.protocol import LINK_SESSION, encode

#: Messages queued by the sender before ``send`` blocks (64 x 1 MiB frames = 64 MiB).
DEFAULT_HIGH_WATER_MARK = 64
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
