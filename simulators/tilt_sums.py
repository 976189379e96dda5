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
from dataclasses import dataclass

import numpy as np

from stemlive.simulators.haadf import HAADFSimulator
from stemlive.simulators.sample import AtomSet
from stemlive.simulators.scenario import Scenario
from stemlive.simulators.stage import StageModel

__all__ = ["REFERENCE_TILTS_DEG", "TiltSums", "simulate_tilt_sums"]

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
    """

    sums: np.ndarray
    nominal_deg: np.ndarray
    actual_deg: np.ndarray
    centre_offset_px: np.ndarray
    pixel_size_nm: float
    atoms: AtomSet


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
    return TiltSums(np.stack(sums), np.asarray(tilts_deg, float), np.asarray(actual), np.asarray(offsets),
                    float(pixel_size_nm), sim.atoms)
