"""``stemlive view``: a live viewer of the pipeline service's result stream (ZMQ SUB, lossy).

Two layers:

:class:`ViewerModel`
    Pure Python + numpy. Consumes ``result`` messages in any order, tolerates lost ones and late joining, and
    keeps one :class:`SessionView` per session (the newest session is the current one). Testable without Qt.
:class:`ViewerWindow`
    A pyqtgraph window drawing the current session of a model; a Qt timer polls a
    :class:`~stemlive.live.wire.transport.ResultSubscriber` without blocking (about 20 Hz).

This module imports neither Qt nor pyzmq at import time: the CLI imports it to register the subcommand.
See ``docs/viewer.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7711"
"""Default result endpoint (the service's ``--results``)."""

TILT_PANELS = ("frame", "drift", "sums")
EELS_PANELS = ("waterfall", "temperature", "labels", "peaks")
PANELS = (*TILT_PANELS, *EELS_PANELS, "status")
"""Names of the parts of a :class:`SessionView` that can change (see :attr:`SessionView.changed`)."""


class Subscriber(Protocol):
    """What :meth:`ViewerModel.poll` needs of a subscriber (:class:`~stemlive.live.wire.transport.ResultSubscriber`)."""

    dropped: int

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """Next result or None after ``timeout_s``."""
        ...


def _value(msg: Message) -> Any:
    """The result's value: the payload array (copied out of the receive buffer) or the JSON ``value``."""
    if msg.payload is not None:
        return np.array(msg.payload, copy=True)
    return msg.header.get("value")


def _scalar(value: Any) -> float | None:
    """A finite-or-NaN float from a 0-d/1-element array or a JSON number; None if it is not one."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def _rows(value: Any) -> list[dict[str, Any]]:
    """Table rows: a JSON list of objects (as :func:`~stemlive.live.pipeline.service.publish_result` sends tables)."""
    if isinstance(value, list):
        return [dict(r) for r in value if isinstance(r, Mapping)]
    if isinstance(value, Mapping):
        return [dict(value)]
    return []


def _dense(points: Mapping[int, Any], fill: float = np.nan) -> np.ndarray:
    """Per-index scalars -> 1-D array over ``0..max(index)``; missing indices are ``fill``."""
    if not points:
        return np.zeros(0)
    out = np.full(max(points) + 1, fill, dtype=np.float64)
    for i, v in points.items():
        out[i] = v
    return out


@dataclass
class SessionView:
    """What the viewer knows about one session, built from its result messages.

    Per-row results (``index`` set) are kept by index, so they may arrive in any order and with gaps; a
    whole-dataset result (``index`` absent, as sent at the end of a session) replaces the rows.

    Attributes
    ----------
    session : str
        Session id.
    kind : str
        ``"tilt_series"``, ``"eels"`` or ``"unknown"`` (from the stages seen; sessions carry no kind on the
        result stream).
    results : int
        Results received for this session.
    dropped : int
        Results of this session lost on the way (the subscriber's ``topic_seq`` gaps).
    last_result_t : float
        Time (``t``) of the newest result.
    frame, frame_attrs
        The latest frame preview (highest ``index`` seen) and its attrs (``tilt_index``, ``frame_index``).
    drift : dict[int, tuple[float, float]]
        ``(dy, dx)`` by frame row; see :meth:`drift_trace`.
    sums, tilt_alpha_deg, tilt_beta_deg : dict[int, ...]
        Per-tilt drift-corrected sums and nominal angles by tilt row (acquisition order).
    energy_meV : ndarray or None
        Common energy axis of the spectra.
    spectra : dict[int, ndarray]
        Aligned sum spectrum by point index; see :meth:`waterfall`.
    temperature_K, temperature_err_K : dict[int, float]
        Per-point temperature and its error; see :meth:`temperature_profile`.
    temperature_map, temperature_err_map : ndarray or None
        ``(ny, nx)`` maps when the session is a map (whole dataset at the end, or rows with ``scan_shape``).
    labels : ndarray or None
        Cluster label per point (``(n_points,)``, or ``(ny, nx)`` for maps).
    cluster_mean : ndarray or None
        ``(k, n_channels)`` mean spectrum per cluster.
    peaks, interface : list of dict
        Table rows.
    scan_shape : tuple[int, int] or None
        ``(ny, nx)`` of a map, from a 2-D/3-D whole dataset or a ``scan_shape`` attr.
    point_x_nm : dict[int, float]
        Probe position per point when the results carry an ``x_nm`` attr.
    errors : list of str
        ``stage_error`` messages.
    changed : set of str
        Names from :data:`PANELS` changed since the view last called :meth:`take_changes`.
    """

    session: str
    kind: str = "unknown"
    results: int = 0
    dropped: int = 0
    last_result_t: float = 0.0
    frame: np.ndarray | None = None
    frame_attrs: dict[str, Any] = field(default_factory=dict)
    frame_index: int = -1
    drift: dict[int, tuple[float, float]] = field(default_factory=dict)
    sums: dict[int, np.ndarray] = field(default_factory=dict)
    sum_attrs: dict[int, dict[str, Any]] = field(default_factory=dict)
    tilt_alpha_deg: dict[int, float] = field(default_factory=dict)
    tilt_beta_deg: dict[int, float] = field(default_factory=dict)
    energy_meV: np.ndarray | None = None
    spectra: dict[int, np.ndarray] = field(default_factory=dict)
    temperature_K: dict[int, float] = field(default_factory=dict)
    temperature_err_K: dict[int, float] = field(default_factory=dict)
    temperature_map: np.ndarray | None = None
    temperature_err_map: np.ndarray | None = None
    labels: np.ndarray | None = None
    cluster_mean: np.ndarray | None = None
    peaks: list[dict[str, Any]] = field(default_factory=list)
    interface: list[dict[str, Any]] = field(default_factory=list)
    scan_shape: tuple[int, int] | None = None
    point_x_nm: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=lambda: set(PANELS))

    # ------------------------------------------------------------------ updates
    def apply(self, msg: Message) -> None:
        """Update from one ``result`` message of this session (unknown results are ignored)."""
        h = msg.header
        stage, name = str(h.get("stage", "")), str(h.get("name", ""))
        index = h.get("index")
        index = int(index) if isinstance(index, int) and not isinstance(index, bool) else None
        raw_attrs = h.get("attrs")
        attrs: Mapping[str, Any] = raw_attrs if isinstance(raw_attrs, Mapping) else {}
        self.results += 1
        t = h.get("t")
        if isinstance(t, (int, float)):
            self.last_result_t = max(self.last_result_t, float(t))
        self.changed.add("status")
        if name == "stage_error":
            self.errors.append(f"{stage}: {attrs.get('error', 'stage failed')}")
            return
        if stage == "tilt_series":
            self.kind = "tilt_series"
            self._apply_tilt(name, index, attrs, _value(msg))
        elif stage == "eels":
            self.kind = "eels"
            self._apply_eels(name, index, attrs, _value(msg))

    def _apply_tilt(self, name: str, index: int | None, attrs: Mapping[str, Any], value: Any) -> None:
        if name == "frame_preview":
            arr = np.asarray(value)
            if arr.ndim != 2:
                return
            order = index if index is not None else self.frame_index + 1
            if order >= self.frame_index:  # an older preview arriving late does not replace a newer one
                self.frame, self.frame_attrs, self.frame_index = arr, dict(attrs), order
                self.changed.add("frame")
        elif name == "drift_px":
            arr = np.asarray(value, dtype=np.float64)
            if index is not None and arr.size == 2:
                self.drift[index] = (float(arr.reshape(-1)[0]), float(arr.reshape(-1)[1]))
            elif index is None and arr.ndim == 2 and arr.shape[1] == 2:  # whole (n_frames, 2) at the end
                self.drift = {i: (float(r[0]), float(r[1])) for i, r in enumerate(arr)}
            else:
                return
            self.changed.add("drift")
        elif name == "sums":
            arr = np.asarray(value)
            if index is not None and arr.ndim == 2:
                self.sums[index] = arr
                self.sum_attrs[index] = dict(attrs)
            elif index is None and arr.ndim == 3:
                self.sums = {i: a for i, a in enumerate(arr)}
            else:
                return
            self.changed.add("sums")
        elif name in ("tilt_alpha_deg", "tilt_beta_deg"):
            target = self.tilt_alpha_deg if name == "tilt_alpha_deg" else self.tilt_beta_deg
            if index is not None:
                v = _scalar(value)
                if v is None:
                    return
                target[index] = v
            else:
                arr = np.asarray(value, dtype=np.float64).reshape(-1)
                target.clear()
                target.update({i: float(v) for i, v in enumerate(arr)})
            self.changed.add("sums")

    def _note_shape(self, attrs: Mapping[str, Any]) -> None:
        shape = attrs.get("scan_shape")
        if isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape):
            new = (int(shape[0]), int(shape[1]))
            if new != self.scan_shape and not (new[0] == 1 or new[1] == 1):
                self.scan_shape = new
                self.changed.update({"temperature", "labels"})

    def _apply_eels(self, name: str, index: int | None, attrs: Mapping[str, Any], value: Any) -> None:
        self._note_shape(attrs)
        x = attrs.get("x_nm")
        if index is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
            self.point_x_nm[index] = float(x)
        arr: np.ndarray
        if name == "energy_meV":
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
            if arr.size:
                self.energy_meV = arr
                self.changed.add("waterfall")
        elif name == "sum":
            arr = np.asarray(value)
            if index is not None and arr.ndim == 1:
                self.spectra[index] = arr
            elif index is None and arr.ndim >= 2:  # (n_points, nc) or (ny, nx, nc) at the end of a map
                if arr.ndim == 3:
                    self.scan_shape = (int(arr.shape[0]), int(arr.shape[1]))
                flat = arr.reshape(-1, arr.shape[-1])
                self.spectra = {i: s for i, s in enumerate(flat)}
            else:
                return
            self.changed.add("waterfall")
        elif name in ("temperature_K", "temperature_err_K"):
            is_err = name == "temperature_err_K"
            points = self.temperature_err_K if is_err else self.temperature_K
            if index is not None:
                v = _scalar(value)
                if v is None:
                    return
                points[index] = v
            else:
                arr = np.asarray(value, dtype=np.float64)
                if arr.ndim == 2:
                    self.scan_shape = (int(arr.shape[0]), int(arr.shape[1]))
                    if is_err:
                        self.temperature_err_map = arr
                    else:
                        self.temperature_map = arr
                points.clear()
                points.update({i: float(v) for i, v in enumerate(arr.reshape(-1))})
            self.changed.add("temperature")
        elif name == "labels":
            arr = np.asarray(value)
            if arr.ndim in (1, 2) and arr.size:
                if arr.ndim == 2:
                    self.scan_shape = (int(arr.shape[0]), int(arr.shape[1]))
                self.labels = arr.astype(np.int64, copy=False)
                self.changed.add("labels")
        elif name == "cluster_mean":
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim == 2:
                self.cluster_mean = arr
                self.changed.add("waterfall")
        elif name == "peaks":
            self.peaks = _rows(value)
            self.changed.add("peaks")
        elif name == "interface":
            self.interface = _rows(value)
            self.changed.add("peaks")

    def take_changes(self, names: Iterable[str] | None = None) -> set[str]:
        """The parts changed since they were last taken (and forget them); only ``names`` if given."""
        wanted = self.changed if names is None else self.changed & set(names)
        self.changed -= wanted
        return set(wanted)

    # ------------------------------------------------------------------ derived arrays for plotting
    @property
    def is_map(self) -> bool:
        """True when the EELS session is a 2-D map (``scan_shape`` known with both sides > 1)."""
        return self.scan_shape is not None and self.scan_shape[0] > 1 and self.scan_shape[1] > 1

    def drift_trace(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(frame_rows, dy, dx)`` over ``0..max row``; missing rows are NaN (plotted as gaps)."""
        if not self.drift:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        n = max(self.drift) + 1
        dy = np.full(n, np.nan)
        dx = np.full(n, np.nan)
        for i, (y, x) in self.drift.items():
            dy[i], dx[i] = y, x
        return np.arange(n, dtype=np.float64), dy, dx

    def tilt_rows(self) -> list[int]:
        """Tilt rows that have a sum, in acquisition order."""
        return sorted(self.sums)

    def tilt_label(self, row: int) -> str:
        """``"tilt 3: alpha 12.6 deg, beta -12.6 deg"`` with whatever is known of that tilt."""
        parts = [f"tilt {row}"]
        a, b = self.tilt_alpha_deg.get(row), self.tilt_beta_deg.get(row)
        a = a if a is not None else self.sum_attrs.get(row, {}).get("alpha_deg")
        b = b if b is not None else self.sum_attrs.get(row, {}).get("beta_deg")
        if isinstance(a, (int, float)):
            parts.append(f"alpha {a:.1f} deg")
        if isinstance(b, (int, float)):
            parts.append(f"beta {b:.1f} deg")
        return ", ".join(parts)

    def waterfall(self) -> np.ndarray | None:
        """``(n_points, n_channels)`` float array of the point spectra; rows of missing points are NaN."""
        if not self.spectra:
            return None
        nc = max(s.shape[-1] for s in self.spectra.values())
        out = np.full((max(self.spectra) + 1, nc), np.nan, dtype=np.float64)
        for i, s in self.spectra.items():
            out[i, : s.shape[-1]] = s
        return out

    def energy_axis(self) -> np.ndarray | None:
        """The energy axis matching :meth:`waterfall` columns (channel numbers if no axis arrived yet)."""
        wf = self.waterfall()
        if wf is None:
            return self.energy_meV
        if self.energy_meV is not None and self.energy_meV.size == wf.shape[1]:
            return self.energy_meV
        return np.arange(wf.shape[1], dtype=np.float64)

    def temperature_profile(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, T_K, err_K)`` of the points with a temperature, sorted by x.

        x is the probe position in nm when the results carried ``x_nm`` for every such point, else the point
        index. A missing error is NaN.
        """
        idx = np.array(sorted(self.temperature_K), dtype=np.int64)
        if idx.size == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        t = np.array([self.temperature_K[i] for i in idx])
        err = np.array([self.temperature_err_K.get(int(i), np.nan) for i in idx])
        if all(int(i) in self.point_x_nm for i in idx):
            x = np.array([self.point_x_nm[int(i)] for i in idx])
            order = np.argsort(x, kind="stable")
            return x[order], t[order], err[order]
        return idx.astype(np.float64), t, err

    def _as_map(self, points: Mapping[int, float]) -> np.ndarray | None:
        if not self.is_map or not points:
            return None
        assert self.scan_shape is not None
        ny, nx = self.scan_shape
        flat = np.full(ny * nx, np.nan)
        for i, v in points.items():
            if 0 <= i < flat.size:
                flat[i] = v
        return flat.reshape(ny, nx)

    def temperature_image(self) -> np.ndarray | None:
        """``(ny, nx)`` temperature map for map sessions (the final map, or the points so far), else None."""
        if self.temperature_map is not None:
            return self.temperature_map
        return self._as_map(self.temperature_K)

    def temperature_err_image(self) -> np.ndarray | None:
        """``(ny, nx)`` map of the temperature errors for map sessions, else None."""
        if self.temperature_err_map is not None:
            return self.temperature_err_map
        return self._as_map(self.temperature_err_K)

    def labels_image(self) -> np.ndarray | None:
        """Labels as a 2-D image: ``(ny, nx)`` for maps, ``(1, n_points)`` (a strip) for line scans."""
        if self.labels is None:
            return None
        if self.labels.ndim == 2:
            return self.labels
        if self.is_map:
            assert self.scan_shape is not None
            ny, nx = self.scan_shape
            if self.labels.size == ny * nx:
                return self.labels.reshape(ny, nx)
        return self.labels.reshape(1, -1)

    def summary(self) -> str:
        """One line: kind and counts of what arrived."""
        bits = [self.kind]
        if self.kind == "tilt_series" or self.drift or self.sums:
            bits.append(f"{len(self.drift)} drift rows, {len(self.sums)} tilt sums")
        if self.kind == "eels" or self.spectra:
            shape = ""
            if self.is_map:
                assert self.scan_shape is not None  # is_map implies a known scan_shape
                shape = f" ({self.scan_shape[0]}x{self.scan_shape[1]} map)"
            bits.append(f"{len(self.spectra)} spectra{shape}, {len(self.temperature_K)} temperatures")
        if self.errors:
            bits.append(f"{len(self.errors)} stage error(s)")
        return "; ".join(bits)


class ViewerModel:
    """State of the viewer built from result messages; independent of Qt and of sockets.

    Parameters
    ----------
    max_sessions : int
        Sessions kept (oldest forgotten first); the current one is always kept.

    Attributes
    ----------
    sessions : OrderedDict[str, SessionView]
        Sessions by id, in the order they were first seen.
    current : str or None
        The newest session seen (shown in the status line). A late result of an older session updates that
        session but does not switch back to it.
    latest : dict[str, str]
        The newest session of each kind (``"tilt_series"``, ``"eels"``): the window draws the tilt-series
        panels from one and the EELS panels from the other, so a line scan does not blank the tilt series
        acquired just before it.
    results : int
        Results applied in total.
    dropped : int
        Results lost on the way (from the subscriber's ``topic_seq`` gap counter; joining late is no loss).
    """

    def __init__(self, max_sessions: int = 8) -> None:
        self.max_sessions = max(1, int(max_sessions))
        self.sessions: OrderedDict[str, SessionView] = OrderedDict()
        self.current: str | None = None
        self.latest: dict[str, str] = {}
        self._order: dict[str, int] = {}
        self.results = 0
        self.dropped = 0
        self.session_switches = 0
        self.last_poll_monotonic = 0.0
        self.last_result_monotonic: float | None = None

    @property
    def view(self) -> SessionView | None:
        """The current session's state, or None before the first result."""
        return self.sessions.get(self.current) if self.current is not None else None

    def latest_view(self, kind: str) -> SessionView | None:
        """The newest session with results of ``kind`` (``"tilt_series"`` or ``"eels"``), or None."""
        sid = self.latest.get(kind)
        return self.sessions.get(sid) if sid is not None else None

    def apply(self, msg: Message) -> SessionView | None:
        """Apply one message; non-result messages and results without a session are ignored.

        Returns
        -------
        SessionView or None
            The session it updated.
        """
        if msg.header.get("type") != "result":
            return None
        sid = str(msg.header.get("session") or "")
        if not sid:
            return None
        state = self.sessions.get(sid)
        if state is None:
            state = SessionView(sid)
            self.sessions[sid] = state
            self._order[sid] = len(self._order)
            if self.current is not None:
                self.session_switches += 1
                log.info("new session %s: switching from %s", sid, self.current)
            self.current = sid
            while len(self.sessions) > self.max_sessions:
                oldest = next(iter(self.sessions))
                if oldest == self.current:
                    break
                del self.sessions[oldest]
        state.apply(msg)
        if state.kind != "unknown":
            shown = self.latest.get(state.kind)
            if shown is None or shown not in self.sessions or self._order[shown] < self._order[sid]:
                if shown != sid:
                    state.changed.update(PANELS)
                self.latest[state.kind] = sid
        self.results += 1
        self.last_result_monotonic = time.monotonic()
        return state

    def apply_all(self, messages: Iterable[Message]) -> int:
        """Apply several messages; returns how many."""
        n = 0
        for msg in messages:
            self.apply(msg)
            n += 1
        return n

    def update_dropped(self, total: int, by_session: Mapping[str, int] | None = None) -> None:
        """Take over the subscriber's loss counters."""
        if total != self.dropped:
            self.dropped = int(total)
            if self.view is not None:
                self.view.changed.add("status")
        for sid, n in (by_session or {}).items():
            state = self.sessions.get(sid)
            if state is not None and state.dropped != n:
                state.dropped = int(n)
                state.changed.add("status")

    def poll(self, subscriber: Subscriber, *, max_messages: int = 500, budget_s: float = 0.03) -> int:
        """Drain what the subscriber has queued, without blocking.

        Parameters
        ----------
        subscriber
            A :class:`~stemlive.live.wire.transport.ResultSubscriber` (anything with ``recv(timeout_s)`` and
            ``dropped``; ``dropped_by_session`` is used when present).
        max_messages, budget_s
            Stop after this many messages or this much time, so a GUI stays responsive under a flood (what is
            not read stays queued; past the socket's high-water mark the stream drops and counts it).

        Returns
        -------
        int
            Messages applied.
        """
        n = 0
        deadline = time.monotonic() + budget_s
        recovery = self._recovery_for(subscriber)
        while n < max_messages:
            msg = subscriber.recv(timeout_s=0)
            if msg is None:
                break
            self.apply(msg)
            n += 1
            if recovery is not None:
                recovery.received()
            if time.monotonic() > deadline:
                break
        if n == 0 and recovery is not None:
            self.apply_all(recovery.idle())  # final results lost on the stream, asked for again
        self.update_dropped(int(getattr(subscriber, "dropped", 0)), getattr(subscriber, "dropped_by_session", None))
        self.last_poll_monotonic = time.monotonic()
        return n

    def _recovery_for(self, subscriber: Subscriber) -> Any:
        """A :class:`~stemlive.live.wire.transport.ResultRecovery` for a real subscriber (None for test doubles)."""
        from stemlive.live.wire.transport import ResultRecovery, ResultSubscriber

        if not isinstance(subscriber, ResultSubscriber):
            return None
        recovery = getattr(self, "_recovery", None)
        if recovery is None or recovery.subscriber is not subscriber:
            recovery = self._recovery = ResultRecovery(subscriber)
        return recovery

    def status_text(self, endpoint: str | None = None) -> str:
        """The status line: endpoint, current session, its contents, counts and losses."""
        parts = []
        if endpoint:
            parts.append(endpoint)
        view = self.view
        if view is None:
            parts.append("waiting for results")
        else:
            parts.append(f"session {view.session}")
            parts.append(view.summary())
            parts.append(f"{view.results} results ({view.dropped} dropped)")
        parts.append(f"total {self.results} results, {self.dropped} dropped")
        if len(self.sessions) > 1:
            parts.append(f"{len(self.sessions)} sessions seen")
        if view is not None and view.errors:
            parts.append(view.errors[-1])
        return " | ".join(parts)


# ====================================================================================================== Qt view


def _finite_levels(arr: np.ndarray) -> tuple[float, float] | None:
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size > 16 else (finite.min(), finite.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def make_viewer_window(
    model: ViewerModel | None = None,
    subscriber: Subscriber | None = None,
    *,
    endpoint: str | None = None,
    poll_hz: float = 20.0,
) -> Any:
    """Create a :class:`ViewerWindow` (the Qt application must exist). Defined lazily: it imports Qt."""
    return _window_class()(model, subscriber, endpoint=endpoint, poll_hz=poll_hz)


_WINDOW_CLASS: type | None = None


def _window_class() -> type:
    """Build the Qt window class on first use so importing this module stays cheap."""
    global _WINDOW_CLASS
    if _WINDOW_CLASS is not None:
        return _WINDOW_CLASS

    import pyqtgraph as pg
    from pyqtgraph.dockarea import Dock, DockArea
    from pyqtgraph.Qt import QtCore, QtWidgets

    inferno = pg.colormap.get("inferno")
    label_colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

    def image_plot(title: str, *, aspect: bool = True, x: str | None = None, y: str | None = None) -> tuple[Any, Any]:
        plot = pg.PlotWidget(title=title)
        img = pg.ImageItem(axisOrder="row-major")
        plot.addItem(img)
        if aspect:
            plot.setAspectLocked(True)
        plot.invertY(True)
        if x:
            plot.setLabel("bottom", x)
        if y:
            plot.setLabel("left", y)
        return plot, img

    class ViewerWindow(QtWidgets.QMainWindow):
        """The live viewer window: current frame, drift, tilt sums, EELS waterfall, temperature, labels, peaks.

        Parameters
        ----------
        model
            The state to draw (a new :class:`ViewerModel` if None).
        subscriber
            Polled by a timer at ``poll_hz`` when given (non-blocking); without one, feed ``model`` and call
            :meth:`refresh`.
        endpoint
            Shown in the status line.
        """

        def __init__(
            self,
            model: ViewerModel | None = None,
            subscriber: Subscriber | None = None,
            *,
            endpoint: str | None = None,
            poll_hz: float = 20.0,
        ) -> None:
            super().__init__()
            self.model = model if model is not None else ViewerModel()
            self.subscriber = subscriber
            self.endpoint = endpoint
            self._shown_session: str | None = None
            self._shown_eels_session: str | None = None
            self.setWindowTitle(f"stemlive viewer{' - ' + endpoint if endpoint else ''}")
            self.resize(1500, 900)
            area = DockArea()
            self.setCentralWidget(area)
            self.docks: dict[str, Any] = {}

            # --- tilt series
            self.frame_plot, self.frame_img = image_plot("latest frame")
            self.drift_plot = pg.PlotWidget(title="drift vs first frame of its tilt")
            self.drift_plot.addLegend(offset=(5, 5))
            self.drift_plot.setLabel("bottom", "frame")
            self.drift_plot.setLabel("left", "shift (px)")
            self.drift_plot.getAxis("left").enableAutoSIPrefix(False)
            self.drift_plot.showGrid(x=True, y=True, alpha=0.3)
            self.dy_curve = self.drift_plot.plot([], [], pen=pg.mkPen((80, 160, 255), width=2), symbol="o",
                                                 symbolSize=4, name="dy", connect="finite")
            self.dx_curve = self.drift_plot.plot([], [], pen=pg.mkPen((255, 140, 40), width=2), symbol="o",
                                                 symbolSize=4, name="dx", connect="finite")
            sums_widget = QtWidgets.QWidget()
            sums_layout = QtWidgets.QVBoxLayout(sums_widget)
            sums_layout.setContentsMargins(0, 0, 0, 0)
            self.sums_plot, self.sums_img = image_plot("per-tilt sums")
            self.sums_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
            self.sums_slider.setRange(0, 0)
            self.sums_label = QtWidgets.QLabel("no tilt sums yet")
            self.sums_slider.valueChanged.connect(self._show_sum)
            sums_layout.addWidget(self.sums_plot, 1)
            row = QtWidgets.QHBoxLayout()
            row.addWidget(self.sums_slider, 1)
            row.addWidget(self.sums_label)
            sums_layout.addLayout(row)
            self._follow_latest_sum = True

            # --- EELS
            self.waterfall_plot, self.waterfall_img = image_plot(
                "EELS waterfall (log10 counts)", aspect=False, x="energy loss (meV)", y="point")
            self.temp_plot = pg.PlotWidget(title="temperature")
            self.temp_plot.setLabel("left", "T", units="K")
            self.temp_plot.setLabel("bottom", "point")
            self.temp_plot.showGrid(x=True, y=True, alpha=0.3)
            self.temp_err = pg.ErrorBarItem(x=np.zeros(0), y=np.zeros(0), height=np.zeros(0),
                                            pen=pg.mkPen((200, 200, 200)), beam=0.0)
            self.temp_curve = self.temp_plot.plot([], [], pen=pg.mkPen((255, 90, 90), width=2), symbol="o",
                                                  symbolSize=6, symbolBrush=(255, 90, 90), connect="finite")
            self.temp_plot.addItem(self.temp_err)
            self.temp_img = pg.ImageItem(axisOrder="row-major")
            self.temp_img.setVisible(False)
            self.temp_plot.addItem(self.temp_img)
            self.temp_bar: Any = None
            self.labels_plot, self.labels_img = image_plot("cluster labels", aspect=False, x="point")
            self.labels_plot.getAxis("left").setTicks([[]])
            self.peaks_table = QtWidgets.QTableWidget(0, 0)
            self.peaks_table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)

            def add(name: str, title: str, widget: Any, position: str = "bottom", relative: Any = None,
                    size: tuple[int, int] = (400, 300)) -> Any:
                dock = Dock(title, size=size)
                dock.addWidget(widget)
                area.addDock(dock, position, relative)
                self.docks[name] = dock
                return dock

            d_frame = add("frame", "Frame", self.frame_plot, "left")
            d_drift = add("drift", "Drift", self.drift_plot, "right", d_frame)
            add("sums", "Tilt sums", sums_widget, "right", d_drift)
            d_wf = add("waterfall", "EELS waterfall", self.waterfall_plot, "bottom")  # second row
            d_temp = add("temperature", "Temperature", self.temp_plot, "right", d_wf)
            d_lab = add("labels", "Labels", self.labels_plot, "right", d_temp, size=(400, 150))
            add("peaks", "Peaks", self.peaks_table, "bottom", d_lab, size=(400, 150))

            self.status_label = QtWidgets.QLabel("waiting for results")
            self.statusBar().addWidget(self.status_label, 1)

            self.timer = QtCore.QTimer(self)
            self.timer.setInterval(max(1, int(1000.0 / poll_hz)))
            self.timer.timeout.connect(self.poll)
            if subscriber is not None:
                self.timer.start()
            self.refresh(force=True)

        # ---------------------------------------------------------------- polling
        def poll(self) -> int:
            """Timer slot: drain the subscriber without blocking and redraw what changed."""
            n = 0
            if self.subscriber is not None:
                try:
                    n = self.model.poll(self.subscriber)
                except Exception:  # a viewer must keep running
                    log.exception("polling the result stream failed")
            self.refresh()
            return n

        # ---------------------------------------------------------------- drawing
        def refresh(self, force: bool = False) -> None:
            """Redraw what changed: tilt panels from the newest tilt series, EELS panels from the newest EELS
            session (everything after a session switch)."""
            tilt = self.model.latest_view("tilt_series")
            if tilt is not None:
                changed = tilt.take_changes(TILT_PANELS)
                if force or tilt.session != self._shown_session:
                    changed = set(TILT_PANELS)
                    self._shown_session = tilt.session
                    self._follow_latest_sum = True
                if "frame" in changed:
                    self._draw_frame(tilt)
                if "drift" in changed:
                    self._draw_drift(tilt)
                if "sums" in changed:
                    self._draw_sums(tilt)
            eels = self.model.latest_view("eels")
            if eels is not None:
                changed = eels.take_changes(EELS_PANELS)
                if force or eels.session != self._shown_eels_session:
                    changed = set(EELS_PANELS)
                    self._shown_eels_session = eels.session
                if "waterfall" in changed:
                    self._draw_waterfall(eels)
                if "temperature" in changed:
                    self._draw_temperature(eels)
                if "labels" in changed:
                    self._draw_labels(eels)
                if "peaks" in changed:
                    self._draw_peaks(eels)
            self.status_label.setText(self.model.status_text(self.endpoint))

        def _draw_frame(self, view: SessionView) -> None:
            if view.frame is None:
                self.frame_img.clear()
                self.frame_plot.setTitle("latest frame")
                return
            self.docks["frame"].setTitle(f"Frame - {view.session}")
            frame = np.asarray(view.frame, dtype=np.float32)
            levels = _finite_levels(frame)
            self.frame_img.setImage(frame, levels=levels, autoLevels=levels is None)
            a = view.frame_attrs
            title = "latest frame"
            if "tilt_index" in a or "frame_index" in a:
                title += f" (tilt {a.get('tilt_index', '?')}, frame {a.get('frame_index', '?')})"
            self.frame_plot.setTitle(title)

        def _draw_drift(self, view: SessionView) -> None:
            rows, dy, dx = view.drift_trace()
            with warnings.catch_warnings():  # pyqtgraph's bounds of all-NaN symbol data
                warnings.simplefilter("ignore", RuntimeWarning)
                self.dy_curve.setData(rows, dy, connect="finite")
                self.dx_curve.setData(rows, dx, connect="finite")

        def _draw_sums(self, view: SessionView) -> None:
            rows = view.tilt_rows()
            self.sums_slider.blockSignals(True)
            at_end = self.sums_slider.value() >= self.sums_slider.maximum()
            self.sums_slider.setRange(0, max(0, len(rows) - 1))
            if rows and (self._follow_latest_sum or at_end):
                self.sums_slider.setValue(len(rows) - 1)
            self.sums_slider.blockSignals(False)
            self._show_sum(self.sums_slider.value(), user=False)

        def _show_sum(self, position: int, user: bool = True) -> None:
            view = self.model.latest_view("tilt_series")
            rows = view.tilt_rows() if view is not None else []
            if user:
                self._follow_latest_sum = position >= len(rows) - 1
            if view is None or not rows:
                self.sums_img.clear()
                self.sums_label.setText("no tilt sums yet")
                return
            row = rows[min(max(position, 0), len(rows) - 1)]
            img = np.asarray(view.sums[row], dtype=np.float32)
            levels = _finite_levels(img)
            self.sums_img.setImage(img, levels=levels, autoLevels=levels is None)
            self.sums_label.setText(f"{view.tilt_label(row)} ({len(rows)} tilts)")

        def _draw_waterfall(self, view: SessionView) -> None:
            wf = view.waterfall()
            if wf is None:
                self.waterfall_img.clear()
                return
            self.docks["waterfall"].setTitle(f"EELS waterfall - {view.session}")
            with np.errstate(invalid="ignore", divide="ignore"):
                img = np.log10(np.where(wf > 0, wf, np.nan)).astype(np.float32)
            levels = _finite_levels(img)
            self.waterfall_img.setImage(np.nan_to_num(img, nan=levels[0] if levels else 0.0), levels=levels,
                                        autoLevels=levels is None)
            self.waterfall_img.setColorMap(inferno)
            energy = view.energy_axis()
            if energy is not None and energy.size > 1:
                step = float(energy[1] - energy[0])
                self.waterfall_img.setRect(QtCore.QRectF(float(energy[0]) - step / 2, -0.5,
                                                         step * wf.shape[1], float(wf.shape[0])))
                self.waterfall_plot.setLabel("bottom", "energy loss (meV)" if view.energy_meV is not None
                                             and view.energy_meV.size == wf.shape[1] else "channel")

        def _draw_temperature(self, view: SessionView) -> None:
            image = view.temperature_image()
            if image is not None:
                self.temp_curve.setVisible(False)
                self.temp_err.setVisible(False)
                self.temp_img.setVisible(True)
                levels = _finite_levels(image)
                self.temp_img.setImage(np.nan_to_num(image.astype(np.float32), nan=levels[0] if levels else 0.0),
                                       levels=levels, autoLevels=levels is None)
                self.temp_img.setColorMap(inferno)
                self.temp_plot.setAspectLocked(True)
                self.temp_plot.invertY(True)
                self.temp_plot.setLabel("left", "y (px)")
                self.temp_plot.setLabel("bottom", "x (px)")
                err = view.temperature_err_image()
                med_err = float(np.nanmedian(err)) if err is not None and np.isfinite(err).any() else float("nan")
                t_range = f"{levels[0]:.0f}..{levels[1]:.0f} K" if levels else ""
                self.temp_plot.setTitle(f"temperature map {t_range}" +
                                        (f" (median error {med_err:.0f} K)" if np.isfinite(med_err) else ""))
                if self.temp_bar is None and levels is not None:
                    self.temp_bar = pg.ColorBarItem(values=levels, colorMap=inferno, interactive=False)
                    self.temp_bar.setImageItem(self.temp_img, insert_in=self.temp_plot.getPlotItem())
                elif self.temp_bar is not None and levels is not None:
                    self.temp_bar.setLevels(levels)
                return
            self.temp_img.setVisible(False)
            self.temp_curve.setVisible(True)
            self.temp_err.setVisible(True)
            self.temp_plot.setAspectLocked(False)
            self.temp_plot.invertY(False)
            x, t, err = view.temperature_profile()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.temp_curve.setData(x, t, connect="finite")
            ok = np.isfinite(err)
            self.temp_err.setData(x=x[ok], y=t[ok], height=2.0 * err[ok])
            self.temp_plot.setLabel("left", "T", units="K")
            self.temp_plot.setLabel("bottom", "x (nm)" if view.point_x_nm and x.size and
                                    all(int(i) in view.point_x_nm for i in view.temperature_K) else "point")
            self.temp_plot.setTitle(f"temperature ({x.size} points)")

        def _draw_labels(self, view: SessionView) -> None:
            image = view.labels_image()
            if image is None:
                self.labels_img.clear()
                return
            k = max(int(image.max()) + 1, 1) if image.size else 1
            lut = np.array([label_colors[i % len(label_colors)] for i in range(k)], dtype=np.uint8)
            rgb = lut[np.clip(image, 0, k - 1)]
            self.labels_img.setImage(rgb, levels=(0, 255), autoLevels=False)
            strip = image.shape[0] == 1
            self.labels_plot.setAspectLocked(not strip)
            self.labels_plot.setTitle(f"cluster labels (k={k})")
            self.labels_plot.setLabel("bottom", "point" if strip else "x (px)")

        def _draw_peaks(self, view: SessionView) -> None:
            rows = view.peaks + view.interface
            columns: list[str] = []
            for r in rows:
                for key in r:
                    if key not in columns:
                        columns.append(key)
            self.peaks_table.clear()
            self.peaks_table.setColumnCount(len(columns))
            self.peaks_table.setRowCount(len(rows))
            self.peaks_table.setHorizontalHeaderLabels(columns)
            for i, r in enumerate(rows):
                for j, key in enumerate(columns):
                    v = r.get(key, "")
                    text = f"{v:.4g}" if isinstance(v, float) else str(v)
                    self.peaks_table.setItem(i, j, QtWidgets.QTableWidgetItem(text))
            self.peaks_table.resizeColumnsToContents()

        def dispose(self) -> None:
            """Stop polling, close and delete the window now.

            Call it before the interpreter exits: a window left to the garbage collector at shutdown can abort
            the process (PySide6 6.12 + pyqtgraph 0.14, seen under pytest).
            """
            self.timer.stop()
            self.close()
            self.deleteLater()
            app = QtWidgets.QApplication.instance()
            if app is not None:
                app.sendPostedEvents(None, 0)

        # ---------------------------------------------------------------- screenshots
        def grab_png(self, path: str | Path) -> bool:
            """Render the window into a PNG file; returns whether it was written."""
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            return bool(self.grab().save(str(path), "PNG"))

    _WINDOW_CLASS = ViewerWindow
    return ViewerWindow


def __getattr__(name: str) -> Any:
    """``ViewerWindow`` is created on first access (it needs Qt)."""
    if name == "ViewerWindow":
        return _window_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def image_stats(path: str | Path) -> tuple[int, int, int, float]:
    """``(width, height, distinct colours, grey-level std)`` of an image file (uses Qt's image reader).

    A blank image (one colour) has 1 distinct colour and std 0.
    """
    from pyqtgraph.Qt import QtGui

    image = QtGui.QImage(str(path))
    if image.isNull():
        raise ValueError(f"{path}: not a readable image")
    image = image.convertToFormat(QtGui.QImage.Format.Format_RGB32)
    w, h = image.width(), image.height()
    buf = np.frombuffer(image.constBits(), dtype=np.uint8, count=image.sizeInBytes())
    px = buf.reshape(h, image.bytesPerLine())[:, : 4 * w].reshape(h, w, 4)[..., :3]
    flat = px.reshape(-1, 3).astype(np.uint32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    return w, h, int(np.unique(packed).size), float(px.mean(axis=2).std())


def is_blank(path: str | Path, *, min_colours: int = 16) -> bool:
    """True if the image has fewer than ``min_colours`` distinct colours (an empty or unrendered window)."""
    _, _, colours, std = image_stats(path)
    return colours < min_colours or std < 1.0


# ====================================================================================================== CLI


def run_viewer(
    endpoint: str = DEFAULT_ENDPOINT,
    *,
    screenshot: str | Path | None = None,
    after_s: float = 5.0,
    idle_s: float | None = None,
    min_results: int = 0,
    topics: Iterable[str] | None = None,
    poll_hz: float = 20.0,
) -> int:
    """Open the viewer on ``endpoint`` and run the Qt event loop.

    Parameters
    ----------
    endpoint
        The service's result endpoint.
    screenshot
        If given, grab the window to this PNG and exit: after ``after_s`` seconds, or earlier once results
        have arrived and none came for ``idle_s`` seconds.
    min_results
        With ``screenshot``: exit with status 3 if fewer results than this arrived.
    topics
        ``"stage"`` / ``"stage/name"`` filters for the subscription (default: everything).

    Returns
    -------
    int
        Exit status: 0, or 1 if the screenshot could not be written / is blank, 3 if too few results arrived.
    """
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtCore

    from stemlive.live.wire.transport import ResultSubscriber

    app = pg.mkQApp("stemlive viewer")
    # pyqtgraph computes symbol bounds with nanmin during auto-range; NaN gaps in the traces are intended
    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
    subscriber = ResultSubscriber(endpoint, topics=list(topics) if topics else None)
    model = ViewerModel()
    window = make_viewer_window(model, subscriber, endpoint=endpoint, poll_hz=poll_hz)
    window.show()
    status = {"code": 0}

    if screenshot is not None:
        started = time.monotonic()

        def check() -> None:
            now = time.monotonic()
            last = model.last_result_monotonic
            idle_done = idle_s is not None and last is not None and now - last >= idle_s
            if now - started < after_s and not idle_done:
                return
            window.poll()
            app.processEvents()
            ok = window.grab_png(screenshot)
            if not ok:
                print(f"stemlive view: could not write {screenshot}", flush=True)
                status["code"] = 1
            elif is_blank(screenshot):
                print(f"stemlive view: {screenshot} is blank", flush=True)
                status["code"] = 1
            elif model.results < min_results:
                print(f"stemlive view: only {model.results} results arrived (wanted {min_results})", flush=True)
                status["code"] = 3
            print(f"stemlive view: wrote {screenshot}: {model.status_text(endpoint)}", flush=True)
            checker.stop()
            app.quit()

        checker = QtCore.QTimer()
        checker.setInterval(100)
        checker.timeout.connect(check)
        checker.start()
    try:
        app.exec()
    finally:
        window.dispose()
        subscriber.close()
    return status["code"]


def cmd_view(args: argparse.Namespace) -> int:
    """Handler of ``stemlive view``."""
    return run_viewer(
        args.endpoint,
        screenshot=args.screenshot,
        after_s=args.after,
        idle_s=args.idle,
        min_results=args.min_results,
        topics=args.topics or None,
    )


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stemlive view [ENDPOINT]`` on the CLI's subparsers."""
    p = subparsers.add_parser("view", help="live viewer of the result stream (pyqtgraph)")
    p.add_argument("endpoint", nargs="?", default=DEFAULT_ENDPOINT,
                   help=f"result endpoint of the service (default {DEFAULT_ENDPOINT})")
    p.add_argument("--topic", dest="topics", action="append", default=[], metavar="STAGE[/NAME]",
                   help="only these results, e.g. --topic eels (repeatable; default all)")
    p.add_argument("--screenshot", type=Path, metavar="PATH", help="grab the window to this PNG and exit")
    p.add_argument("--after", type=float, default=5.0, metavar="SECONDS",
                   help="with --screenshot: seconds to wait before grabbing (default 5)")
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                   help="with --screenshot: grab earlier, once results came and none for SECONDS")
    p.add_argument("--min-results", type=int, default=0, metavar="N",
                   help="with --screenshot: exit 3 if fewer than N results arrived")
    p.set_defaults(func=cmd_view)
    return p
