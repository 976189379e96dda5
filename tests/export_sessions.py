"""Small analysed sessions for the export and notebook-API tests: simulated spectra/frames as wire messages,
recorded and analysed in-process by the pipeline (the same code path as ``stemlive replay --analyze``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.run import analyze_messages
from stemlive.live.wire import protocol
from stemlive.simulators.eels_model import VibrationalEELSSimulator

T0 = 1_790_000_000.0
LINE_STEP_NM = 1.6
MAP_STEP_NM = (2.0, 1.5)  # (y, x)


def _msg(header: dict[str, Any], payload: np.ndarray | None = None) -> protocol.Message:
    return protocol.decode(protocol.encode(header, payload))


def eels_messages(kind: str, points_xy: np.ndarray, *, n_frames: int, settings: dict[str, Any],
                  seed: int) -> Iterator[protocol.Message]:
    """A full EELS session: ``session_start``, one batch of ``n_frames`` spectra per point, ``session_end``."""
    sim = VibrationalEELSSimulator("aln_sic", seed=seed)
    sid = f"export-{kind}-{seed}"
    seq = 0
    yield _msg({"type": "session_start", "session": sid, "seq": seq, "t": T0, "kind": kind, "settings": settings})
    t = T0
    for p, (x, y) in enumerate(points_xy):
        seq += 1
        times = t + 1.2 * np.arange(n_frames)
        spectra, _ = sim.spectra(x_nm=np.full(n_frames, x), y_nm=y, t_s=times - T0, energy_offset_meV=-300.0)
        t = float(times[-1]) + 1.2
        yield _msg({"type": "spectrum", "session": sid, "seq": seq,
                    "point_index": [p] * n_frames, "frame_index": list(range(n_frames)),
                    "x_nm": [float(x)] * n_frames, "y_nm": [float(y)] * n_frames,
                    "energy_offset_meV": [-300.0] * n_frames, "t": [float(v) for v in times],
                    "dispersion_meV": 0.44, "exposure_ms": 1200.0}, np.ascontiguousarray(spectra, np.float32))
    seq += 1
    yield _msg({"type": "session_end", "session": sid, "seq": seq, "t": t, "status": "complete", "messages": seq + 1})


def eels_line_session(path: Path, *, n_points: int = 6, n_frames: int = 4, seed: int = 3) -> Path:
    """An analysed line scan across the AlN/SiC interface: points ``LINE_STEP_NM`` apart from x = -4 nm."""
    xy = np.column_stack([-4.0 + LINE_STEP_NM * np.arange(n_points), np.zeros(n_points)])
    params = make_params(overrides=["eels.k=2", "eels.n_peaks=2"])  # 5 peaks on so few frames: a minute of fitting
    return analyze_messages(eels_messages("eels_line_scan", xy, n_frames=n_frames, settings={}, seed=seed),
                            path, params)


def eels_map_session(path: Path, *, shape: tuple[int, int] = (2, 3), n_frames: int = 3, seed: int = 5) -> Path:
    """An analysed map, points row-major, ``MAP_STEP_NM`` apart, origin (x, y) = (-2, 1) nm."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    xy = np.column_stack([-2.0 + MAP_STEP_NM[1] * xx.ravel(), 1.0 + MAP_STEP_NM[0] * yy.ravel()])
    params = make_params(overrides=["eels.k=2", "eels.n_peaks=2"])  # 5 peaks on so few frames: a minute of fitting
    return analyze_messages(eels_messages("eels_map", xy, n_frames=n_frames, settings={"scan_shape": [ny, nx]},
                                          seed=seed), path, params)


def tilt_session(path: Path, sums: np.ndarray, alpha: np.ndarray, beta: np.ndarray, *, pixel_nm: float = 0.05,
                 frames_per_tilt: int = 2, seed: int = 0) -> Path:
    """A v1 tilt-series session written with plain h5py: raw frames (per-tilt sum / frames + noise) and the
    analysis results ``/results/tilt_series/sums`` and angles, as the pipeline would store them."""
    rng = np.random.default_rng(seed)
    n, ny, nx = sums.shape
    frames = np.repeat(sums / frames_per_tilt, frames_per_tilt, axis=0)
    frames = (frames + rng.normal(0, 1e-3, frames.shape)).astype(np.float32)
    m = len(frames)
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "stemlive-session", "format_version": 1, "session_id": path.stem,
                        "kind": "tilt_series", "created": "2026-12-04T12:00:00+00:00", "status": "complete",
                        "settings": "{}"})
        g = f.create_group("tilt_series")
        ds = g.create_dataset("frames", data=frames, chunks=(1, ny, nx))
        for target in (g, ds):
            target.attrs["pixel_size_nm"] = pixel_nm
            target.attrs["dwell_us"] = 4.0
        g["tilt_index"] = np.repeat(np.arange(n), frames_per_tilt).astype(np.int32)
        g["frame_index"] = np.tile(np.arange(frames_per_tilt), n).astype(np.int32)
        g["alpha_deg"] = np.repeat(alpha, frames_per_tilt).astype(np.float64)
        g["beta_deg"] = np.repeat(beta, frames_per_tilt).astype(np.float64)
        g["t"] = T0 + np.arange(m, dtype=np.float64)
        f["results/tilt_series/sums"] = sums.astype(np.float32)
        f["results/tilt_series/tilt_alpha_deg"] = np.asarray(alpha, float)
        f["results/tilt_series/tilt_beta_deg"] = np.asarray(beta, float)
    return path


def blob_projection(pos_vox: np.ndarray, amp: np.ndarray, rot: np.ndarray, shape_yx: tuple[int, int],
                    sigma: float) -> np.ndarray:
    """Analytic projection of 3-D Gaussians at ``pos_vox`` ``(m, 3)`` (x, y, z voxels from the centre ``n // 2``):
    centres at ``(R p)_xy`` (the model of ``docs/tomography.md``)."""
    ny, nx = shape_yx
    lab = pos_vox @ rot.T
    yy, xx = np.arange(ny) - ny // 2, np.arange(nx) - nx // 2
    gy = np.exp(-((yy[None, :] - lab[:, 1:2]) ** 2) / (2 * sigma**2))
    gx = np.exp(-((xx[None, :] - lab[:, 0:1]) ** 2) / (2 * sigma**2))
    return np.einsum("m,my,mx->yx", amp * np.sqrt(2 * np.pi) * sigma, gy, gx).astype(np.float32)


def render_volume(pos_vox: np.ndarray, amp: np.ndarray, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """The same Gaussians sampled at voxel centres, ``(z, y, x)``, origin at ``n // 2``."""
    axes = [np.arange(n) - n // 2 for n in shape]
    g = [np.exp(-((ax[None, :] - pos_vox[:, k : k + 1]) ** 2) / (2 * sigma**2))
         for ax, k in zip(axes, (2, 1, 0), strict=True)]
    return np.einsum("m,mz,my,mx->zyx", amp, *g).astype(np.float32)
