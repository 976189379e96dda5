"""Which instrument the panels drive, and what the panels remember between runs.

Device chooser
--------------
The panels offer every registered STEM controller, scan hardware source, HAADF channel (by name) and EELS camera.
The defaults are what Nion's own panels use: ``Registry.get_component("stem_controller")`` and that controller's
own ``scan_controller`` / ``eels_camera``; the HAADF channel is the scan channel named HAADF (else the first
enabled one). Choosing another instrument switches the scan and camera to that instrument's own.

Memory
------
The device choice and the last plan (the panel's fields) are kept in Swift's application data
(``nionswift_appdata.json`` in Swift's configuration folder, :mod:`nion.swift.model.ApplicationData`) under
``"stemlive"``, and restored when a panel opens, so they survive a restart of Swift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SETTINGS_KEY = "stemlive"


# ----------------------------------------------------------------------------------------------- memory


def load_settings(panel: str) -> dict[str, Any]:
    """What ``panel`` (``tilt_series`` / ``eels``) remembered: ``{"devices": {...}, "plan": {...}}``."""
    from nion.swift.model import ApplicationData

    try:
        entry = ApplicationData.get_data().get(SETTINGS_KEY, {}).get(panel, {})
    except Exception:  # an unreadable file must not stop the panel
        log.exception("stemlive: could not read the panel settings")
        return {}
    return dict(entry) if isinstance(entry, dict) else {}


def save_settings(panel: str, **parts: dict[str, Any]) -> None:
    """Remember ``parts`` (e.g. ``devices=...``, ``plan=...``) for ``panel`` in Swift's application data."""
    from nion.swift.model import ApplicationData

    try:
        data = ApplicationData.get_data()
        stemlive = dict(data.get(SETTINGS_KEY) or {})
        entry = dict(stemlive.get(panel) or {})
        entry.update(parts)
        stemlive[panel] = entry
        data[SETTINGS_KEY] = stemlive
        ApplicationData.set_data(data)
    except Exception:
        log.exception("stemlive: could not save the panel settings")


# ----------------------------------------------------------------------------------------------- devices


def instrument_id(stem_controller: Any) -> str:
    """The id a STEM controller is registered under (its class name if it has none)."""
    return str(getattr(stem_controller, "instrument_id", None) or type(stem_controller).__name__)


def source_id(hardware_source: Any) -> str:
    return str(getattr(hardware_source, "hardware_source_id", None) or "?")


def source_label(hardware_source: Any) -> str:
    name = getattr(hardware_source, "display_name", None)
    return f"{name} ({source_id(hardware_source)})" if name else source_id(hardware_source)


def stem_controllers() -> list[Any]:
    """Every registered STEM controller, Swift's default first, then by id."""
    from nion.utils import Registry

    default = Registry.get_component("stem_controller")
    found = list(Registry.get_components_by_type("stem_controller"))
    return sorted(found, key=lambda c: (c is not default, instrument_id(c)))


def scan_sources() -> list[Any]:
    """Every registered scan hardware source, by id."""
    from nion.utils import Registry

    return sorted(Registry.get_components_by_type("scan_hardware_source"), key=source_id)


def eels_cameras() -> list[Any]:
    """Every registered EELS camera hardware source, by id."""
    from nion.utils import Registry

    return sorted(Registry.get_components_by_type("eels_camera_hardware_source"), key=source_id)


def channel_names(scan_source: Any) -> list[str]:
    """The names of the scan device's channels (in channel order)."""
    if scan_source is None:
        return []
    try:
        count = int(scan_source.channel_count)
        return [str(scan_source.get_channel_name(i) or f"channel {i}") for i in range(count)]
    except Exception:
        log.exception("stemlive: could not list the channels of %s", source_id(scan_source))
        return []


def default_channel(scan_source: Any) -> str | None:
    """The channel named HAADF (any case), else the first enabled one, else the first."""
    names = channel_names(scan_source)
    for name in names:
        if "haadf" in name.lower():
            return name
    for i, name in enumerate(names):
        try:
            if scan_source.get_channel_enabled(i):
                return name
        except Exception:
            break
    return names[0] if names else None


