"""Benchmark of the vibrational EELS chain: simulator, alignment + ZLP fit + temperature, k-means.

Usage: ``python benchmarks/eels.py [--quick]``.  Prints spectra/s next to (i) the same ZLP fit done one
spectrum at a time with scipy.optimize.curve_fit, (ii) nion's Thermometry computation per spectrum and
(iii) sklearn KMeans, all in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import time
import types

import numpy as np
import scipy.optimize

from stemlive.live.analysis import eels, segment
from stemlive.simulators.eels_model import VibrationalEELSSimulator

CPU: dict[str, float] = {}


def _timed(fn, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Wall time; the process CPU time of the call is kept in CPU[fn name] (the machine may be shared)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    CPU[getattr(fn, "__name__", "fn")] = time.process_time() - c0
    return out, time.perf_counter() - t0


def curve_fit_zlp(
    energy: np.ndarray,
    spectrum: np.ndarray,
    p0: np.ndarray,
    windows: tuple[tuple[float, float], ...] = ((15.0, 30.0), (130.0, 200.0)),
) -> np.ndarray:
    """The same Pearson VII fit as eels.fit_zlp_pearson7 (spill model, two passes) for one spectrum, with curve_fit."""
    disp = energy[1] - energy[0]
    idx = eels._window_index(np.array([energy[0]]), disp, np.array([p0[1]]), energy.size, windows)[0]
    x, y = energy[idx], spectrum[idx]

    def f(xx: np.ndarray, a: float, c: float, w: float, m: float) -> np.ndarray:
        return eels.pearson7_model(xx, np.array([a, c, w, m]))

    sig = eels.signal_model(energy, spectrum[None], p0[None])
    spill = sig.sample(sig.blur(sig.intrinsic), (x - p0[1])[None])[0]
    p = p0
    for _ in range(2):
        sd = np.sqrt(np.maximum(f(x, *p), 1e-3) + (0.5 * spill) ** 2)
        p, _ = scipy.optimize.curve_fit(f, x, y - spill, p0=p, sigma=sd, absolute_sigma=True)
    return p


def nion_thermometry(energy: np.ndarray, spectrum: np.ndarray, zlp: np.ndarray) -> float:
    """nionswift-eels-analysis MeasureTemperature.execute on one spectrum (far = fitted ZLP); returns T."""
    from nion.data import Calibration, DataAndMetadata
    from nionswift_plugin.nion_eels_analysis.Thermometry import MeasureTemperature

    cal = Calibration.Calibration(energy[0] / 1000.0, (energy[1] - energy[0]) / 1000.0, "eV")

    def item(a: np.ndarray) -> types.SimpleNamespace:
        xd = DataAndMetadata.new_data_and_metadata(np.asarray(a, float), dimensional_calibrations=[cal])
        return types.SimpleNamespace(xdata=xd, data=xd.data)

    n = energy.size
    graphic = types.SimpleNamespace(
        start=cal.convert_from_calibrated_value(0.055) / n, end=cal.convert_from_calibrated_value(0.125) / n
    )
    comp = MeasureTemperature(None)
    comp.execute(item(spectrum), item(zlp), graphic)
    return float(comp._MeasureTemperature__fit[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2,000-spectrum map instead of 10,000")
    args = ap.parse_args()
    n_map = 2000 if args.quick else 10000
    n_loop = 50 if args.quick else 200
    sim = VibrationalEELSSimulator("aln_sic", seed=0)
    energy = -300.0 + 0.44 * np.arange(2048)
    x = np.repeat(np.linspace(-20, 20, 100), n_map // 100)
    sim.spectra(x_nm=x[:100], t_s=np.zeros(100))  # warm caches
    (spectra, truths), t_sim = _timed(sim.spectra, x_nm=x, t_s=np.arange(n_map) * 1.2)
    print(f"simulator: {n_map} spectra x 2048 ch in {t_sim:.2f} s = {n_map / t_sim:,.0f} spectra/s")

    ref = spectra[:200].sum(0)
    shifts, t_align = _timed(eels.xcorr_shifts, spectra, ref, dispersion_meV=0.44)
    zlp, t_zlp = _timed(eels.fit_zlp_pearson7, energy, spectra)
    res, t_T = _timed(eels.temperature, energy, spectra, zlp=zlp)
    chain = t_align + t_zlp + t_T
    print(
        f"chain on {n_map} spectra: align {t_align:.2f} s, ZLP fit {t_zlp:.2f} s ({zlp.n_iter} LM iterations), "
        f"temperature {t_T:.2f} s -> {chain:.2f} s = {n_map / chain:,.0f} spectra/s "
        f"(100x100 map: {1e4 / (n_map / chain):.1f} s)"
    )
    print(f"  CPU time (process): {', '.join(f'{k} {v:.2f} s' for k, v in CPU.items())}")
    resd, t_Td = _timed(eels.temperature, energy, spectra, zlp=zlp, deconvolve=True)
    print(f"  + LR deconvolution (5 it.): temperature {t_Td:.2f} s -> {n_map / (chain - t_T + t_Td):,.0f} spectra/s")
    pulls = (resd.T_K - truths["temperature_K"]) / resd.T_err_K
    print(
        f"  deconvolved: mean (T - T_true) = {np.mean(resd.T_K - truths['temperature_K']):+.2f} K, "
        f"pull RMS {np.sqrt(np.nanmean(pulls**2)):.2f}"
    )

    sel = np.arange(n_loop)
    p_ours = zlp.params[sel]
    t0 = time.perf_counter()
    p_cf = np.array([curve_fit_zlp(energy, spectra[i].astype(float), p_ours[i] * [1.02, 1, 1.02, 1.01]) for i in sel])
    t_cf = (time.perf_counter() - t0) / n_loop
    t_cf_T = _timed(
        eels.temperature,
        energy,
        spectra[:1],
        zlp=eels.ZLPFit(zlp.params[:1], zlp.cov[:1], zlp.chi2_red[:1], 0, zlp.windows_meV),
    )[1]
    per_ours = (t_zlp + t_T) / n_map
    print(
        f"curve_fit loop (same ZLP fit, {n_loop} spectra): {1e3 * (t_cf + t_cf_T):.1f} ms/spectrum "
        f"= {1 / (t_cf + t_cf_T):,.0f} spectra/s; vectorised fit+T is {(t_cf + t_cf_T) / per_ours:.0f}x faster; "
        f"max |dFWHM| vs ours {np.max(np.abs(p_cf[:, 2] - p_ours[:, 2])):.2e} meV"
    )

    t0 = time.perf_counter()
    t_nion = []
    for i in sel[: max(20, n_loop // 4)]:
        t_nion.append(nion_thermometry(energy - zlp.params[i, 1], spectra[i].astype(float), zlp.model(energy)[i]))
    t_n = (time.perf_counter() - t0) / len(t_nion)
    print(
        f"nion Thermometry (per spectrum, far = our fitted ZLP): {1e3 * t_n:.1f} ms/spectrum = {1 / t_n:,.0f} "
        f"spectra/s; ours is {t_n / (chain / n_map):.0f}x faster (whole chain); nion T mean "
        f"{np.mean(t_nion):.0f} K vs true {np.mean(truths['temperature_K'][: len(t_nion)]):.0f} K"
    )

    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    n_k = 2000 if args.quick else 10000
    sims = VibrationalEELSSimulator("mos2_wse2", seed=1)
    xs = np.linspace(0, 64, n_k)
    sp, tr = sims.spectra(x_nm=xs, exposure_ms=300.0)
    e = -300.0 + 0.44 * np.arange(2048)
    bg, _ = eels.power_law_background(e, sp.astype(float))
    win = (e > 16) & (e < 16 + 300 * 0.44)
    data = (sp - bg)[:, win]
    (lab, _, _), t_ours = _timed(segment.kmeans_correlation, data, 3, seed=0)
    z = segment.znormalise(data)
    sk, t_sk = _timed(lambda: KMeans(3, n_init=10, random_state=0).fit_predict(z))
    print(
        f"k-means {n_k} x {data.shape[1]}: ours {t_ours:.2f} s, sklearn KMeans {t_sk:.2f} s "
        f"(ratio {t_sk / t_ours:.2f}); ARI ours-sklearn {adjusted_rand_score(lab, sk):.3f}, "
        f"ours-truth {adjusted_rand_score(tr['region'], lab):.3f}"
    )


if __name__ == "__main__":
    main()
