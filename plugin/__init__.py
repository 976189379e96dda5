"""Nion Swift plug-in: Tilt Series and Vibrational EELS panels and their acquisition procedures."""

from __future__ import annotations

import logging
import os
import typing

_LOG = logging.getLogger(__name__)

#: The registered simulated instrument configuration (None when disabled or not yet registered).
_simulated_instrument: typing.Any = None


def register_simulated_instrument() -> typing.Any:
    """Register the stemlive simulated instrument (STEM controller, scan, EELS camera) with Swift.

    Disabled when the environment variable ``STEMLIVE_INSTRUMENT`` is ``none``. The scenario comes from
    ``STEMLIVE_SCENARIO`` (a built-in name or a path; default ``realtime``, i.e. real time inside Swift). Runs
    beside usim (different ids). Returns the configuration, or None when disabled or when it failed (logged).
    """
    global _simulated_instrument
    if os.environ.get("STEMLIVE_INSTRUMENT", "").strip().lower() == "none":
        return None
    if _simulated_instrument is not None:
        return _simulated_instrument
    try:
        from stemlive.simulators.devices import SimulatedInstrumentConfiguration

        configuration = SimulatedInstrumentConfiguration(os.environ.get("STEMLIVE_SCENARIO", "realtime"))
        configuration.run()
    except Exception:  # a broken simulator must not take Swift down
        _LOG.exception("stemlive: could not register the simulated instrument")
        return None
    _simulated_instrument = configuration
    return configuration


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
