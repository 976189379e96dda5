"""The demo report: figures and numbers from recorded sessions, compared with ground truth where it exists.

:func:`write_report` reads only session files (format v1) and, when present, the simulator's ground truth next to
each (``<session>.truth.json``), so it works on live, replayed and real sessions alike; comparisons with truth
appear only where truth exists. It writes ``report.html``, ``report.json`` (the numbers) and ``figures/*.png``.

Truth records used (see :mod:`stemlive.simulators.truth`): ``frame`` (per rendered HAADF frame: drift, field
shift, scan centre), ``session_frame`` (which rendered frame each streamed frame is, written by ``stemlive demo``),
``spectrum`` (per spectrum: probe position, temperature, region) and ``eels_model`` (true interface and peaks).
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REFERENCE_PEAKS_MEV", "adjusted_rand_index", "reference_centres_meV", "write_report"]

#: Peak table of the reference line scan across MoS2-WSe2 (Sci. Adv. 7, eabi6699 (2021), table S3), meV:
#: (peak, MoS2 EELS, MoS2 DFT, WSe2 EELS, WSe2 DFT, interface EELS); "x+-e" values as (x, e), None: not given.
REFERENCE_PEAKS_MEV: tuple[tuple[Any, ...], ...] = (
    (1, (49.4, 1.0), 47.16, (46.2, 0.5), None, (45.5, 1.4)),
    (2, (38.6, 0.7), 39.38, (38.8, 0.4), None, (41.1, 0.4)),
    (3, (31.2, 0.9), None, (30.6, 1.4), 31.17, (36.0, 2.7)),
    (4, (26.5, 0.6), 26.56, (24.8, 1.4), 25.21, (27.9, 1.1)),
    (5, (22.0, 0.2), 20.27, (22.0, 0.4), None, (22.9, 1.7)),
)


def reference_centres_meV() -> list[list[float]]:
    """Published EELS peak centres per region in spatial order along the line: MoS2, interface, WSe2."""
    return [[row[col][0] for row in REFERENCE_PEAKS_MEV] for col in (1, 5, 3)]


REGION_NAMES = ("left", "interface", "right")
MOS2_REGION_LABELS = {"left": "MoS2", "interface": "interface", "right": "WSe2"}


# ------------------------------------------------------------------------------------------------ helpers
def load_truth(session_path: str | Path) -> dict[str, Any] | None:
    """The ground truth next to a session (``<session>.truth.json``), or None."""
    p = Path(session_path)
    path = p.with_name(p.stem + ".truth.json")
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if data.get("format") == "stemlive-truth" else None


def adjusted_rand_index(a: Any, b: Any) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie), 1 for identical partitions."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    index = comb(table).sum()
    sa, sb, total = comb(table.sum(1)).sum(), comb(table.sum(0)).sum(), comb(float(len(a)))
    expected = sa * sb / total if total else 0.0
    maximum = 0.5 * (sa + sb)
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def _finite(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, Mapping):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=90)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


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
    fig = _figure(10, 3.6)
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
    return _save(fig, path).name


def _fig_sums(sums: np.ndarray, alpha: np.ndarray, beta: np.ndarray, path: Path) -> str:
    n = len(sums)
    cols = min(n, 6)
    rows = int(math.ceil(n / cols))
    fig = _figure(2.0 * cols, 2.1 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(sums[i], cmap="gray")
            a = alpha[i] if i < len(alpha) else float("nan")
            b = beta[i] if i < len(beta) else float("nan")
            ax.set_title(f"{i + 1}: ({a:.1f}, {b:.1f})", fontsize=8)
    fig.suptitle("Drift-corrected sum per tilt (alpha, beta deg)")
    return _save(fig, path).name


def _fig_plain_vs_corrected(plain: list[np.ndarray], sums: np.ndarray, path: Path) -> str:
    i = int(np.argmax([len(p) for p in plain]))  # any tilt; the first
    ny, nx = sums[i].shape
    crop = (slice(ny // 3, ny // 3 + ny // 3), slice(nx // 3, nx // 3 + nx // 3))
    fig = _figure(7, 3.6)
    for ax, img, title in zip(fig.subplots(1, 2), (plain[i], sums[i]), ("plain sum", "drift-corrected sum"),
                              strict=True):
        ax.imshow(img[crop], cmap="gray")
        ax.set_title(f"{title} (tilt 1, centre)", fontsize=9)
        ax.axis("off")
    return _save(fig, path).name


# ------------------------------------------------------------------------------------------------ EELS
def _point_truth(truth: Mapping[str, Any] | None, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True temperature and region per probe position (spectrum records at the same position), NaN/-1 if none."""
    temps = np.full(len(xy), np.nan)
    regions = np.full(len(xy), -1)
    spectra = (truth or {}).get("records", {}).get("spectrum", [])
    if not spectra:
        return temps, regions
    tx = np.array([s.get("x_nm", np.nan) for s in spectra], float)
    ty = np.array([s.get("y_nm", np.nan) for s in spectra], float)
    tt = np.array([s.get("temperature_K", np.nan) for s in spectra], float)
    tr = np.array([s.get("region", -1) for s in spectra], int)
    for i, (x, y) in enumerate(xy):
        m = np.hypot(tx - x, ty - y) < 1e-3
        if m.any():
            temps[i] = float(np.mean(tt[m]))
            regions[i] = int(np.bincount(tr[m] + 1).argmax() - 1)
    return temps, regions


