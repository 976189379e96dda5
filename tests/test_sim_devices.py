"""Tests of the simulated Nion devices (stemlive.simulators.devices) and the simulation clock.

Most tests use a stub physics backend so that they check the device mechanics (stage settling, confirm, probe
position -> sample position, time scaling, ground truth) independently of the physics modules; one test per
device runs the real physics when it is importable.
"""

from __future__ import annotations

import importlib.util
import math
import time
from typing import Any

import numpy as np
import pytest
from nion.utils import Geometry

from stemlive.simulators import devices
from stemlive.simulators import instrument as sim_instrument
from stemlive.simulators.clock import SimulationClock
from stemlive.simulators.truth import GroundTruth

pytestmark = pytest.mark.swift

SETTLE_S = 2.0
HYSTERESIS_DEG = (1.1, -2.0)


class StubPhysics:
    """Deterministic stand-in for PhysicsBackend: readable images/spectra that encode their inputs."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.ground_truth = GroundTruth()
        self._settle_s = settle_s
        self._actual = (0.0, 0.0)
        self.haadf_calls: list[dict[str, Any]] = []
        self.eels_calls: list[dict[str, Any]] = []

    def settle_time_s(self) -> float:
        return self._settle_s

    def move_tilt(self, alpha_nominal_deg: float, beta_nominal_deg: float, t_s: float) -> dict[str, float]:
        if abs(alpha_nominal_deg) > 35:
            raise ValueError("beyond limits")
        self._actual = (alpha_nominal_deg + HYSTERESIS_DEG[0], beta_nominal_deg + HYSTERESIS_DEG[1])
        return {"nominal_alpha_deg": alpha_nominal_deg, "nominal_beta_deg": beta_nominal_deg,
                "actual_alpha_deg": self._actual[0], "actual_beta_deg": self._actual[1]}

    def actual_tilt_deg(self, t_s: float) -> tuple[float, float]:
        return self._actual

    def field_shift_nm(self, t_s: float) -> tuple[float, float]:
        return 0.0, 0.0

    def render_haadf(self, **kw: Any) -> tuple[np.ndarray, Any]:
        self.haadf_calls.append(kw)
        ny, nx = kw["shape"]
        image = np.full((ny, nx), kw["dwell_us"], np.float32)
        return image, {"alpha_deg": kw["alpha_deg"], "beta_deg": kw["beta_deg"], "t_start_s": kw["t_start_s"]}

    def eels_spectra(self, **kw: Any) -> tuple[np.ndarray, Any]:
        self.eels_calls.append(kw)
        x = np.atleast_1d(kw["x_nm"])
        spectrum = np.ones((x.size, kw["n_channels"]), np.float32)
        spectrum[:, 0] = x  # encodes the probe position
        spectrum[:, 1] = np.atleast_1d(kw["y_nm"])
        return spectrum, {"x_nm": x, "t_s": np.atleast_1d(kw["t_s"])}

    def eels_settings(self) -> dict[str, float]:
        return {"n_channels": 256, "dispersion_meV": 0.44, "energy_offset_meV": -20.0, "exposure_ms": 300.0}

    def beam_current_A(self) -> float:
        return 17e-12


class StubScenario:
    name = "stub"
    seed = 0
    time_scale = 0.0


def make_instrument(time_scale: float = 0.0, settle_s: float = SETTLE_S) -> sim_instrument.StemliveInstrument:
    return sim_instrument.StemliveInstrument(StubScenario(), time_scale=time_scale, physics=StubPhysics(settle_s))


# ------------------------------------------------------------------------------------------------- clock


def test_clock_fast_mode_only_advances_explicitly() -> None:
    clock = SimulationClock(0.0)
    t0 = clock.now()
    time.sleep(0.01)
    assert clock.now() == t0
    clock.elapse(1.5)
    assert clock.now() == pytest.approx(t0 + 1.5)
    wall = time.perf_counter()
    assert clock.sleep(100.0)
    assert time.perf_counter() - wall < 0.05
    assert clock.now() == pytest.approx(t0 + 101.5)
    assert clock.wall_seconds(3.0) == 0.0


def test_clock_scaled_mode_flows_with_wall_time() -> None:
    clock = SimulationClock(10.0)
    t0 = clock.now()
    wall = time.perf_counter()
    clock.sleep(0.5)  # 0.05 s of wall time
    elapsed = time.perf_counter() - wall
    assert 0.045 <= elapsed < 0.3
    assert clock.now() - t0 == pytest.approx(elapsed * 10, rel=0.2)
    clock.elapse(100.0)  # paced by the caller: no jump
    assert clock.now() - t0 < 5.0
    assert clock.wall_seconds(1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        SimulationClock(-1.0)


# ------------------------------------------------------------------------------------------------- stage


def test_stage_readback_settles_and_confirm_waits() -> None:
    instrument = make_instrument()
    target = math.radians(20.0)
    t0 = instrument.clock.now()
    assert instrument.SetVal("StageOutA", target)
    # not yet there: the encoder approaches over the settling time
    assert instrument.GetVal("StageOutA") == pytest.approx(0.0)
    mid = instrument.stage_readback("StageOutA", t0 + SETTLE_S / 4)
    assert 0.0 < mid < target
    assert not instrument.is_stage_settled()
    # a timeout shorter than the settling time fails to confirm (and raises through set_control_output)
    assert not instrument.SetValAndConfirm("StageOutA", target, 1.0, 100)
    with pytest.raises(TimeoutError):
        instrument.set_control_output("StageOutB", math.radians(-10.0), {"confirm": True, "confirm_timeout": 0.1})
    # confirm with a long timeout waits (simulated) until within tolerance
    assert instrument.SetValAndConfirm("StageOutA", target, 1.0, 16000)
    assert abs(instrument.GetVal("StageOutA") - target) <= sim_instrument.STAGE_TOLERANCE["StageOutA"]
    assert instrument.clock.now() - t0 > 0.5 * SETTLE_S
    instrument.set_control_output("StageOutB", math.radians(-10.0), {"confirm": True})
    assert instrument.GetVal("StageOutB") == pytest.approx(math.radians(-10.0), abs=1e-5)
    # SetValWait waits for the full settling
    assert instrument.SetValWait("StageOutX", 2e-6, 10000)
    assert instrument.GetVal("StageOutX") == 2e-6


def test_stage_confirm_sleeps_in_real_time_mode() -> None:
    instrument = make_instrument(time_scale=1.0, settle_s=0.2)
    wall = time.perf_counter()
    instrument.set_control_output("StageOutA", math.radians(5.0), {"confirm": True})
    elapsed = time.perf_counter() - wall
    assert 0.08 < elapsed < 0.6
    fast = make_instrument(time_scale=0.0, settle_s=200.0)
    wall = time.perf_counter()
    fast.set_control_output("StageOutA", math.radians(5.0), {"confirm": True, "confirm_timeout": 1000.0})
    assert time.perf_counter() - wall < 0.1


def test_nominal_vs_actual_angles_and_truth() -> None:
    instrument = make_instrument()
    instrument.set_control_output("StageOutA", math.radians(-14.3), {"confirm": True})
    instrument.set_control_output("StageOutB", math.radians(-22.9), {"confirm": True})
    instrument.clock.sleep(SETTLE_S)
    assert math.degrees(instrument.GetVal("StageOutA")) == pytest.approx(-14.3)
    assert math.degrees(instrument.GetVal("StageOutB")) == pytest.approx(-22.9)
    alpha, beta = instrument.actual_tilt_deg()
    assert alpha == pytest.approx(-14.3 + HYSTERESIS_DEG[0])
    assert beta == pytest.approx(-22.9 + HYSTERESIS_DEG[1])
    tilts = instrument.ground_truth.get("tilt")
    assert tilts[-1]["nominal_alpha_deg"] == pytest.approx(-14.3)
    assert tilts[-1]["actual_beta_deg"] == pytest.approx(-22.9 + HYSTERESIS_DEG[1])
    # beyond the stage limits: refused, no move
    assert not instrument.SetVal("StageOutA", math.radians(50.0))
    assert math.degrees(instrument.stage_target("StageOutA")) == pytest.approx(-14.3)
    # other controls still go to usim's value manager
    assert instrument.GetVal("BeamCurrent") == pytest.approx(17e-12)
    assert instrument.InformControl("StageOutZ", 1e-7)
    assert instrument.GetVal("StageOutZ") == 1e-7


# ------------------------------------------------------------------------------------------------- devices


@pytest.fixture()
def configuration() -> Any:
    config = devices.SimulatedInstrumentConfiguration(StubScenario(), physics=StubPhysics(), ronchigram=False)
    yield config
    config.close()


def test_probe_position_maps_to_spectrum_location(configuration: Any) -> None:
    instrument = configuration._instrument
    simulator = configuration.eels_simulator
    instrument._update_scan_context(Geometry.IntSize(256, 256), Geometry.FloatPoint(1.0, 2.0), 64.0, 0.0)
    area = Geometry.IntRect.from_tlbr(*instrument.camera_readout_area("eels"))
    for fx, expected_x in ((0.0, 2.0 - 32.0), (0.5, 2.0), (0.75, 2.0 + 16.0)):
        xdata = simulator.get_frame_data(area, Geometry.IntSize(1, 1), 0.3, instrument.scan_context,
                                         Geometry.FloatPoint(y=0.25, x=fx))
        row_sum = xdata.data.sum(axis=0)
        assert row_sum[0] == pytest.approx(expected_x, rel=1e-5)
        assert row_sum[1] == pytest.approx(1.0 - 16.0, rel=1e-5)
    # energy axis in eV at meV dispersion
    cal = xdata.dimensional_calibrations[1]
    assert cal.units == "eV"
    assert cal.scale == pytest.approx(0.00044)
    assert cal.offset == pytest.approx(-0.020)
    assert xdata.data.shape == (16, 256)
    # binning sums rows and channels
    binned = simulator.get_frame_data(area, Geometry.IntSize(8, 8), 0.3, instrument.scan_context, None)
    assert binned.data.shape == (2, 32)
    assert len(instrument.ground_truth.get("spectrum")) == 4
    # the clock advanced by the exposures (fast mode)
    assert configuration.clock.now() == pytest.approx(4 * 0.3)


def test_scan_frame_uses_actual_tilt_and_advances_clock(configuration: Any) -> None:
    instrument = configuration._instrument
    physics = instrument.physics
    instrument.set_control_output("StageOutA", math.radians(12.6), {"confirm": True})
    instrument.clock.sleep(SETTLE_S)
    box = configuration._scan_module.scan_box
    box.reset_frame()
    t0 = instrument.clock.now()
    from nion.device_kit import ScanDevice

    params = ScanDevice.ScanFrameParameters(pixel_size=(64, 32), pixel_time_us=4, fov_nm=16.0)
    box.current_channel_id = 0
    haadf = box.generate_scan_data(instrument, params)
    box.current_channel_id = 1
    maadf = box.generate_scan_data(instrument, params)
    assert len(physics.haadf_calls) == 1  # one render per frame for all channels
    assert haadf.shape == (64, 32)
    assert maadf == pytest.approx(0.5 * haadf)
    assert physics.haadf_calls[0]["alpha_deg"] == pytest.approx(12.6 + HYSTERESIS_DEG[0])
    assert instrument.clock.now() - t0 == pytest.approx((32 * 4 + instrument.flyback_us) * 64 * 1e-6)
    assert instrument.ground_truth.get("frame")[-1]["t_start_s"] == pytest.approx(t0)


def _acquire_through_swift(time_scale: float, size: int, dwell_us: float) -> tuple[float, Any]:
    """Record one frame through Swift's hardware-source API; return (wall seconds, xdata)."""
    from nion.swift.test import TestContext

    TestContext.TestSetup()
    config = devices.SimulatedInstrumentConfiguration(StubScenario(), time_scale=time_scale, physics=StubPhysics(),
                                                      ronchigram=False)
    with devices.run_headless(config) as hw:
        params = hw.scan.get_current_frame_parameters()
        params.size = Geometry.IntSize(size, size)
        params.pixel_time_us = dwell_us
        hw.scan.record_immediate(params)  # warm-up
        wall = time.perf_counter()
        xdatas = hw.scan.record_immediate(params)
        return time.perf_counter() - wall, xdatas


