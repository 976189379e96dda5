"""The analysis stage interface: :class:`Result`, :class:`Stage`, :func:`register_stage` and session parameters.

A :class:`Stage` sees a session's data messages in ``seq`` order and emits :class:`Result` objects that are
written under ``/results/<stage>/<name>`` and published to viewers. The built-in stages
(:mod:`~stemlive.live.pipeline.tilt_stage`, :mod:`~stemlive.live.pipeline.eels_stage`) register themselves with
:func:`register_stage`; :mod:`stemlive.live.pipeline.registry` lists them and makes their parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from stemlive.live.config import Params, resolve_params
from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)


@dataclass
class Result:
    """One analysis output, written to ``/results/<stage>/<name>`` and published on the result stream.

    Attributes
    ----------
    stage, name
        Where the result goes: ``/results/<stage>/<name>``.
    value
        A numeric array, or a numpy structured array for tables.
    index
        ``None`` replaces the whole dataset; an integer writes row ``index`` of a dataset growing along axis 0
        (per-tilt sums, per-point spectra, per-frame drift).
    attrs
        Small metadata stored as dataset attributes and sent in the result header.
    """

    stage: str
    name: str
    value: np.ndarray
    index: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    store: bool = True  # False: publish only (live previews that the file does not need)


class Stage:
    """Base class of an analysis stage. Subclasses set the class variables and override the hooks.

    ``name`` is also the parameter section: ``--set <name>.<param>=<value>``.
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params: dict[str, Any] = {**self.defaults, **params}

    def start(self, start: Message) -> Iterable[Result]:
        """Called with the ``session_start`` message (settings and calibrations)."""
        return ()

    def process(self, msg: Message) -> Iterable[Result]:
        """Called with each data message (frame, spectrum, survey) in ``seq`` order."""
        return ()

    def finish(self, status: str) -> Iterable[Result]:
        """Called once at the end of the session (``complete``, ``aborted`` or ``failed``)."""
        return ()


_STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator that makes a stage available to the service and to replay."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no stage name")
    _STAGES[cls.name] = cls
    return cls


def all_stages() -> dict[str, type[Stage]]:
    """The stages registered so far by name (:func:`stemlive.live.pipeline.registry.registered_stages` adds the
    built-in ones first)."""
    return dict(_STAGES)


def session_params(params: Params, start: Message) -> Params:
    """The service's parameters with the session's own analysis settings (``settings["analysis"]``) on top.

    An acquisition may carry sample-specific analysis parameters (e.g. starting peak centres). Invalid ones are
    logged and ignored: a typo in the settings must not stop a session from being recorded.
    """
    settings = start.header.get("settings") or {}
    overrides = settings.get("analysis") if isinstance(settings, dict) else None
    if not overrides:
        return params
    try:
        return resolve_params(params, extra=overrides)
    except (ValueError, AttributeError) as e:
        log.error("session %s: analysis settings ignored: %s", start.session, e)
        return params
