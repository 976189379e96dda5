"""Detailed-balance thermometry: ``log(I_loss(E) / I_gain(E)) = E / (k_B T)`` with the zero-loss peak
subtracted, the resolution offset removed and the zero-loss fit's covariance propagated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._threads import row_blocks, thread_map
from .eels_deconvolution import lucy_richardson
from .eels_pearson7 import Nodes
from .eels_power_profile import ExponentProfile, profile_exponent
from .eels_resolution import _resolution_offset
from .eels_spill import signal_model
from .eels_tail_pool import M_STEP, P_STEP, TailShape, shape_error_K
from .eels_windows import _ROWS, Array, _axis, _floating, both_sides, reach
from .eels_zlp import ZLPFit, fit_zlp_pearson7
from .eels_zlp_shapes import POWER, shape_f, shape_fj

KB_MEV_PER_K = 8.617333262e-2
"""Boltzmann constant in meV / K."""

MIN_BINS = 3
"""Fewest log-ratio bins for a temperature (a line through the origin and its scatter)."""


@dataclass
class TemperatureResult:
    """Detailed-balance temperatures of many spectra (arrays of the batch shape).

    Attributes
    ----------
    T_K
        Temperature from the slope of the line through the origin, ``T = 1 / (k_B slope)``.
    T_err_K
        Total one-sigma error: counting (Poisson of every detected electron) and the ZLP fit's
        covariance propagated through the slope, in quadrature.
    T_err_counting_K, T_err_zlp_K
        The two parts.
    slope_per_meV, slope_err_per_meV
        ``1 / (k_B T)`` and its error.
    chi2_red
        Reduced chi-square of the line fit.
    n_bins
        Bins used.
    zlp
        The ZLP fit.
    energy_meV, log_ratio, weights
        Bin centres ``(n_bins,)``, ``log(L/G)`` and weights ``(..., n_bins)`` (0 = excluded bin).
    """

    T_K: Array
    T_err_K: Array
    T_err_counting_K: Array
    T_err_zlp_K: Array
    slope_per_meV: Array
    slope_err_per_meV: Array
    chi2_red: Array
    n_bins: NDArray[np.int64]
    zlp: ZLPFit
    energy_meV: Array = field(repr=False)
    log_ratio: Array = field(repr=False)
    weights: Array = field(repr=False)
    window_meV: tuple[float, float] = (0.0, 0.0)
    """The ``|E - centre|`` window of the log-ratio bins used (after intersecting with the acquired range)."""
    m_unbounded: NDArray[np.bool_] | None = None
    """Power-law tails only (:mod:`.eels_power_profile`): where the zero-loss exponent m is not bounded by its grid
    (``T_K`` NaN there); None for the other zero-loss families."""
    m_profile: ExponentProfile | None = field(default=None, repr=False)
    """Power-law tails with m profiled: each spectrum's joint chi-square over m, for a session's shared tail shape
    (:func:`~.eels_tail_pool.pool_tail_shape`)."""


def _with_shape(energy_meV: ArrayLike, s: Array, zlp: ZLPFit, shape: TailShape, read_noise_counts: float,
                workers: int | None, thermometry: Callable[[ZLPFit], TemperatureResult]) -> TemperatureResult:
    """Temperature with m and p held at ``shape`` and its error propagated (see :func:`temperature`)."""
    def held(dm: float, dp: float) -> TemperatureResult:
        start = np.array(zlp.params, float).copy()
        start[..., 3], start[..., 5] = shape.m + dm, shape.p + dp
        z = fit_zlp_pearson7(energy_meV, s, windows_meV=zlp.windows_meV, initial=start, shapes=(POWER,),
                             held_m=True, held_p=True, near_window_fwhm=None, signal_range_meV=zlp.signal_range_meV,
                             max_iter=100, tol=1e-9, read_noise_counts=read_noise_counts, workers=workers)
        return thermometry(z)

    t0 = held(0.0, 0.0)
    t_m, t_p = held(M_STEP, shape.dp_dm * M_STEP), held(0.0, P_STEP)
    extra = shape_error_K(np.asarray(t0.T_K), np.asarray(t_m.T_K), np.asarray(t_p.T_K), shape)
    err = np.hypot(np.asarray(t0.T_err_K), extra)
    scale = np.where(np.asarray(t0.T_err_K) > 0, err / np.asarray(t0.T_err_K), 1.0)
    return replace(t0, T_err_K=err, T_err_zlp_K=np.hypot(np.asarray(t0.T_err_zlp_K), extra),
                   slope_err_per_meV=np.asarray(t0.slope_err_per_meV) * scale)


def _gather_side(flat: Array, pos0: Array, step: int, count: int) -> tuple[Array, Array, NDArray[np.intp]]:
    """Channels ``floor(pos0) + step * i`` (i = 0..count) and the fractional part of ``pos0``."""
    base = np.floor(pos0).astype(np.intp)
    frac = pos0 - base
    idx = base[:, None] + step * np.arange(count + 1)[None, :]
    return np.take_along_axis(flat, np.clip(idx, 0, flat.shape[1] - 1), axis=1).astype(float), frac, idx


def _bin_interp(v: Array, frac: Array, step: int, nb: int, b: int) -> tuple[Array, Array]:
    """Bin sums of the linear interpolation ``(1 - f) v_i + f v_(i+step)`` over ``b`` samples per bin.

    ``v`` holds channels ``base + step * i`` for step=+1 (interpolate towards +1) or step=-1 (then the
    interpolation partner of sample i is the previous channel, i.e. ``v_(i-1)``; handled by the caller
    passing the reversed fraction).  Returns the bin sums and the sum-of-squared-coefficients weights
    needed for the variance (as sums over channels with those coefficients).
    """
    k = v.shape[0]
    core = v[:, : nb * b].reshape(k, nb, b).sum(-1)
    first = v[:, 0 : nb * b : b]
    after = v[:, b : nb * b + 1 : b]
    f = frac[:, None]
    sums = core + f * (after - first)
    var = core - first + (1 - f) ** 2 * first + f**2 * after
    return sums, var


def log_ratio_bins(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    zlp: ZLPFit,
    *,
    window_min_meV: float = 55.0,
    window_max_meV: float | None = None,
    bin_meV: float = 2.2,
    read_noise_counts: float = 0.0,
    workers: int | None = None,
) -> dict[str, Array]:
    """Loss and gain signals in energy bins ``|E - centre|`` with ZLP subtracted, variances, derivatives.

    The loss side is sampled at ``centre + e`` and the gain side at ``centre - e`` (linear interpolation
    between channels, the same for data and model), summed in bins of ``bin_meV``.  Blocks of spectra run
    on ``workers`` threads (default: one per CPU).

    Returns
    -------
    dict
        ``e`` bin centres (n_bins,), ``L``, ``G`` (signals), ``SL``, ``SG`` (detected counts), ``vL``,
        ``vG`` (their Poisson + read-noise variances), ``cL``, ``cG`` (covariance of bin j with bin j + 1 from
        their shared boundary channel; last column 0), ``ZL``, ``ZG`` (ZLP model) and ``dL``, ``dG``
        ``(k, n_bins, 4)`` (derivatives of L and G with respect to the ZLP parameters), ``window`` (the
        window used: ``window_min_meV`` up to ``window_max_meV`` -- default the next zero-loss window --
        intersected with the range acquired on both sides).

    Raises
    ------
    WindowError
        If fewer than ``MIN_BINS`` bins or less than half the window remain (the message says why).
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    flat = s.reshape(-1, n)
    off = off.reshape(-1)
    p = zlp.params.reshape(-1, zlp.params.shape[-1])
    c = p[:, 1]
    b = max(1, int(round(bin_meV / disp)))
    where = reach(off, disp, n, c)
    upper = window_max_meV
    if upper is None:  # up to the next zero-loss window (its signal is not fitted there) or the end of the data
        starts = [w[0] for w in zlp.windows_meV if w[0] > window_min_meV]
        upper = min(starts) if starts else min(where.loss_meV, where.gain_meV)
    lower, upper = both_sides((window_min_meV, float(upper)), where, "the thermometry window",
                              min_channels=MIN_BINS * b, margin_channels=2.0)
    nb = int(np.floor((upper - lower) / (b * disp) + 1e-9))
    count = nb * b
    e_pts = window_min_meV + disp * np.arange(count)
    e_bins = e_pts.reshape(nb, b).mean(-1)
    rn2 = float(read_noise_counts) ** 2

    def rows(sl: slice) -> dict[str, Array]:
        return _log_ratio_rows(flat[sl], off[sl], p[sl], disp, window_min_meV, nb, b, rn2, zlp.nodes, zlp.shape)

    # blocks of spectra (temporaries stay in cache) on parallel threads
    parts = thread_map(rows, row_blocks(max(len(p), 1), _ROWS), workers)  # one block at least (its keys)
    shp = batch + (nb,)
    out: dict[str, Array] = {"e": np.asarray(e_bins, float), "e_points": np.asarray(e_pts.reshape(nb, b), float),
                             "window": np.array([window_min_meV, window_min_meV + count * disp])}
    for key in parts[0]:
        v = np.concatenate([part[key] for part in parts])
        out[key] = v.reshape(shp + v.shape[2:])
    return out


