"""Simulated Nion instrument, scan and EELS camera built on ``nion.device_kit``.

The devices are the Nion Swift side of the simulator: they register as a STEM controller
(``stemlive_stem_controller``), a scan device (``stemlive_scan``) and an EELS camera (``stemlive_eels_camera``) and
produce data from the stemlive physics (:mod:`stemlive.simulators.haadf`, :mod:`stemlive.simulators.eels_model`,
:mod:`stemlive.simulators.stage`). All physics calls go through :class:`PhysicsBackend`, one small method each, so
the device code stays free of physics and tests can swap in a stub.

Time is simulated (:class:`~stemlive.simulators.clock.SimulationClock`): a scan frame takes
``(nx * dwell + flyback) * ny``, a camera frame its exposure, a stage move its settling time; the wall-clock
duration is that divided by the scenario's ``time_scale`` (nothing sleeps when it is 0).

Implementation notes (nionswift-instrumentation 23.6, pinned ``<23.7`` in setup.cfg):

* ``device_kit.ScanDevice.Device.read_partial`` paces frames with ``time.perf_counter`` against the frame's
  ``start_time``; :class:`StemliveScanDevice` rescales that start time (``_Device__frame``) for ``time_scale != 1``.
* ``device_kit.CameraDevice.Camera`` sleeps the exposure in the private ``__direct_acquire``;
  :class:`StemliveCamera` overrides ``_Camera__direct_acquire`` with the same logic and a scaled wait.
  ``tests/test_sim_devices.py`` fails if a device_kit update breaks either hook.
"""

from __future__ import annotations

import contextlib
import copy
import gettext
import logging
import math
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from nion.data import Calibration, DataAndMetadata
from nion.device_kit import CameraDevice, ScanDevice
from nion.instrumentation import camera_base, scan_base, stem_controller
from nion.usim_device import InstrumentDevice as UsimInstrumentDevice
from nion.usim_device import RonchigramCameraSimulator, SampleSimulator
from nion.usim_device import ScanDevice as UsimScanDevice
from nion.utils import DateTime, Geometry, Registry
from numpy.typing import NDArray

from stemlive.simulators.clock import SimulationClock

_ = gettext.gettext
_LOG = logging.getLogger(__name__)

__all__ = [
    "EELS_CAMERA_ID",
    "INSTRUMENT_ID",
    "RONCHIGRAM_CAMERA_ID",
    "SCAN_DEVICE_ID",
    "STAGE_CONTROLS",
    "EELSSpectrometerSimulator",
    "HAADFScanBox",
    "PhysicsBackend",
    "SimulatedInstrumentConfiguration",
    "StemliveCamera",
    "StemliveInstrument",
    "StemliveScanDevice",
    "resolve_scenario",
    "run_headless",
]

INSTRUMENT_ID = "stemlive_stem_controller"
SCAN_DEVICE_ID = "stemlive_scan"
EELS_CAMERA_ID = "stemlive_eels_camera"
RONCHIGRAM_CAMERA_ID = "stemlive_ronchigram_camera"

#: Stage controls (Nion data-record names): tilts in radians, positions in metres.
STAGE_CONTROLS: tuple[str, ...] = ("StageOutA", "StageOutB", "StageOutX", "StageOutY", "StageOutZ")
_TILT_CONTROLS = ("StageOutA", "StageOutB")
#: Default confirm tolerance per control (multiplied by the caller's tolerance factor).
STAGE_TOLERANCE: dict[str, float] = {
    "StageOutA": math.radians(0.01), "StageOutB": math.radians(0.01),
    "StageOutX": 1e-9, "StageOutY": 1e-9, "StageOutZ": 1e-9,
}
#: Time constants of the readback approach: the remaining error decays as exp(-5 t / settle_time).
_SETTLE_RATE = 5.0

_DEFAULT_EELS = {"n_channels": 2048, "dispersion_meV": 0.44, "energy_offset_meV": -20.0, "exposure_ms": 300.0}


def resolve_scenario(scenario: Any) -> Any:
    """Return a ``Scenario``: load a built-in name or path, or pass a scenario object through."""
    if isinstance(scenario, str):
        from stemlive.simulators.scenario import load_scenario

        return load_scenario(scenario)
    return scenario


# ------------------------------------------------------------------------------------------------------- physics


class PhysicsLike(Protocol):
    """What the devices need from the physics (see :class:`PhysicsBackend`)."""

    ground_truth: Any

    def settle_time_s(self) -> float: ...

    def move_tilt(self, alpha_nominal_deg: float, beta_nominal_deg: float, t_s: float) -> Any: ...

    def actual_tilt_deg(self, t_s: float) -> tuple[float, float]: ...

    def field_shift_nm(self, t_s: float) -> tuple[float, float]: ...

    def render_haadf(self, *, alpha_deg: float, beta_deg: float, shape: tuple[int, int], fov_nm: float,
                     dwell_us: float, center_nm: tuple[float, float], rotation_rad: float,
                     t_start_s: float) -> tuple[NDArray[np.float32], Any]: ...

    def eels_spectra(self, *, x_nm: float | NDArray[Any], y_nm: float | NDArray[Any], exposure_ms: float,
                     n_channels: int, dispersion_meV: float, energy_offset_meV: float,
                     t_s: float | NDArray[Any]) -> tuple[NDArray[np.float32], Any]: ...

    def eels_settings(self) -> dict[str, float]: ...

    def beam_current_A(self) -> float: ...


