"""Segmentation of vibrational EELS spectra: power-law background subtracted, then correlation k-means."""

from __future__ import annotations

import numpy as np

from . import eels, segment
from ._threads import row_blocks, thread_map


def segment_spectra(
    energy_meV: np.ndarray,
    sums: np.ndarray,
    *,
    k: int,
    window_meV: tuple[float, float],
    background_windows_meV: tuple[tuple[float, float], ...],
    n_restarts: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Background-subtract summed spectra and cluster them with correlation k-means in ``window_meV``.

    Both windows are intersected with the acquired axis first (:func:`segmentation_windows`; raises
    :class:`~stemlive.live.analysis.eels.WindowError` when one is left too narrow).  Returns ``(labels,
    background-subtracted spectra)``.
    """
    window, background = segmentation_windows(energy_meV, window_meV, background_windows_meV)
    sums = np.asarray(sums)
    corrected = np.empty(sums.shape, dtype=np.float64)

    def subtract(rows: slice) -> None:
        # per spectrum: blocks of rows give the whole map's result, on threads (numpy's loops release the GIL),
        # with a 1 GB float64 background never held whole on a 256x256 map of 2048 channels
        bg, _ = eels.power_law_background(energy_meV, sums[rows], windows_meV=background)
        np.subtract(sums[rows], bg, out=corrected[rows])

    thread_map(subtract, row_blocks(len(sums), SEGMENT_BLOCK))
    lo, hi = window
    mask = (energy_meV >= lo) & (energy_meV <= hi)
    labels, _centroids, _inertia = segment.kmeans_correlation(corrected[:, mask], k, n_restarts=n_restarts, seed=seed)
    return np.asarray(labels), corrected


SEGMENT_BLOCK = 2048
"""Spectra per block of the segmentation's background subtraction (32 MB of float64 at 2048 channels)."""

MIN_SEGMENT_CHANNELS = 5
"""Fewest channels of the segmentation window (the correlation of shorter spectra says little)."""


def segmentation_windows(
    energy_meV: np.ndarray, window_meV: tuple[float, float], background_windows_meV: tuple[tuple[float, float], ...]
) -> tuple[tuple[float, float], tuple[tuple[float, float], ...]]:
    """The segmentation and background windows intersected with the acquired axis (ZLP at 0 meV)."""
    where = eels.axis_reach(energy_meV)
    window = eels.loss_window((float(window_meV[0]), float(window_meV[1])), where, "the segmentation window",
                              min_channels=MIN_SEGMENT_CHANNELS)
    return window, eels.background_windows(energy_meV, background_windows_meV)
