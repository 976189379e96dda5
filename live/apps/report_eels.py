"""The demo report's EELS section: temperatures, the interface, segmentation and phonon peaks of a line scan,
compared with the simulator's truth and the reference table (Sci. Adv. 7, eabi6699, table S3), and their figures."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.apps.report_common import load_truth, new_figure, save_figure

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
    fig = new_figure(8, 4)
    ax = fig.subplots()
    extent = (energy[m][0], energy[m][-1], distance[-1] if len(distance) else 1, 0)
    im = ax.imshow(np.log10(np.maximum(norm, 1e-7)), aspect="auto", extent=extent, cmap="magma")
    ax.set_xlabel("energy loss (meV)")
    ax.set_ylabel("distance along the line (nm)")
    fig.colorbar(im, ax=ax, label="log10 (counts / ZLP max)")
    ax.set_title("Aligned, summed spectra per probe position")
    return save_figure(fig, path).name


def _fig_temperature(distance: np.ndarray, t: np.ndarray, err: np.ndarray, true: np.ndarray,
                     model: Mapping[str, Any] | None, xy: np.ndarray, numbers: Mapping[str, Any], path: Path) -> str:
    from stemlive.live.analysis import interface

    fig = new_figure(8, 4)
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
    return save_figure(fig, path).name


def _fig_labels(distance: np.ndarray, labels: np.ndarray, regions: np.ndarray, ari: float | None, path: Path) -> str:
    fig = new_figure(8, 2.6)
    ax = fig.subplots()
    ax.step(distance, labels, where="mid", label="k-means cluster")
    if (regions >= 0).any():
        ax.step(distance, regions + 0.08, where="mid", ls="--", label="true region (0 left, 1 interface, 2 right)")
    ax.set_yticks([0, 1, 2])
    ax.set_xlabel("distance along the line (nm)")
    ax.set_title("Segmentation" + (f": adjusted Rand index {ari:.2f}" if ari is not None else ""))
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path).name


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
    fig = new_figure(8, 6)
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
    return save_figure(fig, path).name


def _fig_surveys(surveys: Mapping[str, np.ndarray | None], settings: Mapping[str, Any], path: Path) -> str:
    fig = new_figure(7, 3.6)
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
    return save_figure(fig, path).name