class PhysicsBackend:
    """The stemlive physics behind the devices; every physics call is one small method here.

    Parameters
    ----------
    scenario
        A ``stemlive.simulators.scenario.Scenario``.
    """

    def __init__(self, scenario: Any) -> None:
        from stemlive.simulators.stage import StageModel
        from stemlive.simulators.truth import GroundTruth

        self.scenario = scenario
        self._rng = np.random.default_rng(getattr(scenario, "seed", 0))
        self.stage = StageModel(scenario.stage, seed=scenario.stage_seed)
        self._haadf: Any = None
        self._eels: Any = None
        self.ground_truth = GroundTruth(scenario=scenario.name, seed=scenario.seed)

    # built lazily so that a missing or slow module only affects the feature that needs it
    @property
    def haadf(self) -> Any:
        """The ``HAADFSimulator``."""
        if self._haadf is None:
            from stemlive.simulators.haadf import HAADFSimulator

            self._haadf = HAADFSimulator(self.scenario)
        return self._haadf

    @property
    def eels(self) -> Any:
        """The ``VibrationalEELSSimulator``."""
        if self._eels is None:
            from stemlive.simulators.eels_model import VibrationalEELSSimulator

            self._eels = VibrationalEELSSimulator(self.scenario, seed=getattr(self.scenario, "seed", 0))
        return self._eels

    def settle_time_s(self) -> float:
        """Settling time of a stage move, in simulated seconds."""
        return float(self.scenario.stage.settle_time_s)

    def move_tilt(self, alpha_nominal_deg: float, beta_nominal_deg: float, t_s: float) -> Any:
        """Command nominal angles on the stage model; return its ``TiltState`` (raises ValueError beyond limits)."""
        return self.stage.move_to(alpha_nominal_deg, beta_nominal_deg, t_s=t_s)

    def actual_tilt_deg(self, t_s: float) -> tuple[float, float]:
        """Actual (alpha, beta) in degrees at ``t_s``, including the settling transient."""
        a, b = self.stage.actual_angles_deg(t_s)
        return float(a), float(b)

    def field_shift_nm(self, t_s: float) -> tuple[float, float]:
        """Non-eucentric (dy, dx) shift of the field of view, in nm, at ``t_s``."""
        dy, dx = self.stage.fov_shift_nm(t_s)
        return float(dy), float(dx)

    def render_haadf(self, *, alpha_deg: float, beta_deg: float, shape: tuple[int, int], fov_nm: float,
                     dwell_us: float, center_nm: tuple[float, float], rotation_rad: float,
                     t_start_s: float) -> tuple[NDArray[np.float32], Any]:
        """Render one HAADF frame at actual angles; return (image, FrameTruth)."""
        return typing.cast(tuple[NDArray[np.float32], Any], self.haadf.render_frame(
            alpha_deg=alpha_deg, beta_deg=beta_deg, shape=shape, fov_nm=fov_nm, dwell_us=dwell_us,
            center_nm=center_nm, rotation_rad=rotation_rad, t_start_s=t_start_s, rng=self._rng))

    def eels_spectra(self, *, x_nm: Any, y_nm: Any, exposure_ms: float, n_channels: int,
                     dispersion_meV: float, energy_offset_meV: float, t_s: Any) -> tuple[NDArray[np.float32], Any]:
        """Spectra (k, n_channels) at probe positions / times (broadcast to k); return (counts, truths)."""
        return typing.cast(tuple[NDArray[np.float32], Any], self.eels.spectra(
            x_nm=x_nm, y_nm=y_nm, exposure_ms=exposure_ms, n_channels=n_channels, dispersion_meV=dispersion_meV,
            energy_offset_meV=energy_offset_meV, t_s=t_s))

    def eels_settings(self) -> dict[str, float]:
        """Spectrometer defaults (n_channels, dispersion_meV, energy_offset_meV, exposure_ms) from the scenario."""
        from stemlive.simulators.eels_model import eels_config

        cfg = eels_config(self.scenario)
        return {key: float(cfg.get(key, default)) for key, default in _DEFAULT_EELS.items()}

    def beam_current_A(self) -> float:
        """Probe current (A) of the HAADF settings."""
        return float(self.scenario.haadf.beam_current_pA) * 1e-12


# ------------------------------------------------------------------------------------------------------- stage


@dataclass
class _AxisMove:
    """Readback of one stage axis approaching its target after a move."""

    start: float
    target: float
    t0: float = 0.0
    settle_s: float = 0.0

    def readback(self, t_s: float) -> float:
        """Encoder readback at simulated time ``t_s``: exponential approach, exactly on target after settling."""
        if self.settle_s <= 0 or t_s >= self.t0 + self.settle_s:
            return self.target
        f = max(t_s - self.t0, 0.0) / self.settle_s
        frac = (1.0 - math.exp(-_SETTLE_RATE * f)) / (1.0 - math.exp(-_SETTLE_RATE))
        return self.start + (self.target - self.start) * frac

    def time_within(self, tolerance: float) -> float:
        """Simulated time at which the readback is within ``tolerance`` of the target."""
        delta = abs(self.target - self.start)
        if delta <= tolerance or self.settle_s <= 0:
            return self.t0
        # remaining = delta * (1 - frac(f)) <= tol  ->  frac >= 1 - tol/delta
        need = 1.0 - tolerance / delta
        e = math.exp(-_SETTLE_RATE)
        inner = 1.0 - need * (1.0 - e)
        f = -math.log(inner) / _SETTLE_RATE if inner > 0 else 1.0
        return self.t0 + min(max(f, 0.0), 1.0) * self.settle_s


@dataclass
class _StageState:
    axes: dict[str, _AxisMove] = field(default_factory=lambda: {name: _AxisMove(0.0, 0.0) for name in STAGE_CONTROLS})


# ------------------------------------------------------------------------------------------------------- instrument


