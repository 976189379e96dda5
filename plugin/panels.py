"""The "Tilt Series" and "Vibrational EELS" panels of the stemlive plug-in.

Each panel is a thin Swift shell (:class:`TiltSeriesPanel`, :class:`EELSPanel`) around a plain-Python model
(:class:`TiltSeriesModel`, :class:`EELSModel`, both :class:`~nionswift_plugin.stemlive.model.AcquisitionModel`)
that holds the field values as text, builds the acquisition plan from them, checks it, and runs the procedure on
a worker thread (see :mod:`.model` for the threads).
"""

from __future__ import annotations

import gettext
import logging
from pathlib import Path
from typing import Any

from nion.swift import Panel
from nion.ui import Declarative

from .acquisition import PlanCheck, PlanError, RunControl
from .eels_scan import EELSScanPlan, EELSScanProcedure
from .eels_scan import check_plan as check_eels_plan
from .instruments import Instrument, find_instrument  # noqa: F401 - re-exported for scripts
from .model import (  # noqa: F401 - re-exported: the panels' public names
    DEFAULT_FRAME_ENDPOINT,
    AcquisitionModel,
    _Field,
    default_frame_endpoint,
    default_session_dir,
    format_point,
    make_sender,
    parse_float,
    parse_int,
    parse_point,
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

ORDERS = ("as_listed", "increasing_tilt")
ORDER_LABELS = (_("As listed"), _("Increasing tilt"))
MODES = ("line", "map")
MODE_LABELS = (_("Line"), _("Map"))


class TiltSeriesModel(AcquisitionModel):
    """Fields and actions of the Tilt Series panel (see :class:`TiltSeriesPlan` for the meaning of each)."""

    step_name = "tilt"
    settings_key = "tilt_series"
    plan_fields = ("tilts_text", "frames_text", "size_text", "dwell_text", "fov_text", "settle_text",
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

    def check_plan(self, plan: TiltSeriesPlan, instrument: Instrument | None = None) -> PlanCheck:
        return check_tilt_plan(plan, instrument=instrument)

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
    plan_fields = ("mode_index", "start_text", "end_text", "points_text", "step_text", "rows_text",
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

    def check_plan(self, plan: EELSScanPlan, instrument: Instrument | None = None) -> PlanCheck:
        return check_eels_plan(plan, fov_nm=plan.survey_fov_nm, instrument=instrument)

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
