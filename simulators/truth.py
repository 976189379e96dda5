"""Ground-truth recording: what the simulated instrument really did, next to the session file.

:class:`GroundTruth` keeps generic records, ``{kind: [record, ...]}``, where a record is a JSON-ready dict.
Kinds used by the simulators: ``frame`` (:class:`~stemlive.simulators.haadf.FrameTruth`), ``tilt``
(:class:`~stemlive.simulators.stage.TiltState`: nominal vs actual angles), ``spectrum`` and ``probe_position``
(dicts from the EELS model: temperature_K, region, energy shift, ...). Any other kind may be added.

File: ``<session>.truth.json`` = ``{"format": "stemlive-truth", "format_version": 1, "meta": {...},
"records": {kind: [...]}}``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TRUTH_FORMAT", "GroundTruth", "to_jsonable", "truth_path_for"]

TRUTH_FORMAT = "stemlive-truth"


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, dataclasses and objects with ``to_dict`` to JSON types."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def truth_path_for(session_path: str | Path) -> Path:
    """``/x/session.h5`` -> ``/x/session.truth.json``."""
    p = Path(session_path)
    return p.with_name(p.stem + ".truth.json") if p.suffix else p.with_name(p.name + ".truth.json")


class GroundTruth:
    """Thread-safe accumulator of ground-truth records (dicts of lists).

    Parameters
    ----------
    **meta
        Free-form metadata stored under ``meta`` (scenario name, seed, the scenario dict, ...).
    """

    def __init__(self, **meta: Any) -> None:
        self.meta: dict[str, Any] = dict(meta)
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, record: Any = None, **fields: Any) -> dict[str, Any]:
        """Append a record of ``kind``: a dict / dataclass / object with ``to_dict``, plus keyword fields."""
        rec: dict[str, Any] = {} if record is None else dict(to_jsonable(record))
        rec.update(to_jsonable(fields))
        with self._lock:
            self.records.setdefault(kind, []).append(rec)
        return rec

    def add_frame(self, frame_truth: Any, **fields: Any) -> dict[str, Any]:
        """Record a frame's truth (``FrameTruth``) with extra fields such as tilt_index, frame_index."""
        return self.add("frame", frame_truth, **fields)

    def add_tilt(self, tilt_state: Any, **fields: Any) -> dict[str, Any]:
        """Record a stage move (``TiltState``: nominal vs actual angles)."""
        return self.add("tilt", tilt_state, **fields)

    def add_spectrum(self, spectrum_truth: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
        """Record one spectrum's truth (dict from the EELS model)."""
        return self.add("spectrum", spectrum_truth, **fields)

    def add_probe_position(self, probe_truth: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
        """Record one probe position's truth (temperature_K, region, ...)."""
        return self.add("probe_position", probe_truth, **fields)

    def get(self, kind: str) -> list[dict[str, Any]]:
        """Copy of the records of ``kind`` (empty if none)."""
        with self._lock:
            return list(self.records.get(kind, []))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot."""
        with self._lock:
            return {"format": TRUTH_FORMAT, "format_version": 1, "meta": to_jsonable(self.meta),
                    "records": {k: list(v) for k, v in self.records.items()}}

    def to_json(self, path: str | Path) -> Path:
        """Write the snapshot to ``path`` (atomically: temporary file then rename); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), allow_nan=True), encoding="utf-8")
        tmp.replace(path)
        return path

    def write_next_to(self, session_path: str | Path) -> Path:
        """Write ``<session>.truth.json`` next to the session file; returns its path."""
        return self.to_json(truth_path_for(session_path))

    @classmethod
    def from_json(cls, path: str | Path) -> GroundTruth:
        """Read a file written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != TRUTH_FORMAT:
            raise ValueError(f"{path}: not a {TRUTH_FORMAT} file")
        gt = cls(**data.get("meta", {}))
        gt.records = {k: list(v) for k, v in data.get("records", {}).items()}
        return gt
