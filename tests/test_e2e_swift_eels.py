"""End to end, headless: a vibrational-EELS line scan across the simulated MoS2/WSe2 interface through the
"Vibrational EELS" panel, Swift's test harness, the pipeline service with the real EELS stage, and back into Swift.

Fast mode, fewer frames per point than the reference (its full dose is covered by tests/test_segment.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

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
from stemlive.live.pipeline.registry import make_params  # noqa: E402
from stemlive.live.pipeline.service import PipelineService  # noqa: E402
from stemlive.live.storage.session import SessionReader  # noqa: E402


@pytest.fixture(scope="module")
def swift() -> Iterator[Any]:
    with swift_with_simulator("eels_mos2_wse2", ronchigram=False, eels_sensor_height=2) as hardware:
        yield hardware


@pytest.fixture
def document_controller(swift: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("STEMLIVE_RESULT_ENDPOINT", "none")
    with document_controller_for_tests() as document_controller:
        yield document_controller


def test_eels_line_scan_through_swift_and_the_eels_stage(document_controller: Any, swift: Any, tmp_path: Path) -> None:
    frames_ep, results_ep = free_tcp_endpoint(), free_tcp_endpoint()
    # fewer points and frames than the reference: refresh the live labels every 4 points
    params = make_params(overrides=["eels.labels_every=4"])
    service = PipelineService(tmp_path / "sessions", params, frame_endpoint=frames_ep,
                              result_endpoint=results_ep).start()
    receiver = results.attach(document_controller, results_ep)
    panel = Panel.PanelManager().create_panel_content(document_controller, panels.EELS_PANEL_ID, "eels", ["left"],
                                                      "left", {})
    try:
        time.sleep(0.3)
        model = panel.model
        # a line of 21 points, 3.2 nm apart, centred on the interface (x = 0 at the scan centre)
        model.start_text, model.end_text, model.step_text, model.points_text = "0.5, 0.1", "0.5, 0.9", "3.2", "21"
        model.frames_text, model.exposure_text = "20", "300"
        model.survey_size_text, model.survey_fov_text = "128", "80"
        model.endpoint = frames_ep
        assert model.start(), model.status_text
        pump(document_controller, lambda: not model.running, 600)
        assert model.last_status == "complete", model.status_text
        (path,) = service.wait_for_sessions(1, timeout_s=300)  # the final k-means and peak fits run at the end
        document_model = document_controller.document_model
        pump(document_controller, lambda: any("label" in (d.title or "").lower() for d in document_model.data_items),
             60)
        titles = [d.title or "" for d in document_model.data_items]
    finally:
        panel.close()
        results.detach(receiver)
        service.stop()

    assert any("temperature" in t.lower() for t in titles), titles
    assert any("spectra" in t.lower() or "waterfall" in t.lower() or "sum" in t.lower() for t in titles), titles
    with SessionReader(path) as r:
        assert r.status == "complete" and r.kind == "eels_line_scan"
        table = r.spectrum_table()
        assert r.survey("before") is not None and r.survey("after") is not None
        res = r.results("eels")
    n_points = int(table["point_index"].max()) + 1
    assert n_points == 21 and r.n_spectra == 21 * 20
    x = np.array([table["x_nm"][table["point_index"] == p][0] for p in range(n_points)])
    np.testing.assert_allclose(np.diff(x), 3.2, atol=0.05)  # probe positions where the plan put them
    assert res["sum"].shape == (n_points, res["energy_meV"].size)
    # regions of the simulated interface model (13 nm wide interface at x = 0)
    true_region = np.where(x < -6.5, 0, np.where(x > 6.5, 2, 1))
    ari = adjusted_rand_score(true_region, res["labels"])
    assert ari >= 0.7, f"adjusted Rand index {ari:.2f} at 20 frames per point"
