"""Cramér-Rao bound on one spectrum's temperature with the zero-loss peak and its tails unknown (issue 12).

    PYTHONPATH=... python scripts/eels_fisher_bound.py

The corpus scores thermometry against ``generator.counting_limit_K``: the Poisson limit of the detailed-balance
ratio with the zero-loss peak and the background *known*.  An analysis must fit them.  This script computes what
is attainable then: the Fisher information of the Poisson likelihood of the generator's own expected spectrum
(``tests/corpus/generator.py``; none of the analysis code) for the parameters

* ``T`` (the temperature);
* the phonon density of states free per 2.2 meV bin (the bins of ``counting_limit_K``) over the thermometry
  window 55-129.8 meV, its shape inside a bin the generator's (``dos="bins"``: the definition of the counting
  limit); in the 15 meV below the window (the 62 meV mode's flank) free on the loss and the gain side separately,
  so that it tells nothing about ``T``; none elsewhere (the generator has < 1e-5 there).  Or the generator's density
  of states with one free amplitude everywhere (``dos="amplitude"``);
* the nuisance parameters: zero-loss counts ``N``, centre ``c``, FWHM ``w`` and exponent ``m`` of the Pearson
  VII, and for power-law tails their amplitude ``b``, exponent ``p`` and, optionally, onset ``f`` (the generator
  switches them on at 12 meV over 2.5 meV; its shape known);

over the channels ``e_min <= |E| <= e_max`` (0-200 meV: every window the analysis fits lies inside), numerical
derivatives (central differences; the bound changes < 1e-3 relative with 3x the steps) of the expected counts
``mu`` computed as ``generator.expected_counts`` does (equal to it within 1e-10 relative at the true parameters),
``F_ij = sum_channels d_i mu d_j mu / mu``, bound ``sqrt((F^-1)_TT)``.  One spectrum = the point's frames summed
without drift (as ``counting_limit_K``).  Figures: docs/eels-corpus.md, "Attainable precision with unknown
zero-loss tails".
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import generator as g  # noqa: E402
from corpus import scenarios  # noqa: E402

Array = NDArray[np.float64]

BIN_MEV = 2.2
"""Width of the free density-of-states bins (``counting_limit_K``'s default)."""

BELOW_MEV = 7 * BIN_MEV
"""Range below the thermometry window where the signal is free on each side (no information on ``T``)."""

NUISANCE = ("N", "c", "w", "m", "b", "p")
STEPS = {"T": 0.3, "c": 0.05, "w": 0.01, "m": 0.005, "b": 1e-3, "p": 0.005, "f": 0.05}
"""Central-difference steps (``b`` relative, the others absolute: K, meV, meV, -, -, meV)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One spectrum of a scenario: instrument, material, temperature, zero-loss counts, thermometry window."""

    inst: g.Instrument
    material: str
    temperature_K: float
    zlp_counts: float
    window_meV: tuple[float, float]


def case_of(name: str, window_meV: tuple[float, float] = (55.0, 129.8)) -> Case:
    """The first point of the corpus scenario ``name`` (a uniform thermometry line: all points alike)."""
    sc = next(s for s in scenarios.fast() + scenarios.grid() if s.name == name)
    (mat, _), = sc.materials[0]
    return Case(sc.instrument, mat, sc.temperature_K[0], sc.zlp_counts_per_point, window_meV)


def expected(case: Case, theta: dict[str, float], dos_amp: Array, edges: Array, side_amp: Array | None = None
             ) -> Array:
    """Expected counts in the channels ``edges`` for parameters ``theta`` and per-bin DOS amplitudes ``dos_amp``.

    As ``generator._cumulative`` / ``expected_counts`` (the zero-loss shape convolved with ``delta + S``, plus the
    background, integrated exactly over each channel), with the loss function ``S`` of ``generator.loss_function``
    scaled by ``dos_amp[j]`` in bin ``j`` of the thermometry window.  Below the window (:data:`BELOW_MEV`: the
    62 meV mode's flank, 5 % of the counts at 53 meV) ``S`` is taken at the true temperature and scaled by
    ``side_amp[j, 0]`` (loss) and ``side_amp[j, 1]`` (gain) per bin: free on each side, so it tells nothing about
    ``T`` (as in ``counting_limit_K``, which uses the window only).  ``dos_amp`` of size 1: the generator's
    density of states everywhere, one amplitude.
    """
    inst = case.inst
    zlp = dataclasses.replace(inst.zlp, fwhm_meV=theta["w"], m=theta["m"])
    bg = dataclasses.replace(inst.background, amplitude=inst.background.amplitude * theta["b"],
                             exponent=theta["p"], from_meV=theta["f"]) if inst.background.amplitude else inst.background
    h = min(0.05, inst.dispersion_meV / 8.0)
    x = np.arange(-700.0, 700.0 + h / 2, h)
    z = zlp.unnormalised(x)
    zc = z / float(np.trapezoid(z, x))
    s = g.loss_function(x, {case.material: 1.0}, theta["T"], inst.phonon_fraction)
    if dos_amp.size == 1:
        s = s * dos_amp[0]
    else:
        lo, hi = case.window_meV
        ax = np.abs(x)
        j = np.floor((ax - lo) / BIN_MEV).astype(int)
        inside = (ax >= lo) & (ax < hi)
        s = np.where(inside, s * dos_amp[np.clip(j, 0, dos_amp.size - 1)], 0.0)
        below = (ax >= lo - BELOW_MEV) & (ax < lo)
        if side_amp is not None:
            s0 = g.loss_function(x, {case.material: 1.0}, case.temperature_K, inst.phonon_fraction)
            k = np.clip(np.floor((lo - ax) / BIN_MEV).astype(int), 0, side_amp.shape[0] - 1)
            s = s + np.where(below, s0 * side_amp[k, (x < 0).astype(int)], 0.0)
    n = x.size
    nfft = int(2 ** np.ceil(np.log2(2 * n)))
    conv = np.fft.irfft(np.fft.rfft(s, nfft) * np.fft.rfft(zc, nfft), nfft)[n // 2: n // 2 + n] * h
    dens = zc + conv + bg.density(x)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * h)])
    return theta["N"] * np.diff(np.interp(edges - theta["c"], x, cum))


