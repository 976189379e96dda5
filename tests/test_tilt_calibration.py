"""Tilt-angle calibration (issue 14 step 2): column matching across tilts and the least squares of equation 1.

Fast tests use the simulator's true metal positions projected at hysteresis-offset angles (the reference size:
the 16 x 16 nm MoS2-WSe2 flake, 512^2 px of 0.32 A, ~2,700 metals per projection), with position noise, missed
and spurious columns and a tracking error of about a lattice vector; the grid test runs the whole angle chain
(column fits, matching, refit, recalibration) on the simulated 512^2 tilt sums.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemlive.live.analysis import tilt_calibration as tc
from stemlive.live.analysis.tilt_geometry import identifiable_distortion
from stemlive.simulators.scenario import load_scenario
from stemlive.simulators.stage import rotation_matrix
from stemlive.simulators.tilt_sums import REFERENCE_TILTS_DEG

PIXEL_A = 0.32
SHAPE = (512, 512)


def _metals():
    atoms = load_scenario("default").sample.atoms()
    return atoms.positions_A[np.isin(atoms.species, ["Mo", "W"])]


def _observe(metals, actual_deg, seed: int, noise_px: float = 0.05):
    """Metal columns as a column fit would report them: inside the field, shuffled, 1 % missed, 0.5 % spurious."""
    rng = np.random.default_rng(seed)
    centre = np.array([(SHAPE[0] - 1) / 2.0, (SHAPE[1] - 1) / 2.0])
    pos, err, inten, offsets = [], [], [], []
    for alpha, beta in actual_deg:
        off = rng.normal(0.0, 9.0, 2)  # tracking error ~0.3 nm: about one lattice vector
        lab = metals @ rotation_matrix(alpha, beta).T
        p = lab[:, [1, 0]] / PIXEL_A + centre + off + rng.normal(0.0, noise_px, (len(metals), 2))
        w = np.where(metals[:, 0] > 0, 2.6, 1.0)  # W side brighter
        ok = np.all((p > 2) & (p < np.array(SHAPE) - 3), axis=1) & (rng.random(len(p)) > 0.01)
        p, w = p[ok], w[ok]
        extra = rng.uniform(0, SHAPE[0] - 1, (len(p) // 200, 2))
        p = np.concatenate([p, extra])
        w = np.concatenate([w, np.full(len(extra), 1.0)])
        order = rng.permutation(len(p))
        pos.append(p[order])
        inten.append(w[order])
        err.append(np.full((len(p), 2), noise_px))
        offsets.append(off)
    return tc.MetalObservations(pos, err, inten), np.array(offsets)


def _hysteresis(seed: int = 3):
    rng = np.random.default_rng(seed)
    nominal = np.array(REFERENCE_TILTS_DEG)
    actual = nominal + np.array([1.1, 2.0]) * rng.choice([-1.0, 1.0], nominal.shape) + rng.normal(0, 0.3, nominal.shape)
    return nominal, actual


def test_matching_at_reference_size_pairs_every_tilt():
    seed = 0
    """Nominal angles off by the hysteresis (up to ~2.7 deg), shifts of about a lattice vector: every metal of the
    reference projection is paired with its own column in every tilt, angles within 0.05 deg."""
    metals = _metals()
    nominal, actual = _hysteresis(seed)
    obs, _ = _observe(metals, actual, seed)
    assert np.abs(nominal - actual).max() > 1.5
    cal = tc.calibrate_tilts(obs, nominal[:, 0], nominal[:, 1], PIXEL_A, SHAPE, distortion=True)
    err = np.abs(np.column_stack([cal.alpha_deg, cal.beta_deg]) - actual)
    print("angle errors (deg)", np.round(err.max(axis=1), 4), "rms px", round(cal.rms_px, 4))
    # exact positions up to 0.05 px noise: the sample frame is the true one up to the ripple's mean-plane tilt
    assert err.max() < 0.05, err
    assert cal.rms_px < 0.08
    assert cal.observed.shape[0] > 0.9 * len(obs.position[cal.reference]) - len(obs.position[cal.reference]) // 200
    # standard errors describe the scatter: the errors are of the order of the stated ones
    se = np.column_stack([cal.alpha_err_deg, cal.beta_err_deg])
    assert np.all(se > 0) and np.median(err / se) < 5.0
    # no image distortion in these columns: the fitted one is zero within its errors (measured 0.4 and 1.3 sigma,
    # sigma 1.2e-4 and 2.4e-4), below the simulator's scan distortion at this size (8.5e-4 stretch, 1.1e-3 shear)
    e, e_err = identifiable_distortion(cal.distortion), cal.distortion_err[:, 0]
    print("distortion (a, b)", e, "+-", e_err)
    assert np.all(e_err > 0) and np.all(e_err < 3e-4)
    assert np.all(np.abs(e) < 3.0 * e_err), (e, e_err)


def test_common_image_distortion_is_estimated():
    """A linear image distortion common to every projection (the simulator's scan distortion at the reference
    size, the drift during a 512^2 frame: 0.09 % stretch along the slow axis and 0.1 % shear; columns recorded at
    ``(I + E) p``): the calibration recovers it (in the scan's gauge: the fast axis undistorted, which the drift's
    distortion is to 1/nx) and every angle, the reference's too. Not modelled, the reference projection is
    0.038 deg off (measured on these columns at 0.03 px noise)."""
    metals = _metals()
    nominal, actual = _hysteresis(3)
    obs, _ = _observe(metals, actual, 0)
    e_true = np.array([[8.5e-4, 1.6e-6], [1.06e-3, 2.0e-6]])  # TiltSums.scan_drift_px of the default 512^2 sums
    obs = tc.MetalObservations([p + p @ e_true.T for p in obs.position], obs.error, obs.intensity)
    cal = tc.calibrate_tilts(obs, nominal[:, 0], nominal[:, 1], PIXEL_A, SHAPE, distortion=True)
    err = np.abs(np.column_stack([cal.alpha_deg, cal.beta_deg]) - actual)
    print("angle errors (deg)", np.round(err.max(axis=1), 4), "E", cal.distortion.tolist(), "+-",
          cal.distortion_err.tolist())
    assert err.max() < 0.05, err
    assert err[cal.reference].max() < 0.02, err[cal.reference]
    # every element within 3 standard errors (1-2.5e-4 at 0.05 px noise) of the truth (the fast column: 2e-6),
    # and the errors small enough for the estimate to mean something (the true components are > 3.5 sigma)
    assert np.all(cal.distortion_err[:, 0] < 2.5e-4), cal.distortion_err
    assert np.all(cal.distortion[:, 1] == 0.0) and np.all(cal.distortion_err[:, 1] == 0.0)
    assert np.all(np.abs(cal.distortion - e_true) < 3.0 * cal.distortion_err + 1e-5), cal.distortion


def test_wrong_start_shift_is_resolved_by_the_lattice_translation():
    """A start shift that puts every metal onto its neighbour's column (the cross-correlation's failure on a
    lattice) is undone by the lattice-translation search in :func:`tilt_calibration._register`."""
    metals = _metals()
    nominal, actual = _hysteresis(5)
    obs, _ = _observe(metals, actual[:2], 5)
    k = 1
    centre = np.array([(SHAPE[0] - 1) / 2.0, (SHAPE[1] - 1) / 2.0])
    p_ref = obs.position[0]
    r = np.column_stack([(p_ref[:, 1] - centre[1]) * PIXEL_A, (p_ref[:, 0] - centre[0]) * PIXEL_A,
                         np.zeros(len(p_ref))])
    lattice = tc._lattice_vectors(r[:, :2])
    assert abs(np.hypot(*lattice[0, :2]) - 3.2) < 0.15
    from scipy.spatial import cKDTree

    tree = cKDTree(obs.position[k])
    ang0 = np.radians([*nominal[k], 0.0])
    good = tc._register(r, obs.position[k], tree, ang0, centre.copy(), PIXEL_A, lattice, 0.3 * 10.0,
                        (0.3, 0.55, 1.0), 2, mode_shift=True)
    rot = tc.rotation_from_angles(*nominal[k], 0.0)[0]
    wrong_t = centre + (rot @ lattice[1])[[1, 0]] / PIXEL_A
    moved = tc._register(r, obs.position[k], tree, ang0, wrong_t, PIXEL_A, lattice, 0.3 * 10.0,
                         (0.3, 0.55, 1.0), 2, mode_shift=True)
    assert np.mean(good[2] == moved[2]) > 0.99
    # margin of the next translation (px^2, mean squared residual difference x pairs; measured 30): the chosen
    # one's own total is ~2 x 0.05^2 x 2,700 = 13.5 px^2, the next best's at least twice that
    assert moved[3] > 13.5


@pytest.mark.grid  # ~5-10 min on 2 idle cores (column fits and refits of 12 x 512^2 sums)
@pytest.mark.timeout(2400)
def test_reference_size_calibrated_angles():
    """The must-show angles at the reference size: 12 tilts of 512^2, 10 frames at the reference dose, the
    16 x 16 nm flake, nominal angles off by the simulated hysteresis. The sums are drift-free, as after the
    tilt-series stage's drift correction (the default sums keep one frame's drift, a 0.45 px scan distortion common
    to every tilt: docs/tomography.md, *Image distortion*). Measured 2026-12-04 with the distortion fitted in the
    recalibration (the chain's default): all 12 within 0.020 deg (0.026 before)."""
    from threadpoolctl import threadpool_limits

    from stemlive.live.analysis import atomic_tomography as at
    from stemlive.simulators.tilt_sums import simulate_tilt_sums

    sc = load_scenario("default").replace(stage={"settle_time_s": 0.0},
                                          drift={"velocity_nm_per_s": (0.0, 0.0), "random_walk_nm_per_sqrt_s": 0.0})
    ts = simulate_tilt_sums(sc, shape=SHAPE)
    with threadpool_limits(limits=1, user_api="blas"):
        res = at.reconstruct_atoms(ts.sums, ts.nominal_deg[:, 0], ts.nominal_deg[:, 1], 10 * ts.pixel_size_nm,
                                   atoms=False)
    nominal_err = np.abs(ts.nominal_deg - ts.actual_deg)
    for name, cal in (("first", res.first_calibration), ("final", res.calibration)):
        err = np.abs(np.column_stack([cal.alpha_deg, cal.beta_deg]) - ts.actual_deg)
        print(name, "angle errors (deg)", np.round(err, 3).tolist(), res.timings_s)
    assert nominal_err.max() > 1.5
    err = np.abs(np.column_stack([res.calibration.alpha_deg, res.calibration.beta_deg]) - ts.actual_deg)
    assert err.max() < 0.05, err
