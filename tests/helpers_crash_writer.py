"""Subprocess for the crash-safety tests: writes a session until it is killed.

Usage: ``python helpers_crash_writer.py PATH frames|spectra``

Prints ``ready`` once the file exists, then after every completed :meth:`SessionWriter.commit` the number of
rows known to be durable (``frames N`` or ``spectra N``), flushing stdout each time. The data are
deterministic (:func:`frame_image`, :func:`spectrum_block`), so the test can check what survived bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from stemlive.live.storage.session import SessionWriter
from stemlive.live.wire.protocol import Message, decode, encode

T0 = 1.7e9
SESSION = "crash-test"
FRAME_SHAPE = (512, 512)
N_CHANNELS = 2048
BATCH = 100


def frame_image(i: int) -> np.ndarray:
    """The deterministic frame number ``i``."""
    return np.random.default_rng(i).random(FRAME_SHAPE, dtype=np.float32)


def spectrum_block(first: int, k: int) -> np.ndarray:
    """Spectra ``first .. first + k - 1`` (row i holds ``i + channel / N_CHANNELS``)."""
    rows = np.arange(first, first + k, dtype=np.float64)[:, None]
    return (rows + np.arange(N_CHANNELS) / N_CHANNELS).astype(np.float32)


def start_message(kind: str) -> Message:
    header = {"type": "session_start", "session": SESSION, "seq": 0, "t": T0, "kind": kind, "settings": {"n": 1}}
    return decode(encode(header))


def frame_message(i: int) -> Message:
    header = {
        "type": "frame",
        "session": SESSION,
        "seq": i + 1,
        "t": T0 + i,
        "tilt_index": i // 10,
        "frame_index": i % 10,
        "alpha_deg": -60.0 + i,
        "beta_deg": 0.0,
        "pixel_size_nm": 0.02,
        "dwell_us": 4.0,
    }
    return decode(encode(header, frame_image(i)))


def spectrum_batch(b: int) -> Message:
    first = b * BATCH
    rows = list(range(first, first + BATCH))
    header = {
        "type": "spectrum",
        "session": SESSION,
        "seq": b + 1,
        "t": [T0 + r * 1e-3 for r in rows],
        "point_index": [r // 200 for r in rows],
        "frame_index": [r % 200 for r in rows],
        "x_nm": [1.6 * (r // 200) for r in rows],
        "y_nm": [0.0] * BATCH,
        "energy_offset_meV": [-0.5 * (r % 3) for r in rows],
        "dispersion_meV": 0.5,
        "exposure_ms": 300.0,
    }
    return decode(encode(header, spectrum_block(first, BATCH)))


def write_frames(path: Path) -> None:
    with SessionWriter(path, start_message("tilt_series"), commit_interval_s=3600) as writer:
        print("ready", flush=True)
        for i in range(100_000):
            writer.append(frame_message(i))
            writer.commit()
            print(f"frames {i + 1}", flush=True)


def write_spectra(path: Path) -> None:
    # Commits on its own every 20 ms in append (the automatic path), and explicitly every 5 batches.
    with SessionWriter(path, start_message("eels_line_scan"), commit_interval_s=0.02) as writer:
        print("ready", flush=True)
        for b in range(100_000):
            writer.append(spectrum_batch(b))
            if b % 5 == 4:
                writer.commit()
                print(f"spectra {(b + 1) * BATCH}", flush=True)


if __name__ == "__main__":
    target, mode = Path(sys.argv[1]), sys.argv[2]
    {"frames": write_frames, "spectra": write_spectra}[mode](target)
