"""``stemlive swift``: start Nion Swift with the stemlive plug-in, the simulated instrument and a pipeline service.

Cheap to import: Qt, Swift and the pipeline are imported by the handler only.

The plug-in (``nionswift_plugin.stemlive``, discovered by Swift) reads its settings from the environment, which
this command sets before Swift starts:

``STEMLIVE_INSTRUMENT``
    ``simulated`` (register the simulated instrument) or ``none`` (a real instrument's plug-in provides the
    STEM controller, scan and EELS camera).
``STEMLIVE_SCENARIO``
    Simulator scenario name or path.
``STEMLIVE_FRAME_ENDPOINT`` / ``STEMLIVE_RESULT_ENDPOINT``
    Where the panels send frames and where Swift subscribes to results (``none``: no results).
``STEMLIVE_SESSION_DIR``
    Where an in-process service records (the panels check its free disk space).
``STEMLIVE_KEYS``
    With ``--keys DIR``: the folder whose client keys the panels and the result subscriber use to speak CURVE
    to the service (the in-process service takes its server keys from the same folder).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:7710"
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:7711"
SERVICE_MODES = ("start", "attach", "none")


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stemlive swift`` on the ``stemlive`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "swift",
        help="start Nion Swift with the stemlive panels (simulated instrument and service by default)",
        description="Start Nion Swift with the Tilt Series and Vibrational EELS panels. By default the simulated "
        "instrument is registered and a pipeline service runs in this process; results appear in Swift as data "
        "items.",
    )
    p.add_argument("--scenario", default="realtime",
                   help="simulator scenario, a built-in name or a JSON path (default realtime)")
    p.add_argument("--no-simulator", action="store_true",
                   help="do not register the simulated instrument (use the real instrument's plug-in)")
    p.add_argument("--service", choices=SERVICE_MODES, default="start",
                   help="start: run a pipeline service in this process (default); attach: use a running "
                   "`stemlive serve`; none: no service (acquisitions fail to connect)")
    p.add_argument("--frames", default=None,
                   help=f"frame endpoint: bound by the in-process service, used by the panels "
                   f"(default {DEFAULT_FRAME_ENDPOINT})")
    p.add_argument("--results", default=None,
                   help=f"result endpoint Swift subscribes to (default {DEFAULT_RESULT_ENDPOINT}; "
                   "'none': no results in Swift)")
    p.add_argument("--out", type=Path, default=Path("sessions"),
                   help="folder for session files of the in-process service (default ./sessions)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="analysis parameter for the in-process service (repeatable)")
    p.add_argument("--config", type=Path, help="TOML file of analysis parameters for the in-process service")
    p.add_argument("--allow-remote", action="store_true",
                   help="let the in-process service bind a non-loopback interface (needs --keys)")
    p.add_argument("--keys", type=Path, metavar="DIR",
                   help="CURVE keys from `stemlive keys DIR`: the in-process service admits only clients with an "
                   "authorised key, and Swift's panels and result subscriber use the client keys in DIR (with "
                   "--service attach: the keys of the remote service)")
    p.set_defaults(func=cmd_swift)
    return p


def plugin_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment variables that configure the plug-in for these options."""
    frames = args.frames or DEFAULT_FRAME_ENDPOINT
    results = args.results or DEFAULT_RESULT_ENDPOINT
    if args.service == "none" and args.results is None:
        results = "none"
    env = {
        "STEMLIVE_INSTRUMENT": "none" if args.no_simulator else "simulated",
        "STEMLIVE_SCENARIO": str(args.scenario),
        "STEMLIVE_FRAME_ENDPOINT": frames,
        "STEMLIVE_RESULT_ENDPOINT": results,
    }
    if args.service == "start":
        env["STEMLIVE_SESSION_DIR"] = str(Path(args.out).resolve())
    if getattr(args, "keys", None) is not None:
        env["STEMLIVE_KEYS"] = str(Path(args.keys).resolve())
    return env


def check_security(args: argparse.Namespace) -> Any:
    """The in-process service's CURVE keys (None without ``--keys``), checked before Swift starts.

    Raises
    ------
    CLIError
        ``--allow-remote`` without ``--keys`` (USAGE, as ``stemlive serve``).
    FileNotFoundError
        A keys folder without the server or client keys this command needs.
    """
    from stemlive.live.exitcodes import CLIError, ExitCode

    if args.allow_remote and args.service == "start" and args.keys is None:
        raise CLIError("--allow-remote needs --keys DIR: a service reachable from the network requires CURVE "
                       "authentication (create keys with `stemlive keys DIR`)", ExitCode.USAGE)
    if args.keys is None:
        return None
    from stemlive.live.wire.keys import Curve

    Curve.client(args.keys)  # the panels and the result subscriber need the client keys too: fail now, not in Swift
    return Curve.server(args.keys) if args.service == "start" else None


