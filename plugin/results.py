"""Results from the pipeline service as Swift data items, updated in place while the experiment runs.

:class:`ResultsToSwift` owns a :class:`stemlive.live.wire.transport.ResultSubscriber` on its own thread. Each result
is copied, kept as the latest value of its (session, stage, name, index) and handed to the UI thread in batches
through ``document_controller.queue_task``; there the data items are created or updated in place.

Data items (one set per session, found again by the ``stemlive`` entry of their metadata):

=================================  ==============================================================================
result                             data item
=================================  ==============================================================================
``tilt_series/sums`` (row i)       image "Tilt i+1 (alpha, beta) drift-corrected sum", one per tilt, in nm per
                                   pixel (``pixel_size_nm`` of the result or of the session's frames)
``eels/sum`` (point i)             2-D waterfall, points x channels ("EELS aligned sums"), rows filled in as they
                                   come; position along the line in nm, energy in meV once the axis is known
``eels/temperature_K`` (+ err)     line plot of the profile against the position along the line in nm, as three
                                   layers T, T - sigma, T + sigma (Swift draws no error bars), or for a map an
                                   image in nm
``eels/labels``                    line plot against the position in nm (line scan) or image (map) of the labels
=================================  ==============================================================================

Analysis state: ``problem`` results (attrs ``result``, ``severity``, ``reason``), ``stage_error`` results and
``pipeline/analysis_finished`` (attrs ``status``, ``problems``) are not coalesced like data: each is kept in the
session's :class:`AnalysisState` and handed to the listeners in :attr:`ResultsToSwift.analysis_listeners` (the
panels show them in their status line).

The result stream is lossy and a window may join late: every message carries a whole row (or the whole dataset),
so a missed row is simply empty until the service sends it again (the final results at the end of a session
replace whole datasets), and the data items are keyed by session and name, never by arrival order.
"""

from __future__ import annotations

import logging
import os
import threading
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:7711"
METADATA_KEY = "stemlive"

Key = tuple[str, str, str, int | None]


def default_result_endpoint() -> str | None:
    """``STEMLIVE_RESULT_ENDPOINT`` (``none`` disables), else ``tcp://127.0.0.1:7711``."""
    value = os.environ.get("STEMLIVE_RESULT_ENDPOINT", "").strip()
    if value.lower() == "none":
        return None
    return value or DEFAULT_RESULT_ENDPOINT


def _document_controller(target: Any) -> Any:
    """A DocumentController from a DocumentController, a Facade DocumentWindow or the Facade API object."""
    if hasattr(target, "document_model") and hasattr(target, "queue_task"):
        return target
    inner = getattr(target, "_document_controller", None)
    if inner is not None:
        return inner
    application = getattr(target, "application", None)
    windows = list(getattr(application, "document_windows", []) or [])
    if windows:
        return windows[0]._document_controller
    raise TypeError(f"cannot find a Swift document controller in {type(target).__name__}")