def _eels_model(truth: Mapping[str, Any] | None) -> dict[str, Any] | None:
    records = (truth or {}).get("records", {}).get("eels_model", [])
    return dict(records[-1]) if records else None


def eels_section(key: str, path: Path, figures: Path) -> tuple[dict[str, Any], list[str]]:
    """Numbers and figures of an EELS line-scan session."""
    from stemlive.live.storage.session import SessionReader

    truth = load_truth(path)
    with SessionReader(path) as r:
        table = r.spectrum_table()
        res = r.results("eels")
        surveys = {w: r.survey(w) for w in ("before", "after")}
        settings = dict(r.settings or {})
    points = np.asarray(res.get("point_index", np.unique(table["point_index"])), int).ravel()
    first = {int(p): i for i, p in reversed(list(enumerate(table["point_index"])))}
    xy = np.array([(table["x_nm"][first[p]], table["y_nm"][first[p]]) for p in points], float).reshape(-1, 2)
    distance = np.hypot(*(xy - xy[0]).T) if len(xy) else np.zeros(0)
    t_meas = np.asarray(res.get("temperature_K", np.full(len(points), np.nan)), float).ravel()
    t_err = np.asarray(res.get("temperature_err_K", np.full(len(points), np.nan)), float).ravel()
    t_true, regions = _point_truth(truth, xy)
    model = _eels_model(truth)
    out: dict[str, Any] = {"session": str(path), "n_points": int(len(points)), "n_spectra": int(len(table["t"])),
                           "system": model.get("system") if model else None}
    out.update(_temperature_numbers(t_meas, t_err, t_true))
    out.update(_interface_numbers(res, model, xy, distance))
    if "interface_drop_K" not in out and np.isfinite(t_meas).sum() >= 8:
        out.update(_interface_refit(distance, t_meas, t_err, out))
    labels = np.asarray(res.get("labels", []), int).ravel()
    if len(labels) == len(points) and (regions >= 0).all() and len(labels):
        out["ari"] = adjusted_rand_index(labels, regions)
    peaks = res.get("peaks")
    cluster_region = _cluster_regions(labels, regions) if len(labels) == len(regions) else {}
    if peaks is not None and model is not None and model.get("system") == "mos2_wse2":
        # the stage's default peak model (5 Gaussians in 18-60 meV) is the MoS2-WSe2 reference procedure
        out["peaks"] = _peak_errors(peaks, cluster_region, model)
        errs = [abs(p["error_meV"]) for p in out["peaks"] if p.get("error_meV") is not None]
        out["peak_centre_mae_meV"] = float(np.mean(errs)) if errs else None
        out["peak_table"] = _reference_peak_table(peaks, cluster_region)
    energy = np.asarray(res.get("energy_meV", []), float)
    sums = np.asarray(res.get("sum", np.zeros((0, len(energy)))), float).reshape(len(points), -1) \
        if len(points) else np.zeros((0, 0))
    figs = []
    if len(energy) and len(sums):
        figs.append(_fig_waterfall(energy, sums, distance, figures / f"{key}_waterfall.png"))
    if np.isfinite(t_meas).any():
        figs.append(_fig_temperature(distance, t_meas, t_err, t_true, model, xy, out,
                                     figures / f"{key}_temperature.png"))
    if len(labels) == len(points) and len(labels):
        figs.append(_fig_labels(distance, labels, regions, out.get("ari"), figures / f"{key}_labels.png"))
    if peaks is not None and len(energy) and len(sums) and len(labels) == len(sums):
        fits = cluster_fits(energy, sums, labels, peaks, _stage_params(path))
        if fits:  # e.g. no peak in the window: no figure
            figs.append(_fig_clusters(fits, cluster_region, model, figures / f"{key}_clusters.png"))
    if any(s is not None for s in surveys.values()):
        figs.append(_fig_surveys(surveys, settings, figures / f"{key}_surveys.png"))
    return out, figs


