"""The Swift panels and the results-to-Swift bridge, in Nion Swift's headless test harness.

Runs against the stemlive simulated instrument (``time_scale=0``) registered with Swift's instrumentation layer,
a headless document controller (``TestContext``) and, end to end, a :class:`PipelineService` on loopback ports.
The service runs a small stand-in tilt-series stage defined here (running sum per tilt, published after every
frame), so these tests check the Swift side independently of the analysis stages.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.swift

TestContext = pytest.importorskip("nion.swift.test.TestContext")

from nion.swift import Panel  # noqa: E402
from nion.swift.model import DataItem, Graphics  # noqa: E402
from swift_harness import (  # noqa: E402
    document_controller_for_tests,
    free_tcp_endpoint,
    pump,
    swift_with_simulator,
)

from nionswift_plugin.stemlive import panels, results  # noqa: E402
from stemlive.live.pipeline.service import PipelineService  # noqa: E402
from stemlive.live.pipeline.stage import Result, Stage  # noqa: E402
from stemlive.live.wire.protocol import Message  # noqa: E402


class RunningSumStage(Stage):
    """Stand-in tilt-series stage: the running sum of each tilt, published after every frame (row = tilt row)."""

    name = "tilt_series"
    kinds = frozenset({"tilt_series"})

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self.rows: dict[int, int] = {}
        self.sums: dict[int, np.ndarray] = {}

    def process(self, msg: Message) -> Iterable[Result]:
        if msg.type != "frame" or msg.payload is None:
            return []
        h = msg.header
        row = self.rows.setdefault(int(h["tilt_index"]), len(self.rows))
        frame = np.asarray(msg.payload, dtype=np.float32)
        self.sums[row] = self.sums.get(row, np.zeros_like(frame)) + frame
        attrs = {"tilt_index": h["tilt_index"], "alpha_deg": h["alpha_deg"], "beta_deg": h["beta_deg"],
                 "pixel_size_nm": h["pixel_size_nm"]}
        return [Result("tilt_series", "sums", self.sums[row].copy(), index=row, attrs=attrs)]


@pytest.fixture(scope="module")
def swift() -> Iterator[Any]:
    with swift_with_simulator("default") as hardware:
        yield hardware


@pytest.fixture
def document_controller(swift: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("STEMLIVE_RESULT_ENDPOINT", "none")  # tests attach their own receiver
    monkeypatch.delenv("STEMLIVE_SESSION_DIR", raising=False)
    with document_controller_for_tests() as document_controller:
        yield document_controller


def create_panel(document_controller: Any, panel_id: str) -> Any:
    panel = Panel.PanelManager().create_panel_content(document_controller, panel_id, panel_id, ["left", "right"],
                                                      "left", {})
    assert panel is not None, f"panel {panel_id} was not created"
    return panel


def fast_tilt_plan(model: Any, tilts_csv: str, *, frames: int, size: int, fov_nm: float, endpoint: str) -> None:
    """Fill the Tilt Series panel for a quick run: 1 us dwell, no settle wait, no tracking, frames to ``endpoint``."""
    model.tilts_text = tilts_csv
    model.frames_text, model.size_text, model.dwell_text, model.fov_text = str(frames), str(size), "1", str(fov_nm)
    model.settle_text, model.tracking = "0", False
    model.endpoint = endpoint


# ----------------------------------------------------------------------------------------------------- plans


def test_tilt_panel_builds_plan_from_fields(document_controller: Any) -> None:
    panel = create_panel(document_controller, panels.TILT_SERIES_PANEL_ID)
    try:
        model = panel.model
        assert len(model.build_plan().tilts_deg) == 12  # the reference tilts by default
        model.tilts_text = "alpha_deg,beta_deg\n0,0\n-10.5,3\n"
        model.frames_text, model.size_text, model.dwell_text, model.fov_text = "3", "128", "2.5", "8"
        model.settle_text, model.tolerance_text, model.order_index, model.tracking = "0.5", "2", 1, False
        plan = model.build_plan()
        assert plan.tilts_deg == [(0.0, 0.0), (-10.5, 3.0)]
        assert (plan.frames_per_tilt, plan.size_px, plan.dwell_us, plan.fov_nm) == (3, 128, 2.5, 8.0)
        assert (plan.settle_s, plan.confirm_tolerance, plan.order, plan.tracking) == (0.5, 2.0, "increasing_tilt",
                                                                                       False)
        # the button tests the plan on the instrument on a worker thread; Start waits for it
        model.check_clicked(None)
        assert model.checking and not model.can_start
        assert model.status_text.startswith("Checking the plan on stemlive_stem_controller / stemlive_scan [HAADF]")
        assert model.start() is False and "check is running" in model.status_text
        pump(document_controller, lambda: not model.checking, 60)
        assert model.status_text.startswith("Plan OK"), model.status_text
        assert model.can_start and model.last_check is not None
        model.frames_text = "three"
        model.check_clicked(None)
        assert "frames per tilt" in model.status_text and "not a number" in model.status_text
    finally:
        panel.close()


def test_tilt_csv_round_trip(document_controller: Any, tmp_path: Path) -> None:
    model = panels.TiltSeriesModel()
    model.set_tilts([(1.5, -2.0), (3.0, 4.25)])
    assert model.export_csv(tmp_path / "t.csv")
    other = panels.TiltSeriesModel()
    assert other.import_csv(tmp_path / "t.csv")
    assert other.build_plan().tilts_deg == [(1.5, -2.0), (3.0, 4.25)]
    (tmp_path / "bad.csv").write_text("0,0\nfoo,bar,baz\n")
    assert not other.import_csv(tmp_path / "bad.csv")
    assert "Could not import" in other.status_text
    assert other.build_plan().tilts_deg == [(1.5, -2.0), (3.0, 4.25)]  # unchanged


def test_refused_tilt_plan_does_not_move_the_stage(document_controller: Any, swift: Any) -> None:
    instrument = swift.instrument
    before = (instrument.stage_target("StageOutA"), instrument.stage_target("StageOutB"))
    panel = create_panel(document_controller, panels.TILT_SERIES_PANEL_ID)
    try:
        model = panel.model
        model.tilts_text = "0,0\n50,0\n"
        model.frames_text, model.size_text = "1", "64"
        model.endpoint = free_tcp_endpoint()  # nothing listens: a started run would fail, a refused one never sends
        assert model.start() is False
        assert model.thread is None and not model.running
        assert "Plan refused" in model.status_text
        assert "alpha 50 deg is outside the stage limits" in model.status_text
        assert (instrument.stage_target("StageOutA"), instrument.stage_target("StageOutB")) == before
    finally:
        panel.close()


def test_eels_panel_plan_and_refusal(document_controller: Any, swift: Any) -> None:
    instrument = swift.instrument
    panel = create_panel(document_controller, panels.EELS_PANEL_ID)
    try:
        model = panel.model
        model.mode_index = 1
        model.start_text, model.end_text = "0.2, 0.3", "0.6, 0.7"
        model.points_text, model.rows_text, model.frames_text, model.exposure_text = "4", "3", "5", "10"
        model.survey_before, model.survey_after, model.tracking_every_text = False, True, "2"
        plan = model.build_plan()
        assert (plan.mode, plan.start, plan.end, plan.points, plan.rows) == ("map", (0.2, 0.3), (0.6, 0.7), 4, 3)
        assert (plan.frames_per_point, plan.exposure_ms, plan.step_nm) == (5, 10.0, None)
        assert (plan.survey_before, plan.survey_after, plan.drift_tracking_every) == (False, True, 2)
        model.check()
        assert model.status_text.startswith("Plan OK"), model.status_text

        probe_before = instrument.probe_position
        model.mode_index = 0
        model.start_text = "1.5, 0.1"
        assert model.start() is False
        assert "Plan refused" in model.status_text and "outside the survey image" in model.status_text
        assert instrument.probe_position == probe_before
    finally:
        panel.close()


def test_eels_points_from_graphics(document_controller: Any) -> None:
    document_model = document_controller.document_model
    from nion.data import Calibration, DataAndMetadata

    survey = DataAndMetadata.new_data_and_metadata(
        np.zeros((100, 100), np.float32), dimensional_calibrations=[Calibration.Calibration(scale=0.5, units="nm")] * 2)
    data_item = DataItem.new_data_item(survey)
    document_model.append_data_item(data_item)
    display_item = document_model.get_display_item_for_data_item(data_item)
    line = Graphics.LineGraphic()
    line.start, line.end = (0.25, 0.1), (0.75, 0.8)
    display_item.add_graphic(line)
    model = panels.EELSModel()
    assert model.take_from_graphic(display_item)
    plan = model.build_plan()
    assert plan.mode == "line" and plan.start == pytest.approx((0.25, 0.1)) and plan.end == pytest.approx((0.75, 0.8))
    assert plan.survey_fov_nm == pytest.approx(50.0)

    rect = Graphics.RectangleGraphic()
    rect.bounds = ((0.1, 0.2), (0.3, 0.4))
    display_item.add_graphic(rect)
    display_item.graphic_selection.set(1)
    assert model.take_from_graphic(display_item)
    plan = model.build_plan()
    assert plan.mode == "map" and plan.start == pytest.approx((0.1, 0.2)) and plan.end == pytest.approx((0.4, 0.6))
    assert not panels.EELSModel().take_from_graphic(None)


# ----------------------------------------------------------------------------------------------------- results


def test_eels_results_become_data_items(document_controller: Any) -> None:
    receiver = results.ResultsToSwift(document_controller, free_tcp_endpoint(), start=False)
    document_model = document_controller.document_model
    n_ch = 32
    receiver.submit(("s1", "eels", "energy_meV", None), np.arange(n_ch) * 0.5 - 4.0, {})
    for i in (0, 2):  # point 1 "dropped"
        receiver.submit(("s1", "eels", "sum", i), np.full(n_ch, i + 1.0, np.float32), {})
        receiver.submit(("s1", "eels", "temperature_K", i), np.array(300.0 + i), {})
        receiver.submit(("s1", "eels", "temperature_err_K", i), np.array(5.0), {})
    receiver.submit(("s1", "eels", "labels", None), np.array([0, 1, 1]), {})
    pump(document_controller, lambda: len(document_model.data_items) >= 3, 5)

    by_item = {k[1]: v for k, v in receiver.data_items.items()}
    waterfall = by_item["eels/sum"].xdata
    assert waterfall.data_shape == (3, n_ch)
    assert waterfall.data[0, 0] == 1 and waterfall.data[1, 0] == 0 and waterfall.data[2, 0] == 3
    assert waterfall.dimensional_calibrations[1].units == "meV"
    assert waterfall.dimensional_calibrations[1].offset == pytest.approx(-4.0)
    profile = by_item["eels/temperature_K"].xdata.data
    assert profile.shape == (3, 3) and profile[0, 0] == 300 and math.isnan(profile[0, 1]) and profile[2, 2] == 307
    assert list(by_item["eels/labels"].xdata.data) == [0, 1, 1]

    # the missing point arrives later; the map's final temperature replaces the profile in place
    receiver.submit(("s1", "eels", "sum", 1), np.full(n_ch, 2.0, np.float32), {})
    pump(document_controller, lambda: by_item["eels/sum"].xdata.data[1, 0] == 2, 5)
    assert len(document_model.data_items) == 3

    # a new receiver (e.g. the window reopened) finds the existing items instead of making new ones
    again = results.ResultsToSwift(document_controller, free_tcp_endpoint(), start=False)
    again.submit(("s1", "eels", "labels", None), np.array([[2, 2], [1, 0]]), {})
    pump(document_controller, lambda: bool(again.data_items), 5)
    assert len(document_model.data_items) == 3
    assert again.data_items[("s1", "eels/labels")] is by_item["eels/labels"]
    assert by_item["eels/labels"].xdata.data_shape == (2, 2)

    # live labels of a subset of points (attrs.points) are placed at those points
    again.submit(("s2", "eels", "labels", None), np.array([1, 0]), {"points": [0, 3]})
    pump(document_controller, lambda: ("s2", "eels/labels") in again.data_items, 5)
    assert list(again.data_items[("s2", "eels/labels")].xdata.data) == [1, -1, -1, 0]


def test_result_items_are_calibrated_and_temperatures_have_error_layers(document_controller: Any) -> None:
    receiver = results.ResultsToSwift(document_controller, free_tcp_endpoint(), start=False)
    document_model = document_controller.document_model
    n_ch, step = 16, 1.6
    receiver.submit(("c", "eels", "energy_meV", None), np.arange(n_ch) * 0.5 - 4.0, {})
    for i in range(4):  # a line at 30 degrees: the distance along it, not x, is the axis
        attrs = {"x_nm": 10 + i * step * math.cos(math.pi / 6), "y_nm": 5 + i * step * math.sin(math.pi / 6)}
        receiver.submit(("c", "eels", "sum", i), np.full(n_ch, 1.0 + i, np.float32), attrs)
        receiver.submit(("c", "eels", "temperature_K", i), np.array(300.0 + 10 * i), attrs)
        receiver.submit(("c", "eels", "temperature_err_K", i), np.array(4.0), attrs)
    receiver.submit(("c", "eels", "labels", None), np.array([0, 0, 1, 1]), {})
    receiver.submit(("c", "tilt_series", "sums", None), np.ones((2, 8, 8), np.float32), {"pixel_size_nm": 0.032})
    pump(document_controller, lambda: len(receiver.data_items) >= 5, 5)
    by_item = {k[1]: v for k, v in receiver.data_items.items() if k[0] == "c"}

    waterfall = by_item["eels/sum"].xdata
    position, energy = waterfall.dimensional_calibrations
    assert (position.units, energy.units) == ("nm", "meV")
    assert position.scale == pytest.approx(step, rel=1e-6) and position.offset == 0
    assert energy.scale == pytest.approx(0.5) and energy.offset == pytest.approx(-4.0)

    profile = by_item["eels/temperature_K"]
    assert profile.xdata.intensity_calibration.units == "K"
    assert profile.xdata.dimensional_calibrations[-1].units == "nm"
    assert profile.xdata.dimensional_calibrations[-1].scale == pytest.approx(step, rel=1e-6)
    np.testing.assert_allclose(profile.xdata.data[:, 3], [330.0, 326.0, 334.0])
    display_item = document_model.get_display_item_for_data_item(profile)
    assert display_item.display_type == "line_plot"
    layers = [(layer.data_row, layer.label) for layer in display_item.display_layers]
    assert layers == [(0, "T"), (1, "T - sigma"), (2, "T + sigma")]
    # what the line plot draws: all three rows (a collection would show one row in every layer)
    display_values = display_item.display_data_channels[0].get_latest_computed_display_values()
    assert display_values is not None and display_values.display_data_and_metadata.data_shape == (3, 4)
    # the y axis is zoomed to T +/- sigma (Swift's own range would start at 0 K)
    assert 250 < display_item.get_display_property("y_min") < 296
    assert 334 < display_item.get_display_property("y_max") < 380

    labels = by_item["eels/labels"].xdata
    assert labels.dimensional_calibrations[0].units == "nm"
    assert labels.dimensional_calibrations[0].scale == pytest.approx(step, rel=1e-6)

    for row in (0, 1):
        calibrations = by_item[f"tilt_series/sums/{row}"].xdata.dimensional_calibrations
        assert [(c.units, c.scale) for c in calibrations] == [("nm", pytest.approx(0.032))] * 2

    # a map: temperatures as an image in nm (rows 2 nm apart, columns 1 nm apart)
    for i in range(6):
        attrs = {"x_nm": float(i % 3), "y_nm": 2.0 * (i // 3), "scan_shape": [2, 3]}
        receiver.submit(("m", "eels", "temperature_K", i), np.array(300.0 + i), attrs)
    pump(document_controller, lambda: ("m", "eels/temperature_K") in receiver.data_items, 5)
    image = receiver.data_items[("m", "eels/temperature_K")].xdata
    assert image.data_shape == (2, 3)
    assert [(c.units, c.scale) for c in image.dimensional_calibrations] == [("nm", pytest.approx(2.0)),
                                                                            ("nm", pytest.approx(1.0))]


def test_final_tilt_stack_refreshes_every_tilt(document_controller: Any) -> None:
    receiver = results.ResultsToSwift(document_controller, free_tcp_endpoint(), start=False)
    receiver.submit(("t", "tilt_series", "sums", 0), np.zeros((8, 8), np.float32), {})
    receiver.submit(("t", "tilt_series", "tilt_alpha_deg", 0), np.array(10.0), {})
    receiver.submit(("t", "tilt_series", "tilt_beta_deg", 0), np.array(-5.0), {})
    pump(document_controller, lambda: ("t", "tilt_series/sums/0") in receiver.data_items, 5)
    assert receiver.data_items[("t", "tilt_series/sums/0")].title == "Tilt 1 (10, -5) drift-corrected sum"
    receiver.submit(("t", "tilt_series", "sums", None), np.stack([np.ones((8, 8)), 2 * np.ones((8, 8))]), {})
    receiver.submit(("t", "tilt_series", "tilt_alpha_deg", None), np.array([10.0, 20.0]), {})
    receiver.submit(("t", "tilt_series", "tilt_beta_deg", None), np.array([-5.0, 0.0]), {})
    pump(document_controller, lambda: ("t", "tilt_series/sums/1") in receiver.data_items, 5)
    first, second = receiver.data_items[("t", "tilt_series/sums/0")], receiver.data_items[("t", "tilt_series/sums/1")]
    assert first.xdata.data[0, 0] == 1 and second.xdata.data[0, 0] == 2
    assert second.title == "Tilt 2 (20, 0) drift-corrected sum"


# ----------------------------------------------------------------------------------------------------- end to end


def run_alphas_include_last(model: Any) -> bool:
    return bool(model.procedure.readback_deg) and abs(model.procedure.readback_deg[-1][0] + 12.5) < 0.05


def test_tilt_series_through_the_panel_end_to_end(document_controller: Any, swift: Any, tmp_path: Path) -> None:
    frames, result_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    service = PipelineService(tmp_path, {}, frame_endpoint=frames, result_endpoint=result_endpoint,
                              stage_classes={"tilt_series": RunningSumStage}).start()
    receiver = results.attach(document_controller, result_endpoint)
    panel = create_panel(document_controller, panels.TILT_SERIES_PANEL_ID)
    try:
        assert receiver is not None and receiver.ready.is_set()
        time.sleep(0.3)  # let the subscription reach the publisher (PUB/SUB slow joiner)
        model = panel.model
        start_alpha = swift.instrument.stage_target("StageOutA")
        fast_tilt_plan(model, "0,0\n-12.5,6\n", frames=2, size=64, fov_nm=8, endpoint=frames)
        assert model.start(), model.status_text
        assert model.can_abort and not model.can_start
        pump(document_controller, lambda: not model.running, 90)
        assert model.last_status == "complete", model.status_text
        assert "tilt 2/2, frame 2/2" in model.progress_text
        # the series ended at -12.5 deg and returned the stage to where it was found
        assert swift.instrument.stage_target("StageOutA") == pytest.approx(start_alpha)
        assert run_alphas_include_last(model)

        document_model = document_controller.document_model

        def sums_done() -> bool:
            items = [d for d in document_model.data_items if "drift-corrected sum" in (d.title or "")]
            return len(items) == 2 and all(
                (d.metadata.get("stemlive") or {}).get("alpha_deg") is not None for d in items)

        pump(document_controller, sums_done, 30)
        (path,) = service.wait_for_sessions(1, timeout_s=30)
        with h5py.File(path, "r") as f:
            recorded = f["tilt_series/frames"][()]
            tilt_index = f["tilt_series/tilt_index"][()]
        sums = [d for d in document_model.data_items if "stemlive" in (d.metadata or {})]
        titles = sorted(d.title for d in sums)
        # the titles carry the stage's read-back angles (within the confirm tolerance of the plan's (-12.5, 6))
        assert [t.split(" (")[0] for t in titles] == ["Tilt 1", "Tilt 2"]
        assert all(t.endswith(" drift-corrected sum") for t in titles)
        readback = np.asarray(model.procedure.readback_deg)
        np.testing.assert_allclose(readback, [(0, 0), (-12.5, 6)], atol=0.05)
        assert sorted(float(d.metadata["stemlive"]["alpha_deg"]) for d in sums) == pytest.approx(
            sorted(readback[:, 0]))
        for data_item in sums:
            row = data_item.metadata["stemlive"]["tilt_row"]
            np.testing.assert_allclose(data_item.xdata.data, recorded[tilt_index == row].sum(axis=0), rtol=1e-5)
            assert data_item.xdata.data_shape == (64, 64)
            assert data_item.xdata.dimensional_calibrations[0].units == "nm"
    finally:
        panel.close()  # releases the receiver taken above only after our own detach
        results.detach(receiver)
        service.stop()
    assert results._attached == {}


def test_panel_pause_resume_and_abort(document_controller: Any, swift: Any, tmp_path: Path) -> None:
    """Pause holds the acquisition at a frame boundary (no frame rendered while paused), Resume goes on, Abort ends
    the session as aborted with the stage back where it was found."""
    frames = free_tcp_endpoint()
    service = PipelineService(tmp_path, {}, frame_endpoint=frames, result_endpoint=free_tcp_endpoint(),
                              stage_classes={"tilt_series": RunningSumStage}).start()
    panel = create_panel(document_controller, panels.TILT_SERIES_PANEL_ID)
    truth = swift.instrument.ground_truth
    rendered = lambda: len(truth.get("frame"))  # noqa: E731 - frames the simulator has rendered so far
    try:
        model = panel.model
        start_alpha = swift.instrument.stage_target("StageOutA")
        fast_tilt_plan(model, "0,0\n-12.5,6\n10,-5\n", frames=500, size=32, fov_nm=4, endpoint=frames)
        before = rendered()
        assert model.start(), model.status_text
        pump(document_controller, lambda: rendered() >= before + 3, 60)
        model.pause()
        assert model.paused and model.control is not None and model.control.paused
        assert model.status_text.startswith("Paused")
        time.sleep(0.5)  # the frame under way when Pause came finishes
        held = rendered()
        time.sleep(0.5)
        assert rendered() == held and model.running
        model.resume()
        assert not model.paused and model.status_text == "Running."
        pump(document_controller, lambda: rendered() >= held + 3, 60)
        model.abort()
        assert model.status_text == "Aborting..." and not model.paused
        pump(document_controller, lambda: not model.running, 60)
        assert model.last_status == "aborted", model.status_text
        assert rendered() - before < 3 * 500  # stopped before the end of the series
        assert swift.instrument.stage_target("StageOutA") == pytest.approx(start_alpha)
        model.pause()  # nothing runs: no effect
        assert not model.paused and model.last_status == "aborted"
        (path,) = service.wait_for_sessions(1, timeout_s=30)
        with h5py.File(path, "r") as f:
            assert f.attrs["status"] == "aborted"
    finally:
        panel.close()
        service.stop()


def test_eels_line_scan_through_the_panel(document_controller: Any, swift: Any, tmp_path: Path) -> None:
    frames = free_tcp_endpoint()
    service = PipelineService(tmp_path, {}, frame_endpoint=frames, result_endpoint=free_tcp_endpoint(),
                              stage_classes={}).start()
    panel = create_panel(document_controller, panels.EELS_PANEL_ID)
    try:
        model = panel.model
        model.start_text, model.end_text, model.step_text, model.points_text = "0.5, 0.2", "0.5, 0.8", "", "3"
        model.frames_text, model.exposure_text = "2", "1"
        model.survey_size_text, model.survey_fov_text, model.survey_after = "64", "20", False
        model.endpoint = frames
        assert model.start(), model.status_text
        pump(document_controller, lambda: not model.running, 90)
        assert model.last_status == "complete", model.status_text
        assert "point 3/3, frame 2/2" in model.progress_text
        (path,) = service.wait_for_sessions(1, timeout_s=30)
        with h5py.File(path, "r") as f:
            assert f.attrs["kind"] == "eels_line_scan"
            assert list(f["eels/point_index"][()]) == [0, 0, 1, 1, 2, 2]
    finally:
        panel.close()
        service.stop()


class GatedProblemStage(Stage):
    """Stand-in EELS stage: its final result is a ``problem``, emitted only once the test opens the gate."""

    name = "eels"
    kinds = frozenset({"eels_line_scan"})
    gate = threading.Event()

    def finish(self, status: str) -> Iterable[Result]:
        assert self.gate.wait(60), "the test never opened the gate"
        return [Result("eels", "problem", np.zeros(0), attrs={
            "result": "temperature", "severity": "skipped", "reason": "1000 meV per channel: no phonon window"})]


class BrokenStage(Stage):
    """A stage with a bug: the pipeline reports it as ``stage_error`` and switches it off."""

    name = "segmentation"
    kinds = frozenset({"eels_line_scan"})

    def process(self, msg: Message) -> Iterable[Result]:
        raise RuntimeError("k-means did not converge")


def test_panel_shows_analysing_and_the_problems_until_the_final_results(document_controller: Any, swift: Any,
                                                                        tmp_path: Path) -> None:
    frames, result_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    GatedProblemStage.gate.clear()
    service = PipelineService(tmp_path, {}, frame_endpoint=frames, result_endpoint=result_endpoint,
                              stage_classes={"eels": GatedProblemStage, "segmentation": BrokenStage}).start()
    receiver = results.attach(document_controller, result_endpoint)
    panel = create_panel(document_controller, panels.EELS_PANEL_ID)
    try:
        assert panel.model.results_receiver is receiver
        time.sleep(0.3)  # PUB/SUB slow joiner
        model = panel.model
        model.start_text, model.end_text, model.step_text, model.points_text = "0.5, 0.2", "0.5, 0.8", "", "3"
        model.frames_text, model.exposure_text = "2", "1"
        model.survey_size_text, model.survey_fov_text, model.survey_after = "64", "20", False
        model.endpoint = frames
        assert model.start(), model.status_text
        # The stage error arrives during the run. end() returns only once the service has finished the analysis
        # and closed the file, which the gate holds back: meanwhile the panel shows "Analysing..." and the
        # problems so far.
        pump(document_controller, lambda: "Analysing..." in model.status_text
             and "k-means did not converge" in model.status_text, 60)
        time.sleep(0.5)
        document_controller.periodic()
        status = model.status_text
        assert "Analysing..." in status and "segmentation analysis failed: RuntimeError" in status, status
        assert "Analysis incomplete" not in status and "temperature" not in status, status
        assert model.running and model.last_status is None, status  # the run cannot be over before the file is
        GatedProblemStage.gate.set()
        pump(document_controller, lambda: not model.running, 90)
        assert model.last_status == "complete", model.status_text
        pump(document_controller, lambda: "Analysis incomplete" in model.status_text, 30)
        status = model.status_text
        assert status.startswith("Finished (session"), status
        assert "Analysing" not in status
        assert "Analysis incomplete: 2 problem(s)" in status, status
        assert "temperature skipped: 1000 meV per channel: no phonon window" in status, status
        (path,) = service.wait_for_sessions(1, timeout_s=30)
        with h5py.File(path, "r") as f:
            finished = f["results/pipeline/analysis_finished"]
            assert finished.attrs["status"] == "incomplete" and int(finished.attrs["problems"]) == 2
        # a new Check replaces the run's status: later analysis news of that session do not overwrite it
        model.check()
        assert model.status_text.startswith("Plan OK"), model.status_text
    finally:
        GatedProblemStage.gate.set()
        panel.close()
        results.detach(receiver)
        service.stop()


# ----------------------------------------------------------------------------------------------------- launcher


def test_launcher_options_set_the_plugin_environment(tmp_path: Path) -> None:
    import argparse

    from stemlive.live.apps import launcher

    parser = argparse.ArgumentParser()
    launcher.add_subcommand(parser.add_subparsers())
    args = parser.parse_args(["swift", "--out", str(tmp_path)])
    env = launcher.plugin_environment(args)
    assert env == {"STEMLIVE_INSTRUMENT": "simulated", "STEMLIVE_SCENARIO": "realtime",
                   "STEMLIVE_FRAME_ENDPOINT": "tcp://127.0.0.1:7710", "STEMLIVE_RESULT_ENDPOINT": "tcp://127.0.0.1:7711",
                   "STEMLIVE_SESSION_DIR": str(tmp_path.resolve())}
    args = parser.parse_args(["swift", "--no-simulator", "--service", "none", "--frames", "tcp://10.0.0.2:7710"])
    env = launcher.plugin_environment(args)
    assert env["STEMLIVE_INSTRUMENT"] == "none" and env["STEMLIVE_RESULT_ENDPOINT"] == "none"
    assert env["STEMLIVE_FRAME_ENDPOINT"] == "tcp://10.0.0.2:7710" and "STEMLIVE_SESSION_DIR" not in env
    target = {"STEMLIVE_SESSION_DIR": "/stale"}
    launcher.apply_environment(env, target)
    assert target == env
    assert args.func is launcher.cmd_swift
