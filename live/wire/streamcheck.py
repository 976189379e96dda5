"""stemlive wire protocol v1: per-connection stream checks (session lifecycle, seq order, gaps, consistency).

Decoded messages (:func:`stemlive.live.wire.protocol.decode`) are checked here against what came before them on
the same connection: one open session at a time, contiguous ``seq`` (gaps logged and filled by late arrivals),
data kinds and shapes consistent within a session.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from stemlive.live.wire.schema import DATA_KINDS, LINK_SESSION, Message, rejection

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    """What a :class:`StreamChecker` knows about one session.

    Attributes
    ----------
    session, kind
        Session id and kind from ``session_start``.
    next_seq
        The seq expected next (one past the highest seq seen).
    received
        Messages accepted so far, session_start and session_end included.
    gaps
        Unfilled missing seq ranges ``(first, last)``, inclusive, in order.
    closed, end_status, declared_messages
        Set by ``session_end`` (or :meth:`StreamChecker.abandon`, which leaves ``end_status`` None).
    """

    session: str
    kind: str
    next_seq: int = 1
    received: int = 1
    gaps: list[tuple[int, int]] = field(default_factory=list)
    closed: bool = False
    end_status: str | None = None
    declared_messages: int | None = None
    frame_shape: tuple[int, ...] | None = None
    n_channels: int | None = None
    n_gap_warnings: int = 0

    @property
    def missing(self) -> int:
        """Number of messages in unfilled gaps."""
        return sum(b - a + 1 for a, b in self.gaps)


class StreamChecker:
    """Stateful checks over the messages of one connection (one open session at a time).

    ``check`` raises :class:`ProtocolError` for a message to reject (log it, keep running). A seq *gap* is not
    a rejection: the message is accepted, the missing range is logged, returned and kept in :meth:`gaps` until
    late arrivals fill it. Link-level heartbeats (session ``""``) are ignored.

    Parameters
    ----------
    max_closed : int
        Closed sessions remembered (for duplicate/late-arrival handling); older ones are forgotten.
    """

    def __init__(self, *, max_closed: int = 64) -> None:
        self._open: SessionState | None = None
        self._closed: OrderedDict[str, SessionState] = OrderedDict()
        self._max_closed = max_closed

    @property
    def open_session(self) -> str | None:
        """Id of the session currently open, if any."""
        return None if self._open is None else self._open.session

    def state(self, session_id: str) -> SessionState | None:
        """State of an open or remembered closed session."""
        if self._open is not None and self._open.session == session_id:
            return self._open
        return self._closed.get(session_id)

    def gaps(self, session_id: str) -> list[tuple[int, int]]:
        """Unfilled missing seq ranges ``(first, last)`` (inclusive) of a session; empty if none or unknown."""
        st = self.state(session_id)
        return [] if st is None else list(st.gaps)

    def abandon(self, session_id: str) -> None:
        """Close an open session without a ``session_end`` (e.g. its sender went silent); later messages for it
        are rejected with ``session_closed`` and a new session may start."""
        if self._open is not None and self._open.session == session_id:
            self._close(self._open)

    def check(self, msg: Message) -> tuple[int, int] | None:
        """Check one decoded message against the stream state and record it.

        Returns
        -------
        tuple or None
            The newly detected missing seq range ``(first, last)`` if ``msg`` skipped ahead, else None.

        Raises
        ------
        ProtocolError
            For a message to reject; the state is unchanged.
        """
        mtype, sid = msg.header["type"], msg.header["session"]
        if mtype == "heartbeat" and sid == LINK_SESSION:
            return None
        if mtype == "result":
            raise rejection("unexpected_type", "result messages do not belong on the acquisition stream", msg.header)
        if mtype == "session_start" and not (self._open is not None and self._open.session == sid):
            self._start(msg)
            return None
        st = self.state(sid)
        if st is None:
            if self._open is not None:
                raise rejection("wrong_session", f"message for session {sid!r} while {self._open.session!r} is open",
                                msg.header)
            raise rejection("no_session", f"{mtype} for session {sid!r} which has not started", msg.header)
        if msg.payload is not None:
            self._check_data(st, msg)
        gap = self._sequence(st, msg)
        self._note_shape(st, msg)
        if mtype == "session_end" and not st.closed:
            st.end_status = msg.header["status"]
            st.declared_messages = msg.header["messages"]
            self._close(st)
            if st.gaps:
                log.warning("session %s ended (%s) with %d missing messages in %d seq ranges (first: %s)",
                            sid, st.end_status, st.missing, len(st.gaps), st.gaps[:5])
        return gap

    @staticmethod
    def _check_data(st: SessionState, msg: Message) -> None:
        """Data kind and shape consistency: what the recorder could not store is refused here."""
        h, payload = msg.header, msg.payload
        assert payload is not None
        mtype = h["type"]
        kinds = DATA_KINDS.get(mtype)
        if kinds is not None and st.kind not in kinds:
            raise rejection("wrong_kind", f"a {mtype} does not belong in a {st.kind} session", h)
        if mtype == "frame" and st.frame_shape is not None and payload.shape != st.frame_shape:
            raise rejection("shape_mismatch", f"frame shape {list(payload.shape)} differs from the session's "
                            f"{list(st.frame_shape)}", h)
        if mtype == "spectrum" and st.n_channels is not None and payload.shape[-1] != st.n_channels:
            raise rejection("shape_mismatch", f"spectrum has {payload.shape[-1]} channels, the session "
                            f"{st.n_channels}", h)

    @staticmethod
    def _note_shape(st: SessionState, msg: Message) -> None:
        payload = msg.payload
        if payload is None:
            return
        if msg.header["type"] == "frame" and st.frame_shape is None:
            st.frame_shape = tuple(payload.shape)
        elif msg.header["type"] == "spectrum" and st.n_channels is None:
            st.n_channels = int(payload.shape[-1])

    def _start(self, msg: Message) -> None:
        sid = msg.header["session"]
        if self._open is not None:
            raise rejection("session_already_open", f"session_start {sid!r} while {self._open.session!r} is open",
                            msg.header)
        if sid in self._closed:
            raise rejection("session_reused", f"session id {sid!r} was already used on this connection", msg.header)
        if msg.header["seq"] != 0:
            raise rejection("bad_start_seq", f"session_start must have seq 0, got {msg.header['seq']}", msg.header)
        self._open = SessionState(sid, msg.header["kind"])

    def _sequence(self, st: SessionState, msg: Message) -> tuple[int, int] | None:
        seq = msg.header["seq"]
        if st.closed:
            if not self._fill(st, seq):
                raise rejection("session_closed", f"{msg.header['type']} seq {seq} after session {st.session!r} ended",
                                msg.header)
            return None
        if seq == st.next_seq:
            st.next_seq += 1
            st.received += 1
            return None
        if seq > st.next_seq:
            gap = (st.next_seq, seq - 1)
            st.gaps.append(gap)
            st.next_seq = seq + 1
            st.received += 1
            st.n_gap_warnings += 1
            n = st.n_gap_warnings
            if n <= 10 or n & (n - 1) == 0:  # a flood of gaps logs its first ten and then powers of two
                log.warning("session %s: seq gap, messages %d..%d missing (accepted seq %d; gap %d of the session)",
                            st.session, *gap, seq, n)
            return gap
        if not self._fill(st, seq):
            raise rejection("duplicate_seq", f"seq {seq} of session {st.session!r} already received", msg.header)
        return None

    @staticmethod
    def _fill(st: SessionState, seq: int) -> bool:
        for i, (a, b) in enumerate(st.gaps):
            if a <= seq <= b:
                st.gaps[i : i + 1] = [g for g in ((a, seq - 1), (seq + 1, b)) if g[0] <= g[1]]
                st.received += 1
                log.debug("session %s: late seq %d filled a gap", st.session, seq)
                return True
        return False

    def _close(self, st: SessionState) -> None:
        st.closed = True
        self._open = None
        self._closed[st.session] = st
        while len(self._closed) > self._max_closed:
            self._closed.popitem(last=False)
