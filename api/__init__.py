"""stemlive: live STEM tilt series and vibrational EELS on Nion Swift -- the notebook API.

Functions over numpy arrays or HyperSpy signals, the same analysis code as the live pipeline::

    import stemlive
    s = stemlive.load("session.h5")                  # any v1 session file
    energy, sums, shifts = stemlive.align_and_sum(frames, dispersion_meV=0.44, energy_offset_meV=offsets)
    T, T_err = stemlive.temperature_map(sums, energy)
    labels = stemlive.segment(sums, energy, k=3)
    stemlive.import_arrays(frames, "mine.h5", kind="eels_line_scan", dispersion_meV=0.44, frames_axis=True)
    stemlive.import_signal(hs.load("si.hspy"), "si.h5")   # or stemlive.import_files(["a.dm4"], "a.h5")
    stemlive.analyze("session.h5", "analysed.h5", "eels.k=3")
    stemlive.export("analysed.h5", "out.hspy", "hspy")  # eXSpy EELSSpectrum; tilt series: "emd" (Tomviz)

Walk-through: docs/notebook.md. This package only re-exports from ``stemlive.live`` (no Qt, ZeroMQ or Swift),
lazily: importing ``stemlive.live`` (the CLI, the Swift plug-in) does not load the analysis modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stemlive.live import __version__

if TYPE_CHECKING:
    from stemlive.live.apps.api import Session, align_and_sum, analyze, load, segment, temperature_map
    from stemlive.live.storage.export import eels_signals, export, tilt_series_signal
    from stemlive.live.storage.importer import import_arrays, import_files, import_signal

_WHERE = {
    "Session": "apps.api", "align_and_sum": "apps.api", "analyze": "apps.api", "load": "apps.api",
    "segment": "apps.api", "temperature_map": "apps.api",
    "eels_signals": "storage.export", "export": "storage.export", "tilt_series_signal": "storage.export",
    "import_arrays": "storage.importer", "import_files": "storage.importer", "import_signal": "storage.importer",
}

__all__ = [  # the names of _WHERE (tests/test_api.py checks), spelled out for linters and type checkers
    "Session",
    "__version__",
    "align_and_sum",
    "analyze",
    "eels_signals",
    "export",
    "import_arrays",
    "import_files",
    "import_signal",
    "load",
    "segment",
    "temperature_map",
    "tilt_series_signal",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'stemlive' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stemlive.live.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
