"""The procedures on two instruments in Swift's headless harness: Nion's usim and the stemlive simulator.

Each test runs the procedure classes the panels run (through :mod:`nionswift_plugin.stemlive.scripting`) on the
instrument's own devices, with a real pipeline service recording into tmp_path. usim is loaded by its plug-in entry
point beside the stemlive simulator (each bound to its own devices). usim paces its camera and scan in real time.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.swift]

TestContext = pytest.importorskip("nion.swift.test.TestContext")
pytest.importorskip("nion.usim_device")

from swift_harness import swift_with_simulator  # noqa: E402

from nionswift_plugin.stemlive import scripting  # noqa: E402
from nionswift_plugin.stemlive.acquisition import PlanError, wait_until  # noqa: E402
from nionswift_plugin.stemlive.eels_scan import raw_frame  # noqa: E402
from stemlive.live.pipeline.registry import make_params  # noqa: E402
from stemlive.live.pipeline.service import PipelineService  # noqa: E402
from stemlive.live.storage.session import SessionReader  # noqa: E402

INSTRUMENTS = ("usim", "stemlive")
# 4 points x 5 spectra; usim's EELS gives ~1.8e5 counts per pixel and ms at 200 pA, so 0.2 ms stays below 16 bit
EELS_LINE = {
    "usim": dict(points=4, step_nm=None, frames_per_point=5, batch=5, exposure_ms=0.2, survey_size_px=128),
    "stemlive": dict(points=4, step_nm=None, frames_per_point=5, batch=5, exposure_ms=20.0, survey_size_px=128),
}


@pytest.fixture(scope="module")
def swift() -> Iterator[Any]:
    with swift_with_simulator("eels_mos2_wse2", usim=True, ronchigram=False, eels_sensor_height=2) as hardware:
        yield hardware


@pytest.fixture
def service(tmp_path: Path) -> Iterator[PipelineService]:
    service = PipelineService(tmp_path / "sessions", make_params(), frame_endpoint="tcp://127.0.0.1:*",
                              result_endpoint="tcp://127.0.0.1:*").start()
    try:
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def probe_states_during_exposures(camera_source: Any, stem_controller: Any) -> Iterator[list[str]]:
    """The instrument's probe state at every camera exposure (the camera simulator's frame call is wrapped)."""
    simulator = camera_source.camera.simulator
    original = simulator.get_frame_data
    states: list[str] = []

    def get_frame_data(*args: Any, **kwargs: Any) -> Any:
        states.append(str(stem_controller.probe_state))
        return original(*args, **kwargs)

    simulator.get_frame_data = get_frame_data
    try:
        yield states
    finally:
        del simulator.get_frame_data  # the class's method again


def camera_energy_calibration(camera_source: Any) -> Any:
    """The camera's own energy calibration, from one frame of Nion's live view."""
    camera_source.start_playing()
    try:
        xdata = camera_source.get_next_xdatas_to_finish(10.0)[0]
    finally:
        camera_source.stop_playing()
        wait_until(lambda: not camera_source.is_playing)
    return xdata.dimensional_calibrations[-1]


@pytest.mark.parametrize("name", INSTRUMENTS)
def test_eels_line_parked_probe_nion_stream_and_instrument_restored(
        swift: Any, service: PipelineService, name: str) -> None:
    hw = scripting.find_hardware(name, need_camera=True)
    stem, scan, camera = hw.stem_controller, hw.scan_source, hw.camera_source
    assert str(stem.instrument_id).startswith(name)
    energy = camera_energy_calibration(camera)
    # the user's state: a live scan running, a parked position remembered, camera settings of their own
    before_probe = stem.probe_position
    before_scan = scan.get_current_frame_parameters().as_dict()
    before_channels = [i for i in range(scan.channel_count) if scan.get_channel_enabled(i)]
    before_camera = camera.get_current_frame_parameters().as_dict()
    scan.start_playing()
    assert wait_until(lambda: stem.probe_state == "scanning")
    try:
        with probe_states_during_exposures(camera, stem) as states:
            run = scripting.start("eels-line", hardware=hw, endpoint=service.frame_endpoint, **EELS_LINE[name])
            assert run.check.ok, run.check.problems
            status = run.wait(300)
        assert status == "complete", run.error
        # every exposure (Check's test frames included) at a parked probe, never while scanning
        assert len(states) >= 20
        assert set(states) == {"parked"}, states
        procedure = run.procedure
        assert procedure.probe_states == ["parked"] * 4
        # afterwards: camera stopped, settings and probe as before, the user's live scan running again
        assert wait_until(lambda: not camera.is_playing)
        assert camera.get_current_frame_parameters().as_dict() == before_camera
        after_scan = scan.get_current_frame_parameters().as_dict()
        assert {k: after_scan[k] for k in before_scan} == before_scan  # (Nion adds defaults for absent keys)
        assert [i for i in range(scan.channel_count) if scan.get_channel_enabled(i)] == before_channels
        assert stem.probe_position == before_probe
        assert wait_until(lambda: scan.is_playing and stem.probe_state == "scanning")
    finally:
        scan.stop_playing()
        wait_until(lambda: not scan.is_playing)

    (path,) = service.wait_for_sessions(1, timeout_s=300)
    with SessionReader(path) as r:
        assert r.status == "complete" and r.kind == "eels_line_scan"
        assert r.n_spectra == 20
        table = r.spectrum_table()
        attrs = r.attrs("eels")
        settings = r.settings
        spectra = np.asarray(r.spectra()[:])
    np.testing.assert_array_equal(np.bincount(table["point_index"]), [5, 5, 5, 5])
    # the camera's own energy calibration, converted from its unit
    factor = {"eV": 1000.0, "meV": 1.0}[energy.units]
    assert float(attrs["dispersion_meV"]) == pytest.approx(energy.scale * factor)
    np.testing.assert_allclose(table["energy_offset_meV"], energy.offset * factor)
    if name == "usim":
        assert float(attrs["dispersion_meV"]) == pytest.approx(1000.0)  # usim: 1 eV per channel
        assert settings["energy_units"] == "eV"
    assert spectra.shape[0] == 20 and np.all(spectra.sum(axis=1) > 0)
    # Nion metadata and the instrument's beam current in the settings
    ok, current_A = stem.TryGetVal("BeamCurrent")
    assert ok and settings["beam_current_pA"] == pytest.approx(current_A * 1e12)
    assert settings["nion"]["camera"]["calibrations"][-1]["units"] == energy.units
    assert settings["nion"]["instrument_id"] == stem.instrument_id  # this instrument's, with two registered
    assert settings["nion"]["camera"]["hardware_source_id"] == camera.hardware_source_id
    assert settings["nion"]["scan"]["channels"][0] == "HAADF" and settings["haadf_channel"] == "HAADF"
    assert "frame_parameters" in settings["nion"]["scan"] and settings["nion"]["instrument"]["controls"]
    assert run.check.dose_e_per_A2 > 0


def _refusal_exposure(name: str) -> dict[str, Any]:
    # usim: the camera reports no saturation level, so its 16-bit range; the stemlive camera saturates at 4e9
    # counts, out of reach: the plan states a lower level (as a user may for a detector in a sensitive mode)
    return dict(exposure_ms=50.0) if name == "usim" else dict(exposure_ms=50.0, saturation_counts=20000.0)


@pytest.mark.parametrize("name", INSTRUMENTS)
def test_saturating_exposure_refused_at_check_with_the_largest_safe_exposure(swift: Any, name: str) -> None:
    hw = scripting.find_hardware(name, need_camera=True)
    settings = {**EELS_LINE[name], **_refusal_exposure(name)}
    plan = scripting.make_plan("eels-line", settings)
    before_camera = hw.camera_source.get_current_frame_parameters().as_dict()
    check = scripting.check(plan, hw)
    assert not check.ok
    (problem,) = [p for p in check.problems if "saturate" in p]
    match = re.search(r"brightest pixel about ([0-9.e+]+) counts in 50 ms \(saturation ([0-9.e+]+) counts per "
                      r"pixel, [^)]*\); use at most ([0-9.e+-]+) ms per frame", problem)
    assert match, problem
    peak, saturation, safe_ms = (float(g) for g in match.groups())
    assert saturation == (65535.0 if name == "usim" else 20000.0)
    assert peak > saturation and 0 < safe_ms < 50.0
    assert not hw.camera_source.is_playing
    assert hw.camera_source.get_current_frame_parameters().as_dict() == before_camera
    # ground truth on the detector: the plan's exposure saturates a pixel, the largest safe one does not
    from nion.utils import Geometry

    hw.stem_controller.probe_position = Geometry.FloatPoint(*plan.start)
    try:
        assert float(np.max(raw_frame(hw.camera_source, 50.0).data)) >= saturation
        safe = np.asarray(raw_frame(hw.camera_source, safe_ms).data)
        assert float(safe.max()) < saturation
        # per detector pixel, not per summed channel: the row-summed spectrum is above the level at safe_ms
        assert float(safe.sum(axis=-2).max()) > saturation
    finally:
        hw.camera_source.set_current_frame_parameters(hw.camera_source.get_frame_parameters_from_dict(before_camera))


TILTS_3 = [[0.0, 0.0], [10.0, -5.0], [-10.0, 5.0]]
TILT_PLAN = dict(tilts_deg=TILTS_3, frames_per_tilt=3, size_px=64, dwell_us=2.0, fov_nm=8.0, settle_s=0.2)


def test_tilt_series_refused_at_check_on_usim(swift: Any, service: PipelineService, tmp_path: Path) -> None:
    hw = scripting.find_hardware("usim", need_camera=False)
    plan = scripting.make_plan("tilt-series", TILT_PLAN)
    check = scripting.check(plan, hw)
    (problem,) = check.problems
    assert "StageOutA/StageOutB" in problem and "\n" not in problem and "RuntimeError" not in problem
    with pytest.raises(PlanError, match="StageOutA/StageOutB"):
        scripting.start("tilt-series", hardware=hw, endpoint=service.frame_endpoint, plan=plan)
    assert not list((tmp_path / "sessions").glob("*.h5"))


@pytest.fixture
def usim_with_tilt(swift: Any) -> Iterator[Any]:
    """usim with StageOutA/StageOutB controls whose stage lands 0.01 deg past the target, like a real stage."""
    hw = scripting.find_hardware("usim", need_camera=False)
    instrument = hw.stem_controller
    controls = [instrument.create_control(n) for n in ("StageOutA", "StageOutB")]
    for control in controls:
        instrument.add_control(control)
    original = instrument.SetValAndConfirm
    landing_error = math.radians(0.01)

    def set_val_and_confirm(name: str, value: float, tolerance: float, timeout_ms: int) -> bool:
        return bool(original(name, value + landing_error if name.startswith("StageOut") else value, tolerance,
                             timeout_ms))

    instrument.SetValAndConfirm = set_val_and_confirm
    try:
        yield hw
    finally:
        del instrument.SetValAndConfirm
        for control in controls:
            instrument.value_manager.remove_control(control)


def test_tilt_series_3x3_on_usim_with_tilt_controls_records_the_readback(
        usim_with_tilt: Any, service: PipelineService) -> None:
    hw = usim_with_tilt
    run = scripting.start("tilt-series", hardware=hw, endpoint=service.frame_endpoint, **TILT_PLAN)
    assert run.wait(300) == "complete", run.error
    (path,) = service.wait_for_sessions(1, timeout_s=120)
    with SessionReader(path) as r:
        assert r.status == "complete" and r.kind == "tilt_series" and r.n_frames == 9
        table = r.frame_table()
        settings = r.settings
    readback = np.asarray(run.procedure.readback_deg)
    np.testing.assert_allclose(readback, np.asarray(TILTS_3) + 0.01, atol=1e-9)  # where the stage went
    np.testing.assert_allclose(table["alpha_deg"], np.repeat(readback[:, 0], 3))
    np.testing.assert_allclose(table["beta_deg"], np.repeat(readback[:, 1], 3))
    assert not np.allclose(table["alpha_deg"], np.repeat(np.asarray(TILTS_3)[:, 0], 3))  # not the plan's angles
    assert settings["beam_current_pA"] == pytest.approx(200.0)
    assert settings["nion"]["instrument_id"] == "usim_stem_controller"
    ok, alpha = hw.stem_controller.TryGetVal("StageOutA")
    # back at the start (0 deg), within the fixture stage's landing error of 0.01 deg per move (Check and Start
    # each move 0.5 deg and back; each return lands on the previous read-back + 0.01)
    assert ok and math.degrees(alpha) == pytest.approx(0.0, abs=0.05)


def test_tilt_series_3x3_on_the_stemlive_simulator(swift: Any, service: PipelineService) -> None:
    hw = scripting.find_hardware("stemlive", need_camera=False)
    start = (math.degrees(hw.stem_controller.stage_target("StageOutA")),)
    run = scripting.start("tilt-series", hardware=hw, endpoint=service.frame_endpoint, **TILT_PLAN)
    assert run.wait(300) == "complete", run.error
    (path,) = service.wait_for_sessions(1, timeout_s=120)
    with SessionReader(path) as r:
        table = r.frame_table()
        assert r.n_frames == 9
    readback = np.asarray(run.procedure.readback_deg)
    np.testing.assert_allclose(table["alpha_deg"], np.repeat(readback[:, 0], 3))
    # the simulated stage's encoder read-back (its own model, not the plan) within the confirm tolerance
    np.testing.assert_allclose(readback, TILTS_3, atol=0.05)
    # and the stage back at the tilt it was found at
    assert math.degrees(hw.stem_controller.stage_target("StageOutA")) == pytest.approx(start[0])


@contextlib.contextmanager
def real_time(name: str, swift: Any) -> Iterator[None]:
    """usim paces itself in real time; the stemlive simulator is switched to real time for a timing test."""
    clock = swift.instrument.clock
    scale = clock.time_scale
    if name == "stemlive":
        clock.time_scale = 1.0
    try:
        yield
    finally:
        clock.time_scale = scale


@pytest.mark.grid  # ~25 s with real-time pacing; CI runs it after the default suite (-m grid)
@pytest.mark.parametrize("name", INSTRUMENTS)
@pytest.mark.parametrize("procedure", ["eels-line", "tilt-series"])
def test_plan_time_estimate_within_20_percent_of_the_run(swift: Any, service: PipelineService, name: str,
                                                         procedure: str, usim_tilt: Any) -> None:
    hw = scripting.find_hardware(name, need_camera=procedure != "tilt-series")
    # longer than the must-show line (6 x 10 spectra) so that one scheduler hiccup on a shared machine is not 20 %
    settings = dict(EELS_LINE[name], points=6, frames_per_point=10, batch=10) if procedure == "eels-line" else \
        dict(TILT_PLAN, dwell_us=20.0)
    if procedure == "eels-line" and name == "stemlive":
        # exposures, not the simulator's arithmetic, make up the run (as at a microscope)
        settings["exposure_ms"] = 50.0
    ratios = []
    with real_time(name, swift):
        # one retry: the machine running the suite is shared, and a run of a few seconds can lose 20 % to others
        for attempt in range(2):
            run = scripting.start(procedure, hardware=hw, endpoint=service.frame_endpoint, **settings)
            t0 = time.perf_counter()
            assert run.wait(300) == "complete", run.error
            # the estimate covers the time the instrument is busy; the session's end then waits for the analysis
            assert run.procedure.released_at is not None
            measured = run.procedure.released_at - t0
            ratios.append(run.check.duration_s / measured)
            service.wait_for_sessions(attempt + 1, timeout_s=300)  # its analysis must not load the next Check
            if abs(ratios[-1] - 1.0) <= 0.2:
                break
    print(f"{procedure} on {name}: estimate / measured run {[round(r, 3) for r in ratios]}")
    assert abs(ratios[-1] - 1.0) <= 0.2, f"estimate / measured run: {ratios}"


@pytest.fixture
def usim_tilt(request: pytest.FixtureRequest, swift: Any) -> Iterator[Any]:
    """Tilt controls on usim for the tilt timing test (nothing for the others)."""
    if request.node.callspec.params.get("procedure") == "tilt-series" and \
            request.node.callspec.params.get("name") == "usim":
        yield request.getfixturevalue("usim_with_tilt")
    else:
        yield None


def test_eels_line_through_the_panel_on_usim(swift: Any, service: PipelineService,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The Vibrational EELS panel, usim chosen in its device chooser: Check on the instrument, Start, the same
    procedure; parked probe at every exposure, camera stopped and probe back afterwards, 1 eV channels recorded."""
    from nion.swift import Panel
    from swift_harness import document_controller_for_tests, pump

    from nionswift_plugin.stemlive import panels
    from nionswift_plugin.stemlive.instruments import DeviceChoice

    monkeypatch.setenv("STEMLIVE_RESULT_ENDPOINT", "none")
    hw = scripting.find_hardware("usim", need_camera=True)
    stem, camera = hw.stem_controller, hw.camera_source
    before_probe = stem.probe_position
    with document_controller_for_tests() as document_controller:
        panel = Panel.PanelManager().create_panel_content(document_controller, panels.EELS_PANEL_ID, "eels",
                                                          ["left"], "left", {})
        try:
            model = panel.model
            model.refresh_devices(DeviceChoice(instrument="usim_stem_controller"))
            assert model.device_choice.camera == "usim_eels_camera"
            model.start_text, model.end_text, model.step_text, model.points_text = "0.5, 0.1", "0.5, 0.9", "", "4"
            model.frames_text, model.exposure_text, model.survey_size_text = "5", "0.2", "128"
            model.endpoint = service.frame_endpoint
            with probe_states_during_exposures(camera, stem) as states:
                assert model.start(), model.status_text
                pump(document_controller, lambda: not model.running, 300)
            assert model.last_status == "complete", model.status_text
        finally:
            panel.close()
    assert len(states) >= 20 and set(states) == {"parked"}
    assert not camera.is_playing and stem.probe_position == before_probe
    (path,) = service.wait_for_sessions(1, timeout_s=300)
    with SessionReader(path) as r:
        assert r.status == "complete" and r.n_spectra == 20
        assert float(r.attrs("eels")["dispersion_meV"]) == pytest.approx(1000.0)
        assert r.settings["camera_device"] == "usim_eels_camera"


