"""Per-tilt summed HAADF images of a tilt series with their ground truth, without the acquisition chain.

What the tilt-series stage produces after drift correction (one sum of ``n_frames`` registered frames per tilt),
rendered directly: the stage model moves through the nominal tilts in order (hysteresis and its random part give
the actual angles), every tilt's image is the expected counts of ``n_frames`` frames at the actual angles
(:class:`~stemlive.simulators.haadf.HAADFSimulator`, no drift within the tilt) with one Poisson draw, and the scan
centre follows the non-eucentric field shift with a random tracking error (the operator re-centres the area).
Used by the atomic-tomography tests and benchmarks, where thousands of frames through the instrument would only
add time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stemlive.simulators.haadf import HAADFSimulator
from stemlive.simulators.sample import AtomSet
from stemlive.simulators.scenario import Scenario
from stemlive.simulators.stage import StageModel

__all__ = ["REFERENCE_TILTS_DEG", "TiltSums", "atoms_in_all_fields", "compare_model", "simulate_tilt_sums",
           "true_geometry", "true_vacancies"]

REFERENCE_TILTS_DEG: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (-14.3, -22.9), (-14.3, 17.1), (20.1, 17.1), (20.1, -20.1), (12.6, -12.6),
    (12.6, 12.6), (-12.6, 12.6), (-12.6, -12.6), (-6.3, -6.3), (-6.3, 6.3), (6.3, 6.3),
)
"""Nominal (alpha, beta) of ``reference/tilt_series_mos2_wse2.json`` in acquisition order."""


@dataclass(frozen=True, eq=False)
class TiltSums:
    """A simulated tilt series and its truth.

    Attributes
    ----------
    sums : ndarray (n, ny, nx) float32
        Counts summed over ``n_frames`` frames per tilt.
    nominal_deg, actual_deg : ndarray (n, 2)
        (alpha, beta) commanded and reached.
    centre_offset_px : ndarray (n, 2)
        (dy, dx) in pixels of the sample origin relative to pixel ``((ny - 1) / 2, (nx - 1) / 2)`` at each tilt
        (the field shift left over after tracking).
    pixel_size_nm : float
    atoms : AtomSet
        True sample-frame atoms (Angstrom).
    scan_drift_px : ndarray (2, 2)
        Linear part of the scan distortion by the drift during each frame (the same in every tilt: every sum
        is ``n_frames`` times one frame from t = 0): an undrifted image point ``p`` (row, col) is recorded at
        ``p + scan_drift_px @ p`` (the drift's velocity times the time the scan reaches the point).
    """

    sums: np.ndarray
    nominal_deg: np.ndarray
    actual_deg: np.ndarray
    centre_offset_px: np.ndarray
    pixel_size_nm: float
    atoms: AtomSet
    scan_drift_px: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))


def simulate_tilt_sums(scenario: Scenario, *, tilts_deg: Sequence[tuple[float, float]] = REFERENCE_TILTS_DEG,
                       n_frames: int = 10, shape: tuple[int, int] = (512, 512), pixel_size_nm: float = 0.032,
                       tracking_error_nm: float = 0.3, seed: int = 0, noise: bool = True) -> TiltSums:
    """Render the per-tilt sums of a tilt series at the scenario's dose.

    Parameters
    ----------
    scenario : Scenario
        Sample, HAADF settings and stage imperfections (hysteresis, random error, eucentric offset).
    tilts_deg : sequence of (alpha, beta)
        Nominal tilts in acquisition order.
    n_frames : int
        Frames per tilt (dose of the sum).
    shape, pixel_size_nm : tuple, float
        Image size and pixel size.
    tracking_error_nm : float
        Standard deviation per axis of the scan centre's error when re-centring after each tilt.
    seed : int
        Noise and tracking seed.
    noise : bool
        False: expected counts.
    """
    rng = np.random.default_rng([seed, 14])
    stage = StageModel(scenario.stage, seed=scenario.stage_seed)
    sim = HAADFSimulator(scenario)
    fov = pixel_size_nm * max(shape)
    sums, actual, offsets = [], [], []
    for alpha, beta in tilts_deg:
        st = stage.move_to(float(alpha), float(beta))
        centre = np.asarray(st.fov_shift_nm) + rng.normal(0.0, tracking_error_nm, 2)
        img, _ = sim.render_frame(alpha_deg=st.actual_alpha_deg, beta_deg=st.actual_beta_deg, shape=shape,
                                  fov_nm=fov, dwell_us=scenario.haadf.dwell_us, center_nm=(centre[0], centre[1]),
                                  t_start_s=0.0, noise=False)
        expected = img.astype(np.float64) * n_frames
        sums.append(rng.poisson(expected).astype(np.float32) if noise else expected.astype(np.float32))
        actual.append((st.actual_alpha_deg, st.actual_beta_deg))
        offsets.append((np.asarray(st.fov_shift_nm) - centre) / pixel_size_nm)
    # the drift's mean velocity over one frame (image px per s) times the scan time of a row / a column
    ny, nx = shape
    line_s = (nx * scenario.haadf.dwell_us + scenario.haadf.flyback_us) * 1e-6
    frame_s = ny * line_s
    v = (sim.drift.position_nm(frame_s) - sim.drift.position_nm(0.0)) / frame_s / pixel_size_nm
    scan_drift = np.outer(v, [line_s, scenario.haadf.dwell_us * 1e-6])
    return TiltSums(np.stack(sums), np.asarray(tilts_deg, float), np.asarray(actual), np.asarray(offsets),
                    float(pixel_size_nm), sim.atoms, scan_drift)


def true_geometry(ts: TiltSums, *, scan_distortion: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The true projection geometry of ``docs/tomography.md`` (*Atomic model*): sample-to-lab rotations
    ``(n, 3, 3)`` at the actual angles (no in-plane rotation), the image position (row, col) of the sample
    origin ``(n, 2)`` and, with ``scan_distortion``, the linear image distortion ``(n, 2, 2)`` of the drift during
    the frame (``atoms3d.Geometry.distortion``; else None). The frame is the simulator's sample frame (origin at
    the flake centre)."""
    from stemlive.simulators.stage import rotation_matrix

    ny, nx = ts.sums.shape[1:]
    rot = np.stack([rotation_matrix(alpha, beta) for alpha, beta in ts.actual_deg])
    origin = np.array([(ny - 1) / 2.0, (nx - 1) / 2.0]) + ts.centre_offset_px
    if not scan_distortion:
        return rot, origin, None
    d = np.eye(2) + ts.scan_drift_px
    return rot, origin @ d.T, np.broadcast_to(d, (len(rot), 2, 2)).copy()


def atoms_in_all_fields(ts: TiltSums, margin_px: float = 4.0) -> np.ndarray:
    """Mask of the true atoms that project inside every image with ``margin_px`` to spare."""
    from stemlive.simulators.stage import rotation_matrix

    ny, nx = ts.sums.shape[1:]
    px_A = 10.0 * ts.pixel_size_nm
    inside = np.ones(len(ts.atoms), bool)
    for k, (alpha, beta) in enumerate(ts.actual_deg):
        lab = ts.atoms.positions_A @ rotation_matrix(alpha, beta).T
        rc = lab[:, [1, 0]] / px_A + np.array([(ny - 1) / 2.0, (nx - 1) / 2.0]) + ts.centre_offset_px[k]
        inside &= ((rc[:, 0] > margin_px) & (rc[:, 0] < ny - 1 - margin_px) & (rc[:, 1] > margin_px)
                   & (rc[:, 1] < nx - 1 - margin_px))
    return inside


def true_vacancies(scenario: Scenario) -> np.ndarray:
    """Sample-frame positions ``(m, 3)`` (Angstrom) of the empty chalcogen sites of the scenario's sample.

    The sample built without vacancies draws the same random numbers, so its extra atoms are the vacancies.
    """
    import dataclasses

    full = dataclasses.replace(scenario.sample, vacancy_fraction=0.0).atoms()
    real = scenario.sample.atoms()
    if not len(real):
        return full.positions_A
    from scipy.spatial import cKDTree

    d, _ = cKDTree(real.positions_A).query(full.positions_A)
    return full.positions_A[d > 1e-6]


def compare_model(ts: TiltSums, scenario: Scenario, positions_A: np.ndarray, species: np.ndarray,
                  vacancies_A: np.ndarray, *, match_A: float = 0.8, margin_px: float = 4.0) -> dict[str, float]:
    """Accuracy of a 3D atomic model against the truth, over the atoms inside every image.

    The model's frame is translated onto the truth (its origin is the metals' centroid): median offset of the
    model metals to their nearest true metals, with shrinking pairing distances. RMSDs are in pm; ``found`` is
    the fraction of true atoms (in every field) with a model
    atom within ``match_A``; vacancy precision/recall pair flagged and true empty sites on the same site (in-plane
    within ``match_A``) and the same side of the layer (z within 1.5 A, half the X-X separation).
    """
    from scipy.spatial import cKDTree

    truth = ts.atoms.positions_A
    inall = atoms_in_all_fields(ts, margin_px)
    metal = np.isin(ts.atoms.species, ["Mo", "W"])
    model = np.asarray(positions_A, float)
    m_metal = np.isin(np.asarray(species), ["Mo", "W"])
    off = truth[metal].mean(axis=0) - model[m_metal].mean(axis=0)
    for bound in (2.0, 1.0, 0.5, 0.5):
        d, i = cKDTree(truth[metal]).query(model[m_metal] + off, distance_upper_bound=bound)
        ok = np.isfinite(d)
        if ok.any():
            off = off + np.median(truth[metal][i[ok]] - (model[m_metal][ok] + off), axis=0)
    d, i = cKDTree(model + off).query(truth, distance_upper_bound=match_A)
    found = np.isfinite(d) & inall
    diff = truth[found] - (model[i[found]] + off)
    mt = metal[found]
    out = {
        "atoms_in_field": float(inall.sum()), "found_fraction": float(found.sum() / max(inall.sum(), 1)),
        "metal_z_rmsd_pm": 100 * float(np.sqrt(np.mean(diff[mt, 2] ** 2))),
        "chalcogen_z_rmsd_pm": 100 * float(np.sqrt(np.mean(diff[~mt, 2] ** 2))),
        "inplane_rmsd_pm": 100 * float(np.sqrt(np.mean((diff[:, :2] ** 2).sum(axis=1)))),
        "metal_inplane_rmsd_pm": 100 * float(np.sqrt(np.mean((diff[mt, :2] ** 2).sum(axis=1)))),
        "chalcogen_inplane_rmsd_pm": 100 * float(np.sqrt(np.mean((diff[~mt, :2] ** 2).sum(axis=1)))),
        "species_correct_fraction": float(np.mean(ts.atoms.species[found] == np.asarray(species)[i[found]])),
        "model_atoms": float(len(model)),
    }
    vac_true = true_vacancies(scenario)
    # true vacancies inside every field: those whose nearest true atom is in every field
    if len(vac_true):
        _, near = cKDTree(truth).query(vac_true)
        vac_true = vac_true[inall[near]]
    flagged = np.asarray(vacancies_A, float).reshape(-1, 3) + off
    if len(flagged):
        _, near = cKDTree(truth).query(flagged)
        flagged = flagged[inall[near]]
    def same_site(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """For each of ``a``: a point of ``b`` on the same chalcogen site (in-plane within ``match_A``) and the
        same side of the layer (z within half the X-X separation, 1.5 A)."""
        if not len(a) or not len(b):
            return np.zeros(len(a), bool)
        near = cKDTree(b[:, :2]).query_ball_point(a[:, :2], match_A)
        return np.array([any(abs(b[j, 2] - p[2]) < 1.5 for j in js) for p, js in zip(a, near, strict=True)])

    tp_flag = int(same_site(flagged, vac_true).sum())
    tp_true = int(same_site(vac_true, flagged).sum())
    out.update({"vacancies_true": float(len(vac_true)), "vacancies_flagged": float(len(flagged)),
                "vacancy_precision": float(tp_flag / len(flagged)) if len(flagged) else float("nan"),
                "vacancy_recall": float(tp_true / len(vac_true)) if len(vac_true) else float("nan")})
    return out
