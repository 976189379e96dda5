"""Run the stemlive procedures from a script: Swift's Python console, or ``stemlive acquire`` (headless).

In Swift (Window > Python Console), with a pipeline service listening (``stemlive swift`` starts one)::

    from nionswift_plugin.stemlive import scripting
    run = scripting.start("eels-line", instrument="usim", frames_per_point=5, points=4, step_nm=None,
                          exposure_ms=0.2)   # instrument=None: Swift's default instrument
    run.check.summary()   # what Check said on the instrument
    run.wait()            # -> "complete" (blocks; leave it out to keep the console free)
    run.abort()           # stops at the next frame; the instrument is put back as it was

The procedure classes are the ones the panels run (:class:`~.tilt_series.TiltSeriesProcedure`,
:class:`~.eels_scan.EELSScanProcedure`); plans are built from keyword settings (the plan dataclass fields).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .acquisition import PlanCheck, PlanError, RunControl, haadf_channel
from .eels_scan import EELSScanPlan, EELSScanProcedure
from .eels_scan import check_plan as check_eels_plan
from .tilt_series import TiltSeriesPlan, TiltSeriesProcedure
from .tilt_series import check_plan as check_tilt_plan

log = logging.getLogger(__name__)

PROCEDURES = ("tilt-series", "eels-line", "eels-map")
#: Short instrument names; any other name is taken as a registered STEM controller's ``instrument_id``.
INSTRUMENT_IDS = {"stemlive": "stemlive_stem_controller", "usim": "usim_stem_controller"}


@dataclass
class Hardware:
    """The devices one run drives (the same shape as the panels' instrument)."""

    stem_controller: Any
    scan_source: Any
    camera_source: Any | None = None
    channel: int = 0

    def describe(self) -> str:
        ids = [str(getattr(self.stem_controller, "instrument_id", "?")),
               str(getattr(self.scan_source, "hardware_source_id", "?"))]
        if self.camera_source is not None:
            ids.append(str(getattr(self.camera_source, "hardware_source_id", "?")))
        return " / ".join(ids)


def registered_instruments() -> list[str]:
    """The ``instrument_id`` of every registered STEM controller."""
    from nion.utils import Registry

    return [str(getattr(c, "instrument_id", type(c).__name__))
            for c in Registry.get_components_by_type("stem_controller")]


def find_hardware(name: str | None, *, need_camera: bool, channel_name: str = "HAADF") -> Hardware:
    """The STEM controller called ``name`` (``stemlive``, ``usim`` or a registered id; None: Swift's default, the
    one Nion's own panels use) with its own scan device, its HAADF channel (by name) and its own EELS camera.

    Raises
    ------
    LookupError
        With the registered ids, when there is no such instrument or it lacks a device.
    """
    from nion.utils import Registry

    if name is None:
        stem = Registry.get_component("stem_controller")
        name = str(getattr(stem, "instrument_id", "default"))
    else:
        wanted = INSTRUMENT_IDS.get(name, name)
        stem = next((c for c in Registry.get_components_by_type("stem_controller")
                     if str(getattr(c, "instrument_id", "")) == wanted), None)
    if stem is None:
        raise LookupError(f"no instrument {name!r} is registered (registered: "
                          f"{', '.join(registered_instruments()) or 'none'})")
    scan = getattr(stem, "scan_controller", None)
    if scan is None:
        raise LookupError(f"the instrument {name!r} has no scan device")
    camera = getattr(stem, "eels_camera", None) if need_camera else None
    if need_camera and camera is None:
        raise LookupError(f"the instrument {name!r} has no EELS camera")
    return Hardware(stem, scan, camera, haadf_channel(scan, channel_name))


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON where it parses (numbers, lists, true/false, null), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def make_plan(procedure: str, settings: Mapping[str, Any]) -> TiltSeriesPlan | EELSScanPlan:
    """The plan of ``procedure`` from plan-field settings (unknown names refused with the known ones).

    ``tilts_csv`` (a CSV file of alpha_deg, beta_deg) may stand for ``tilts_deg``.
    """
    from pathlib import Path

    from .tilt_series import read_tilts_csv

    if procedure not in PROCEDURES:
        raise PlanError(f"unknown procedure {procedure!r} (one of {', '.join(PROCEDURES)})")
    settings = dict(settings)
    cls: type = TiltSeriesPlan if procedure == "tilt-series" else EELSScanPlan
    if procedure == "tilt-series" and "tilts_csv" in settings:
        settings["tilts_deg"] = read_tilts_csv(Path(str(settings.pop("tilts_csv"))).read_text())
    if procedure != "tilt-series":
        mode = "line" if procedure == "eels-line" else "map"
        if settings.get("mode", mode) != mode:
            raise PlanError(f"mode {settings['mode']!r} does not match the procedure {procedure}")
        settings["mode"] = mode
    names = _field_names(cls)
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise PlanError(f"unknown plan setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(known: {', '.join(names)})")
    for key in ("tilts_deg", "start", "end", "alpha_limits_deg", "beta_limits_deg", "tracking_region"):
        if key in settings and isinstance(settings[key], list):
            value = settings[key]
            settings[key] = [tuple(v) for v in value] if key == "tilts_deg" else tuple(value)
    try:
        plan = cls(**settings)
    except TypeError as e:
        raise PlanError(str(e)) from None
    return plan


def check(plan: TiltSeriesPlan | EELSScanPlan, hardware: Hardware) -> PlanCheck:
    """The plan check on ``hardware`` (the Check the panels show; the instrument is left as it was)."""
    if isinstance(plan, TiltSeriesPlan):
        return check_tilt_plan(plan, instrument=hardware)
    return check_eels_plan(plan, fov_nm=plan.survey_fov_nm, instrument=hardware)


def make_procedure(plan: TiltSeriesPlan | EELSScanPlan, hardware: Hardware, sender: Any, *,
                   control: RunControl | None = None, on_progress: Any = None) -> Any:
    """The procedure object the panels would run for ``plan``."""
    common = dict(stem_controller=hardware.stem_controller, scan_source=hardware.scan_source, sender=sender,
                  control=control, on_progress=on_progress, channel=hardware.channel)
    if isinstance(plan, TiltSeriesPlan):
        return TiltSeriesProcedure(plan, **common)
    return EELSScanProcedure(plan, camera_source=hardware.camera_source, **common)


@dataclass
class Run:
    """A procedure running on its own thread (what :func:`start` returns)."""

    procedure: Any
    check: PlanCheck
    control: RunControl
    thread: threading.Thread
    sender: Any
    status: str | None = None
    error: str | None = None
    refused: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout_s: float | None = None) -> str | None:
        """Block until the run ends; returns its status (``complete``, ``aborted``, ``failed``, ``refused``)."""
        self.done.wait(timeout_s)
        return self.status

    def abort(self) -> None:
        """Stop at the next frame; the instrument is put back as it was."""
        self.control.abort()

    @property
    def session_id(self) -> str:
        return str(self.procedure.session_id)


