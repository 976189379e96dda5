"""``stemlive serve``: the analysis service that records sessions one after another, analyses and publishes.

Sessions are recorded and analysed by :class:`~stemlive.live.pipeline.run.SessionRun` (the same code as
``stemlive replay --analyze``); the stages are :mod:`stemlive.live.pipeline.tilt_stage` and
:mod:`~stemlive.live.pipeline.eels_stage`. This module holds the service's two threads, its containment of
failures, session ownership, the disk budget and result publishing.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.config import Params
from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.run import DATA_TYPES, SessionRun, session_file_name, unique_path
from stemlive.live.pipeline.stage import Result, Stage
from stemlive.live.storage.disk import DEFAULT_BALLAST_BYTES, DEFAULT_RESERVE_BYTES, DiskBudget, is_disk_full
from stemlive.live.wire.protocol import Message, ProtocolError, json_default
from stemlive.live.wire.streamcheck import StreamChecker

log = logging.getLogger(__name__)


@dataclass
class ServiceStats:
    """Counters of a running service (for logs, tests and the heartbeat).

    ``errors`` counts contained failures by code (``internal_error``, ``record_failed``, ``disk_full``,
    ``analysis_error``): each one cost at most its message or its session, never the service.
    """

    sessions: int = 0
    messages: int = 0
    rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    sessions_done: list[Path] = field(default_factory=list)
    #: Data messages recorded, and when (``time.monotonic()``) the first and the last of them was recorded.
    recorded: int = 0
    first_recorded_s: float = 0.0
    last_recorded_s: float = 0.0


_END = object()
#: Messages queued in the service's receive socket: the sender's own queue (64) holds the rest, so a backlog
#: costs the acquisition process memory, not the service (memory budget: docs/service.md). Deeper queues on either
#: side did not make recording over tcp faster (docs/benchmarks.md, "tcp queues").
RECEIVE_HIGH_WATER_MARK = 16
#: How often the receiver thread looks for silent or idle sessions (seconds; the limits are seconds to minutes).
LIVENESS_CHECK_INTERVAL_S = 0.05
#: How often the analysis thread answers re-requests of final results while it is busy (seconds).
REQUEST_INTERVAL_S = 0.05
#: How long the analysis of a session's backlog may go on after its end (seconds) before the rest is cut: the
#: ``session_end`` is acknowledged (``end()`` returns) once the file is closed, so this bounds that wait.
END_ANALYSIS_BUDGET_S = 10.0


class _LimitedLog:
    """Log the first ten events of a kind, then only every power of two (a flood costs a few lines)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, key: str, level: int, text: str, *args: Any, exc: BaseException | None = None) -> None:
        self.counts[key] += 1
        n = self.counts[key]
        if n <= 10 or n & (n - 1) == 0:
            log.log(level, text + " (%d so far)", *args, n, exc_info=exc if n <= 3 else None)


@dataclass
class _Open:
    """The session being recorded and the connection that owns it."""

    run: SessionRun
    owner: bytes | None
    started: float
    last_data: float
    last_seq: int = 0