def _log_ratio_rows(
    flat: Array, off: Array, p: Array, disp: float, window_min_meV: float, nb: int, b: int, rn2: float,
    nodes: Nodes | None = None, shape: str = "pearson7",
) -> dict[str, Array]:
    """:func:`log_ratio_bins` for spectra ``flat`` ``(k, n)`` with offsets ``(k,)``, ZLP parameters ``(k, 4)``."""
    c = p[:, 1]
    count = nb * b
    # loss: positions (c + e - off) / disp increasing by 1 per sample
    posL = (c + window_min_meV - off) / disp
    vL_raw, fL, iL = _gather_side(flat, posL, +1, count)
    # gain: positions (c - e - off) / disp decreasing by 1 per sample; interpolate between floor and floor+1
    posG = (c - window_min_meV - off) / disp
    baseG = np.floor(posG).astype(np.intp)
    fG = posG - baseG
    # with u_i = channel baseG + 1 - i, the gain sample is (1 - g) u_i + g u_(i+1) with g = 1 - fG
    vG_raw, _, iG = _gather_side(flat, (baseG + 1.0).astype(np.float64), -1, count)
    gG = 1.0 - fG
    SL, varL = _bin_interp(vL_raw, fL, 1, nb, b)
    SG, varG = _bin_interp(vG_raw, gG, 1, nb, b)
    varL = varL + rn2 * _coef2(fL, nb, b)
    varG = varG + rn2 * _coef2(gG, nb, b)
    # neighbouring bins share their boundary channel (weights f and 1 - f): covariance f (1 - f) var
    # (bin j with bin j + 1; the last column is 0)
    covL = np.zeros_like(SL)
    covG = np.zeros_like(SG)
    covL[:, :-1] = (fL * (1.0 - fL))[:, None] * (vL_raw[:, b : nb * b : b] + rn2)
    covG[:, :-1] = (gG * (1.0 - gG))[:, None] * (vG_raw[:, b : nb * b : b] + rn2)
    # model at the same channels, same interpolation (float32, cache-blocked: rounding 6e-8 of a ZLP tail)
    f, fj = shape_f(shape), shape_fj(shape)
    ZL = _bin_sums(f(off[:, None] + disp * iL, p, nodes), fL, nb, b)
    ZG = _bin_sums(f(off[:, None] + disp * iG, p, nodes), gG, nb, b)
    # derivatives (for the ZLP covariance only): smooth across a bin, so b x the Jacobian at the bin centre
    # (the bin's points are pos +- (j b + i), i = 0..b-1, on the loss / gain side)
    mid = b * np.arange(nb) + 0.5 * (b - 1)
    dZL = b * fj((off[:, None] + disp * (posL[:, None] + mid)).astype(np.float32), p)[1].transpose(0, 2, 1)
    dZG = b * fj((off[:, None] + disp * (posG[:, None] - mid)).astype(np.float32), p)[1].transpose(0, 2, 1)
    # moving the centre moves the data sampling points too: d(data)/dc = slope of the detected spectrum;
    # the ZLP part of that slope is exact (the model's), so the data sampling cancels the model's
    # centre derivative for the ZLP and only the signal's own slope (neglected) would remain.
    dZL[..., 1] = 0.0
    dZG[..., 1] = 0.0
    return {
        "SL": SL,
        "SG": SG,
        # variance per expected count of a bin (interpolation weights of its channels) and the read-noise variance
        "qL": _coef2(fL, nb, b) / b,
        "qG": _coef2(gG, nb, b) / b,
        "rL": rn2 * _coef2(fL, nb, b),
        "rG": rn2 * _coef2(gG, nb, b),
        "vL": varL,
        "vG": varG,
        "cL": covL,
        "cG": covG,
        "ZL": ZL,
        "ZG": ZG,
        "L": SL - ZL,
        "G": SG - ZG,
        "dL": -dZL,
        "dG": -dZG,
    }