class ResultsToSwift:
    """Turn the service's result stream into Swift data items.

    Parameters
    ----------
    target
        A ``DocumentController``, a Facade ``DocumentWindow`` or the Facade ``API`` object.
    result_endpoint
        The service's result PUB endpoint.
    start
        Start the subscriber thread at once.

    Attributes
    ----------
    received, dropped : int
        Results received, and results lost on the stream (from the subscriber's gap count).
    """

    def __init__(self, target: Any, result_endpoint: str = DEFAULT_RESULT_ENDPOINT, *, start: bool = True) -> None:
        self.document_controller = _document_controller(target)
        self.result_endpoint = result_endpoint
        self.received = 0
        self.dropped = 0
        self.data_items: dict[tuple[str, str], Any] = {}
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[Key, tuple[np.ndarray | None, dict[str, Any], Any]] = {}
        self._flush_queued = False
        self._sessions: dict[str, _SessionResults] = {}
        self._events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.analysis: dict[str, AnalysisState] = {}
        #: Called on the UI thread with each session's :class:`AnalysisState` when it changed.
        self.analysis_listeners: list[Callable[[AnalysisState], None]] = []
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # --- lifecycle ---
    def start(self) -> None:
        """Start the subscriber thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stemlive-results-to-swift", daemon=True)
            self._thread.start()
            self.ready.wait(5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the subscriber thread (data items stay in the library)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # --- subscriber thread ---
    def _loop(self) -> None:
        from stemlive.live.wire.transport import ResultRecovery, ResultSubscriber

        try:
            subscriber = ResultSubscriber(self.result_endpoint)
        except Exception:
            log.exception("stemlive: cannot subscribe to results at %s", self.result_endpoint)
            self.ready.set()
            return
        self.ready.set()
        recovery = ResultRecovery(subscriber)  # final results lost on the stream are asked for again
        recovered: list[Any] = []
        try:
            while not self._stop.is_set():
                msg = recovered.pop() if recovered else subscriber.recv(timeout_s=0.1)
                if msg is None:
                    recovered = recovery.idle()[::-1]
                    continue
                recovery.received()
                self.received += 1
                self.dropped = subscriber.dropped
                header = msg.header
                index = header.get("index")
                key: Key = (msg.session, str(header.get("stage")), str(header.get("name")),
                            int(index) if index is not None else None)
                payload = None if msg.payload is None else np.array(msg.payload)  # own copy: the buffer is reused
                self.submit(key, payload, dict(header.get("attrs") or {}), header.get("value"))
        finally:
            subscriber.close()

    def submit(self, key: Key, payload: np.ndarray | None, attrs: dict[str, Any], value: Any = None) -> None:
        """Queue one result for the UI thread (keeps only the latest per key; every event); thread-safe."""
        with self._lock:
            if key[2] in EVENT_NAMES:
                self._events.append((key[0], key[1], key[2], attrs))
            else:
                self._pending[key] = (payload, attrs, value)
            if self._flush_queued:
                return
            self._flush_queued = True
        self.document_controller.queue_task(self._flush)

    # --- UI thread ---
    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            events, self._events = self._events, []
            self._flush_queued = False
        changed: dict[str, AnalysisState] = {}
        for session, stage, name, attrs in events:
            state = self.analysis.setdefault(session, AnalysisState(session))
            state.add(stage, name, attrs)
            changed[session] = state
        # angles, energy axis and scan shape first, so the items made from this batch already use them
        ordered = sorted(pending.items(), key=lambda kv: kv[0][2] not in _CONTEXT_NAMES)
        touched: set[tuple[str, str]] = set()
        for (session, stage, name, index), (payload, attrs, value) in ordered:
            try:
                results = self._sessions.setdefault(session, _SessionResults(session))
                touched.update(results.add(stage, name, index, payload, attrs, value))
            except Exception:
                log.exception("stemlive: could not apply result %s/%s[%s] of %s", stage, name, index, session)
        for session, item in sorted(touched):
            try:
                self._show(self._sessions[session], item)
            except Exception:
                log.exception("stemlive: could not show %s of session %s", item, session)
        for state in changed.values():  # after the data items: "finished" means the final items are there
            for listener in list(self.analysis_listeners):
                try:
                    listener(state)
                except Exception:
                    log.exception("stemlive: analysis listener failed")

    def _show(self, results: _SessionResults, item: str) -> None:
        made = results.render(item)
        if made is None:
            return
        xdata, title = made
        key = (results.session, item)
        self.data_items[key] = self._update_data_item(key, xdata, title)

    def _update_data_item(self, key: tuple[str, str], xdata: Any, title: str) -> Any:
        from nion.swift.model import DataItem

        document_model = self.document_controller.document_model
        data_item = self.data_items.get(key)
        if data_item is not None and data_item not in document_model.data_items:
            data_item = None  # the user deleted it: make a new one
        if data_item is None:
            data_item = find_data_item(document_model, *key)
        if data_item is None:
            data_item = DataItem.new_data_item(xdata)
            data_item.title = title
            document_model.append_data_item(data_item)
            if _is_error_band(xdata):
                display_item = document_model.get_display_item_for_data_item(data_item)
                if display_item is not None:
                    show_error_band(display_item)
        else:
            data_item.set_xdata(xdata)
            if data_item.title != title:
                data_item.title = title
        if _is_error_band(xdata):
            display_item = document_model.get_display_item_for_data_item(data_item)
            if display_item is not None:
                fit_y_range(display_item, xdata.data)
        return data_item


#: (label, stroke colour, fill colour) of the three temperature rows: T, T - sigma, T + sigma.
ERROR_BAND_LAYERS = (("T", "#1E90FF", None), ("T - sigma", "#FF8C00", None), ("T + sigma", "#FF8C00", None))


def show_error_band(display_item: Any) -> None:
    """Show a (3, n) temperature profile as a line plot of T with T - sigma and T + sigma as thin lines.

    Swift's line plot has no error bars; one display layer per row, labelled, with a legend, is the closest.
    """
    display_item.display_type = "line_plot"
    channel = display_item.display_data_channels[0]
    for row, (label, stroke, fill) in enumerate(ERROR_BAND_LAYERS):
        properties = {"data_row": row, "label": label, "stroke_color": stroke, "fill_color": fill,
                      "stroke_width": 2 if row == 0 else 1}
        if row < len(display_item.display_layers):
            display_item._set_display_layer_properties(row, **properties)
        else:
            display_item.add_display_layer_for_display_data_channel(channel, **properties)
    display_item.set_display_property("legend_position", "top-right")


def _is_error_band(xdata: Any) -> bool:
    return bool(((xdata.metadata or {}).get(METADATA_KEY) or {}).get("error_band"))


def fit_y_range(display_item: Any, rows: np.ndarray) -> None:
    """Zoom a line plot's y axis to its data (Swift's automatic range starts at 0, flattening T +/- sigma)."""
    finite = np.asarray(rows, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return
    low, high = float(finite.min()), float(finite.max())
    margin = max(0.1 * (high - low), 1.0)
    display_item.set_display_property("y_min", low - margin)
    display_item.set_display_property("y_max", high + margin)


def find_data_item(document_model: Any, session: str, item: str) -> Any:
    """The data item made earlier for ``item`` of ``session`` (after a restart of the receiver), or None."""
    for data_item in document_model.data_items:
        entry = (data_item.metadata or {}).get(METADATA_KEY)
        if isinstance(entry, dict) and entry.get("session") == session and entry.get("item") == item:
            return data_item
    return None


_CONTEXT_NAMES = frozenset({"tilt_alpha_deg", "tilt_beta_deg", "energy_meV"})
#: Results that are events, each one kept (never replaced by a later one of the same key).
EVENT_NAMES = frozenset({"problem", "stage_error", "analysis_finished"})


class AnalysisState:
    """What the service said about one session's analysis: problems so far and whether it has finished.

    Attributes
    ----------
    problems : list of str
        One line per ``problem`` (``"<result> <severity>: <reason>"``) or ``stage_error`` result, in arrival order.
    finished : dict or None
        The attrs of ``pipeline/analysis_finished`` (``status``, ``problems``) once it arrived.
    """

    def __init__(self, session: str) -> None:
        self.session = session
        self.problems: list[str] = []
        self.finished: dict[str, Any] | None = None

    def add(self, stage: str, name: str, attrs: dict[str, Any]) -> None:
        if name == "problem":
            what = attrs.get("result") or stage
            severity = attrs.get("severity") or "failed"
            self.problems.append(f"{what} {severity}: {attrs.get('reason') or 'no reason given'}")
        elif name == "stage_error":
            self.problems.append(f"{stage} analysis failed: {attrs.get('error') or 'unknown error'}")
        elif name == "analysis_finished":
            self.finished = dict(attrs)

    def describe(self) -> str:
        """Status lines: "analysing..." until the final results arrived, then complete / incomplete, problems."""
        if self.finished is None:
            head = "Analysing..." + (f" ({len(self.problems)} problem(s) so far)" if self.problems else "")
        else:
            status = str(self.finished.get("status", "complete"))
            count = int(self.finished.get("problems", len(self.problems)) or 0)
            head = f"Analysis {status}" + (f": {count} problem(s)" if count else ": all results arrived")
            if count > len(self.problems):
                head += f" ({count - len(self.problems)} not received here: see the session file)"
        return "\n- ".join([head, *self.problems])


class _SessionResults:
    """The latest results of one session, and how each becomes an ``xdata`` for Swift."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.sums: dict[int, np.ndarray] = {}
        self.sum_attrs: dict[int, dict[str, Any]] = {}
        self.alpha: dict[int, float] = {}
        self.beta: dict[int, float] = {}
        self.energy_meV: np.ndarray | None = None
        self.spectra: np.ndarray | None = None  # (points, channels)
        self.temperature: np.ndarray | None = None
        self.temperature_err: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.scan_shape: tuple[int, int] | None = None
        self.n_points: int | None = None
        self.pixel_size_nm: float | None = None  # of the tilt sums, from the results' attrs or the panel's plan
        self.positions_nm: dict[int, tuple[float, float]] = {}  # EELS point -> (x_nm, y_nm)

    # --- bookkeeping; returns the data items (names) to refresh ---
    def add(self, stage: str, name: str, index: int | None, payload: np.ndarray | None, attrs: dict[str, Any],
            value: Any) -> list[tuple[str, str]]:
        self._context(attrs, index if stage == "eels" else None)
        s = self.session
        if stage == "tilt_series":
            if name == "sums" and payload is not None and payload.ndim == 3 and index is None:
                for row, image in enumerate(payload):  # the final stack of every tilt
                    self.sums[row] = image.astype(np.float32, copy=False)
                return [(s, f"tilt_series/sums/{row}") for row in range(payload.shape[0])]
            if name == "sums" and payload is not None and payload.ndim == 2 and index is not None:
                self.sums[index] = payload.astype(np.float32, copy=False)
                self.sum_attrs[index] = attrs
                for field, table in (("alpha_deg", self.alpha), ("beta_deg", self.beta)):
                    if field in attrs:
                        table[index] = float(attrs[field])
                return [(s, f"tilt_series/sums/{index}")]
            if name in ("tilt_alpha_deg", "tilt_beta_deg") and payload is not None:
                table = self.alpha if name == "tilt_alpha_deg" else self.beta
                if index is not None:
                    table[index] = float(np.asarray(payload).reshape(-1)[0])
                else:
                    table.update({i: float(v) for i, v in enumerate(np.asarray(payload).reshape(-1))})
                return [(s, f"tilt_series/sums/{i}") for i in sorted(self.sums)]
            return []
        if stage != "eels" or payload is None:
            return []
        if name == "energy_meV":
            self.energy_meV = np.asarray(payload, dtype=np.float64).reshape(-1)
            return [(s, "eels/sum")] if self.spectra is not None else []
        if name == "sum":
            if index is None:
                data = np.asarray(payload, dtype=np.float32)
                if data.ndim == 3:
                    self.scan_shape = (data.shape[0], data.shape[1])
                self.spectra = data.reshape(-1, data.shape[-1]).copy()
            else:
                self.spectra = _set_row(self.spectra, index, np.asarray(payload, np.float32).reshape(-1),
                                        self.n_points, 0.0)
            return [(s, "eels/sum")]
        if name in ("temperature_K", "temperature_err_K"):
            current = self.temperature if name == "temperature_K" else self.temperature_err
            if index is None:
                data = np.asarray(payload, dtype=np.float64)
                if data.ndim == 2:
                    self.scan_shape = (data.shape[0], data.shape[1])
                current = data.reshape(-1).copy()
            else:
                current = _set_row(current, index, np.asarray(payload, np.float64).reshape(1), self.n_points, np.nan)
            if name == "temperature_K":
                self.temperature = current
            else:
                self.temperature_err = current
            return [(s, "eels/temperature_K")] if self.temperature is not None else []
        if name == "labels":
            data = np.asarray(payload)
            if data.ndim == 2:
                self.scan_shape = (data.shape[0], data.shape[1])
            flat = data.reshape(-1).astype(np.float32)
            points = attrs.get("points")
            if isinstance(points, list) and len(points) == flat.size and points:
                # live labels cover only the points analysed so far: place them, the rest stay -1
                n = max(max(int(p) for p in points) + 1, self.n_points or 0)
                placed = np.full(n, -1.0, np.float32)
                placed[np.asarray(points, dtype=np.intp)] = flat
                flat = placed
            self.labels = flat
            return [(s, "eels/labels")]
        return []

    def _context(self, attrs: dict[str, Any], index: int | None = None) -> None:
        if isinstance(attrs.get("pixel_size_nm"), int | float) and attrs["pixel_size_nm"] > 0:
            self.pixel_size_nm = float(attrs["pixel_size_nm"])
        if index is not None and isinstance(attrs.get("x_nm"), int | float):
            y = attrs.get("y_nm")
            self.positions_nm[index] = (float(attrs["x_nm"]), float(y) if isinstance(y, int | float) else 0.0)
        shape = attrs.get("scan_shape")
        if isinstance(shape, list | tuple) and len(shape) == 2:
            self.scan_shape = (int(shape[0]), int(shape[1]))
        for field in ("n_points", "points"):
            if isinstance(attrs.get(field), int):
                self.n_points = int(attrs[field])

    # --- rendering ---
    def render(self, item: str) -> tuple[Any, str] | None:
        from nion.data import Calibration, DataAndMetadata

        meta: dict[str, dict[str, Any]] = {METADATA_KEY: {"session": self.session, "item": item}}
        short = self.session[-8:]
        if item.startswith("tilt_series/sums/"):
            index = int(item.rsplit("/", 1)[1])
            data = self.sums[index]
            attrs = self.sum_attrs.get(index, {})
            px = attrs.get("pixel_size_nm") or self.pixel_size_nm
            calibrations = [Calibration.Calibration(scale=float(px), units="nm")] * 2 if px else None
            meta[METADATA_KEY].update({"tilt_row": index, "alpha_deg": self.alpha.get(index),
                                       "beta_deg": self.beta.get(index)})
            title = f"Tilt {index + 1} ({_angle(self.alpha.get(index))}, {_angle(self.beta.get(index))}) " \
                    "drift-corrected sum"
            return DataAndMetadata.new_data_and_metadata(data, dimensional_calibrations=calibrations,
                                                         metadata=meta), title
        if item == "eels/sum" and self.spectra is not None:
            energy = Calibration.Calibration(units="meV")
            e = self.energy_meV
            if e is not None and e.size == self.spectra.shape[1] and e.size > 1:
                energy = Calibration.Calibration(offset=float(e[0]), scale=float(e[1] - e[0]), units="meV")
            return DataAndMetadata.new_data_and_metadata(
                self.spectra, dimensional_calibrations=[self._line_calibration(), energy], metadata=meta,
                data_descriptor=DataAndMetadata.DataDescriptor(False, 1, 1),
            ), f"EELS aligned sums (position x energy) {short}"
        if item == "eels/temperature_K" and self.temperature is not None:
            t = self.temperature
            shape = self._map_shape(t.size)
            if shape is not None:
                return DataAndMetadata.new_data_and_metadata(
                    t.reshape(shape).astype(np.float32), intensity_calibration=Calibration.Calibration(units="K"),
                    dimensional_calibrations=self._map_calibrations(shape), metadata=meta,
                ), f"EELS temperature map (K) {short}"
            err = self.temperature_err
            if err is None or err.size != t.size:
                err = np.full_like(t, np.nan)
            rows = np.stack([t, t - err, t + err]).astype(np.float32)
            meta[METADATA_KEY]["error_band"] = True  # rows T, T - sigma, T + sigma: one line-plot layer each
            # plain 2-D data, not a collection: Swift's line plot draws row data_row of each layer only for 2-D data
            # (for a collection every layer shows the displayed collection index)
            return DataAndMetadata.new_data_and_metadata(
                rows, intensity_calibration=Calibration.Calibration(units="K"), metadata=meta,
                dimensional_calibrations=[Calibration.Calibration(), self._line_calibration()],
            ), f"EELS temperature profile (K, T and T +/- sigma) {short}"
        if item == "eels/labels" and self.labels is not None:
            labels = self.labels.astype(np.float32)
            shape = self._map_shape(labels.size)
            if shape is not None:
                return DataAndMetadata.new_data_and_metadata(
                    labels.reshape(shape), dimensional_calibrations=self._map_calibrations(shape), metadata=meta,
                ), f"EELS cluster labels {short}"
            return DataAndMetadata.new_data_and_metadata(
                labels, dimensional_calibrations=[self._line_calibration()], metadata=meta,
            ), f"EELS cluster labels {short}"
        return None

    def _line_calibration(self) -> Any:
        """Distance along the line in nm from the first point (points are equally spaced), else the index."""
        from nion.data import Calibration

        known = sorted(self.positions_nm)
        if 0 in self.positions_nm and len(known) >= 2 and known[-1] > 0:
            x0, y0 = self.positions_nm[0]
            x1, y1 = self.positions_nm[known[-1]]
            step = float(np.hypot(x1 - x0, y1 - y0)) / known[-1]
            if step > 0:
                return Calibration.Calibration(offset=0.0, scale=step, units="nm")
        return Calibration.Calibration()

    def _map_calibrations(self, shape: tuple[int, int]) -> list[Any]:
        """nm per point of a map (rows, columns) from the points' positions, else uncalibrated."""
        from nion.data import Calibration

        rows, cols = shape
        p = self.positions_nm
        out = [Calibration.Calibration(), Calibration.Calibration()]
        if 0 in p and cols > 1 and cols - 1 in p:
            out[1] = Calibration.Calibration(offset=0.0, scale=float(np.hypot(*np.subtract(p[cols - 1], p[0])))
                                             / (cols - 1), units="nm")
        if 0 in p and rows > 1 and (rows - 1) * cols in p:
            out[0] = Calibration.Calibration(offset=0.0, scale=float(np.hypot(*np.subtract(p[(rows - 1) * cols],
                                                                                        p[0]))) / (rows - 1),
                                             units="nm")
        return out

    def _map_shape(self, n: int) -> tuple[int, int] | None:
        if self.scan_shape is not None and self.scan_shape[0] > 1 and self.scan_shape[0] * self.scan_shape[1] == n:
            return self.scan_shape
        return None


