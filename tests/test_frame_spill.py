"""The open tilt's frames spill to disk above a budget (issue 13, memory): same results, no files left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_stages import tilt_series_messages

from stemlive.live.analysis import drift
from stemlive.live.pipeline.frame_spill import SpillingFrameStore
from stemlive.live.pipeline.problems import read_finished, read_problems
from stemlive.live.pipeline.registry import make_params, registered_stages
from stemlive.live.pipeline.replay import replay_analyze
from stemlive.live.pipeline.service import PipelineService
from stemlive.live.pipeline.tilt_stage import TiltSeriesStage
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire import transport


def open_files_in(folder: Path) -> list[str]:
    """Targets of this process' descriptors inside ``folder`` (an unlinked file reads ``... (deleted)``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def test_store_gives_back_the_same_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(7, 24, 40)).astype(np.float32)
    store = SpillingFrameStore(2 * frames[0].nbytes, str(tmp_path))
    for f in frames:
        store.append(f.copy())
    assert len(store) == 7 and store.n_spilled == 5
    assert os.listdir(tmp_path) == []  # unlinked at creation: nothing to leave behind
    assert len(open_files_in(tmp_path)) == 1
    for i in (6, 0, 3, 1, -1):
        np.testing.assert_array_equal(store[i], frames[i])
    with pytest.raises(IndexError):
        store[7]
    with pytest.raises(ValueError, match="differs"):
        store.append(frames[0][:, :10].copy())
    store.close()
    store.close()
    assert open_files_in(tmp_path) == [] and len(store) == 0


def test_accumulator_result_is_identical_when_spilled(tmp_path: Path) -> None:
    truth: list[np.ndarray] = []
    frames = [m.payload for m in tilt_series_messages(1, 8, 96, truth) if m.type == "frame"]
    results = []
    for store in (None, SpillingFrameStore(0, str(tmp_path)), SpillingFrameStore(3 * 96 * 96 * 4, str(tmp_path))):
        acc = drift.TiltAccumulator(frames[0], dwell_us=4.0, frames=store, search_radius=2.0)
        for f in frames[1:]:
            acc.add(f)
        results.append(acc.result())
        if store is not None:
            assert store.n_spilled == (8 if store.budget_bytes == 0 else 5)
            store.close()
    for spilled in results[1:]:
        np.testing.assert_array_equal(spilled.sum, results[0].sum)  # bit for bit
        np.testing.assert_array_equal(spilled.shifts, results[0].shifts)
        np.testing.assert_array_equal(spilled.coverage, results[0].coverage)
    assert open_files_in(tmp_path) == [] and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="empty"):
        drift.TiltAccumulator(frames[0], frames=[frames[0]])


def test_stage_spills_above_its_budget_with_identical_results(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    truth: list[np.ndarray] = []
    messages = [m for m in tilt_series_messages(2, 8, 128, truth) if m.type == "frame"]
    outputs = {}
    for budget in (128, 0.25):  # default vs 4 frames of 128x128 float32 (64 KiB each)
        params = make_params(overrides=[f"tilt_series.frame_budget_mib={budget}", f"tilt_series.spill_dir={spill}"])
        stage = TiltSeriesStage(params["tilt_series"])
        results = []
        for i, msg in enumerate(messages):
            results += list(stage.process(msg))
            if i == 7:  # last frame of the first tilt, not closed yet
                assert stage._store is not None
                assert stage._store.n_spilled == (4 if budget == 0.25 else 0)
                assert len(open_files_in(spill)) == (1 if budget == 0.25 else 0)
        results += list(stage.finish("complete"))
        assert open_files_in(spill) == [] and os.listdir(spill) == []
        outputs[budget] = {(r.name, r.index): r.value for r in results if r.name in ("sums", "drift_px")}
    assert outputs[128].keys() == outputs[0.25].keys()
    assert ("sums", None) in outputs[128]
    for key, data in outputs[128].items():
        np.testing.assert_array_equal(outputs[0.25][key], data, err_msg=str(key))


def failing_spill_dir(tmp_path: Path, how: str) -> Path:
    """A spill directory where no file can be created, for real (no mock): ``missing`` or ``unwritable``.

    ``unwritable`` is a folder without write permission, except as root (CI), who may write anyway: then a path
    under a regular file (ENOTDIR), which fails for root too.
    """
    if how == "missing":
        return tmp_path / "no such folder"
    if os.geteuid() == 0:
        (tmp_path / "a file").write_bytes(b"")
        return tmp_path / "a file" / "spill"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("how", ["missing", "unwritable"])
def test_store_keeps_the_frames_in_memory_when_no_spill_file_can_be_made(tmp_path: Path, how: str) -> None:
    spill = failing_spill_dir(tmp_path, how)
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(5, 16, 24)).astype(np.float32)
    store = SpillingFrameStore(frames[0].nbytes, str(spill))
    try:
        for f in frames:
            store.append(f.copy())
    finally:
        if how == "unwritable" and spill.is_dir():
            spill.chmod(0o700)  # let tmp_path be cleaned
    assert isinstance(store.spill_error, FileNotFoundError if how == "missing" else
                      (NotADirectoryError if os.geteuid() == 0 else PermissionError))
    assert len(store) == 5 and store.n_spilled == 0
    for i in range(5):
        np.testing.assert_array_equal(store[i], frames[i])
    store.close()


