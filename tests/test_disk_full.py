"""Disk full: the service on a small tmpfs (mounted by the test; needs root) keeps serving.

The sender of the session that fills the disk gets ``disk_full``; its file is closed ``failed`` with the reason
and holds every frame recorded before; earlier sessions stay readable; a session refused for lack of space
leaves no file behind; after space is freed the service records again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from stemlive.live.pipeline.service import PipelineService
from stemlive.live.wire import transport

ANY_PORT = "tcp://127.0.0.1:*"
FIELDS = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.1, "dwell_us": 2.0}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs); run the suite as root to test disk full")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(sender: transport.FrameSender, n: int, size: int, seed: int) -> tuple[transport.SessionStream, list[Any]]:
    stream = transport.SessionStream(sender, "tilt_series", {})
    stream.start()
    rng = np.random.default_rng(seed)
    sent = []
    for i in range(n):
        sent.append(rng.random((size, size), dtype=np.float32))
        try:
            stream.frame(sent[-1], frame_index=i, **FIELDS)
        except transport.TransportError:
            break
    return stream, sent


def no_empty_files(folder: Path) -> None:
    assert not [p for p in folder.glob("*.h5") if p.stat().st_size == 0]


@pytest.mark.parametrize("reserve_mib", [2.0, -64.0], ids=["reserve", "enospc"])
def test_disk_full_fails_the_session_not_the_service(small_disk: Path, reserve_mib: float) -> None:
    # reserve 2 MiB: the budget stops the session before the disk is full (the normal case). A negative
    # reserve disables that guard so that HDF5 really gets ENOSPC in the middle of a write; the service then
    # releases its 2 MiB ballast file to close the session file cleanly.
    svc = PipelineService(small_disk, {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT, stage_classes={},
                          reserve_bytes=int(reserve_mib * 2**20), ballast_bytes=2 * 2**20, commit_interval_s=0.05)
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=20) as sender:
        first, first_frames = fill(sender, 3, 64, 0)
        first.end()
        (first_path,) = svc.wait_for_sessions(1)

        victim, sent = fill(sender, 80, 256, 1)  # 80 x 256 KiB = 20 MiB into 12 MiB
        with pytest.raises(transport.TransportError, match="disk_full"):
            victim.end(timeout_s=20)
        assert any(n.code == "disk_full" and n.session == victim.session_id for n in sender.nacks)
        assert svc.stats.errors["disk_full"] >= 1  # contained and counted
        (_, full_path) = svc.wait_for_sessions(2)
        no_empty_files(small_disk)

        # full when a session starts (another program filled it): refused before a file is made
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        (small_disk / "ballast").write_bytes(b"\0" * max(0, free - 2**20))
        refused = transport.SessionStream(sender, "tilt_series", {})
        refused.start()
        with pytest.raises(transport.TransportError, match="disk_full"):
            sender.wait_acknowledged(refused.session_id, 0, 10)
        assert not list(small_disk.glob(f"*{refused.session_id}*"))
        no_empty_files(small_disk)

        # space freed: the same service records again
        recorded = _committed(full_path)
        saved = {p: p.read_bytes() for p in [full_path]}
        full_path.unlink()
        (small_disk / "ballast").unlink()
        last, last_frames = fill(sender, 3, 64, 2)
        last.end()
        paths = svc.wait_for_sessions(3)
        assert svc._error is None and all(t.is_alive() for t in svc._threads)

    with h5py.File(first_path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert f["tilt_series/frames"][()].tobytes() == np.stack(first_frames).tobytes()
    status, message, frames = recorded
    assert status == "failed" and "disk full" in message.lower() or "No space" in message, (status, message)
    assert 1 <= len(frames) < len(sent)
    assert frames.tobytes() == np.stack(sent[: len(frames)]).tobytes()  # every recorded frame, bit for bit
    assert saved
    with h5py.File(paths[2], "r") as f:
        assert f.attrs["status"] == "complete"
        assert f["tilt_series/frames"][()].tobytes() == np.stack(last_frames).tobytes()


def _committed(path: Path) -> tuple[str, str, np.ndarray]:
    """Status, message and the committed frames of a session file (read with plain h5py)."""
    with h5py.File(path, "r") as f:
        group = f["tilt_series"]
        n = int(group.attrs["committed_rows"])
        t = group["t"][:n]
        n = int(np.argmax(~np.isfinite(t))) if not np.all(np.isfinite(t)) else n
        return str(f.attrs["status"]), str(f.attrs.get("message", "")), group["frames"][:n]


def test_a_session_is_refused_when_the_reserve_is_not_free_and_no_file_is_made(tmp_path: Path) -> None:
    """Runs without root: a reserve larger than the free space makes the disk 'full' for the service."""
    import shutil

    from stemlive.live.storage.disk import DiskBudget, DiskFull

    free = shutil.disk_usage(tmp_path).free
    budget = DiskBudget(tmp_path, reserve_bytes=free + 2**30, ballast_bytes=0)
    with pytest.raises(DiskFull, match="disk full"):
        budget.check_start()

    svc = PipelineService(tmp_path / "s", {}, frame_endpoint=ANY_PORT, result_endpoint=ANY_PORT, stage_classes={},
                          reserve_bytes=free + 2**30, ballast_bytes=0)
    with svc, transport.FrameSender(svc.frame_endpoint, timeout_s=10) as sender:
        stream = transport.SessionStream(sender, "tilt_series", {})
        stream.start()
        with pytest.raises(transport.TransportError, match="disk_full"):
            sender.wait_acknowledged(stream.session_id, 0, 10)
        assert svc.stats.errors["disk_full"] == 1 and svc._error is None
    assert not list((tmp_path / "s").glob("*.h5"))
