"""The plain-Python model behind both stemlive panels: fields, plan check, device choice, run and status.

:class:`AcquisitionModel` holds the field values as text, builds the acquisition plan from them (subclasses in
:mod:`.panels`), checks it, and runs the procedure on a worker thread. It needs no Qt and no document: the UI
thread is reached only through the ``dispatch`` callable it is given (``document_controller.queue_task`` in
Swift), so the same code is driven by the widgets, by tests and by scripts.

Threads
-------
UI thread
    Field edits, Check, Start (plan check, instrument look-up, thread start), Pause / Resume / Abort (flags only).
worker thread (one per acquisition)
    Runs the procedure's ``run``; its progress callbacks store the latest
    :class:`~nionswift_plugin.stemlive.acquisition.Progress` and queue one UI update at a time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from nion.ui import Declarative

from .acquisition import PlanCheck, PlanError, Progress, RunControl
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

log = logging.getLogger(__name__)

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:7710"

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
    """A :class:`stemlive.live.wire.transport.FrameSender` connected to ``endpoint``."""
    from stemlive.live.wire.transport import FrameSender

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
    document_controller
        The Swift window the panel belongs to (results and graphics), or None outside Swift.
    """

    step_name = "step"
    settings_key = "panel"  # where the device choice and the last plan are remembered
    needs_camera = False
    # the fields remembered as "the last plan" (not the endpoint: that comes from `stemlive swift` / the environment)
    plan_fields: tuple[str, ...] = ()
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
    checking = _Field(False)
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
        document_controller: Any = None,
    ) -> None:
        super().__init__()
        self.document_controller = document_controller
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

    def check_plan(self, plan: Any, instrument: Instrument | None = None) -> PlanCheck:
        """The plan check shown by Check and required by Start; with ``instrument``, tested on it (test frames,
        stage controls and limits, measured overheads)."""
        raise NotImplementedError

    def find_instrument(self) -> Instrument:
        """The chosen hardware (the defaults when the chooser was never filled)."""
        return find_instrument(self.device_choice, need_camera=self.needs_camera)

    def make_procedure(self, plan: Any, instrument: Instrument, sender: Any, control: RunControl) -> Any:
        """The procedure object with a ``run() -> status`` method."""
        raise NotImplementedError

    # --- actions ---
    def check(self) -> PlanCheck | None:
        """Check the plan from the fields on the chosen instrument (waits for the instrument's test); the status
        line shows the summary or every reason it is refused."""
        plan = self._read_plan()
        if plan is None:
            return None
        try:
            instrument: Instrument | None = self.find_instrument()
        except Exception as e:
            instrument = None
            unavailable = str(e)
        check = self._checked(plan, instrument)
        if instrument is None:
            check.notes.append(f"not tested on an instrument: {unavailable}")
        self._show_check(check)
        return check

    def _read_plan(self) -> Any | None:
        """The plan from the fields for a check, or None with the reason on the status line."""
        self._following = None
        try:
            return self.build_plan()
        except PlanError as e:
            self.status_text = f"Cannot read the plan: {e}"
            self.last_check = None
            return None

    def _checked(self, plan: Any, instrument: Instrument | None) -> PlanCheck:
        try:
            return self.check_plan(plan, instrument)
        except Exception as e:  # the instrument test failed: a refusal with its reason, not a traceback
            log.exception("stemlive: plan check failed")
            check = PlanCheck(duration_s=0.0, dose_e_per_A2=0.0, bytes_on_disk=0)
            check.problems.append(f"the check failed: {type(e).__name__}: {e}")
            return check

    def _show_check(self, check: PlanCheck) -> None:
        self.last_check = check
        if check.ok:
            self.status_text = "Plan OK: " + check.summary()
        else:
            self.status_text = "Plan refused:\n- " + "\n- ".join(check.problems)

    def check_in_background(self) -> bool:
        """Check (the button): the instrument's test runs on a worker thread, the UI stays responsive; the status
        line says "Checking..." until the result is shown. False if a run or a check is already going on."""
        if self.running or self.checking:
            return False
        plan = self._read_plan()
        if plan is None:
            return False
        try:
            instrument = self.find_instrument()
        except Exception:
            self.check()  # no instrument: the plan-only check, at once, saying why
            return True
        self.checking = True
        self.can_start = False
        self.status_text = f"Checking the plan on {instrument.describe()}..."

        def work() -> None:
            check = self._checked(plan, instrument)

            def show() -> None:
                self.checking = False
                self._update_buttons()
                self._show_check(check)

            self.dispatch(show)

        threading.Thread(target=work, name="stemlive-check", daemon=True).start()
        return True

    def start(self) -> bool:
        """Check the plan and, if it is accepted, run the procedure on a worker thread.

        Returns False (nothing moved, nothing sent) when the plan is refused, unreadable, already running, or
        the instrument is missing; the status line says why.
        """
        if self.running:
            self.status_text = "An acquisition is already running."
            return False
        if self.checking:
            self.status_text = "A plan check is running: start when it has finished."
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
        self._control(RunControl.pause, paused=True, status="Paused (the stage and probe stay where they are).")

    def resume(self) -> None:
        """Resume a paused acquisition."""
        self._control(RunControl.resume, paused=False, status="Running.")

    def abort(self) -> None:
        """Abort at the next frame boundary (the session is closed as aborted)."""
        self._control(RunControl.abort, paused=False, status="Aborting...")

    def _control(self, action: Callable[[RunControl], None], *, paused: bool, status: str) -> None:
        """Apply ``action`` to the running procedure's control and show its state (nothing when none runs)."""
        if self.control is not None and self.running:
            action(self.control)
            self.paused = paused
            self._update_buttons()
            self.status_text = status

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
        self.check_in_background()

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
            if getattr(procedure, "status", None) == "not started":
                status = "refused"  # the instrument's test at Start refused it: nothing was recorded
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
        if status == "refused":
            self._run_text = f"Not started. Plan refused on the instrument (nothing recorded):\n- {error}"
            self._following = None
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
        self.can_start = not self.running and not self.checking
        self.can_pause = self.running and not self.paused
        self.can_resume = self.running and self.paused
        self.can_abort = self.running
