"""What both acquisition procedures share: run control (pause/resume/abort), progress, plan checks, results.

Kept free of Qt and of Swift's document model so the same procedures run in the Swift panels, in the
headless test harness and in ``stemlive demo``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ELEMENTARY_CHARGE_C = 1.602176634e-19


class PlanError(ValueError):
    """An acquisition plan that cannot run; the message says what to change."""


class AcquisitionAborted(Exception):
    """Raised inside a procedure when the user aborts."""


@dataclass
class PlanCheck:
    """What a plan will cost, and why it cannot run (if it cannot)."""

    duration_s: float
    dose_e_per_A2: float
    bytes_on_disk: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: set when the instrument itself failed the test (an exception, not a refusal of the plan); also in problems
    instrument_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_refused(self) -> None:
        """Raise :class:`PlanError` listing every problem."""
        if self.problems:
            raise PlanError("acquisition plan refused:\n  - " + "\n  - ".join(self.problems))

    def summary(self) -> str:
        dose = f", dose {self.dose_e_per_A2:.3g} e/A^2" if self.dose_e_per_A2 > 0 else ""
        text = f"about {format_duration(self.duration_s)}{dose}, {self.bytes_on_disk / 2**20:.0f} MiB on disk"
        return "; ".join([text, *self.notes])


def format_duration(seconds: float) -> str:
    """``"1 h 02 min"``, ``"3 min 20 s"`` or ``"12 s"``."""
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.0f} s"


def check_disk_space(directory: str | Path | None, needed_bytes: int, check: PlanCheck, margin: float = 1.2) -> None:
    """Add a problem to ``check`` if ``directory`` has less than ``margin`` x ``needed_bytes`` free."""
    if directory is None:
        check.notes.append("disk space not checked (the service records on another computer)")
        return
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < needed_bytes * margin:
        check.problems.append(
            f"not enough disk space in {directory}: the session needs about {needed_bytes / 2**30:.2f} GiB "
            f"(+{(margin - 1) * 100:.0f}% margin), {free / 2**30:.2f} GiB free"
        )


def dose_per_scan_e_per_A2(beam_current_pA: float, dwell_us: float, pixel_size_nm: float) -> float:
    """Electron dose of one scan: electrons per pixel over the pixel area."""
    electrons_per_pixel = beam_current_pA * 1e-12 / ELEMENTARY_CHARGE_C * dwell_us * 1e-6
    return electrons_per_pixel / (pixel_size_nm * 10.0) ** 2


@dataclass
class Progress:
    """Where an acquisition stands; sent to the panel and the console."""

    phase: str
    step: int = 0            # tilt or probe position, 1-based
    steps: int = 0
    frame: int = 0           # frame within the step, 1-based
    frames: int = 0
    elapsed_s: float = 0.0
    remaining_s: float = 0.0
    dose_e_per_A2: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        if not self.steps or not self.frames:
            return 0.0
        return ((self.step - 1) * self.frames + self.frame) / (self.steps * self.frames)

    def describe(self, step_name: str = "tilt") -> str:
        return (f"{self.phase}: {step_name} {self.step}/{self.steps}, frame {self.frame}/{self.frames}, "
                f"{format_duration(self.remaining_s)} left, dose {self.dose_e_per_A2:.3g} e/A^2"
                + (f" ({self.message})" if self.message else ""))


ProgressCallback = Callable[[Progress], None]


class RunControl:
    """Pause, resume and abort requests from the UI thread to an acquisition thread."""

    def __init__(self) -> None:
        self._running = threading.Event()
        self._running.set()
        self._aborted = threading.Event()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def abort(self) -> None:
        self._aborted.set()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def checkpoint(self) -> float:
        """Block while paused; raise :class:`AcquisitionAborted` on abort. Returns the seconds spent paused."""
        t0 = time.monotonic()
        while not self._running.wait(0.05):
            pass
        if self._aborted.is_set():
            raise AcquisitionAborted()
        return time.monotonic() - t0


class ProgressClock:
    """Elapsed and remaining time from the fraction done, excluding time spent paused."""

    def __init__(self, planned_s: float) -> None:
        self.planned_s = planned_s
        self.t0 = time.monotonic()
        self.paused_s = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0 - self.paused_s

    def remaining(self, fraction_done: float) -> float:
        elapsed = self.elapsed()
        if fraction_done <= 0.02:
            return self.planned_s - elapsed
        return elapsed * (1.0 - fraction_done) / fraction_done


ResultCallback = Callable[[dict[str, Any], Any], None]


def instrument_sleep(stem_controller: Any, seconds: float) -> None:
    """Wait ``seconds`` of instrument time.

    A simulated instrument keeps its own clock (``stem_controller.clock.sleep``), which advances simulated time
    and sleeps only as much wall time as its time scale asks; a real instrument is waited for in wall time.
    """
    if seconds <= 0:
        return
    clock = getattr(stem_controller, "clock", None)
    if clock is not None and callable(getattr(clock, "sleep", None)):
        clock.sleep(seconds)
    else:
        time.sleep(seconds)


class Procedure:
    """What every acquisition procedure has: its session stream, run control, progress reports and HAADF scans.

    Parameters
    ----------
    kind
        The session kind (``tilt_series``, ``eels_line_scan``, ``eels_map``).
    settings
        The plan's settings; the instrument and scan device ids are added.
    stem_controller
        ``nion.instrumentation.stem_controller.STEMController`` (real or simulated).
    scan_source
        The scan hardware source (``scan_base.ScanHardwareSource``).
    sender
        A :class:`stemlive.live.wire.transport.FrameSender` connected to the pipeline service.
    control
        Pause/resume/abort from the UI.
    on_progress
        Called with a :class:`Progress` as the acquisition goes on.
    channel
        Index of the HAADF channel among the scan device's channels (see :func:`haadf_channel` to find it by name).
    session_id
        Default: a new one.
    """

    def __init__(
        self,
        *,
        kind: str,
        settings: dict[str, Any],
        stem_controller: Any,
        scan_source: Any,
        sender: Any,
        control: RunControl | None = None,
        on_progress: ProgressCallback | None = None,
        channel: int = 0,
        session_id: str | None = None,
    ) -> None:
        from stemlive.live.wire.transport import SessionStream

        self.stem_controller = stem_controller
        self.scan_source = scan_source
        settings = dict(settings)
        settings["instrument"] = str(getattr(stem_controller, "instrument_id", type(stem_controller).__name__))
        settings["scan_device"] = str(getattr(scan_source, "hardware_source_id", ""))
        self.channel_name: str | None = None
        try:
            self.channel_name = str(scan_source.get_channel_name(channel))
        except Exception:  # a scan source without channel names: the index is all there is
            pass
        settings["haadf_channel"] = self.channel_name or channel
        self.stream = SessionStream(sender, kind, settings, session_id)
        self.control = control or RunControl()
        self.on_progress = on_progress
        self.channel = channel
        self.status = "not started"
        # time.perf_counter() when the instrument was put back, before the session's end waits for the analysis
        # (what the plan's time estimate covers: how long the microscope is busy)
        self.released_at: float | None = None

    @property
    def session_id(self) -> str:
        return str(self.stream.session_id)

    def check_plan(self) -> PlanCheck:
        """The plan check with a fresh test on this procedure's instrument (each procedure defines it)."""
        raise NotImplementedError

    def take_instrument(self, camera_source: Any = None) -> tuple[HardwareState, PlanCheck]:
        """The start every run shares: save the instrument's state, stop a live scan and check the plan on it.

        Returns the saved state (for :meth:`HardwareState.restore` at every ending) and the plan check. When any
        of it fails -- the scan does not stop, the plan is refused (:class:`PlanError`) -- the instrument is put
        back as it was and the exception re-raised: nothing moved, nothing recorded.
        """
        state = HardwareState(self.stem_controller, self.scan_source, camera_source)
        try:
            state.stop_live_scan()
            check = self.check_plan()
            check.raise_if_refused()
        except BaseException:
            state.restore()
            raise
        return state, check

    @contextlib.contextmanager
    def outcome(self, what: str, finish: Callable[[str, str], None]) -> Iterator[None]:
        """The ending every run shares: wrap the acquisition loop in ``with self.outcome(...):``.

        Leaving the block normally sets :attr:`status` to ``"complete"``; :class:`AcquisitionAborted` ends it
        as ``"aborted"`` (not re-raised); any other exception as ``"failed"`` (logged as ``what`` failed, and
        re-raised). ``finish(status, message)`` runs in every case: end the session, put the instrument back,
        the last progress report.
        """
        status, message = "failed", ""
        try:
            yield
            status = "complete"
        except AcquisitionAborted:
            status, message = "aborted", "aborted by the user"
        except Exception as e:
            status, message = "failed", f"{type(e).__name__}: {e}"
            log.exception("%s failed", what)
            raise
        finally:
            self.status = status
            finish(status, message)

    def scan_parameters(self, size_px: int, dwell_us: float, fov_nm: float) -> Any:
        """The scan's current frame parameters with a full (no subscan) square frame of the given settings."""
        return full_frame_parameters(self.scan_source, size_px, dwell_us, fov_nm)

    def scan(self, frame_parameters: Any) -> tuple[np.ndarray, float]:
        """One HAADF frame and its start time. The frame becomes the scan context, so probe positions given as
        fractions of it land where they were picked."""
        xdata, t = self.scan_xdata(frame_parameters)
        return np.asarray(xdata.data, dtype=np.float32), t

    def scan_xdata(self, frame_parameters: Any) -> tuple[Any, float]:
        """One frame of the HAADF channel (Nion's data and metadata) and its start time."""
        scan = self.scan_source
        with_channel(frame_parameters, self.channel)
        scan.set_current_frame_parameters(frame_parameters)
        if not scan.get_channel_enabled(self.channel):
            scan.set_channel_enabled(self.channel, True)
        t = time.time()
        xdata = channel_xdata(scan.record_immediate(frame_parameters), self.channel, self.channel_name)
        if xdata is None:
            raise RuntimeError(f"the scan returned no data for the {self.channel_name or 'HAADF'} channel")
        return xdata, t

    def report(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)


