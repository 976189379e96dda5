"""Vibrational EELS physics for the simulated instrument.

A fast, vectorised spectrum generator (:class:`VibrationalEELSSimulator`) that knows its ground truth, over the
interface model and line shapes of :mod:`~stemlive.simulators.eels_physics`.  See ``docs/eels-analysis.md`` for the
physics and the scenario keys.

Spectrum formation, for a frame whose true zero-loss peak sits at ``s`` meV on its energy axis::

    I(E) = N * disp * [ R(e) + f_ph * ( P_x(e) (n(e, T) + 1) [e > 0] + P_x(-e) n(-e, T) [e < 0] ) (*) R ](e),
    e = E - s,  n(e, T) = 1 / (exp(e / k_B T) - 1)

with ``R`` the instrument resolution (a unit-area Pearson VII whose FWHM grows with exposure; it is also
the zero-loss peak), ``P_x`` the unit-area phonon density at the probe position (Gaussians per region,
mixed by delocalised leakage), ``f_ph`` the single-phonon scattering fraction and ``N`` the number of
electrons in the exposure.  Counts are Poisson (skewness-corrected normal approximation above ``poisson_exact_below``),
plus optional Gaussian read noise, clipped at ``saturation_counts``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from stemlive.simulators.eels_physics import (
    ELECTRON_CHARGE_C,
    PHONON_PEAKS,
    InterfaceModel,
    bose,
    eels_config,
    pearson7,
    phonon_density,
    zlp_fwhm_meV,
)

__all__ = ["VibrationalEELSSimulator"]


class VibrationalEELSSimulator:
    """Fast vibrational EELS spectra across a 1-D interface, with ground truth.

    Parameters
    ----------
    scenario
        A ``Scenario`` (its ``.eels`` dict), an "eels" mapping or a system name.
    seed
        Seed of the default random generator (used when a call passes no ``rng``).
    poisson_exact_below
        Expected counts below which exact Poisson deviates are drawn; above, a skewness-corrected normal
        approximation is used for speed (see ``_noise``).
    noise
        ``"legacy"`` (default: the random stream the tests' realisations were drawn with) or
        ``"compact"``: the same distribution drawn ~2x faster (normal deviates only for the high channels,
        float32 inversion below 1 count, ``rng.poisson`` in between); other realisations for a seed.
    """

    oversample = 4

    def __init__(
        self,
        scenario: Any = "aln_sic",
        *,
        seed: int | None = 0,
        poisson_exact_below: float = 30.0,
        noise: str = "legacy",
    ) -> None:
        if noise not in ("legacy", "compact"):
            raise ValueError(f"unknown noise generator {noise!r}")
        self.noise = noise
        self.config = eels_config(scenario)
        self.model = InterfaceModel.from_config(self.config)
        self.peaks = PHONON_PEAKS[self.model.system]
        self.rng = np.random.default_rng(seed)
        self.poisson_exact_below = float(poisson_exact_below)
        self._cache: dict[tuple[Any, ...], NDArray[Any]] = {}

    # ----------------------------------------------------------------------------------------- helpers
    def zlp_fwhm(self, exposure_ms: float) -> float:
        """ZLP FWHM (meV) at an exposure."""
        return zlp_fwhm_meV(exposure_ms, self.config["zlp"]["fwhm_meV"])

    def energy_shift(self, t_s: ArrayLike, rng: np.random.Generator | None = None) -> NDArray[np.float64]:
        """True ZLP position (meV on the nominal axis) at times ``t_s``: slow drift plus per-frame jitter."""
        d = self.config["energy_drift"]
        t = np.asarray(t_s, float)
        slow = d.get("rate_meV_per_s", 0.0) * t + d.get("amplitude_meV", 0.0) * np.sin(
            2 * np.pi * t / max(d.get("period_s", 60.0), 1e-9)
        )
        jitter = d.get("jitter_meV", 0.0)
        if jitter and rng is not None:
            slow = slow + jitter * rng.standard_normal(t.shape)
        return slow

    def electrons(self, exposure_ms: float) -> float:
        """Electrons per exposure at the scenario's beam current."""
        return self.config["beam_current_pA"] * 1e-12 * exposure_ms * 1e-3 / ELECTRON_CHARGE_C

    def _grid(
        self, n_channels: int, dispersion_meV: float, energy_offset_meV: NDArray[np.float64], shift: NDArray[np.float64]
    ) -> tuple[float, float, int]:
        h = dispersion_meV / self.oversample
        lo = float(np.min(energy_offset_meV - shift)) - 20 * dispersion_meV
        hi = float(np.max(energy_offset_meV - shift)) + (n_channels + 20) * dispersion_meV
        # round the grid to multiples of h around 0 so that templates are cached across calls
        i0 = math.floor(lo / h / 1024) * 1024
        i1 = math.ceil(hi / h / 1024) * 1024
        return h, i0 * h, i1 - i0

    def _templates(
        self,
        keys: NDArray[np.float64],
        fwhm: float,
        h: float,
        e0: float,
        n: int,
    ) -> NDArray[np.float64]:
        """Noise-free spectral densities (per meV, unit electron) on the fine grid for (x, T) rows."""
        e = e0 + h * np.arange(n)
        cfg = self.config
        m = float(cfg["zlp"]["m"])
        ck = ("R", fwhm, m, h, e0, n)
        if ck not in self._cache:
            # unit-area resolution (Pearson VII) convolved with a box of one channel width (channel
            # integration), in Fourier space; zero energy sits at grid index -e0/h (an integer here)
            nfft = 1 << int(math.ceil(math.log2(2 * n)))
            k = np.arange(nfft)
            kk = np.where(k < nfft // 2, k, k - nfft) * h
            r = pearson7(kk, fwhm, m) * h
            box = np.zeros(nfft)
            q = self.oversample
            box[: q // 2 + 1] = 1.0
            box[-(q // 2) :] = 1.0
            box[q // 2] = box[-(q // 2)] = 0.5
            box /= box.sum()
            self._cache[ck] = np.fft.rfft(r) * np.fft.rfft(box)
            self._cache[("Rn",) + ck] = np.array([nfft])
        rf = self._cache[ck]
        nfft = int(self._cache[("Rn",) + ck][0])
        x_u, t_u = keys[:, 0], keys[:, 1]
        wts = self.model.region_weights(x_u)  # (U, 3)
        dens = np.stack([phonon_density(np.abs(e), pk) for pk in self.peaks])  # (3, n)
        mix = wts @ dens  # (U, n)
        ea = np.abs(e)
        nb = bose(np.where(ea > 0, ea, 1.0)[None, :], t_u[:, None])
        occ = np.where(e[None, :] > 0, nb + 1.0, np.where(e[None, :] < 0, nb, 0.0))
        f_ph = float(cfg["phonon_fraction"])
        src = f_ph * mix * occ
        i_zero = int(round(-e0 / h))
        src[:, i_zero] += (1.0 - f_ph) / h
        spec = np.fft.irfft(np.fft.rfft(src, nfft, axis=-1) * rf, nfft, axis=-1)[:, :n]
        return np.maximum(spec, 0.0)  # FFT round-off can leave tiny negative values far out

    # ----------------------------------------------------------------------------------------- public
    def expected_spectrum(
        self,
        *,
        x_nm: ArrayLike,
        y_nm: ArrayLike = 0.0,
        exposure_ms: float | None = None,
        n_channels: int | None = None,
        dispersion_meV: float | None = None,
        energy_offset_meV: ArrayLike | None = None,
        energy_shift_meV: ArrayLike = 0.0,
        temperature_K: ArrayLike | None = None,
    ) -> NDArray[np.float32]:
        """Noise-free expected counts (k, n_channels) for ZLP positions ``energy_shift_meV``."""
        exp_ms, nc, disp, off, x, t_true, shift = self._prepare(
            x_nm, y_nm, exposure_ms, n_channels, dispersion_meV, energy_offset_meV, 0.0, temperature_K
        )
        shift = np.broadcast_to(np.asarray(energy_shift_meV, float), x.shape)
        return self._expected(exp_ms, nc, disp, off, x, t_true, shift)

    def _prepare(
        self,
        x_nm: ArrayLike,
        y_nm: ArrayLike,
        exposure_ms: float | None,
        n_channels: int | None,
        dispersion_meV: float | None,
        energy_offset_meV: ArrayLike | None,
        t_s: ArrayLike,
        temperature_K: ArrayLike | None,
    ) -> tuple[Any, ...]:
        cfg = self.config
        exp_ms = float(cfg["exposure_ms"] if exposure_ms is None else exposure_ms)
        nc = int(cfg["n_channels"] if n_channels is None else n_channels)
        disp = float(cfg["dispersion_meV"] if dispersion_meV is None else dispersion_meV)
        off0 = cfg["energy_offset_meV"] if energy_offset_meV is None else energy_offset_meV
        x, _, t, off = np.broadcast_arrays(
            np.atleast_1d(np.asarray(x_nm, float)),
            np.asarray(y_nm, float),
            np.asarray(t_s, float),
            np.asarray(off0, float),
        )
        temp = (
            self.model.temperature(x)
            if temperature_K is None
            else np.broadcast_to(np.asarray(temperature_K, float), x.shape)
        )
        return exp_ms, nc, disp, off.astype(float), x.astype(float), np.asarray(temp, float), t

    def _expected(
        self,
        exp_ms: float,
        nc: int,
        disp: float,
        off: NDArray[np.float64],
        x: NDArray[np.float64],
        temp: NDArray[np.float64],
        shift: NDArray[np.float64],
    ) -> NDArray[np.float32]:
        fwhm = self.zlp_fwhm(exp_ms)
        h, e0, n = self._grid(nc, disp, off, shift)
        keys = np.stack([np.round(x, 4), np.round(temp, 4)], axis=-1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        tmpl = (self._templates(uniq, fwhm, h, e0, n) * (self.electrons(exp_ms) * disp)).astype(np.float32)
        q = self.oversample
        pos = (off - shift - e0) / h  # fine index of channel 0
        base = np.floor(pos).astype(np.intp)
        frac = (pos - base).astype(np.float32)[:, None]
        # strided view (U, start, channel) -> one row gather per frame instead of an element gather
        n_start = n - q * (nc - 1) - 1
        view = np.lib.stride_tricks.as_strided(
            tmpl,
            shape=(tmpl.shape[0], n_start, nc),
            strides=(tmpl.strides[0], tmpl.strides[1], q * tmpl.strides[1]),
            writeable=False,
        )
        rows = inv.reshape(-1)
        a = view[rows, base]
        b = view[rows, base + 1]
        b -= a
        b *= frac
        a += b
        return a

    def spectra(
        self,
        *,
        x_nm: ArrayLike,
        y_nm: ArrayLike = 0.0,
        exposure_ms: float | None = None,
        n_channels: int | None = None,
        dispersion_meV: float | None = None,
        energy_offset_meV: ArrayLike | None = None,
        t_s: ArrayLike = 0.0,
        temperature_K: ArrayLike | None = None,
        rng: np.random.Generator | None = None,
        return_expected: bool = False,
    ) -> tuple[NDArray[np.float32], dict[str, NDArray[Any]]]:
        """Noisy spectra for k probe positions / frames (inputs broadcast to shape (k,)).

        Parameters
        ----------
        x_nm, y_nm, t_s, energy_offset_meV
            Probe position, acquisition time (drives the energy drift) and nominal energy of channel 0.
        exposure_ms, n_channels, dispersion_meV
            Camera settings (defaults from the scenario).
        temperature_K
            Overrides the model's T(x) (e.g. to test thermometry at chosen temperatures).
        rng
            Random generator (default: the simulator's own).
        return_expected
            Also return the noise-free expected counts as ``truths["expected"]``.

        Returns
        -------
        spectra
            float32 (k, n_channels) counts.
        truths
            ``temperature_K``, ``region`` (int8), ``energy_shift_meV`` (true ZLP position on the nominal
            axis), ``zlp_fwhm_meV``, ``saturated`` (bool) and optionally ``expected``.
        """
        rng = self.rng if rng is None else rng
        exp_ms, nc, disp, off, x, temp, t = self._prepare(
            x_nm, y_nm, exposure_ms, n_channels, dispersion_meV, energy_offset_meV, t_s, temperature_K
        )
        shp = x.shape
        x, temp, off, t = x.reshape(-1), temp.reshape(-1), off.reshape(-1), t.reshape(-1)
        shift = self.energy_shift(t, rng)
        mu = self._expected(exp_ms, nc, disp, off, x, temp, shift)
        if self.noise == "compact":  # the expected counts are overwritten unless they are returned
            counts = self._noise(mu, rng, inplace=not return_expected)
        else:
            counts = self._noise_legacy(mu, rng)
        sat = float(self.config.get("saturation_counts", np.inf))
        saturated = counts.max(axis=-1) >= sat
        if saturated.any():
            np.minimum(counts, sat, out=counts)
        truths: dict[str, NDArray[Any]] = {
            "temperature_K": temp.reshape(shp),
            "region": self.model.region(x).reshape(shp),
            "energy_shift_meV": shift.reshape(shp),
            "zlp_fwhm_meV": np.full(shp, self.zlp_fwhm(exp_ms)),
            "saturated": saturated.reshape(shp),
        }
        if return_expected:
            truths["expected"] = mu.reshape(shp + (nc,))
        return counts.reshape(shp + (nc,)), truths

    def _noise(
        self, mu: NDArray[np.float32], rng: np.random.Generator, *, inplace: bool = False
    ) -> NDArray[np.float32]:
        """Poisson counts: exact below ``poisson_exact_below``, Cornish-Fisher corrected normal above.

        ``round(mu + sqrt(mu) z + (z**2 - 1) / 6)`` has the Poisson mean, variance (+1/12 from rounding)
        and skewness; it is used above 30 counts by default because exact deviates cost about 10x more.
        Every draw works on a compact subset of the channels: normal deviates only for the high channels,
        an exact float32 inversion (:func:`_poisson_small`) for ``mu < 1`` (about half of a spectrum's
        channels, mostly zeros) and ``rng.poisson`` for ``1 <= mu < poisson_exact_below``.

        ``inplace``: write the counts over ``mu`` (float32, C-contiguous) instead of a new array (saves the
        first-touch page faults of a fresh ``(k, n)`` array); the draws are the same.
        """
        mu32 = np.ascontiguousarray(mu, np.float32)
        flat = mu32.reshape(-1)
        high = flat >= self.poisson_exact_below
        tiny = flat < 1.0
        low = ~high
        low &= ~tiny
        # every subset is gathered before any count is written (``counts`` may be ``flat`` itself)
        m = flat[high]
        m_tiny = flat[tiny]
        m_low = flat[low].astype(np.float64) if low.any() else None
        counts = flat if inplace else np.empty_like(flat)
        z = rng.standard_normal(m.size, dtype=np.float32)
        c = np.sqrt(m)
        c *= z
        z *= z
        z -= 1.0
        z *= np.float32(1.0 / 6.0)
        c += z
        c += m
        np.rint(c, out=c)
        np.maximum(c, 0, out=c)
        counts[high] = c
        counts[tiny] = _poisson_small(m_tiny, rng)
        if m_low is not None:
            counts[low] = rng.poisson(m_low).astype(np.float32)
        rn = float(self.config.get("read_noise_counts", 0.0))
        if rn > 0:
            counts += rn * rng.standard_normal(counts.shape, dtype=np.float32)
        return counts.reshape(mu32.shape)

    def _noise_legacy(self, mu: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
        """The former generator (``noise="legacy"``): normal deviates for every channel, then exact Poisson.

        ``round(mu + sqrt(mu) z + (z**2 - 1) / 6)`` has the Poisson mean, variance (+1/12 from rounding)
        and skewness; the simulator uses it above 30 counts by default because exact Poisson deviates
        cost about 10x more.
        """
        mu32 = np.asarray(mu, np.float32)
        z = rng.standard_normal(mu32.shape, dtype=np.float32)
        counts = np.sqrt(mu32)
        counts *= z
        z *= z
        z -= 1.0
        z *= np.float32(1.0 / 6.0)
        counts += z
        counts += mu32
        np.rint(counts, out=counts)
        low = mu32 < self.poisson_exact_below
        if low.any():
            counts[low] = rng.poisson(mu32[low].astype(float)).astype(np.float32)
        np.maximum(counts, 0, out=counts)
        rn = float(self.config.get("read_noise_counts", 0.0))
        if rn > 0:
            counts += rn * rng.standard_normal(mu32.shape, dtype=np.float32)
        return counts


def _poisson_small(mu: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    """Exact Poisson deviates for small means (``mu < 1``) by inversion, vectorised in float32.

    One uniform ``v`` per channel; the count is the number of ``k >= 0`` with ``v >= F(k)``, ``F`` the
    Poisson CDF built up as ``F(k) = F(k-1) + p_k``; only the channels still above the current ``F`` are
    carried on (a fraction ``1 - exp(-mu)`` after the first step).  float32 resolves probabilities down to
    ~6e-8 (a mean below that always draws 0: at most 6e-8 counts per channel are lost).
    """
    v = rng.random(mu.size, dtype=np.float32)
    p = np.exp(-mu)
    hit = v >= p
    idx = np.flatnonzero(hit)  # of the bool mask: ~4x faster than of the float32 counts
    out = hit.astype(np.float32)
    m = mu[idx]
    vv = v[idx]
    p = p[idx]
    cdf = p.copy()
    k = 0
    while idx.size:
        k += 1
        p *= m
        p *= np.float32(1.0 / k)
        cdf += p
        keep = (vv >= cdf) & (p > 0)
        idx, m, vv, p, cdf = idx[keep], m[keep], vv[keep], p[keep], cdf[keep]
        out[idx] += 1.0
    return out


