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
        A :class:`stemlive.live.transport.FrameSender` connected to the pipeline service.
    control
        Pause/resume/abort from the UI.
    on_progress
        Called with a :class:`Progress` as the acquisition goes on.
    channel
        Index of the HAADF channel among the scan device's channels.
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
        from stemlive.live.transport import SessionStream

        self.stem_controller = stem_controller
        self.scan_source = scan_source
        settings = dict(settings)
        settings["instrument"] = str(getattr(stem_controller, "instrument_id", type(stem_controller).__name__))
        settings["scan_device"] = str(getattr(scan_source, "hardware_source_id", ""))
        self.stream = SessionStream(sender, kind, settings, session_id)
        self.control = control or RunControl()
        self.on_progress = on_progress
        self.channel = channel
        self.status = "not started"

    @property
    def session_id(self) -> str:
        return str(self.stream.session_id)

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
        fp = self.scan_source.get_current_frame_parameters()
        fp.pixel_size = (size_px, size_px)
        fp.pixel_time_us = dwell_us
        fp.fov_nm = fov_nm
        fp.subscan_pixel_size = None
        fp.subscan_fractional_size = None
        fp.subscan_fractional_center = None
        return fp

    def scan(self, frame_parameters: Any) -> tuple[np.ndarray, float]:
        """One HAADF frame and its start time. The frame becomes the scan context, so probe positions given as
        fractions of it land where they were picked."""
        self.scan_source.set_current_frame_parameters(frame_parameters)
        t = time.time()
        xdata = self.scan_source.record_immediate(frame_parameters)[self.channel]
        if xdata is None:
            raise RuntimeError("the scan returned no data for the HAADF channel")
        return np.asarray(xdata.data, dtype=np.float32), t

    def report(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)