class StemliveInstrument(UsimInstrumentDevice.Instrument):
    """Simulated STEM controller with a double-tilt stage that settles, backed by stemlive physics.

    A ``nion.device_kit.InstrumentDevice.Instrument`` (through usim's subclass, whose value manager supplies the
    standard controls: EHT, C10, BeamCurrent, ZLPoffset, ...). Stage controls ``StageOutA``/``StageOutB``
    (radians) and ``StageOutX``/``StageOutY``/``StageOutZ`` (metres) read back the *nominal* encoder value, which
    approaches the target over the settling time; the physics sees the *actual* angles from the stage model.

    Parameters
    ----------
    scenario
        A ``Scenario`` or the name/path of one.
    time_scale
        Overrides ``scenario.time_scale`` (1 real time, N faster, 0 as fast as possible).
    physics
        The physics backend (default :class:`PhysicsBackend` of the scenario).
    clock
        A shared clock (default: a new one at ``time_scale``).
    instrument_id
        Registry id of the instrument.
    eels_sensor_height
        Rows of the EELS sensor (non-dispersive direction); its width is the scenario's ``n_channels``.
    eels_n_channels
        Overrides the scenario's ``n_channels`` (sensor width).
    """

    def __init__(self, scenario: Any = "default", *, time_scale: float | None = None,
                 physics: PhysicsLike | None = None, clock: SimulationClock | None = None,
                 instrument_id: str = INSTRUMENT_ID, eels_sensor_height: int = 16,
                 eels_n_channels: int | None = None) -> None:
        self.scenario = resolve_scenario(scenario)
        self.physics: PhysicsLike = physics if physics is not None else PhysicsBackend(self.scenario)
        scale = float(getattr(self.scenario, "time_scale", 0.0) if time_scale is None else time_scale)
        self.clock = clock if clock is not None else SimulationClock(scale)
        self.haadf_generator = HAADFScanDataGenerator(self)
        super().__init__(instrument_id, UsimInstrumentDevice.ValueManager(), UsimInstrumentDevice.AxisManager(),
                         self.haadf_generator)
        self._stage_lock = threading.RLock()
        self._stage = _StageState()
        eels = self.physics.eels_settings()
        self.eels_n_channels = int(eels["n_channels"] if eels_n_channels is None else eels_n_channels)
        self.eels_dispersion_meV = float(eels["dispersion_meV"])
        self.eels_default_exposure_ms = float(eels["exposure_ms"])
        self.eels_sensor_shape = Geometry.IntSize(int(eels_sensor_height), self.eels_n_channels)
        self.flyback_us = float(getattr(getattr(self.scenario, "haadf", None), "flyback_us", 30.0))
        self.SetVal("BeamCurrent", self.physics.beam_current_A())
        self.SetVal("ZLPoffset", float(eels["energy_offset_meV"]) / 1000.0)
        usim_value_manager = typing.cast(UsimInstrumentDevice.ValueManager, self.value_manager)
        usim_value_manager.energy_per_channel_eV = self.eels_dispersion_meV / 1000.0

    @property
    def ground_truth(self) -> Any:
        """The ground-truth recorder (actual tilts, frame truths, spectrum truths)."""
        return self.physics.ground_truth

    # ---- camera geometry

    def camera_sensor_dimensions(self, camera_type: str) -> tuple[int, int]:
        """Sensor (height, width): the EELS sensor is ``16 x n_channels``; the Ronchigram is usim's."""
        if camera_type == "eels":
            return self.eels_sensor_shape.height, self.eels_sensor_shape.width
        return typing.cast(tuple[int, int], super().camera_sensor_dimensions(camera_type))

    def camera_readout_area(self, camera_type: str) -> tuple[int, int, int, int]:
        """Full-sensor readout area (top, left, bottom, right)."""
        if camera_type == "eels":
            return 0, 0, self.eels_sensor_shape.height, self.eels_sensor_shape.width
        return typing.cast(tuple[int, int, int, int], super().camera_readout_area(camera_type))

    # ---- stage

    def stage_readback(self, name: str, t_s: float | None = None) -> float:
        """Nominal (encoder) readback of a stage control at simulated time ``t_s`` (default now)."""
        with self._stage_lock:
            return self._stage.axes[name].readback(self.clock.now() if t_s is None else t_s)

    def stage_target(self, name: str) -> float:
        """Last commanded value of a stage control."""
        with self._stage_lock:
            return self._stage.axes[name].target

    def is_stage_settled(self, t_s: float | None = None) -> bool:
        """True when every stage axis has finished settling."""
        t = self.clock.now() if t_s is None else t_s
        with self._stage_lock:
            return all(ax.readback(t) == ax.target for ax in self._stage.axes.values())

    @property
    def stage_tilt_limits_deg(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The stage's (alpha, beta) tilt limits in degrees (the scenario's ``stage.limits_deg``, symmetric)."""
        a, b = (float(v) for v in self.scenario.stage.limits_deg)
        return (-a, a), (-b, b)

    def actual_tilt_deg(self, t_s: float | None = None) -> tuple[float, float]:
        """Actual (alpha, beta) in degrees at ``t_s`` (default now), from the stage model (hysteresis, settling)."""
        with self._stage_lock:
            return self.physics.actual_tilt_deg(self.clock.now() if t_s is None else t_s)

    def field_center_offset_nm(self, t_s: float | None = None) -> tuple[float, float]:
        """(dy, dx) in nm added to the scan centre: stage X/Y position plus the non-eucentric tilt shift."""
        t = self.clock.now() if t_s is None else t_s
        with self._stage_lock:
            sy, sx = self.physics.field_shift_nm(t)
        y_m = self.stage_readback("StageOutY", t)
        x_m = self.stage_readback("StageOutX", t)
        return sy + y_m * 1e9, sx + x_m * 1e9

    def _start_move(self, name: str, value: float, *, settle: bool = True) -> bool:
        """Start a move of one stage axis; False (and no move) when the stage model rejects the target."""
        t = self.clock.now()
        with self._stage_lock:
            axis = self._stage.axes[name]
            start = axis.readback(t)
            settle_s = self.physics.settle_time_s() if settle and value != start else 0.0
            if name in _TILT_CONTROLS:
                a_nom = math.degrees(float(value) if name == "StageOutA" else self._stage.axes["StageOutA"].target)
                b_nom = math.degrees(float(value) if name == "StageOutB" else self._stage.axes["StageOutB"].target)
                try:
                    state = self.physics.move_tilt(a_nom, b_nom, t)
                except ValueError as exc:
                    _LOG.warning("stage move refused: %s", exc)
                    return False
                self.ground_truth.add_tilt(state, t_s=t, control=name)
            self._stage.axes[name] = _AxisMove(start, float(value), t, settle_s)
        self.property_changed_event.fire(name)
        return True

    def _wait_for_stage(self, name: str, tolerance: float, timeout_ms: float) -> bool:
        with self._stage_lock:
            axis = copy.copy(self._stage.axes[name])
        now = self.clock.now()
        t_ok = axis.time_within(tolerance * 0.999)  # a hair inside, against rounding
        timeout_s = max(timeout_ms, 0.0) / 1000.0
        wait = min(max(t_ok - now, 0.0), timeout_s)
        self.clock.sleep(wait)
        return abs(self.stage_readback(name) - axis.target) <= tolerance * (1 + 1e-9) + 1e-15

    # ---- STEMController value API

    def TryGetVal(self, s: str) -> tuple[bool, float | None]:  # noqa: N802 - Nion API name
        """Return (exists, value); stage controls read back the settling encoder value."""
        if s in STAGE_CONTROLS:
            return True, self.stage_readback(s)
        return typing.cast(tuple[bool, float | None], super().TryGetVal(s))

    def SetVal(self, s: str, val: float) -> bool:  # noqa: N802
        """Set a control; a stage move starts and returns at once (the readback settles later)."""
        if s in STAGE_CONTROLS:
            return self._start_move(s, val)
        return bool(super().SetVal(s, val))

    def SetValWait(self, s: str, val: float, timeout_ms: int) -> bool:  # noqa: N802
        """Set a control and wait (up to ``timeout_ms`` simulated ms) until a stage move has settled."""
        if s in STAGE_CONTROLS:
            return self._start_move(s, val) and self._wait_for_stage(s, 0.0, timeout_ms)
        return bool(super().SetValWait(s, val, timeout_ms))

    def SetValAndConfirm(self, s: str, val: float, tolfactor: float, timeout_ms: int) -> bool:  # noqa: N802
        """Set a control and wait until the readback is within ``tolfactor`` x the default tolerance.

        Returns False when the stage is not within tolerance after ``timeout_ms`` (simulated) milliseconds;
        ``set_control_output(..., {"confirm": True})`` turns that into ``TimeoutError``.
        """
        if s in STAGE_CONTROLS:
            tolerance = STAGE_TOLERANCE[s] * max(float(tolfactor), 0.0)
            return self._start_move(s, val) and self._wait_for_stage(s, tolerance, timeout_ms)
        return bool(super().SetValAndConfirm(s, val, tolfactor, timeout_ms))

    def InformControl(self, s: str, val: float) -> bool:  # noqa: N802
        """Redefine a control's value without moving (stage: readback jumps, no settling)."""
        if s in STAGE_CONTROLS:
            return self._start_move(s, val, settle=False)
        return bool(super().InformControl(s, val))

    def get_value(self, name: str) -> float | None:
        """usim-style direct getter (routes stage controls like :meth:`TryGetVal`)."""
        if name in STAGE_CONTROLS:
            return self.stage_readback(name)
        return typing.cast(float | None, super().get_value(name))

    def set_value(self, name: str, value: float) -> bool:
        """usim-style direct setter (routes stage controls like :meth:`SetVal`)."""
        if name in STAGE_CONTROLS:
            return self.SetVal(name, value)
        return bool(super().set_value(name, value))

    # ---- probe

    def probe_position_nm(self, probe_position: Geometry.FloatPoint | None,
                          scan_context: stem_controller.ScanContext | None = None) -> tuple[float, float]:
        """Convert a fractional probe position (0..1 of the scan context) to sample (y, x) in nm.

        The sample position is ``center + R(rotation) @ ((p - 0.5) * fov)`` plus the stage/field offset, the same
        mapping :meth:`HAADFScanDataGenerator.generate_scan_data` uses for image pixels.
        """
        context = scan_context if scan_context is not None else self.scan_context
        p = probe_position if probe_position is not None else Geometry.FloatPoint(0.5, 0.5)
        if context is not None and context.fov_size_nm is not None:
            fov = context.fov_size_nm
            center = context.center_nm or Geometry.FloatPoint()
            rotation = float(context.rotation_rad or 0.0)
        else:
            fov = Geometry.FloatSize(0.0, 0.0)
            center = Geometry.FloatPoint()
            rotation = 0.0
        uy, ux = (p.y - 0.5) * fov.height, (p.x - 0.5) * fov.width
        c, s = math.cos(rotation), math.sin(rotation)
        dy, dx = self.field_center_offset_nm()
        return center.y + dy + s * ux + c * uy, center.x + dx + c * ux - s * uy