def test_time_scaling_of_a_scan_frame() -> None:
    # 128 x 128 at 20 us: (128 * 20 + 100 flyback?) -> ~0.33-0.35 s of physical time
    fast_s, xdatas = _acquire_through_swift(0.0, 128, 20.0)
    assert xdatas[0].data.shape == (128, 128)
    real_s, _ = _acquire_through_swift(1.0, 128, 20.0)
    physical_s = 128 * 128 * 20e-6
    assert fast_s < 0.25 * physical_s
    assert 0.8 * physical_s < real_s < 2.5 * physical_s


@pytest.mark.skipif(importlib.util.find_spec("stemlive.simulators.haadf") is None
                    or importlib.util.find_spec("stemlive.simulators.stage") is None,
                    reason="physics modules haadf/stage not available yet")
def test_real_physics_haadf_frame() -> None:
    config = devices.SimulatedInstrumentConfiguration("default", ronchigram=False)
    try:
        instrument = config._instrument
        instrument.set_control_output("StageOutA", math.radians(6.3), {"confirm": True})
        box = config._scan_module.scan_box
        box.reset_frame()
        from nion.device_kit import ScanDevice

        params = ScanDevice.ScanFrameParameters(pixel_size=(64, 64), pixel_time_us=4, fov_nm=4.0)
        image = box.generate_scan_data(instrument, params)
        assert image.shape == (64, 64) and np.isfinite(image).all() and image.std() > 0
    finally:
        config.close()


def test_real_physics_eels_spectrum() -> None:
    pytest.importorskip("stemlive.simulators.eels_model")
    pytest.importorskip("stemlive.simulators.scenario")
    config = devices.SimulatedInstrumentConfiguration("eels_mos2_wse2", ronchigram=False)
    try:
        instrument = config._instrument
        area = Geometry.IntRect.from_tlbr(*instrument.camera_readout_area("eels"))
        xdata = config.eels_simulator.get_frame_data(area, Geometry.IntSize(1, 1), 0.3, instrument.scan_context,
                                                     None)
        spectrum = xdata.data.sum(axis=0)
        cal = xdata.dimensional_calibrations[1]
        zlp_eV = cal.convert_to_calibrated_value(int(np.argmax(spectrum)))
        assert abs(zlp_eV) < 0.005  # zero-loss peak within 5 meV of 0
    finally:
        config.close()
