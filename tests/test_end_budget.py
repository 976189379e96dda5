"""A session's end does not wait for an analysis that lags: the backlog is cut with a stated reason (issue 13).

Found by benchmarks/wire.py: 2,000 512x512 frames of one tilt sent at full speed into `stemlive serve` with the
default stages; the analysis was still busy more than 60 s after the last frame, the sender's ``end()`` timed out
and the sender process exited 1 although every frame had been recorded. Here a real service on loopback, real
sockets and files, with a stage made slow on purpose (50 ms per frame) instead of 512x512 frames.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from counting_stage import CountingStage

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
