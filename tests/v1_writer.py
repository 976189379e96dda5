"""An independent minimal writer of v1 session files: plain h5py, only the fields of DESIGN.md's contract.

No stemlive code on purpose (this stands in for another acquisition program or a user's script): no stored
``session_start``, no ``seq``, no ``committed_rows``, no results. The spectra come from a small model of its own
with a known temperature: a Pearson VII zero-loss peak R, and one Gaussian phonon band P on both sides,

    I(E) = N [R(e) + f (P(e) (n(e, T) + 1) [e > 0] + P(-e) n(-e, T) [e < 0]) * R](e),   e = E - s,

n the Bose occupation, s a per-frame drift of the zero-loss peak that is not recorded, Poisson counts.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

KB_MEV_PER_K = 8.617333262e-2
CREATED = "2026-05-01T12:00:00+00:00"
T0 = 1777636800.0  # CREATED as Unix time


def _pearson7(e: np.ndarray, fwhm: float, m: float = 2.5) -> np.ndarray:
    r = (1.0 + (2.0 ** (1.0 / m) - 1.0) * (2.0 * e / fwhm) ** 2) ** (-m)
    return r / r.sum()


def model_spectrum(energy: np.ndarray, temperature_K: float, shift_meV: float, *, electrons: float = 2e7,
                   phonon_fraction: float = 5e-3, band_meV: tuple[float, float] = (85.0, 8.0),
                   fwhm_meV: float = 9.0) -> np.ndarray:
    """Expected counts on the channel centres ``energy`` (meV, uniform)."""
    step = float(energy[1] - energy[0])
    fine, signal = _fine_signal(step, float(temperature_K), phonon_fraction, band_meV, fwhm_meV)
    return electrons * 4.0 * np.interp(energy - shift_meV, fine, signal, left=0.0, right=0.0)


@functools.lru_cache(maxsize=16)
def _fine_signal(step: float, temperature_K: float, phonon_fraction: float, band_meV: tuple[float, float],
                 fwhm_meV: float) -> tuple[np.ndarray, np.ndarray]:
    """The unit-area model on a grid 4x finer than the channels (to be shifted by interpolation)."""
    fine = np.arange(-400.0, 400.0 + step / 8, step / 4)
    resolution = _pearson7(fine, fwhm_meV)
    band = np.exp(-0.5 * ((np.abs(fine) - band_meV[0]) / band_meV[1]) ** 2)
    with np.errstate(over="ignore", divide="ignore"):
        occupation = 1.0 / np.expm1(np.abs(fine) / (KB_MEV_PER_K * temperature_K))
    occupation[~np.isfinite(occupation)] = 0.0  # e = 0, where the band is zero anyway
    phonons = np.where(fine > 0, band * (occupation + 1.0), band * occupation)
    phonons = phonon_fraction * phonons / (2 * band.sum())
    return fine, resolution + np.convolve(phonons, resolution, mode="same")


def _root(f: h5py.File, kind: str, settings: dict[str, Any], status: str) -> None:
    f.attrs["format"] = "stemlive-session"
    f.attrs["format_version"] = 1
    f.attrs["session_id"] = f"independent-{kind}"
    f.attrs["kind"] = kind
    f.attrs["created"] = CREATED
    f.attrs["status"] = status
    f.attrs["settings"] = json.dumps(settings)


def write_eels(path: Path, *, kind: str = "eels_line_scan", n_points: int = 12, n_frames: int = 6,
               temperature_K: float | np.ndarray = 600.0, scan_shape: tuple[int, int] | None = None,
               n_channels: int = 1024, dispersion_meV: float = 0.5, offset_meV: float = -200.0,
               step_nm: float = 1.0, status: str = "complete", seed: int = 1) -> dict[str, Any]:
    """An EELS session (points one after another, ``n_frames`` spectra each); returns the truth."""
    rng = np.random.default_rng(seed)
    if scan_shape is not None:
        n_points = scan_shape[0] * scan_shape[1]
    temps = np.broadcast_to(np.asarray(temperature_K, float), (n_points,))
    energy = offset_meV + dispersion_meV * np.arange(n_channels)
    n = n_points * n_frames
    spectra = np.empty((n, n_channels), np.float32)
    point = np.repeat(np.arange(n_points), n_frames).astype(np.int32)
    frame = np.tile(np.arange(n_frames), n_points).astype(np.int32)
    if scan_shape is None:
        x, y = point * step_nm, np.zeros(n)
    else:
        x, y = (point % scan_shape[1]) * step_nm, (point // scan_shape[1]) * step_nm
    shifts = rng.normal(0.0, 1.0, n)
    for i in range(n):
        spectra[i] = rng.poisson(model_spectrum(energy, temps[point[i]], shifts[i]))
    settings: dict[str, Any] = {"instrument": "independent writer", "n_points": n_points}
    with h5py.File(path, "w") as f:
        _root(f, kind, settings, status)
        g = f.create_group("eels")
        g.create_dataset("spectra", data=spectra)
        g["point_index"] = point
        g["frame_index"] = frame
        g["x_nm"] = x.astype("f8")
        g["y_nm"] = y.astype("f8")
        g["energy_offset_meV"] = np.full(n, offset_meV)
        g["t"] = T0 + 0.3 * np.arange(n)
        g.attrs["dispersion_meV"] = dispersion_meV
        g.attrs["exposure_ms"] = 300.0
        if scan_shape is not None:
            g.attrs["scan_shape"] = np.asarray(scan_shape, np.int64)
    return {"temperature_K": temps, "energy": energy, "spectra": spectra}


def write_tilt_series(path: Path, *, n_tilts: int = 3, n_frames: int = 2, size: int = 32,
                      status: str = "complete", seed: int = 2) -> dict[str, Any]:
    """A tilt series of a Gaussian blob drifting by whole pixels; returns the truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    alpha = np.linspace(-20.0, 20.0, n_tilts)
    frames, tilt, index, a, b = [], [], [], [], []
    for k in range(n_tilts):
        for j in range(n_frames):
            cy, cx = size / 2 + j, size / 2 - j
            image = 100 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2)) + rng.normal(0, 1, (size, size))
            frames.append(image.astype(np.float32))
            tilt.append(k)
            index.append(j)
            a.append(alpha[k])
            b.append(0.0)
    n = len(frames)
    with h5py.File(path, "w") as f:
        _root(f, "tilt_series", {"instrument": "independent writer"}, status)
        g = f.create_group("tilt_series")
        g.create_dataset("frames", data=np.stack(frames), chunks=(1, size, size))
        g["tilt_index"] = np.asarray(tilt, np.int32)
        g["frame_index"] = np.asarray(index, np.int32)
        g["alpha_deg"] = np.asarray(a, "f8")
        g["beta_deg"] = np.asarray(b, "f8")
        g["t"] = T0 + np.arange(n, dtype="f8")
        g.attrs["pixel_size_nm"] = 0.05
        g.attrs["dwell_us"] = 4.0
    return {"alpha_deg": alpha, "frames": np.stack(frames)}
