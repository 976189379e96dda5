"""The zero-loss model with symmetric power-law tails (issue 12): temperatures from an independent synthetic
spectrum (written here: neither the simulator nor the corpus generator) against its ground truth."""

from __future__ import annotations

import numpy as np

from stemlive.live.analysis import eels
from stemlive.live.analysis.eels_power_profile import M_GRID, _marginal

KB = 8.617333262e-2  # meV / K
DISP = 0.5
AXIS = -300.0 + DISP * np.arange(1201)
FWHM, M = 8.0, 2.4
TAIL_B, TAIL_P = 1.5e-4, 2.8  # tails per unit zero-loss area and meV at 50 meV, exponent


def _spectra(n: int, temperature: float, counts: float, *, tails: str = "both", seed: int = 5) -> np.ndarray:
    """Poisson spectra: a Pearson VII peak, tails ``b (|E| / 50)^-p`` switched on by a logistic at 2 FWHM on
    ``tails`` = "both" sides, the "loss" side only or "none", and two phonon modes in detailed balance blurred by
    the peak."""
    rng = np.random.default_rng(seed)
    h = 0.05
    x = np.arange(-320.0, 320.0 + h / 2, h)
    peak = (1.0 + 4.0 * (2.0 ** (1.0 / M) - 1.0) * (x / FWHM) ** 2) ** -M
    peak /= peak.sum() * h
    ax = np.abs(x)
    dos = np.exp(-0.5 * ((ax - 85.0) / 4.0) ** 2) + 0.7 * np.exp(-0.5 * ((ax - 108.0) / 5.0) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        occ = 1.0 / np.expm1(ax / (KB * temperature))
        loss_fn = np.where(ax > 1.0, dos / ax * np.where(x > 0, occ + 1.0, occ), 0.0)
    loss_fn *= 0.003 / (loss_fn.sum() * h)
    blurred = np.convolve(loss_fn, peak, mode="same") * h
    wings = TAIL_B * (np.maximum(ax, 1.0) / 50.0) ** -TAIL_P / (1.0 + np.exp(-(ax - 2.0 * FWHM) / 1.0))
    wings *= {"both": 1.0, "loss": (x > 0).astype(float), "none": 0.0}[tails]
    dens = peak + blurred + wings
    cum = np.concatenate([[0.0], np.cumsum(dens) * h])
    out = np.empty((n, AXIS.size))
    for i, shift in enumerate(rng.uniform(-1.0, 1.0, n)):
        edges = np.concatenate([AXIS - DISP / 2, [AXIS[-1] + DISP / 2]]) - shift
        mu = counts * np.diff(np.interp(edges, np.append(x - h / 2, x[-1] + h / 2), cum))
        out[i] = rng.poisson(mu)
    return out


def test_symmetric_power_law_tails_give_the_true_temperature() -> None:
    truth = 320.0
    t = eels.temperature(AXIS, _spectra(6, truth, 1e9))
    assert t.zlp.shape == "pearson7_power"
    assert np.all(np.abs(t.zlp.params[:, 5] - TAIL_P) < 0.05), t.zlp.params[:, 5]
    assert np.all(np.abs(t.zlp.params[:, 3] - M) < 0.2), t.zlp.params[:, 3]
    assert np.all(t.zlp.chi2_red < 2.0) and np.all(t.chi2_red < 2.5), (t.zlp.chi2_red, t.chi2_red)
    pull = (t.T_K - truth) / t.T_err_K
    # the corpus's targets where 6 spectra can show them (measured: mean +0.24 %, SEM 0.18 %, pulls -1.0..+1.7,
    # errors 0.4 %): |bias| <= 0.3 % + 2 SEM, every point within 3.5 sigma, errors below 1 % (the tails' share)
    sem = np.std(t.T_K) / np.sqrt(t.T_K.size)
    assert abs(np.mean(t.T_K) - truth) <= 0.003 * truth + 2.0 * sem, (t.T_K, t.T_err_K)
    assert np.all(np.abs(pull) < 3.5), pull
    assert np.all(t.T_err_K < 0.01 * truth), t.T_err_K


def test_plain_peak_keeps_the_pearson7_and_one_sided_tails_are_not_absorbed() -> None:
    # the tails are tried only where the peak families fail their windows' chi-square
    z = eels.fit_zlp_pearson7(AXIS, _spectra(2, 300.0, 1e9, tails="none"))
    assert z.shape == "pearson7" and np.all(z.chi2_red < 3.0), z.chi2_red
    # tails on the loss side only: no symmetric model describes the windows -> the peak family is returned with a
    # chi-square that refuses the temperature (the stage's max_zlp_chi2 = 25)
    z = eels.fit_zlp_pearson7(AXIS, _spectra(2, 300.0, 1e9, tails="loss"))
    assert z.shape != "pearson7_power"
    assert np.all(z.chi2_red > 25.0), z.chi2_red


def test_exponent_marginalised_over_a_profile_with_two_minima() -> None:
    # the windows' chi-square can have two minima in m (2.15 and 2.6 for a true 2.5 on the corpus's seed 3): a
    # parabola at the least one understated T's error there (+3 sigma); the weighted spread covers both
    g = np.asarray(M_GRID)
    temps = 300.0 - 28.0 * (g - 2.5)  # dT/dm of the corpus's spectra
    one = 400.0 * (g - 2.6) ** 2  # a single minimum: sigma_m = 0.05 (Delta chi2 = 1)
    two = np.minimum(400.0 * (g - 2.15) ** 2, 400.0 * (g - 2.6) ** 2 + 0.5)
    m, var = _marginal(g, np.stack([one, two], axis=1), np.stack([temps, temps], axis=1), np.ones(2))
    sigma_m = 1.0 / np.sqrt(400.0)  # Delta chi2 = 1
    assert abs(m[0] - 2.6) < 0.005 and abs(np.sqrt(var[0]) - 28.0 * sigma_m) < 0.05 * 28.0 * sigma_m, (m, var)
    # two minima 0.45 apart, nearly equal: the spread is about half their distance in T, not one minimum's width
    assert 2.3 < m[1] < 2.45, m
    assert np.sqrt(var[1]) > 0.4 * 28.0 * 0.45, np.sqrt(var[1])
