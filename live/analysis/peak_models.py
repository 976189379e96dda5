"""The least-squares problems of the peak fits (:mod:`.peaks`): Gaussian peaks with the zero-loss peak, detailed
balance, neighbouring regions' spectra and a power law (:func:`zlp_problem`), or plain (resolution-convolved)
Gaussians (:func:`plain_problem`).  A problem holds the fitted channels, the model and its Jacobian as functions
of the parameter vector ``[front..., (height, centre, sigma) x n, back...]``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from .peak_resolution import fit_resolution, resolution_function

Array = NDArray[np.float64]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
KB_MEV_PER_K = 8.617333262e-2


@dataclass
class Problem:
    """A least-squares problem with ``n`` peaks: ``p = [front..., (a, c, s) x n, back...]``."""

    e: Array  # fitted channels
    y: Array
    sd: Array
    front: Array  # start values of the parameters before the peaks
    back: Array  # ... and after them
    front_bounds: tuple[Array, Array]
    back_bounds: tuple[Array, Array]
    model: Callable[[Array, int], Array]
    jac: Callable[[Array, int], Array] | None  # residual Jacobian, or None for finite differences
    linear_back: NDArray[np.intp]  # back parameters that enter linearly (start by least squares)
    search: Array  # loss energies where a new peak may start (window)
    resolution_fwhm: float  # NaN: no resolution model

    @property
    def n_front(self) -> int:
        return self.front.size



def zlp_problem(
    e_all: Array,
    y_all: Array,
    window: tuple[float, float],
    sigma: ArrayLike | None,
    background_subtracted: bool | None,
    temperature_K: float,
    components: ArrayLike | None,
    core_meV: float,
    ext: float,
) -> Problem:
    """Model with the zero-loss peak (see :func:`fit_peaks`): ``A R(E - c0) + R (*) [peaks x detailed balance]
    + components - power law``."""
    disp = float(e_all[1] - e_all[0])
    if background_subtracted is None:
        # a power law fitted at 16-70 meV explodes towards 0: the loss-side core falls far below the mirror
        pos = (e_all > 0.25 * core_meV) & (e_all <= core_meV)
        mirror = np.interp(-e_all[pos], e_all, y_all)
        background_subtracted = bool(np.any(y_all[pos] < 0.5 * mirror))
    c0, amp, fw, mm = fit_resolution(e_all, y_all, core_meV=core_meV, gain_side_only=background_subtracted)
    hi = float(window[1])
    if background_subtracted:
        sel = ((e_all >= -hi) & (e_all <= 0.0)) | ((e_all >= window[0]) & (e_all <= hi))
    else:
        sel = (e_all >= -hi) & (e_all <= hi)
    ew, yw = e_all[sel], y_all[sel]
    zlp = amp * resolution_function(ew - c0, fw, mm, disp)
    if sigma is None:
        var = np.maximum(yw, 0.0)
        if background_subtracted:
            var = np.where(ew > 0, np.maximum(yw, 0.0) + zlp, var)
        sd = np.sqrt(np.maximum(var, 1.0))
    else:
        sd = np.asarray(sigma, float)[sel]
    comp = np.zeros((0, ew.size))
    if components is not None:
        rows = []
        for c_spec in np.atleast_2d(np.asarray(components, float)):
            q = fit_resolution(e_all, c_spec, core_meV=core_meV, gain_side_only=background_subtracted)
            sig_j = (c_spec - q[1] * resolution_function(e_all - q[0], q[2], q[3], disp))[sel]
            # only the phonon range: the core residual of a ZLP fit is not signal
            rows.append(np.where(np.abs(ew) >= window[0], sig_j, 0.0))
        comp = np.array(rows)
    n_comp = comp.shape[0]
    # regular grid under the fitted range (the gap of a background-subtracted fit included), padded by the kernel
    nk = int(round(ext / disp))
    i_lo = int(np.round((ew[0] - e_all[0]) / disp))
    i_hi = int(np.round((ew[-1] - e_all[0]) / disp))
    grid = e_all[0] + disp * np.arange(i_lo - nk, i_hi + nk + 1)
    take = np.round((ew - grid[0]) / disp).astype(np.intp)  # + nk below: the kernel is centred
    lag = disp * np.arange(-nk, nk + 1)
    nfft = scipy.fft.next_fast_len(grid.size + lag.size)
    pl_x = np.where(ew > 0, ew, 1.0)
    n_pl = 2 if background_subtracted else 0
    n_z = 3 if background_subtracted else 4  # ZLP parameters refined with the peaks (c0 fixed at 0 if gain only)
    nf = 1 + n_z
    cache: dict[tuple[Any, ...], Array] = {}

    def kernel_fft(zw: float, zm: float) -> Array:
        """FFT of the unit-sum resolution kernel; the last one is kept (most evaluations share it)."""
        key = ("k", zw, zm)
        if key not in cache:
            for old in [q for q in cache if q[0] == "k"]:
                del cache[old]
            kern = resolution_function(lag, zw, zm, disp)
            cache[key] = scipy.fft.rfft(kern / kern.sum(), nfft)
        return cache[key]

    def zlp_shape(zc: float, zw: float, zm: float) -> Array:
        key = ("z", zc, zw, zm)
        if key not in cache:
            for old in [q for q in cache if q[0] == "z"]:
                del cache[old]
            cache[key] = resolution_function(ew - zc, zw, zm, disp)
        return cache[key]

    def unpack(p: Array, n: int) -> tuple[float, float, float, float, float, Array, Array]:
        z = p[1:nf]
        zc = z[3] if n_z == 4 else c0
        return p[0], z[0], z[1], z[2], zc, p[nf : nf + 3 * n], p[nf + 3 * n :]

    def model(p: Array, n: int) -> Array:
        t, za, zw, zm, zc, pk, q = unpack(p, n)
        x = grid - zc
        ax = np.abs(x)
        a, c, s = pk[0::3], pk[1::3], pk[2::3]
        g = (a[:, None] * np.exp(-0.5 * ((ax[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)
        g = np.where(x > 0, g, g * np.exp(-ax / (KB_MEV_PER_K * t)))
        conv = scipy.fft.irfft(scipy.fft.rfft(g, nfft) * kernel_fft(zw, zm), nfft)[nk:][take]
        out = za * zlp_shape(zc, zw, zm) + conv
        if n_comp:
            out = out + q[:n_comp] @ comp
        if n_pl:
            out = out - np.where(ew > 0, q[n_comp] * (pl_x / 30.0) ** (-q[n_comp + 1]), 0.0)
        return out

    inv_sd = 1.0 / sd

    def jacobian(p: Array, n: int) -> Array:
        """Residual Jacobian: peaks, components and power law analytic (one batched FFT convolution of
        the Gaussian derivatives with the resolution kernel), temperature and ZLP by forward differences."""
        jac = np.empty((ew.size, p.size))
        f0 = model(p, n)
        for j in range(nf):
            step = 1.49e-8 * max(abs(p[j]), 1.0)
            pj = p.copy()
            pj[j] += step
            jac[:, j] = (model(pj, n) - f0) / step
        t, _za, zw, zm, zc, pk, q = unpack(p, n)
        a, c, sg = pk[0::3, None], pk[1::3, None], pk[2::3, None]
        x = grid - zc
        ax = np.abs(x)
        bose = np.where(x > 0, 1.0, np.exp(-ax / (KB_MEV_PER_K * t)))
        d = (ax[None, :] - c) / sg
        gb = np.exp(-0.5 * d * d) * bose[None, :]
        parts = np.empty((3 * n, grid.size))
        parts[0::3] = gb
        parts[1::3] = gb * (a * d / sg)
        parts[2::3] = gb * (a * d * d / sg)
        if n:
            conv = scipy.fft.irfft(scipy.fft.rfft(parts, nfft, axis=-1) * kernel_fft(zw, zm), nfft, axis=-1)
            jac[:, nf : nf + 3 * n] = conv[:, nk:][:, take].T
        col = nf + 3 * n
        if n_comp:
            jac[:, col : col + n_comp] = comp.T
        if n_pl:
            xr = pl_x / 30.0
            powr = np.where(ew > 0, xr ** (-q[n_comp + 1]), 0.0)
            jac[:, col + n_comp] = -powr
            jac[:, col + n_comp + 1] = q[n_comp] * powr * np.log(xr)
        return jac * inv_sd[:, None]

    front = np.array([temperature_K, amp, fw, mm, c0])[:nf]
    f_lo = np.array([1.0, 0.0, 0.25 * fw, 0.5, c0 - 3.0])[:nf]
    f_hi = np.array([1e5, np.inf, 4.0 * fw, 100.0, c0 + 3.0])[:nf]
    back = np.zeros(n_comp + n_pl)
    b_lo = np.full(back.size, -np.inf)
    b_hi = np.full(back.size, np.inf)
    if n_pl:
        back[-1], b_lo[-1], b_hi[-1] = 4.0, 0.0, 12.0
    linear = np.arange(n_comp + (1 if n_pl else 0))
    return Problem(ew, yw, sd, front, back, (f_lo, f_hi), (b_lo, b_hi), model, jacobian, linear,
                    np.array(window, float), float(fw))


def plain_problem(e_all: Array, y_all: Array, window: tuple[float, float], sigma: ArrayLike | None,
                   resolution: tuple[float, float] | None, ext: float) -> Problem:
    """Gaussians in ``window`` (no zero-loss peak), convolved with a given resolution ``(fwhm, m)`` or not."""
    disp = float(e_all[1] - e_all[0])
    sel = (e_all >= window[0]) & (e_all <= window[1])
    ew, yw = e_all[sel], y_all[sel]
    sd = np.ones_like(yw) if sigma is None else np.asarray(sigma, float)[sel]
    if resolution is None:

        def model(p: Array, n: int) -> Array:
            a, c, s = p[0 : 3 * n : 3], p[1 : 3 * n : 3], p[2 : 3 * n : 3]
            return (a[:, None] * np.exp(-0.5 * ((ew[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)

        fwhm = float("nan")
    else:
        fwhm, mm = (float(v) for v in resolution)
        nk = int(round(ext / disp))
        grid = ew[0] + disp * np.arange(-nk, ew.size + nk)
        kern = resolution_function(disp * np.arange(-nk, nk + 1), fwhm, mm, disp)
        kern /= kern.sum()

        def model(p: Array, n: int) -> Array:
            a, c, s = p[0 : 3 * n : 3], p[1 : 3 * n : 3], p[2 : 3 * n : 3]
            g = (a[:, None] * np.exp(-0.5 * ((grid[None, :] - c[:, None]) / s[:, None]) ** 2)).sum(0)
            return np.convolve(np.where(grid > 0, g, 0.0), kern, mode="valid")

    empty = np.zeros(0)
    return Problem(ew, yw, sd, empty, empty, (empty, empty), (empty, empty), model, None,
                    np.zeros(0, np.intp), np.array(window, float), fwhm)