def _set_row(array: np.ndarray | None, index: int, row: np.ndarray, n: int | None, fill: float) -> np.ndarray:
    """``array`` with row ``index`` set to ``row`` (a scalar for 1-D arrays), grown with ``fill`` as needed."""
    row = np.atleast_1d(row)
    scalar = row.size == 1 and (array is None or array.ndim == 1)
    tail: tuple[int, ...] = () if scalar else (row.shape[0],)
    rows = max(index + 1, n or 0)
    if array is None or array.shape[1:] != tail:
        array = np.full((rows, *tail), fill, dtype=row.dtype)  # first row, or the width changed: start again
    elif array.shape[0] < rows:
        grown = np.full((rows, *tail), fill, dtype=array.dtype)
        grown[: array.shape[0]] = array
        array = grown
    array[index] = row[0] if scalar else row
    return array


def _angle(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


# ----------------------------------------------------------------------------------------------- one per window

_attached: dict[int, list[Any]] = {}
_attach_lock = threading.Lock()


def attach(document_controller: Any, endpoint: str | None = None,
           factory: Callable[[Any, str], ResultsToSwift] | None = None) -> ResultsToSwift | None:
    """One :class:`ResultsToSwift` per document window, shared by the panels (reference counted).

    ``endpoint`` defaults to :func:`default_result_endpoint`; None there (``STEMLIVE_RESULT_ENDPOINT=none``)
    disables the results, unless the window already has a receiver (then it is shared).
    """
    endpoint = endpoint or default_result_endpoint()
    with _attach_lock:
        entry = _attached.get(id(document_controller))
        if entry is None:
            if endpoint is None:
                return None
            receiver = (factory or ResultsToSwift)(document_controller, endpoint)
            entry = _attached[id(document_controller)] = [receiver, 0]
        entry[1] += 1
        return typing.cast(ResultsToSwift, entry[0])


def detach(receiver: ResultsToSwift | None) -> None:
    """Release a receiver from :func:`attach`; the last release stops it."""
    if receiver is None:
        return
    with _attach_lock:
        key = id(receiver.document_controller)
        entry = _attached.get(key)
        if entry is None or entry[0] is not receiver:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _attached[key]
    receiver.stop()
