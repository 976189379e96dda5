"""EELS analysis (stemlive.live.analysis.eels, interface) against the simulator's ground truth."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

from stemlive.live.analysis import eels, interface
from stemlive.simulators.eels_model import VibrationalEELSSimulator

DISP = 0.44
E_AXIS = -300.0 + DISP * np.arange(2048)
TEMPERATURES = (300.0, 600.0, 900.0)
N_REP = 200


# ------------------------------------------------------------------------------------------- alignment
def _drifting_frames(n: int = 64, seed: int = 2) -> tuple[np.ndarray, dict]:
    sim = VibrationalEELSSimulator({"system": "mos2_wse2", "energy_drift": {"jitter_meV": 1.5}}, seed=seed)
    return sim.spectra(x_nm=np.full(n, 5.0), t_s=np.arange(n) * 0.3, exposure_ms=300.0)


def test_alignment_sub_channel() -> None:
    frames, truths = _drifting_frames()
    aligned, shifts = eels.align_spectra(frames, dispersion_meV=DISP)
    true = truths["energy_shift_meV"]
    err = (shifts - shifts.mean()) - (true - true.mean())
    assert np.sqrt(np.mean(err**2)) < 0.005 * DISP, np.sqrt(np.mean(err**2)) / DISP
    # aligned frames share the ZLP centre
    c = eels.zlp_centre(E_AXIS, aligned)
    assert np.std(c) < 0.05 * DISP
    # absolute centres
    c0 = eels.zlp_centre(E_AXIS, frames)
    assert np.sqrt(np.mean((c0 - true) ** 2)) < 0.05 * DISP


def test_alignment_agrees_with_nion_alignzlp() -> None:
    from nion.data import Calibration, DataAndMetadata
    from nionswift_plugin.nion_eels_analysis import AlignZLP

    frames, truths = _drifting_frames(32)
    xd = DataAndMetadata.new_data_and_metadata(
        frames,
        dimensional_calibrations=[Calibration.Calibration(), Calibration.Calibration(-300.0, DISP, "meV")],
        data_descriptor=DataAndMetadata.DataDescriptor(True, 0, 1),
    )
    _, nion_shift = AlignZLP.align_zlp_xdata(xd, method="com")
    nion = np.asarray(nion_shift.data, float) * DISP  # channels -> meV, relative to frame 0
    _, ours = eels.align_spectra(frames, dispersion_meV=DISP)
    ours = ours - ours[0]
    true = truths["energy_shift_meV"] - truths["energy_shift_meV"][0]
    assert np.max(np.abs(nion - ours)) < 0.5 * DISP  # the two agree to half a channel
    assert np.sqrt(np.mean((ours - true) ** 2)) <= np.sqrt(np.mean((nion - true) ** 2)) + 1e-3


def test_shift_round_trip() -> None:
    frames, _ = _drifting_frames(4)
    back = eels.shift_spectra(eels.shift_spectra(frames, 0.37), -0.37)
    assert np.max(np.abs(back - frames)) < 1e-5 * frames.max()  # Nyquist term is not invertible


# ------------------------------------------------------------------------------------------- background
def test_power_law_matches_nion_background_model() -> None:
    from nion.eels_analysis import BackgroundModel

    rng = np.random.default_rng(0)
    e = np.linspace(5, 100, 400)
    y = 1e6 * e**-2.7 * (1 + 0.01 * rng.standard_normal((3, e.size)))
    bg, params = eels.power_law_background(e, y)
    model = BackgroundModel.PolynomialBackgroundModel("pl", 1, transform=np.log, untransform=np.exp)
    m = ((e >= 16) & (e <= 20)) | ((e >= 60) & (e <= 70))
    nion = model._perform_fits(e[m], y[:, m], e, None)
    np.testing.assert_allclose(bg, nion, rtol=1e-9)
    np.testing.assert_allclose(params[:, 1], 2.7, atol=0.05)


# ------------------------------------------------------------------------------------------- ZLP fit
def test_zlp_fit_recovers_pure_zlp_with_honest_errors() -> None:
    sim = VibrationalEELSSimulator({"system": "aln_sic", "phonon_fraction": 0.0}, seed=4)
    spectra, truths = sim.spectra(x_nm=np.zeros(200), t_s=np.arange(200) * 1.2)
    fit = eels.fit_zlp_pearson7(E_AXIS, spectra, signal_correction=0)
    true = np.array([np.nan, 0.0, sim.zlp_fwhm(1200.0), sim.config["zlp"]["m"]])
    for i in (2, 3):
        pull = (fit.params[:, i] - true[i]) / fit.errors[:, i]
        assert 0.6 < np.sqrt(np.mean(pull**2)) < 1.5, (i, np.sqrt(np.mean(pull**2)))
    pull_c = (fit.params[:, 1] - truths["energy_shift_meV"]) / fit.errors[:, 1]
    assert 0.6 < np.sqrt(np.mean(pull_c**2)) < 1.5


def test_chain_does_not_depend_on_the_number_of_threads() -> None:
    """Blocks of spectra run on parallel threads: 1 or 3 workers give bit-identical shifts, fits and temperatures."""
    sim = VibrationalEELSSimulator("aln_sic", seed=11, noise="compact")
    spectra, _ = sim.spectra(x_nm=np.linspace(-20.0, 20.0, 2100), t_s=np.arange(2100) * 1.2)  # 3 x 1024-row blocks
    ref = spectra[:100].sum(0)
    runs = []
    for workers in (1, 3):
        shifts = eels.xcorr_shifts(spectra, ref, dispersion_meV=DISP, workers=workers)
        zlp = eels.fit_zlp_pearson7(E_AXIS, spectra, workers=workers)
        res = eels.temperature(E_AXIS, spectra, zlp=zlp, workers=workers)
        runs.append((shifts, zlp.params, zlp.cov, res.T_K, res.T_err_K))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------- thermometry
@functools.cache
def _thermometry(T: float, deconvolve: bool = False, m: float | None = None) -> types.SimpleNamespace:
    """200 spectra of 1200 ms at 30 pA (aln_sic, AlN side) at temperature T, fitted one by one (vectorised)."""
    cfg: dict = {"system": "aln_sic"}
    if m is not None:
        cfg["zlp"] = {"m": m}
    sim = VibrationalEELSSimulator(cfg, seed=int(T))
    spectra, _ = sim.spectra(x_nm=np.full(N_REP, -20.0), t_s=np.arange(N_REP) * 1.2, temperature_K=T)
    res = eels.temperature(E_AXIS, spectra, deconvolve=deconvolve)
    # counting limit from the noise-free spectrum (every detected electron counted), same bins as the fits
    mu = sim.expected_spectrum(x_nm=[-20.0], temperature_K=T)
    bins = eels.log_ratio_bins(E_AXIS, mu, eels.fit_zlp_pearson7(E_AXIS, mu))
    use = np.median(res.weights, axis=0) > 0
    limit = float(
        eels.counting_limit_sigma_T(
            bins["e"][use], bins["L"][0, use], bins["G"][0, use], bins["SL"][0, use], bins["SG"][0, use], T
        )
    )
    pull = (res.T_K - T) / res.T_err_K
    return types.SimpleNamespace(
        T=T,
        mean=float(np.mean(res.T_K)),
        sem=float(np.std(res.T_K) / np.sqrt(N_REP)),
        std=float(np.std(res.T_K)),
        limit=limit,
        pull_rms=float(np.sqrt(np.mean(pull**2))),
        res=res,
    )


def _summary(r: types.SimpleNamespace) -> str:
    return (
        f"T={r.T:.0f} K: mean {r.mean:.2f} K (bias {100 * (r.mean / r.T - 1):+.3f} % +- {100 * r.sem / r.T:.3f} %), "
        f"scatter {r.std:.2f} K = {r.std / r.limit:.2f} x counting limit {r.limit:.2f} K, pull RMS {r.pull_rms:.2f}"
    )


@pytest.mark.parametrize("T", TEMPERATURES)
def test_temperature_bias(T: float) -> None:
    """Default method (no LR, resolution-corrected line through the origin): |bias| <= 0.3 % (measured <= 0.016 %)."""
    r = _thermometry(T)
    assert abs(r.mean - T) <= 0.003 * T, _summary(r)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_temperature_pull_rms(T: float) -> None:
    """Honest errors: RMS of (T - T_true) / T_err in [0.8, 1.2] (counting + ZLP covariance; measured 1.08-1.16)."""
    r = _thermometry(T)
    assert 0.8 <= r.pull_rms <= 1.2, _summary(r)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_temperature_scatter_vs_counting_limit(T: float) -> None:
    """Scatter <= 1.3 x k_B T^2 / sqrt(sum E^2 w) of the same bins (measured 1.05-1.24 with the zero-loss window
    from 10 meV; 1.45 at 300 K from 15 meV, where the ZLP tail under the small gain signal was less constrained)."""
    r = _thermometry(T)
    assert r.std / r.limit <= 1.3, _summary(r)


def test_temperature_heavy_tailed_resolution() -> None:
    """The correction does not rely on the simulator's tail: Pearson VII m = 1.5 (infinite variance) at 600 K."""
    r = _thermometry(600.0, m=1.5)
    assert abs(r.mean - 600.0) <= 0.01 * 600.0 and 0.7 <= r.pull_rms <= 1.4, _summary(r)