def _temperature_numbers(t: np.ndarray, err: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    ok = np.isfinite(t) & np.isfinite(err) & (err > 0)
    out: dict[str, Any] = {"temperature_points": int(ok.sum())}
    if ok.any():
        out["temperature_mean_K"] = float(np.mean(t[ok]))
        out["temperature_err_median_K"] = float(np.median(err[ok]))
    both = ok & np.isfinite(true)
    if both.any():
        rel = (t[both] - true[both]) / true[both]
        pull = (t[both] - true[both]) / err[both]
        out["temperature_bias_percent"] = float(100 * np.mean(rel))
        out["temperature_bias_K"] = float(np.mean(t[both] - true[both]))
        out["temperature_scatter_K"] = float(np.std(t[both] - true[both]))
        out["temperature_pull_rms"] = float(np.sqrt(np.mean(pull**2)))
    return out


def _interface_numbers(res: Mapping[str, Any], model: Mapping[str, Any] | None, xy: np.ndarray,
                       distance: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    table = res.get("interface")
    if table is not None and len(np.atleast_1d(table)):
        row = np.atleast_1d(table)[0]
        for name in row.dtype.names:
            out[f"interface_{name}" if not name.startswith("interface") else name] = float(row[name])
    if model is not None and len(xy):
        out["interface_drop_true_K"] = float(model["drop_K"])
        out["interface_x_true_nm"] = float(model["interface_x_nm"] - xy[0, 0])  # along the line (+x) from point 0
        if "interface_drop_K" in out:
            out["interface_drop_error_K"] = out["interface_drop_K"] - out["interface_drop_true_K"]
    return out


def estimate_interface_nm(x: np.ndarray, t: np.ndarray) -> float:
    """Steepest descent of the profile smoothed over 5 points (edge-padded, so the ends carry no artefact)."""
    order = np.argsort(x)
    xs, ts = x[order], t[order]
    sm = np.convolve(np.pad(ts, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    return float(xs[int(np.argmax(np.abs(np.gradient(sm, xs))))])


def _interface_refit(distance: np.ndarray, t: np.ndarray, err: np.ndarray, numbers: Mapping[str, Any]) -> dict:
    """Interface fit in the report when the session has none (the stage's own fit failed or did not run)."""
    from stemlive.live.analysis import interface

    ok = np.isfinite(t) & np.isfinite(err) & (err > 0)
    try:
        fit = interface.fit_interface_profile(distance[ok], t[ok], err[ok],
                                              interface_x_nm=estimate_interface_nm(distance[ok], t[ok]))
    except (RuntimeError, ValueError, np.linalg.LinAlgError):
        return {}
    out = {"interface_source": "report refit (no /results/eels/interface in the session)",
           "interface_x_nm": fit.interface_x_nm, "interface_drop_K": fit.drop_K, "interface_drop_err_K": fit.drop_err_K,
           "interface_width_nm": fit.width_nm, "interface_width_err_nm": fit.width_err_nm,
           "interface_length_left_nm": fit.length_left_nm, "interface_length_right_nm": fit.length_right_nm}
    if "interface_drop_true_K" in numbers:
        out["interface_drop_error_K"] = fit.drop_K - float(numbers["interface_drop_true_K"])
    return out


def _cluster_regions(labels: np.ndarray, regions: np.ndarray) -> dict[int, int]:
    """Majority true region of each cluster (only where truth exists)."""
    out = {}
    for c in np.unique(labels):
        r = regions[(labels == c) & (regions >= 0)]
        if len(r):
            out[int(c)] = int(np.bincount(r).argmax())
    return out


def _peak_errors(peaks: np.ndarray, cluster_region: Mapping[int, int], model: Mapping[str, Any]) -> list[dict]:
    """Each fitted peak against the nearest simulated centre of its cluster's true region."""
    rows = []
    sim = model.get("peaks_meV", {})
    for p in np.atleast_1d(peaks):
        c = int(p["cluster"])
        region = cluster_region.get(c)
        centres = sim.get(REGION_NAMES[region], []) if region is not None else []
        centre = float(p["centre_meV"])
        row = {"cluster": c, "region": REGION_NAMES[region] if region is not None else None, "centre_meV": centre,
               "centre_err_meV": float(p["centre_err_meV"]), "fwhm_meV": float(p["fwhm_meV"])}
        if centres and 10.0 < centre < 150.0:
            nearest = float(min(centres, key=lambda s: abs(s - centre)))
            row.update(simulated_meV=nearest, error_meV=centre - nearest)
        rows.append(row)
    return rows


def _reference_peak_table(peaks: np.ndarray, cluster_region: Mapping[int, int]) -> list[dict[str, Any]]:
    """Rows of the reference table (peak 1 = highest energy) with this run's fitted centres per region."""
    fitted: dict[str, list[float]] = {}
    for c, region in cluster_region.items():
        centres = sorted((float(p["centre_meV"]) for p in np.atleast_1d(peaks)
                          if int(p["cluster"]) == c and 10.0 < float(p["centre_meV"]) < 150.0), reverse=True)
        fitted[REGION_NAMES[region]] = centres
    rows = []
    for i, (peak, mos2, mos2_dft, wse2, wse2_dft, inter) in enumerate(REFERENCE_PEAKS_MEV):
        row: dict[str, Any] = {"peak": peak, "MoS2_ref": mos2, "MoS2_dft": mos2_dft, "WSe2_ref": wse2,
                               "WSe2_dft": wse2_dft, "interface_ref": inter}
        for region_name, label in MOS2_REGION_LABELS.items():
            vals = fitted.get(region_name, [])
            row[f"{label}_fit"] = vals[i] if i < len(vals) else None
        rows.append(row)
    return rows


def _fig_waterfall(energy: np.ndarray, sums: np.ndarray, distance: np.ndarray, path: Path) -> str:
    m = (energy > -150) & (energy < 150)
    norm = sums[:, m] / np.maximum(sums[:, m].max(axis=1, keepdims=True), 1e-12)
    fig = _figure(8, 4)
    ax = fig.subplots()
    extent = (energy[m][0], energy[m][-1], distance[-1] if len(distance) else 1, 0)
    im = ax.imshow(np.log10(np.maximum(norm, 1e-7)), aspect="auto", extent=extent, cmap="magma")
    ax.set_xlabel("energy loss (meV)")
    ax.set_ylabel("distance along the line (nm)")
    fig.colorbar(im, ax=ax, label="log10 (counts / ZLP max)")
    ax.set_title("Aligned, summed spectra per probe position")
    return _save(fig, path).name


def _fig_temperature(distance: np.ndarray, t: np.ndarray, err: np.ndarray, true: np.ndarray,
                     model: Mapping[str, Any] | None, xy: np.ndarray, numbers: Mapping[str, Any], path: Path) -> str:
    from stemlive.live.analysis import interface

    fig = _figure(8, 4)
    ax = fig.subplots()
    ok = np.isfinite(t) & np.isfinite(err)
    ax.errorbar(distance[ok], t[ok], yerr=err[ok], fmt="o", ms=3, capsize=2, label="measured (pipeline)")
    if np.isfinite(true).any():
        ax.plot(distance, true, "k-", lw=1, label="true T(x)")
    try:
        fit = interface.fit_interface_profile(distance[ok], t[ok], err[ok], interface_x_nm=numbers.get(
            "interface_x_nm", estimate_interface_nm(distance[ok], t[ok])))
        x0 = fit.interface_x_nm
        for side, (t0, g), sel in (("left", fit.left, distance <= x0), ("right", fit.right, distance >= x0)):
            xs = np.array([distance[sel].min(), x0]) if side == "left" else np.array([x0, distance[sel].max()])
            ax.plot(xs, t0 + g * (xs - x0), "r--", lw=1.2)
        ax.axvline(x0, color="r", lw=0.8, ls=":")
        ax.set_title(f"Interface fit: drop {fit.drop_K:.1f} +- {fit.drop_err_K:.1f} K"
                     + (f" (true {numbers['interface_drop_true_K']:.1f} K)" if "interface_drop_true_K" in numbers
                        else "") + f", width {fit.width_nm:.1f} nm")
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as e:
        ax.set_title(f"temperature profile (interface fit failed: {e})")
    ax.set_xlabel("distance along the line (nm)")
    ax.set_ylabel("temperature (K)")
    ax.legend(fontsize=8)
    return _save(fig, path).name


def _fig_labels(distance: np.ndarray, labels: np.ndarray, regions: np.ndarray, ari: float | None, path: Path) -> str:
    fig = _figure(8, 2.6)
    ax = fig.subplots()
    ax.step(distance, labels, where="mid", label="k-means cluster")
    if (regions >= 0).any():
        ax.step(distance, regions + 0.08, where="mid", ls="--", label="true region (0 left, 1 interface, 2 right)")
    ax.set_yticks([0, 1, 2])
    ax.set_xlabel("distance along the line (nm)")
    ax.set_title("Segmentation" + (f": adjusted Rand index {ari:.2f}" if ari is not None else ""))
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path).name


def _stage_params(path: Path) -> dict[str, Any]:
    """The EELS stage's parameters as recorded with the session's results, with the peak window the fits used
    (``{}`` if absent)."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f.get("results/eels/parameters")
        text = ds.attrs.get("parameters") if ds is not None else None
        peaks = f.get("results/eels/peaks")
        used = peaks.attrs.get("peak_window_meV") if peaks is not None else None  # the window actually used
    try:
        out = dict(json.loads(text)) if text else {}
        if used is not None:
            out["peak_window_meV"] = json.loads(used) if isinstance(used, str | bytes) else list(np.ravel(used))
        return out
    except (TypeError, ValueError):
        return {}


def cluster_fits(energy: np.ndarray, sums: np.ndarray, labels: np.ndarray, peaks: np.ndarray,
                 params: Mapping[str, Any]) -> dict[int, Any]:
    """The stage's peak fit of each cluster mean, re-evaluated from its table: ``{cluster: PeakFit}``.

    The fit starts from the stored peaks (height, centre, FWHM) on the same data (cluster mean of the sums,
    neighbouring cluster means as components for an interior cluster of a line) with the stage's window, so it
    returns the model as fitted (convolved with the resolution, zero-loss peak included) and the data it was
    fitted to.
    """
    from stemlive.live.analysis import segment

    k = int(labels.max()) + 1 if labels.size else 0
    means = segment.cluster_means(sums, labels, k)
    window = tuple(params.get("peak_window_meV", (18.0, 60.0)))
    out: dict[int, Any] = {}
    for c in range(k):
        rows = np.atleast_1d(peaks)[np.atleast_1d(peaks)["cluster"] == c]
        if not len(rows) or not np.all(np.isfinite(means[c])):
            continue
        sigma = rows["fwhm_meV"] / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        initial = np.column_stack([rows["area"] / (sigma * math.sqrt(2 * math.pi)), rows["centre_meV"],
                                   rows["fwhm_meV"]])
        comps = means[[c - 1, c + 1]] if 0 < c < k - 1 else None
        try:
            out[c] = segment.fit_peaks(energy, means[c], len(rows), initial=initial, cluster=c,
                                       window_meV=(float(window[0]), float(window[1])), components=comps)
        except (ValueError, RuntimeError, np.linalg.LinAlgError):
            continue
    return out


def _fig_clusters(fits: Mapping[int, Any], cluster_region: Mapping[int, int], model: Mapping[str, Any] | None,
                  path: Path) -> str:
    """Per cluster: the data the peaks were fitted to, the model as fitted (resolution-convolved, ZLP tail
    included) and the normalised residuals below."""
    fig = _figure(8, 6)
    ax, axr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    sim = (model or {}).get("peaks_meV", {})
    offset = 0.0
    for c, fit in sorted(fits.items()):
        region = cluster_region.get(c)
        name = REGION_NAMES[region] if region is not None else "?"
        m = fit.energy_meV >= 12.0  # the loss side of the fitted range
        e, y, mod = fit.energy_meV[m], (fit.data - fit.baseline)[m], (fit.model - fit.baseline)[m]
        scale = float(np.nanmax(np.abs(y))) or 1.0
        line = ax.plot(e, y / scale + offset, ".", ms=2, label=f"cluster {c} ({name}): data")[0]
        ax.plot(e, mod / scale + offset, "-", color=line.get_color(), lw=1,
                label=f"model as fitted ({fit.n_peaks} peaks{'' if fit.converged else ', NOT converged'})")
        for p in fit.table:
            ax.plot([p["centre_meV"]] * 2, [offset, offset + 0.1], color=line.get_color(), lw=1)
        for s in sim.get(name, []):
            ax.plot([s, s], [offset - 0.08, offset], color="k", lw=1.5)
        axr.plot(e, (fit.data - fit.model)[m] / fit.sigma[m], ".", ms=2, color=line.get_color())
        offset += 1.1
    ax.set_ylabel("counts - ZLP and components (/ max, offset)")
    ax.set_title("Cluster means minus the fitted ZLP: data (dots), model as fitted (line)")
    ax.legend(fontsize=7)
    axr.axhline(0.0, color="k", lw=0.5)
    axr.set_xlabel("energy loss (meV)")
    axr.set_ylabel("(data - model) / sigma")
    return _save(fig, path).name


def _fig_surveys(surveys: Mapping[str, np.ndarray | None], settings: Mapping[str, Any], path: Path) -> str:
    fig = _figure(7, 3.6)
    axes = fig.subplots(1, 2)
    for ax, (which, img) in zip(axes, surveys.items(), strict=True):
        ax.axis("off")
        if img is None:
            continue
        ax.imshow(img, cmap="gray")
        if "start" in settings and "end" in settings:
            (y0, x0), (y1, x1) = settings["start"], settings["end"]
            ny, nx = img.shape
            ax.plot([x0 * nx, x1 * nx], [y0 * ny, y1 * ny], "c-", lw=1)
        ax.set_title(f"survey {which}", fontsize=9)
    return _save(fig, path).name


# ------------------------------------------------------------------------------------------------ the report
HEADLINE_SOURCES = {
    "drift_rms_error_px": ("tilt_series",), "sharpness_gain": ("tilt_series",),
    "ari": ("eels_line_scan", "eels_thermometry"),
    "peak_centre_mae_meV": ("eels_line_scan", "eels_thermometry"),
    "temperature_bias_percent": ("eels_thermometry", "eels_line_scan"),
    "temperature_pull_rms": ("eels_thermometry", "eels_line_scan"),
    "interface_drop_K": ("eels_thermometry",), "interface_drop_err_K": ("eels_thermometry",),
    "interface_drop_true_K": ("eels_thermometry",), "interface_drop_error_K": ("eels_thermometry",),
    "interface_width_nm": ("eels_thermometry",),
}


def _headline(sections: Mapping[str, Mapping[str, Any]], tomo: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sources in HEADLINE_SOURCES.items():
        for src in sources:
            value = sections.get(src, {}).get(key)
            if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
                out[key] = value
                break
    if tomo and tomo.get("correlation") is not None:
        out["tomo_correlation"] = float(tomo["correlation"])
    return out


def write_report(out_dir: str | Path, sessions: Mapping[str, str | Path], tomo: Mapping[str, Any] | None = None, *,
                 timings: Mapping[str, float] | None = None, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.html``, ``report.json`` and ``figures/*.png`` for recorded sessions.

    Parameters
    ----------
    out_dir
        Output folder (created).
    sessions
        ``{key: session path}``; the kind is read from each file (``tilt_series`` or an EELS line scan). Keys
        name the sections (``stemlive demo`` uses ``tilt_series``, ``eels_line_scan``, ``eels_thermometry``).
    tomo
        ``stemlive demo``'s tomography result (paths ``png``, ``volume``, ``emd``, and ``correlation`` with the
        true atoms), or None.
    timings, config
        Extra numbers copied into ``report.json`` and the page.

    Returns
    -------
    Path
        ``report.html``.
    """
    from stemlive.live.storage.session import SessionReader

    out = Path(out_dir)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {}
    figs: dict[str, list[str]] = {}
    for key, path in sessions.items():
        with SessionReader(path) as r:
            kind = r.kind
        if kind == "tilt_series":
            sections[key], figs[key] = tilt_series_section(Path(path), figures)
        else:
            sections[key], figs[key] = eels_section(key, Path(path), figures)
        sections[key]["kind"] = kind
    if tomo and tomo.get("png") and Path(tomo["png"]).exists():
        shutil.copy(tomo["png"], figures / "reconstruction_slices.png")
        figs["tomography"] = ["reconstruction_slices.png"]
    for key in ("atoms_structure_png", "atoms_strain_png"):  # `stemlive tomo atoms` figures (issue 14)
        if tomo and tomo.get(key) and Path(tomo[key]).exists():
            name = f"atomic_model_{key.split('_')[1]}.png"
            shutil.copy(tomo[key], figures / name)
            figs.setdefault("tomography", []).append(name)
    report = {"headline": _headline(sections, tomo), "sections": sections, "tomography": dict(tomo or {}),
              "timings": dict(timings or {}), "config": dict(config or {}),
              "sessions": {k: str(v) for k, v in sessions.items()}}
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(report, figs), encoding="utf-8")
    return page


# ------------------------------------------------------------------------------------------------ HTML
def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return f"{v[0]:.1f} &plusmn; {v[1]:.1f}"
    if isinstance(v, float):
        return "&ndash;" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(d: Mapping[str, Any]) -> str:
    rows = [{"quantity": k, "value": v} for k, v in d.items() if not isinstance(v, list | dict)]
    return _table(rows)


def _html(report: Mapping[str, Any], figs: Mapping[str, list[str]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>stemlive demo report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse;margin:8px 0}",
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px} img{max-width:100%}</style></head><body>",
             "<h1>stemlive demo report</h1>",
             "<p>Simulated instrument, fast mode. Numbers compare the live pipeline's results with the simulator's "
             "ground truth where it exists.</p><h2>Headline</h2>", _kv(report["headline"])]
    titles = {"tilt_series": "Tilt series", "eels_line_scan": "EELS line scan (MoS2-WSe2)",
              "eels_thermometry": "EELS thermometry (AlN-SiC)", "tomography": "Tomography"}
    for key, section in report["sections"].items():
        parts.append(f"<h2>{html.escape(titles.get(key, key))}</h2>")
        parts.append(_kv(section))
        if section.get("peak_table"):
            parts.append("<h3>Peaks (meV) next to the reference table (Sci. Adv. 7, eabi6699, table S3)</h3>")
            parts.append(_table(section["peak_table"]))
        if section.get("peaks"):
            parts.append("<h3>Fitted peaks vs simulated centres</h3>" + _table(section["peaks"]))
        parts.extend(f"<p><img src='figures/{html.escape(f)}'></p>" for f in figs.get(key, []))
    if report.get("tomography"):
        parts.append("<h2>Tomography</h2>" + _kv(report["tomography"]))
        parts.extend(f"<p><img src='figures/{html.escape(f)}'></p>" for f in figs.get("tomography", []))
    if report.get("timings"):
        parts.append("<h2>Timings (s)</h2>" + _kv(report["timings"]))
    parts.append("</body></html>")
    return "\n".join(parts)