@dataclass
class DeviceChoice:
    """The chosen devices, by id (what is remembered) -- resolved against the registry when a run starts."""

    instrument: str | None = None
    scan: str | None = None
    channel: str | None = None
    camera: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"instrument": self.instrument, "scan": self.scan, "channel": self.channel, "camera": self.camera}

    @classmethod
    def from_dict(cls, d: Any) -> DeviceChoice:
        d = d if isinstance(d, dict) else {}
        return cls(*(str(d[k]) if d.get(k) else None for k in ("instrument", "scan", "channel", "camera")))


def defaults_for(stem_controller: Any) -> DeviceChoice:
    """What Nion's panels use with ``stem_controller``: its own scan and EELS camera, the HAADF channel."""
    scan = getattr(stem_controller, "scan_controller", None) if stem_controller is not None else None
    camera = getattr(stem_controller, "eels_camera", None) if stem_controller is not None else None
    return DeviceChoice(instrument_id(stem_controller) if stem_controller is not None else None,
                        source_id(scan) if scan is not None else None, default_channel(scan),
                        source_id(camera) if camera is not None else None)


def default_choice() -> DeviceChoice:
    """The defaults for Swift's default STEM controller (``Registry.get_component("stem_controller")``)."""
    from nion.utils import Registry

    return defaults_for(Registry.get_component("stem_controller"))


@dataclass
class Instrument:
    """The hardware a procedure drives: STEM controller, scan, HAADF channel (index and name), EELS camera."""

    stem_controller: Any
    scan_source: Any
    camera_source: Any | None = None
    channel: int = 0
    channel_name: str | None = None

    def describe(self) -> str:
        ids = [instrument_id(self.stem_controller), source_id(self.scan_source)]
        if self.channel_name:
            ids[-1] += f" [{self.channel_name}]"
        if self.camera_source is not None:
            ids.append(source_id(self.camera_source))
        return " / ".join(ids)


def find_instrument(choice: DeviceChoice | None = None, *, need_camera: bool = False) -> Instrument:
    """The devices of ``choice`` (ids; any left out take the chosen instrument's own, see :func:`defaults_for`).

    Raises
    ------
    RuntimeError
        With a message for the panel when something is missing.
    """
    choice = choice or DeviceChoice()
    controllers = stem_controllers()
    if choice.instrument:
        stem = next((c for c in controllers if instrument_id(c) == choice.instrument), None)
        if stem is None:
            raise RuntimeError(f"the instrument {choice.instrument!r} is not registered "
                               f"(registered: {', '.join(instrument_id(c) for c in controllers) or 'none'})")
    else:
        stem = controllers[0] if controllers else None
        if stem is None:
            raise RuntimeError("no STEM controller is registered (is the instrument plug-in loaded?)")
    own = defaults_for(stem)
    scan_id = choice.scan or own.scan
    scan = next((s for s in scan_sources() if source_id(s) == scan_id), None)
    if scan is None:
        raise RuntimeError(f"no scan device {scan_id!r} for the instrument {instrument_id(stem)}"
                           if scan_id else f"the instrument {instrument_id(stem)} has no scan device")
    names = channel_names(scan)
    channel_name = choice.channel if choice.channel in names else default_channel(scan)
    if choice.channel and choice.channel not in names:
        raise RuntimeError(f"the scan device {source_id(scan)} has no channel {choice.channel!r} "
                           f"(channels: {', '.join(names)})")
    camera = None
    camera_id = choice.camera or own.camera
    if need_camera:
        camera = next((c for c in eels_cameras() if source_id(c) == camera_id), None)
        if camera is None:
            raise RuntimeError(f"no EELS camera {camera_id!r} for the instrument {instrument_id(stem)}"
                               if camera_id else f"the instrument {instrument_id(stem)} has no EELS camera")
    index = names.index(channel_name) if channel_name in names else 0
    return Instrument(stem, scan, camera, index, channel_name)
