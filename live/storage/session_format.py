"""Session file v1 (``stemlive-session``): names, columns and small helpers shared by the writer
(:mod:`.session`), the reader (:mod:`.session_reader`), ``stemlive info`` (:mod:`.session_info`) and the
importer. The contract is in DESIGN.md and ``docs/session-format.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import h5py

FORMAT = "stemlive-session"
FORMAT_VERSION = 1
KINDS = frozenset({"tilt_series", "eels_line_scan", "eels_map"})
FINAL_STATUSES = frozenset({"complete", "aborted", "failed"})
STATUSES = FINAL_STATUSES | {"recording"}
SURVEYS = ("before", "after")

#: Per-frame columns of ``/tilt_series`` in write order (``t`` last: a row with a finite ``t`` was written whole).
FRAME_COLUMNS: dict[str, str] = {
    "tilt_index": "<i4",
    "frame_index": "<i4",
    "alpha_deg": "<f8",
    "beta_deg": "<f8",
    "seq": "<i8",
    "t": "<f8",
}
#: Per-spectrum columns of ``/eels`` in write order (``t`` last).
SPECTRUM_COLUMNS: dict[str, str] = {
    "point_index": "<i4",
    "frame_index": "<i4",
    "x_nm": "<f8",
    "y_nm": "<f8",
    "energy_offset_meV": "<f8",
    "seq": "<i8",
    "t": "<f8",
}
#: ``/eels`` attributes taken from the first spectrum message.
SPECTRUM_ATTRS = ("dispersion_meV", "exposure_ms")
#: ``/tilt_series`` attributes taken from the first frame message.
FRAME_ATTRS = ("pixel_size_nm", "dwell_us")

COMMITTED = "committed_rows"


class SessionFormatError(ValueError):
    """The file is not a stemlive session file, or one of a format version this reader does not support."""



def iso(t: float) -> str:
    """ISO 8601 (UTC, with offset) of a Unix time."""
    return datetime.fromtimestamp(t, UTC).isoformat()


def get_text(f: h5py.File, name: str) -> str | None:
    """A root attribute or root string dataset as text (``settings``, ``session_start``...), ``None`` if absent."""
    if name in f.attrs:
        return as_str(f.attrs[name])
    if name in f and isinstance(f[name], h5py.Dataset):
        return as_str(f[name][()])
    return None


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def header_fields(header: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The fields ``names`` of ``header`` that are present and not ``None``."""
    return {name: header[name] for name in names if name in header and header[name] is not None}
