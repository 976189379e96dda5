"""Tomography hand-off: geometry conventions, EMD/GENFIRE export, alignment and the reference reconstruction."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from commands import STEMLIVE
from scipy import ndimage

from stemlive.live.analysis import reconstruct as rc
from stemlive.live.apps import tomo

REFERENCE = Path("/work/shared/reference/tilt_series_mos2_wse2.json")
_REF_ROWS = [  # (alpha, beta, Z, Y, X) from reference/tilt_series_mos2_wse2.json, table S1
    (0.0, 0.0, 0.3, 1.1, -2.0), (-14.3, -22.9, 0.2, -14.5, 15.9), (-14.3, 17.1, 0.4, -8.3, 8.4),
    (20.1, 17.1, 0.3, -0.7, 0.1), (20.1, -20.1, -0.3, 12.5, -12.2), (12.6, -12.6, -0.6, 19.5, -18.4),
    (12.6, 12.6, -1.0, 24.2, -24.8), (-12.6, 12.6, 0.0, 26.5, 7.8), (-12.6, -12.6, 0.2, 24.5, 20.7),
    (-6.3, -6.3, 0.3, 19.8, 0.7), (-6.3, 6.3, 0.1, 19.9, 11.8), (6.3, 6.3, 0.4, 13.8, 3.6),
]  # fmt: skip


def reference_table() -> np.ndarray:
    """(12, 5) nominal alpha, beta and calibrated Z, Y, X; from the shared file when present."""
    if REFERENCE.exists():
        rows = json.loads(REFERENCE.read_text())["tilts"]["rows"]
        return np.array(rows, float)[:, 1:]
    return np.array(_REF_ROWS, float)


def genfire_matrix(phi: float, theta: float, psi: float) -> np.ndarray:
    """The matrix GENFIRE-Python builds from (phi, theta, psi) (degrees) before transposing it (copied formula)."""
    p, t, s = np.radians([phi, theta, psi])
    c, n = np.cos, np.sin
    return np.array([
        [c(s) * c(t) * c(p) - n(s) * n(p), c(s) * c(t) * n(p) + n(s) * c(p), -c(s) * n(t)],
        [-n(s) * c(t) * c(p) - c(s) * n(p), -n(s) * c(t) * n(p) + c(s) * c(p), n(s) * n(t)],
        [n(t) * c(p), n(t) * n(p), c(t)],
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------------ geometry
def test_stage_axes_follow_reference():
    # alpha about [0 -1 0]: +90 deg takes the sample x axis to +z; beta about [-1 0 0]: +90 takes y to -z
    np.testing.assert_allclose(rc.stage_rotation(90.0, 0.0) @ [1, 0, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(rc.stage_rotation(0.0, 90.0) @ [0, 1, 0], [0, 0, -1], atol=1e-12)
    # beta is the inner axis: it is carried by alpha
    np.testing.assert_allclose(
        rc.stage_rotation(30.0, 20.0), rc.axis_angle_matrix([0, -1, 0], 30) @ rc.axis_angle_matrix([-1, 0, 0], 20)
    )
    np.testing.assert_allclose(rc.stage_rotation(0.0, 0.0), np.eye(3), atol=1e-15)


def test_euler_zyz_reproduces_stage_rotation():
    rng = np.random.default_rng(1)
    alpha, beta = rng.uniform(-70, 70, 200), rng.uniform(-70, 70, 200)
    r = rc.stage_rotation(alpha, beta)
    e = rc.stage_to_euler_zyz(alpha, beta)
    np.testing.assert_allclose(rc.euler_zyz_to_matrix(e), r, atol=1e-12)
    assert np.all((e[:, 1] >= 0) & (e[:, 1] <= 180))
    # theta is the total tilt = angle between the beam and the sample normal
    d = rc.projection_direction(alpha, beta)
    np.testing.assert_allclose(np.degrees(np.arccos(d[:, 2])), e[:, 1], atol=1e-9)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", r, d), np.tile([0, 0, 1.0], (200, 1)), atol=1e-12)
    # degenerate theta = 0 and 180
    for m in (rc.rot_z(33.0), rc.rot_z(20.0) @ rc.rot_y(180.0)):
        np.testing.assert_allclose(rc.euler_zyz_to_matrix(rc.matrix_to_euler_zyz(m)), m, atol=1e-12)


def test_genfire_euler_maps_atoms_like_the_stage():
    """Projected atom positions with GENFIRE's own matrix equal the stage projection in (ny, nx, n) stacks."""
    t = reference_table()
    euler = rc.stage_to_genfire_euler(t[:, 0], t[:, 1])
    atoms = np.random.default_rng(2).uniform(-10, 10, (50, 3))  # (x, y, z) sample frame
    for (a, b), e in zip(t[:, :2], euler, strict=True):
        lab = atoms @ rc.stage_rotation(a, b).T  # (x, y, z) lab
        r_g = genfire_matrix(*e).T  # GENFIRE: object = R_G @ detector, R_G = M.T
        det = atoms[:, [1, 0, 2]] @ r_g  # rows: R_G.T @ (y, x, z) = detector (axis0, axis1, depth)
        np.testing.assert_allclose(det[:, 0], lab[:, 1], atol=1e-9)  # stack axis 0 = image y
        np.testing.assert_allclose(det[:, 1], lab[:, 0], atol=1e-9)  # stack axis 1 = image x
    np.testing.assert_allclose(rc.genfire_euler_to_rotation(euler), rc.stage_rotation(t[:, 0], t[:, 1]), atol=1e-12)


