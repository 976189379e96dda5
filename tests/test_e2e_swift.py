"""End to end, headless: Swift's test harness + the simulated instrument + the pipeline service with the real
analysis stages + the panels' acquisition procedures, then the tomography hand-off.

The acquisitions run in fast mode (simulated time, no sleeping) at reduced frame sizes to keep CI short.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

pytestmark = [pytest.mark.swift, pytest.mark.slow]

TestContext = pytest.importorskip("nion.swift.test.TestContext")

from nion.swift import Panel  # noqa: E402
from swift_harness import (  # noqa: E402
    document_controller_for_tests,
    free_tcp_endpoint,
    pump,
    swift_with_simulator,
)

from nionswift_plugin.stemlive import panels, results  # noqa: E402
from nionswift_plugin.stemlive.tilt_series import REFERENCE_TILTS_DEG  # noqa: E402
from stemlive.live.apps import tomo  # noqa: E402
from stemlive.live.pipeline.registry import make_params  # noqa: E402
from stemlive.live.pipeline.service import PipelineService  # noqa: E402
from stemlive.live.storage.session import SessionReader  # noqa: E402


@pytest.fixture(scope="module")
def swift() -> Iterator[Any]:
    with swift_with_simulator("default") as hardware:
        yield hardware


@pytest.fixture
def document_controller(swift: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("STEMLIVE_RESULT_ENDPOINT", "none")  # the test attaches its receiver explicitly
    with document_controller_for_tests() as document_controller:
        yield document_controller


def test_tilt_series_12_by_10_through_swift_service_and_tomo_export(
    document_controller: Any, swift: Any, tmp_path: Path
) -> None:
    frames_ep, results_ep = free_tcp_endpoint(), free_tcp_endpoint()
    service = PipelineService(tmp_path / "sessions", make_params(), frame_endpoint=frames_ep,
                              result_endpoint=results_ep).start()
    receiver = results.attach(document_controller, results_ep)
    panel = Panel.PanelManager().create_panel_content(document_controller, panels.TILT_SERIES_PANEL_ID,
                                                      "tilt", ["left"], "left", {})
    try:
        time.sleep(0.3)  # PUB/SUB: let the subscription arrive before the first result
        model = panel.model
        start_alpha = swift.instrument.stage_target("StageOutA")
        # the default table is the 12 nominal tilts of the reference experiment
        assert [tuple(t) for t in model.build_plan().tilts_deg] == list(REFERENCE_TILTS_DEG)
        model.frames_text, model.size_text, model.dwell_text, model.fov_text = "10", "256", "4", "8.192"
        model.settle_text, model.tracking = "0", True
        model.endpoint = frames_ep
        assert model.start(), model.status_text
        pump(document_controller, lambda: not model.running, 600)
        assert model.last_status == "complete", model.status_text
        assert "tilt 12/12, frame 10/10" in model.progress_text
        (path,) = service.wait_for_sessions(1, timeout_s=120)
        readback = np.asarray(model.procedure.readback_deg)  # the stage's read-back after each move

        document_model = document_controller.document_model
        pump(document_controller, lambda: len([d for d in document_model.data_items
                                               if "drift-corrected sum" in (d.title or "")]) == 12, 60)
    finally:
        panel.close()
        results.detach(receiver)
        service.stop()
    assert swift.instrument.stage_target("StageOutA") == pytest.approx(start_alpha)  # back where it was found
    assert start_alpha is not None

    with SessionReader(path) as r:
        assert r.status == "complete" and r.kind == "tilt_series"
        assert r.n_frames == 120
        table = r.frame_table()
        np.testing.assert_array_equal(np.bincount(table["tilt_index"]), np.full(12, 10))
        res = r.results("tilt_series")
    assert res["drift_px"].shape == (120, 2)
    assert res["sums"].shape == (12, 256, 256) and res["sums"].dtype == np.float32
    # frames carry the stage's read-back (within the confirm tolerance of the plan's angles), not the plan's
    assert readback.shape == (12, 2)
    np.testing.assert_array_equal(table["alpha_deg"], np.repeat(readback[:, 0], 10))
    np.testing.assert_array_equal(table["beta_deg"], np.repeat(readback[:, 1], 10))
    np.testing.assert_allclose(res["tilt_alpha_deg"], readback[:, 0])
    np.testing.assert_allclose(res["tilt_beta_deg"], readback[:, 1])
    np.testing.assert_allclose(readback, REFERENCE_TILTS_DEG, atol=0.05)
    # drift between frames of the default scenario is 0.1-1 px; the measured per-frame steps must say so
    steps = np.abs(np.diff(res["drift_px"].reshape(12, 10, 2), axis=1))
    assert np.median(steps) < 1.5

    out = tomo.export(path, tmp_path / "tomo")
    ncempy_emd = pytest.importorskip("ncempy.io.emd")
    with ncempy_emd.fileEMD(str(out["emd"])) as emd:
        data, dims = emd.get_emdgroup(emd.list_emds[0])
    assert data.shape == (12, 256, 256)
    np.testing.assert_allclose(dims[0][0], readback[:, 0])
    stack = np.load(out["genfire_projections"])
    angles = np.loadtxt(out["genfire_angles"])
    assert stack.shape == (256, 256, 12) and angles.shape == (12, 3)
    with h5py.File(out["emd"]) as f:
        assert f.attrs["version_major"] == 0 and f.attrs["version_minor"] == 2
