"""Simulated Nion instrument, scan and EELS camera built on ``nion.device_kit``.

The devices are the Nion Swift side of the simulator: they register as a STEM controller
(``stemlive_stem_controller``), a scan device (``stemlive_scan``) and an EELS camera (``stemlive_eels_camera``) and
produce data from the stemlive physics (:mod:`stemlive.simulators.haadf`, :mod:`stemlive.simulators.eels_model`,
:mod:`stemlive.simulators.stage`). All physics calls go through
:class:`~stemlive.simulators.physics_backend.PhysicsBackend`, one small method each, so the device code stays free
of physics and tests can swap in a stub.

Modules: :mod:`~stemlive.simulators.physics_backend`, :mod:`~stemlive.simulators.instrument` (STEM controller and
stage), :mod:`~stemlive.simulators.scan_device`, :mod:`~stemlive.simulators.camera_device` (EELS camera); this one
builds and registers them (:class:`SimulatedInstrumentConfiguration`, :func:`run_headless`).

Time is simulated (:class:`~stemlive.simulators.clock.SimulationClock`): a scan frame takes
``(nx * dwell + flyback) * ny``, a camera frame its exposure, a stage move its settling time; the wall-clock
duration is that divided by the scenario's ``time_scale`` (nothing sleeps when it is 0).

Implementation notes (nionswift-instrumentation 23.6, pinned ``<23.7`` in setup.cfg):

the scan device and the cameras replace two private ``device_kit`` hooks to follow the simulation clock (see
:mod:`~stemlive.simulators.scan_device` and :mod:`~stemlive.simulators.camera_device`).
"""


from __future__ import annotations

import contextlib
import gettext
import typing
from dataclasses import dataclass
from typing import Any

from nion.device_kit import CameraDevice
from nion.instrumentation import camera_base, scan_base, stem_controller
from nion.usim_device import InstrumentDevice as UsimInstrumentDevice
from nion.usim_device import RonchigramCameraSimulator
from nion.utils import Geometry, Registry

from stemlive.simulators.camera_device import EELSSpectrometerSimulator, StemliveCamera
from stemlive.simulators.clock import SimulationClock
from stemlive.simulators.instrument import INSTRUMENT_ID, StemliveInstrument
from stemlive.simulators.physics_backend import PhysicsLike
from stemlive.simulators.scan_device import SCAN_DEVICE_ID, StemliveScanModule

_ = gettext.gettext

__all__ = [
    "EELS_CAMERA_ID",
    "RONCHIGRAM_CAMERA_ID",
    "HeadlessHardware",
    "SimulatedInstrumentConfiguration",
    "run_headless",
]

EELS_CAMERA_ID = "stemlive_eels_camera"
RONCHIGRAM_CAMERA_ID = "stemlive_ronchigram_camera"


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