def apply_environment(env: dict[str, str], target: MutableMapping[str, str] | None = None) -> None:
    """Set the plug-in's variables (in ``os.environ`` by default); a stale ``STEMLIVE_SESSION_DIR`` is removed."""
    target = os.environ if target is None else target
    target.pop("STEMLIVE_SESSION_DIR", None)
    target.update(env)


def start_service(args: argparse.Namespace, env: dict[str, str], curve: Any = None) -> Any:
    """The in-process :class:`~stemlive.live.pipeline.service.PipelineService`, started (it runs beside Swift).

    ``curve``: server keys (:func:`check_security`); required by the service when it binds a non-loopback
    endpoint.
    """
    from stemlive.live.pipeline.registry import make_params
    from stemlive.live.pipeline.service import PipelineService

    params = make_params(args.config, args.overrides)
    result_endpoint = env["STEMLIVE_RESULT_ENDPOINT"]
    service = PipelineService(
        args.out, params, frame_endpoint=env["STEMLIVE_FRAME_ENDPOINT"],
        result_endpoint=None if result_endpoint == "none" else result_endpoint,
        allow_remote=args.allow_remote, curve=curve,
    )
    return service.start()


def run_swift() -> int:
    """Run Nion Swift (PySide6) until it quits: File > Quit, closing the last window, or SIGTERM / Ctrl-C.

    ``nionui_app.nionswift.main.main`` builds the application; ``app.run()`` creates the Qt application, starts
    Swift (the main window, or on a fresh profile the project dialog) and runs the event loop. When Qt quits,
    Swift stops: profile closed, plug-ins unloaded, hardware sources closed. SIGTERM and SIGINT are turned into
    Swift's own quit (every window closed as by the user), so a terminal's Ctrl-C or a service manager's stop ends
    Swift the same way.
    """
    from nionui_app.nionswift import main as swift_main

    app = swift_main.main(["nionui_app.nionswift"], {"qt": None})
    original_start = app.start

    def start(*args: Any, **kwargs: Any) -> bool:
        # the Qt application exists only from here on (app.run() made it): install the quit-on-signal path
        ok = bool(original_start(*args, **kwargs))
        _quit_on_signals(app)
        return ok

    app.start = start
    app.run()
    return 0


def _quit_on_signals(app: Any) -> None:
    """Make SIGTERM and SIGINT quit Swift as its Quit menu item does (on the Qt thread, between events)."""
    import signal

    from PySide6 import QtCore

    def quit_swift() -> None:
        log.info("stemlive swift: quit requested by a signal")
        try:
            app.exit()  # closes every window as the user would; the last one closing quits Qt
        finally:
            app.ui.request_quit()  # also when no window is open (e.g. a dialog was the only one)

    def handler(signum: int, frame: Any) -> None:
        QtCore.QTimer.singleShot(0, quit_swift)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # Python runs signal handlers only between bytecodes: a light timer lets it do so while Qt waits for events
    timer = QtCore.QTimer(QtCore.QCoreApplication.instance())
    timer.timeout.connect(lambda: None)
    timer.start(200)


def cmd_swift(args: argparse.Namespace) -> int:
    """Handler of ``stemlive swift``."""
    curve = check_security(args)
    env = plugin_environment(args)
    apply_environment(env)
    service = None
    if args.service == "start":
        service = start_service(args, env, curve)
        print(f"stemlive swift: service on {service.frame_endpoint} (frames) and {service.result_endpoint} "
              f"(results), sessions into {service.out_dir.resolve()}", flush=True)
    elif args.service == "attach":
        print(f"stemlive swift: sending to the service at {env['STEMLIVE_FRAME_ENDPOINT']}, results from "
              f"{env['STEMLIVE_RESULT_ENDPOINT']}", flush=True)
    instrument = "real instrument" if args.no_simulator else f"simulated instrument, scenario {args.scenario}"
    print(f"stemlive swift: starting Nion Swift ({instrument})", flush=True)
    try:
        code = run_swift()
    finally:
        if service is not None:
            service.stop()
    print(f"stemlive swift: Nion Swift has quit{'; service stopped' if service is not None else ''}", flush=True)
    return code
