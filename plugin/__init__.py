"""Nion Swift plug-in: Tilt Series and Vibrational EELS panels and their acquisition procedures.

The panels are always registered. The stemlive simulated instrument is registered only when asked:

``STEMLIVE_INSTRUMENT=simulated``
    set by ``stemlive swift`` (unless ``--no-simulator``); or by hand for a plain ``nionswift``. Any other value
    (unset, ``none``) registers nothing, so a plain Swift at a microscope never offers the simulator.

When registered, each instrument keeps its own devices: the simulator's STEM controller is bound explicitly to the
simulator's scan and cameras (``set_scan_controller`` / ``set_eels_camera`` / ``set_ronchigram_camera``), while
the simulator's hardware sources step back in the registry look-ups other instruments rely on (usim finds its EELS
camera with ``Registry.get_component("eels_camera_hardware_source")`` and its scan as the first non-secondary
``scan_hardware_source``): they get a low priority and the simulated scan device declares itself secondary. The
simulated STEM controller itself gets a higher priority than the default, so in a session that asked for it, it is
the instrument Nion's own panels and the stemlive panels use by default.
"""

from __future__ import annotations

import logging
import os
import typing

_LOG = logging.getLogger(__name__)

#: The registered simulated instrument configuration (None when not asked for or not yet registered).
_simulated_instrument: typing.Any = None
_binding: typing.Any = None

#: Registry priority of the simulated STEM controller when asked for (Registry's default is 50).
SIMULATED_INSTRUMENT_PRIORITY = 60
#: Registry priority of the simulator's hardware sources: below any other instrument's (default 50).
SIMULATED_DEVICE_PRIORITY = 10


def simulator_requested() -> bool:
    """Whether the environment asks for the simulated instrument (``STEMLIVE_INSTRUMENT=simulated``)."""
    return os.environ.get("STEMLIVE_INSTRUMENT", "").strip().lower() == "simulated"


class DeviceBinding:
    """Bind a STEM controller to its own hardware sources, as they appear in the registry (and unbind them).

    Parameters
    ----------
    instrument
        A ``stem_controller.STEMController``.
    scan_id, eels_id, ronchigram_id
        The ``hardware_source_id`` of the instrument's own scan and cameras.
    priority
        Registry priority given to those hardware sources (None: leave as is).
    """

    def __init__(self, instrument: typing.Any, *, scan_id: str, eels_id: str, ronchigram_id: str | None = None,
                 priority: int | None = SIMULATED_DEVICE_PRIORITY) -> None:
        from nion.utils import Registry

        self.instrument = instrument
        self.ids = {"scan_hardware_source": scan_id, "eels_camera_hardware_source": eels_id}
        if ronchigram_id:
            self.ids["ronchigram_camera_hardware_source"] = ronchigram_id
        self.priority = priority
        self._registered = Registry.listen_component_registered_event(self._registered_component)
        self._unregistered = Registry.listen_component_unregistered_event(self._unregistered_component)
        for component_type in self.ids:
            for component in Registry.get_components_by_type(component_type):
                self._registered_component(component, {component_type})

    def _own(self, component: typing.Any, component_types: set[str]) -> str | None:
        hardware_source_id = getattr(component, "hardware_source_id", None)
        for component_type, own_id in self.ids.items():
            if component_type in component_types and hardware_source_id == own_id:
                return component_type
        return None

    def _registered_component(self, component: typing.Any, component_types: set[str]) -> None:
        kind = self._own(component, component_types)
        if kind is None:
            return
        if self.priority is not None:
            component.priority = self.priority
        if kind == "scan_hardware_source":
            # other instruments take the first non-secondary scan hardware source as theirs
            component.scan_device.scan_device_is_secondary = True
            self.instrument.set_scan_controller(component)
        elif kind == "eels_camera_hardware_source":
            self.instrument.set_eels_camera(component)
        else:
            self.instrument.set_ronchigram_camera(component)

    def _unregistered_component(self, component: typing.Any, component_types: set[str]) -> None:
        kind = self._own(component, component_types)
        if kind == "scan_hardware_source" and self.instrument.scan_controller is component:
            self.instrument.set_scan_controller(None)
        elif kind == "eels_camera_hardware_source" and self.instrument.eels_camera is component:
            self.instrument.set_eels_camera(None)
        elif kind == "ronchigram_camera_hardware_source" and self.instrument.ronchigram_camera is component:
            self.instrument.set_ronchigram_camera(None)

    def close(self) -> None:
        """Stop following the registry (the bindings made stay)."""
        self._registered.close()
        self._unregistered.close()


def bind_simulated_devices(configuration: typing.Any) -> DeviceBinding:
    """Bind the simulated instrument of ``configuration`` to its own scan and cameras (see the module doc)."""
    from stemlive.simulators.devices import EELS_CAMERA_ID, RONCHIGRAM_CAMERA_ID
    from stemlive.simulators.scan_device import SCAN_DEVICE_ID

    configuration.instrument.priority = SIMULATED_INSTRUMENT_PRIORITY
    return DeviceBinding(configuration.instrument, scan_id=SCAN_DEVICE_ID, eels_id=EELS_CAMERA_ID,
                         ronchigram_id=RONCHIGRAM_CAMERA_ID)


def register_simulated_instrument(force: bool = False) -> typing.Any:
    """Register the stemlive simulated instrument (STEM controller, scan, EELS camera) with Swift, if asked.

    Registers only when ``STEMLIVE_INSTRUMENT`` is ``simulated`` (or ``force``). The scenario comes from
    ``STEMLIVE_SCENARIO`` (a built-in name or a path; default ``realtime``, i.e. real time inside Swift). Runs
    beside usim and a real instrument without mixing their devices (:class:`DeviceBinding`). Returns the
    configuration, or None when not asked for or when it failed (logged).
    """
    global _simulated_instrument, _binding
    if not (force or simulator_requested()):
        return None
    if _simulated_instrument is not None:
        return _simulated_instrument
    try:
        from stemlive.simulators.devices import SimulatedInstrumentConfiguration

        configuration = SimulatedInstrumentConfiguration(os.environ.get("STEMLIVE_SCENARIO", "realtime"))
        configuration.instrument.priority = SIMULATED_INSTRUMENT_PRIORITY
        configuration.run()
        _binding = bind_simulated_devices(configuration)
    except Exception:  # a broken simulator must not take Swift down
        _LOG.exception("stemlive: could not register the simulated instrument")
        return None
    _simulated_instrument = configuration
    _LOG.info("stemlive: simulated instrument registered (STEMLIVE_INSTRUMENT=simulated)")
    return configuration


def unregister_simulated_instrument() -> None:
    """Undo :func:`register_simulated_instrument` (headless runners and tests): unregister the simulator's
    components, close its devices and stop following the registry."""
    global _simulated_instrument, _binding
    configuration, binding = _simulated_instrument, _binding
    _simulated_instrument = _binding = None
    if configuration is not None:
        configuration.stop()
        configuration.close()
    if binding is not None:
        binding.close()


def register_panels() -> None:
    """Register the "Tilt Series" and "Vibrational EELS" panels (failures are logged, Swift keeps running)."""
    try:
        from . import panels

        panels.register_panels()
    except Exception:
        _LOG.exception("stemlive: could not register the panels")


def run() -> None:
    """Entry point called by Nion Swift's plug-in manager."""
    register_simulated_instrument()
    register_panels()
