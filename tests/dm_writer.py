"""A minimal DigitalMicrograph (.dm3 / .dm4) writer for tests: one spectrum image with its calibrations.

Written from the DM tag-file layout (big-endian header and tag structure, little-endian values; DM4 has 8-byte
lengths and a size before each tag and tag group): the root tag
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


class _Writer:
    def __init__(self, version: int) -> None:
        self.version = version
        self.q = ">q" if version == 4 else ">l"  # lengths, counts and type codes

    def n(self, *values: int) -> bytes:
        return b"".join(struct.pack(self.q, v) for v in values)

    def name(self, name: str) -> bytes:
        raw = name.encode()
        return struct.pack(">h", len(raw)) + raw

    def data(self, name: str, value: Any) -> bytes:
        if isinstance(value, str):  # an array of 2-byte characters
            chars = [ord(c) for c in value]
            body = self.n(3, 20, USHORT, len(chars)) + struct.pack(f"<{len(chars)}H", *chars)
        elif isinstance(value, np.ndarray):  # float32 data
            flat = np.ascontiguousarray(value, "<f4").ravel()
            body = self.n(3, 20, FLOAT, flat.size) + flat.tobytes()
        elif isinstance(value, int):
            body = self.n(1, LONG) + struct.pack("<l", value)
        else:
            body = self.n(1, DOUBLE) + struct.pack("<d", float(value))
        body = b"%%%%" + body
        size = self.n(len(body)) if self.version == 4 else b""
        return struct.pack(">B", DATA) + self.name(name) + size + body

    def group(self, name: str, tags: list[bytes]) -> bytes:
        content = struct.pack(">BB", 0, 1) + self.n(len(tags)) + b"".join(tags)
        size = self.n(len(content)) if self.version == 4 else b""  # DM4: each tag's size after its name
        return struct.pack(">B", GROUP) + self.name(name) + size + content


def write_spectrum_image(path: Path, spectra: np.ndarray, *, step_nm: float, x0_nm: float,
                         energy_offset_eV: float, dispersion_eV: float, exposure_s: float = 1.0) -> Path:
    """``spectra`` ``(ny, nx, channels)``; x from ``x0_nm``, y from 0, both ``step_nm`` apart. ``.dm4`` paths get
    version 4, others version 3."""
    w = _Writer(4 if path.suffix.lower() == ".dm4" else 3)
    ny, nx, nc = spectra.shape
    dims = [(x0_nm, step_nm, "nm", nx), (0.0, step_nm, "nm", ny), (energy_offset_eV, dispersion_eV, "eV", nc)]
    calibrations = [w.group("", [w.data("Origin", -offset / scale), w.data("Scale", scale), w.data("Units", units)])
                    for offset, scale, units, _ in dims]
    image_data = w.group("ImageData", [
        w.group("Calibrations", [
            w.group("Brightness", [w.data("Origin", 0.0), w.data("Scale", 1.0), w.data("Units", "Counts")]),
            w.group("Dimension", calibrations),
        ]),
        w.data("Data", np.transpose(spectra, (2, 0, 1))),  # energy slowest, x fastest
        w.data("DataType", 2),
        w.group("Dimensions", [w.data("", size) for *_, size in dims]),
    ])
    image_tags = w.group("ImageTags", [
        w.group("Meta Data", [w.data("Format", "Spectrum image"), w.data("Signal", "EELS")]),
        w.group("EELS", [w.group("Acquisition", [w.data("Exposure (s)", exposure_s)])]),
    ])
    image = w.group("", [image_data, image_tags, w.data("Name", "EELS spectrum image")])
    root = struct.pack(">BB", 0, 1) + w.n(1) + w.group("ImageList", [image])
    header = struct.pack(">l", w.version) + w.n(len(root) + 8) + struct.pack(">l", 1)
    path.write_bytes(header + root + b"\0" * 8)
    return path
