"""Vibrational EELS analysis: energy-drift alignment, zero-loss-peak fit, detailed-balance thermometry.

This module re-exports the public functions of the modules that implement them, one concept each:

- :mod:`.eels_windows`: the energy axis of a batch of spectra;
- :mod:`.eels_alignment`: zero-loss centres, cross-correlation shifts, aligned sums;
- :mod:`.eels_pearson7`: the zero-loss-peak model (Pearson VII);
- :mod:`.eels_zlp`: the zero-loss-peak fit;
- :mod:`.eels_spill`: the deconvolved phonon signal that the resolution tails spill into the fit windows;
- :mod:`.eels_background`: power-law background;
- :mod:`.eels_resolution`: resolution offset of the detailed-balance log ratio;
- :mod:`.eels_thermometry`: detailed-balance temperatures;
- :mod:`.eels_tail_pool`: one power-law tail shape for a session's spectra;
- :mod:`.eels_deconvolution`: Lucy-Richardson deconvolution.

All functions are pure and vectorised over spectra: ``spectra`` is ``(..., n_channels)`` and the energy
axis is uniform, ``energy_meV[j] = energy_offset_meV + j * dispersion_meV`` (one axis for all spectra or
one per spectrum, ``(..., n_channels)``).  See ``docs/eels-analysis.md`` for the equations.
"""

from __future__ import annotations

from .eels_alignment import align_spectra, shift_spectra, sum_aligned, xcorr_shifts, zlp_centre
from .eels_background import background_windows, power_law_background
from .eels_deconvolution import lucy_richardson
from .eels_pearson7 import PARAM_NAMES, pearson7_model
from .eels_spill import SignalModel, signal_model
from .eels_tail_pool import TailShape, pool_tail_shape, stack_profiles
from .eels_thermometry import (
    KB_MEV_PER_K,
    TemperatureResult,
    counting_limit_sigma_T,
    log_ratio_bins,
    temperature,
)
from .eels_windows import Reach, WindowError, axis_reach, both_sides, clip_window, loss_window, zlp_windows
from .eels_zlp import ZLPFit, _window_index, fit_zlp_pearson7

__all__ = [
    "KB_MEV_PER_K",
    "PARAM_NAMES",
    "SignalModel",
    "ZLPFit",
    "TemperatureResult",
    "TailShape",
    "pool_tail_shape",
    "stack_profiles",
    "zlp_centre",
    "xcorr_shifts",
    "shift_spectra",
    "align_spectra",
    "sum_aligned",
    "pearson7_model",
    "fit_zlp_pearson7",
    "power_law_background",
    "log_ratio_bins",
    "signal_model",
    "temperature",
    "counting_limit_sigma_T",
    "lucy_richardson",
    "_window_index",
    "Reach",
    "WindowError",
    "axis_reach",
    "background_windows",
    "both_sides",
    "clip_window",
    "loss_window",
    "zlp_windows",
]
