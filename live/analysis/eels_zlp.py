"""Zero-loss-peak fit: a batched, weighted Levenberg-Marquardt fit of a Pearson VII in ``|E - centre|``
windows on both sides, corrected for the phonon signal spilled into them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._threads import row_blocks, thread_map
from .eels_alignment import zlp_centre
from .eels_pearson7 import Nodes, channel_nodes, integration_order
from .eels_spill import SignalModel, _signal_model
from .eels_windows import Array, Reach, _axis, _floating, near_window_for_resolution, reach, zlp_windows
from .eels_zlp_lm import _lm, _normal_j, _shared_shape, _solve_amplitude, held_params, hold
from .eels_zlp_power import P_START, core_of, tails_start
from .eels_zlp_shapes import NPARAMS, P3_START, POWER, SHAPES, shape_f, zlp_model


@dataclass
class ZLPFit:
    """Pearson VII fits of the zero-loss peak of many spectra.

    Attributes
    ----------
    params
        ``(..., q)``: amplitude (counts per channel at the peak), centre_meV, fwhm_meV, m (or eta), and for the
        :data:`~.eels_zlp_shapes.POWER` family the tails' height b and exponent p (:mod:`.eels_zlp_power`).
    cov
        ``(..., q, q)`` covariance (inverse of the weighted normal matrix, scaled by sqrt(max(1, chi2_red))
        when ``scale_covariance``).
    chi2_red
        Reduced chi-square of the fit in the windows.
    n_iter
        Levenberg-Marquardt iterations used.
    windows_meV
        The |E - centre| windows asked for.
    signal
        The resolution-deconvolved phonon signal used to correct the fit windows for signal spilled into
        them (:class:`SignalModel`), or None (``signal_correction=0``).
    """

    params: Array
    cov: Array
    chi2_red: Array
    n_iter: int
    windows_meV: tuple[tuple[float, float], ...]
    signal: SignalModel | None = field(default=None, repr=False)
    loss_windows_meV: tuple[tuple[float, float], ...] = ()
    """The windows fitted on the loss side: ``windows_meV`` intersected with the acquired range."""
    gain_windows_meV: tuple[tuple[float, float], ...] = ()
    """The windows fitted on the gain side."""
    reach: Reach | None = None
    """How far the acquired axis reaches on each side of the fitted centres."""
    channel_meV: float = 0.0
    """Channel width the model is integrated over (the dispersion), with ``order`` Gauss-Legendre nodes."""
    order: int = 1
    """Nodes per channel of the channel integral (1: the channel centre)."""
    dof: int = 1
    """Degrees of freedom of ``chi2_red`` (window channels less fitted parameters)."""
    signal_range_meV: tuple[float, float] = (40.0, 130.0)
    """The ``|E - centre|`` range of the spill model's signal."""
    shape: str = "pearson7"
    """The zero-loss shape family fitted (:data:`~.eels_zlp_shapes.SHAPES` or :data:`~.eels_zlp_shapes.POWER`):
    ``params[..., 3]`` is its m or eta."""

    @property
    def nodes(self) -> Nodes | None:
        """The channel-integration nodes of the fitted model (None: channel centres)."""
        return channel_nodes(self.order, self.channel_meV) if self.order > 1 and self.channel_meV > 0 else None

    @property
    def errors(self) -> Array:
        """One-sigma parameter errors ``(..., q)``."""
        return np.sqrt(np.maximum(np.diagonal(self.cov, axis1=-2, axis2=-1), 0.0))

    def model(self, energy_meV: ArrayLike) -> Array:
        """The fitted ZLP on an energy axis (broadcast ``(..., n)``): counts of channels centred there."""
        return zlp_model(energy_meV, self.params, self.shape, channel_meV=self.channel_meV, order=self.order)