def _bin_sums(v: Array, frac: Array, nb: int, b: int) -> Array:
    """Bin sums (``(..., nb)``) of the linear interpolation of ``v`` ``(..., nb b + 1)`` (as :func:`_bin_interp`).

    ``frac`` broadcasts against ``v.shape[:-1]``.
    """
    first = v[..., 0 : nb * b : b]
    core = first.copy()
    for j in range(1, b):  # strided adds: faster than a reshape copy and a sum over a short axis
        core += v[..., j : nb * b : b]
    after = v[..., b : nb * b + 1 : b]
    core += frac[..., None] * (after - first)
    return core


def _coef2(f: Array, nb: int, b: int) -> Array:
    """Sum of squared interpolation coefficients per bin (for read noise)."""
    return (b - 1 + (1 - f) ** 2 + f**2)[:, None] * np.ones(nb)


def temperature(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    *,
    window_min_meV: float = 55.0,
    window_max_meV: float | None = None,
    bin_meV: float = 2.2,
    zlp_windows_meV: tuple[tuple[float, float], ...] = ((6.0, 30.0), (130.0, 200.0)),
    zlp: ZLPFit | None = None,
    deconvolve: bool = False,
    lr_iterations: int = 5,
    read_noise_counts: float = 0.0,
    min_snr: float = 2.0,
    bias_correction: bool = True,
    scale_by_chi2: bool | None = None,
    resolution_correction: bool | None = None,
    lr_correction_iterations: int = 30,
    zlp_weighting: bool = True,
    workers: int | None = None,
    profile_m: bool = True,
    tails_shape: TailShape | None = None,
) -> TemperatureResult:
    """Temperature from detailed balance, ``log(I_loss(E) / I_gain(E)) = E / (k_B T)``.

    Steps: Pearson VII ZLP fit (:func:`fit_zlp_pearson7`, unless ``zlp`` is given), ZLP subtracted from
    both sides, loss and gain signals binned at ``|E - centre|`` from ``window_min_meV`` to
    ``window_max_meV`` (default: the start of the next ZLP-fit window, 130 meV, or the end of the data),
    then a weighted least-squares line through the origin.

    Weights ``w = 1 / (var(L)/L^2 + var(G)/G^2)`` with the variances of all detected counts in the bins and
    L, G from a first pass split of L + G by the first slope (so the weights do not correlate with the
    noise of y); ``y`` gets the second-order correction ``var(L)/(2L^2) - var(G)/(2G^2)`` of the log bias.
    Bins where the expected gain signal is below ``min_snr`` standard deviations are dropped.

    Resolution correction (default on unless ``deconvolve``): the instrument blurs loss and gain alike,
    which offsets ``log(L/G)`` from ``E / k_B T`` by a deterministic, shape-dependent amount (several %
    in the slope at 10-12 meV resolution).  The loss signal is deconvolved once (:func:`signal_model`,
    masked LR with the fitted ZLP; reused from ``zlp.signal``), a detailed-balance source at the current
    slope is blurred with the fitted resolution, its offset ``c_i = log(L_c,i / G_c,i) - slope E_i`` in
    the same bins is subtracted from ``y`` and the line through the origin refitted (3 times).  Noise enters
    the offset only through the smooth, high-count loss side, so the scatter stays at the counting limit.

    The slope's error adds the counting error ``1 / sqrt(sum w E^2)`` and the ZLP fit's covariance
    propagated through the slope (``J C J^T`` with ``J = d slope / d params``) in quadrature.

    Parameters
    ----------
    scale_by_chi2
        Multiply the counting variance by ``max(1, chi2_red)`` of the line fit (Birge ratio); default on
        with ``deconvolve`` (LR correlates and amplifies the noise, which the Poisson weights ignore).
    deconvolve
        Run :func:`lucy_richardson` (``lr_iterations``) on the ZLP-subtracted signal (clipped at 0) with
        the fitted ZLP as PSF first (the reference's optional step; off by default).  The errors are then
        those of the raw data (an approximation).
    resolution_correction
        Remove the resolution offset of the log-ratio as above (default: ``not deconvolve``).
    lr_correction_iterations
        LR iterations of :func:`signal_model` when ``zlp.signal`` is absent.
    workers
        Threads for the blocks of spectra (default: one per CPU); the result does not depend on it.
    profile_m
        Where the zero-loss model has power-law tails (:data:`~.eels_zlp_shapes.POWER`, chosen by the fit only where
        the peak families do not describe its windows), choose its exponent m by the joint chi-square of the windows
        and the log ratio (:func:`~.eels_power_profile.profile_exponent`; ~16 fits instead of one).
    tails_shape
        Power-law tails only: hold m and the tails' exponent p at a session's shared values
        (:func:`~.eels_tail_pool.pool_tail_shape`) instead of profiling m; their errors are propagated to ``T_err_K``
        and ``T_err_zlp_K`` (finite differences, 3 fits).
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    if zlp is None:
        zlp = fit_zlp_pearson7(
            energy_meV, s, windows_meV=zlp_windows_meV, read_noise_counts=read_noise_counts, workers=workers
        )
    if tails_shape is not None and tails_shape.shared and zlp.shape == POWER:
        return _with_shape(energy_meV, s, zlp, tails_shape, read_noise_counts, workers, lambda z: temperature(
            energy_meV, s, window_min_meV=window_min_meV, window_max_meV=window_max_meV, bin_meV=bin_meV, zlp=z,
            deconvolve=deconvolve, lr_iterations=lr_iterations, read_noise_counts=read_noise_counts, min_snr=min_snr,
            bias_correction=bias_correction, scale_by_chi2=scale_by_chi2, resolution_correction=resolution_correction,
            lr_correction_iterations=lr_correction_iterations, zlp_weighting=zlp_weighting, workers=workers,
            profile_m=False))
    if profile_m and zlp.shape == POWER:
        z0 = zlp
        return profile_exponent(
            z0,
            lambda p0: fit_zlp_pearson7(
                energy_meV, s, windows_meV=z0.windows_meV, initial=p0, read_noise_counts=read_noise_counts,
                workers=workers, shapes=(POWER,), held_m=True, near_window_fwhm=None,
                signal_range_meV=z0.signal_range_meV, max_iter=100, tol=1e-9,
            ),
            lambda z: temperature(
                energy_meV, s, window_min_meV=window_min_meV, window_max_meV=window_max_meV, bin_meV=bin_meV, zlp=z,
                deconvolve=deconvolve, lr_iterations=lr_iterations, read_noise_counts=read_noise_counts,
                min_snr=min_snr, bias_correction=bias_correction, scale_by_chi2=scale_by_chi2,
                resolution_correction=resolution_correction, lr_correction_iterations=lr_correction_iterations,
                zlp_weighting=zlp_weighting, workers=workers, profile_m=False,
            ),
        )
    work = s
    if deconvolve:
        off, disp = _axis(energy_meV, n, batch)
        e = off[..., None] + disp * np.arange(n)
        psf = zlp.model(e)
        sig = lucy_richardson(
            np.maximum(s - psf, 1e-3),
            psf,
            iterations=lr_iterations,
            centre_channels=((zlp.params[..., 1] - off) / disp),
        )
        work = psf + sig
    d = log_ratio_bins(
        energy_meV,
        work,
        zlp,
        window_min_meV=window_min_meV,
        window_max_meV=window_max_meV,
        bin_meV=bin_meV,
        read_noise_counts=read_noise_counts,
        workers=workers,
    )
    e = d["e"]
    L, G, vL, vG = d["L"], d["G"], d["vL"], d["vG"]
    # pass 1: observed weights
    ok = (L > 0) & (G > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(ok, np.log(np.where(ok, L / np.where(ok, G, 1), 1)), 0.0)
        w = np.where(ok, 1.0 / (vL / np.where(ok, L, 1) ** 2 + vG / np.where(ok, G, 1) ** 2), 0.0)
    slope = (w * e * y).sum(-1) / np.maximum((w * e * e).sum(-1), 1e-300)
    slope = np.clip(slope, 1.0 / (KB_MEV_PER_K * 1e5), 1.0 / (KB_MEV_PER_K * 1.0))
    # pass 2: model-based signals from L + G and the first slope
    tot = L + G
    ex = np.exp(slope[..., None] * e)
    Lh = tot * ex / (1.0 + ex)
    Gh = tot / (1.0 + ex)
    # variances from the expected counts (signal estimate + zero-loss model), not the observed ones: observed
    # variances weight down the bins whose gain fluctuated up, which biases the slope up by ~1/counts (-0.2 %
    # in T at 4e7 zero-loss counts, -4 % at 4e6)
    vL = np.maximum(Lh + d["ZL"], 0.0) * d["qL"] + d["rL"]
    vG = np.maximum(Gh + d["ZG"], 0.0) * d["qG"] + d["rG"]
    good = ok & (Lh > 0) & (Gh > min_snr * np.sqrt(np.maximum(vG, 1e-300)))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(np.where(good, L, 1.0) / np.where(good, G, 1.0))
        rl = vL / np.where(good, Lh, 1.0) ** 2
        rg = vG / np.where(good, Gh, 1.0) ** 2
    if bias_correction:
        y = y + 0.5 * (rl - rg)
    w = np.where(good, 1.0 / (rl + rg), 0.0)
    y = np.where(good, y, 0.0)
    # ZLP covariance through the log ratio: dy/dp = dL/dp / L - dG/dp / G
    with np.errstate(divide="ignore", invalid="ignore"):
        dy = d["dL"] / np.where(good, Lh, 1.0)[..., None] - d["dG"] / np.where(good, Gh, 1.0)[..., None]
    dy = np.where(good[..., None], dy, 0.0)
    npar = zlp.params.shape[-1]
    wf = _gls_weights(w, e, dy, zlp.cov.reshape(w.shape[:-1] + (npar, npar))) if zlp_weighting else w
    swee = np.maximum((wf * e * e).sum(-1), 1e-300)
    slope = (wf * e * y).sum(-1) / swee
    offset = np.zeros_like(y)
    if resolution_correction is None:
        resolution_correction = not deconvolve
    if resolution_correction:
        signal = zlp.signal
        if signal is None:
            signal = signal_model(energy_meV, s, zlp.params, iterations=lr_correction_iterations, order=zlp.order,
                                  shape=zlp.shape)
        offset = _resolution_offset(signal, d["e_points"], slope.reshape(-1), iterations=3, y=y.reshape(-1, e.size),
                                    w=wf.reshape(-1, e.size), e=e)
        offset = offset.reshape(y.shape)
        slope = (wf * e * (y - offset)).sum(-1) / swee
    y = np.where(good, y - offset, 0.0)
    nbin = good.sum(-1)
    resid = y - slope[..., None] * e
    chi2_red = (w * resid**2).sum(-1) / np.maximum(nbin - 1, 1)
    # counting variance of the slope: the bins' own variances (1 / w) and the covariance of neighbouring bins
    # (they share a boundary channel; at 2 meV per channel and 2.2 meV bins it is 1/2 of a bin's variance)
    a = wf * e / swee[..., None]  # slope = sum a y
    both = good[..., 1:] & good[..., :-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        cov_y = np.where(both, d["cL"][..., :-1] / np.where(both, Lh[..., 1:] * Lh[..., :-1], 1.0)
                         + d["cG"][..., :-1] / np.where(both, Gh[..., 1:] * Gh[..., :-1], 1.0), 0.0)
        var_y = np.where(good, 1.0 / np.where(good, w, 1.0), 0.0)
    var_count = (a * a * var_y).sum(-1) + 2.0 * (a[..., 1:] * a[..., :-1] * cov_y).sum(-1)
    if scale_by_chi2 is None:
        scale_by_chi2 = deconvolve
    if scale_by_chi2:
        var_count = var_count * np.maximum(1.0, chi2_red)
    jb = (a[..., None] * dy).sum(-2)  # d slope / d ZLP parameters
    var_zlp = np.einsum("...i,...ij,...j->...", jb, zlp.cov, jb)
    var = var_count + var_zlp
    slope_safe = np.where(slope > 0, slope, np.nan)
    T = 1.0 / (KB_MEV_PER_K * slope_safe)
    conv = 1.0 / (KB_MEV_PER_K * slope_safe**2)
    return TemperatureResult(
        T_K=T,
        T_err_K=np.sqrt(var) * conv,
        T_err_counting_K=np.sqrt(var_count) * conv,
        T_err_zlp_K=np.sqrt(np.maximum(var_zlp, 0)) * conv,
        slope_per_meV=slope,
        slope_err_per_meV=np.sqrt(var),
        chi2_red=chi2_red,
        n_bins=nbin,
        zlp=zlp,
        energy_meV=e,
        log_ratio=y,
        weights=w,
        window_meV=(float(d["window"][0]), float(d["window"][1])),
    )


def _gls_weights(w: Array, e: Array, dy: Array, cov: Array) -> Array:
    """Per-bin weights ``u`` of the generalised least-squares line through the origin, ``slope = sum u e y /
    sum u e^2``, for the covariance ``V = diag(1 / w) + J C J^T`` of the log ratio (counting noise and the
    zero-loss fit's covariance ``C`` ``(..., 4, 4)`` through ``J = dy/dp`` ``(..., n_bins, 4)``).

    ``V^-1 e`` by the Woodbury identity (a 4 x 4 solve per spectrum); ``u = (V^-1 e) / e``.  Bins where the
    zero-loss tail (and so its uncertainty) dominates get less weight than counting alone would give them.
    """
    we = w * e
    jw = dy * w[..., None]  # W J
    m = np.einsum("...ni,...nj->...ij", jw, dy)  # J^T W J
    try:
        cinv = np.linalg.inv(cov)
        rhs = np.einsum("...ni,...n->...i", jw, we / np.maximum(w, 1e-300))  # J^T W e
        x = np.linalg.solve(cinv + m, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return w
    vinv_e = we - np.einsum("...ni,...i->...n", jw, x)
    out = vinv_e / e
    return np.where(np.isfinite(out), out, w)


def counting_limit_sigma_T(
    energy_meV: ArrayLike,
    loss: ArrayLike,
    gain: ArrayLike,
    var_loss: ArrayLike,
    var_gain: ArrayLike,
    temperature_K: ArrayLike,
) -> Array:
    """Counting-statistics limit of the temperature error of a line-through-origin fit.

    ``sigma_T = k_B T^2 / sqrt(sum_i E_i^2 w_i)``, ``w_i = 1 / (var(L_i)/L_i^2 + var(G_i)/G_i^2)``, with
    ``L_i``, ``G_i`` the (expected) background-subtracted loss and gain signals and the variances counting
    every detected electron in the channel or bin.  Sums over the last axis.
    """
    e = np.asarray(energy_meV, float)
    L = np.asarray(loss, float)
    G = np.asarray(gain, float)
    w = 1.0 / (np.asarray(var_loss, float) / L**2 + np.asarray(var_gain, float) / G**2)
    T = np.asarray(temperature_K, float)
    return KB_MEV_PER_K * T**2 / np.sqrt((e**2 * w).sum(-1))
