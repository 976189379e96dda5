"""Vibrational EELS spectra from first principles, independent of :mod:`stemlive.simulators`.

This module shares no code with the simulator's EELS model (it imports nothing from ``stemlive``): its own
phonon densities of states, zero-loss shapes and counting, so that the analysis is tested on spectra that the
code under test did not make.

Physics
-------
Single inelastic scattering by phonons in the dipole approximation.  A material is a set of modes
``(omega_k, gamma_k, w_k)``: the phonon density of states is ``g(E) = sum_k w_k N(E; omega_k, gamma_k)`` with
``N`` a unit-area Gaussian (``gamma_k`` its FWHM).  The loss function per incident electron, for ``E > 0``::

    S(+E) = p * g(E) / E * (n(E) + 1)           (phonon created: loss)
    S(-E) = p * g(E) / E * n(E)                 (phonon annihilated: gain)
    n(E)  = 1 / (exp(E / k_B T) - 1)            (Bose-Einstein occupation)

so ``S(-E) / S(+E) = exp(-E / k_B T)`` exactly (detailed balance); ``p`` scales the phonon signal to a
fraction ``phonon_fraction`` of the zero-loss counts at 300 K (``sum_k w_k (2 n(omega_k) + 1) / omega_k`` is
normalised to that fraction; the signal then grows with T as the occupation does).

The measured spectrum is the zero-loss shape ``Z`` (unit area; the instrument resolution) convolved with
``delta(E) + S(E)``, plus an optional power-law background ``b (|E| / 50 meV)^-r`` beyond ``background_from_meV``
(on both sides: the spectrometer's own tail; or the loss side only), times the zero-loss counts, integrated
exactly over each detector channel (differences of the cumulative integral at the channel edges, so any
dispersion from 0.2 meV to 1 eV per channel is exact), then Poisson-sampled per frame.

Zero-loss shapes ``Z`` (all with a given FWHM; see :class:`ZeroLoss`):

* ``pearson7``: ``(1 + 4 (2^(1/m) - 1) (E / FWHM)^2)^-m``;
* ``pseudo_voigt``: ``eta L + (1 - eta) G``, a Lorentzian and a Gaussian of the same FWHM;
* ``asymmetric``: a Pearson VII whose loss side (E > 0) has its own FWHM and exponent (a heavier tail).

Energy drift between frames: frame ``f`` of a point has its zero-loss peak at ``d_f`` (a random walk of
``drift_step_meV`` per frame plus a per-point offset), the nominal axis ``offset + j * dispersion`` is the same
for every frame (as a spectrometer reports it), so the analysis must find ``d_f`` itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

K_B_MEV_PER_K = 0.08617333262
"""Boltzmann constant (meV/K); defined here, not imported from the code under test."""


@dataclass(frozen=True)
class Material:
    """Phonon modes of a material: centres, FWHMs (meV) and relative weights of its density of states."""

    name: str
    modes_meV: tuple[float, ...]
    widths_meV: tuple[float, ...]
    weights: tuple[float, ...]

    def dos(self, e: Array) -> Array:
        """Density of states ``g(E)`` (unnormalised) on ``E >= 0``."""
        g = np.zeros_like(e)
        for c, w, a in zip(self.modes_meV, self.widths_meV, self.weights, strict=True):
            s = w / 2.3548200450309493
            g += a * np.exp(-0.5 * ((e - c) / s) ** 2) / (s * np.sqrt(2 * np.pi))
        return g


# Three materials of our own (not the reference tables): acoustic/optical-like modes in 18-60 meV for the
# peak fits and segmentation, and strong optical modes in 60-130 meV for the thermometry window.
MATERIALS: dict[str, Material] = {
    "A": Material("A", (23.0, 36.0, 50.0, 78.0, 104.0), (2.5, 3.0, 3.0, 6.0, 8.0), (1.0, 1.3, 1.1, 2.5, 3.0)),
    "B": Material("B", (27.0, 41.5, 55.0, 86.0, 112.0), (2.5, 3.0, 3.5, 7.0, 6.0), (1.2, 1.0, 1.4, 3.0, 2.0)),
    "C": Material("C", (20.5, 31.0, 45.0, 70.0, 95.0), (2.0, 3.0, 3.0, 5.0, 9.0), (0.8, 1.2, 1.0, 2.0, 3.5)),
    # modes that exist only at an interface (bonds across it)
    "AB": Material("AB", (30.0, 45.5), (3.0, 3.0), (1.0, 1.0)),
    # thermometry materials: optical modes only (like the AlN/SiC system), no density of states in the
    # default zero-loss fit windows (15-30 and 130-200 meV), which the default analysis assumes
    "P": Material("P", (62.0, 78.0, 104.0), (8.0, 6.0, 8.0), (0.4, 2.5, 3.0)),
    "Q": Material("Q", (66.0, 88.0, 112.0), (6.0, 5.0, 6.0), (0.6, 2.5, 1.5)),
    "R": Material("R", (58.0, 72.0, 97.0, 118.0), (8.0, 5.0, 6.0, 5.0), (0.3, 1.5, 2.5, 0.8)),
}


def bose(e: Array, temperature_K: float) -> Array:
    """Bose-Einstein occupation ``1 / (exp(E / k_B T) - 1)`` (``E > 0``)."""
    return 1.0 / np.expm1(e / (K_B_MEV_PER_K * temperature_K))


@dataclass(frozen=True)
class ZeroLoss:
    """A zero-loss peak shape of unit area: ``kind`` in ``pearson7``, ``pseudo_voigt``, ``asymmetric``.

    ``fwhm_meV`` and ``m`` (Pearson VII exponent) describe the gain side (and both sides unless asymmetric);
    ``eta`` is the Lorentzian fraction of ``pseudo_voigt``; ``loss_fwhm_meV``/``loss_m`` the loss side of
    ``asymmetric``.
    """

    kind: str = "pearson7"
    fwhm_meV: float = 8.3
    m: float = 2.5
    eta: float = 0.3
    loss_fwhm_meV: float = 9.5
    loss_m: float = 1.8

    def unnormalised(self, e: Array) -> Array:
        if self.kind == "pearson7":
            return _p7(e, self.fwhm_meV, self.m)
        if self.kind == "pseudo_voigt":
            hw = 0.5 * self.fwhm_meV
            lor = 1.0 / (1.0 + (e / hw) ** 2)
            gau = np.exp(-np.log(2.0) * (e / hw) ** 2)
            # equal peak heights -> areas pi*hw and sqrt(pi/ln2)*hw; mix by area fraction eta
            return self.eta * lor / (np.pi * hw) + (1 - self.eta) * gau / (np.sqrt(np.pi / np.log(2.0)) * hw)
        if self.kind == "asymmetric":
            return np.where(e <= 0, _p7(e, self.fwhm_meV, self.m), _p7(e, self.loss_fwhm_meV, self.loss_m))
        raise ValueError(f"unknown zero-loss kind {self.kind!r}")

    @property
    def symmetric(self) -> bool:
        return self.kind != "asymmetric"


def _p7(e: Array, fwhm: float, m: float) -> Array:
    return (1.0 + 4.0 * (2.0 ** (1.0 / m) - 1.0) * (e / fwhm) ** 2) ** (-m)


@dataclass(frozen=True)
class Background:
    """Power law ``amplitude * (|E| / 50 meV)^-exponent`` per unit zero-loss area and meV, for ``|E| >=
    from_meV`` (smoothly switched on over 5 meV); ``loss_only`` puts it on the loss side only."""

    amplitude: float = 0.0
    exponent: float = 3.0
    from_meV: float = 12.0
    loss_only: bool = False

    def density(self, e: Array) -> Array:
        if self.amplitude == 0.0:
            return np.zeros_like(e)
        ae = np.maximum(np.abs(e), 0.5 * self.from_meV)  # switched off below from_meV: no divergence at 0
        on = 0.5 * (1 + np.tanh((np.abs(e) - self.from_meV) / 2.5))
        out = self.amplitude * (ae / 50.0) ** (-self.exponent) * on
        return np.where(e > 0, out, 0.0) if self.loss_only else out


@dataclass(frozen=True)
class Instrument:
    """Detector axis and zero-loss shape: channel ``j`` at ``offset_meV + j * dispersion_meV``."""

    dispersion_meV: float = 0.44
    offset_meV: float = -300.0
    n_channels: int = 1365
    zlp: ZeroLoss = field(default_factory=ZeroLoss)
    background: Background = field(default_factory=Background)
    phonon_fraction: float = 0.002

    @property
    def energy_meV(self) -> Array:
        return self.offset_meV + self.dispersion_meV * np.arange(self.n_channels)


def axis(lo_meV: float, hi_meV: float, dispersion_meV: float) -> tuple[float, int]:
    """``(offset, n_channels)`` of an axis covering ``lo..hi`` at ``dispersion``."""
    n = int(np.floor((hi_meV - lo_meV) / dispersion_meV)) + 1
    return float(lo_meV), n


# --------------------------------------------------------------------------------- the continuous spectrum
def _fine_grid(lo: float, hi: float, dispersion: float) -> Array:
    """Non-uniform grid: fine (<= 0.05 meV, <= dispersion / 8) within 700 meV of zero, coarser outside."""
    h = min(0.05, dispersion / 8.0)
    core = np.arange(-700.0, 700.0 + h / 2, h)
    parts = [core]
    if lo < -700.0:
        parts.insert(0, np.linspace(lo - dispersion, -700.0, int((-700.0 - lo) / max(0.5, dispersion / 8)) + 2)[:-1])
    if hi > 700.0:
        parts.append(np.linspace(700.0, hi + dispersion, int((hi - 700.0) / max(0.5, dispersion / 8)) + 2)[1:])
    return np.concatenate(parts)


def loss_function(e: Array, materials: dict[str, float], temperature_K: float, phonon_fraction: float) -> Array:
    """``S(E)`` per incident electron and meV on both sides (see the module docstring).

    ``materials`` maps material names to their weights at the probe position (e.g. an interface mixes two).
    """
    ae = np.abs(e)
    pos = ae > 1e-9
    out = np.zeros_like(e)
    for name, weight in materials.items():
        if weight == 0:
            continue
        mat = MATERIALS[name]
        # normalisation: the phonon fraction of the zero-loss counts at 300 K
        om = np.asarray(mat.modes_meV)
        w = np.asarray(mat.weights)
        norm = float(np.sum(w * (2 * bose(om, 300.0) + 1) / om))
        g = mat.dos(ae)
        n = np.zeros_like(e)
        n[pos] = bose(ae[pos], temperature_K)
        occ = np.where(e > 0, n + 1.0, n)
        out[pos] += weight * phonon_fraction / norm * g[pos] / ae[pos] * occ[pos]
    return out


@functools.lru_cache(maxsize=4096)
def _cumulative(inst: Instrument, materials: tuple[tuple[str, float], ...], temperature_K: float,
                lo: float, hi: float) -> tuple[Array, Array]:
    """Cumulative integral ``C(E)`` of ``Z (*) (delta + S) + background`` (per zero-loss count)."""
    x = _fine_grid(lo, hi, inst.dispersion_meV)
    core = (x >= -700.0) & (x <= 700.0)
    xc = x[core]
    h = float(xc[1] - xc[0])
    z = inst.zlp.unnormalised(xc)
    z_area = float(np.trapezoid(z, xc))
    zc = z / z_area
    s = loss_function(xc, dict(materials), temperature_K, inst.phonon_fraction)
    # the phonon signal blurred by the resolution (FFT convolution on the uniform core, same length)
    n = xc.size
    nfft = int(2 ** np.ceil(np.log2(2 * n)))
    conv = np.fft.irfft(np.fft.rfft(s, nfft) * np.fft.rfft(zc, nfft), nfft)[n // 2: n // 2 + n] * h
    dens = np.empty_like(x)
    dens[core] = zc + conv
    out = ~core
    dens[out] = inst.zlp.unnormalised(x[out]) / z_area  # far tails: no phonon signal beyond 700 meV
    dens += inst.background.density(x)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(x))])
    return x, cum


def expected_counts(inst: Instrument, materials: dict[str, float], temperature_K: float, zlp_counts: float,
                    shift_meV: float | Array = 0.0) -> Array:
    """Expected counts per channel ``(..., n_channels)`` with the zero-loss peak at ``shift_meV`` (per frame).

    ``zlp_counts`` is the number of electrons in the zero-loss peak (its integral) of one spectrum.
    """
    e = inst.energy_meV
    d = inst.dispersion_meV
    edges = np.concatenate([e - d / 2, [e[-1] + d / 2]])
    shifts = np.atleast_1d(np.asarray(shift_meV, float))
    span = float(np.max(np.abs(shifts))) + 2 * d
    key = tuple(sorted((k, round(float(v), 6)) for k, v in materials.items() if v))
    # the grid (and so C) depends on the range only beyond +-700 meV: one cache entry per spectrum, not per shift
    lo, hi = min(float(edges[0] - span), -700.0), max(float(edges[-1] + span), 700.0)
    x, cum = _cumulative(inst, key, round(float(temperature_K), 4), lo, hi)
    c = np.interp(edges[None, :] - shifts[:, None], x, cum)
    out = zlp_counts * np.diff(c, axis=-1)
    return out.reshape(*np.shape(shift_meV), -1) if np.ndim(shift_meV) else out[0]


def frames(inst: Instrument, materials: dict[str, float], temperature_K: float, zlp_counts_per_frame: float,
           n_frames: int, rng: np.random.Generator, *, drift_step_meV: float = 0.3,
           drift_offset_meV: float = 0.0) -> tuple[Array, Array]:
    """Poisson-sampled frames ``(n_frames, n_channels)`` of one probe position and their true ZLP shifts."""
    shifts = drift_offset_meV + np.cumsum(rng.normal(0.0, drift_step_meV, n_frames))
    mu = expected_counts(inst, materials, temperature_K, zlp_counts_per_frame, shifts)
    return rng.poisson(np.maximum(mu, 0.0)).astype(np.float64), shifts


def signal_bins(inst: Instrument, materials: dict[str, float], temperature_K: float, zlp_counts: float,
                e_bins: Array, bin_meV: float) -> tuple[Array, Array, Array, Array]:
    """Expected phonon signal and total counts in bins ``|E| in e_bins +- bin/2`` on both sides.

    Returns ``(L, G, var_L, var_G)``: the loss and gain signals (zero-loss peak and background removed, as a
    perfect analysis would) and the variances (every detected electron in the bin counts).  Used for the
    counting limit ``k_B T^2 / sqrt(sum E^2 / (var_L / L^2 + var_G / G^2))``.
    """
    d = 0.05
    fine = Instrument(d, -700.0, int(1400 / d) + 1, inst.zlp, inst.background, inst.phonon_fraction)
    tot = expected_counts(fine, materials, temperature_K, zlp_counts)
    bare = expected_counts(fine, {}, temperature_K, zlp_counts)
    e = fine.energy_meV
    out = []
    for sign in (1.0, -1.0):
        L, V = [], []
        for c in e_bins:
            m = (sign * e >= c - bin_meV / 2) & (sign * e < c + bin_meV / 2)
            L.append(float((tot[m] - bare[m]).sum()))
            V.append(float(tot[m].sum()))
        out.append((np.array(L), np.array(V)))
    (L, VL), (G, VG) = out
    return L, G, VL, VG


def counting_limit_K(inst: Instrument, materials: dict[str, float], temperature_K: float, zlp_counts: float,
                     window_meV: tuple[float, float], bin_meV: float = 2.2) -> float:
    """Counting-statistics limit of one spectrum's temperature error over ``window_meV`` (see
    :func:`signal_bins`)."""
    lo, hi = window_meV
    e_bins = np.arange(lo + bin_meV / 2, hi - bin_meV / 2 + 1e-9, bin_meV)
    L, G, VL, VG = signal_bins(inst, materials, temperature_K, zlp_counts, e_bins, bin_meV)
    ok = (L > 0) & (G > 0)
    w = 1.0 / (VL[ok] / L[ok] ** 2 + VG[ok] / G[ok] ** 2)
    return float(K_B_MEV_PER_K * temperature_K**2 / np.sqrt(np.sum(e_bins[ok] ** 2 * w)))
