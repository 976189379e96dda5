"""The simulated cameras: :class:`StemliveCamera` (a ``device_kit`` camera whose exposure follows the simulation
clock) and :class:`EELSSpectrometerSimulator` (one EELS spectrum per frame from the stemlive physics at the probe).

Implementation note (nionswift-instrumentation 23.6, pinned ``<23.7`` in setup.cfg):
``device_kit.CameraDevice.Camera`` sleeps the exposure in the private ``__direct_acquire``; :class:`StemliveCamera`
overrides ``_Camera__direct_acquire`` with the same logic and a scaled wait. ``tests/test_sim_devices.py`` fails
if a device_kit update breaks the hook.
"""

from __future__ import annotations

import threading
import time
import typing
from typing import Any

import numpy as np
from nion.data import Calibration, DataAndMetadata
from nion.device_kit import CameraDevice
from nion.instrumentation import stem_controller
from nion.utils import DateTime, Geometry
from numpy.typing import NDArray

from stemlive.simulators.instrument import StemliveInstrument

__all__ = ["EELSSpectrometerSimulator", "StemliveCamera"]


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

    Each frame is one spectrum from ``PhysicsBackend.eels_spectra`` at the probe position, spread over the
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