# ------------------------------------------------------------------------------------------------------- scan


class HAADFScanDataGenerator:
    """Render HAADF frames for the scan device from the instrument's physics at the actual stage tilt.

    ``sample`` is a usim sample used only by the usim Ronchigram simulator (suite compatibility).
    """

    def __init__(self, instrument: StemliveInstrument) -> None:
        self.instrument = instrument
        self.sample = SampleSimulator.RectangleFlakeSample(1000)

    def frame_duration_s(self, shape: tuple[int, int], dwell_us: float) -> float:
        """Physical duration of a frame: (nx * dwell + flyback) * ny."""
        ny, nx = shape
        return (nx * dwell_us + self.instrument.flyback_us) * ny * 1e-6

    def render(self, frame_parameters: scan_base.ScanFrameParameters, t_start_s: float) -> NDArray[np.float32]:
        """Render one frame (all channels share it) and record its truth."""
        instrument = self.instrument
        size = Geometry.IntSize.make(frame_parameters.size)
        fov_nm = float(frame_parameters.fov_nm)
        center = Geometry.FloatPoint.make(frame_parameters.center_nm)
        dy, dx = instrument.field_center_offset_nm(t_start_s)
        alpha, beta = instrument.actual_tilt_deg(t_start_s)
        if instrument.value_manager.is_blanked:  # type: ignore[attr-defined]
            return np.zeros((size.height, size.width), np.float32)
        image, truth = instrument.physics.render_haadf(
            alpha_deg=alpha, beta_deg=beta, shape=(size.height, size.width), fov_nm=fov_nm,
            dwell_us=float(frame_parameters.pixel_time_us), center_nm=(center.y + dy, center.x + dx),
            rotation_rad=float(frame_parameters.rotation_rad), t_start_s=t_start_s)
        instrument.ground_truth.add_frame(truth, t_start_s=t_start_s, alpha_deg=alpha, beta_deg=beta)
        return np.asarray(image, dtype=np.float32)

    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> NDArray[np.float32]:
        """Stand-alone render (ScanDataGeneratorLike); the scan box normally calls :meth:`render` directly."""
        return self.render(scan_frame_parameters, self.instrument.clock.now())