@pytest.mark.parametrize("layout", ["two_materials", "across_the_interface"])
def test_batch_equals_one_spectrum_at_a_time_on_heterogeneous_maps(layout: str) -> None:
    """A 96-pixel map of AlN and SiC pixels in random order (or positions spread across the interface: mixed
    signals and a temperature step): the batch (grouped spill model, groups only of spectra shown equivalent)
    gives every pixel's temperature within 0.1 sigma of fitting that spectrum alone (formerly up to 13 sigma,
    pull RMS 4.4); pull RMS against the truth <= 1.2."""
    rng = np.random.default_rng(1)
    x = np.where(rng.random(96) < 0.5, -20.0, 20.0) if layout == "two_materials" else rng.uniform(-8.0, 8.0, 96)
    sim = VibrationalEELSSimulator("aln_sic", seed=5)
    spectra, truths = sim.spectra(x_nm=x, t_s=np.arange(x.size) * 1.2)
    truth = np.asarray(truths["temperature_K"]).ravel()
    batch = eels.temperature(E_AXIS, spectra)
    one = [eels.temperature(E_AXIS, spectra[i : i + 1]) for i in range(x.size)]
    t_one = np.array([r.T_K[0] for r in one])
    err_one = np.array([r.T_err_K[0] for r in one])
    diff = (batch.T_K - t_one) / err_one
    pull = (batch.T_K - truth) / batch.T_err_K
    summary = f"max |batch - one| {np.max(np.abs(diff)):.3f} sigma, pull RMS {np.sqrt(np.mean(pull**2)):.2f}"
    assert np.max(np.abs(diff)) <= 0.1, summary
    assert np.sqrt(np.mean(pull**2)) <= 1.2, summary
    assert np.max(batch.zlp.signal.group) + 1 < x.size, "no spectra grouped at all"  # type: ignore[union-attr]


