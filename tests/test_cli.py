"""The ``stemlive`` command as a user runs it: real processes, real sockets, real files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from commands import STEMLIVE

from stemlive.live.apps.cli import main
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire import transport

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_every_subcommand() -> None:
    out = run("--help").stdout
    for command in ("serve", "replay", "info", "tomo", "demo", "swift", "view"):
        assert command in out, f"stemlive --help does not list {command}"


def send_tilt_session(endpoint: str, n: int = 4) -> str:
    with transport.FrameSender(endpoint, timeout_s=30) as sender:
        stream = transport.SessionStream(sender, "tilt_series", {"source": "test_cli"})
        stream.start()
        for i in range(n):
            stream.frame(np.full((32, 32), i, np.float32), tilt_index=0, alpha_deg=0.0, beta_deg=0.0,
                         frame_index=i, pixel_size_nm=0.05, dwell_us=2.0)
        stream.end("complete")
        return stream.session_id


def test_serve_records_then_info_and_replay_analyze(tmp_path: Path) -> None:
    frames, results = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([*STEMLIVE, "serve", "--frames", frames, "--results", results,
                               "--out", str(tmp_path / "sessions"), "--set", "tilt_series.preview_px=64"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert "stemlive serve" in banner and frames in banner
        session_id = send_tilt_session(frames)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = list((tmp_path / "sessions").glob("*.h5"))
            if files:
                with SessionReader(files[0], locking=False) as r:  # the service may still hold it open
                    if r.closed:
                        break
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    (path,) = files
    assert session_id in path.name
    info = run("info", str(path))
    assert info.returncode == 0
    for text in ("tilt_series", "complete", "4", session_id):
        assert text in info.stdout, f"{text!r} missing from stemlive info:\n{info.stdout}"
    analysed = tmp_path / "analysed.h5"
    out = run("replay", str(path), "--analyze", str(analysed), "--set", "tilt_series.search_radius_px=1.5")
    assert out.returncode == 0, out.stderr
    with SessionReader(analysed) as r:
        assert r.status == "complete" and r.results("tilt_series")["sums"].shape == (1, 32, 32)
    again = run("replay", str(path), "--analyze", str(analysed))
    assert again.returncode != 0 and "exists" in again.stderr
    bad = run("replay", str(path), "--analyze", str(tmp_path / "x.h5"), "--set", "eels.nope=1")
    assert bad.returncode != 0 and "unknown parameter eels.nope" in bad.stderr


def test_info_reports_a_killed_writer_as_not_closed(tmp_path: Path) -> None:
    path = tmp_path / "crashed.h5"
    proc = subprocess.Popen([sys.executable, str(HERE / "helpers_crash_writer.py"), str(path), "frames"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    while "frames 3" not in proc.stdout.readline():
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    info = run("info", str(path))
    assert info.returncode == 0, info.stderr
    assert "NOT CLOSED" in info.stdout and "recording" in info.stdout


def test_info_names_a_file_that_is_not_a_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    assert main(["info", str(other)]) != 0
    assert "not a stemlive session file" in capsys.readouterr().err


def test_replay_to_a_running_service(tmp_path: Path) -> None:
    from stemlive.live.pipeline.service import PipelineService

    with PipelineService(tmp_path / "a", {}, frame_endpoint="tcp://127.0.0.1:*", result_endpoint="tcp://127.0.0.1:*",
                         stage_classes={}) as first:
        send_tilt_session(first.frame_endpoint, n=3)
        (original,) = first.wait_for_sessions(1, timeout_s=30)
    with PipelineService(tmp_path / "b", {}, frame_endpoint="tcp://127.0.0.1:*", result_endpoint="tcp://127.0.0.1:*",
                         stage_classes={}) as second:
        out = run("replay", str(original), "--to", second.frame_endpoint, "--speed", "max")
        assert out.returncode == 0, out.stderr
        (copy,) = second.wait_for_sessions(1, timeout_s=30)
    with SessionReader(original) as a, SessionReader(copy) as b:
        np.testing.assert_array_equal(np.asarray(a.frames()), np.asarray(b.frames()))
        assert a.frame_table().keys() == b.frame_table().keys()
        for key, column in a.frame_table().items():
            np.testing.assert_array_equal(column, b.frame_table()[key])
    bad_speed = run("replay", str(original), "--to", second.frame_endpoint, "--speed", "-2")
    assert bad_speed.returncode != 0 and "speed" in bad_speed.stderr
