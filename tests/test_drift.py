"""Tests for stemlive.live.analysis.drift on synthetic noisy lattice images with known drift.

Frames are rendered exactly (analytic Fourier series of a honeycomb lattice of Gaussian columns, MoS2-like:
period 9.9 px = 3.165 A at 0.32 A/px) at any sub-pixel displacement, including a different displacement for every
scan row, then Poisson noise at 1,000 counts per metal column (400 per S2 column) is added.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemlive.live.analysis import drift, drift_trajectory, registration, scan_distortion
from stemlive.simulators import lattice

SHAPE = (256, 256)
PERIOD = 9.9


def render_lattice(shape=SHAPE, displacement=(0.0, 0.0), *, counts=(1000.0, 400.0), sigma=1.7, vacancies=None):
    """Expected counts; ``displacement`` (2,) or per scan row (ny, 2): a feature at (y, x) appears at (y+dy, x+dx)."""
    return lattice.render_lattice(shape, displacement, period=PERIOD, counts=counts, sigma=sigma, vacancies=vacancies)


def metal_vacancies(rng, n=12, shape=SHAPE):
    """A few metal-site positions inside the field of view (they make the lattice non-periodic)."""
    p = lattice.metal_sites(shape, period=PERIOD, margin=10.0)
    return p[rng.permutation(len(p))[:n]]


def drifting_series(rng, n_frames, velocity, *, walk=0.05, vacancies=None, continuous=True, shape=SHAPE):
    """Frames with a linear drift (px per frame) + random walk; the drift also acts within each frame.

    Frames are back to back, every scan row takes 1/ny of a frame. Returns noisy frames, the per-row true
    displacements (n, ny, 2) and the true shift of every frame (displacement of its centre row minus frame 0's).
    """
    ny = shape[0]
    v = np.asarray(velocity, float)
    steps = rng.normal(0.0, walk, (n_frames, 2))
    steps[0] = 0
    offsets = np.cumsum(steps, axis=0)
    frames, disp = [], []
    for i in range(n_frames):
        t_rows = i + np.arange(ny) / ny if continuous else np.full(ny, i + 0.5 * (ny - 1) / ny)
        d = t_rows[:, None] * v + offsets[i]
        disp.append(d)
        frames.append(rng.poisson(render_lattice(shape, d, vacancies=vacancies)).astype(np.float32))
    disp = np.array(disp)
    c = (ny - 1) // 2
    centre = 0.5 * (disp[:, c] + disp[:, c + 1]) if ny % 2 == 0 else disp[:, c]
    return np.array(frames), disp, centre - centre[0]


def rms(err):
    err = np.asarray(err)
    return float(np.sqrt(np.mean(np.sum(err.reshape(-1, 2) ** 2, axis=1))))


# ----------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------


def test_sign_convention_single_feature():
    """A feature at (y, x) in the reference is at (y + dy, x + dx) in the moving image."""
    yy, xx = np.mgrid[:128, :128].astype(float)

    def blob(y, x):
        return 100 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0**2)) + 1.0

    ref = blob(50.0, 70.0)
    mov = blob(50.0 + 3.25, 70.0 - 5.5)
    shift, quality = registration.register_translation(ref, mov, window=None)
    np.testing.assert_allclose(shift, [3.25, -5.5], atol=0.01, err_msg=f"measured {shift}")
    assert quality > 0.99
    # with the default Hann window an off-centre isolated feature is pulled slightly towards the centre (< 0.1 px)
    shift, quality = registration.register_translation(ref, mov)
    np.testing.assert_allclose(shift, [3.25, -5.5], atol=0.1, err_msg=f"measured {shift}")
    # and it is the negative of skimage's registration shift
    reg = registration.Registrator(ref)
    np.testing.assert_allclose(reg.shift(mov).shift, shift, atol=1e-9)
    back, _ = registration.register_translation(mov, ref, window=None)
    np.testing.assert_allclose(back, [-3.25, 5.5], atol=0.01)


@pytest.mark.parametrize("speed", [0.1, 0.5, 1.0])
def test_registration_accuracy_drift_series(speed):
    """Per-frame RMS error <= 0.05 px at 1,000 counts/atom for linear drift 0.1-1 px/frame + random walk."""
    rng = np.random.default_rng(int(speed * 10))
    ang = rng.uniform(0, 2 * np.pi)
    v = speed * np.array([np.sin(ang), np.cos(ang)])
    frames, _, truth = drifting_series(rng, 10, v, vacancies=metal_vacancies(rng), continuous=False)
    reg = registration.Registrator(frames[0])
    measured = np.array([reg.shift(f).shift for f in frames])
    err = rms(measured[1:] - truth[1:])
    assert err <= 0.05, f"registration RMS error {err:.4f} px (limit 0.05) at drift {speed} px/frame"
    np.testing.assert_allclose(measured[0], 0.0, atol=1e-6)


def test_integer_peak_choice_on_lattice():
    """Half-pixel shifts on a perfect lattice: the true correlation peak, not a lattice-vector neighbour."""
    ref = render_lattice()
    for s in ([0.5, 0.0], [0.0, 0.5], [0.5, -0.5], [-2.5, 3.5]):
        shift, _ = registration.register_translation(ref, render_lattice(SHAPE, s))
        np.testing.assert_allclose(shift, s, atol=0.01, err_msg=f"truth {s}, measured {shift}")


@pytest.mark.parametrize("refine", ["newton", "upsampled", "parabola"])
def test_refine_methods(refine):
    rng = np.random.default_rng(3)
    ref = rng.poisson(render_lattice()).astype(float)
    truth = np.array([1.37, -0.62])
    mov = rng.poisson(render_lattice(SHAPE, truth)).astype(float)
    shift, _ = registration.register_translation(ref, mov, refine=refine)
    tol = {"newton": 0.03, "upsampled": 0.03, "parabola": 0.06}[refine]
    assert np.max(np.abs(shift - truth)) <= tol, f"{refine}: {shift} vs {truth}"


def test_agrees_with_skimage_unnormalised():
    """Same preprocessing as skimage phase_cross_correlation(normalization=None): same shift (sign flipped)."""
    skreg = pytest.importorskip("skimage.registration")
    import scipy.ndimage as ndi

    rng = np.random.default_rng(4)
    w = np.outer(np.hanning(SHAPE[0]), np.hanning(SHAPE[1]))
    # a perfect lattice is ambiguous for skimage's integer peak search (it may pick a lattice-vector neighbour), so
    # add a smooth, periodic (hence exactly Fourier-shiftable) amorphous background that breaks the periodicity
    field = ndi.gaussian_filter(rng.normal(size=SHAPE), 6, mode="wrap")
    field *= 10.0 / field.std()

    def sample(s):
        amorphous = np.fft.ifft2(ndi.fourier_shift(np.fft.fft2(field), s)).real
        return rng.poisson(np.clip(render_lattice(SHAPE, s) + amorphous + 20.0, 0, None)).astype(float)

    ref = sample((0.0, 0.0))
    ref_p = (ref - np.average(ref, weights=w)) * w
    for s in ([0.2, -0.3], [1.1, 0.25], [-2.9, 2.2], [0.5, -0.5]):
        mov = sample(s)
        ours, _ = registration.register_translation(ref, mov, window="hann")
        sk = -skreg.phase_cross_correlation(
            ref_p, (mov - np.average(mov, weights=w)) * w, upsample_factor=100, normalization=None
        )[0]
        assert np.max(np.abs(ours - sk)) <= 0.02, f"truth {s}: ours {ours}, skimage {sk}"
        assert np.max(np.abs(ours - s)) <= 0.05


def test_search_radius_restricts_peak():
    rng = np.random.default_rng(5)
    ref = rng.poisson(render_lattice()).astype(float)
    mov = rng.poisson(render_lattice(SHAPE, (0.3, 0.4))).astype(float)
    # a window around a lattice-equivalent position finds that peak, not the global one
    a1 = PERIOD * np.array([np.sin(np.deg2rad(12.0)), np.cos(np.deg2rad(12.0))])
    shift, _ = registration.register_translation(ref, mov, expected=(0.3, 0.4) + a1, max_shift=3)
    np.testing.assert_allclose(shift, np.array([0.3, 0.4]) + a1, atol=0.1)
    shift, _ = registration.register_translation(ref, mov, expected=(0.0, 0.0), max_shift=3)
    np.testing.assert_allclose(shift, [0.3, 0.4], atol=0.03)


def test_input_errors():
    a = np.ones((64, 64))
    with pytest.raises(ValueError, match="same shape"):
        registration.register_translation(a, np.ones((64, 32)))
    with pytest.raises(ValueError, match="2-D"):
        registration.register_translation(np.ones((2, 64, 64)), np.ones((2, 64, 64)))
    with pytest.raises(ValueError, match="2-D"):
        registration.Registrator(np.ones(64))
    with pytest.raises(ValueError, match="shape"):
        registration.Registrator(a).shift(np.ones((32, 64)))
    with pytest.raises(TypeError, match="real"):
        registration.register_translation(a + 0j, a)
    with pytest.raises(ValueError, match="refine"):
        registration.Registrator(a, refine="bogus")
    with pytest.raises(ValueError, match=r"\(n, ny, nx\)"):
        drift.align_and_sum(a)
    with pytest.raises(ValueError, match="t_start_s"):
        drift.align_and_sum(np.ones((3, 64, 64)), t_start_s=[0.0, 1.0])
    with pytest.raises(ValueError, match="drift must have shape"):
        scan_distortion.correct_scan_distortion(a, np.zeros((10, 2)))
    with pytest.raises(ValueError, match="shifts"):
        drift_trajectory.fit_drift_trajectory([0, 1, 2], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="model"):
        drift_trajectory.fit_drift_trajectory([0, 1], np.zeros((2, 2)), model="cubic")
    acc = drift.TiltAccumulator(a)
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.ones((64, 65)))


# ----------------------------------------------------------------------------------------------------------------
# trajectory
# ----------------------------------------------------------------------------------------------------------------


def test_fit_drift_trajectory_robust_to_unit_cell_jump():
    rng = np.random.default_rng(6)
    t = np.arange(10.0)
    v = np.array([0.4, -0.7])
    shifts = t[:, None] * v + rng.normal(0, 0.02, (10, 2))
    shifts[0] = 0
    shifts[6] += [9.4, 3.1]  # a whole-unit-cell registration jump
    traj = drift_trajectory.fit_drift_trajectory(t, shifts)
    np.testing.assert_allclose(traj.velocity, v, atol=0.02)
    assert not traj.inliers[6] and traj.inliers.sum() == 9
    assert traj.residual_rms < 0.05, traj.residual_rms
    np.testing.assert_allclose(traj(6.0), 6 * v, atol=0.08)
    assert traj(t).shape == (10, 2)
    # plain least squares is pulled off by the jump
    plain = drift_trajectory.fit_drift_trajectory(t, shifts, robust=False)
    assert np.max(np.abs(plain.velocity - v)) > 0.05
    # one point: constant
    one = drift_trajectory.fit_drift_trajectory([0.0], np.zeros((1, 2)))
    np.testing.assert_allclose(one.velocity, 0.0)


def test_fit_drift_trajectory_of_a_long_tilt_starts_from_a_subsample_and_stays_robust():
    # 2,000 frames of one tilt: the Theil-Sen start uses 256 evenly spaced points (all pairs were O(n^2) per
    # frame), the IRLS all of them; 10% unit-cell jumps (a third of them in one block) still get zero weight
    rng = np.random.default_rng(7)
    n = 2000
    t = np.arange(float(n))
    v = np.array([0.004, -0.007])
    shifts = t[:, None] * v + rng.normal(0, 0.02, (n, 2))
    jumps = np.concatenate([rng.choice(np.arange(1, 1400), 133, replace=False), np.arange(1500, 1567)])
    shifts[jumps] += [9.4, 3.1]
    assert drift_trajectory.THEIL_SEN_POINTS < n
    traj = drift_trajectory.fit_drift_trajectory(t, shifts)
    np.testing.assert_allclose(traj.velocity, v, atol=2e-5)  # noise 0.02 px over 2,000 frames: ~1e-6 px/frame
    assert not traj.inliers[jumps].any()
    assert traj.inliers.sum() >= n - jumps.size - 10  # Tukey weights: at most a few noise tails cut


# ----------------------------------------------------------------------------------------------------------------
# scan distortion
# ----------------------------------------------------------------------------------------------------------------


def test_correct_scan_distortion_against_ground_truth():
    ny = SHAPE[0]
    rate = np.array([3.0, -4.0]) / ny  # px per row (3 and 4 px over the frame)
    r0 = 0.5 * (ny - 1)
    disp = (np.arange(ny) - r0)[:, None] * rate
    truth = render_lattice()  # the undistorted lattice (displacement 0 at the centre row)
    distorted = render_lattice(SHAPE, disp)
    corrected, valid = scan_distortion.correct_scan_distortion(distorted, rate, return_valid=True)
    inner = np.zeros(SHAPE, bool)
    inner[8:-8, 8:-8] = True
    assert valid[inner].all()
    before = np.sqrt(np.mean((distorted - truth)[inner] ** 2))
    after = np.sqrt(np.mean((corrected - truth)[inner] ** 2))
    assert after < 0.1 * before, f"RMS error vs ground truth: {before:.2f} before, {after:.2f} after correction"
    # per-row displacement form gives the same
    np.testing.assert_allclose(scan_distortion.correct_scan_distortion(distorted, disp)[inner], corrected[inner],
                               atol=1e-3)
    # order=1 works too (less accurate)
    lin = scan_distortion.correct_scan_distortion(distorted, rate, order=1)
    assert np.sqrt(np.mean((lin - truth)[inner] ** 2)) < 0.5 * before


def test_correct_scan_distortion_matches_map_coordinates():
    import scipy.ndimage as ndi

    rng = np.random.default_rng(7)
    img = rng.random((64, 80))
    disp = np.c_[np.linspace(-0.5, 0.7, 64), np.linspace(1.3, -2.1, 64)]
    out = scan_distortion.correct_scan_distortion(img, disp, cval=0.0)
    rows = np.arange(64.0)
    src_r = np.interp(rows, rows - disp[:, 0], rows)
    src_c = np.arange(80.0)[None, :] + np.interp(src_r, rows, disp[:, 1])[:, None]
    ref = ndi.map_coordinates(img, [np.broadcast_to(src_r[:, None], (64, 80)), src_c], order=3, mode="nearest")
    np.testing.assert_allclose(out[12:-12, 12:-12], ref[12:-12, 12:-12], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# align and sum
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_series():
    rng = np.random.default_rng(8)
    v = np.array([0.6, -0.8])  # px per frame, 1 px/frame total, acting within frames too
    vac = metal_vacancies(rng)
    frames, disp, truth = drifting_series(rng, 10, v, walk=0.02, vacancies=vac)
    return frames, disp, truth, v, vac


def test_align_and_sum_series(drift_series):
    frames, disp, truth, v, vac = drift_series
    res = drift.align_and_sum(frames)
    assert res.sum.shape == SHAPE and res.shifts.shape == (10, 2) and res.fitted.shape == (10, 2)
    err = rms(res.shifts[1:] - truth[1:])
    assert err <= 0.05, f"registration RMS error {err:.4f} px"
    np.testing.assert_allclose(res.trajectory.velocity, v, atol=0.05)  # time unit: one frame
    assert res.residual_rms < 0.1
    np.testing.assert_allclose(res.fitted[0], 0.0, atol=1e-9)

    # sharper than the plain sum
    s_plain = drift.sharpness(frames.sum(0), PERIOD)
    s_aligned = drift.sharpness(res.sum, PERIOD)
    assert s_aligned > 1.5 * s_plain, f"sharpness plain {s_plain:.4f}, aligned {s_aligned:.4f}"

    # closer to the ground truth (10x the undistorted lattice about frame 0's centre row), and the scan-distortion
    # correction helps beyond translation alone
    truth_img = 10 * render_lattice(SHAPE, _centre(disp[0]), vacancies=vac)
    shift_only = drift.align_and_sum(frames, correct_distortion=False)
    inner = (slice(16, -16), slice(16, -16))

    def err_img(img):
        return float(np.sqrt(np.mean((img - truth_img)[inner] ** 2)) / np.mean(truth_img[inner]))

    e_plain, e_shift, e_full = err_img(frames.sum(0)), err_img(shift_only.sum), err_img(res.sum)
    msg = f"relative RMS error vs truth: plain {e_plain:.3f}, shift-only {e_shift:.3f}, shift+distortion {e_full:.3f}"
    assert e_full < e_shift < e_plain, msg
    assert np.all(res.coverage[inner] == 10)


def _centre(d):
    c = (len(d) - 1) // 2
    return 0.5 * (d[c] + d[c + 1]) if len(d) % 2 == 0 else d[c]


def test_tilt_accumulator_matches_batch(drift_series):
    frames = drift_series[0]
    batch = drift.align_and_sum(frames)
    acc = drift.TiltAccumulator(frames[0])
    for f in frames[1:]:
        shift, quality = acc.add(f)
        assert 0.0 < quality <= 1.0
    assert acc.n_frames == 10
    live = acc.result()
    np.testing.assert_allclose(live.shifts, batch.shifts, atol=1e-9)
    np.testing.assert_allclose(live.sum, batch.sum, rtol=1e-5, atol=1e-3)
    # the preview (corrected with the trajectory known at the time) is close to the final sum
    prev = acc.preview()
    inner = (slice(16, -16), slice(16, -16))
    rel = np.sqrt(np.mean((prev - live.sum)[inner] ** 2)) / np.mean(live.sum[inner])
    assert rel < 0.05, f"preview differs from the final sum by {rel:.3f} (relative RMS)"


def test_timing_with_dwell_and_gaps():
    """Frames with pauses between them: the drift rate in px/s and row timing from dwell/flyback."""
    rng = np.random.default_rng(9)
    ny, nx = 128, 128
    dwell_us, flyback_us = 4.0, 20.0
    lt = scan_distortion.line_time(nx, dwell_us=dwell_us, flyback_us=flyback_us)
    t_start = np.array([0.0, 0.2, 0.4, 0.6, 0.8])  # 0.068 s frames every 0.2 s
    v = np.array([2.0, -1.5])  # px/s
    frames = []
    for t0 in t_start:
        d = (t0 + np.arange(ny) * lt)[:, None] * v
        frames.append(rng.poisson(render_lattice((ny, nx), d)).astype(np.float32))
    res = drift.align_and_sum(np.array(frames), t_start_s=t_start, dwell_us=dwell_us, flyback_us=flyback_us)
    np.testing.assert_allclose(res.trajectory.velocity, v, atol=0.1)
    np.testing.assert_allclose(res.shifts, (t_start - t_start[0])[:, None] * v, atol=0.05)


def test_sharpness_metric():
    rng = np.random.default_rng(10)
    img = rng.poisson(render_lattice()).astype(float)
    blurred = sum(rng.poisson(render_lattice(SHAPE, s)).astype(float) for s in rng.normal(0, 1.5, (5, 2)))
    sharp = sum(rng.poisson(render_lattice()).astype(float) for _ in range(5))
    assert drift.sharpness(sharp, PERIOD) > 1.3 * drift.sharpness(blurred, PERIOD)
    assert drift.sharpness(10 * img) == pytest.approx(drift.sharpness(img))


# ----------------------------------------------------------------------------------------------------------------
# integration with the physical simulator
# ----------------------------------------------------------------------------------------------------------------


def test_align_and_sum_on_simulated_haadf_frames():
    """Frames from stemlive.simulators.haadf with the default scenario's drift: shifts vs its ground truth."""
    scenario_mod = pytest.importorskip("stemlive.simulators.scenario")
    haadf = pytest.importorskip("stemlive.simulators.haadf")
    sc = scenario_mod.load_scenario("default")
    sim = haadf.HAADFSimulator(sc)
    p = sc.haadf
    shape = (256, 256)
    fov = p.fov_nm * shape[0] / p.shape_px[0]  # keep the reference pixel size (0.32 A)
    frames, truths, t0 = [], [], 0.0
    for _ in range(6):
        img, tr = sim.render_frame(
            alpha_deg=0.0, beta_deg=0.0, shape=shape, fov_nm=fov, dwell_us=p.dwell_us, t_start_s=t0
        )
        frames.append(img)
        truths.append(tr)
        t0 = tr.t_end_s
    t_start = np.array([tr.t_start_s for tr in truths])
    res = drift.align_and_sum(np.array(frames), t_start_s=t_start, dwell_us=p.dwell_us, flyback_us=truths[0].flyback_us)
    truth = np.array([tr.mean_drift_px for tr in truths])
    truth -= truth[0]
    err = rms(res.shifts[1:] - truth[1:])
    assert err <= 0.05, f"RMS error {err:.4f} px vs simulator truth; measured {res.shifts}, truth {truth}"
    v_true = np.polyfit(t_start, truth, 1)[0]
    np.testing.assert_allclose(res.trajectory.velocity, v_true, atol=0.05 * np.hypot(*v_true) + 0.01)
    assert drift.sharpness(res.sum) >= drift.sharpness(np.sum(frames, axis=0))