def start(procedure: str, *, instrument: str | None = None, endpoint: str | None = None,
          plan: TiltSeriesPlan | EELSScanPlan | None = None, hardware: Hardware | None = None,
          on_progress: Any = None, **settings: Any) -> Run:
    """Check ``plan`` (or one made from ``settings``) on ``instrument`` (None: Swift's default instrument) and run
    it on a thread; the service at ``endpoint`` (default ``tcp://127.0.0.1:7710``) records it.

    Raises
    ------
    PlanError
        The plan is refused at Check (the message lists every reason); nothing was recorded.
    """
    from stemlive.live.wire.transport import DEFAULT_FRAME_ENDPOINT, FrameSender

    plan = plan if plan is not None else make_plan(procedure, settings)
    hardware = hardware or find_hardware(instrument, need_camera=not isinstance(plan, TiltSeriesPlan))
    result = check(plan, hardware)
    result.raise_if_refused()
    sender = FrameSender(endpoint or DEFAULT_FRAME_ENDPOINT)
    control = RunControl()
    proc = make_procedure(plan, hardware, sender, control=control, on_progress=on_progress)
    run = Run(proc, result, control, threading.Thread(), sender)

    def target() -> None:
        try:
            run.status = str(proc.run())
        except PlanError as e:
            run.status, run.error, run.refused = "refused", str(e), True
        except BaseException as e:
            run.status, run.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("stemlive scripted acquisition failed")
        finally:
            try:
                sender.close()
            except Exception:
                log.exception("could not close the frame sender")
            run.done.set()

    run.thread = threading.Thread(target=target, name="stemlive-scripted-acquisition", daemon=True)
    run.thread.start()
    return run
