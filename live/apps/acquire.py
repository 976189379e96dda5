"""``stemlive acquire``: run a procedure headless on an instrument, record it, print the session file's path.

Loads the installed Swift plug-ins the way Swift does (``PlugInManager.load_plug_ins``), starts Swift's
instrumentation layer without a window (``HardwareSource.run``, ``camera_base.run``, ``scan_base.run``), picks the
named instrument, and runs the same procedure classes the panels run, streaming to a pipeline service in this
process that records into ``--out``. Exit codes: 0 complete session (analysis problems, if any, printed one line
each before the path); 2 refused plan or unknown instrument (one line, no session file); 5 acquisition or service
failure (the instrument failing Check's test included); 130 Ctrl-C (the session is ended as
aborted). Every ending puts the instrument back as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stemlive.live.exitcodes import CLIError, ExitCode

log = logging.getLogger(__name__)

PROCEDURES = ("tilt-series", "eels-line", "eels-map")


def add_subcommand(subparsers: Any) -> None:
    """Add ``acquire`` to the ``stemlive`` command."""
    p = subparsers.add_parser(
        "acquire", help="run a tilt series or an EELS line/map headless on an instrument and record it",
        description=__doc__.split("\n\n")[0])
    p.add_argument("procedure", choices=PROCEDURES)
    p.add_argument("--instrument", required=True,
                   help="stemlive (the project's simulator), usim (Nion's) or a registered instrument id")
    p.add_argument("--plan", type=Path, help="TOML file of plan settings (the plan's field names; [analysis] table)")
    p.add_argument("--set", dest="plan_settings", action="append", default=[], metavar="KEY=VALUE",
                   help="plan setting, e.g. --set frames_per_point=5 (repeatable; values parse as JSON)")
    p.add_argument("--out", type=Path, required=True, help="folder for the session file")
    p.add_argument("--scenario", default=None,
                   help="scenario of the stemlive simulator (default: STEMLIVE_SCENARIO, else realtime)")
    p.add_argument("--analysis-timeout", type=float, default=600.0,
                   help="seconds to wait for the final analysis after the acquisition (default 600)")
    p.set_defaults(func=cmd_acquire)


def plan_settings(plan_file: Path | None, pairs: list[str]) -> dict[str, Any]:
    """Plan settings from a TOML file and ``KEY=VALUE`` pairs (the pairs win)."""
    from nionswift_plugin.stemlive.scripting import parse_value

    settings: dict[str, Any] = {}
    if plan_file is not None:
        try:
            settings.update(tomllib.loads(plan_file.read_text()))
        except OSError as e:
            raise CLIError(f"cannot read the plan {plan_file}: {e.strerror or e}", ExitCode.BAD_INPUT) from None
        except tomllib.TOMLDecodeError as e:
            raise CLIError(f"the plan {plan_file} is not valid TOML: {e}", ExitCode.USAGE) from None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set expects KEY=VALUE, got {pair!r}", ExitCode.USAGE)
        settings[key.strip()] = parse_value(value.strip())
    return settings


@contextlib.contextmanager
def swift_instrumentation(instrument: str, scenario: str | None) -> Iterator[None]:
    """Swift's plug-ins loaded and its instrumentation layer running headless; the stemlive simulator registered
    only when ``instrument`` is ``stemlive`` (as the plug-in registers it when asked). Everything is stopped after.
    """
    import asyncio

    from nion.instrumentation import HardwareSource, camera_base, scan_base
    from nion.swift.model import PlugInManager

    if instrument == "stemlive":
        os.environ["STEMLIVE_INSTRUMENT"] = "simulated"
        if scenario:
            os.environ["STEMLIVE_SCENARIO"] = scenario
    else:
        os.environ["STEMLIVE_INSTRUMENT"] = "none"
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
        own_loop = None
    except RuntimeError:
        loop = own_loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    location = Path(tempfile.mkdtemp(prefix="stemlive_acquire_config_"))
    PlugInManager.load_plug_ins(None, None, None)  # type: ignore[arg-type]  # every installed nionswift_plugin
    HardwareSource.run()
    camera_base.run(location)
    scan_base.run(location)
    try:
        yield
    finally:
        for stop in (scan_base.stop, camera_base.stop, HardwareSource.stop,
                     lambda: HardwareSource.HardwareSourceManager().close(), _stop_simulator):
            try:
                stop()
            except Exception:
                log.exception("stopping Swift's instrumentation")
        if own_loop is not None:
            asyncio.set_event_loop(None)
            own_loop.close()
        import shutil

        shutil.rmtree(location, ignore_errors=True)


def _stop_simulator() -> None:
    import nionswift_plugin.stemlive as plugin

    plugin.unregister_simulated_instrument()  # nothing to do when it was not registered


class StageErrors(logging.Filter):
    """Turns the pipeline's "analysis stage failed" log records into one line each (no traceback on the console)
    and keeps them, so that ``acquire`` can print them with the stored problems."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("analysis stage %s failed") and record.exc_info:
            error = record.exc_info[1]
            stage = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            self.lines.append(f"{stage} failed: {type(error).__name__}: {' '.join(str(error).split())}")
            if not logging.getLogger().isEnabledFor(logging.INFO):  # -v keeps the traceback
                record.exc_info, record.exc_text = None, None
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_problems(path: Path) -> list[str]:
    """Every analysis problem stored in a session file (``/results/<stage>/problems``), one line each."""
    import h5py

    lines: list[str] = []
    with h5py.File(path, "r") as f:
        results = f.get("results")
        if results is None:
            return lines
        for stage in sorted(results):
            group = results[stage]
            ds = group.get("problems") if isinstance(group, h5py.Group) else None
            if not isinstance(ds, h5py.Dataset) or ds.dtype.names is None:
                continue
            names = ds.dtype.names
            for row in ds[()].reshape(-1):
                result, severity, reason = (_text(row[c]) if c in names else "?" for c in ("result", "severity",
                                                                                           "reason"))
                lines.append(f"{stage}/{result} {severity}: {' '.join(reason.split())}")
    return lines


