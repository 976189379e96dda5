"""The live viewer's pyqtgraph window (:class:`ViewerWindow`), drawing the current sessions of a
:class:`~stemlive.live.apps.viewer_model.ViewerModel`; a Qt timer polls a
:class:`~stemlive.live.wire.transport.ResultSubscriber` without blocking (about 20 Hz).

Imports Qt only on first use (:func:`make_viewer_window`, ``ViewerWindow``). See ``docs/viewer.md``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.apps.viewer_model import Subscriber, ViewerModel
from stemlive.live.apps.viewer_session import EELS_PANELS, TILT_PANELS, SessionView

log = logging.getLogger(__name__)



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