def _window_index(
    off: Array,
    disp: float,
    centre: Array,
    n: int,
    windows: tuple[tuple[float, float], ...],
    gain_windows: tuple[tuple[float, float], ...] | None = None,
) -> NDArray[np.intp]:
    """Channel indices (k, m) of the |E - centre| windows, same count for every spectrum.

    ``windows`` on the loss side and ``gain_windows`` (default: the same) on the gain side: channels with
    ``lo <= E - centre`` (loss side) and ``lo < centre - E`` (gain side), ``floor((hi - lo) / disp)`` of each.
    """
    cols = []
    for lo, hi in windows:
        cnt = max(1, int(np.floor((hi - lo) / disp)))
        start_loss = np.ceil((centre + lo - off) / disp).astype(np.intp)
        cols.append(start_loss[:, None] + np.arange(cnt)[None, :])
    for lo, hi in windows if gain_windows is None else gain_windows:
        cnt = max(1, int(np.floor((hi - lo) / disp)))
        # channels with E < centre - lo: floor, except that a channel exactly at the centre (a window from 0
        # and a sum whose peak sits on a channel) is the loss side's only
        start_gain = (np.ceil((centre - lo - off) / disp) - 1).astype(np.intp)
        cols.append(start_gain[:, None] - np.arange(cnt)[None, :])
    idx = np.concatenate(cols, axis=1)
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError("ZLP fit windows run off the energy axis")
    return idx


_LM_ROWS = 256
"""Spectra per block of the batched Levenberg-Marquardt (the spectra are independent; blocks keep the
``(rows, 4, n)`` Jacobians and temporaries in cache instead of streaming them from memory every iteration,
and few enough numpy calls per spectrum that their overhead does not dominate)."""


