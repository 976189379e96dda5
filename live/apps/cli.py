"""The ``stemlive`` command: ``serve``, ``replay``, ``info``, ``tomo``, ``demo``, ``swift``, ``view``.

Each subcommand imports what it needs when it runs, so ``stemlive info`` starts quickly and needs no Qt.
Failures end as one line ``stemlive COMMAND: MESSAGE`` on stderr and an exit code of :class:`ExitCode`
(docs/cli.md); ``-q/--quiet`` (before or after the command) leaves only results and errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from stemlive.live import __version__
from stemlive.live.apps.console import QUIET_HELP, is_quiet
from stemlive.live.exitcodes import CLIError, ExitCode

log = logging.getLogger("stemlive")

Handler = Callable[[argparse.Namespace], int]


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.PARAM=VALUE",
        help="analysis parameter, e.g. --set eels.k=3 (repeatable; values parse as JSON where they can)",
    )
    p.add_argument("--config", type=Path, help="TOML file with one [stage] table of parameters per stage")


def _add_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding to a non-loopback interface (off by default: only this computer can connect)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from stemlive.live.pipeline.registry import make_params
    from stemlive.live.pipeline.service import PipelineService

    curve = None
    if args.allow_remote and args.keys is None:
        raise CLIError("--allow-remote needs --keys DIR: a service reachable from the network requires CURVE "
                       "authentication (create keys with `stemlive keys DIR`)", ExitCode.USAGE)
    for flag, value in (("--idle-timeout", args.idle_timeout), ("--end-analysis-budget", args.end_analysis_budget)):
        if not value >= 0:  # NaN too
            raise CLIError(f"{flag} must be a number of seconds >= 0, got {value:g}", ExitCode.USAGE)
    if args.keys is not None:
        from stemlive.live.wire.keys import Curve

        curve = Curve.server(args.keys)
    params = make_params(args.config, args.overrides)
    service = PipelineService(
        args.out,
        params,
        frame_endpoint=args.frames,
        result_endpoint=args.results,
        allow_remote=args.allow_remote,
        reserve_bytes=int(args.reserve_mib * 2**20),
        idle_timeout_s=args.idle_timeout,
        end_analysis_budget_s=args.end_analysis_budget,
        curve=curve,
    )
    print(f"stemlive serve: frames on {service.frame_endpoint}, results on {service.result_endpoint}, "
          f"sessions into {service.out_dir.resolve()} (Ctrl-C to stop)", flush=True)
    why = service.serve_forever()
    print(f"stemlive serve: stopped by {why}; {service.stats.sessions} session(s) recorded, open ones closed as "
          "aborted", flush=True)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from stemlive.live.pipeline.replay import parse_speed, replay_analyze, replay_to, report_problems

    if (args.to is None) == (args.analyze is None):
        raise CLIError("give exactly one of --to ENDPOINT or --analyze OUT.h5|OUTDIR", ExitCode.USAGE)
    files = list(args.file)
    if args.analyze is not None:
        from stemlive.live.pipeline.registry import make_params

        params = make_params(args.config, args.overrides)
        if _batch_form(files, args.analyze, args.scheduler):
            return _replay_batch(files, args.analyze, params, args.scheduler, args.workers)
        out = replay_analyze(files[0], args.analyze, params)
        print(f"analysed {files[0]} -> {out}")
        report_problems(out)  # one line per missing result; exit code INCOMPLETE if any
    else:
        if args.overrides or args.config:
            raise CLIError("--to: analysis parameters belong to the receiving service", ExitCode.USAGE)
        if len(files) != 1 or args.scheduler:
            raise CLIError("--to sends one session file (no --scheduler)", ExitCode.USAGE)
        from stemlive.live.wire.transport import TransportError

        speed = parse_speed(args.speed)
        try:
            n = replay_to(files[0], args.to, speed=speed, timeout_s=args.timeout)
        except TransportError as e:
            raise CLIError(f"{args.to}: {e}", ExitCode.FAILED) from None
        print(f"replayed {n} messages of {files[0]} to {args.to}")
    return 0


def _batch_form(files: list[Path], out: Path, scheduler: str | None) -> bool:
    """Many files, an output folder or a scheduler: the Dask batch form (``live/pipeline/batch.py``)."""
    return len(files) > 1 or scheduler is not None or out.is_dir() or out.suffix.lower() not in {".h5", ".hdf5"}


def _replay_batch(files: list[Path], out_dir: Path, params: dict, scheduler: str | None, workers: int) -> int:
    from stemlive.live.pipeline.batch import analyze_files
    from stemlive.live.pipeline.problems import problems_in

    outs = analyze_files(files, out_dir, params, scheduler=scheduler, n_workers=workers)
    missing = 0
    for src, out in zip(files, outs, strict=True):
        print(f"analysed {src} -> {out}")
        for problem in problems_in(out):
            print(f"{out.name}: {problem.line()}")
            missing += 1
    print(f"analysed {len(outs)} sessions into {out_dir}")
    if missing:
        raise CLIError(f"{missing} analysis result(s) could not be produced (listed above; stored under "
                       "/results/<stage>/problems)", ExitCode.INCOMPLETE)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from stemlive.live.storage.session_info import describe
    from stemlive.live.storage.session_reader import SessionReader

    status = ExitCode.OK
    for path in args.files:
        try:
            print(describe(path))
            with SessionReader(path) as reader:
                reader.require_data()  # a session without data is reported as such, and the exit code says so
        except (OSError, ValueError) as e:
            print(f"stemlive info: {e}", file=sys.stderr)
            status = ExitCode.BAD_INPUT
        if len(args.files) > 1:
            print()
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemlive",
        description="Live STEM tilt series and vibrational EELS: acquisition, streaming, recording and analysis.",
    )
    parser.add_argument("--version", action="version", version=f"stemlive {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the pipeline service: record, analyse and publish sessions")
    p.add_argument("--frames", help="lossless input endpoint to bind (default tcp://127.0.0.1:7710)")
    p.add_argument("--results", help="result PUB endpoint to bind (default tcp://127.0.0.1:7711)")
    p.add_argument("--out", type=Path, default=Path("sessions"), help="folder for session files (default ./sessions)")
    p.add_argument("--reserve-mib", type=float, default=256.0,
                   help="free disk space to keep: sessions are refused or closed 'failed' below it (default 256)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close a session as aborted after this many seconds without data (default 300)")
    p.add_argument("--end-analysis-budget", type=float, default=10.0, metavar="S",
                   help="analyse a session's backlog for at most S seconds after its end, then store the rest as "
                   "'skipped' (end() waits for it; default 10)")
    p.add_argument("--keys", type=Path, metavar="DIR",
                   help="CURVE keys from `stemlive keys DIR`: only clients with an authorised key may connect "
                   "(required with --allow-remote)")
    _add_params(p)
    _add_remote(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("replay", help="replay a recorded session over the wire or through the pipeline")
    p.add_argument("file", type=Path, nargs="+", help="session file(s) (.h5); several need --analyze OUTDIR")
    p.add_argument("--to", metavar="ENDPOINT", help="send to a running service, e.g. tcp://127.0.0.1:7710")
    p.add_argument("--speed", default="max", help="1 = original timing, N = N times faster, max = no pauses")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a blocked send may wait (default 60)")
    p.add_argument("--analyze", type=Path, metavar="OUT.h5|OUTDIR",
                   help="run the analysis into OUT.h5 (one file, in-process) or into OUTDIR (one output per "
                        "file, on a Dask cluster; maps split by rows of points)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler of an existing cluster for --analyze OUTDIR (default: a local cluster)")
    p.add_argument("--workers", type=int, default=2, help="workers of the local Dask cluster (default 2)")
    _add_params(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("info", help="summarise session files: kind, status, counts, calibrations, time span")
    p.add_argument("files", type=Path, nargs="+")
    p.set_defaults(func=cmd_info)

    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"stemlive.live.{name}")
        module.add_subcommand(sub)
    _add_quiet(sub)
    return parser


def _add_quiet(subparsers: argparse._SubParsersAction) -> None:
    """Accept the global ``-q/--quiet`` after the command too (``stemlive replay -q F``), at every level."""
    for parser in subparsers.choices.values():
        try:
            parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        except argparse.ArgumentError:  # the command has its own -q
            pass
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_quiet(action)


# Modules that add their own subcommand with ``add_subcommand(subparsers)``; each is cheap to import (heavy
# imports such as Qt happen inside the handler).
# modules under stemlive.live with an add_subcommand(subparsers)
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "apps.tomo", "apps.launcher", "apps.demo", "apps.viewer", "storage.export", "storage.importer", "wire.keys",
    "apps.acquire",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``stemlive``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the service logs its sessions by default; interactive commands keep the console for their progress bars
    base = logging.INFO if args.command == "serve" and not is_quiet(args) else logging.WARNING
    level = max(logging.DEBUG, base - 10 * args.verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code, message = run_command(args)
    if message:
        print(f"stemlive {args.command}: {message}", file=sys.stderr)
    return code


def run_command(args: argparse.Namespace) -> tuple[int, str]:
    """Run the handler; map how it ends to ``(exit code, one-line message or "")`` (docs/cli.md)."""
    from stemlive.live.storage.session_format import SessionFormatError

    try:
        return int(args.func(args) or 0), ""
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED, "interrupted"
    except CLIError as e:
        return e.code, str(e)
    except (SessionFormatError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        return ExitCode.BAD_INPUT, _one_line(e)  # the input is missing, unreadable or not what the command needs
    except (FileExistsError, ValueError) as e:
        return ExitCode.USAGE, _one_line(e)  # refused: an output that exists, a bad option or parameter value
    except OSError as e:
        return ExitCode.FAILED, _one_line(e)  # the system failed under us: disk full, I/O error
    except Exception as e:  # a bug: one line, the traceback only with -v
        if getattr(args, "verbose", 0):
            traceback.print_exc()
        return ExitCode.INTERNAL, f"internal error: {type(e).__name__}: {_one_line(e)} (run with -v for details)"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