def fisher_bound(case: Case, nuisance: tuple[str, ...], *, dos: str = "bins", e_max_meV: float = 200.0,
                 e_min_meV: float = 0.0) -> float:
    """Cramér-Rao bound (K) on ``T`` of one spectrum with ``nuisance`` unknown (see the module docstring), from
    the channels ``e_min_meV <= |E| <= e_max_meV``."""
    inst = case.inst
    e = inst.energy_meV
    d = inst.dispersion_meV
    use = np.abs(e) <= e_max_meV
    edges = np.concatenate([e[use] - d / 2, [e[use][-1] + d / 2]])
    far = np.abs(e[use]) >= e_min_meV
    theta0 = {"T": case.temperature_K, "N": case.zlp_counts, "c": 0.0, "w": inst.zlp.fwhm_meV, "m": inst.zlp.m,
              "b": 1.0, "p": inst.background.exponent, "f": inst.background.from_meV}
    n_bins = int(np.ceil((case.window_meV[1] - case.window_meV[0]) / BIN_MEV)) if dos == "bins" else 1
    ones = np.ones(n_bins)
    side = np.ones((int(round(BELOW_MEV / BIN_MEV)), 2))

    def model(theta: dict[str, float], amp: Array = ones, side_amp: Array = side) -> Array:
        return expected(case, theta, amp, edges, side_amp)

    mu = model(theta0)
    cols = []
    for name in ("T", *nuisance):
        if name == "N":  # linear: d mu / d ln N = mu
            cols.append(mu)
            continue
        step = STEPS[name]
        up, dn = dict(theta0), dict(theta0)
        up[name] += step
        dn[name] -= step
        cols.append((model(up) - model(dn)) / (2 * step))
    # d mu / d ln a: the bin's own contribution (mu is linear in each amplitude)
    for k in range(n_bins):
        amp = ones.copy()
        amp[k] = 0.0
        cols.append(mu - model(theta0, amp))
    if dos == "bins":
        for ij in np.ndindex(side.shape):
            sa = side.copy()
            sa[ij] = 0.0
            cols.append(mu - model(theta0, ones, sa))
    jac = np.array(cols)
    keep = np.any(jac != 0.0, axis=1)
    keep[0] = True
    jac = jac[keep][:, far]
    fisher = (jac / mu[far]) @ jac.T
    scale = np.sqrt(np.diag(fisher))
    cov = np.linalg.inv(fisher / np.outer(scale, scale)) / np.outer(scale, scale)
    return float(np.sqrt(cov[0, 0]))


def table() -> list[tuple[str, str, float, float]]:
    """``(scenario, what is unknown / which channels, bound_K, bound / counting limit)`` rows."""
    w_known = ("N", "c", "m", "b", "p")
    rows = []
    for name in ("thermo_ref_300K", "background_power_law"):
        case = case_of(name)
        limit = g.counting_limit_K(case.inst, {case.material: 1.0}, case.temperature_K, case.zlp_counts,
                                   case.window_meV)
        # (label, nuisance, dos, e_min, e_max)
        sets: list[tuple[str, tuple[str, ...], str, float, float]] = [
            ("nothing (ZLP, tails known)", (), "bins", 0.0, 200.0),
            ("N c w m", NUISANCE[:4], "bins", 0.0, 200.0),
        ]
        if case.inst.background.amplitude:
            sets += [
                ("N c w m b p", NUISANCE, "bins", 0.0, 200.0),
                ("N c w m b p + tail onset", (*NUISANCE, "f"), "bins", 0.0, 200.0),
                ("N c w m b p, whole axis", NUISANCE, "bins", 0.0, 1e9),
                ("N c w m b p, DOS 1 amplitude", NUISANCE, "amplitude", 0.0, 200.0),
                ("N c m b p, |E| >= 6", w_known, "bins", 6.0, 200.0),
                ("N c m b p, |E| >= 12", w_known, "bins", 12.0, 200.0),
                ("c m b p, |E| >= 25 (N, w held)", ("c", "m", "b", "p"), "bins", 25.0, 200.0),
                ("N c b p, |E| >= 25 (m known)", ("N", "c", "b", "p"), "bins", 25.0, 200.0),
            ]
        rows.append((name, "counting_limit_K", limit, 1.0))
        for label, nuis, dos, emin, emax in sets:
            bound = fisher_bound(case, nuis, dos=dos, e_min_meV=emin, e_max_meV=emax)
            rows.append((name, label, bound, bound / limit))
    return rows


def main() -> None:
    print(f"{'scenario':<22} {'unknown besides T and the DOS; channels':<40} {'sigma_T (K)':>11} {'/ limit':>8}")
    for name, label, bound, ratio in table():
        print(f"{name:<22} {label:<40} {bound:11.3f} {ratio:8.3f}")


if __name__ == "__main__":
    main()