@pytest.mark.parametrize("name", INSTRUMENTS)
def test_abort_leaves_the_instrument_as_it_was(swift: Any, service: PipelineService, name: str) -> None:
    hw = scripting.find_hardware(name, need_camera=True)
    stem, scan, camera = hw.stem_controller, hw.scan_source, hw.camera_source
    from nion.utils import Geometry

    stem.probe_position = Geometry.FloatPoint(0.25, 0.75)  # the user's parked probe
    before_scan = scan.get_current_frame_parameters().as_dict()
    before_camera = camera.get_current_frame_parameters().as_dict()
    settings = dict(EELS_LINE[name], points=20, frames_per_point=20)
    with real_time(name, swift):
        run = scripting.start("eels-line", hardware=hw, endpoint=service.frame_endpoint, **settings)
        assert wait_until(lambda: len(run.procedure.probe_states) >= 2 or run.done.is_set(), 120)
        run.abort()
        assert run.wait(120) == "aborted", run.error
    assert wait_until(lambda: not camera.is_playing)
    assert camera.get_current_frame_parameters().as_dict() == before_camera
    after_scan = scan.get_current_frame_parameters().as_dict()
    assert {k: after_scan[k] for k in before_scan} == before_scan
    assert stem.probe_position == Geometry.FloatPoint(0.25, 0.75) and stem.probe_state == "parked"
    assert not scan.is_playing
    (path,) = service.wait_for_sessions(1, timeout_s=300)
    with SessionReader(path) as r:
        assert r.status == "aborted" and 0 < r.n_spectra < 400


