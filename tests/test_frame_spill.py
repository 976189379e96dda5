"""The open tilt's frames spill to disk above a budget (issue 13, memory): same results, no files left behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_stages import tilt_series_messages

from stemlive.live.analysis import drift
from stemlive.live.pipeline.frame_spill import SpillingFrameStore
from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.tilt_stage import TiltSeriesStage


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