class HAADFScanBox(UsimScanDevice.ScanBoxSimulator):
    """usim's scan box (flyback, blanker signal, external clock) rendering one HAADF frame per scan frame.

    device_kit asks for data once per enabled channel; the first request renders (and advances the clock by the
    frame's physical duration), later channels of the same frame reuse the render: ``HAADF`` is the image,
    ``MAADF`` is 0.5 x the image (no separate physics), ``X1``/``X2`` are copies.
    """

    CHANNEL_GAINS = {0: 1.0, 1: 0.5, 2: 1.0, 3: 1.0}

    def __init__(self, generator: HAADFScanDataGenerator) -> None:
        super().__init__(typing.cast(ScanDevice.ScanDataGeneratorLike, generator))
        self.generator = generator
        self.current_channel_id = 0
        self._frame: NDArray[np.float32] | None = None
        self._frame_t0 = 0.0
        self.flyback_pixels = 2

    def reset_frame(self) -> None:
        """A new frame starts: forget the cached render and note the simulated start time."""
        super().reset_frame()
        self._frame = None
        self._frame_t0 = self.generator.instrument.clock.now()

    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> NDArray[np.float32]:
        """Return the channel's data for the current frame (render once per frame)."""
        if self._frame is None:
            self._frame = self.generator.render(scan_frame_parameters, self._frame_t0)
            if not self.external_clock:  # synchronized scans: the camera accounts for the time
                size = Geometry.IntSize.make(scan_frame_parameters.size)
                duration = self.generator.frame_duration_s((size.height, size.width),
                                                           float(scan_frame_parameters.pixel_time_us))
                self.generator.instrument.clock.elapse(duration)
        gain = self.CHANNEL_GAINS.get(self.current_channel_id, 1.0)
        return self._frame if gain == 1.0 else self._frame * np.float32(gain)


class StemliveScanDevice(ScanDevice.Device):
    """``device_kit`` scan device paced by the simulation clock.

    Parameters
    ----------
    instrument
        The :class:`StemliveInstrument`.
    scan_box
        The :class:`HAADFScanBox`.
    """

    def __init__(self, instrument: StemliveInstrument, scan_box: HAADFScanBox,
                 device_id: str = SCAN_DEVICE_ID) -> None:
        super().__init__(device_id, _("stemlive Scan"), instrument, scan_box)
        self._instrument = instrument
        self._scan_box = scan_box

    def get_scan_data(self, frame_parameters: scan_base.ScanFrameParameters,
                      channel: int | ScanDevice.Channel) -> NDArray[Any]:
        """Tell the scan box which channel is asked for, then let device_kit handle subscan geometry."""
        self._scan_box.current_channel_id = channel if isinstance(channel, int) else channel.channel_id
        return typing.cast(NDArray[Any], super().get_scan_data(frame_parameters, channel))

    def read_partial(self, frame_number: int | None, pixels_to_skip: int) -> Any:
        """device_kit's read_partial with the frame's wall-clock start rescaled to the clock's time scale."""
        scale = self._instrument.clock.time_scale
        frame = getattr(self, "_Device__frame", None)
        if frame is not None and scale != 1.0:
            now = time.perf_counter()
            wall_start = getattr(frame, "_stemlive_wall_start", None)
            if wall_start is None:
                wall_start = frame.start_time
                frame._stemlive_wall_start = wall_start
            frame.start_time = now - 1e9 if scale == 0.0 else now - (now - wall_start) * scale
        return super().read_partial(frame_number, pixels_to_skip)


class StemliveScanModule(scan_base.ScanModule):
    """Scan module (device + settings) registered as ``scan_module``."""

    #: usim's scan profiles (size, dwell us, fov nm), which Nion's test suites hard-code.
    USIM_MODES = (((256, 256), 1.0, 100.0), ((512, 512), 1.0, 400.0), ((1024, 1024), 1.0, 1000.0))

    def __init__(self, instrument: StemliveInstrument, device_id: str = SCAN_DEVICE_ID, *,
                 usim_profiles: bool = False) -> None:
        self.stem_controller_id = instrument.instrument_id
        self.scan_box = HAADFScanBox(instrument.haadf_generator)
        self.device = StemliveScanDevice(instrument, self.scan_box, device_id)
        self.device.priority = 20  # type: ignore[attr-defined]  # ad-hoc attribute, as usim sets it
        haadf = getattr(instrument.scenario, "haadf", None)
        fov = float(getattr(haadf, "fov_nm", 16.384))
        dwell = float(getattr(haadf, "dwell_us", 4.0))
        shape = tuple(getattr(haadf, "shape_px", (512, 512)))
        modes = self.USIM_MODES if usim_profiles else (((256, 256), 1.0, fov), (shape, dwell, fov), (shape, dwell, fov))
        scan_modes = tuple(
            scan_base.ScanSettingsMode(title, mode_id, ScanDevice.ScanFrameParameters(
                pixel_size=size, pixel_time_us=pixel_us, fov_nm=fov_nm))
            for (title, mode_id), (size, pixel_us, fov_nm) in zip(
                ((_("Fast"), "fast"), (_("Slow"), "slow"), (_("Record"), "record")), modes, strict=True))
        self.settings = scan_base.ScanSettings(self.device.scan_device_id, scan_modes,
                                               lambda d: ScanDevice.ScanFrameParameters(d), 0, 2)


# ------------------------------------------------------------------------------------------------------- cameras


