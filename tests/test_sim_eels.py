"""Physics of the vibrational EELS simulator (stemlive.simulators.eels_model)."""

from __future__ import annotations

import numpy as np
import pytest

from stemlive.simulators.eels_model import VibrationalEELSSimulator
from stemlive.simulators.eels_physics import KB_MEV_PER_K, PHONON_PEAKS

DISP = 0.44
OFF = -300.0
N_CH = 2048


@pytest.mark.parametrize("T", [300.0, 700.0])
def test_detailed_balance_at_phonon_peaks(T: float) -> None:
    """Summed loss/gain counts at each AlN peak follow exp(E/kT) within Poisson error.

    A narrow resolution (1 meV FWHM, Pearson m = 4) keeps the convolution's own effect on the ratio
    below 0.3 %; the exact ZLP is subtracted so only Poisson noise is left.
    """
    cfg = {
        "system": "aln_sic",
        "zlp": {"fwhm_meV": 1.0, "m": 4.0},
        "energy_drift": {"jitter_meV": 0.0, "rate_meV_per_s": 0.0, "amplitude_meV": 0.0},
    }
    sim = VibrationalEELSSimulator(cfg, seed=11)
    zlp_only = VibrationalEELSSimulator({**cfg, "phonon_fraction": 0.0})
    off = -DISP * 682  # zero loss exactly on channel 682
    frames, _ = sim.spectra(x_nm=np.full(200, -20.0), temperature_K=T, energy_offset_meV=off)
    total = frames.astype(float).sum(0)
    zlp = zlp_only.expected_spectrum(x_nm=[-20.0], energy_offset_meV=off)[0] * 200 * (1 - sim.config["phonon_fraction"])
    e = off + DISP * np.arange(N_CH)
    i0 = 682
    for centre, _, _ in PHONON_PEAKS["aln_sic"][0]:
        j = int(round(centre / DISP))
        loss = total[i0 + j] - zlp[i0 + j]
        gain = total[i0 - j] - zlp[i0 - j]
        var = total[i0 + j] / loss**2 + total[i0 - j] / gain**2
        measured = np.log(loss / gain)
        expected = e[i0 + j] / (KB_MEV_PER_K * T)
        assert abs(measured - expected) < 4 * np.sqrt(var) + 0.003 * expected, (centre, measured, expected)


def test_truths_and_model() -> None:
    sim = VibrationalEELSSimulator("aln_sic", seed=1)
    x = np.array([-10.0, 0.0, 10.0])
    spectra, truths = sim.spectra(x_nm=x, t_s=np.arange(3) * 1.2, return_expected=True)
    assert spectra.shape == (3, N_CH) and spectra.dtype == np.float32
    assert list(truths["region"]) == [0, 1, 2]
    # T(x): lines 650 - 0.18 x and 635 - 0.18 x joined within ~2 nm
    np.testing.assert_allclose(sim.model.temperature([-10.0, 10.0]), [651.8, 633.2], atol=1e-6)
    assert sim.model.drop_K == pytest.approx(15.0)
    # Poisson scatter around the expected counts
    mu = truths["expected"]
    z = (spectra - mu) / np.sqrt(mu)
    assert abs(z.std() - 1) < 0.05 and abs(z.mean()) < 0.05
    # the ZLP sits at the true shift: peak of the expected spectrum within half a channel
    e = OFF + DISP * np.arange(N_CH)
    assert np.all(np.abs(e[np.argmax(mu, axis=1)] - truths["energy_shift_meV"]) <= DISP / 2 + 1e-9)


def test_zlp_width_grows_with_exposure() -> None:
    sim = VibrationalEELSSimulator("mos2_wse2")
    assert sim.zlp_fwhm(3.0) == pytest.approx(5.7)
    assert sim.zlp_fwhm(300.0) == pytest.approx(8.3)
    assert 5.7 < sim.zlp_fwhm(30.0) < 8.3


def test_leakage_and_saturation() -> None:
    sim = VibrationalEELSSimulator({"system": "mos2_wse2", "saturation_counts": 1e5}, seed=0)
    w = sim.model.region_weights(np.array([0.0, 25.0, 32.8, 41.0, 70.0]))
    assert np.all(np.argmax(w, axis=1) == [0, 0, 1, 2, 2])
    assert w[1, 1] > w[0, 1] > 0  # interface signal decays away from the interface
    spectra, truths = sim.spectra(x_nm=[0.0], exposure_ms=300.0)
    assert truths["saturated"][0] and spectra.max() <= 1e5
