"""A session's end does not wait for an analysis that lags: the backlog is cut with a stated reason (issue 13).

Found by benchmarks/wire.py: 2,000 512x512 frames of one tilt sent at full speed into `stemlive serve` with the
default stages; the analysis was still busy more than 60 s after the last frame, the sender's ``end()`` timed out
and the sender process exited 1 although every frame had been recorded. Here a real service on loopback, real
sockets and files, with a stage made slow on purpose (50 ms per frame) instead of 512x512 frames.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from commands import STEMLIVE
from counting_stage import CountingStage
from test_cli import free_port

from stemlive.live.pipeline.problems import read_finished, read_problems
from stemlive.live.pipeline.service import PipelineService
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire import transport

ANY_PORT = "tcp://127.0.0.1:*"


def _send(endpoint: str, n: int) -> float:
    """Send ``n`` 64x64 frames (frame i filled with i) and end; returns how long ``end()`` took (s)."""
    with transport.FrameSender(endpoint, timeout_s=10) as sender:
        stream = transport.SessionStream(sender, "tilt_series", {})
        stream.start()
        for i in range(n):
            stream.frame(np.full((64, 64), i, dtype=np.float32), tilt_index=0, alpha_deg=0.0, beta_deg=0.0,
                         frame_index=i, pixel_size_nm=0.03, dwell_us=1.0)
        t0 = time.monotonic()
        stream.end("complete", timeout_s=5)  # raised TransportError before: the analysis needed 10 s more
        return time.monotonic() - t0


def test_end_returns_once_the_file_is_closed_and_the_lagging_analysis_is_cut_with_a_reason(tmp_path: Path) -> None:
    n = 200  # x 50 ms = 10 s of analysis, sent in well under a second
    svc = PipelineService(tmp_path, {"counting": {"delay_s": 0.05}}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT,
                          stage_classes={"counting": CountingStage}, end_analysis_budget_s=1.0)
    with svc:
        end_s = _send(svc.frame_endpoint, n)
        (path,) = svc.wait_for_sessions(1, timeout_s=10)
        # a session whose analysis keeps up is analysed whole, and the cut of the first left nothing behind
        _send(svc.frame_endpoint, 4)
        path2 = svc.wait_for_sessions(2, timeout_s=10)[1]
    # budget 1 s + the stage's final step + the close; before the fix end() waited for the whole 10 s backlog
    assert end_s < 4.0, f"end() took {end_s:.1f} s"
    with SessionReader(path) as r:  # the recording is whole and bit-identical
        assert r.status == "complete"
        assert r.n_frames == n
        frames = r.frames()
        for i in range(n):
            assert np.array_equal(frames[i], np.full((64, 64), i, dtype=np.float32))
        analysed = int(r.results("counting")["total"])
    assert 1 <= analysed < n
    with h5py.File(path, "r") as f:
        (problem,) = read_problems(f)
        finished = read_finished(f)
    assert (problem.stage, problem.result, problem.severity) == ("counting", "backlog", "skipped")
    assert f"{n - analysed} of {n} recorded data messages not analysed" in problem.reason
    assert finished is not None and finished["status"] == "incomplete" and finished["problems"] == 1
    with h5py.File(path2, "r") as f:
        assert read_problems(f) == []
        finished = read_finished(f)
        assert finished is not None and finished["status"] == "complete"
        assert int(f["results/counting/total"][()]) == 4


def _lattice_frames(n: int, size: int) -> Iterator[np.ndarray]:
    """``n`` noisy frames of one lattice (frame i from seed i), so that the drift analysis has real work to do."""
    y, x = np.mgrid[:size, :size].astype(np.float32)
    lattice = (np.cos(2 * np.pi * x / 7.3) * np.cos(2 * np.pi * y / 6.1) + 1.0).astype(np.float32)
    for i in range(n):
        yield lattice + 0.3 * np.random.default_rng(i).standard_normal((size, size), dtype=np.float32)


def test_stemlive_serve_end_analysis_budget_cuts_the_backlog_of_a_lagging_analysis(tmp_path: Path) -> None:
    """``stemlive serve --end-analysis-budget 0.5`` as a user runs it, with the default stages: 256x256 frames sent
    at full speed are recorded several times faster than the tilt-series stage registers them (no test stage: the
    console script cannot load one), so the analysis lags and its backlog is cut 0.5 s after the session's end."""
    n, budget, size = 400, 0.5, 256  # 100 MiB: under the 256 MiB analysis backlog, so no flow control
    out = tmp_path / "sessions"
    frames_ep, results_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([*STEMLIVE, "serve", "--frames", frames_ep, "--results", results_ep, "--out", str(out),
                               "--end-analysis-budget", str(budget)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert frames_ep in server.stdout.readline()  # the banner: bound and serving
        t0 = time.monotonic()
        with transport.FrameSender(frames_ep, timeout_s=30) as sender:
            stream = transport.SessionStream(sender, "tilt_series", {})
            stream.start()
            for i, frame in enumerate(_lattice_frames(n, size)):
                stream.frame(frame, tilt_index=0, alpha_deg=0.0, beta_deg=0.0, frame_index=i, pixel_size_nm=0.03,
                             dwell_us=1.0)
            t_sent = time.monotonic()
            stream.end("complete", timeout_s=30)
            t_end = time.monotonic()
    finally:
        server.send_signal(signal.SIGINT)
        stdout, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == ("stemlive serve: stopped by SIGINT; 1 session(s) recorded, open ones "
                                               "closed as aborted")
    (path,) = out.glob("*.h5")
    with SessionReader(path) as r:  # every frame recorded, bit for bit
        assert r.status == "complete" and r.n_frames == n
        for i, frame in enumerate(_lattice_frames(n, size)):
            np.testing.assert_array_equal(r.frames()[i], frame)
        analysed = len(r.results("tilt_series")["drift_px"])
    with h5py.File(path, "r") as f:
        (problem,) = read_problems(f)
        finished = read_finished(f)
    assert (problem.stage, problem.result, problem.severity) == ("tilt_series", "backlog", "skipped")
    assert f"analysis cut {budget:g} s after the session's end: {n - analysed} of {n} recorded" in problem.reason
    assert 1 <= analysed < n
    assert finished is not None and finished["status"] == "incomplete" and finished["problems"] == 1
    info = subprocess.run([*STEMLIVE, "info", str(path)], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert f"tilt_series/backlog skipped: analysis cut {budget:g} s after the session's end" in info.stdout
    # the budget plus the final step (the tilt's correction over the frames analysed) and the close, loosely (load)
    assert t_end - t_sent < 5.0, f"end() took {t_end - t_sent:.1f} s after {n} frames sent in {t_sent - t0:.1f} s"
