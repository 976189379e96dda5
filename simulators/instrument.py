"""The simulated STEM controller (:class:`StemliveInstrument`, id ``stemlive_stem_controller``): usim's instrument
with a stemlive stage (tilt moves that settle over simulated time, with hysteresis and angle errors from the
physics), the field-of-view offset of the tilted specimen, and the EELS sensor geometry.

Time is simulated (:class:`~stemlive.simulators.clock.SimulationClock`): a stage move takes its settling time;
the wall-clock duration is that divided by the scenario's ``time_scale`` (nothing sleeps when it is 0).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nion.instrumentation import scan_base, stem_controller
from nion.usim_device import InstrumentDevice as UsimInstrumentDevice
from nion.usim_device import SampleSimulator
from nion.utils import Geometry
from numpy.typing import NDArray

from stemlive.simulators.clock import SimulationClock
from stemlive.simulators.physics_backend import PhysicsBackend, PhysicsLike, resolve_scenario

_LOG = logging.getLogger(__name__)

__all__ = ["INSTRUMENT_ID", "STAGE_CONTROLS", "STAGE_TOLERANCE", "HAADFScanDataGenerator", "StemliveInstrument"]

INSTRUMENT_ID = "stemlive_stem_controller"

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