# ----------------------------------------------------------------------------------------------- the instrument


ENERGY_UNITS_TO_MEV = {"ev": 1000.0, "mev": 1.0, "kev": 1.0e6}


def energy_calibration_meV(calibration: Any) -> tuple[float, float]:
    """``(offset_meV, scale_meV)`` of a Nion energy calibration, converted from the unit it states (eV, meV, keV).

    Raises
    ------
    PlanError
        When the calibration's unit is not an energy unit (the spectra could not be placed on an energy axis).
    """
    units = str(getattr(calibration, "units", "") or "").strip()
    factor = ENERGY_UNITS_TO_MEV.get(units.lower())
    if factor is None:
        raise PlanError(f"the EELS camera's energy axis is in {units!r}, not eV or meV: calibrate the spectrometer")
    return float(calibration.offset) * factor, float(calibration.scale) * factor


def beam_current_pA(stem_controller: Any, default_pA: float | None = None) -> float | None:
    """The probe current the instrument reports (control ``BeamCurrent``, in A), else ``default_pA``."""
    try:
        ok, value = stem_controller.TryGetVal("BeamCurrent")
    except Exception:  # an instrument without the control may raise instead of answering False
        ok, value = False, None
    if ok and value is not None and float(value) > 0:
        return float(value) * 1e12
    return default_pA


