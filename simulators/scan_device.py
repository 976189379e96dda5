"""The simulated scan device (id ``stemlive_scan``): HAADF frames rendered from the stemlive physics at the stage's
actual tilt, paced by the simulation clock (a frame takes ``(nx * dwell + flyback) * ny`` simulated seconds).

Implementation note (nionswift-instrumentation 23.6, pinned ``<23.7`` in setup.cfg):
``device_kit.ScanDevice.Device.read_partial`` paces frames with ``time.perf_counter`` against the frame's
``start_time``; :class:`StemliveScanDevice` rescales that start time (``_Device__frame``) for ``time_scale != 1``.
``tests/test_sim_devices.py`` fails if a device_kit update breaks the hook.
"""

from __future__ import annotations

import gettext
import time
import typing
from typing import Any

import numpy as np
from nion.device_kit import ScanDevice
from nion.instrumentation import scan_base
from nion.usim_device import ScanDevice as UsimScanDevice
from nion.utils import Geometry
from numpy.typing import NDArray

from stemlive.simulators.instrument import HAADFScanDataGenerator, StemliveInstrument

_ = gettext.gettext

__all__ = ["SCAN_DEVICE_ID", "HAADFScanBox", "StemliveScanDevice", "StemliveScanModule"]

SCAN_DEVICE_ID = "stemlive_scan"


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

