"""A minimal DigitalMicrograph 3 (.dm3) writer for tests: one spectrum image with its calibrations.

Written from the DM3 tag-file layout (big-endian header and tag structure, little-endian values): the root tag
group holds ``ImageList`` with one image: ``ImageData`` (``Calibrations.Dimension``, ``Data``, ``DataType``,
``Dimensions``) and ``ImageTags.Meta Data`` (``Format = "Spectrum image"``, ``Signal = "EELS"``). DM orders
dimensions x, y, energy, fastest first, and stores each axis' origin in channels (offset = -origin * scale).
No stemlive code; no DigitalMicrograph either, so this is a check of the import path, not of Gatan's files.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

GROUP, DATA = 20, 21
DOUBLE, LONG, USHORT, FLOAT = 7, 3, 4, 6


def _name(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">h", len(raw)) + raw


def _data_tag(name: str, value: Any) -> bytes:
    head = struct.pack(">B", DATA) + _name(name) + b"%%%%"
    if isinstance(value, str):  # an array of 2-byte characters
        chars = [ord(c) for c in value]
        return head + struct.pack(">llll", 3, 20, USHORT, len(chars)) + struct.pack(f"<{len(chars)}H", *chars)
    if isinstance(value, np.ndarray):  # float32 data
        flat = np.ascontiguousarray(value, "<f4").ravel()
        return head + struct.pack(">llll", 3, 20, FLOAT, flat.size) + flat.tobytes()
    if isinstance(value, int):
        return head + struct.pack(">ll", 1, LONG) + struct.pack("<l", value)
    return head + struct.pack(">ll", 1, DOUBLE) + struct.pack("<d", float(value))


def _group(name: str, tags: list[bytes]) -> bytes:
    return struct.pack(">B", GROUP) + _name(name) + struct.pack(">BBl", 0, 1, len(tags)) + b"".join(tags)


def write_spectrum_image(path: Path, spectra: np.ndarray, *, step_nm: float, x0_nm: float,
                         energy_offset_eV: float, dispersion_eV: float, exposure_s: float = 1.0) -> Path:
    """``spectra`` ``(ny, nx, channels)``; x from ``x0_nm``, y from 0, both ``step_nm`` apart."""
    ny, nx, nc = spectra.shape
    dims = [(x0_nm, step_nm, "nm", nx), (0.0, step_nm, "nm", ny), (energy_offset_eV, dispersion_eV, "eV", nc)]
    calibrations = [_group("", [_data_tag("Origin", -offset / scale), _data_tag("Scale", scale),
                                _data_tag("Units", units)]) for offset, scale, units, _ in dims]
    image_data = _group("ImageData", [
        _group("Calibrations", [
            _group("Brightness", [_data_tag("Origin", 0.0), _data_tag("Scale", 1.0), _data_tag("Units", "Counts")]),
            _group("Dimension", calibrations),
        ]),
        _data_tag("Data", np.transpose(spectra, (2, 0, 1))),  # energy slowest, x fastest
        _data_tag("DataType", 2),
        _group("Dimensions", [_data_tag("", size) for *_, size in dims]),
    ])
    image_tags = _group("ImageTags", [
        _group("Meta Data", [_data_tag("Format", "Spectrum image"), _data_tag("Signal", "EELS")]),
        _group("EELS", [_group("Acquisition", [_data_tag("Exposure (s)", exposure_s)])]),
    ])
    image = _group("", [image_data, image_tags, _data_tag("Name", "EELS spectrum image")])
    root = struct.pack(">BBl", 0, 1, 1) + _group("ImageList", [image])
    body = struct.pack(">lll", 3, 12 + len(root) + 8, 1) + root + b"\0" * 8
    path.write_bytes(body)
    return path