class StemliveCamera(CameraDevice.Camera):
    """``device_kit`` camera whose exposure wait follows the simulation clock.

    Parameters
    ----------
    camera_id, camera_type, camera_name, simulator
        As ``nion.device_kit.CameraDevice.Camera``.
    instrument
        The :class:`StemliveInstrument` (its clock paces the exposure).
    min_live_wall_s
        Smallest wall-clock time per frame in live view (avoids a busy loop in fast mode).
    """

    def __init__(self, camera_id: str, camera_type: str, camera_name: str, simulator: Any,
                 instrument: StemliveInstrument, *, min_live_wall_s: float = 0.005) -> None:
        self._stemlive_instrument = instrument
        self._min_live_wall_s = float(min_live_wall_s)
        super().__init__(camera_id, camera_type, camera_name, simulator, instrument)

    @property
    def saturation_counts(self) -> float | None:
        """Counts per channel at which the simulated EELS detector saturates (None for other cameras)."""
        if self.camera_type != "eels":
            return None
        config = getattr(getattr(self._stemlive_instrument.physics, "eels", None), "config", {})
        return float(config.get("saturation_counts", 65535.0))

    def _Camera__direct_acquire(self, cancel_event: threading.Event, do_sync: bool = False) -> bool:  # noqa: N802
        # same as device_kit's Camera.__direct_acquire, but the wait is the exposure on the simulation clock.
        start = time.perf_counter()
        readout_area = self.readout_area
        binning = int(self._Camera__binning)  # type: ignore[attr-defined]
        symmetric = bool(self._Camera__symmetric_binning)  # type: ignore[attr-defined]
        binning_shape = Geometry.IntSize(binning, binning if symmetric else 1)
        scan_device = self._Camera__scan_device  # type: ignore[attr-defined]
        if scan_device:
            scan_device.advance_pixel(do_sync=do_sync)
        exposure_s = float(self._Camera__exposure)  # type: ignore[attr-defined]
        instrument = self._stemlive_instrument
        xdata = self.simulator.get_frame_data(Geometry.IntRect.from_tlbr(*readout_area), binning_shape, exposure_s,
                                              instrument.scan_context, instrument.probe_position)
        self._Camera__acquired_one_event.set()  # type: ignore[attr-defined]
        wall = instrument.clock.wall_seconds(exposure_s)
        if cancel_event is getattr(self, "_Camera__thread_event", None):
            wall = max(wall, self._min_live_wall_s)
        wait_s = max(wall - (time.perf_counter() - start), 0.0)
        if not cancel_event.wait(wait_s):
            xdata._set_timestamp(DateTime.utcnow())
            self._Camera__xdata_buffer = xdata
            return True
        return False


class EELSSpectrometerSimulator:
    """Camera simulator of a vibrational EELS spectrometer (``CameraSimulatorLike``).

    Each frame is one spectrum from :meth:`PhysicsBackend.eels_spectra` at the probe position, spread over the
    sensor rows with a Gaussian non-dispersive profile (the row sum is the physics spectrum), then binned.
    Energy axis in eV as Swift expects: ``scale = dispersion_meV / 1000 * binning``, ``offset`` from the
    instrument's ``ZLPoffset`` control (eV, default the scenario's ``energy_offset_meV / 1000``).
    """

    def __init__(self, instrument: StemliveInstrument) -> None:
        self.instrument = instrument
        h = instrument.eels_sensor_shape.height
        rows = np.arange(h, dtype=np.float64)
        profile = np.exp(-0.5 * ((rows - (h - 1) / 2) / max(h / 6, 0.5)) ** 2)
        self._row_profile = (profile / profile.sum()).astype(np.float32)
        self.last_truth: dict[str, Any] | None = None
        self.prefetch = 32 if instrument.clock.is_fast else 1
        self._queue: list[tuple[float, NDArray[np.float32], Any]] = []
        self._queue_key: tuple[float, ...] | None = None

    def close(self) -> None:
        """Nothing to release."""

    def get_dimensional_calibrations(self, readout_area: Geometry.IntRect | None,
                                     binning_shape: Geometry.IntSize | None) -> list[Calibration.Calibration]:
        """(non-dispersive, energy) calibrations; energy in eV."""
        binning = binning_shape.width if binning_shape else 1
        left = readout_area.left if readout_area else 0
        disp_eV = self.instrument.eels_dispersion_meV / 1000.0
        offset_eV = self.instrument.GetVal("ZLPoffset") + left * disp_eV
        energy = Calibration.Calibration(offset=offset_eV, scale=disp_eV * binning, units="eV")
        return [Calibration.Calibration(), energy]

    def probe_position(self, parked_probe_position: Geometry.FloatPoint | None) -> Geometry.FloatPoint:
        """Fractional probe position: the scan's current pixel while scanning (synchronized), else the parked one."""
        instrument = self.instrument
        scan_hardware_source = instrument.scan_controller
        scan_device = scan_hardware_source.scan_device if scan_hardware_source else None
        if instrument.probe_state == "scanning" and scan_device is not None and \
                hasattr(scan_device, "current_probe_position"):
            return typing.cast(Geometry.FloatPoint, scan_device.current_probe_position)
        if parked_probe_position is not None:
            return parked_probe_position
        return Geometry.FloatPoint(0.5, 0.5)

    def _spectrum(self, x_nm: float, y_nm: float, exposure_s: float, n_channels: int, disp_meV: float,
                  offset_meV: float, t_s: float) -> tuple[NDArray[np.float32], Any]:
        """One spectrum at time ``t_s``; in fast mode spectra of consecutive exposures are computed in batches.

        A batch is used only while probe position and camera settings stay the same and the frames follow each
        other without gaps (the times of the batch are ``t_s + i * exposure``), so the result equals per-frame
        calls up to the random stream.
        """
        key = (x_nm, y_nm, exposure_s, float(n_channels), disp_meV, offset_meV)
        if key != self._queue_key:
            self._queue, self._queue_key = [], key
        while self._queue and self._queue[0][0] < t_s - 1e-9:
            self._queue.pop(0)
        if not self._queue or abs(self._queue[0][0] - t_s) > 1e-6 * max(exposure_s, 1e-3):
            k = max(int(self.prefetch), 1)
            times = t_s + exposure_s * np.arange(k)
            spectra, truths = self.instrument.physics.eels_spectra(
                x_nm=np.full(k, x_nm), y_nm=np.full(k, y_nm), exposure_ms=exposure_s * 1000.0,
                n_channels=n_channels, dispersion_meV=disp_meV, energy_offset_meV=offset_meV, t_s=times)
            spectra = np.asarray(spectra, np.float32).reshape(k, -1)
            self._queue = [(float(times[i]), spectra[i], _row_of(truths, i, k)) for i in range(k)]
        _, spectrum, truth = self._queue.pop(0)
        return spectrum[:n_channels], truth

    def get_frame_data(self, readout_area: Geometry.IntRect, binning_shape: Geometry.IntSize, exposure_s: float,
                       scan_context: stem_controller.ScanContext,
                       probe_position: Geometry.FloatPoint | None) -> DataAndMetadata.DataAndMetadata:
        """One camera frame: the spectrum at the probe position, spread over the rows and binned."""
        instrument = self.instrument
        clock = instrument.clock
        t_s = clock.now()
        height, width = readout_area.height, readout_area.width
        calibrations = self.get_dimensional_calibrations(readout_area, binning_shape)
        disp_meV = instrument.eels_dispersion_meV
        offset_meV = instrument.GetVal("ZLPoffset") * 1000.0 + readout_area.left * disp_meV
        y_nm, x_nm = instrument.probe_position_nm(self.probe_position(probe_position), scan_context)
        if instrument.value_manager.is_blanked:  # type: ignore[attr-defined]
            spectrum = np.zeros(width, np.float32)
            truth: Any = {"blanked": True}
        else:
            spectrum, truth = self._spectrum(x_nm, y_nm, exposure_s, width, disp_meV, offset_meV, t_s)
        profile = self._row_profile[readout_area.top:readout_area.top + height]
        profile = profile / max(float(profile.sum()), 1e-12)
        data = profile[:, None] * spectrum[None, :]
        bh, bw = max(binning_shape.height, 1), max(binning_shape.width, 1)
        if bh > 1 or bw > 1:
            nh, nw = height // bh, width // bw
            data = data[:nh * bh, :nw * bw].reshape(nh, bh, nw, bw).sum(axis=(1, 3))
        self.last_truth = {"t_s": t_s, "x_nm": x_nm, "y_nm": y_nm, "energy_offset_meV": offset_meV, "truth": truth}
        instrument.ground_truth.add_spectrum(truth, t_s=t_s, x_nm=x_nm, y_nm=y_nm, energy_offset_meV=offset_meV,
                                             exposure_ms=exposure_s * 1000.0)
        clock.elapse(exposure_s)
        return DataAndMetadata.new_data_and_metadata(
            data.astype(np.float32), intensity_calibration=Calibration.Calibration(units="counts"),
            dimensional_calibrations=calibrations)