def test_store_reads_back_what_it_spilled_when_a_write_fails(tmp_path: Path) -> None:
    """A write that fails after some frames were spilled (a file size limit: EFBIG, like ENOSPC on a full disk):
    the spilled frames come back into memory, the file is freed, the rest stays in memory, nothing is lost."""
    import errno
    import resource
    import signal

    rng = np.random.default_rng(2)
    frames = rng.normal(size=(6, 32, 32)).astype(np.float32)  # 4 KiB each
    store = SpillingFrameStore(frames[0].nbytes, str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(2.5 * frames[0].nbytes), hard))
    try:  # nothing else of this process writes a file meanwhile
        for f in frames[:3]:
            store.append(f.copy())
        spilled_before = store.n_spilled
        for f in frames[3:]:
            store.append(f.copy())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert spilled_before == 2  # frame 0 in memory, 1 and 2 on disk; frame 3 hit the limit half-way
    assert store.spill_error is not None and store.spill_error.errno == errno.EFBIG
    assert len(store) == 6 and store.n_spilled == 0
    assert open_files_in(tmp_path) == [] and os.listdir(tmp_path) == []  # the spill file is freed
    for i in range(6):
        np.testing.assert_array_equal(store[i], frames[i])
    store.close()


def test_a_failing_spill_dir_costs_no_frame_and_no_tilt_result(tmp_path: Path) -> None:
    """The service on loopback, a spill directory where nothing can be created and a budget of 2 frames: every
    frame recorded, one problem naming the folder and the OS error (stored and published), the same tilt sums
    as in memory."""
    spill = failing_spill_dir(tmp_path, "unwritable")
    params = make_params(overrides=["tilt_series.frame_budget_mib=0.125", f"tilt_series.spill_dir={spill}"])
    messages = [m for m in tilt_series_messages(2, 6, 128, []) if m.type == "frame"]  # 64 KiB frames
    svc = PipelineService(tmp_path / "sessions", params, frame_endpoint="tcp://127.0.0.1:*",
                          result_endpoint="tcp://127.0.0.1:*",
                          stage_classes={"tilt_series": registered_stages()["tilt_series"]})
    try:
        with svc:
            subscriber = transport.ResultSubscriber(svc.result_endpoint, topics=["tilt_series/problem"])
            time.sleep(0.3)  # the subscription reaches the publisher first (PUB drops for unknown subscribers)
            with transport.FrameSender(svc.frame_endpoint, timeout_s=30) as sender:
                stream = transport.SessionStream(sender, "tilt_series", {})
                stream.start()
                for m in messages:
                    fields = {k: m.header[k] for k in ("tilt_index", "alpha_deg", "beta_deg", "frame_index",
                                                       "pixel_size_nm", "dwell_us")}
                    stream.frame(m.payload, t=m.t, **fields)
                stream.end("complete", timeout_s=30)
            (path,) = svc.wait_for_sessions(1, timeout_s=30)
            published = subscriber.recv(timeout_s=5)
            subscriber.close()
    finally:
        if spill.is_dir():
            spill.chmod(0o700)
    with SessionReader(path) as r:
        assert r.status == "complete" and r.n_frames == len(messages)
        for i, m in enumerate(messages):
            np.testing.assert_array_equal(r.frames()[i], m.payload)
        live = r.results("tilt_series")
    with h5py.File(path, "r") as f:
        (problem,) = read_problems(f)
        finished = read_finished(f)
    assert (problem.stage, problem.result, problem.severity) == ("tilt_series", "frame_spill", "failed")
    error = "Not a directory" if os.geteuid() == 0 else "Permission denied"
    assert f"could not spill the open tilt's frames to {spill} (" in problem.reason and error in problem.reason
    assert "frame_budget_mib=0.125 no longer bounds the memory" in problem.reason
    assert finished is not None and finished["status"] == "incomplete" and finished["problems"] == 1
    assert published is not None and published.header["attrs"]["reason"] == problem.reason
    # the tilt results are those of the in-memory path, bit for bit (replayed from the recorded file)
    reference = replay_analyze(path, tmp_path / "in-memory.h5", make_params())
    with SessionReader(reference) as r:
        expected = r.results("tilt_series")
    assert live["sums"].shape == (2, 128, 128)
    for name in ("sums", "drift_px", "tilt_alpha_deg"):
        np.testing.assert_array_equal(live[name], expected[name], err_msg=name)
