"""Replay a recorded session: over the wire as live acquisition would, or in-process through the pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from stemlive.live.config import Params
from stemlive.live.exitcodes import CLIError, ExitCode
from stemlive.live.pipeline.problems import problems_in
from stemlive.live.pipeline.run import analyze_messages
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)


def parse_speed(text: str | float) -> float:
    """``"max"`` -> ``inf``; otherwise a positive factor (``1`` = the original timing)."""
    if isinstance(text, str) and text.strip().lower() in {"max", "inf", "fastest"}:
        return float("inf")
    speed = float(text)
    if not speed > 0:
        raise ValueError(f"--speed must be a positive factor or 'max', not {text!r}")
    return speed


def paced(
    messages: Iterator[Message], speed: float, *, sleep: Callable[[float], None] = time.sleep
) -> Iterator[Message]:
    """Yield messages with the gaps between their acquisition times ``t`` divided by ``speed``."""
    t0_wire: float | None = None
    t0_wall = 0.0
    for msg in messages:
        if speed != float("inf") and msg.t is not None:
            if t0_wire is None:
                t0_wire, t0_wall = float(msg.t), time.monotonic()
            due = t0_wall + (float(msg.t) - t0_wire) / speed
            delay = due - time.monotonic()
            if delay > 0:
                sleep(delay)
        yield msg


def replay_to(
    path: str | Path,
    endpoint: str,
    *,
    speed: float = float("inf"),
    timeout_s: float = 60.0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Send a recorded session to a pipeline service over the lossless path.

    The message sequence and every header field (``session``, ``seq``, ``t``...) are those of the recording,
    so the receiving service writes an identical session; only the pacing is scaled by ``speed``. A file of
    another writer replays in row order with its ``session_start`` rebuilt (see :class:`SessionReader`).

    Returns
    -------
    int
        Number of messages sent.

    Raises
    ------
    SessionFormatError
        If the file is not a v1 session file, or has no complete frame or spectrum (before anything is sent).
    """
    from stemlive.live.wire.transport import FrameSender

    n = 0
    with SessionReader(path) as reader:
        reader.require_data()
        total = reader.n_messages
        closed = reader.closed
        with FrameSender(endpoint, timeout_s=timeout_s) as sender:
            last: Message | None = None
            for msg in paced(reader.messages(), speed):
                sender.send(msg.header, msg.payload)
                last = msg
                n += 1
                if progress is not None:
                    progress(n, total)
            if not closed and last is not None:
                # The source was never closed (crashed writer): close the replayed session explicitly.
                end = {
                    "proto": last.header.get("proto", "stemlive/1"),
                    "type": "session_end",
                    "session": last.session,
                    "seq": int(last.seq) + 1,
                    "t": float(last.t),
                    "status": "aborted",
                    "messages": int(last.seq) + 2,
                    "message": "replay of a session that was not closed",
                }
                sender.send(end)
                n += 1
            sender.wait_recorded(timeout_s)
    return n


def replay_analyze(path: str | Path, out_path: str | Path, params: Params) -> Path:
    """Run the registered analysis stages over a recorded session in-process (no sockets).

    Writes ``out_path``: a session file with the same raw data plus ``/results``.

    Raises
    ------
    SessionFormatError
        If the file is not a v1 session file, or has no complete frame or spectrum (nothing is written).
    FileExistsError
        If ``out_path`` exists.
    """
    out_path = Path(out_path)
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; refusing to overwrite a session file")
    with SessionReader(path) as reader:
        reader.require_data()
        return analyze_messages(reader.messages(), out_path, params)


def report_problems(out_path: str | Path, print_line: Callable[[str], None] = print) -> None:
    """Print each analysis problem stored in ``out_path`` (one line each); if any, raise ``INCOMPLETE``.

    Raises
    ------
    CLIError
        With :attr:`ExitCode.INCOMPLETE` when at least one result could not be produced.
    """
    found = problems_in(out_path)
    for problem in found:
        print_line(problem.line())
    if found:
        raise CLIError(
            f"{len(found)} analysis result(s) could not be produced (listed above; stored in {out_path} "
            "under /results/<stage>/problems)",
            ExitCode.INCOMPLETE,
        )
