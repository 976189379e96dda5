"""``stemlive view``: a live viewer of the pipeline service's result stream (ZMQ SUB, lossy); the CLI command.

Three layers, one module each:

:class:`~stemlive.live.apps.viewer_session.SessionView` (``viewer_session``)
    What the viewer knows of one session, built from its result messages in any order. Pure Python + numpy.
:class:`~stemlive.live.apps.viewer_model.ViewerModel` (``viewer_model``)
    Consumes ``result`` messages in any order, tolerates lost ones and late joining, and keeps one
    ``SessionView`` per session (the newest session is the current one). Testable without Qt.
:class:`~stemlive.live.apps.viewer_window.ViewerWindow` (``viewer_window``)
    A pyqtgraph window drawing the current session of a model; a Qt timer polls a
    :class:`~stemlive.live.wire.transport.ResultSubscriber` without blocking (about 20 Hz).

This module imports neither Qt nor pyzmq at import time: the CLI imports it to register the subcommand.
See ``docs/viewer.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stemlive.live.apps.viewer_model import ViewerModel
from stemlive.live.apps.viewer_window import is_blank, make_viewer_window

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7711"
"""Default result endpoint (the service's ``--results``)."""


def run_viewer(
    endpoint: str = DEFAULT_ENDPOINT,
    *,
    screenshot: str | Path | None = None,
    after_s: float = 5.0,
    idle_s: float | None = None,
    min_results: int = 0,
    topics: Iterable[str] | None = None,
    poll_hz: float = 20.0,
) -> int:
    """Open the viewer on ``endpoint`` and run the Qt event loop.

    Parameters
    ----------
    endpoint
        The service's result endpoint.
    screenshot
        If given, grab the window to this PNG and exit: after ``after_s`` seconds, or earlier once results
        have arrived and none came for ``idle_s`` seconds.
    min_results
        With ``screenshot``: exit with status 3 if fewer results than this arrived.
    topics
        ``"stage"`` / ``"stage/name"`` filters for the subscription (default: everything).

    Returns
    -------
    int
        Exit status: 0, or 1 if the screenshot could not be written / is blank, 3 if too few results arrived.
    """
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtCore

    from stemlive.live.wire.transport import ResultSubscriber

    app = pg.mkQApp("stemlive viewer")
    # pyqtgraph computes symbol bounds with nanmin during auto-range; NaN gaps in the traces are intended
    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
    subscriber = ResultSubscriber(endpoint, topics=list(topics) if topics else None)
    model = ViewerModel()
    window = make_viewer_window(model, subscriber, endpoint=endpoint, poll_hz=poll_hz)
    window.show()
    status = {"code": 0}

    if screenshot is not None:
        started = time.monotonic()

        def check() -> None:
            now = time.monotonic()
            last = model.last_result_monotonic
            idle_done = idle_s is not None and last is not None and now - last >= idle_s
            if now - started < after_s and not idle_done:
                return
            window.poll()
            app.processEvents()
            ok = window.grab_png(screenshot)
            if not ok:
                print(f"stemlive view: could not write {screenshot}", flush=True)
                status["code"] = 1
            elif is_blank(screenshot):
                print(f"stemlive view: {screenshot} is blank", flush=True)
                status["code"] = 1
            elif model.results < min_results:
                print(f"stemlive view: only {model.results} results arrived (wanted {min_results})", flush=True)
                status["code"] = 3
            print(f"stemlive view: wrote {screenshot}: {model.status_text(endpoint)}", flush=True)
            checker.stop()
            app.quit()

        checker = QtCore.QTimer()
        checker.setInterval(100)
        checker.timeout.connect(check)
        checker.start()
    try:
        app.exec()
    finally:
        window.dispose()
        subscriber.close()
    return status["code"]


def cmd_view(args: argparse.Namespace) -> int:
    """Handler of ``stemlive view``."""
    return run_viewer(
        args.endpoint,
        screenshot=args.screenshot,
        after_s=args.after,
        idle_s=args.idle,
        min_results=args.min_results,
        topics=args.topics or None,
    )


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stemlive view [ENDPOINT]`` on the CLI's subparsers."""
    p = subparsers.add_parser("view", help="live viewer of the result stream (pyqtgraph)")
    p.add_argument("endpoint", nargs="?", default=DEFAULT_ENDPOINT,
                   help=f"result endpoint of the service (default {DEFAULT_ENDPOINT})")
    p.add_argument("--topic", dest="topics", action="append", default=[], metavar="STAGE[/NAME]",
                   help="only these results, e.g. --topic eels (repeatable; default all)")
    p.add_argument("--screenshot", type=Path, metavar="PATH", help="grab the window to this PNG and exit")
    p.add_argument("--after", type=float, default=5.0, metavar="SECONDS",
                   help="with --screenshot: seconds to wait before grabbing (default 5)")
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                   help="with --screenshot: grab earlier, once results came and none for SECONDS")
    p.add_argument("--min-results", type=int, default=0, metavar="N",
                   help="with --screenshot: exit 3 if fewer than N results arrived")
    p.set_defaults(func=cmd_view)
    return p