def instrument_wall_seconds(stem_controller: Any, seconds: float) -> float:
    """Wall time of ``seconds`` of instrument time (see :func:`instrument_sleep`)."""
    clock = getattr(stem_controller, "clock", None)
    if clock is not None and callable(getattr(clock, "wall_seconds", None)):
        return float(clock.wall_seconds(seconds))
    return float(seconds)


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (numpy and Nion objects through ``str`` where nothing else fits)."""
    import json

    from stemlive.live.wire.protocol import json_default

    try:
        return json.loads(json.dumps(value, default=json_default))
    except (TypeError, ValueError):
        return str(value)


def _calibration_dict(calibration: Any) -> dict[str, Any]:
    return {"offset": float(calibration.offset), "scale": float(calibration.scale),
            "units": str(calibration.units or "")}


def nion_metadata(stem_controller: Any, scan_source: Any, camera_source: Any = None,
                  camera_xdata: Any = None, scan_xdata: Any = None) -> dict[str, Any]:
    """What Nion records with its own data: hardware-source properties (frame parameters, channels, camera
    settings), calibrations and instrument properties, as JSON for the session's settings (``settings["nion"]``).
    """
    from nion.instrumentation import stem_controller as stem_module

    out: dict[str, Any] = {"instrument_id": str(getattr(stem_controller, "instrument_id", ""))}
    properties: dict[str, Any] = {}
    try:
        stem_module.update_instrument_properties(properties, stem_controller,
                                                 getattr(camera_source, "camera", None) if camera_source else None)
    except Exception:
        log.exception("could not read the instrument properties")
    controls = {}
    for name in ("BeamCurrent", "EHT", "ConvergenceAngle", "StageOutA", "StageOutB", "StageOutX", "StageOutY",
                 "StageOutZ", "C10", "ZLPoffset"):
        try:
            ok, value = stem_controller.TryGetVal(name)
        except Exception:
            ok, value = False, None
        if ok and value is not None:
            controls[name] = float(value)
    out["instrument"] = _jsonable({**properties, "controls": controls})
    if scan_source is not None:
        scan: dict[str, Any] = {"hardware_source_id": str(getattr(scan_source, "hardware_source_id", ""))}
        try:
            scan["frame_parameters"] = _jsonable(scan_source.get_current_frame_parameters().as_dict())
            scan["channels"] = [str(scan_source.get_channel_name(i)) for i in range(int(scan_source.channel_count))]
        except Exception:
            log.exception("could not read the scan settings")
        if scan_xdata is not None:
            scan["calibrations"] = [_calibration_dict(c) for c in scan_xdata.dimensional_calibrations]
            scan["metadata"] = _jsonable(dict(scan_xdata.metadata or {}))
        out["scan"] = scan
    if camera_source is not None:
        camera: dict[str, Any] = {"hardware_source_id": str(getattr(camera_source, "hardware_source_id", ""))}
        try:
            camera["frame_parameters"] = _jsonable(camera_source.get_current_frame_parameters().as_dict())
        except Exception:
            log.exception("could not read the camera settings")
        if camera_xdata is not None:
            camera["calibrations"] = [_calibration_dict(c) for c in camera_xdata.dimensional_calibrations]
            camera["intensity_calibration"] = _calibration_dict(camera_xdata.intensity_calibration)
            metadata = dict(camera_xdata.metadata or {})
            # make_sequence_data_stream takes the instrument properties from Swift's default STEM controller, which
            # is another instrument when several are registered: this instrument's own
            metadata["instrument"] = out["instrument"]
            camera["metadata"] = _jsonable(metadata)
        out["camera"] = camera
    return out


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``condition`` every 10 ms until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class HardwareState:
    """What a procedure changes on the instrument, saved first and put back at every ending.

    Saved: the scan's frame parameters, enabled channels and whether it was scanning live; the camera's frame
    parameters and whether it was playing; the probe position. :meth:`restore` stops the camera if the
    procedure started it, puts the settings back, returns the probe to where it was (``None`` -- Nion's "no
    position" -- included), and restarts the live scan if the user had one running.
    """

    def __init__(self, stem_controller: Any, scan_source: Any, camera_source: Any = None) -> None:
        self.stem_controller = stem_controller
        self.scan_source = scan_source
        self.camera_source = camera_source
        self.scan_parameters = scan_source.get_current_frame_parameters() if scan_source is not None else None
        self.scan_was_playing = bool(scan_source.is_playing) if scan_source is not None else False
        self.enabled_channels: list[int] = []
        if scan_source is not None:
            self.enabled_channels = [i for i in range(int(scan_source.channel_count))
                                     if scan_source.get_channel_enabled(i)]
        self.camera_parameters = camera_source.get_current_frame_parameters() if camera_source is not None else None
        self.camera_was_playing = bool(camera_source.is_playing) if camera_source is not None else False
        self.probe_position = stem_controller.probe_position
        self.probe_state = str(stem_controller.probe_state)

    def stop_live_scan(self, timeout_s: float = 10.0) -> None:
        """Stop a live scan (at the end of its frame) and confirm the probe is parked.

        Raises
        ------
        RuntimeError
            When the scan does not stop or the instrument does not report the probe parked.
        """
        scan = self.scan_source
        if scan is not None and scan.is_playing:
            scan.stop_playing()
            if not wait_until(lambda: not scan.is_playing, timeout_s):
                scan.abort_playing()
                if not wait_until(lambda: not scan.is_playing, timeout_s):
                    raise RuntimeError("the live scan did not stop")
        self.confirm_parked(timeout_s)

    def confirm_parked(self, timeout_s: float = 5.0) -> None:
        """Raise ``RuntimeError`` unless the instrument reports the probe ``parked`` within ``timeout_s``."""
        stem = self.stem_controller
        if not wait_until(lambda: str(stem.probe_state) == "parked", timeout_s):
            raise RuntimeError(f"the probe is {stem.probe_state}, not parked, after the live scan was stopped")

    def stop_camera(self, timeout_s: float = 10.0) -> None:
        """Stop the camera unless the user had it playing before the procedure."""
        camera = self.camera_source
        if camera is not None and camera.is_playing and not self.camera_was_playing:
            camera.stop_playing()
            if not wait_until(lambda: not camera.is_playing, timeout_s):
                camera.abort_playing()

    def restore(self) -> None:
        """Put everything back (each step on its own: one failing step does not keep the others from running)."""
        steps: list[tuple[str, Callable[[], None]]] = []
        camera, scan, stem = self.camera_source, self.scan_source, self.stem_controller
        if camera is not None:
            steps.append(("stop the camera", self.stop_camera))
            steps.append(("restore the camera settings",
                          lambda: camera.set_current_frame_parameters(self.camera_parameters)))
            if self.camera_was_playing:
                steps.append(("restart the camera", lambda: None if camera.is_playing else camera.start_playing()))
        if scan is not None:
            steps.append(("restore the scan settings", lambda: scan.set_current_frame_parameters(self.scan_parameters)))

            def channels() -> None:
                for i in range(int(scan.channel_count)):
                    scan.set_channel_enabled(i, i in self.enabled_channels)

            steps.append(("restore the scan channels", channels))
        steps.append(("return the probe", lambda: setattr(stem, "probe_position", self.probe_position)))
        if scan is not None and self.scan_was_playing:
            steps.append(("restart the live scan", lambda: None if scan.is_playing else scan.start_playing()))
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("could not %s", what)


def full_frame_parameters(scan_source: Any, size_px: int, dwell_us: float, fov_nm: float,
                          channel: int | None = None) -> Any:
    """The scan's current frame parameters with a full (no subscan) square frame of the given settings.

    With ``channel``, only that channel is acquired and it is enabled on the scan device.
    """
    fp = scan_source.get_current_frame_parameters()
    fp.pixel_size = (size_px, size_px)
    fp.pixel_time_us = dwell_us
    fp.fov_nm = fov_nm
    fp.subscan_pixel_size = None
    fp.subscan_fractional_size = None
    fp.subscan_fractional_center = None
    if channel is not None:
        with_channel(fp, channel)
        if not scan_source.get_channel_enabled(channel):
            scan_source.set_channel_enabled(channel, True)
    return fp


def with_channel(frame_parameters: Any, channel: int) -> Any:
    """``frame_parameters`` with scan channel ``channel`` among its enabled channels, where they list them (Nion's
    frame parameters may carry ``enabled_channel_indexes``, which a recording applies over the channel states)."""
    indexes = getattr(frame_parameters, "enabled_channel_indexes", None)
    if indexes is not None and channel not in indexes:
        frame_parameters.enabled_channel_indexes = sorted([*indexes, channel])
    return frame_parameters


def channel_xdata(xdatas: Any, channel: int, channel_name: str | None = None) -> Any:
    """The data of scan channel ``channel`` (index among all channels) from ``record_immediate``'s list, which
    holds only the enabled channels: matched by the channel index or name in Nion's metadata."""
    xdatas = [x for x in xdatas if x is not None]
    for xdata in xdatas:
        hardware = dict((xdata.metadata or {}).get("hardware_source", {}))
        if hardware.get("channel_index") == channel or (channel_name and hardware.get("channel_name") == channel_name):
            return xdata
    return xdatas[channel] if channel < len(xdatas) else None


def haadf_channel(scan_source: Any, name: str = "HAADF") -> int:
    """Index of the scan channel called ``name`` (any case), else of the first enabled channel, else 0."""
    count = int(scan_source.channel_count)
    names = [str(scan_source.get_channel_name(i) or "") for i in range(count)]
    for i, n in enumerate(names):
        if n.lower() == name.lower():
            return i
    for i, n in enumerate(names):
        if name.lower() in n.lower():
            return i
    return next((i for i in range(count) if scan_source.get_channel_enabled(i)), 0)
