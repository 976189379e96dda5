"""Analysis problems: results that could not be produced, kept with the session and printed one line each.

A stage reports each one as ``Result(stage, "problem", np.zeros(0), attrs={"result": ..., "severity":
"skipped" | "failed", "reason": "<one line>"})``; the pipeline publishes it, stores all of a session's problems
of a stage as the table ``/results/<stage>/problems`` (columns ``result``, ``severity``, ``reason``) and, when the
session's analysis has finished, ``/results/pipeline/analysis_finished`` (attributes ``status`` = ``complete`` |
``incomplete`` and ``problems`` = their number).  Files written before these existed have neither: readers
return no problems and no status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SEVERITIES = ("skipped", "failed")
"""``skipped``: the data do not allow the result (e.g. a window outside the acquired range); ``failed``: it was
attempted and did not succeed (e.g. a fit that raised)."""

FINISHED_STAGE, FINISHED_NAME = "pipeline", "analysis_finished"


@dataclass(frozen=True)
class Problem:
    """One result of one stage that could not be produced."""

    stage: str
    result: str
    severity: str
    reason: str

    @classmethod
    def from_attrs(cls, stage: str, attrs: Mapping[str, Any]) -> Problem:
        """From a ``problem`` result's attributes (missing fields become ``"?"``)."""
        return cls(stage, str(attrs.get("result", "?")), str(attrs.get("severity", "failed")),
                   " ".join(str(attrs.get("reason", "?")).split()))  # one line, whatever the stage sent

    def line(self) -> str:
        """``eels/temperature skipped: gain side ends at -120 meV: ...``."""
        return f"{self.stage}/{self.result} {self.severity}: {self.reason}"


def table(problems: Sequence[Problem]) -> np.ndarray:
    """The stored form of one stage's problems: a structured array with columns result, severity, reason."""
    width = max([1] + [len(p.reason) for p in problems])
    dtype = np.dtype([("result", "U64"), ("severity", "U16"), ("reason", f"U{width}")])
    return np.array([(p.result, p.severity, p.reason) for p in problems], dtype=dtype)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_problems(f: h5py.File) -> list[Problem]:
    """All problems stored in an open session file (``[]`` for files without any)."""
    out: list[Problem] = []
    results = f.get("results")
    if results is None:
        return out
    for stage in sorted(results):
        ds = results[stage].get("problems") if isinstance(results[stage], h5py.Group) else None
        if not isinstance(ds, h5py.Dataset) or ds.dtype.names is None:
            continue
        for row in ds[()].reshape(-1):
            out.append(Problem(stage, _text(row["result"]), _text(row["severity"]), _text(row["reason"])))
    return out


def read_finished(f: h5py.File) -> dict[str, Any] | None:
    """The attributes of ``/results/pipeline/analysis_finished`` (status, problems), or None (older files)."""
    ds = f.get(f"results/{FINISHED_STAGE}/{FINISHED_NAME}")
    if ds is None:
        return None
    return {k: _text(v) if isinstance(v, bytes | str) else v.item() if isinstance(v, np.generic) else v
            for k, v in ds.attrs.items()}


def problems_in(path: str | Path) -> list[Problem]:
    """All problems stored in the session file ``path``."""
    with h5py.File(path, "r") as f:
        return read_problems(f)


def describe_lines(f: h5py.File) -> list[str]:
    """Lines for ``stemlive info``: the analysis status and every problem, one line each (none for older files)."""
    finished = read_finished(f)
    problems = read_problems(f)
    lines = []
    if finished is not None:
        count = finished.get("problems", len(problems))
        lines.append(f"  analysis:    {finished.get('status', '?')} ({count} problems)")
    lines += [f"    {p.line()}" for p in problems]
    return lines
