"""The "Tilt Series" and "Vibrational EELS" panels of the stemlive plug-in.

Each panel is a thin Swift shell (:class:`TiltSeriesPanel`, :class:`EELSPanel`) around a plain-Python model
(:class:`TiltSeriesModel`, :class:`EELSModel`) that holds the field values as text, builds the acquisition plan
from them, checks it, and runs the procedure on a worker thread. The models need no Qt and no document: the UI
thread is reached only through the ``dispatch`` callable they are given (``document_controller.queue_task`` in
Swift), so the same code is driven by the widgets, by tests and by scripts.

Threads
-------
UI thread
    Field edits, Check, Start (plan check, instrument look-up, thread start), Pause / Resume / Abort (flags only).
worker thread (one per acquisition)
    Runs ``TiltSeriesProcedure.run`` / ``EELSScanProcedure.run``; its progress callbacks store the latest
    :class:`~nionswift_plugin.stemlive.acquisition.Progress` and queue one UI update at a time.
"""

from __future__ import annotations

import gettext
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nion.swift import Panel
from nion.ui import Declarative

from .acquisition import PlanCheck, PlanError, Progress, RunControl
from .eels_scan import EELSScanPlan, EELSScanProcedure
from .eels_scan import check_plan as check_eels_plan
from .instruments import (
    DeviceChoice,
    Instrument,
    channel_names,
    default_channel,
    defaults_for,
    eels_cameras,
    find_instrument,
    instrument_id,
    load_settings,
    save_settings,
    scan_sources,
    source_id,
    source_label,
    stem_controllers,
)
from .tilt_series import (
    REFERENCE_TILTS_DEG,
    TiltSeriesPlan,
    TiltSeriesProcedure,
    read_tilts_csv,
    write_tilts_csv,
)
from .tilt_series import check_plan as check_tilt_plan

_ = gettext.gettext
log = logging.getLogger(__name__)

TILT_SERIES_PANEL_ID = "stemlive-tilt-series-panel"
EELS_PANEL_ID = "stemlive-eels-panel"

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:7710"
ORDERS = ("as_listed", "increasing_tilt")
ORDER_LABELS = (_("As listed"), _("Increasing tilt"))
MODES = ("line", "map")
MODE_LABELS = (_("Line"), _("Map"))

Dispatch = Callable[[Callable[[], None]], None]


def default_frame_endpoint() -> str:
    """The acquisition endpoint the panels start with: ``STEMLIVE_FRAME_ENDPOINT`` or ``tcp://127.0.0.1:7710``."""
    return os.environ.get("STEMLIVE_FRAME_ENDPOINT", "").strip() or DEFAULT_FRAME_ENDPOINT


def default_session_dir() -> str | None:
    """Where the service records when it runs on this computer (``STEMLIVE_SESSION_DIR``, set by ``stemlive swift``)."""
    return os.environ.get("STEMLIVE_SESSION_DIR", "").strip() or None


# ----------------------------------------------------------------------------------------------- field parsing


def parse_float(text: str, label: str) -> float:
    """Parse a number typed in a field; raise :class:`PlanError` naming the field."""
    try:
        return float(str(text).strip())
    except ValueError:
        raise PlanError(f"{label}: {text!r} is not a number") from None


def parse_int(text: str, label: str) -> int:
    """Parse a whole number typed in a field (``"10"`` or ``"10.0"``); raise :class:`PlanError` naming the field."""
    value = parse_float(text, label)
    if value != int(value):
        raise PlanError(f"{label}: {text!r} is not a whole number")
    return int(value)


def parse_point(text: str, label: str) -> tuple[float, float]:
    """Parse ``"y, x"`` (fractions of the survey image)."""
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
    if len(parts) != 2:
        raise PlanError(f"{label}: expected 'y, x' as survey fractions, got {text!r}")
    return parse_float(parts[0], label), parse_float(parts[1], label)


def format_point(point: tuple[float, float]) -> str:
    """``(y, x)`` as the text of a point field."""
    return f"{point[0]:.4g}, {point[1]:.4g}"


# ----------------------------------------------------------------------------------------------- instrument


def make_sender(endpoint: str) -> Any:
    """A :class:`stemlive.live.transport.FrameSender` connected to ``endpoint``."""
    from stemlive.live.transport import FrameSender

    return FrameSender(endpoint)


# ----------------------------------------------------------------------------------------------- observable fields