def cmd_acquire(args: argparse.Namespace) -> int:
    from nionswift_plugin.stemlive import scripting
    from nionswift_plugin.stemlive.acquisition import PlanError, RunControl
    from stemlive.live.pipeline.registry import make_params
    from stemlive.live.pipeline.service import PipelineService
    from stemlive.live.wire.transport import FrameSender

    settings = plan_settings(args.plan, args.plan_settings)
    out = args.out
    settings.setdefault("session_dir", str(out))
    try:
        plan = scripting.make_plan(args.procedure, settings)
    except PlanError as e:
        raise CLIError(f"plan refused: {e}", ExitCode.USAGE) from None
    with swift_instrumentation(args.instrument, args.scenario):
        try:
            hardware = scripting.find_hardware(args.instrument, need_camera=args.procedure != "tilt-series")
        except LookupError as e:
            raise CLIError(str(e), ExitCode.USAGE) from None
        service = PipelineService(out, make_params(), frame_endpoint="tcp://127.0.0.1:*",
                                  result_endpoint="tcp://127.0.0.1:*").start()
        stage_errors = StageErrors()
        pipeline_log = logging.getLogger("stemlive.live.pipeline.service")
        pipeline_log.addFilter(stage_errors)
        try:
            return _acquire(args, plan, hardware, service, FrameSender, RunControl, scripting, PlanError,
                            stage_errors)
        finally:
            pipeline_log.removeFilter(stage_errors)
            service.stop()


def _acquire(args: argparse.Namespace, plan: Any, hardware: Any, service: Any, sender_class: Any,
             control_class: Any, scripting: Any, plan_error: type[Exception], stage_errors: StageErrors) -> int:
    check = scripting.check(plan, hardware)
    if check.instrument_error:
        raise CLIError(" ".join(check.instrument_error.split()), ExitCode.FAILED)
    if not check.ok:
        raise CLIError("plan refused: " + "; ".join(" ".join(p.split()) for p in check.problems), ExitCode.USAGE)
    print(f"stemlive acquire: {args.procedure} on {hardware.describe()}: {check.summary()}", flush=True)
    sender = sender_class(service.frame_endpoint)
    control = control_class()
    procedure = scripting.make_procedure(plan, hardware, sender, control=control)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["status"] = str(procedure.run())
        except plan_error as e:
            outcome["refused"] = " ".join(str(e).replace("acquisition plan refused:", "").split())
        except BaseException as e:
            outcome["error"] = f"{type(e).__name__}: {e}"
        finally:
            try:
                sender.close()
            except Exception:
                log.exception("could not close the frame sender")

    import threading

    thread = threading.Thread(target=target, name="stemlive-acquire", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    interrupted = False
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:  # finish the frame, put the instrument back, end the session as aborted
            interrupted = True
            control.abort()
    elapsed = time.perf_counter() - t0
    if "refused" in outcome:
        raise CLIError(f"plan refused: {outcome['refused']}", ExitCode.USAGE)
    if not procedure.stream.started:
        raise CLIError(f"acquisition failed before recording: {outcome.get('error', 'no reason given')}",
                       ExitCode.FAILED)
    try:
        (path,) = service.wait_for_sessions(1, timeout_s=args.analysis_timeout)
    except TimeoutError as e:
        raise CLIError(f"the session was not closed: {e}", ExitCode.FAILED) from None
    status = outcome.get("status", "failed")
    print(f"stemlive acquire: {status} in {elapsed:.1f} s (estimated {check.duration_s:.1f} s)", flush=True)
    problems = read_problems(path) + stage_errors.lines
    for line in problems:
        print(line, flush=True)
    print(path.resolve(), flush=True)
    if interrupted or status == "aborted":
        return ExitCode.INTERRUPTED
    if status != "complete":
        print(f"stemlive acquire: acquisition failed: {outcome.get('error', status)}", file=sys.stderr)
        return ExitCode.FAILED
    # the session is what acquire produces: complete -> 0; analysis problems are printed above, and kept in the file
    return ExitCode.OK
