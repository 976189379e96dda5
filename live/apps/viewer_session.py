"""One session as the live viewer knows it: :class:`SessionView`, built from result messages in any order.

Pure Python + numpy (no Qt, no sockets); :class:`~stemlive.live.apps.viewer_model.ViewerModel` keeps one per
session. See ``docs/viewer.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stemlive.live.wire.protocol import Message


TILT_PANELS = ("frame", "drift", "sums")
EELS_PANELS = ("waterfall", "temperature", "labels", "peaks")
PANELS = (*TILT_PANELS, *EELS_PANELS, "status")
"""Names of the parts of a :class:`SessionView` that can change (see :attr:`SessionView.changed`)."""


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
