"""Lucy-Richardson deconvolution of spectra by a point-spread function (the fitted zero-loss peak)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike

from .eels_windows import Array


def lucy_richardson(
    spectra: ArrayLike, psf: ArrayLike, *, iterations: int = 5, centre_channels: ArrayLike | None = None
) -> Array:
    """Lucy-Richardson deconvolution of spectra by a point-spread function (vectorised, FFT).

    Parameters
    ----------
    spectra
        ``(..., n)`` counts (negative values are clipped at a small positive floor).
    psf
        ``(..., n)`` PSF on the same axis (e.g. the fitted ZLP); normalised to unit sum here.
    iterations
        Number of LR iterations (5 by default, as in the reference).
    centre_channels
        Channel of the PSF's centre (default: its maximum); the PSF is rolled so the centre is at 0.

    Returns
    -------
    deconvolved
        ``(..., n)`` with the same total counts.
    """
    s = np.maximum(np.asarray(spectra, float), 1e-6)
    h = np.broadcast_to(np.asarray(psf, float), s.shape)
    n = s.shape[-1]
    h = h / h.sum(-1, keepdims=True)
    if centre_channels is None:
        centre = np.argmax(h, axis=-1).astype(float)
    else:
        centre = np.broadcast_to(np.asarray(centre_channels, float), s.shape[:-1])
    nfft = scipy.fft.next_fast_len(2 * n)
    freq = np.fft.rfftfreq(nfft)
    hf = scipy.fft.rfft(h, nfft, axis=-1) * np.exp(2j * np.pi * freq * centre[..., None])
    hfc = np.conj(hf)

    def conv(a: Array, kern: Any) -> Array:
        return scipy.fft.irfft(scipy.fft.rfft(a, nfft, axis=-1) * kern, nfft, axis=-1)[..., :n]

    u = s.copy()
    for _ in range(int(iterations)):
        est = np.maximum(conv(u, hf), 1e-12)
        u = u * conv(s / est, hfc)
    return u