def test_matches_simulator_stage_convention():
    stage = pytest.importorskip("stemlive.simulators.stage")
    for a, b in reference_table()[:, :2]:
        np.testing.assert_allclose(rc.stage_rotation(a, b), stage.rotation_matrix(a, b), atol=1e-12)
        # the simulator's reference-style ZYX angles describe the same rotation: Z = 0, Y = -alpha, X = -beta
        z, y, x = stage.to_euler_zyx_deg(rc.stage_rotation(a, b))
        assert (z, y, x) == pytest.approx((0.0, -a, -b), abs=1e-9)


def test_reference_table_angular_coverage():
    """Nominal angles (our convention) and the calibrated Z, Y, X angles span the same set of directions.

    Row by row they do not agree (stage hysteresis, refined frame: pairwise-angle correlation only ~0.24), but the
    mean angle between beam directions of all pairs of tilts matches within 1.5 deg (25.2 vs 24.3 deg).
    """
    t = reference_table()
    d_nom = rc.projection_direction(t[:, 0], t[:, 1])
    z, y, x = np.radians(t[:, 2:]).T
    r_cal = rc.rot_z(np.degrees(z)) @ rc.rot_y(np.degrees(y)) @ rc.axis_angle_matrix([1, 0, 0], np.degrees(x))
    d_cal = np.swapaxes(r_cal, 1, 2)[:, :, 2]
    iu = np.triu_indices(len(t), 1)
    pair = lambda d: np.degrees(np.arccos(np.clip(d @ d.T, -1, 1)))[iu]  # noqa: E731
    assert pair(d_nom).mean() == pytest.approx(pair(d_cal).mean(), abs=1.5)
    # total tilt: cos(theta) = cos(alpha) cos(beta); the largest is row 5 (20.1, -20.1): 28.1 deg
    theta = rc.stage_to_euler_zyz(t[:, 0], t[:, 1])[:, 1]
    np.testing.assert_allclose(np.cos(np.radians(theta)), np.cos(np.radians(t[:, 0])) * np.cos(np.radians(t[:, 1])))
    assert theta.max() == pytest.approx(28.13, abs=0.01)


# ------------------------------------------------------------------------------------------------ fixtures
def blob_projection(pos_vox: np.ndarray, amp: np.ndarray, rot: np.ndarray, shape_yx: tuple[int, int], sigma: float):
    """Analytic projection of 3-D Gaussians (independent of the SIRT projector): centres at (R p)_xy."""
    ny, nx = shape_yx
    lab = pos_vox @ rot.T
    yy, xx = np.arange(ny) - ny // 2, np.arange(nx) - nx // 2
    gy = np.exp(-((yy[None, :] - lab[:, 1:2]) ** 2) / (2 * sigma**2))  # (m, ny)
    gx = np.exp(-((xx[None, :] - lab[:, 0:1]) ** 2) / (2 * sigma**2))  # (m, nx)
    return np.einsum("m,my,mx->yx", amp * np.sqrt(2 * np.pi) * sigma, gy, gx).astype(np.float32)


