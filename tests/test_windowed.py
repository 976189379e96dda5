"""Windowed reconstruction against the true potential (issue 14, item 4): the comparison volume, its registration,
the accelerated SIRT and the window crops, on analytic projections of a thin monolayer (no projector in the data).

The simulator-based figures (calibrated vs nominal angles on the 12 reference tilts) are in
``tests/test_atomic_tomography.py::test_windowed_sirt_correlates_better_at_calibrated_angles``.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemlive.live.analysis import reconstruct as rc
from stemlive.live.analysis import windowed as wd

REFERENCE_TILTS = np.array([
    (0.0, 0.0), (-14.3, -22.9), (-14.3, 17.1), (20.1, 17.1), (20.1, -20.1), (12.6, -12.6),
    (12.6, 12.6), (-12.6, 12.6), (-12.6, -12.6), (-6.3, -6.3), (-6.3, 6.3), (6.3, 6.3),
])  # fmt: skip
VOXEL_A, SIGMA_A = 0.64, 0.552  # 2x binned 0.32 A pixels; the probe's 1.3 A FWHM


def gaussian_projection(pos_A: np.ndarray, weight: np.ndarray, rot: np.ndarray, shape_yx: tuple[int, int]):
    """Exact projection (per voxel area) of 3D Gaussians of SIGMA_A: 2D Gaussians at ``(R p)_xy``."""
    lab = pos_A @ rot.T / VOXEL_A
    s = SIGMA_A / VOXEL_A
    gy = np.exp(-0.5 * ((np.arange(shape_yx[0]) - shape_yx[0] // 2)[None, :] - lab[:, 1:2]) ** 2 / s**2)
    gx = np.exp(-0.5 * ((np.arange(shape_yx[1]) - shape_yx[1] // 2)[None, :] - lab[:, 0:1]) ** 2 / s**2)
    return np.einsum("m,my,mx->yx", weight * np.sqrt(2 * np.pi) * s, gy, gx).astype(np.float32)


@pytest.fixture(scope="module")
def monolayer():
    """A 2.4 nm MoS2|WSe2 flake with its ripple (sample frame, A), analytic projections at the 12 reference tilts."""
    from stemlive.simulators.sample import Heterojunction

    atoms = Heterojunction(extent_x_nm=2.4, extent_y_nm=2.4, seed=0).atoms()
    pos = np.asarray(atoms.positions_A, float)
    weight = (np.asarray(atoms.Z, float) / 42.0) ** 1.7
    rots = rc.stage_rotation(REFERENCE_TILTS[:, 0], REFERENCE_TILTS[:, 1])
    proj = np.stack([gaussian_projection(pos, weight, r, (48, 48)) for r in rots])
    return pos, weight, rots, proj


def test_atoms_volume_is_sampled_gaussians_at_exact_positions():
    rng = np.random.default_rng(1)
    pos = rng.uniform(-3, 3, (5, 3))
    vol = wd.atoms_volume(pos, np.ones(5), (16, 24, 24), VOXEL_A, SIGMA_A)
    # every projection of the volume is the exact 2D projection (no rounding of positions to voxels)
    proj = vol.sum(axis=0)
    expected = gaussian_projection(pos, np.ones(5), np.eye(3), (24, 24))
    np.testing.assert_allclose(proj, expected, atol=1e-4 * expected.max())
    one = wd.atoms_volume(pos[:1], [1.0], (16, 24, 24), VOXEL_A, SIGMA_A)
    grid = np.meshgrid(*[(np.arange(n) - n // 2) * VOXEL_A for n in one.shape], indexing="ij")
    centroid = np.array([(g * one).sum() / one.sum() for g in grid])[::-1]
    np.testing.assert_allclose(centroid, pos[0], atol=0.005)


def test_potential_correlation_registers_a_subvoxel_offset(monolayer):
    pos, weight, _, _ = monolayer
    offset = np.array([0.23, -0.31, 0.17])  # A
    moved = wd.atoms_volume(pos + offset, weight, (16, 48, 48), VOXEL_A, SIGMA_A)
    r0, _ = wd.potential_correlation(moved, pos, weight, VOXEL_A, SIGMA_A, margin=6, register=False)
    r, found = wd.potential_correlation(moved, pos, weight, VOXEL_A, SIGMA_A, margin=6)
    assert r0 < 0.9  # a third of a voxel already costs this much
    assert r > 0.999
    np.testing.assert_allclose(found, offset, atol=0.03)


def test_accelerated_sirt_and_windows_reach_the_true_potential(monolayer):
    """Plain SIRT is far from converged after 30 iterations on 12 tilts; the accelerated one is not, and the
    windows (cubic crops, central parts stitched) give the same volume as one reconstruction of the field."""
    pos, weight, rots, proj = monolayer
    truth = wd.atoms_volume(pos, weight, (16, 48, 48), VOXEL_A, SIGMA_A)
    inner = (slice(None), slice(6, 42), slice(6, 42))
    opts = {"n_iter": 30, "shape_zyx": (16, 48, 48), "support_z": 12}
    plain = rc.reconstruct_sirt(proj, rots, **opts)
    fast = rc.reconstruct_sirt(proj, rots, momentum=True, **opts)
    r_plain, r_fast = rc.pearson(plain[inner], truth[inner]), rc.pearson(fast[inner], truth[inner])
    windows = rc.reconstruct_windowed(proj, rots, window=24, step=12, nz=16, n_iter=30, support_z=12, momentum=True)
    r_win = rc.pearson(windows[inner], truth[inner])
    print(f"Pearson r: plain SIRT {r_plain:.3f}, accelerated {r_fast:.3f}, windows 24/12 {r_win:.3f}")
    assert r_fast > r_plain + 0.05
    assert r_fast > 0.85
    assert r_win > r_fast - 0.03


def test_compare_with_atoms_measures_offsets_from_the_model(monolayer):
    pos, weight, _, _ = monolayer
    from stemlive.simulators.sample import Heterojunction

    species = np.asarray(Heterojunction(extent_x_nm=2.4, extent_y_nm=2.4, seed=0).atoms().species)
    metal = np.isin(species, ["Mo", "W"])
    same = wd.atoms_volume(pos, weight, (16, 48, 48), VOXEL_A, SIGMA_A)
    exact = wd.compare_with_atoms(same, pos, weight, metal, VOXEL_A, SIGMA_A, margin=6)
    assert exact["r_model"] > 0.999 and exact["atoms_compared"] > 100
    # neighbours' tails bias a centroid within 0.8 A by a few pm only
    assert exact["metal_dz_rms_A"] < 0.03 and exact["chalcogen_dz_rms_A"] < 0.03
    # chalcogens drawn 0.2 A closer to their metal plane than the model has them
    moved = pos.copy()
    moved[~metal, 2] -= 0.2 * np.sign(pos[~metal, 2] - np.median(pos[metal, 2]))
    pulled = wd.compare_with_atoms(wd.atoms_volume(moved, weight, (16, 48, 48), VOXEL_A, SIGMA_A), pos, weight, metal,
                                   VOXEL_A, SIGMA_A, margin=6)
    print(exact, pulled)
    assert pulled["chalcogen_dz_towards_metal_A"] == pytest.approx(0.2, abs=0.05)
    assert pulled["metal_dz_rms_A"] < 0.03
