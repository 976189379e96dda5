"""The physics inputs of the vibrational EELS simulator: the 1-D interface model (:class:`InterfaceModel`: region,
temperature and signal leakage along x), the per-system scenario defaults (:data:`DEFAULT_EELS`,
:func:`eels_config`), the phonon peak tables and the line shapes (Bose occupation, Pearson VII resolution).

:class:`~stemlive.simulators.eels_model.VibrationalEELSSimulator` forms spectra from them; see
``docs/eels-analysis.md`` for the physics and the scenario keys.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_EELS",
    "ELECTRON_CHARGE_C",
    "KB_MEV_PER_K",
    "PHONON_PEAKS",
    "InterfaceModel",
    "bose",
    "eels_config",
    "pearson7",
    "phonon_density",
    "zlp_fwhm_meV",
]

KB_MEV_PER_K = 8.617333262e-2
"""Boltzmann constant in meV / K."""
ELECTRON_CHARGE_C = 1.602176634e-19

# (centre meV, FWHM meV, relative area) per region: 0 = left, 1 = interface, 2 = right.
PHONON_PEAKS: dict[str, tuple[tuple[tuple[float, float, float], ...], ...]] = {
    # EELS centres of table S3 (Sci. Adv. 7, eabi6699); the interface has 27.9 and 41.1 meV modes that
    # neither bulk side has.
    "mos2_wse2": (
        ((49.4, 3.0, 0.9), (38.6, 3.0, 1.0), (31.2, 3.0, 0.5), (26.5, 3.0, 0.7), (22.0, 3.0, 0.6)),
        ((45.5, 3.0, 0.6), (41.1, 3.0, 1.0), (36.0, 3.0, 0.5), (27.9, 3.0, 0.9), (22.9, 3.0, 0.6)),
        ((46.2, 3.0, 0.5), (38.8, 3.0, 0.8), (30.6, 3.0, 1.0), (24.8, 3.0, 0.8), (22.0, 3.0, 0.6)),
    ),
    # AlN TO 81-85 meV; interface modes at 75 and 90 meV; SiC has a gap between 75 and 95 meV.
    "aln_sic": (
        ((58.0, 8.0, 0.12), (68.0, 6.0, 0.2), (83.0, 6.0, 1.0), (108.0, 8.0, 0.3)),
        ((62.0, 8.0, 0.12), (75.0, 5.0, 0.7), (90.0, 5.0, 0.7), (104.0, 8.0, 0.3)),
        ((60.0, 8.0, 0.15), (68.0, 6.0, 0.3), (98.0, 5.0, 1.0), (116.0, 6.0, 0.35)),
    ),
}

DEFAULT_EELS: dict[str, dict[str, Any]] = {
    "mos2_wse2": {
        "system": "mos2_wse2",
        "interface_x_nm": 32.8,
        "interface_width_nm": 13.0,
        "temperatures": {
            "T_left_K": 300.0,
            "T_right_K": 300.0,
            "gradient_left_K_per_nm": 0.0,
            "gradient_right_K_per_nm": 0.0,
            "drop_width_nm": 2.0,
        },
        "beam_current_pA": 100.0,
        "phonon_fraction": 2e-3,
        "zlp": {"fwhm_meV": [[3.0, 5.7], [300.0, 8.3]], "m": 2.5},
        "energy_drift": {"rate_meV_per_s": 0.005, "amplitude_meV": 1.5, "period_s": 60.0, "jitter_meV": 0.4},
        "leakage_length_nm": 3.0,
        "leakage_fraction": 0.15,
        "saturation_counts": 4.0e9,
        "read_noise_counts": 0.0,
        "dispersion_meV": 0.44,
        "n_channels": 2048,
        "energy_offset_meV": -300.0,
        "exposure_ms": 300.0,
    },
    "aln_sic": {
        "system": "aln_sic",
        "interface_x_nm": 0.0,
        "interface_width_nm": 2.5,
        "temperatures": {
            "T_left_K": 650.0,
            "T_right_K": 635.0,
            "gradient_left_K_per_nm": -0.18,
            "gradient_right_K_per_nm": -0.18,
            "drop_width_nm": 2.0,
        },
        "beam_current_pA": 30.0,
        "phonon_fraction": 5e-3,
        "zlp": {"fwhm_meV": [[100.0, 10.0], [1600.0, 12.0]], "m": 2.5},
        "energy_drift": {"rate_meV_per_s": 0.005, "amplitude_meV": 1.0, "period_s": 120.0, "jitter_meV": 0.3},
        "leakage_length_nm": 1.0,
        "leakage_fraction": 0.1,
        "saturation_counts": 4.0e9,
        "read_noise_counts": 0.0,
        "dispersion_meV": 0.44,
        "n_channels": 2048,
        "energy_offset_meV": -300.0,
        "exposure_ms": 1200.0,
    },
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def eels_config(scenario: Any = "aln_sic") -> dict[str, Any]:
    """Complete "eels" configuration from a scenario, an "eels" dict or a system name.

    Parameters
    ----------
    scenario
        A ``Scenario`` (its ``.eels`` dict is used), a mapping (the "eels" section itself) or a system
        name (``"mos2_wse2"`` or ``"aln_sic"``).  Missing keys take the system defaults.
    """
    if isinstance(scenario, str):
        section: Mapping[str, Any] = {"system": scenario}
    elif isinstance(scenario, Mapping):
        section = scenario
    else:
        section = getattr(scenario, "eels", None) or {}
    system = str(section.get("system", "aln_sic"))
    if system not in DEFAULT_EELS:
        raise ValueError(f"unknown EELS system {system!r}; known: {sorted(DEFAULT_EELS)}")
    return _merge(DEFAULT_EELS[system], section)


def bose(energy_meV: ArrayLike, temperature_K: ArrayLike) -> NDArray[np.float64]:
    """Bose-Einstein occupation n(E, T) = 1 / (exp(E / k_B T) - 1)."""
    x = np.asarray(energy_meV, float) / (KB_MEV_PER_K * np.asarray(temperature_K, float))
    return 1.0 / np.expm1(x)


def pearson7(energy_meV: ArrayLike, fwhm_meV: ArrayLike, m: ArrayLike) -> NDArray[np.float64]:
    """Unit-area symmetric Pearson VII centred on 0 with full width at half maximum ``fwhm_meV``."""
    e = np.asarray(energy_meV, float)
    w = np.asarray(fwhm_meV, float)
    m = np.asarray(m, float)
    c = 2.0 ** (1.0 / m) - 1.0
    norm = 2.0 * np.sqrt(c) / (w * np.sqrt(np.pi)) * np.exp(_lgamma(m) - _lgamma(m - 0.5))
    return norm * (1.0 + (2.0 * e / w) ** 2 * c) ** (-m)


def _lgamma(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.vectorize(math.lgamma, otypes=[float])(x)


def zlp_fwhm_meV(exposure_ms: float, table: Any) -> float:
    """FWHM of the zero-loss peak at an exposure, interpolated linearly in log(exposure).

    ``table`` is ``[[exposure_ms, fwhm_meV], ...]`` (or one number for a fixed width); outside the table the
    two nearest points are extrapolated, clamped to at least the smallest tabulated width.
    """
    if np.isscalar(table):
        return float(cast(float, table))
    t = np.asarray(table, float)
    t = t[np.argsort(t[:, 0])]
    if len(t) == 1:
        return float(t[0, 1])
    lx = np.log(t[:, 0])
    le = math.log(exposure_ms)
    i = int(np.clip(np.searchsorted(lx, le) - 1, 0, len(t) - 2))
    f = (le - lx[i]) / (lx[i + 1] - lx[i])
    return float(max(t[:, 1].min(), t[i, 1] + f * (t[i + 1, 1] - t[i, 1])))


@dataclass
class InterfaceModel:
    """1-D interface along x: region, temperature and leakage of each region's phonon signal.

    Regions: 0 left (x < x0 - width / 2), 1 interface, 2 right (x > x0 + width / 2).  The temperature is
    a bulk line on each side, ``T_left_K + gradient_left * (x - x0)`` and ``T_right_K + gradient_right * (x
    - x0)`` (both lines evaluated at the interface give the drop ``T_left_K - T_right_K``), joined by an
    error-function step whose 10-90 % width is ``drop_width_nm``.
    """

    system: str
    interface_x_nm: float
    interface_width_nm: float
    T_left_K: float
    T_right_K: float
    gradient_left_K_per_nm: float
    gradient_right_K_per_nm: float
    drop_width_nm: float
    leakage_length_nm: float
    leakage_fraction: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> InterfaceModel:
        """Build from a complete "eels" section (see :func:`eels_config`)."""
        t = cfg["temperatures"]
        return cls(
            system=str(cfg["system"]),
            interface_x_nm=float(cfg["interface_x_nm"]),
            interface_width_nm=float(cfg["interface_width_nm"]),
            T_left_K=float(t["T_left_K"]),
            T_right_K=float(t["T_right_K"]),
            gradient_left_K_per_nm=float(t.get("gradient_left_K_per_nm", 0.0)),
            gradient_right_K_per_nm=float(t.get("gradient_right_K_per_nm", 0.0)),
            drop_width_nm=float(t.get("drop_width_nm", 2.0)),
            leakage_length_nm=float(cfg.get("leakage_length_nm", 3.0)),
            leakage_fraction=float(cfg.get("leakage_fraction", 0.15)),
        )

    @property
    def drop_K(self) -> float:
        """Interface temperature drop (left line minus right line at the interface)."""
        return self.T_left_K - self.T_right_K

    def region(self, x_nm: ArrayLike) -> NDArray[np.int8]:
        """Region index at x: 0 left, 1 interface, 2 right."""
        d = np.asarray(x_nm, float) - self.interface_x_nm
        h = 0.5 * self.interface_width_nm
        return np.where(d < -h, 0, np.where(d > h, 2, 1)).astype(np.int8)

    def temperature(self, x_nm: ArrayLike) -> NDArray[np.float64]:
        """True local temperature T(x) in K."""
        from scipy.special import erf

        d = np.asarray(x_nm, float) - self.interface_x_nm
        left = self.T_left_K + self.gradient_left_K_per_nm * d
        right = self.T_right_K + self.gradient_right_K_per_nm * d
        sigma = max(self.drop_width_nm, 1e-9) / (2.0 * math.sqrt(2.0) * 0.9061938)
        s = 0.5 * (1.0 + erf(d / (math.sqrt(2.0) * sigma)))
        return left * (1.0 - s) + right * s

    def region_weights(self, x_nm: ArrayLike) -> NDArray[np.float64]:
        """Weights (..., 3) of the three regions' phonon densities at x (they sum to 1).

        A region contributes 1 inside it and ``leakage_fraction * exp(-distance / leakage_length_nm)``
        outside (delocalised dipole scattering).
        """
        x = np.asarray(x_nm, float)[..., None]
        h = 0.5 * self.interface_width_nm
        lo = np.array([-np.inf, self.interface_x_nm - h, self.interface_x_nm + h])
        hi = np.array([self.interface_x_nm - h, self.interface_x_nm + h, np.inf])
        dist = np.maximum(lo - x, 0.0) + np.maximum(x - hi, 0.0)
        lam = max(self.leakage_length_nm, 1e-9)
        w = np.where(dist <= 0.0, 1.0, self.leakage_fraction * np.exp(-dist / lam))
        return w / w.sum(axis=-1, keepdims=True)


def phonon_density(energy_meV: NDArray[np.float64], peaks: Any) -> NDArray[np.float64]:
    """Unit-area sum of Gaussians at |E| >= 0 (zero for E <= 0)."""
    e = np.asarray(energy_meV, float)
    out = np.zeros_like(e)
    total = sum(a for _, _, a in peaks)
    for c, fwhm, a in peaks:
        s = fwhm / 2.3548200450309493
        out += a / total * np.exp(-0.5 * ((e - c) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    return np.where(e > 0, out, 0.0)

