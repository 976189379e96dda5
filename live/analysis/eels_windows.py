"""Energy axis of a batch of vibrational EEL spectra: its offset and dispersion, and the dtype handling.

The energy axis is uniform, ``energy_meV[j] = energy_offset_meV + j * dispersion_meV`` (one axis for all
spectra or one per spectrum, ``(..., n_channels)``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

_ROWS = 1024
"""Spectra per block of the row-wise steps that run on parallel threads (alignment, spill-model samples,
log-ratio bins): their temporaries stay in cache."""


def _axis(energy_meV: ArrayLike, n: int, batch: tuple[int, ...]) -> tuple[Array, float]:
    """Per-spectrum offset (batch) and the common dispersion of a uniform energy axis."""
    e = np.asarray(energy_meV, float)
    if e.shape[-1] != n:
        raise ValueError(f"energy axis has {e.shape[-1]} channels, spectra have {n}")
    disp = float(np.mean(e[..., 1] - e[..., 0]))
    if not np.allclose(np.diff(e, axis=-1), disp, rtol=1e-6, atol=1e-9 * abs(disp)):
        raise ValueError("energy axis must be uniform")
    off = np.broadcast_to(e[..., 0], batch).astype(float)
    return off, disp


def _floating(a: ArrayLike) -> Array:
    """``a`` as an array of float32 or float64 (other dtypes are converted to float64; no copy otherwise).

    Typed as float64: the functions that take it only gather channels and convert them.
    """
    arr = np.asarray(a)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(float)  # type: ignore[return-value]
