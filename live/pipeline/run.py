"""One session's recording and analysis (:class:`SessionRun`), live in the service and offline on replay.

The same :class:`SessionRun` drives ``stemlive serve`` (:mod:`stemlive.live.pipeline.service`) and
``stemlive replay --analyze`` (:func:`analyze_messages`), so live and offline results come from one code path.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.config import Params
from stemlive.live.pipeline import problems as problems_
from stemlive.live.pipeline.registry import registered_stages
from stemlive.live.pipeline.stage import Result, Stage, session_params
from stemlive.live.storage.session import SessionWriter
from stemlive.live.wire.protocol import Message, json_default

log = logging.getLogger(__name__)

DATA_TYPES = frozenset({"frame", "spectrum", "survey"})


_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def session_file_name(start: Message) -> str:
    """File name for a session: ``YYYYmmdd-HHMMSS_<kind>_<id>.h5`` with the (untrusted) id sanitised."""
    created = datetime.fromtimestamp(start.t, UTC).strftime("%Y%m%d-%H%M%S")
    safe_id = _SAFE_ID.sub("_", str(start.session)).strip("._")[:64] or "session"
    return f"{created}_{start.header.get('kind', 'session')}_{safe_id}.h5"


def unique_path(directory: Path, name: str) -> Path:
    """``directory / name``, with ``-1``, ``-2``... appended to the stem if it exists (never overwrite data)."""
    path = directory / name
    n = 0
    while path.exists():
        n += 1
        path = directory / f"{Path(name).stem}-{n}{Path(name).suffix}"
    return path


Publish = Callable[[str, Result], None]


class SessionRun:
    """One session: its file writer and its analysis stages.

    Recording (:meth:`record`) and analysis (:meth:`analyze`, :meth:`finish`) may run on different threads; a
    lock serialises access to the file. A failing stage is logged, reported as a ``stage_error`` result and
    switched off for the rest of the session: analysis errors never cost recorded data.

    ``problem`` results (a result that could not be produced, :mod:`stemlive.live.pipeline.problems`) are published and
    kept in ``/results/<stage>/problems``; :meth:`finish` ends with ``pipeline/analysis_finished``.
    """

    def __init__(
        self,
        start: Message,
        path: Path,
        params: Params,
        *,
        stage_classes: Mapping[str, type[Stage]] | None = None,
        publish: Publish | None = None,
        writer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.start_message = start
        self.session_id = str(start.session)
        self.kind = str(start.header.get("kind"))
        self.path = path
        self._publish = publish
        self._lock = threading.RLock()
        self.writer = SessionWriter(path, start, **dict(writer_options or {}))
        classes = stage_classes if stage_classes is not None else registered_stages()
        params = session_params(params, start)
        self.stages: list[Stage] = [
            cls(params.get(name, {})) for name, cls in classes.items() if self.kind in cls.kinds
        ]
        self.recorded = 0
        self.closed = False
        #: ``time.monotonic()`` after which queued data messages are not analysed (set when the session ends).
        self.analysis_deadline = float("inf")
        #: Data messages recorded but not analysed (cut after :attr:`analysis_deadline`).
        self.skipped = 0
        self.problems: dict[str, list[problems_.Problem]] = {}
        for stage in self.stages:  # the file says how it was analysed
            record = Result(stage.name, "parameters", np.zeros(0, np.int8),
                            attrs={"parameters": json.dumps(stage.params, default=json_default)})
            self.writer.write_result(record)
        for stage in list(self.stages):
            self._run_stage(stage, stage.start, start)

    # --- recording (receiver thread) ---
    def record(self, msg: Message) -> None:
        """Append a data message to the session file."""
        with self._lock:
            self.writer.append(msg)
            self.recorded += 1

    def write_held(self) -> None:
        """Write the frames the writer holds back (its ``hold_frames`` option)."""
        with self._lock:
            self.writer.write_held()

    def commit(self) -> None:
        """Make everything recorded so far durable (survives a crash of this process)."""
        with self._lock:
            self.writer.commit()

    # --- analysis (analysis thread) ---
    def analyze(self, msg: Message) -> None:
        """Run every stage on one data message and store/publish its results."""
        for stage in list(self.stages):
            self._run_stage(stage, stage.process, msg)

    def skip_analysis(self, result: str, reason: str) -> None:
        """Store and publish a ``skipped`` problem ``result`` with ``reason`` for every stage still running."""
        for stage in self.stages:
            self._emit(Result(stage.name, "problem", np.zeros(0),
                              attrs={"result": result, "severity": "skipped", "reason": reason}))

    def finish(self, status: str, *, message: str = "", gaps: Sequence[tuple[int, int]] = ()) -> None:
        """Finish the stages, write their final results and close the file with ``status``."""
        if self.closed:
            return
        for stage in list(self.stages):
            self._run_stage(stage, stage.finish, status)
        self._emit(self.analysis_finished())
        with self._lock:
            self.writer.close(status, message=message, gaps=list(gaps))
        self.closed = True
        log.info("session %s closed as %s: %s", self.session_id, status, self.path)

    def _run_stage(self, stage: Stage, hook: Callable[[Any], Iterable[Result]], arg: Any) -> None:
        try:
            results = list(hook(arg))
        except Exception as e:  # a stage bug must not stop recording
            log.exception("analysis stage %s failed in session %s; stage disabled", stage.name, self.session_id)
            self.stages.remove(stage)
            error = Result(stage.name, "stage_error", np.zeros(0), attrs={"error": f"{type(e).__name__}: {e}"})
            self._emit(error, store=False)
            self._emit(Result(stage.name, "problem", np.zeros(0), attrs={
                "result": "stage", "severity": "failed",
                "reason": f"the {stage.name} stage stopped: {type(e).__name__}: {e}"}))
            return
        for result in results:
            self._emit(result)

    def analysis_finished(self) -> Result:
        """``pipeline/analysis_finished``: ``complete`` when no result is missing, else ``incomplete``."""
        n = sum(len(v) for v in self.problems.values())
        return Result(problems_.FINISHED_STAGE, problems_.FINISHED_NAME, np.zeros(0),
                      attrs={"status": "incomplete" if n else "complete", "problems": n})

    def _emit(self, result: Result, *, store: bool = True) -> None:
        if result.name == "problem":  # kept as the stage's problem table (rewritten: a few rows)
            found = self.problems.setdefault(result.stage, [])
            last = problems_.Problem.from_attrs(result.stage, result.attrs)
            found.append(last)
            log.info("session %s: %s", self.session_id, last.line())
            self._store(Result(result.stage, "problems", problems_.table(found),
                               attrs={"columns": "result, severity, reason"}))
            result = Result(result.stage, "problem", np.zeros(0), store=False,
                            attrs={"result": last.result, "severity": last.severity, "reason": last.reason})
        elif store and result.store:
            self._store(result)
        if self._publish is not None:
            try:
                self._publish(self.session_id, result)
            except Exception:  # viewers are best-effort
                log.exception("could not publish result %s/%s", result.stage, result.name)

    def _store(self, result: Result) -> None:
        with self._lock:
            self.writer.write_result(result)


def analyze_messages(
    messages: Iterable[Message],
    out_path: str | Path,
    params: Params,
    *,
    publish: Publish | None = None,
    stage_classes: Mapping[str, type[Stage]] | None = None,
) -> Path:
    """Record and analyse one session's messages in-process (no sockets): ``stemlive replay --analyze``.

    Parameters
    ----------
    messages
        The session's wire sequence, starting with ``session_start``.
    out_path
        The session file to create (must not exist).
    params
        Analysis parameters, see :func:`make_params`.

    Returns
    -------
    Path
        ``out_path``.
    """
    out_path = Path(out_path)
    run: SessionRun | None = None
    status = "aborted"
    end_message = ""
    try:
        for msg in messages:
            if msg.type == "session_start":
                if run is not None:
                    raise ValueError("a second session_start in one replayed session")
                run = SessionRun(msg, out_path, params, stage_classes=stage_classes, publish=publish)
            elif run is None:
                raise ValueError(f"replayed session does not begin with session_start (got {msg.type})")
            elif msg.type in DATA_TYPES:
                run.record(msg)
                run.analyze(msg)
            elif msg.type == "session_end":
                status = str(msg.header.get("status", "complete"))
                end_message = str(msg.header.get("message", ""))
                break
        if run is None:
            raise ValueError("no session_start in the replayed session")
        # A recording that never got its session_end (writer crashed) is replayed as aborted.
        run.finish(status, message=end_message or ("" if status != "aborted" else "source session was not closed"))
    except BaseException:
        if run is not None and not run.closed:
            run.finish("failed", message="replay analysis failed")
        raise
    return out_path
