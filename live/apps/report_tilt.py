"""The demo report's tilt-series section: measured drift vs the true image displacement, drift-corrected vs
plain sums (:func:`sharpness`), and their figures."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.apps.report_common import load_truth, new_figure, save_figure


# ------------------------------------------------------------------------------------------------ tilt series
def _true_frame_offsets(truth: Mapping[str, Any], n_rows: int) -> np.ndarray | None:
    """True image displacement ``(n_rows, 2)`` px of each streamed frame (drift + field shift - scan centre)."""
    records = truth.get("records", {})
    frames = records.get("frame", [])
    links = records.get("session_frame", [])
    if links and len(links) >= n_rows:
        index = [int(r["frame_record"]) for r in sorted(links, key=lambda r: r["row"])][:n_rows]
    elif len(frames) == n_rows:
        index = list(range(n_rows))
    else:
        return None
    out = np.zeros((n_rows, 2))
    for row, i in enumerate(index):
        f = frames[i]
        rot = float(f.get("rotation_rad", 0.0))
        c, s = math.cos(rot), math.sin(rot)
        to_img = np.array([[c, -s], [s, c]]) / float(f["pixel_size_nm"])
        lab = np.asarray(f.get("fov_shift_nm", (0, 0)), float) - np.asarray(f.get("center_nm", (0, 0)), float)
        out[row] = np.asarray(f["mean_drift_px"], float) + to_img @ lab
    return out


def _relative_to_tilt_start(offsets: np.ndarray, tilt_index: np.ndarray) -> np.ndarray:
    """Offsets relative to the first frame of each tilt (the drift convention of the results)."""
    rel = np.empty_like(offsets)
    for t in np.unique(tilt_index):
        rows = np.nonzero(tilt_index == t)[0]
        rel[rows] = offsets[rows] - offsets[rows[0]]
    return rel


def sharpness(image: np.ndarray, margin: float = 0.1) -> float:
    """Atomic contrast of a sum: std / mean after a 1-px Gaussian (suppresses shot noise), borders cropped."""
    from scipy import ndimage

    ny, nx = image.shape
    my, mx = int(ny * margin), int(nx * margin)
    sm = ndimage.gaussian_filter(np.asarray(image, float), 1.0)[my:ny - my, mx:nx - mx]
    return float(sm.std() / max(abs(sm.mean()), 1e-12))


def tilt_series_section(path: Path, figures: Path) -> tuple[dict[str, Any], list[str]]:
    """Numbers and figures of a tilt-series session."""
    from stemlive.live.storage.session import SessionReader

    truth = load_truth(path)
    with SessionReader(path) as r:
        table = r.frame_table()
        res = r.results("tilt_series")
        frames = r.frames()
        tilt_index = np.asarray(table["tilt_index"])
        plain = [np.asarray(frames[np.nonzero(tilt_index == t)[0]], np.float64).sum(axis=0)
                 for t in _ordered_unique(tilt_index)]
        pixel = float(r.attrs("tilt_series").get("pixel_size_nm", float("nan")))
    drift = np.asarray(res.get("drift_px", np.zeros((0, 2))), float).reshape(-1, 2)
    sums = np.asarray(res.get("sums", np.zeros((0, 1, 1))), float)
    alpha, beta = np.atleast_1d(res.get("tilt_alpha_deg", [])), np.atleast_1d(res.get("tilt_beta_deg", []))
    out: dict[str, Any] = {"session": str(path), "n_frames": int(len(tilt_index)), "n_tilts": int(len(sums)),
                           "pixel_size_nm": pixel}
    true_rel = None
    if truth is not None and len(drift) == len(tilt_index):
        offsets = _true_frame_offsets(truth, len(tilt_index))
        if offsets is not None:
            true_rel = _relative_to_tilt_start(offsets, tilt_index)
            err = drift - true_rel
            out["drift_rms_error_px"] = float(np.sqrt(np.mean(np.sum(err**2, axis=1))))
            out["drift_max_error_px"] = float(np.max(np.hypot(*err.T)))
            out["true_drift_max_px"] = float(np.max(np.hypot(*true_rel.T)))
    if len(sums) == len(plain):
        gains = [sharpness(c) / sharpness(p) for c, p in zip(sums, plain, strict=True)]
        out["sharpness_corrected"] = [sharpness(c) for c in sums]
        out["sharpness_plain"] = [sharpness(p) for p in plain]
        out["sharpness_gain"] = float(np.mean(gains))
    figs = [_fig_drift(drift, true_rel, tilt_index, figures / "drift.png")]
    if len(sums):
        figs.append(_fig_sums(sums, alpha, beta, figures / "tilt_sums.png"))
    if len(sums) == len(plain) and len(sums):
        figs.append(_fig_plain_vs_corrected(plain, sums, figures / "sum_plain_vs_corrected.png"))
    return out, figs


def _ordered_unique(values: np.ndarray) -> list[int]:
    seen: list[int] = []
    for v in values:
        if int(v) not in seen:
            seen.append(int(v))
    return seen


def _fig_drift(drift: np.ndarray, true_rel: np.ndarray | None, tilt_index: np.ndarray, path: Path) -> str:
    fig = new_figure(10, 3.6)
    axes = fig.subplots(1, 2, sharex=True)
    rows = np.arange(len(drift))
    for k, (ax, name) in enumerate(zip(axes, ("dy", "dx"), strict=True)):
        ax.plot(rows, drift[:, k], "o", ms=3, label="measured")
        if true_rel is not None:
            ax.plot(rows, true_rel[:, k], "-", lw=1, label="true")
        for b in np.nonzero(np.diff(tilt_index) != 0)[0]:
            ax.axvline(b + 0.5, color="0.85", lw=0.8)
        ax.set_xlabel("frame (acquisition order)")
        ax.set_ylabel(f"{name} (px) vs first frame of the tilt")
        ax.legend(fontsize=8)
    fig.suptitle("Drift within each tilt")
    return save_figure(fig, path).name


def _fig_sums(sums: np.ndarray, alpha: np.ndarray, beta: np.ndarray, path: Path) -> str:
    n = len(sums)
    cols = min(n, 6)
    rows = int(math.ceil(n / cols))
    fig = new_figure(2.0 * cols, 2.1 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(sums[i], cmap="gray")
            a = alpha[i] if i < len(alpha) else float("nan")
            b = beta[i] if i < len(beta) else float("nan")
            ax.set_title(f"{i + 1}: ({a:.1f}, {b:.1f})", fontsize=8)
    fig.suptitle("Drift-corrected sum per tilt (alpha, beta deg)")
    return save_figure(fig, path).name


def _fig_plain_vs_corrected(plain: list[np.ndarray], sums: np.ndarray, path: Path) -> str:
    i = int(np.argmax([len(p) for p in plain]))  # any tilt; the first
    ny, nx = sums[i].shape
    crop = (slice(ny // 3, ny // 3 + ny // 3), slice(nx // 3, nx // 3 + nx // 3))
    fig = new_figure(7, 3.6)
    for ax, img, title in zip(fig.subplots(1, 2), (plain[i], sums[i]), ("plain sum", "drift-corrected sum"),
                              strict=True):
        ax.imshow(img[crop], cmap="gray")
        ax.set_title(f"{title} (tilt 1, centre)", fontsize=9)
        ax.axis("off")
    return save_figure(fig, path).name