def test_eels_map_on_usim(swift: Any, service: PipelineService) -> None:
    hw = scripting.find_hardware("usim", need_camera=True)
    run = scripting.start("eels-map", hardware=hw, endpoint=service.frame_endpoint, start=[0.4, 0.4],
                          end=[0.6, 0.6], points=3, rows=2, frames_per_point=3, exposure_ms=0.2, survey_size_px=64)
    assert run.wait(300) == "complete", run.error
    (path,) = service.wait_for_sessions(1, timeout_s=300)
    with SessionReader(path) as r:
        assert r.kind == "eels_map" and r.status == "complete" and r.n_spectra == 18
        assert list(r.settings["scan_shape"]) == [2, 3]
        np.testing.assert_array_equal(np.bincount(r.spectrum_table()["point_index"]), np.full(6, 3))


def test_start_refuses_on_the_instrument_too(swift: Any, service: PipelineService, tmp_path: Path) -> None:
    """A procedure started without a Check (a script, a changed exposure) tests the plan on the instrument at Start:
    refused, nothing recorded, the instrument as it was."""
    from stemlive.live.wire.transport import FrameSender

    hw = scripting.find_hardware("usim", need_camera=True)
    sender = FrameSender(service.frame_endpoint)
    try:
        eels = scripting.make_procedure(scripting.make_plan("eels-line", {**EELS_LINE["usim"], "exposure_ms": 50.0}),
                                        hw, sender)
        with pytest.raises(PlanError, match=r"would saturate: brightest pixel about .* use at most"):
            eels.run()
        tilt = scripting.make_procedure(scripting.make_plan("tilt-series", TILT_PLAN), hw, sender)
        with pytest.raises(PlanError, match="StageOutA/StageOutB"):
            tilt.run()
    finally:
        sender.close()
    assert not eels.stream.started and not tilt.stream.started
    assert not hw.camera_source.is_playing and hw.stem_controller.probe_state == "parked"
    assert not list((tmp_path / "sessions").glob("*.h5"))


