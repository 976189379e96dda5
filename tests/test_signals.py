"""Signals: SIGTERM/SIGINT close the open session as aborted with every acknowledged frame; end() means closed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from commands import STEMLIVE

from stemlive.live.pipeline.service import PipelineService
from stemlive.live.wire import transport

FIELDS = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.1, "dwell_us": 2.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_closes_the_open_session_aborted_with_every_acknowledged_frame(
    tmp_path: Path, sig: signal.Signals
) -> None:
    frames = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [*STEMLIVE, "serve", "--frames", frames, "--results",
         f"tcp://127.0.0.1:{_free_port()}", "--out", str(tmp_path), "--reserve-mib", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    assert "frames on" in proc.stdout.readline()
    rng = np.random.default_rng(5)
    sent = []
    with transport.FrameSender(frames, timeout_s=10, heartbeat_interval_s=0.2) as sender:
        stream = transport.SessionStream(sender, "tilt_series", {})
        stream.start()
        for i in range(40):
            sent.append(rng.random((64, 64), dtype=np.float32))
            stream.frame(sent[-1], frame_index=i, **FIELDS)
            time.sleep(0.01)
        sender.wait_acknowledged(stream.session_id, 20, 10)
        acknowledged = sender.acknowledged(stream.session_id)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {sig.name}" in out.strip().splitlines()[-1]
    (path,) = tmp_path.glob(f"*_{stream.session_id}.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "aborted"
        assert f"service stopped ({sig.name})" in str(f.attrs["message"])
        stored = f["tilt_series/frames"][()]
    assert acknowledged >= 20 and len(stored) >= acknowledged  # seq 0 is the session_start: frames 0..ack-1
    assert stored.tobytes() == np.stack(sent[: len(stored)]).tobytes()


def test_end_returns_only_once_the_file_is_closed(tmp_path: Path) -> None:
    svc = PipelineService(tmp_path, {}, frame_endpoint="tcp://127.0.0.1:*", result_endpoint="tcp://127.0.0.1:*",
                          stage_classes={})
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=20) as sender:
        for k in range(5):
            stream = transport.SessionStream(sender, "tilt_series", {})
            stream.start()
            for i in range(5):
                stream.frame(np.full((32, 32), k + i, np.float32), frame_index=i, **FIELDS)
            stream.end()
            (path,) = tmp_path.glob(f"*_{stream.session_id}.h5")
            with h5py.File(path, "r") as f:  # no wait: end() returned, so the file is closed
                assert f.attrs["status"] == "complete" and f["tilt_series/frames"].shape == (5, 32, 32)