def fit_zlp_pearson7(
    energy_meV: ArrayLike,
    spectra: ArrayLike,
    *,
    windows_meV: tuple[tuple[float, float], ...] = ((6.0, 30.0), (130.0, 200.0)),
    initial: ArrayLike | None = None,
    max_iter: int = 30,
    read_noise_counts: float = 0.0,
    scale_covariance: bool = True,
    signal_correction: int = 2,
    signal_range_meV: tuple[float, float] = (40.0, 130.0),
    lr_iterations: int = 40,
    tol: float = 3e-6,
    spill_uncertainty: float = 0.5,
    signal_groups: int | ArrayLike | None = 16,
    workers: int | None = None,
    reweight_tol: float = 0.05,
    channel_integration: bool = True,
    near_window_fwhm: float | None = 3.0,
    near_window_max_meV: float = 45.0,
    shapes: tuple[str, ...] = SHAPES,
    shape_chi2: float = 3.0,
    power_tails: bool = True,
    power_from_fwhm: float = 3.0,
    power_chi2: float = 5.0,
    held_m: bool = False,
    held_p: bool = False,
) -> ZLPFit:
    """Fit a symmetric Pearson VII to the zero-loss peak in ``|E - centre|`` windows on both sides.

    A batched Levenberg-Marquardt over blocks of spectra (normal equations ``(k, 4, 4)`` solved with
    ``np.linalg.solve``).  Weights are Poisson, ``1 / (model + read_noise^2)``: a first fit weighted by
    the starting model, then a refit weighted by that fit's model (no bias towards low counts) -- for a
    large batch (shared starting shape, see ``initial``) only where those weights differ from the first
    fit's by more than ``reweight_tol``: elsewhere the refit would move the parameters by < 0.1 sigma.

    Parameters
    ----------
    energy_meV
        Uniform energy axis ``(n,)`` or ``(..., n)``, ZLP near 0 up to drift.
    spectra
        Counts ``(..., n)``.
    windows_meV
        ``|E - centre|`` intervals fitted, on the loss and the gain side alike; each is intersected with the
        range acquired on each side (:func:`~.eels_windows.zlp_windows`) and kept where it stays usable;
        :class:`~.eels_windows.WindowError` (one-line reason) when a window is left on neither side.
    initial
        Optional ``(..., 4)`` or ``(4,)`` starting parameters; default: centre from :func:`zlp_centre`,
        shape from a fit of the mean spectrum, and for more than ``_START_ROWS`` spectra the median shape
        of that many evenly spaced spectra fitted first (with the spill correction), amplitude re-solved
        per spectrum: the fits then converge in 2-3 iterations.
    read_noise_counts
        Gaussian read noise added to the Poisson variance.
    scale_covariance
        Multiply the covariance by ``sqrt(max(1, chi2_red))`` (half the Birge ratio's power: calibrated on the
        demo's thermometry at 50 and 200 frames per point, where chi2_red of the windows is 3.5-7 from
        residuals of the spill model rather than of the zero-loss shape; the full ratio overstates the
        temperature error (pull RMS 0.81 on AlN at 50 frames), none understates it (1.39 on SiC at 200)).
    signal_correction
        Number of refits after removing from the windows the phonon signal spilled into them by the
        resolution function: the signal in ``signal_range_meV`` (both sides) is deconvolved
        (:func:`signal_model`, ``lr_iterations`` masked Lucy-Richardson iterations with the fitted ZLP) and
        blurred again; its part outside the range is subtracted from the windows (0 = plain fit).  With 1 the
        spill model is computed once, at the starting parameters -- for a batch the shape of the mean
        spectrum, alone the spectrum's own: results then depend on the company a spectrum is fitted in (up to
        0.25 sigma).  The default 2 recomputes it at the first fit's parameters: batch and one spectrum at a
        time agree within 0.01 sigma (same grouping).
    spill_uncertainty
        Relative systematic error of that spill estimate, added to the channel variances (``(f spill)^2``):
        window channels dominated by spilled signal (loss side above 130 meV next to a 116 meV mode) then
        carry little weight instead of biasing the width.
    lr_iterations
        Lucy-Richardson iterations of the final spill model (earlier rounds: at most 30).  It is also the
        deconvolved signal of the temperature's resolution offset: 30 iterations leave a structure in the
        log ratio that grows with dose (line chi2_red 50-60 at 200 x 1200 ms, bias -0.026 % on SiC, pull RMS
        2.1).  40 iterations with Biggs-Andrews acceleration (:data:`~.eels_spill.ACCELERATE`; about as
        converged as 150 plain ones): line chi2_red 1.1-2, |bias| <= 0.01 %.  More (80) deconvolves a single
        noisy spectrum further than its group: batch and one-at-a-time then differ by up to 0.13 sigma.
    signal_groups
        Spectra that share one deconvolution of the spill model (:func:`signal_model` ``groups``): a group
        size (default 16: spectra grouped by signal shape, and kept in a group only where shown equivalent,
        :func:`~.eels_spill._equivalent_groups`), ``(k,)`` labels, or None (one per spectrum).
    tol
        Convergence threshold (relative chi-square change) of the Levenberg-Marquardt iterations.  At 3e-5
        (chi-square ~400: a change of ~0.01) the parameters lie within 0.1 sigma of full convergence, 0.03
        sigma RMS (measured on a 10,000-spectrum map against tol = 1e-7), but a batch and one spectrum at a time
        stop at different points: up to 0.18 sigma apart on a two-material map.  At 3e-6 (the default, ~15 % more
        CPU) they agree within 0.007 sigma.
    workers
        Threads fitting blocks of spectra side by side (default: one per CPU); the result does not depend on it.
    reweight_tol
        Largest relative change of any window channel's weight for which a spectrum of a large batch is not
        refitted (0: always refit).  At 0.05 about 2 % of a 10,000-spectrum map is refitted; parameters
        differ from always refitting by <= 0.07 sigma, their errors by <= 2 %.
    channel_integration
        Fit the Pearson VII integrated over each channel (:func:`~.eels_pearson7.integration_order` Gauss-Legendre
        nodes, as few as integrate the starting shape to 1e-6; 1 = channel centres).  Centres alone make the model
        1e-3 too low 5 meV from an 8.3 meV peak at 0.44 meV per channel (several sigma at 1e8 counts), 2 % at 2 meV;
        a fit of windows from 0 meV then biases the FWHM by +0.08 % at 0.44 and +1.6 % at 2 meV per channel.
    near_window_fwhm, near_window_max_meV
        Where ``near_window_fwhm`` x the starting FWHM (rounded to 5 meV) reaches the spill model's signal range
        (40 meV: a resolution of 12.5 meV FWHM or coarser), the near window (the first) ends there, at most at
        ``near_window_max_meV``, and the signal range starts at its end
        (:func:`~.eels_windows.near_window_for_resolution`).  At 15 meV resolution 6-30 meV is only 0.4-2 FWHM of
        flank: the exponent m, and so the tail under the thermometry window, were extrapolated from too little of
        it (zero-loss part of the temperature error 0.47 K -> 0.34 K; scatter 1.18 -> 1.12x the counting limit on
        1,000 spectra).  Finer resolutions keep the windows as given (at 10-12 meV the zero-loss part is already
        small, and a window to 35 meV moved batch against one spectrum at a time from 0.08 to 0.10 sigma).
        None: as given.
    shapes, shape_chi2
        Zero-loss shape families (:data:`~.eels_zlp_shapes.SHAPES`): the first is fitted; where the median
        chi2_red of its windows exceeds ``shape_chi2`` (<= 2.3 where the Pearson VII holds, 1.6e4 on a
        pseudo-Voigt zero-loss peak), each other family is fitted too and the one with the lowest median chi2_red
        is returned (same number of parameters: chi2 is the information criterion).  One family per batch (an
        instrument's shape; a scan row).
    power_tails, power_from_fwhm, power_chi2
        Where the best of ``shapes`` still exceeds ``shape_chi2``, also fit the Pearson VII with symmetric power-law
        tails (:data:`~.eels_zlp_shapes.POWER`, :mod:`.eels_zlp_power`) and return it where it describes its windows
        (median chi2_red <= ``power_chi2``: 1.0 under the corpus's symmetric tails, 3,200 under a background on the
        loss side only, which a symmetric term must not absorb; otherwise the peak family's fit is returned and its
        chi-square refuses the temperature as before).  Its near window starts at ``power_from_fwhm`` FWHM (rounded
        to 5 meV) and ends at ``near_window_max_meV`` (the tails' onset near the core is not a power law), the spill
        model's signal range starting there; its height and FWHM are held at the data's
        (:func:`~.eels_zlp_power.core_of`).  Not tried where that window would be shorter than 10 meV (resolution
        coarser than about 11.5 meV at the default 45 meV).
    held_m
        :data:`~.eels_zlp_shapes.POWER` only: hold the exponent m at its value in ``initial`` too (the thermometry's
        profile of m, :mod:`.eels_power_profile`).
    held_p
        :data:`~.eels_zlp_shapes.POWER` only: hold the tails' exponent p at its value in ``initial`` (a session's
        shared tail shape, :mod:`.eels_tail_pool`).

    Returns
    -------
    ZLPFit
    """
    s = _floating(spectra)  # float32 stays float32: only gathered channels are converted
    batch, n = s.shape[:-1], s.shape[-1]
    off, disp = _axis(energy_meV, n, batch)
    flat = s.reshape(-1, n)
    off = off.reshape(-1)
    k = flat.shape[0]
    rn2 = float(read_noise_counts) ** 2
    shape = shapes[0]
    asked = (windows_meV, signal_range_meV)
    if initial is None:
        centre = off + disp * zlp_centre(np.arange(n, dtype=float), flat, workers=workers)
    else:
        p0 = np.broadcast_to(np.asarray(initial, float), (k, NPARAMS[shape])).copy()
        centre = p0[:, 1]
    where = reach(off, disp, n, centre)
    loss_w, gain_w = zlp_windows(tuple((float(a), float(b)) for a, b in windows_meV), where)
    if initial is None:
        p0 = _initial_from_mean(flat, off, disp, centre, loss_w, gain_w, rn2, shape)
    adapted = near_window_for_resolution(tuple((float(a), float(b)) for a, b in windows_meV),
                                         float(np.median(p0[:, 2])), fwhm_multiple=near_window_fwhm,
                                         max_meV=near_window_max_meV, from_meV=float(signal_range_meV[0]))
    if adapted[0] != tuple(windows_meV[0]):
        windows_meV = adapted
        loss_w, gain_w = zlp_windows(adapted, where)
        signal_range_meV = (max(float(signal_range_meV[0]), adapted[0][1]), float(signal_range_meV[1]))
    idx = _window_index(off, disp, centre, n, loss_w, gain_w)
    order = 1
    if channel_integration:
        m = float(np.median(p0[:, 3])) if shape != "pseudo_voigt" else 1.0  # a Lorentzian's curvature: m = 1
        order = integration_order(off[0] + disp * idx[0] - centre[0], np.median(p0[:, 2]), m, disp)
    nodes = channel_nodes(order, disp) if order > 1 else None
    # Poisson weights from the model (no bias towards low counts); the phonon signal spilled into the
    # windows is estimated from the current parameters and removed before each fit.  After the spill model
    # (all spectra), everything runs per block of ``_LM_ROWS`` spectra: windows, spill, weights and the fits,
    # so that no (k, window) temporaries are allocated (first-touch page faults cost more than the arithmetic).
    sc = int(signal_correction)
    fits_per_model = [2] if sc <= 1 else [1] * sc  # refits per spill model (2 passes at least)
    p = p0.copy()
    npar = NPARAMS[shape]
    h = np.empty((k, npar, npar))
    chi2 = np.empty(k)
    sig: SignalModel | None = None
    n_it = 0
    good_start = False

    def block(rows: slice | NDArray[np.intp], p_at: Array, gb: Array | None, full: Array | None) -> tuple[
        Array, Array, Array
    ]:
        """Energies, spill-corrected counts and systematic variance of the windows of ``rows``."""
        ix = idx[rows]
        xb = off[rows, None] + disp * ix
        yb = np.take_along_axis(flat[rows], ix, axis=1).astype(float)
        if sig is None:
            return xb, yb, np.full(yb.shape, rn2)
        if gb is not None:
            # sampled from the blurred group signals (small, in cache), scaled by each amplitude
            assert sig.group is not None and sig.scale is not None
            spill = sig.sample(gb, xb - p_at[rows, 1:2], rows=sig.group[rows]) * sig.scale[rows, None]
        else:
            assert full is not None
            spill = sig.sample(full[rows], xb - p_at[rows, 1:2])
        yb -= spill
        # the spill model is uncertain (its blur depends on the fitted width itself): channels it dominates
        # are down-weighted by a relative systematic error ``spill_uncertainty``
        spill *= spill_uncertainty
        spill *= spill
        spill += rn2
        return xb, yb, spill

    def fit_rows(
        sl: slice, *, p_at: Array, gb: Array | None, full: Array | None, start_amp: bool, n_fit: int, good_start: bool
    ) -> NDArray[np.int_]:
        """Fit the spectra ``sl``: independent of every other block (blocks run on parallel threads)."""
        its = np.zeros(n_fit, int)
        xb, yb, vb = block(sl, p_at, gb, full)
        pb = p_at[sl].copy()
        model: tuple[Array, Array] | None = None
        if start_amp:  # shared shape: amplitude re-solved; model and Jacobian there reused by the fit
            pb[:, 0], model = _solve_amplitude(xb, yb, vb, pb, nodes, shape)
        wt = 1.0 / (np.maximum(shape_f(shape)(xb, pb, nodes) if model is None else model[0], 1e-3) + vb)
        pb, _, chi2b, its[0], fb, jb = _lm(
            xb, yb, wt, pb, max_iter=max_iter, tol=tol, lam0=1e-5 if good_start else 1e-3, init=model, cov=False,
            nodes=nodes, shape=shape, held_m=held_m, held_p=held_p,
        )
        if n_fit > 1:
            # refit weighted by the fit's own model (no bias towards low counts), where the weights moved
            wt_fit = 1.0 / (np.maximum(fb, 1e-3) + vb)
            if start_amp:
                redo = np.flatnonzero(np.max(np.abs(wt_fit / wt - 1.0), axis=1) > reweight_tol)
            else:
                redo = np.arange(len(pb))
            if redo.size:
                pr, _, chi2b[redo], its[1], fr, jr = _lm(
                    xb[redo], yb[redo], wt_fit[redo], pb[redo], max_iter=max_iter, tol=tol, lam0=1e-5,
                    init=(fb[redo], jb[redo]), cov=False, nodes=nodes, shape=shape, held_m=held_m, held_p=held_p,
                )
                pb[redo], fb[redo], jb[redo], wt[redo] = pr, fr, jr, wt_fit[redo]
        # the covariance from a float64 normal matrix
        h[sl] = hold(_normal_j(jb.astype(float), wt)[0], shape, held_m, held_p)
        chi2[sl] = chi2b
        p[sl] = pb
        return its

    for i_model, n_fit in enumerate(fits_per_model):
        p_at = p.copy()  # the spill of this round is sampled around these centres
        gb = full = None
        if sc > 0:
            sig = _signal_model(
                off,
                disp,
                flat,
                p_at,
                signal_range_meV=signal_range_meV,
                extent_meV=210.0,
                coarse=_coarse(disp),
                # earlier rounds only start the fit: the final spill model (also the temperature's resolution
                # offset) is the one that must be deconvolved fully
                iterations=lr_iterations if i_model == len(fits_per_model) - 1 else min(int(lr_iterations), 30),
                groups=signal_groups,
                workers=workers,
                reach=where,
                nodes=nodes,
                shape=shape,
            )
            if sig.group_signal is not None and sig.group is not None and sig.scale is not None:
                gb = sig._convolve(sig.group_signal, sig.kernel_fft)
            else:
                full = sig.blurred()
        start_amp = False
        if i_model == 0 and initial is None and k > _START_ROWS:
            sub = np.unique(np.linspace(0, k - 1, _START_ROWS).round().astype(np.intp))
            p_at[:, 2:] = _shared_shape(*block(sub, p_at, gb, full), p_at[sub], max_iter=max_iter, tol=tol,
                                        nodes=nodes, shape=shape)
            start_amp = good_start = True
        fit = functools.partial(
            fit_rows, p_at=p_at, gb=gb, full=full, start_amp=start_amp, n_fit=n_fit, good_start=good_start
        )
        its = np.max(thread_map(fit, row_blocks(k, _LM_ROWS), workers), axis=0)
        n_it += int(its.sum())
        good_start = True
    dof = max(1, idx.shape[1] - (4 if shape != POWER else 6 - len(held_params(shape, held_m, held_p))))
    chi2_red = chi2 / dof
    cov = np.linalg.inv(h + 1e-300 * np.eye(npar))
    if scale_covariance:
        cov = cov * np.sqrt(np.maximum(1.0, chi2_red))[:, None, None]
    result = ZLPFit(
        params=p.reshape(batch + (npar,)),
        cov=np.asarray(cov, dtype=np.float64).reshape(batch + (npar, npar)),
        chi2_red=chi2_red.reshape(batch),
        n_iter=n_it,
        windows_meV=tuple((float(a), float(b)) for a, b in windows_meV),
        signal=sig,
        loss_windows_meV=loss_w,
        gain_windows_meV=gain_w,
        reach=where,
        channel_meV=float(disp),
        order=order,
        dof=dof,
        signal_range_meV=(float(signal_range_meV[0]), float(signal_range_meV[1])),
        shape=shape,
    )
    if not np.median(chi2_red) > shape_chi2 or shape == POWER:
        return result
    first = result
    for other in shapes[1:]:  # the zero-loss peak is not a Pearson VII: another family, where it fits better
        start = None
        if initial is not None:  # the same amplitude, centre and width; the family's own fourth parameter
            start = np.array(np.broadcast_to(np.asarray(initial, float), batch + (4,)))
            start[..., 3] = P3_START[other]
        alt = fit_zlp_pearson7(
            energy_meV, spectra, windows_meV=asked[0], initial=start, max_iter=max_iter,
            read_noise_counts=read_noise_counts, scale_covariance=scale_covariance, signal_correction=signal_correction,
            signal_range_meV=asked[1], lr_iterations=lr_iterations, tol=tol, spill_uncertainty=spill_uncertainty,
            signal_groups=signal_groups, workers=workers, reweight_tol=reweight_tol,
            channel_integration=channel_integration, near_window_fwhm=near_window_fwhm,
            near_window_max_meV=near_window_max_meV, shapes=(other,),
        )
        if np.median(alt.chi2_red) < np.median(result.chi2_red):
            result = alt
    height, fwhm = core_of(flat, off, disp, first.params.reshape(k, 4)[:, 1])
    fwhm = np.where(np.isfinite(fwhm), fwhm, first.params.reshape(k, 4)[:, 2])
    near_lo = 5.0 * round(float(power_from_fwhm) * float(np.median(fwhm)) / 5.0)
    if not (power_tails and shape == "pearson7" and np.median(result.chi2_red) > shape_chi2
            and near_lo + 10.0 <= near_window_max_meV):
        return result
    # neither family describes the windows: symmetric power-law tails on the Pearson VII, fitted beyond the core
    tail = (near_lo, float(near_window_max_meV))
    xs = off[:, None] + disp * idx
    height = np.where(np.isfinite(fwhm), height, first.params.reshape(k, 4)[:, 0])
    b0 = tails_start(xs, np.take_along_axis(flat, idx, axis=1).astype(float), height, first.params.reshape(k, 4)[:, 1])
    start = np.concatenate([first.params.reshape(k, 4), b0[:, None], np.full((k, 1), P_START)], axis=1)
    start[:, 0] = height
    start[:, 2] = fwhm

    def power(p_start: Array) -> ZLPFit:
        return fit_zlp_pearson7(
            energy_meV, spectra, windows_meV=(tail,) + tuple(asked[0][1:]), initial=p_start.reshape(batch + (6,)),
            max_iter=max(max_iter, 100), read_noise_counts=read_noise_counts, scale_covariance=scale_covariance,
            signal_correction=signal_correction, lr_iterations=lr_iterations, tol=min(tol, 1e-9),
            signal_range_meV=(max(float(asked[1][0]), tail[1]), float(asked[1][1])),
            spill_uncertainty=spill_uncertainty, signal_groups=signal_groups, workers=workers,
            reweight_tol=reweight_tol, channel_integration=channel_integration, near_window_fwhm=None, shapes=(POWER,),
        )

    # the peak's tail and the power law trade off in the near window: chi2 has a minimum for each exponent m of
    # roughly the same depth (2.13 and 2.55 for a true 2.5, chi2 0.999 and 0.978 on 100 channels).  Each spectrum
    # starts from the best of a few exponents; the final fit (with its own spill model) from there.
    best, chi2_best = start.copy(), np.full(k, np.inf)
    for m0 in POWER_M_STARTS:
        start[:, 3] = m0
        trial = power(start)
        c2 = trial.chi2_red.reshape(k)
        better = c2 < chi2_best
        best[better], chi2_best[better] = trial.params.reshape(k, 6)[better], c2[better]
    if not np.median(chi2_best) <= power_chi2:  # the tails do not describe the windows either (one-sided?)
        return result
    alt = power(best)
    # kept only where the tails are there: at 2 meV per channel the Pearson VII's chi2_red is 3.4-3.6 on a tenth of
    # the corpus's spectra without any tails; the tail fit then describes its windows with b = 0 (the peak alone,
    # its core held) and the m profile has no minimum, so those points lost their temperature
    b = np.asarray(alt.params, float).reshape(k, 6)[:, 4]
    b_err = np.sqrt(np.abs(np.asarray(alt.cov, float).reshape(k, 6, 6)[:, 4, 4]))
    with np.errstate(divide="ignore", invalid="ignore"):
        significance = float(np.median(np.where(b_err > 0, b / b_err, 0.0)))
    return alt if np.median(alt.chi2_red) <= power_chi2 and significance >= TAILS_SIGMA else result