def _row_of(truths: Any, i: int, k: int) -> Any:
    """Row ``i`` of a batch truth (a dict of length-k arrays, or a list of k records)."""
    if isinstance(truths, dict):
        return {key: (np.asarray(v)[i] if np.ndim(v) >= 1 and np.shape(v)[0] == k else v) for key, v in truths.items()}
    if isinstance(truths, list | tuple) and len(truths) == k:
        return truths[i]
    return truths


# ------------------------------------------------------------------------------------------------------- registry


class SimulatedInstrumentConfiguration:
    """Build, register and unregister the simulated instrument (like usim's ``AcquisitionContextConfiguration``).

    Satisfies ``nion.instrumentation.test.AcquisitionTestContext``'s configuration protocol, and coexists with
    usim: every id differs and :meth:`stop` unregisters only its own components.

    Parameters
    ----------
    scenario
        A ``Scenario`` or a built-in name/path ("default" runs as fast as possible).
    time_scale
        Overrides the scenario's time scale.
    physics
        Physics backend override (tests).
    set_configuration_location
        When True, create a fresh temporary folder as ``configuration_location`` (needed headless: the
        instrumentation UI's ``run()`` does nothing with an empty location). Unlike usim's configuration this never
        touches the working directory. Inside Swift leave it False (Swift's own location is used).
    configuration_location
        An explicit configuration folder (overrides ``set_configuration_location``).
    ronchigram
        Also create a Ronchigram camera (usim's simulator, needed by Nion's camera test suite).
    eels_sensor_height
        Rows of the EELS sensor (16 by default; fewer rows make long spectrum sequences cheaper).
    nion_suite_geometry
        Use usim's geometry and profiles (EELS sensor 256 x 1024, scan profiles 256/512/1024 px at 100/400/1000 nm,
        device_kit's default camera profiles), which Nion's scan and camera test suites hard-code. Tests only.
    """

    def __init__(self, scenario: Any = "default", *, time_scale: float | None = None,
                 physics: PhysicsLike | None = None, set_configuration_location: bool = False,
                 configuration_location: str | None = None, ronchigram: bool = True,
                 eels_sensor_height: int = 16, nion_suite_geometry: bool = False) -> None:
        self._temporary_location: str | None = None  # a folder this configuration made and removes on stop()
        if configuration_location is not None:
            self.configuration_location = str(configuration_location)
        elif set_configuration_location:
            import tempfile

            self.configuration_location = tempfile.mkdtemp(prefix="stemlive_swift_config_")
            self._temporary_location = self.configuration_location
        else:
            self.configuration_location = ""
        self.instrument_id = INSTRUMENT_ID
        self._instrument = StemliveInstrument(scenario, time_scale=time_scale, physics=physics,
                                              eels_sensor_height=256 if nion_suite_geometry else eels_sensor_height,
                                              eels_n_channels=1024 if nion_suite_geometry else None)
        self.instrument: stem_controller.STEMController = self._instrument
        self._scan_module = StemliveScanModule(self._instrument, usim_profiles=nion_suite_geometry)
        self.scan_module: scan_base.ScanModule = self._scan_module

        self.eels_camera_device_id = EELS_CAMERA_ID
        self.eels_simulator = EELSSpectrometerSimulator(self._instrument)
        self._eels_camera_device = StemliveCamera(EELS_CAMERA_ID, "eels", _("stemlive EELS Camera"),
                                                  self.eels_simulator, self._instrument)
        self._eels_camera_settings = CameraDevice.CameraSettings(EELS_CAMERA_ID)
        exposure_ms = self._instrument.eels_default_exposure_ms
        profiles = [camera_base.CameraFrameParameters({"exposure_ms": e, "binning": 1}).as_dict()
                    for e in (exposure_ms / 10, exposure_ms, exposure_ms)]
        if not nion_suite_geometry:
            self._eels_camera_settings.apply_settings({"settings": profiles, "current_settings_index": 0,
                                                       "current_settings": profiles[0]})
        self.eels_camera_device: camera_base.CameraDevice3 = self._eels_camera_device
        self.eels_camera_settings: camera_base.CameraSettings = self._eels_camera_settings

        self.ronchigram_camera_device_id = RONCHIGRAM_CAMERA_ID
        self._ronchigram_camera_device: StemliveCamera | None = None
        self._ronchigram_camera_settings: CameraDevice.CameraSettings | None = None
        if ronchigram:
            instrument = self._instrument
            simulator = RonchigramCameraSimulator.RonchigramCameraSimulator(
                instrument, Geometry.IntSize.make(instrument.camera_sensor_dimensions("ronchigram")),
                instrument.counts_per_electron, instrument.stage_size_nm)
            self._ronchigram_camera_device = StemliveCamera(RONCHIGRAM_CAMERA_ID, "ronchigram",
                                                            _("stemlive Ronchigram Camera"), simulator, instrument)
            self._ronchigram_camera_settings = CameraDevice.CameraSettings(RONCHIGRAM_CAMERA_ID)
        self.ronchigram_camera_device = typing.cast(camera_base.CameraDevice3, self._ronchigram_camera_device)
        self.ronchigram_camera_settings = typing.cast(camera_base.CameraSettings, self._ronchigram_camera_settings)
        value_manager = typing.cast(UsimInstrumentDevice.ValueManager, self._instrument.value_manager)
        value_manager.ronchigram_camera = self._ronchigram_camera_device
        value_manager.eels_camera = self._eels_camera_device
        self._camera_modules: list[CameraDevice.CameraModule] = []

    @property
    def clock(self) -> SimulationClock:
        """The simulation clock shared by all devices."""
        return self._instrument.clock

    def run(self) -> None:
        """Register instrument, cameras and scan module with ``nion.utils.Registry``."""
        Registry.register_component(self.instrument, {"instrument_controller", "stem_controller"})
        modules = []
        if self._ronchigram_camera_device is not None and self._ronchigram_camera_settings is not None:
            self._ronchigram_camera_device.camera_panel_type = "ronchigram"  # type: ignore[attr-defined]
            modules.append(CameraDevice.CameraModule(INSTRUMENT_ID, self._ronchigram_camera_device,
                                                     self._ronchigram_camera_settings))
        self._eels_camera_device.camera_panel_type = "eels"  # type: ignore[attr-defined]
        modules.append(CameraDevice.CameraModule(INSTRUMENT_ID, self._eels_camera_device, self._eels_camera_settings))
        for module in modules:
            Registry.register_component(module, {"camera_module"})
        self._camera_modules = modules
        Registry.register_component(self.scan_module, {"scan_module"})

    def close(self) -> None:
        """Close the camera devices (they own threads) unless Swift's hardware sources already closed them."""
        for camera in (self._eels_camera_device, self._ronchigram_camera_device):
            if camera is not None and getattr(camera, "_Camera__thread", None) is not None:
                camera.close()

    def stop(self) -> None:
        """Unregister this configuration's components (and only those)."""
        for module in self._camera_modules:
            Registry.unregister_component(module, {"camera_module"})
        self._camera_modules = []
        Registry.unregister_component(self.scan_module, {"scan_module"})
        Registry.unregister_component(self.instrument, {"instrument_controller", "stem_controller"})
        if self._temporary_location:
            import shutil

            shutil.rmtree(self._temporary_location, ignore_errors=True)
            self._temporary_location = None