class PipelineService:
    """``stemlive serve``: receive sessions one after another, record each, analyse, publish results.

    Threads
    -------
    receiver thread
        owns the lossless input socket; validates, records every data message, commits, acknowledges.
    analysis thread
        owns the result PUB socket; runs the stages on a bounded queue, writes their results, closes files.

    The analysis queue holds at most ``analysis_buffer_bytes`` of payload. When analysis is slower than
    acquisition the backlog grows up to that bound; past it, the receiver stops reading, the sender's
    socket fills and its ``send`` blocks (flow control, never loss). Recording itself is never delayed by
    analysis until the bound is reached.

    Containment: every message is handled inside its own ``try``. A malformed one is rejected with its
    :data:`~stemlive.live.wire.protocol.REJECTION_CODES` code; any other exception while handling it becomes a nack
    (``internal_error``, ``record_failed`` or ``disk_full``) to the connection that sent it, is logged
    (rate-limited) and counted in :attr:`stats`; a session whose file cannot take more data is closed
    ``failed`` with the reason. The service and every other connection go on.

    Ownership: one session is recorded at a time, owned by the connection (ZeroMQ routing id) that opened it.
    Another connection's ``session_start`` is refused with ``busy`` (naming the open session and its age); a
    session that receives no data for ``idle_timeout_s`` is closed ``aborted`` even if heartbeats continue.
    The ``session_end`` is acknowledged only once the file is closed and fsync'ed. The analysis backlog left when
    a session ends is analysed for at most ``end_analysis_budget_s``; the messages left after that are recorded
    but not analysed, stored as a ``skipped`` problem of every stage (the analysis is then ``incomplete``), so
    the end of a recording never waits for an analysis that lags (the stages' final step still runs).
    """

    def __init__(
        self,
        out_dir: str | Path,
        params: Params | None = None,
        *,
        frame_endpoint: str | None = None,
        result_endpoint: str | None = None,
        allow_remote: bool = False,
        analysis_buffer_bytes: int = 256 * 2**20,
        stage_classes: Mapping[str, type[Stage]] | None = None,
        commit_interval_s: float = 0.2,
        idle_timeout_s: float = 300.0,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        ballast_bytes: int = DEFAULT_BALLAST_BYTES,
        curve: Any = None,
        receive_high_water_mark: int = RECEIVE_HIGH_WATER_MARK,
        receive_buffer_bytes: int | None = None,
        end_analysis_budget_s: float = END_ANALYSIS_BUDGET_S,
    ) -> None:
        from stemlive.live.wire import transport

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.params = params if params is not None else make_params()
        self.stage_classes = stage_classes
        self.frame_endpoint = frame_endpoint or transport.DEFAULT_FRAME_ENDPOINT
        self.result_endpoint = result_endpoint or transport.DEFAULT_RESULT_ENDPOINT
        self.allow_remote = allow_remote
        self.analysis_buffer_bytes = analysis_buffer_bytes
        self.commit_interval_s = commit_interval_s
        self.idle_timeout_s = idle_timeout_s
        self.disk = DiskBudget(self.out_dir, reserve_bytes, ballast_bytes=ballast_bytes)
        self.curve = curve
        self.receive_high_water_mark = receive_high_water_mark
        self.receive_buffer_bytes = receive_buffer_bytes
        self.end_analysis_budget_s = end_analysis_budget_s
        self.stats = ServiceStats()
        self._stop = threading.Event()
        self._stop_reason = "service stopped"
        self._queue: queue.Queue[tuple[SessionRun, Any]] = queue.Queue()
        self._queued_bytes = 0
        self._queue_cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._open: _Open | None = None
        self._checker = StreamChecker()
        self._replies: deque[tuple[bytes | None, str, int | None, str, str]] = deque()
        self._owners: dict[str, bytes | None] = {}  # open or finishing sessions -> owner, for analysis warnings
        self._warnings: deque[tuple[bytes | None, dict[str, Any]]] = deque()
        self._limited = _LimitedLog()
        self.session_closed = threading.Condition()

    # --- lifecycle ---
    def start(self) -> PipelineService:
        """Bind the sockets and start the receiver and analysis threads.

        Endpoints with port ``*`` (``tcp://127.0.0.1:*``) bind a free port; :attr:`frame_endpoint` and
        :attr:`result_endpoint` then hold the actual addresses.
        """
        from stemlive.live.wire import transport

        remote = [ep for ep in (self.frame_endpoint, self.result_endpoint) if not transport.is_loopback(ep)]
        if self.allow_remote and remote and self.curve is None:
            raise ValueError(f"refusing to bind {remote[0]} without CURVE keys: a service reachable from the network "
                             "requires authentication (curve=Curve.server(DIR), `stemlive keys DIR`)")
        # Sockets are created here and handed over to their threads (thread start is a memory barrier, which
        # is what ZeroMQ requires to move a socket between threads); each is used by one thread only after.
        self._receiver = transport.FrameReceiver(self.frame_endpoint, allow_remote=self.allow_remote,
                                                 high_water_mark=self.receive_high_water_mark,
                                                 kernel_buffer_bytes=self.receive_buffer_bytes, curve=self.curve)
        self.frame_endpoint = self._receiver.endpoint
        self._publisher = transport.ResultPublisher(self.result_endpoint, allow_remote=self.allow_remote,
                                                    curve=self.curve)
        self.result_endpoint = self._publisher.endpoint
        self._threads = [
            threading.Thread(target=self._guard(self._receive_loop), name="stemlive-receiver", daemon=True),
            threading.Thread(target=self._guard(self._analysis_loop), name="stemlive-analysis", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    @property
    def request_endpoint(self) -> str:
        """Where final results can be asked for again (see :class:`~stemlive.live.wire.transport.ResultPublisher`)."""
        return self._publisher.request_endpoint

    def stop(self, timeout_s: float = 30.0, reason: str = "service stopped") -> None:
        """Stop after the queued analysis work is done; open sessions are closed as aborted with ``reason``."""
        self._stop_reason = reason
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)

    def __enter__(self) -> PipelineService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> str:
        """Run until SIGTERM or SIGINT (Ctrl-C) or a thread fails; returns what stopped it.

        On a signal every open session is closed ``aborted`` ("service stopped (SIGTERM)"), its committed
        data flushed and the file fsync'ed before this returns.
        """
        stop = threading.Event()
        why: list[str] = []

        def on_signal(signum: int, _frame: Any) -> None:
            why.append(signal.Signals(signum).name)
            stop.set()

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[int(sig)] = signal.signal(sig, on_signal)
        self.start()
        try:
            while not stop.wait(0.2) and all(t.is_alive() for t in self._threads):
                pass
        except KeyboardInterrupt:  # no handler installed (not the main thread)
            why.append("SIGINT")
        finally:
            reason = f"service stopped ({why[0]})" if why else "service stopped"
            if why:
                log.info("%s: closing open sessions as aborted", why[0])
            self.stop(reason=reason)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self._error is not None:
            raise self._error
        return why[0] if why else "stopped"

    def wait_for_sessions(self, n: int, timeout_s: float = 60.0) -> list[Path]:
        """Block until ``n`` sessions have been closed (for tests and the demo); returns their files."""
        deadline = time.monotonic() + timeout_s
        with self.session_closed:
            while len(self.stats.sessions_done) < n:
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None:
                    raise TimeoutError(
                        f"{len(self.stats.sessions_done)} of {n} sessions closed after {timeout_s} s"
                        + (f" (service error: {self._error})" if self._error else "")
                    )
                self.session_closed.wait(min(left, 0.5))
            return list(self.stats.sessions_done[:n])

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                log.exception("pipeline service thread %s failed", threading.current_thread().name)
                self._error = e
                self._stop.set()

        return run

    # --- receiver thread ---
    def _receive_loop(self) -> None:
        receiver = self._receiver
        last_commit = last_check = time.monotonic()
        log.info("recording sessions from %s into %s", self.frame_endpoint, self.out_dir)
        try:
            while not self._stop.is_set():
                msg = receiver.recv(timeout_s=0.05)
                if self._warnings or self._replies:
                    self._send_replies()
                now = time.monotonic()
                if self._open is not None and now - last_commit > self.commit_interval_s:
                    last_commit = now
                    self._contained(None, self._commit_open)
                if self._open is not None and now - last_check >= LIVENESS_CHECK_INTERVAL_S:
                    last_check = now
                    self._contained(None, self._check_liveness, now)
                if msg is not None:
                    self.stats.messages += 1
                    self._contained(msg, self._handle, msg)
                    if not receiver.ready and self._open is not None:  # the end of a burst: write its frames
                        self._contained(None, self._open.run.write_held)
        finally:
            if self._open is not None:
                self._close_open("aborted", self._stop_reason)
            self._queue.put((None, _END))  # type: ignore[arg-type]
            receiver.close()
            self.disk.release()

    def _contained(self, msg: Message | None, fn: Callable[..., None], *args: Any) -> None:
        """Run one step; turn what it raises into a nack to the message's sender, a log line and a count."""
        try:
            fn(*args)
        except ProtocolError as e:
            assert msg is not None
            self.stats.rejected += 1
            self._receiver.reject(msg, e)  # logs the reason and tells the sender (the connection, not the id)
        except Exception as e:
            op = self._open
            in_session = op is not None and (msg is None or msg.session == op.run.session_id)
            code = "disk_full" if is_disk_full(e) else "record_failed" if in_session else "internal_error"
            if code == "disk_full":
                self.disk.release()  # room to flush and close the file cleanly
            self.stats.errors[code] += 1
            detail = f"{type(e).__name__}: {e}"[:400]
            self._limited(code, logging.ERROR, "[%s] while handling %s of session %s: %s", code,
                          "housekeeping" if msg is None else f"{msg.type} seq {msg.seq}",
                          None if msg is None else msg.session, detail, exc=None if code == "disk_full" else e)
            error = ProtocolError(code, detail, session=None if msg is None else msg.session,
                                  seq=None if msg is None else msg.seq)
            if in_session and op is not None:
                # the file may have taken part of the message: stop here, keep what was committed
                self._receiver.notify(op.owner or b"", nacks=[{"session": op.run.session_id, "seq": error.seq,
                                                               "code": code, "detail": detail}])
                self._close_open("failed", f"{code}: {detail}")
            elif msg is not None:
                self._receiver.reject(msg, error)

    def _handle(self, msg: Message) -> None:
        header = msg.header
        mtype = header["type"]
        op = self._open
        if mtype == "session_start" and op is not None and self._receiver.last_sender != op.owner:
            age = time.monotonic() - op.started
            raise ProtocolError(
                "busy", f"session {op.run.session_id!r} of another connection is being recorded (open for "
                f"{age:.1f} s); start again when it has ended", session=msg.session, seq=msg.seq,
                owner_session=op.run.session_id, owner_age_s=round(age, 1))
        self._checker.check(msg)
        if mtype == "heartbeat":
            return
        if mtype == "session_start":
            self._start_session(msg, self._receiver.last_sender)
            return
        if op is None or header["session"] != op.run.session_id:
            # a late message filling a gap of a session already closed: nothing left to record it in
            self._limited("late", logging.WARNING, "message seq %s of closed session %s not recorded", msg.seq,
                          msg.session)
            return
        seq = header["seq"]
        if seq > op.last_seq:
            op.last_seq = seq
        if mtype in DATA_TYPES:
            payload = msg.payload
            self.disk.spend(payload.nbytes + 256 if payload is not None else 256)
            op.run.record(msg)
            stats = self.stats
            op.last_data = stats.last_recorded_s = time.monotonic()
            if not stats.recorded:
                stats.first_recorded_s = stats.last_recorded_s
            stats.recorded += 1
            if op.run.stages:  # nothing to analyse: no hand-off to (and wake-up of) the analysis thread
                self._enqueue(op.run, msg)
        elif mtype == "session_end":
            op.run.commit()
            self._receiver.acknowledge(op.run.session_id, msg.seq - 1)
            note = str(header.get("message", ""))
            self._close_open(str(header.get("status", "complete")), note, end_seq=msg.seq)

    def _commit_open(self) -> None:
        op = self._open
        assert op is not None
        op.run.commit()
        self._receiver.acknowledge(op.run.session_id, op.last_seq)

    def _check_liveness(self, now: float) -> None:
        op = self._open
        assert op is not None
        sid = op.run.session_id
        if sid in self._receiver.silent_sessions():
            log.warning("session %s: its sender stopped responding; closing the session as aborted", sid)
            self._close_open("aborted", "sender stopped responding")
        elif now - op.last_data > self.idle_timeout_s:
            log.warning("session %s: no data for %.0f s; closing it as aborted", sid, now - op.last_data)
            self._close_open("aborted", f"no data for {now - op.last_data:.0f} s (heartbeats alone do not keep a "
                             "session open)")

    def _start_session(self, start: Message, owner: bytes | None) -> None:
        try:
            self.disk.arm()
            self.disk.check_start()
            path = unique_path(self.out_dir, session_file_name(start))
            run = SessionRun(
                start,
                path,
                self.params,
                stage_classes=self.stage_classes,
                publish=self._publish_from_analysis_thread,
                # frames of a burst (FrameReceiver.burst) are written together once the burst is handled; the
                # receive loop commits (and then acknowledges) every commit_interval_s, so the writer does not
                # commit on its own clock as well (that was a second commit per interval)
                writer_options={"commit_interval_s": math.inf, "hold_frames": self._receiver.burst},
            )
        except Exception as e:
            self._checker.abandon(start.session)
            code = "disk_full" if is_disk_full(e) else "record_failed"
            self.stats.errors[code] += 1
            raise ProtocolError(code, f"session not started: {e}"[:400], session=start.session, seq=0) from e
        now = time.monotonic()
        self._open = _Open(run, owner, now, now)
        self._owners[run.session_id] = owner
        self.stats.sessions += 1
        log.info("session %s (%s) started: recording to %s", run.session_id, run.kind, path)

    def _close_open(self, status: str, note: str, *, end_seq: int | None = None) -> None:
        """Hand the open session to the analysis thread, which finishes the stages and closes the file."""
        op, self._open = self._open, None
        assert op is not None
        sid = op.run.session_id
        self._checker.abandon(sid)  # no-op after its session_end; later messages get session_closed
        gaps = self._checker.gaps(sid)
        if gaps:
            missing = sum(b - a + 1 for a, b in gaps)
            summary = f"{len(gaps)} seq gap(s) on the wire, {missing} message(s) missing; first: {gaps[:10]}"
            note = (note + "; " if note else "") + summary
        op.run.analysis_deadline = time.monotonic() + self.end_analysis_budget_s  # before the end is queued
        self._queue.put((op.run, ("end", status, note, gaps, op.owner, end_seq)))

    def _send_replies(self) -> None:
        """Final acknowledgements (or nacks) of sessions the analysis thread has closed."""
        while self._warnings:  # analysis errors: told to the sender, but its data is recorded (no nack)
            owner, warning = self._warnings.popleft()
            self._receiver.notify(owner or b"", warnings=[warning])
        while self._replies:
            owner, sid, end_seq, status, reason = self._replies.popleft()
            if end_seq is None:
                continue
            if reason:
                self._receiver.notify(owner or b"", nacks=[{"session": sid, "seq": end_seq, "code": "record_failed",
                                                            "detail": reason[:400]}])
            else:
                self._receiver.acknowledge(sid, end_seq, final=True)

    def _enqueue(self, run: SessionRun, msg: Message) -> None:
        size = msg.payload.nbytes if msg.payload is not None else 0
        with self._queue_cv:
            # Back-pressure: wait while the analysis backlog exceeds its bound (the socket then fills up).
            while self._queued_bytes + size > self.analysis_buffer_bytes and self._queued_bytes > 0:
                self._queue_cv.wait(0.1)
                self._receiver.keepalive()  # senders block on flow control instead of declaring us dead
            self._queued_bytes += size
        self._queue.put((run, msg))

    # --- analysis thread ---
    def _analysis_loop(self) -> None:
        next_requests = 0.0
        try:
            while True:
                try:
                    run, item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    self._serve_requests()
                    continue
                if item is _END:
                    break
                if isinstance(item, tuple) and item[0] == "end":
                    self._finish(run, *item[1:])
                    continue
                msg: Message = item
                try:
                    if run.closed:
                        pass
                    elif time.monotonic() > run.analysis_deadline:  # the session ended long ago: cut the backlog
                        run.skipped += 1
                    else:
                        run.analyze(msg)
                except Exception as e:  # a result the file cannot take (disk full...): the message stays recorded
                    if is_disk_full(e):
                        self.disk.release()
                    self.stats.errors["analysis_error"] += 1
                    detail = f"{type(e).__name__}: {e}"[:400]
                    self._limited("analysis_error", logging.ERROR, "analysis of %s seq %s of session %s failed: %s",
                                  msg.type, msg.seq, msg.session, detail, exc=e)
                    if self.stats.errors["analysis_error"] <= 1000:  # a bounded number of warnings per service
                        self._warnings.append((self._owners.get(msg.session), {
                            "session": msg.session, "seq": msg.seq, "code": "analysis_error", "detail": detail}))
                finally:
                    size = msg.payload.nbytes if msg.payload is not None else 0
                    with self._queue_cv:
                        self._queued_bytes -= size
                        self._queue_cv.notify_all()
                if time.monotonic() >= next_requests:  # a non-blocking look, a few times a second, not per message
                    next_requests = time.monotonic() + REQUEST_INTERVAL_S
                    self._serve_requests()
        finally:
            self._publisher.close()

    def _finish(self, run: SessionRun, status: str, note: str, gaps: Sequence[tuple[int, int]],
                owner: bytes | None, end_seq: int | None) -> None:
        reason = ""
        try:
            if run.skipped:
                n, budget = run.skipped, self.end_analysis_budget_s
                log.warning("session %s: analysis cut %g s after its end, %d data messages not analysed",
                            run.session_id, budget, n)
                run.skip_analysis("backlog", f"analysis cut {budget:g} s after the session's end: {n} of "
                                  f"{run.recorded} recorded data messages not analysed (the analysis lagged the "
                                  "acquisition; `stemlive replay --analyze` redoes it from the file)")
            run.finish(status, message=note, gaps=gaps)
        except Exception as e:
            reason = f"closing the session file failed: {type(e).__name__}: {e}"
            log.error("session %s: %s", run.session_id, reason)
            run.writer.fail(f"{note}; {reason}" if note else reason)
            run.closed = True
        self._publisher.session_closed(run.session_id)
        self._owners.pop(run.session_id, None)
        self._replies.append((owner, run.session_id, end_seq, run.writer.status, reason))
        with self.session_closed:
            self.stats.sessions_done.append(run.path)
            self.session_closed.notify_all()

    def _serve_requests(self) -> None:
        try:
            self._publisher.serve_requests()
        except Exception as e:
            self._limited("request_error", logging.ERROR, "result request failed: %s", e, exc=e)

    def _publish_from_analysis_thread(self, session_id: str, result: Result) -> None:
        publish_result(self._publisher, session_id, result)


def result_header(session_id: str, result: Result) -> dict[str, Any]:
    """Header fields of a ``result`` message (the publisher adds proto, type, seq and t)."""
    header: dict[str, Any] = {"session": session_id, "stage": result.stage, "name": result.name}
    if result.index is not None:
        header["index"] = int(result.index)
    if result.attrs:
        header["attrs"] = _finite_or_none(json.loads(json.dumps(result.attrs, default=json_default)))
    return header


def publish_result(publisher: Any, session_id: str, result: Result) -> None:
    """Publish a result; tables (structured arrays) travel as JSON rows, other arrays as the payload."""
    header = result_header(session_id, result)
    value = np.asarray(result.value)
    if value.dtype.names:
        # JSON has no NaN: an undetermined table entry (e.g. a failed peak error) travels as null
        header["value"] = [
            {name: _finite_or_none(json_default(row[name])) for name in value.dtype.names}
            for row in value.reshape(-1)
        ]
        publisher.publish(header)
    else:
        publisher.publish(header, np.ascontiguousarray(value))


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (anywhere inside lists and dicts) replaced by None (JSON null)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