TAILS_SIGMA = 5.0
"""The power-law tails are kept where their height b is at least this many standard errors above 0 (median over the
batch): 130-300 under the corpus's symmetric tails, 0 where the Pearson VII misses its windows for another
reason."""

POWER_M_STARTS = (1.5, 2.5, 4.0)
"""Starting Pearson VII exponents of the fit with power-law tails (one fit each; the best per spectrum is refined)."""


_START_ROWS = 64
"""Spectra (evenly spaced) whose individual fits give the shared starting shape of a large batch."""


def _initial_from_mean(
    flat: Array,
    off: Array,
    disp: float,
    centre: Array,
    windows: tuple[tuple[float, float], ...],
    gain_windows: tuple[tuple[float, float], ...],
    rn2: float,
    shape: str = "pearson7",
) -> Array:
    """Starting parameters: a fit of the centre-aligned mean spectrum, amplitude scaled per spectrum."""
    k, n = flat.shape
    c_ch = (centre - off) / disp
    ref_ch = float(np.round(np.median(c_ch)))
    sel = np.abs(c_ch - ref_ch) < 0.5 * n
    # integer-channel alignment is enough for a starting point
    use = np.flatnonzero(sel)[:256]
    roll = np.round(c_ch[use] - ref_ch).astype(np.intp)
    idx = np.clip(np.arange(n)[None, :] + roll[:, None], 0, n - 1)
    mean = np.take_along_axis(flat[use], idx, axis=1).mean(axis=0, dtype=float)
    e = disp * (np.arange(n) - ref_ch)
    peak = float(mean[int(ref_ch)])
    half = np.nonzero(mean >= 0.5 * peak)[0]
    fwhm = max(2 * disp, disp * (half[-1] - half[0] + 1))
    pm = np.array([[peak, 0.0, fwhm, P3_START[shape]]])
    cen = np.zeros(1)
    ix = _window_index(np.array([e[0]]), disp, cen, n, windows, gain_windows)
    y = mean[ix]
    x = np.asarray(e[ix], dtype=np.float64)
    pm, _, _, _, _, _ = _lm(x, y, 1.0 / (np.maximum(y, 1.0) + rn2), pm, max_iter=100, cov=False, shape=shape)
    i_max = np.clip(np.round(c_ch).astype(np.intp), 0, n - 1)
    amp = np.take_along_axis(flat, i_max[:, None], axis=1)[:, 0].astype(float)
    scale = amp / max(float(np.asarray(zlp_model(np.zeros((1, 1)), pm, shape))[0, 0]), 1e-30)
    p0 = np.empty((k, 4))
    p0[:, 0] = pm[0, 0] * scale
    p0[:, 1] = centre
    p0[:, 2] = pm[0, 2]
    p0[:, 3] = pm[0, 3]
    return p0


def _coarse(disp: float) -> int:
    """Channels per sample of the spill model's axis: 3 up to ~0.45 meV per channel (samples of 1.3 meV or less),
    fewer at coarser dispersion (at 2 meV per channel, samples of 6 meV left the 8.3 meV resolution and the
    optical modes unresolved: the log ratio's resolution offset was off by several sigma per bin)."""
    return max(1, min(3, int(round(1.32 / disp))))