@pytest.mark.grid
@pytest.mark.parametrize("frames", [50, 200])
def test_demo_thermometry_dose_has_honest_errors(frames: int) -> None:
    """The demo's thermometry points (eels_aln_sic scenario, 1200 ms frames with energy drift, aligned and summed
    as the stage does) at the demo's dose (50 frames per point) and the reference dose (200, `demo --full`):
    |bias| <= 0.3 % on both sides of the interface and pooled pull RMS 0.8-1.2 (measured: AlN 0.80, SiC 0.90 at
    50 frames; 0.95, 0.99 at 200 frames).
    Formerly 1.52 and 2.6: with 30 LR iterations the resolution offset left a log-ratio structure that grows with
    dose (line chi2_red 50-60 at 200 frames, SiC bias -0.026 %)."""
    from stemlive.simulators.scenario import load_scenario

    scenario = load_scenario("eels_aln_sic")
    sim = VibrationalEELSSimulator(scenario, seed=frames)
    rng = np.random.default_rng(frames)
    pulls = []
    for x in (-8.0, 8.0):  # AlN, SiC
        frames_, truths = sim.spectra(x_nm=np.full(30 * frames, x), exposure_ms=1200.0,
                                      t_s=np.arange(30 * frames) * 1.2, rng=rng)
        truth = float(np.asarray(truths["temperature_K"]).ravel()[0])
        energy, sums, _ = eels.sum_aligned(frames_.reshape(30, frames, -1), dispersion_meV=DISP)
        res = [eels.temperature(energy, sums[i : i + 1]) for i in range(30)]
        t = np.array([r.T_K[0] for r in res])
        err = np.array([r.T_err_K[0] for r in res])
        assert abs(np.mean(t) / truth - 1) <= 0.003, (x, np.mean(t), truth)
        pulls.append((t - truth) / err)
    pull_rms = float(np.sqrt(np.mean(np.concatenate(pulls) ** 2)))
    assert 0.8 <= pull_rms <= 1.2, [float(np.sqrt(np.mean(p**2))) for p in pulls]