@contextlib.contextmanager
def run_headless(configuration: SimulatedInstrumentConfiguration) -> typing.Iterator[HeadlessHardware]:
    """Register the configuration with Swift's instrumentation layer without a document or a GUI.

    Sets up an asyncio event loop if the thread has none, points ``nion_instrumentation_ui`` at the
    configuration's folder (creating a temporary one if it has none), runs both, yields the hardware sources,
    and stops and closes everything afterwards.

    Examples
    --------
    >>> config = SimulatedInstrumentConfiguration("default")          # doctest: +SKIP
    >>> with run_headless(config) as hw:                              # doctest: +SKIP
    ...     frames = hw.scan.record_immediate(hw.scan.get_current_frame_parameters())
    """
    import asyncio
    import tempfile

    from nion.instrumentation import HardwareSource
    from nionswift_plugin import nion_instrumentation_ui

    try:
        asyncio.get_event_loop_policy().get_event_loop()
        own_loop = None
    except RuntimeError:
        own_loop = asyncio.new_event_loop()
        asyncio.set_event_loop(own_loop)
    if not configuration.configuration_location:
        configuration.configuration_location = tempfile.mkdtemp(prefix="stemlive_swift_config_")
        configuration._temporary_location = configuration.configuration_location
    nion_instrumentation_ui.configuration_location = configuration.configuration_location  # type: ignore[assignment]
    nion_instrumentation_ui.run()
    configuration.run()
    try:
        manager = HardwareSource.HardwareSourceManager()
        scan = manager.get_hardware_source_for_hardware_source_id(SCAN_DEVICE_ID)
        eels = manager.get_hardware_source_for_hardware_source_id(EELS_CAMERA_ID)
        if scan is None or eels is None:
            raise RuntimeError("stemlive hardware sources were not created (see the log for the plug-in error)")
        yield HeadlessHardware(configuration, typing.cast(scan_base.ScanHardwareSource, scan),
                               typing.cast(camera_base.CameraHardwareSource, eels))
    finally:
        configuration.stop()
        nion_instrumentation_ui.stop()
        configuration.close()
        if own_loop is not None:
            asyncio.set_event_loop(None)
            own_loop.close()


@dataclass
class HeadlessHardware:
    """What :func:`run_headless` yields: the configuration and its Swift hardware sources."""

    configuration: SimulatedInstrumentConfiguration
    scan: scan_base.ScanHardwareSource
    eels: camera_base.CameraHardwareSource

    @property
    def instrument(self) -> StemliveInstrument:
        """The simulated instrument."""
        return self.configuration._instrument