class _Field:
    """An observable attribute of a :class:`Declarative.Handler`: setting it fires ``property_changed_event``."""

    def __init__(self, default: Any) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get("_field_" + self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        if obj.__dict__.get("_field_" + self.name, self.default) != value:
            obj.__dict__["_field_" + self.name] = value
            obj.notify_property_changed(self.name)


# ----------------------------------------------------------------------------------------------- models


class AcquisitionModel(Declarative.Handler):
    """What both panels share: endpoint, status and progress lines, Check / Start / Pause / Resume / Abort.

    Parameters
    ----------
    dispatch
        Runs a callable on the UI thread (``document_controller.queue_task``); the default calls it at once.
    instrument_provider
        Returns the :class:`Instrument` (default :func:`find_instrument`).
    sender_factory
        Makes a frame sender for an endpoint (default :func:`make_sender`).
    """

    step_name = "step"
    settings_key = "panel"  # where the device choice and the last plan are remembered
    needs_camera = False
    plan_fields: tuple[str, ...] = ("endpoint",)  # the fields remembered as "the last plan"
    ui_view: Any = None  # the declarative description, set by the Swift panel
    endpoint = _Field(DEFAULT_FRAME_ENDPOINT)
    instrument_items = _Field(list[str]())
    instrument_index = _Field(0)
    scan_items = _Field(list[str]())
    scan_index = _Field(0)
    channel_items = _Field(list[str]())
    channel_index = _Field(0)
    camera_items = _Field(list[str]())
    camera_index = _Field(0)
    status_text = _Field("")
    progress_text = _Field("")
    running = _Field(False)
    paused = _Field(False)
    can_start = _Field(True)
    can_pause = _Field(False)
    can_resume = _Field(False)
    can_abort = _Field(False)

    def __init__(
        self,
        *,
        dispatch: Dispatch | None = None,
        instrument_provider: Callable[[], Instrument] | None = None,
        sender_factory: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__()
        self.dispatch: Dispatch = dispatch or (lambda fn: fn())
        self.instrument_provider = instrument_provider
        self.sender_factory = sender_factory or make_sender
        self.endpoint = default_frame_endpoint()
        self.control: RunControl | None = None
        self.procedure: Any = None
        self.thread: threading.Thread | None = None
        self.last_status: str | None = None
        self.last_error: str | None = None
        self.last_check: PlanCheck | None = None
        self.on_finished: Callable[[str], None] | None = None
        self._progress_lock = threading.Lock()
        self._pending_progress: Progress | None = None
        self.results_receiver: Any = None  # a results.ResultsToSwift: analysis state of the sessions
        self._following: str | None = None  # the session whose analysis the status line shows
        self._run_text = ""

    # --- device chooser ---
    def refresh_devices(self, choice: DeviceChoice | None = None) -> None:
        """List the registered devices and select ``choice`` where it is available, else the defaults (what Nion's
        panels use: Swift's default STEM controller and its own scan and EELS camera, the HAADF channel)."""
        choice = choice or self.device_choice
        self._instruments = stem_controllers()
        ids = [instrument_id(c) for c in self._instruments]
        self.instrument_items = ids
        self.instrument_index = ids.index(choice.instrument) if choice.instrument in ids else 0
        self._select_devices(choice)
        self._shown = (int(self.instrument_index), int(self.scan_index))

    def _select_devices(self, choice: DeviceChoice) -> None:
        stem = self._instruments[self.instrument_index] if self._instruments else None
        own = defaults_for(stem)
        self._scans = scan_sources()
        scan_ids = [source_id(s) for s in self._scans]
        self.scan_items = [source_label(s) for s in self._scans]
        scan_id = choice.scan if choice.scan in scan_ids else own.scan
        self.scan_index = scan_ids.index(scan_id) if scan_id in scan_ids else 0
        self._select_channel(choice.channel)
        self._cameras = eels_cameras()
        camera_ids = [source_id(c) for c in self._cameras]
        self.camera_items = [source_label(c) for c in self._cameras]
        camera_id = choice.camera if choice.camera in camera_ids else own.camera
        self.camera_index = camera_ids.index(camera_id) if camera_id in camera_ids else 0

    def _select_channel(self, name: str | None) -> None:
        scan = self._scans[self.scan_index] if 0 <= self.scan_index < len(self._scans) else None
        names = channel_names(scan)
        self.channel_items = names
        name = name if name in names else default_channel(scan)
        self.channel_index = names.index(name) if name in names else 0

    @property
    def device_choice(self) -> DeviceChoice:
        """The chosen devices by id (None where nothing is listed)."""
        def pick(items: list[Any], index: int, key: Callable[[Any], str]) -> str | None:
            return key(items[index]) if 0 <= index < len(items) else None

        return DeviceChoice(pick(getattr(self, "_instruments", []), int(self.instrument_index), instrument_id),
                            pick(getattr(self, "_scans", []), int(self.scan_index), source_id),
                            pick(list(self.channel_items), int(self.channel_index), str),
                            pick(getattr(self, "_cameras", []), int(self.camera_index), source_id))

    def instrument_changed(self, widget: Any = None, index: int | None = None) -> None:
        """Another instrument: its own scan, camera and HAADF channel (remembered)."""
        if index is not None:
            if index == getattr(self, "_shown", (None,))[0]:
                return  # the widget following the model (a refresh), not a new choice
            self.instrument_index = index
        self._select_devices(DeviceChoice(self.device_choice.instrument))
        self._shown = (int(self.instrument_index), int(self.scan_index))
        self.remember_devices()

    def scan_changed(self, widget: Any = None, index: int | None = None) -> None:
        """Another scan device: its HAADF channel (remembered)."""
        if index is not None:
            if index == getattr(self, "_shown", (None, None))[1]:
                return
            self.scan_index = index
        self._select_channel(None)
        self._shown = (int(self.instrument_index), int(self.scan_index))
        self.remember_devices()

    def device_changed(self, widget: Any = None, index: int | None = None) -> None:
        self.remember_devices()

    def refresh_devices_clicked(self, widget: Any = None) -> None:
        self.refresh_devices()

    def remember_devices(self) -> None:
        save_settings(self.settings_key, devices=self.device_choice.as_dict())

    def remember_plan(self) -> None:
        """Keep the fields of the plan (and the devices) for the next run, also after a restart of Swift."""
        save_settings(self.settings_key, devices=self.device_choice.as_dict(),
                      plan={name: getattr(self, name) for name in self.plan_fields})

    def restore(self) -> None:
        """The remembered plan fields and device choice (the defaults where none was remembered)."""
        remembered = load_settings(self.settings_key)
        plan = remembered.get("plan")
        plan = plan if isinstance(plan, dict) else {}
        for name in self.plan_fields:
            if name in plan and isinstance(plan[name], type(getattr(self, name))):
                setattr(self, name, plan[name])
        self.refresh_devices(DeviceChoice.from_dict(remembered.get("devices")))

    # --- analysis state in the status line ---
    def follow_results(self, receiver: Any) -> None:
        """Show the analysis state (problems, "analysing...", finished) that ``receiver`` gets for our sessions."""
        if self.results_receiver is not None:
            self.results_receiver.analysis_listeners.remove(self._analysis_changed)
        self.results_receiver = receiver
        if receiver is not None:
            receiver.analysis_listeners.append(self._analysis_changed)

    def _analysis_changed(self, state: Any) -> None:
        if state.session == self._following:
            self._show_analysis()

    def _show_analysis(self) -> None:
        receiver, session = self.results_receiver, self._following
        if receiver is None or session is None:
            self.status_text = self._run_text
            return
        state = receiver.analysis.get(session)
        if state is not None:
            self.status_text = self._run_text + "\n" + state.describe()
        elif not self.running:
            self.status_text = self._run_text + "\nAnalysing... (waiting for the service's final results)"
        else:
            self.status_text = self._run_text

    # --- to override ---
    def build_plan(self) -> Any:
        """The plan from the field values; raises :class:`PlanError` for unreadable fields."""
        raise NotImplementedError

    def check_plan(self, plan: Any) -> PlanCheck:
        """The plan check shown by Check and required by Start."""
        raise NotImplementedError

    def find_instrument(self) -> Instrument:
        """The chosen hardware (the defaults when the chooser was never filled)."""
        return find_instrument(self.device_choice, need_camera=self.needs_camera)

    def make_procedure(self, plan: Any, instrument: Instrument, sender: Any, control: RunControl) -> Any:
        """The procedure object with a ``run() -> status`` method."""
        raise NotImplementedError

    # --- actions ---
    def check(self) -> PlanCheck | None:
        """Check the plan from the fields; the status line shows the summary or every reason it is refused."""
        self._following = None
        try:
            plan = self.build_plan()
        except PlanError as e:
            self.status_text = f"Cannot read the plan: {e}"
            self.last_check = None
            return None
        check = self.check_plan(plan)
        self.last_check = check
        if check.ok:
            self.status_text = "Plan OK: " + check.summary()
        else:
            self.status_text = "Plan refused:\n- " + "\n- ".join(check.problems)
        return check

    def start(self) -> bool:
        """Check the plan and, if it is accepted, run the procedure on a worker thread.

        Returns False (nothing moved, nothing sent) when the plan is refused, unreadable, already running, or
        the instrument is missing; the status line says why.
        """
        if self.running:
            self.status_text = "An acquisition is already running."
            return False
        try:
            plan = self.build_plan()
        except PlanError as e:
            self.status_text = f"Not started. Cannot read the plan: {e}"
            return False
        check = self.check_plan(plan)
        self.last_check = check
        if not check.ok:
            self.status_text = "Not started. Plan refused:\n- " + "\n- ".join(check.problems)
            return False
        try:
            instrument = self.instrument_provider() if self.instrument_provider else self.find_instrument()
        except Exception as e:
            self.status_text = f"Not started: {e}"
            return False
        try:
            sender = self.sender_factory(self.endpoint.strip())
        except Exception as e:
            self.status_text = f"Not started: cannot connect to the service at {self.endpoint}: {e}"
            return False
        self.remember_plan()
        control = RunControl()
        try:
            procedure = self.make_procedure(plan, instrument, sender, control)
        except Exception as e:
            sender.close()
            self.status_text = f"Not started: {type(e).__name__}: {e}"
            return False
        self.control, self.procedure = control, procedure
        self.last_status = self.last_error = None
        self._set_running(True)
        self._following = str(getattr(procedure, "session_id", "")) or None
        self._run_text = f"Running on {instrument.describe()}: {check.summary()}"
        self.status_text = self._run_text
        self.progress_text = "starting..."
        self.thread = threading.Thread(target=self._run, args=(procedure, sender), name="stemlive-acquisition",
                                       daemon=True)
        self.thread.start()
        return True

    def pause(self) -> None:
        """Pause at the next frame boundary."""
        if self.control is not None and self.running:
            self.control.pause()
            self.paused = True
            self._update_buttons()
            self.status_text = "Paused (the stage and probe stay where they are)."

    def resume(self) -> None:
        """Resume a paused acquisition."""
        if self.control is not None and self.running:
            self.control.resume()
            self.paused = False
            self._update_buttons()
            self.status_text = "Running."

    def abort(self) -> None:
        """Abort at the next frame boundary (the session is closed as aborted)."""
        if self.control is not None and self.running:
            self.control.abort()
            self.paused = False
            self._update_buttons()
            self.status_text = "Aborting..."

    def wait(self, timeout_s: float | None = None) -> bool:
        """Join the worker thread (tests and scripts); True if it finished."""
        thread = self.thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def close(self) -> None:
        """Abort a running acquisition when the panel closes (the worker finishes on its own)."""
        if self.control is not None and self.running:
            self.control.abort()
        self.follow_results(None)
        super().close()

    # --- button callbacks (Declarative passes the widget) ---
    def check_clicked(self, widget: Any = None) -> None:
        self.check()

    def start_clicked(self, widget: Any = None) -> None:
        self.start()

    def pause_clicked(self, widget: Any = None) -> None:
        self.pause()

    def resume_clicked(self, widget: Any = None) -> None:
        self.resume()

    def abort_clicked(self, widget: Any = None) -> None:
        self.abort()

    # --- worker thread ---
    def _run(self, procedure: Any, sender: Any) -> None:
        status, error = "failed", None
        try:
            status = str(procedure.run())
        except PlanError as e:
            error = str(e)
        except Exception as e:
            log.exception("stemlive acquisition failed")
            error = f"{type(e).__name__}: {e}"
        finally:
            try:
                sender.close()
            except Exception:
                log.exception("could not close the frame sender")
        self.dispatch(lambda: self._finished(status, error))

    def on_progress(self, progress: Progress) -> None:
        """Progress callback (worker thread): keep the latest, queue at most one UI update."""
        with self._progress_lock:
            queued = self._pending_progress is not None
            self._pending_progress = progress
        if not queued:
            self.dispatch(self._show_progress)

    def _show_progress(self) -> None:
        with self._progress_lock:
            progress, self._pending_progress = self._pending_progress, None
        if progress is not None:
            self.progress_text = progress.describe(self.step_name)

    def _finished(self, status: str, error: str | None) -> None:
        self._show_progress()
        self.last_status, self.last_error = status, error
        session = getattr(self.procedure, "session_id", "")
        text = {"complete": "Finished", "aborted": "Aborted"}.get(status, "Failed")
        self._run_text = f"{text} (session {session})" + (f": {error}" if error else "")
        self.control = None
        self.paused = False
        self._set_running(False)
        self._show_analysis()  # "analysing..." until the service says the final results are out
        if self.on_finished is not None:
            self.on_finished(status)

    def _set_running(self, running: bool) -> None:
        self.running = running
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.can_start = not self.running
        self.can_pause = self.running and not self.paused
        self.can_resume = self.running and self.paused
        self.can_abort = self.running


class TiltSeriesModel(AcquisitionModel):
    """Fields and actions of the Tilt Series panel (see :class:`TiltSeriesPlan` for the meaning of each)."""

    step_name = "tilt"
    settings_key = "tilt_series"
    plan_fields = ("endpoint", "tilts_text", "frames_text", "size_text", "dwell_text", "fov_text", "settle_text",
                   "tolerance_text", "order_index", "tracking")
    tilts_text = _Field(write_tilts_csv(REFERENCE_TILTS_DEG))
    frames_text = _Field("10")
    size_text = _Field("512")
    dwell_text = _Field("4")
    fov_text = _Field("16.384")
    settle_text = _Field("2")
    tolerance_text = _Field("1")
    order_index = _Field(0)
    tracking = _Field(True)

    def __init__(self, *, document_controller: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.document_controller = document_controller

    def set_tilts(self, tilts: list[tuple[float, float]]) -> None:
        """Replace the tilt table."""
        self.tilts_text = write_tilts_csv(tilts)

    def build_plan(self) -> TiltSeriesPlan:
        return TiltSeriesPlan(
            tilts_deg=read_tilts_csv(self.tilts_text),
            frames_per_tilt=parse_int(self.frames_text, "frames per tilt"),
            size_px=parse_int(self.size_text, "frame size"),
            dwell_us=parse_float(self.dwell_text, "dwell"),
            fov_nm=parse_float(self.fov_text, "field of view"),
            settle_s=parse_float(self.settle_text, "settle time"),
            confirm_tolerance=parse_float(self.tolerance_text, "confirm tolerance"),
            order=ORDERS[int(self.order_index) if 0 <= int(self.order_index) < len(ORDERS) else 0],
            tracking=bool(self.tracking),
            session_dir=default_session_dir(),
        )

    def check_plan(self, plan: TiltSeriesPlan) -> PlanCheck:
        return check_tilt_plan(plan)

    def make_procedure(self, plan: TiltSeriesPlan, instrument: Instrument, sender: Any,
                       control: RunControl) -> TiltSeriesProcedure:
        return TiltSeriesProcedure(plan, stem_controller=instrument.stem_controller,
                                   scan_source=instrument.scan_source, sender=sender, control=control,
                                   on_progress=self.on_progress, channel=instrument.channel)

    # --- CSV ---
    def import_csv(self, path: str | Path) -> bool:
        """Load the tilt table from a CSV file (alpha_deg, beta_deg); False and a status message on error."""
        try:
            self.set_tilts(read_tilts_csv(Path(path).read_text()))
        except (OSError, PlanError) as e:
            self.status_text = f"Could not import {path}: {e}"
            return False
        self.status_text = f"Imported {len(read_tilts_csv(self.tilts_text))} tilts from {path}"
        return True

    def export_csv(self, path: str | Path) -> bool:
        """Write the tilt table to a CSV file; False and a status message on error."""
        try:
            Path(path).write_text(write_tilts_csv(read_tilts_csv(self.tilts_text)))
        except (OSError, PlanError) as e:
            self.status_text = f"Could not export to {path}: {e}"
            return False
        self.status_text = f"Exported the tilt table to {path}"
        return True

    def reset_tilts_clicked(self, widget: Any = None) -> None:
        self.set_tilts(list(REFERENCE_TILTS_DEG))

    def import_clicked(self, widget: Any = None) -> None:
        dc = self.document_controller
        if dc is None:
            return
        paths, _filter, _dir = dc.get_file_paths_dialog(_("Import tilt table"), "", "CSV files (*.csv);;All files (*)")
        if paths:
            self.import_csv(paths[0])

    def export_clicked(self, widget: Any = None) -> None:
        dc = self.document_controller
        if dc is None:
            return
        path, _filter, _dir = dc.get_save_file_path(_("Export tilt table"), "tilts.csv",
                                                   "CSV files (*.csv);;All files (*)")
        if path:
            self.export_csv(path)


class EELSModel(AcquisitionModel):
    """Fields and actions of the Vibrational EELS panel (see :class:`EELSScanPlan`)."""

    step_name = "point"
    settings_key = "eels"
    needs_camera = True
    plan_fields = ("endpoint", "mode_index", "start_text", "end_text", "points_text", "step_text", "rows_text",
                   "frames_text", "exposure_text", "survey_fov_text", "survey_size_text", "survey_before",
                   "survey_after", "tracking_every_text")
    mode_index = _Field(0)
    start_text = _Field("0.5, 0.1")
    end_text = _Field("0.5, 0.9")
    points_text = _Field("40")
    step_text = _Field("1.6")
    rows_text = _Field("1")
    frames_text = _Field("200")
    exposure_text = _Field("300")
    survey_fov_text = _Field("80")
    survey_size_text = _Field("512")
    survey_before = _Field(True)
    survey_after = _Field(True)
    tracking_every_text = _Field("0")

    def __init__(self, *, document_controller: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.document_controller = document_controller

    def build_plan(self) -> EELSScanPlan:
        mode = MODES[int(self.mode_index) if 0 <= int(self.mode_index) < len(MODES) else 0]
        step_text = str(self.step_text).strip()
        return EELSScanPlan(
            mode=mode,
            start=parse_point(self.start_text, "start"),
            end=parse_point(self.end_text, "end"),
            points=parse_int(self.points_text, "points"),
            rows=parse_int(self.rows_text, "rows"),
            step_nm=parse_float(step_text, "step") if step_text and mode == "line" else None,
            frames_per_point=parse_int(self.frames_text, "frames per point"),
            exposure_ms=parse_float(self.exposure_text, "exposure"),
            survey_fov_nm=parse_float(self.survey_fov_text, "survey field of view"),
            survey_size_px=parse_int(self.survey_size_text, "survey size"),
            survey_before=bool(self.survey_before),
            survey_after=bool(self.survey_after),
            drift_tracking_every=parse_int(self.tracking_every_text, "drift tracking every"),
            session_dir=default_session_dir(),
        )

    def check_plan(self, plan: EELSScanPlan) -> PlanCheck:
        return check_eels_plan(plan, fov_nm=plan.survey_fov_nm)

    def make_procedure(self, plan: EELSScanPlan, instrument: Instrument, sender: Any,
                       control: RunControl) -> EELSScanProcedure:
        return EELSScanProcedure(plan, stem_controller=instrument.stem_controller,
                                 scan_source=instrument.scan_source, camera_source=instrument.camera_source,
                                 sender=sender, control=control, on_progress=self.on_progress,
                                 channel=instrument.channel)

    # --- points from a graphic ---
    def take_from_graphic(self, display_item: Any) -> bool:
        """Set start/end (and the mode) from a line or rectangle graphic on a survey display item.

        The selected graphic is used if there is one, else the first line or rectangle. A line gives a line scan
        from its start to its end; a rectangle gives a map over it (top-left to bottom-right). The survey field
        of view is taken from the image calibration when it is in nm.
        """
        from nion.swift.model import Graphics

        if display_item is None:
            self.status_text = "Select the survey image first."
            return False
        graphics = list(display_item.graphics)
        selection = getattr(display_item, "graphic_selection", None)
        selected = [graphics[i] for i in sorted(getattr(selection, "indexes", ()) or ()) if i < len(graphics)]
        candidates = [g for g in selected + graphics
                      if isinstance(g, Graphics.LineGraphic | Graphics.RectangleGraphic)]
        if not candidates:
            self.status_text = "The selected display has no line or rectangle graphic."
            return False
        graphic = candidates[0]
        if isinstance(graphic, Graphics.LineGraphic):
            y0, x0 = graphic.start.y, graphic.start.x
            y1, x1 = graphic.end.y, graphic.end.x
            self.mode_index = MODES.index("line")
        else:
            bounds = graphic.bounds
            y0, x0 = bounds.top, bounds.left
            y1, x1 = bounds.bottom, bounds.right
            self.mode_index = MODES.index("map")
        self.start_text = format_point((y0, x0))
        self.end_text = format_point((y1, x1))
        data_item = getattr(display_item, "data_item", None)
        xdata = getattr(data_item, "xdata", None)
        if xdata is not None and xdata.is_data_2d:
            calibration = xdata.dimensional_calibrations[-1]
            if calibration.units == "nm" and calibration.scale > 0:
                self.survey_fov_text = f"{calibration.scale * xdata.data_shape[-1]:.4g}"
        shape = "line" if isinstance(graphic, Graphics.LineGraphic) else "rectangle"
        self.status_text = f"Points taken from the {shape} on {display_item.displayed_title}"
        return True

    def from_graphic_clicked(self, widget: Any = None) -> None:
        dc = self.document_controller
        self.take_from_graphic(dc.selected_display_item if dc is not None else None)


# ----------------------------------------------------------------------------------------------- UI descriptions


def _labeled(u: Declarative.DeclarativeUI, label: str, field: str, tool_tip: str = "", width: int = 80) -> Any:
    return u.create_row(u.create_label(text=label, width=150),
                        u.create_line_edit(text=f"@binding({field})", width=width, tool_tip=tool_tip or None),
                        u.create_stretch(), spacing=4)


def _combo(u: Declarative.DeclarativeUI, label: str, field: str, on_changed: str) -> Any:
    return u.create_row(u.create_label(text=label, width=150),
                        u.create_combo_box(items_ref=f"@binding({field}_items)",
                                           current_index=f"@binding({field}_index)",
                                           on_current_index_changed=on_changed),
                        u.create_stretch(), spacing=4)


def _device_chooser(u: Declarative.DeclarativeUI, camera: bool) -> Any:
    rows = [_combo(u, _("Instrument"), "instrument", "instrument_changed"),
            _combo(u, _("Scan device"), "scan", "scan_changed"),
            _combo(u, _("HAADF channel"), "channel", "device_changed")]
    if camera:
        rows.append(_combo(u, _("EELS camera"), "camera", "device_changed"))
    rows.append(u.create_row(u.create_push_button(text=_("Refresh devices"), on_clicked="refresh_devices_clicked"),
                             u.create_stretch()))
    return u.create_column(*rows, spacing=4)


def _run_controls(u: Declarative.DeclarativeUI) -> list[Any]:
    buttons = u.create_row(
        u.create_push_button(text=_("Check plan"), on_clicked="check_clicked"),
        u.create_push_button(text=_("Start"), on_clicked="start_clicked", enabled="@binding(can_start)"),
        u.create_push_button(text=_("Pause"), on_clicked="pause_clicked", enabled="@binding(can_pause)"),
        u.create_push_button(text=_("Resume"), on_clicked="resume_clicked", enabled="@binding(can_resume)"),
        u.create_push_button(text=_("Abort"), on_clicked="abort_clicked", enabled="@binding(can_abort)"),
        u.create_stretch(), spacing=4)
    return [
        _labeled(u, _("Service endpoint"), "endpoint", _("where the stemlive pipeline service receives frames"), 200),
        buttons,
        u.create_label(text="@binding(progress_text)", word_wrap=True),
        u.create_label(text="@binding(status_text)", word_wrap=True),
    ]


def tilt_series_ui() -> Any:
    """Declarative description of the Tilt Series panel (bound to a :class:`TiltSeriesModel`)."""
    u = Declarative.DeclarativeUI()
    tilts = u.create_column(
        u.create_label(text=_("Tilts (alpha_deg, beta_deg), one per line")),
        u.create_text_edit(text="@binding(tilts_text)", height=140),
        u.create_row(u.create_push_button(text=_("Import CSV..."), on_clicked="import_clicked"),
                     u.create_push_button(text=_("Export CSV..."), on_clicked="export_clicked"),
                     u.create_push_button(text=_("Reference tilts"), on_clicked="reset_tilts_clicked"),
                     u.create_stretch(), spacing=4),
        spacing=4)
    settings = u.create_column(
        _labeled(u, _("Frames per tilt"), "frames_text"),
        _labeled(u, _("Frame size (px)"), "size_text"),
        _labeled(u, _("Dwell (us)"), "dwell_text"),
        _labeled(u, _("Field of view (nm)"), "fov_text"),
        _labeled(u, _("Settle time (s)"), "settle_text"),
        _labeled(u, _("Confirm tolerance"), "tolerance_text", _("Nion tolerance factor for SetValAndConfirm")),
        u.create_row(u.create_label(text=_("Order"), width=150),
                     u.create_combo_box(items=list(ORDER_LABELS), current_index="@binding(order_index)"),
                     u.create_stretch(), spacing=4),
        u.create_check_box(text=_("Track the region between tilts"), checked="@binding(tracking)"),
        spacing=4)
    return u.create_column(_device_chooser(u, camera=False), tilts, settings, *_run_controls(u), u.create_stretch(),
                           spacing=8, margin=8)


def eels_ui() -> Any:
    """Declarative description of the Vibrational EELS panel (bound to an :class:`EELSModel`)."""
    u = Declarative.DeclarativeUI()
    geometry = u.create_column(
        u.create_row(u.create_label(text=_("Mode"), width=150),
                     u.create_combo_box(items=list(MODE_LABELS), current_index="@binding(mode_index)"),
                     u.create_stretch(), spacing=4),
        _labeled(u, _("Start (y, x)"), "start_text", _("survey fractions 0..1")),
        _labeled(u, _("End (y, x)"), "end_text", _("survey fractions 0..1")),
        u.create_row(u.create_push_button(text=_("From graphic on selected survey"), on_clicked="from_graphic_clicked"),
                     u.create_stretch()),
        _labeled(u, _("Points (x)"), "points_text"),
        _labeled(u, _("Step (nm, line)"), "step_text", _("empty: use the number of points")),
        _labeled(u, _("Rows (map)"), "rows_text"),
        spacing=4)
    settings = u.create_column(
        _labeled(u, _("Frames per point"), "frames_text"),
        _labeled(u, _("Exposure (ms)"), "exposure_text"),
        _labeled(u, _("Survey FOV (nm)"), "survey_fov_text"),
        _labeled(u, _("Survey size (px)"), "survey_size_text"),
        u.create_row(u.create_check_box(text=_("Survey before"), checked="@binding(survey_before)"),
                     u.create_check_box(text=_("Survey after"), checked="@binding(survey_after)"),
                     u.create_stretch(), spacing=8),
        _labeled(u, _("Drift tracking every N points"), "tracking_every_text", _("0: off")),
        spacing=4)
    return u.create_column(_device_chooser(u, camera=True), geometry, settings, *_run_controls(u),
                           u.create_stretch(), spacing=8, margin=8)


# ----------------------------------------------------------------------------------------------- Swift panels


class _StemlivePanel(Panel.Panel):
    """A Swift panel holding a declarative widget bound to an :class:`AcquisitionModel`."""

    model: AcquisitionModel

    def __init__(self, document_controller: Any, panel_id: str, title: str, model: AcquisitionModel,
                 ui_description: Any) -> None:
        super().__init__(document_controller, panel_id, title)
        model.ui_view = ui_description
        model.restore()  # the last plan and device choice, else the defaults
        self.model = model
        self.widget = Declarative.DeclarativeWidget(document_controller.ui, document_controller.event_loop, model)
        from . import results

        self._results = results.attach(document_controller)
        model.follow_results(self._results)

    def close(self) -> None:
        from . import results

        self.model.close()
        results.detach(self._results)
        self._results = None
        super().close()


class TiltSeriesPanel(_StemlivePanel):
    """The "Tilt Series" panel."""

    def __init__(self, document_controller: Any, panel_id: str, properties: dict[str, Any]) -> None:
        model = TiltSeriesModel(document_controller=document_controller, dispatch=document_controller.queue_task)
        super().__init__(document_controller, panel_id, _("Tilt Series"), model, tilt_series_ui())


class EELSPanel(_StemlivePanel):
    """The "Vibrational EELS" panel."""

    def __init__(self, document_controller: Any, panel_id: str, properties: dict[str, Any]) -> None:
        model = EELSModel(document_controller=document_controller, dispatch=document_controller.queue_task)
        super().__init__(document_controller, panel_id, _("Vibrational EELS"), model, eels_ui())


def register_panels() -> None:
    """Register both panels with Swift's workspace manager."""
    from nion.swift import Workspace

    manager = Workspace.WorkspaceManager()
    manager.register_panel(TiltSeriesPanel, TILT_SERIES_PANEL_ID, _("Tilt Series"), ["left", "right"], "right",
                           {"min-width": 320})
    manager.register_panel(EELSPanel, EELS_PANEL_ID, _("Vibrational EELS"), ["left", "right"], "right",
                           {"min-width": 320})


def unregister_panels() -> None:
    """Remove both panels (tests)."""
    from nion.swift import Workspace

    manager = Workspace.WorkspaceManager()
    for panel_id in (TILT_SERIES_PANEL_ID, EELS_PANEL_ID):
        try:
            manager.unregister_panel(panel_id)
        except KeyError:
            pass
