"""The live viewer's state: :class:`ViewerModel`, one :class:`~stemlive.live.apps.viewer_session.SessionView` per
session, fed from a result subscriber. Pure Python + numpy: testable without Qt. See ``docs/viewer.md``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from stemlive.live.apps.viewer_session import PANELS, SessionView

if TYPE_CHECKING:
    from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)

class Subscriber(Protocol):
    """What :meth:`ViewerModel.poll` needs of a subscriber (:class:`~stemlive.live.wire.transport.ResultSubscriber`)."""

    dropped: int

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """Next result or None after ``timeout_s``."""
        ...



class ViewerModel:
    """State of the viewer built from result messages; independent of Qt and of sockets.

    Parameters
    ----------
    max_sessions : int
        Sessions kept (oldest forgotten first); the current one is always kept.

    Attributes
    ----------
    sessions : OrderedDict[str, SessionView]
        Sessions by id, in the order they were first seen.
    current : str or None
        The newest session seen (shown in the status line). A late result of an older session updates that
        session but does not switch back to it.
    latest : dict[str, str]
        The newest session of each kind (``"tilt_series"``, ``"eels"``): the window draws the tilt-series
        panels from one and the EELS panels from the other, so a line scan does not blank the tilt series
        acquired just before it.
    results : int
        Results applied in total.
    dropped : int
        Results lost on the way (from the subscriber's ``topic_seq`` gap counter; joining late is no loss).
    """

    def __init__(self, max_sessions: int = 8) -> None:
        self.max_sessions = max(1, int(max_sessions))
        self.sessions: OrderedDict[str, SessionView] = OrderedDict()
        self.current: str | None = None
        self.latest: dict[str, str] = {}
        self._order: dict[str, int] = {}
        self.results = 0
        self.dropped = 0
        self.session_switches = 0
        self.last_poll_monotonic = 0.0
        self.last_result_monotonic: float | None = None

    @property
    def view(self) -> SessionView | None:
        """The current session's state, or None before the first result."""
        return self.sessions.get(self.current) if self.current is not None else None

    def latest_view(self, kind: str) -> SessionView | None:
        """The newest session with results of ``kind`` (``"tilt_series"`` or ``"eels"``), or None."""
        sid = self.latest.get(kind)
        return self.sessions.get(sid) if sid is not None else None

    def apply(self, msg: Message) -> SessionView | None:
        """Apply one message; non-result messages and results without a session are ignored.

        Returns
        -------
        SessionView or None
            The session it updated.
        """
        if msg.header.get("type") != "result":
            return None
        sid = str(msg.header.get("session") or "")
        if not sid:
            return None
        state = self.sessions.get(sid)
        if state is None:
            state = SessionView(sid)
            self.sessions[sid] = state
            self._order[sid] = len(self._order)
            if self.current is not None:
                self.session_switches += 1
                log.info("new session %s: switching from %s", sid, self.current)
            self.current = sid
            while len(self.sessions) > self.max_sessions:
                oldest = next(iter(self.sessions))
                if oldest == self.current:
                    break
                del self.sessions[oldest]
        state.apply(msg)
        if state.kind != "unknown":
            shown = self.latest.get(state.kind)
            if shown is None or shown not in self.sessions or self._order[shown] < self._order[sid]:
                if shown != sid:
                    state.changed.update(PANELS)
                self.latest[state.kind] = sid
        self.results += 1
        self.last_result_monotonic = time.monotonic()
        return state

    def apply_all(self, messages: Iterable[Message]) -> int:
        """Apply several messages; returns how many."""
        n = 0
        for msg in messages:
            self.apply(msg)
            n += 1
        return n

    def update_dropped(self, total: int, by_session: Mapping[str, int] | None = None) -> None:
        """Take over the subscriber's loss counters."""
        if total != self.dropped:
            self.dropped = int(total)
            if self.view is not None:
                self.view.changed.add("status")
        for sid, n in (by_session or {}).items():
            state = self.sessions.get(sid)
            if state is not None and state.dropped != n:
                state.dropped = int(n)
                state.changed.add("status")

    def poll(self, subscriber: Subscriber, *, max_messages: int = 500, budget_s: float = 0.03) -> int:
        """Drain what the subscriber has queued, without blocking.

        Parameters
        ----------
        subscriber
            A :class:`~stemlive.live.wire.transport.ResultSubscriber` (anything with ``recv(timeout_s)`` and
            ``dropped``; ``dropped_by_session`` is used when present).
        max_messages, budget_s
            Stop after this many messages or this much time, so a GUI stays responsive under a flood (what is
            not read stays queued; past the socket's high-water mark the stream drops and counts it).

        Returns
        -------
        int
            Messages applied.
        """
        n = 0
        deadline = time.monotonic() + budget_s
        recovery = self._recovery_for(subscriber)
        while n < max_messages:
            msg = subscriber.recv(timeout_s=0)
            if msg is None:
                break
            self.apply(msg)
            n += 1
            if recovery is not None:
                recovery.received()
            if time.monotonic() > deadline:
                break
        if n == 0 and recovery is not None:
            self.apply_all(recovery.idle())  # final results lost on the stream, asked for again
        self.update_dropped(int(getattr(subscriber, "dropped", 0)), getattr(subscriber, "dropped_by_session", None))
        self.last_poll_monotonic = time.monotonic()
        return n

    def _recovery_for(self, subscriber: Subscriber) -> Any:
        """A :class:`~stemlive.live.wire.transport.ResultRecovery` for a real subscriber (None for test doubles)."""
        from stemlive.live.wire.transport import ResultRecovery, ResultSubscriber

        if not isinstance(subscriber, ResultSubscriber):
            return None
        recovery = getattr(self, "_recovery", None)
        if recovery is None or recovery.subscriber is not subscriber:
            recovery = self._recovery = ResultRecovery(subscriber)
        return recovery

    def status_text(self, endpoint: str | None = None) -> str:
        """The status line: endpoint, current session, its contents, counts and losses."""
        parts = []
        if endpoint:
            parts.append(endpoint)
        view = self.view
        if view is None:
            parts.append("waiting for results")
        else:
            parts.append(f"session {view.session}")
            parts.append(view.summary())
            parts.append(f"{view.results} results ({view.dropped} dropped)")
        parts.append(f"total {self.results} results, {self.dropped} dropped")
        if len(self.sessions) > 1:
            parts.append(f"{len(self.sessions)} sessions seen")
        if view is not None and view.errors:
            parts.append(view.errors[-1])
        return " | ".join(parts)

