"""CLI conventions (docs/cli.md): one exit-code table, one line per failure, --quiet, progress only on a terminal,
options outside what a command can do refused with USAGE."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
from pathlib import Path

import pytest
import v1_writer
from commands import STEMLIVE

from stemlive.live.apps.cli import build_parser, main, run_command
from stemlive.live.apps.console import show_progress
from stemlive.live.apps.demo import ConsoleBar
from stemlive.live.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True, timeout=300)


def test_docs_have_the_one_exit_code_table_and_every_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", text, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == {int(c): c.name for c in ExitCode}
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in sub.choices:
        assert f"`stemlive {command} " in text, f"docs/cli.md does not document stemlive {command}"


def test_demo_refuses_options_it_cannot_run() -> None:
    proc = run("demo", "--tilts", "99", "--out", "/nonexistent/never-created")
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.strip() == "stemlive demo: --tilts 99: must be in 1..12 (the reference tilt series has 12 tilts)"
    assert not Path("/nonexistent/never-created").exists()
    for option, value in (("--size", "8"), ("--points", "1"), ("--frames", "0"), ("--eels-frames", "-2")):
        assert main(["demo", option, value]) == ExitCode.USAGE
    for extra in (["--iterations", "0"], ["--step", "4"]):
        # refused before the (missing) input is looked at
        assert main(["tomo", "reconstruct", "x.emd", *extra]) == ExitCode.USAGE, extra


def test_quiet_before_or_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.h5"
    v1_writer.write_tilt_series(path, n_tilts=2, n_frames=1, size=16)
    for argv in (["-q", "info", str(path)], ["info", "-q", str(path)], ["tomo", "export", "-q", "--help"]):
        try:
            assert main(argv) == ExitCode.OK
        except SystemExit as e:  # --help
            assert e.code == 0
    assert build_parser().parse_args(["replay", "-q", str(path), "--to", "tcp://x:1"]).quiet is True
    assert build_parser().parse_args(["replay", str(path), "--to", "tcp://x:1"]).quiet is False


def test_progress_bars_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        bar = ConsoleBar("tilt series", stream)
        for i in range(5):
            bar.update(i / 5, f"tilt {i}/5")
        bar.done("complete")
    assert "\r" not in log.getvalue() and log.getvalue() == "tilt series: complete\n"
    assert tty.getvalue().count("\r") == 6 and tty.getvalue().endswith("\n")
    quiet, loud = argparse.Namespace(quiet=True), argparse.Namespace(quiet=False)
    assert not show_progress(loud, log) and show_progress(loud, tty) and not show_progress(quiet, tty)


def test_a_missing_file_is_bad_input_from_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.h5")
    commands = [["info", missing], ["replay", missing, "--analyze", str(tmp_path / "o.h5")],
                ["replay", missing, "--to", "tcp://127.0.0.1:9"], ["tomo", "export", missing],
                ["tomo", "reconstruct", missing], ["export", missing, "--format", "hspy", "-o", str(tmp_path / "o")],
                ["import", missing, "-o", str(tmp_path / "o.h5")]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == ExitCode.BAD_INPUT, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"stemlive {argv[0]}: ") and "no such file" in err[0], err
    proc = run("tomo", "reconstruct", missing)  # as a user types it (was exit 2 before)
    assert proc.returncode == ExitCode.BAD_INPUT and proc.stderr.strip().endswith(f"{missing}: no such file")


def test_usage_failed_and_internal_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.h5"
    v1_writer.write_eels(path, n_points=2, n_frames=1, n_channels=64, offset_meV=-20.0)
    assert main(["replay", str(path)]) == ExitCode.USAGE
    assert "give exactly one of --to ENDPOINT or --analyze OUT.h5" in capsys.readouterr().err
    assert main(["replay", str(path), "--to", "tcp://127.0.0.1:9", "--speed", "fast"]) == ExitCode.USAGE
    capsys.readouterr()
    # nobody listens: the sender times out -> the service failed, one line
    assert main(["replay", str(path), "--to", "tcp://127.0.0.1:9", "--timeout", "1"]) == ExitCode.FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stemlive replay: tcp://127.0.0.1:9: "), err

    def broken(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("division by zero")

    code, message = run_command(argparse.Namespace(func=broken, verbose=0))
    assert code == ExitCode.INTERNAL and message == (
        "internal error: ZeroDivisionError: division by zero (run with -v for details)")