def render_volume(pos_vox: np.ndarray, amp: np.ndarray, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Gaussian blobs sampled at voxel centres, ``(z, y, x)``, origin at ``n // 2``."""
    axes = [np.arange(n) - n // 2 for n in shape]
    g = [
        np.exp(-((ax[None, :] - pos_vox[:, k : k + 1]) ** 2) / (2 * sigma**2))
        for ax, k in zip(axes, (2, 1, 0), strict=True)
    ]
    return np.einsum("m,mz,my,mx->zyx", amp, *g).astype(np.float32)


def write_session(path: Path, sums: np.ndarray | None, alpha, beta, *, kind: str = "tilt_series") -> Path:
    """Minimal session file v1 with the names the tomography export reads."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format="stemlive-session", format_version=1, session_id="tomo-test", kind=kind,
                       status="complete", created="2024-01-01T00:00:00Z")  # fmt: skip
        frames = f.create_dataset("tilt_series/frames", data=np.zeros((1, 4, 4), np.float32))
        frames.attrs["pixel_size_nm"] = 0.032
        frames.attrs["dwell_us"] = 4.0
        if sums is not None:
            f["results/tilt_series/sums"] = sums
        f["results/tilt_series/tilt_alpha_deg"] = np.asarray(alpha, float)
        f["results/tilt_series/tilt_beta_deg"] = np.asarray(beta, float)
    return path


@pytest.fixture(scope="module")
def cluster():
    """A compact cluster of blobs projected at the 12 reference tilts: (projections, rotations, alpha, beta)."""
    t = reference_table()
    rng = np.random.default_rng(3)
    pos = rng.normal(0, 5.0, (40, 3)) * [1, 1, 0.4]
    pos -= pos.mean(axis=0)  # centre of mass at the rotation centre
    rots = rc.stage_rotation(t[:, 0], t[:, 1])
    proj = np.stack([blob_projection(pos, np.ones(40), r, (64, 64), 1.2) for r in rots])
    return proj, rots, t[:, 0], t[:, 1]


@pytest.fixture(scope="module")
def heterojunction():
    """Simulated MoS2|WSe2 flake: atoms (voxel units), true volume and noisy analytic projections at 12 tilts."""
    vox_A, sigma_A, shape = 0.5, 0.5, (32, 64, 64)
    try:
        from stemlive.simulators.sample import Heterojunction

        atoms = Heterojunction(extent_x_nm=2.2, extent_y_nm=2.2, seed=0).atoms()
        pos_A, species = np.asarray(atoms.positions_A), np.asarray(atoms.species)
        z_num = np.asarray(atoms.Z, float)
    except ImportError:  # fallback lattice: flat 1H MoS2 | WSe2, interface at x = 0
        rows = []
        for a, metal, chal, h, zm, zc, side in (
            (3.165, "Mo", "S", 1.56, 42, 16, -1),
            (3.34, "W", "Se", 1.67, 74, 34, 1),
        ):
            ij = np.mgrid[-5:6, -5:6].reshape(2, -1).T @ np.array([[a, 0], [a / 2, a * np.sqrt(3) / 2]])
            for off, sp, zz, zn in (((0, 0), metal, (0.0,), zm), ((a / 2, a / (2 * np.sqrt(3))), chal, (-h, h), zc)):
                p = ij + off
                keep = (np.abs(p) < 11).all(1) & (np.sign(p[:, 0] + 1e-9) == side)
                rows += [(x, y, z, sp, zn) for x, y in p[keep] for z in zz]
        pos_A = np.array([r[:3] for r in rows])
        species, z_num = np.array([r[3] for r in rows]), np.array([r[4] for r in rows], float)
    amp = z_num**1.7 / 74**1.7
    pos = pos_A / vox_A
    sigma = sigma_A / vox_A
    truth = render_volume(pos, amp, shape, sigma)
    t = reference_table()
    rots = rc.stage_rotation(t[:, 0], t[:, 1])  # nominal angles of the reference table
    clean = np.stack([blob_projection(pos, amp, r, shape[1:], sigma) for r in rots])
    noisy = clean + np.random.default_rng(0).normal(0, 0.02 * clean.max(), clean.shape).astype(np.float32)
    return {"pos": pos, "species": species, "truth": truth, "proj": noisy, "rots": rots, "shape": shape}


# ------------------------------------------------------------------------------------------------ export
def test_export_emd_and_genfire(tmp_path, cluster):
    ncempy_emd = pytest.importorskip("ncempy.io.emd")
    import ncempy.io

    proj, rots, alpha, beta = cluster
    session = write_session(tmp_path / "s1.h5", proj, alpha, beta)
    paths = tomo.export(session, tmp_path / "out", align="com")
    assert set(paths) == {"emd", "genfire_projections", "genfire_angles", "astra_vectors"}
    np.testing.assert_allclose(np.loadtxt(paths["astra_vectors"]), tomo.astra_parallel3d_vec(rots, (64, 64, 64)),
                               atol=1e-8)

    with ncempy_emd.fileEMD(paths["emd"]) as emd:
        assert emd.version == (0, 2)
        data, dims = emd.get_emdgroup(emd.list_emds[0])
        assert data.shape == (12, 64, 64)
        assert [d[1] for d in dims] == ["angles", "x", "y"]  # Tomviz layout: images transposed
        assert [d[2] for d in dims] == ["[deg]", "[n_m]", "[n_m]"]
        np.testing.assert_allclose(dims[0][0], alpha, atol=1e-5)  # float32 dims, as Tomviz requires
        assert dims[1][0][1] - dims[1][0][0] == pytest.approx(0.032, rel=1e-5)
    d = ncempy.io.read(paths["emd"])
    assert d["data"].shape == (12, 64, 64)
    with h5py.File(paths["emd"], "r") as f:
        g = f["data/tomography"]
        assert f.attrs["version_major"] == 0 and f.attrs["version_minor"] == 2 and g.attrs["emd_group_type"] == 1
        np.testing.assert_allclose(g["beta_deg"][()], beta)
        assert g["euler_zyz_deg"].shape == (12, 3)
        np.testing.assert_allclose(g["euler_zyz_deg"][()], rc.stage_to_genfire_euler(alpha, beta))

    stack = np.load(paths["genfire_projections"])
    euler = np.loadtxt(paths["genfire_angles"])
    assert stack.shape == (64, 64, 12) and stack.dtype == np.float32
    assert euler.shape == (12, 3)
    np.testing.assert_allclose(stack[:, :, 4], d["data"][4].T)
    np.testing.assert_allclose(euler, rc.stage_to_genfire_euler(alpha, beta), atol=1e-5)


def test_export_crops_genfire_stack_to_square(tmp_path, cluster):
    proj, _, alpha, beta = cluster
    session = write_session(tmp_path / "rect.h5", proj[:, 8:56, :], alpha, beta)
    paths = tomo.export(session, tmp_path, align="none")
    assert np.load(paths["genfire_projections"]).shape == (48, 48, 12)


def test_angles_override_from_truth_json(tmp_path, cluster):
    proj, _, alpha, beta = cluster
    session = write_session(tmp_path / "s2.h5", proj, alpha, beta)
    actual = alpha + 0.7
    records = [
        {"index": i, "nominal_alpha_deg": a, "nominal_beta_deg": b, "actual_alpha_deg": aa, "actual_beta_deg": b - 0.4}
        for i, (a, b, aa) in enumerate(zip(alpha, beta, actual, strict=True))
    ]
    truth = {"format": "stemlive-truth", "format_version": 1, "meta": {}, "records": {"tilt": records[::-1]}}
    (tmp_path / "s2.truth.json").write_text(json.dumps(truth))
    series = tomo.read_tilt_series(session, angles=tmp_path / "s2.truth.json")
    np.testing.assert_allclose(series.alpha_deg, actual)
    np.testing.assert_allclose(series.beta_deg, beta - 0.4)
    np.savetxt(tmp_path / "angles.txt", np.c_[alpha, beta + 1])
    assert tomo.read_tilt_series(session, angles=tmp_path / "angles.txt").beta_deg == pytest.approx(beta + 1)
    with pytest.raises(tomo.TomoInputError, match="11 tilt angles for 12"):
        np.savetxt(tmp_path / "short.txt", np.c_[alpha, beta][:11])
        tomo.read_tilt_series(session, angles=tmp_path / "short.txt")


def test_clear_errors(tmp_path, cluster):
    proj, _, alpha, beta = cluster
    with pytest.raises(tomo.TomoInputError, match="no /results/tilt_series/sums"):
        tomo.export(write_session(tmp_path / "nosums.h5", None, alpha, beta), tmp_path)
    with pytest.raises(tomo.TomoInputError, match="'eels_line_scan', not 'tilt_series'"):
        tomo.export(write_session(tmp_path / "eels.h5", proj, alpha, beta, kind="eels_line_scan"), tmp_path)
    with pytest.raises(ValueError, match="align must be one of"):
        tomo.export(write_session(tmp_path / "ok.h5", proj, alpha, beta), tmp_path, align="bogus")


# ------------------------------------------------------------------------------------------------ alignment
@pytest.mark.parametrize("method", ["com", "cross_correlation"])
def test_alignment_recovers_known_shifts(cluster, method):
    proj, rots, _, _ = cluster
    rng = np.random.default_rng(4)
    true = rng.uniform(-4, 4, (len(proj), 2))
    shifted = np.stack([ndimage.shift(p, s, order=3, mode="constant") for p, s in zip(proj, true, strict=True)])
    directions = np.swapaxes(rots, 1, 2)[:, :, 2]
    aligned, shifts = rc.align_tilt_series(shifted, method, directions)
    # shifts applied must undo the known ones (com: absolutely; cross-correlation: up to a common offset < 0.5 px)
    err = shifts + true
    if method == "cross_correlation":
        assert np.abs(err - err.mean(axis=0)).max() < 0.3
        assert np.abs(err.mean(axis=0)).max() < 0.5
    else:
        assert np.abs(err).max() < 0.2
    assert rc.pearson(aligned, proj) > 0.99


def test_cross_correlation_shift_subpixel():
    img = ndimage.gaussian_filter(np.random.default_rng(5).random((64, 64)), 2)
    moved = ndimage.shift(img, (2.3, -5.6), order=3, mode="wrap")
    assert rc.cross_correlation_shift(img, moved) == pytest.approx([-2.3, 5.6], abs=0.05)


# ------------------------------------------------------------------------------------------------ reconstruction
def test_projector_matches_analytic_projection(heterojunction):
    h = heterojunction
    p = rc.project(h["truth"], h["rots"][4])
    assert rc.pearson(p, h["proj"][4]) > 0.98


def test_must_show_heterojunction_reconstruction(tmp_path, heterojunction):
    """12 double-tilt projections at the reference's nominal angles -> SIRT volume vs the true volume.

    Measured (2-core machine): Pearson r = 0.77 at 40 iterations (0.73 at 20), ~12 s; metal sites ~6x background.
    """
    h = heterojunction
    t0 = time.perf_counter()
    log = []
    vol = rc.reconstruct_sirt(
        h["proj"], h["rots"], n_iter=30, shape_zyx=h["shape"], progress=lambda i, n, e: log.append(e)
    )
    elapsed = time.perf_counter() - t0
    r = rc.pearson(vol, h["truth"])
    print(f"SIRT 12 x 64^2 -> {h['shape']}: {elapsed:.1f} s, Pearson r = {r:.3f}, residual {log[-1]:.3f}")
    assert len(log) == 30 and log[-1] < log[0]
    assert r > 0.7

    # slice through the metal plane: atomic columns at the true metal sites
    nz, ny, nx = h["shape"]
    pos = h["pos"]
    metal = np.isin(h["species"], ["Mo", "W"])
    z_metal = int(round(np.median(pos[metal, 2]))) + nz // 2
    sl = vol[z_metal]
    site_y, site_x = pos[:, 1] + ny // 2, pos[:, 0] + nx // 2
    at_metal = ndimage.map_coordinates(sl, [site_y[metal], site_x[metal]], order=1)
    yy, xx = np.mgrid[:ny, :nx]
    dist = np.min(np.hypot(yy[..., None] - site_y, xx[..., None] - site_x), axis=-1)
    inside = (yy > site_y.min()) & (yy < site_y.max()) & (xx > site_x.min()) & (xx < site_x.max())
    bg = sl[inside & (dist > 2.4)]  # > 1.2 A from every atom column
    print(f"slice z={z_metal}: metal sites {at_metal.mean():.3f}, background {bg.mean():.4f} +- {bg.std():.4f}")
    assert at_metal.mean() > 10 * bg.mean() + 5 * bg.std()
    assert np.mean(at_metal > bg.mean() + 3 * bg.std()) > 0.9

    png = tomo.save_slices_png(
        vol, tmp_path / "heterojunction_slices.png", z_index=z_metal, voxel_size_nm=0.05,
        title=f"SIRT, 12 tilts, r = {r:.2f}", marks_yx=np.c_[site_y[metal], site_x[metal]],
    )  # fmt: skip
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_windowed_matches_full_reconstruction(cluster):
    proj, rots, _, _ = cluster
    full = rc.reconstruct_sirt(proj[:, 8:56, 8:56], rots, n_iter=5, shape_zyx=(24, 48, 48))
    win = rc.reconstruct_windowed(proj[:, 8:56, 8:56], rots, window=32, step=16, nz=24, n_iter=5)
    assert win.shape == full.shape
    assert rc.pearson(win, full) > 0.9
    assert rc.window_origins(100, 60, 30) == [0, 30, 40]


def test_reconstruct_from_export_writes_volume(tmp_path, cluster):
    proj, _, alpha, beta = cluster
    session = write_session(tmp_path / "s3.h5", proj[:, 16:48, 16:48], alpha, beta)
    emd = tomo.export(session, tmp_path, align="none")["emd"]
    paths = tomo.reconstruct(emd, tmp_path / "rec", n_iter=3, thickness_px=16)
    assert paths["volume"].name == "s3_reconstruction.emd" and paths["png"].exists()
    import ncempy.io

    vol = ncempy.io.read(paths["volume"])
    assert vol["data"].shape == (32, 16, 32)  # (y, z, x): Tomviz's (X, Y, Z), see write_emd_volume
    assert vol["pixelUnit"] == ["[n_m]"] * 3
    # directly from the session gives the same volume (no alignment)
    again = tomo.reconstruct(session, tmp_path / "rec2", n_iter=3, thickness_px=16, align="none", png=False)
    volume, _ = tomo.read_emd_volume(again["volume"])
    np.testing.assert_allclose(volume.transpose(1, 0, 2), vol["data"], rtol=1e-5, atol=1e-6)


def test_reconstruct_uses_the_calibrated_geometry_of_tomo_atoms(tmp_path):
    """A session with ``/results/tomo`` (what ``stemlive tomo atoms`` stores: angles, in-plane rotation gamma and
    the sample origin in every image) is reconstructed at that geometry, not at the stage angles + alignment."""
    from stemlive.live.analysis.tilt_calibration import rotation_from_angles

    t = reference_table()
    rng = np.random.default_rng(5)
    pos = rng.normal(0, 6.0, (40, 3)) * [1, 1, 0.3]
    gamma = rng.uniform(-8, 8, len(t))  # in-plane rotations the stage angles do not know about
    origin = np.array([24.0, 24.0]) + rng.uniform(-2, 2, (len(t), 2))  # (row, col) of the sample origin
    rots = rotation_from_angles(t[:, 0], t[:, 1], gamma)
    proj = np.stack([blob_projection(pos + r.T @ [o[1] - 24, o[0] - 24, 0], np.ones(40), r, (48, 48), 1.2)
                     for r, o in zip(rots, origin, strict=True)])
    sys.path.insert(0, str(Path(__file__).parent))
    from export_sessions import tilt_session  # a session the CLI's contract check accepts

    plain = write_session(tmp_path / "plain.h5", proj, t[:, 0], t[:, 1])
    calibrated = tilt_session(tmp_path / "cal.h5", proj, t[:, 0], t[:, 1])
    with h5py.File(calibrated, "a") as f:
        for name, value in (("alpha_deg", t[:, 0]), ("beta_deg", t[:, 1]), ("gamma_deg", gamma),
                            ("shift_px", origin)):
            f[f"results/tomo/{name}"] = value
    truth = render_volume(pos, np.ones(40), (16, 48, 48), 1.2)
    r = {}
    for name, session in (("calibrated", calibrated), ("plain", plain)):
        paths = tomo.reconstruct(session, tmp_path / name, n_iter=20, thickness_px=16, align="com", png=False)
        volume, _ = tomo.read_emd_volume(paths["volume"])
        r[name] = rc.pearson(volume, truth)
        with h5py.File(paths["volume"], "r") as f:
            algorithm = f["data/tomography"].attrs["algorithm"]
        assert ("calibrated geometry" in algorithm) == (name == "calibrated"), algorithm
    # the same projections made at the rotation centre without in-plane rotations: what SIRT (20 iterations)
    # reaches at an exactly known geometry
    ideal = np.stack([blob_projection(pos, np.ones(40), r, (48, 48), 1.2) for r in rc.stage_rotation(t[:, 0], t[:, 1])])
    r["ideal"] = rc.pearson(rc.reconstruct_sirt(ideal, rc.stage_rotation(t[:, 0], t[:, 1]), n_iter=20,
                                                shape_zyx=(16, 48, 48)), truth)
    # as a user types it, accelerated
    out = tmp_path / "fast"
    proc = subprocess.run([*STEMLIVE, "tomo", "reconstruct", str(calibrated), "-o",
                           str(out), "--iterations", "20", "--thickness", "16", "--accelerate", "--no-png"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"volume: {out / 'cal_reconstruction.emd'}"
    volume, _ = tomo.read_emd_volume(out / "cal_reconstruction.emd")
    r["accelerated"] = rc.pearson(volume, truth)
    with h5py.File(out / "cal_reconstruction.emd", "r") as f:
        assert f["data/tomography"].attrs["algorithm"].startswith("accelerated SIRT, 20 iterations")
    print(r)  # measured: calibrated 0.765, ideal 0.766, stage angles + c.o.m. alignment 0.635, accelerated 0.843
    assert r["calibrated"] > r["ideal"] - 0.01
    assert r["calibrated"] > r["plain"] + 0.08
    assert r["accelerated"] > r["calibrated"] + 0.05


def test_windows_on_a_local_dask_cluster_from_the_command_line(tmp_path, cluster):
    """``--scheduler local``: the windows run on a 2-worker LocalCluster and give the in-process volume."""
    pytest.importorskip("dask.distributed")
    sys.path.insert(0, str(Path(__file__).parent))
    from export_sessions import tilt_session

    proj, _, alpha, beta = cluster
    session = tilt_session(tmp_path / "w.h5", proj[:, 8:56, 8:56], alpha, beta)
    common = ["--window", "32", "--step", "16", "--iterations", "3", "--thickness", "16", "--align", "none",
              "--no-png"]
    proc = subprocess.run([*STEMLIVE, "tomo", "reconstruct", str(session), "-o",
                           str(tmp_path / "dask"), "--scheduler", "local", *common],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"volume: {tmp_path / 'dask' / 'w_reconstruction.emd'}"
    on_cluster, _ = tomo.read_emd_volume(tmp_path / "dask" / "w_reconstruction.emd")
    here, _ = tomo.read_emd_volume(tomo.reconstruct(session, tmp_path / "here", n_iter=3, thickness_px=16,
                                                    align="none", window=32, step=16, png=False)["volume"])
    np.testing.assert_allclose(on_cluster, here, atol=1e-5 * float(here.max()))
    assert float(here.max()) > 0