@pytest.mark.parametrize("name", INSTRUMENTS)
def test_scan_channel_chosen_by_name(swift: Any, name: str) -> None:
    """The procedures take the channel they were given by name, whichever channels are enabled."""
    from stemlive.live.wire.transport import FrameSender

    hw = scripting.find_hardware(name, need_camera=False)
    scan = hw.scan_source
    names = [scan.get_channel_name(i) for i in range(scan.channel_count)]
    assert hw.channel == names.index("HAADF")
    other = scripting.find_hardware(name, need_camera=False, channel_name=names[1])
    assert other.channel == 1
    enabled = [scan.get_channel_enabled(i) for i in range(scan.channel_count)]
    before = scan.get_current_frame_parameters()
    sender = FrameSender("tcp://127.0.0.1:1")  # never used: no session is started
    try:
        procedure = scripting.make_procedure(scripting.make_plan("tilt-series", TILT_PLAN), other, sender)
        fp = procedure.scan_parameters(32, 1.0, 8.0)
        fp.enabled_channel_indexes = [0]  # what a recording of HAADF alone leaves in the frame parameters
        xdata, _ = procedure.scan_xdata(fp)
    finally:
        sender.close()
        scan.set_current_frame_parameters(before)
        for i, on in enumerate(enabled):
            scan.set_channel_enabled(i, on)
    assert xdata.metadata["hardware_source"]["channel_name"] == names[1]
    assert procedure.stream.settings["haadf_channel"] == names[1]
