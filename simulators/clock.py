"""Simulation clock shared by the simulated instrument, scan and camera devices.

Simulated time is the physical time the acquisition would take on a real microscope (dwell x pixels + flyback for
a scan frame, the exposure for a camera frame, the settling time of a stage move). The clock maps it to wall-clock
time with ``time_scale``:

* ``time_scale == 1``: real time (the default inside Swift); simulated time flows with the wall clock.
* ``time_scale == N > 0``: N times faster than real time; simulated time flows N times faster than the wall clock.
* ``time_scale == 0``: as fast as possible; simulated time stands still except when a device accounts for an
  acquisition (:meth:`SimulationClock.elapse`) or waits (:meth:`SimulationClock.sleep`), and nothing sleeps.
"""

from __future__ import annotations

import threading
import time

__all__ = ["SimulationClock"]


class SimulationClock:
    """Simulated time with a wall-clock scale.

    Parameters
    ----------
    time_scale
        Ratio of simulated to wall-clock time; 0 means as fast as possible (no sleeping at all).
    start_s
        Simulated time at construction, in seconds.
    """

    def __init__(self, time_scale: float = 0.0, start_s: float = 0.0) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        self._lock = threading.RLock()
        self._time_scale = float(time_scale)
        self._offset_s = float(start_s)
        self._wall_ref = time.perf_counter()

    @property
    def time_scale(self) -> float:
        """Ratio of simulated to wall-clock time (0: as fast as possible)."""
        return self._time_scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"time_scale must be >= 0, got {value}")
        with self._lock:
            self._offset_s = self.now()
            self._wall_ref = time.perf_counter()
            self._time_scale = float(value)

    @property
    def is_fast(self) -> bool:
        """True when the clock runs as fast as possible (``time_scale == 0``)."""
        return self._time_scale == 0.0

    def now(self) -> float:
        """Return the current simulated time in seconds."""
        with self._lock:
            if self._time_scale == 0.0:
                return self._offset_s
            return self._offset_s + (time.perf_counter() - self._wall_ref) * self._time_scale

    def wall_seconds(self, sim_s: float) -> float:
        """Return the wall-clock duration of ``sim_s`` simulated seconds (0 in fast mode)."""
        if self._time_scale == 0.0 or sim_s <= 0:
            return 0.0
        return sim_s / self._time_scale

    def elapse(self, sim_s: float) -> None:
        """Account for an acquisition of ``sim_s`` simulated seconds whose wall-clock pacing the caller did.

        In fast mode this advances simulated time by ``sim_s``; otherwise simulated time already flowed while the
        device paced itself, so nothing happens.
        """
        if sim_s > 0 and self._time_scale == 0.0:
            with self._lock:
                self._offset_s += sim_s

    def sleep(self, sim_s: float, cancel_event: threading.Event | None = None) -> bool:
        """Wait ``sim_s`` simulated seconds: sleep ``sim_s / time_scale`` wall seconds, or jump in fast mode.

        Returns
        -------
        bool
            False when ``cancel_event`` was set before the wait ended (fast mode never waits, returns True).
        """
        if sim_s <= 0:
            return True
        if self._time_scale == 0.0:
            self.elapse(sim_s)
            return True
        wall = sim_s / self._time_scale
        if cancel_event is not None:
            return not cancel_event.wait(wall)
        time.sleep(wall)
        return True