def test_temperature_uncorrected_is_biased() -> None:
    """Documents the resolution offset that the correction removes (plain log-ratio fit at 900 K)."""
    sim = VibrationalEELSSimulator("aln_sic", seed=9)
    spectra, _ = sim.spectra(x_nm=np.full(50, -20.0), t_s=np.arange(50) * 1.2, temperature_K=900.0)
    plain = eels.temperature(E_AXIS, spectra, resolution_correction=False)
    corr = eels.temperature(E_AXIS, spectra, zlp=plain.zlp)
    assert np.mean(plain.T_K) / 900.0 - 1 > 0.004, np.mean(plain.T_K)
    assert abs(np.mean(corr.T_K) / 900.0 - 1) < 0.004, np.mean(corr.T_K)


def test_temperature_with_lr_deconvolution_runs() -> None:
    """The reference's optional LR step (5 iterations) stays available; its bias is reported, not tuned."""
    r = _thermometry(600.0, True)
    assert abs(r.mean / 600.0 - 1) < 0.03, _summary(r)


def test_counting_limit_formula_no_background() -> None:
    e = np.array([60.0, 80.0])
    L, G = np.array([1e4, 2e4]), np.array([2e3, 3e3])
    s = eels.counting_limit_sigma_T(e, L, G, L, G, 500.0)
    ref = eels.KB_MEV_PER_K * 500.0**2 / np.sqrt(np.sum(e**2 / (1 / G + 1 / L)))
    assert s == pytest.approx(ref)


def test_lucy_richardson_conserves_and_sharpens() -> None:
    x = np.arange(257.0)
    psf = np.exp(-0.5 * ((x - 128) / 4) ** 2)
    truth = np.zeros(257)
    truth[100] = 1000.0
    blurred = np.convolve(truth, psf / psf.sum(), mode="same")
    out = eels.lucy_richardson(blurred, psf, iterations=20)
    assert out.sum() == pytest.approx(blurred.sum(), rel=1e-6)
    assert out.max() > 2 * blurred.max() and int(np.argmax(out)) == 100


# ------------------------------------------------------------------------------------------- interface
def test_interface_drop_recovered() -> None:
    sim = VibrationalEELSSimulator("aln_sic", seed=5)
    x = np.arange(-15.0, 15.01, 0.25)
    nrep = 4
    spectra, _ = sim.spectra(x_nm=np.repeat(x, nrep), t_s=np.arange(x.size * nrep) * 1.2)
    r = eels.temperature(E_AXIS, spectra)
    t = r.T_K.reshape(x.size, nrep)
    w = 1 / r.T_err_K.reshape(x.size, nrep) ** 2
    fit = interface.fit_interface_profile(
        x, (t * w).sum(1) / w.sum(1), 1 / np.sqrt(w.sum(1)), interface_x_nm=0.0, exclude_nm=2.5
    )
    assert abs(fit.drop_K - 15.0) <= 3.0, (fit.drop_K, fit.drop_err_K, fit.width_nm)
    assert abs(fit.drop_K - 15.0) <= 3 * fit.drop_err_K + 0.5
    assert 0.5 < fit.width_nm < 4.0


def test_interface_default_position_from_noisy_profile() -> None:
    """Demo bug: the default interface position of a realistic 40-point profile (0.5 nm step, hot AlN left,
    15 K drop; one 1200 ms spectrum per point, ~1 K errors) is found within 1 nm and the fit succeeds.

    The former zero-padded running mean put the steepest descent at index 2 or n - 3 (an edge artefact) and
    the fit failed with "need at least two points on each side".
    """
    sim = VibrationalEELSSimulator("aln_sic", seed=12)
    x = -10.0 + 0.5 * np.arange(40)
    spectra, truths = sim.spectra(x_nm=x, t_s=np.arange(x.size) * 1.2)
    r = eels.temperature(E_AXIS, spectra)
    fit = interface.fit_interface_profile(x, r.T_K, r.T_err_K)
    assert abs(fit.interface_x_nm - 0.0) <= 1.0, fit.interface_x_nm
    assert abs(fit.drop_K - 15.0) <= 3 * fit.drop_err_K + 1.0, (fit.drop_K, fit.drop_err_K)
    # synthetic profiles with 2 K noise, the step anywhere in the middle third: located within 1 nm
    rng = np.random.default_rng(0)
    from scipy.special import erf

    worst = 0.0
    for _ in range(50):
        x0 = rng.uniform(-3.0, 3.0)
        t = 650.0 - 0.18 * (x - x0) - 7.5 * (1 + erf((x - x0) / (np.sqrt(2) * 0.78)))
        fit = interface.fit_interface_profile(x, t + 2.0 * rng.standard_normal(x.size), np.full(x.size, 2.0))
        worst = max(worst, abs(fit.interface_x_nm - x0))
    assert worst <= 1.0, worst
