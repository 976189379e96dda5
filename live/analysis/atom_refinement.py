"""Gaussian atoms fitted to all projections of a tilt series at once: block Gauss-Seidel refinement, per-element
height and width, per-atom amplitudes (occupancies) with their errors (pure numpy).

Model: projection ``k`` is ``b_k + sum_i a_i exp(-|u - u_ik|^2 / (2 s_i^2))`` with ``u_ik = P(R_k r_i) / pixel +
t_k`` (:class:`.atoms3d.Geometry`), every Gaussian evaluated on a ``(2 radius + 1)^2`` pixel window
(:func:`.gaussians.gaussian_windows`), Poisson weights from the smoothed counts (:func:`poisson_weights`).

Why block Gauss-Seidel rather than one sparse solve (:func:`.gaussians.levenberg_marquardt`): at the reference size
(12 projections of 512^2, ~8,000 atoms) the Jacobian has ~65 million non-zeros (each atom's window in every
projection), and assembling it and running conjugate gradients over it dominated the time. Here the atoms are split
into groups whose images hardly overlap (metals, top chalcogens, bottom chalcogens: atoms of one group are at least
one lattice constant apart, ~5 probe sigmas in every projection), each group takes one damped Gauss-Newton step per
atom from its own ``p x p`` block with the others held fixed, and the residual images are updated in place. The
strong couplings (a metal and the chalcogen a tilt moves next to it; the two chalcogens of a site, which coincide
at zero tilt) are between groups, where Gauss-Seidel converges (the normal matrix is positive definite), at a cost
per sweep of two window evaluations per atom and projection and no matrix at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .gaussians import gaussian_windows

__all__ = ["ProjectionGeometry", "Refinement", "amplitude_errors", "element_profiles", "poisson_weights",
           "refine_gauss_seidel", "render_flat", "unmodelled_mask"]


class ProjectionGeometry(Protocol):
    """What the fits need of a tilt series' geometry (:class:`.atoms3d.Geometry`)."""

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(ny, nx)``."""
        ...

    def project(self, r_A: np.ndarray) -> np.ndarray:
        """``(n_proj, n_atoms, 2)`` image positions (row, col)."""
        ...

    def jacobian(self) -> np.ndarray:
        """``(n_proj, 2, 3)``: d(row, col) / d(x, y, z)."""
        ...


@dataclass(frozen=True, eq=False)
class Refinement:
    """Result of :func:`refine_gauss_seidel`.

    Attributes
    ----------
    positions_A : ndarray (n, 3)
    amplitude : ndarray (n,)
    background : ndarray (n_proj,)
    position_err_A : ndarray (n, 3)
        Standard errors from each atom's own block of ``J^T W J`` times the reduced chi^2 (conditional on the
        neighbours); inf where the atom is in no image.
    amplitude_err : ndarray (n,)
        Same for the amplitude (conditional).
    chi2 : float
        Reduced chi^2 of the final model.
    residual : ndarray (n_proj, ny * nx)
        Data minus model.
    """

    positions_A: np.ndarray
    amplitude: np.ndarray
    background: np.ndarray
    position_err_A: np.ndarray
    amplitude_err: np.ndarray
    chi2: float
    residual: np.ndarray


def poisson_weights(sums: np.ndarray, smooth_px: float = 1.0, border_px: int = 0) -> np.ndarray:
    """``1 / variance`` per pixel, ``(n_proj, ny * nx)``: the counts smoothed by a Gaussian of ``smooth_px``.

    Weights from the raw counts (``1 / max(d, 1)``) bias weak, broad peaks low and narrow (a pixel that fluctuates
    down gets more weight: the S width came out 2-4 % narrow); weights from the model (Pearson) give unmodelled
    signal, such as atoms outside the reference field that tilted projections show at the image edges, the weight
    of the background and pulled the widths by up to 14 %. The smoothed counts carry ~1/20 of a pixel's own noise.
    """
    from scipy import ndimage

    data = np.asarray(sums, float)
    w = 1.0 / np.maximum(np.stack([ndimage.gaussian_filter(d, smooth_px) for d in data]), 1.0)
    if border_px > 0:
        w[:, :border_px], w[:, -border_px:], w[:, :, :border_px], w[:, :, -border_px:] = 0.0, 0.0, 0.0, 0.0
    return w.reshape(len(data), -1)


def unmodelled_mask(residual: np.ndarray, weight: np.ndarray, shape: tuple[int, int], *, threshold: float = 3.0,
                    smooth_px: float = 1.5, grow_px: int = 4) -> np.ndarray:
    """Pixels without unmodelled signal, ``(n_proj, ny * nx)`` bool.

    An atom missing from the model (e.g. outside the reference projection but inside a tilted one) leaves a
    positive blob in the residual; where the smoothed residual exceeds ``threshold`` times its noise the pixels,
    grown by ``grow_px``, are left out.
    """
    from scipy import ndimage

    out = np.ones(residual.shape, bool)
    # noise of a Gaussian-smoothed residual: sigma_pixel / (2 sqrt(pi) s)
    gain = 1.0 / (2.0 * np.sqrt(np.pi) * smooth_px)
    for k in range(len(residual)):
        r = ndimage.gaussian_filter(residual[k].reshape(shape), smooth_px)
        noise = gain / np.sqrt(np.maximum(weight[k].reshape(shape), 1e-12))
        bad = ndimage.binary_dilation(r > threshold * noise, iterations=grow_px)
        out[k] = ~bad.ravel()
    return out


def _radius(sigma: np.ndarray) -> int:
    return int(np.ceil(3.0 * float(np.max(sigma))))


def render_flat(geometry: ProjectionGeometry, positions_A: np.ndarray, amplitude: np.ndarray,
                sigma_px: np.ndarray | float, background: np.ndarray, radius: int | None = None) -> np.ndarray:
    """Model ``(n_proj, ny * nx)`` of Gaussian atoms on a constant background per projection.

    ``geometry`` is an :class:`.atoms3d.Geometry`.
    """
    ny, nx = geometry.shape
    n = len(positions_A)
    sig = np.broadcast_to(np.asarray(sigma_px, float), (n,))
    rad = _radius(sig) if radius is None else radius
    uv = geometry.project(positions_A)
    out = np.empty((len(uv), ny * nx))
    for k in range(len(uv)):
        win = gaussian_windows(uv[k], sig, (ny, nx), rad)
        out[k] = np.bincount(win.index.ravel(), (win.g * amplitude[:, None]).ravel(), ny * nx) + background[k]
    return out


def _accumulate(geometry: ProjectionGeometry, residual: np.ndarray, weight: np.ndarray, pos: np.ndarray,
                amp: np.ndarray, sig: np.ndarray, radius: int, fit_amp: bool,
                fit_pos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom ``J^T W r`` (m, p) and ``J^T W J`` (m, p, p) over all projections (p = amp?, x, y, z)."""
    ny, nx = geometry.shape
    uv = geometry.project(pos)
    dj = geometry.jacobian()
    npar = int(fit_amp) + 3 * int(fit_pos)
    jtr = np.zeros((len(pos), npar))
    jtj = np.zeros((len(pos), npar, npar))
    for k in range(len(uv)):
        win = gaussian_windows(uv[k], sig, (ny, nx), radius)
        r = residual[k][win.index] * win.valid
        w = weight[k][win.index] * win.valid
        cols = []
        if fit_amp:
            cols.append(win.g)
        if fit_pos:
            gy, gx = win.d_centre()
            d = np.stack([gy, gx], axis=-1) @ dj[k]  # (m, K, 3): d g / d(x, y, z)
            cols.extend(d[..., i] * amp[:, None] for i in range(3))
        j = np.stack(cols, axis=-1)  # (m, K, p)
        wj = j * w[..., None]
        jtr += np.einsum("mkp,mk->mp", wj, r)
        jtj += np.einsum("mkp,mkq->mpq", wj, j)
    return jtr, jtj


def _scatter(geometry: ProjectionGeometry, residual: np.ndarray, pos: np.ndarray, amp: np.ndarray, sig: np.ndarray,
             radius: int, sign: float) -> None:
    """``residual += sign * model of the atoms`` (in place)."""
    ny, nx = geometry.shape
    uv = geometry.project(pos)
    for k in range(len(uv)):
        win = gaussian_windows(uv[k], sig, (ny, nx), radius)
        residual[k] += sign * np.bincount(win.index.ravel(), (win.g * amp[:, None]).ravel(), ny * nx)


def refine_gauss_seidel(sums: np.ndarray, geometry: ProjectionGeometry, positions_A: np.ndarray, amplitude: np.ndarray,
                        sigma_px: np.ndarray | float, groups: Sequence[np.ndarray], *, background: np.ndarray,
                        fit_amp: bool = True, fit_pos: bool = True, sweeps: int = 6, lam: float = 1e-2,
                        max_step_A: float = 0.3, radius: int | None = None) -> Refinement:
    """Refine amplitudes and/or ``(x, y, z)`` of Gaussian atoms against all projections, group by group.

    Parameters
    ----------
    sums : ndarray (n_proj, ny, nx)
        Counts.
    geometry : atoms3d.Geometry
        Calibrated rotations and shifts.
    positions_A : ndarray (n, 3)
        Start positions (sample frame, Angstrom).
    amplitude : ndarray (n,)
        Start peak heights (counts per projection).
    sigma_px : float or ndarray (n,)
        Gaussian widths (fixed).
    groups : sequence of index arrays
        Atoms updated together; atoms of one group should not overlap in the projections (see module docstring).
        Atoms in no group are held fixed.
    background : ndarray (n_proj,)
        Start background per projection (refined: weighted mean of the residual, every sweep).
    fit_amp, fit_pos : bool
        Which parameters to refine.
    sweeps : int
        Passes over all groups.
    lam : float
        Levenberg-Marquardt damping relative to each block's diagonal.
    max_step_A : float
        Largest position change per atom and step (a trust region: the Gaussians are ~0.5 A wide).
    radius : int, optional
        Window half size (default ``ceil(3 max sigma)``).
    """
    data = np.asarray(sums, float)
    n_proj = len(data)
    flat = data.reshape(n_proj, -1)
    weight = poisson_weights(data)
    pos = np.array(positions_A, float)
    amp = np.array(amplitude, float)
    n = len(pos)
    sig = np.broadcast_to(np.asarray(sigma_px, float), (n,)).copy()
    rad = _radius(sig) if radius is None else radius
    bg = np.array(background, float)
    residual = flat - render_flat(geometry, pos, amp, sig, bg, rad)
    groups = [np.asarray(g, np.intp) for g in groups if len(g)]
    npar = int(fit_amp) + 3 * int(fit_pos)
    for _sweep in range(sweeps if npar else 0):
        shift = (residual * weight).sum(axis=1) / weight.sum(axis=1)
        bg += shift
        residual -= shift[:, None]
        for idx in groups:
            jtr, jtj = _accumulate(geometry, residual, weight, pos[idx], amp[idx], sig[idx], rad, fit_amp,
                                   fit_pos)
            diag = np.einsum("mpp->mp", jtj)
            a = jtj + lam * diag[:, :, None] * np.eye(npar) + 1e-12 * (diag.max(axis=1) + 1e-300)[:, None, None] \
                * np.eye(npar)
            step = np.linalg.solve(a, jtr[..., None])[..., 0]
            step[~np.all(np.isfinite(step), axis=1)] = 0.0
            new_amp, new_pos = amp[idx].copy(), pos[idx].copy()
            if fit_amp:
                new_amp = new_amp + step[:, 0]
            if fit_pos:
                dp = step[:, -3:]
                norm = np.linalg.norm(dp, axis=1)
                dp *= np.minimum(1.0, max_step_A / np.maximum(norm, 1e-300))[:, None]
                new_pos = new_pos + dp
            _scatter(geometry, residual, pos[idx], amp[idx], sig[idx], rad, +1.0)
            _scatter(geometry, residual, new_pos, new_amp, sig[idx], rad, -1.0)
            amp[idx], pos[idx] = new_amp, new_pos
    chi2 = float((residual**2 * weight).sum() / max(residual.size - npar * n - n_proj, 1))
    pos_err = np.full((n, 3), np.inf)
    amp_err = np.full(n, np.inf)
    _, jtj = _accumulate(geometry, residual, weight, pos, amp, sig, rad, True, True)
    ok = np.linalg.cond(jtj) < 1e12
    if ok.any():
        cov = np.linalg.inv(jtj[ok]) * chi2
        var = np.clip(np.einsum("mpp->mp", cov), 0.0, None)
        amp_err[ok] = np.sqrt(var[:, 0])
        pos_err[ok] = np.sqrt(var[:, 1:])
    return Refinement(pos, amp, bg, pos_err, amp_err, chi2, residual)


def element_profiles(sums: np.ndarray, geometry: ProjectionGeometry, positions_A: np.ndarray, element: np.ndarray,
                     height: np.ndarray, sigma_px: np.ndarray, *, background: np.ndarray,
                     occupancy: np.ndarray | None = None, n_iter: int = 5, radius: int | None = None,
                     border_px: int = 8,
                     mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit one peak height and one Gaussian width per element (and the backgrounds) to all projections.

    Gauss-Newton over the ``2 E + n_proj`` global parameters with the positions fixed; each element's
    derivative columns are whole model images, accumulated projection by projection.

    Parameters
    ----------
    sums : ndarray (n_proj, ny, nx)
    geometry : atoms3d.Geometry
    positions_A : ndarray (n, 3)
    element : ndarray (n,) int
        Element index of each atom, ``0 .. E-1`` (-1: left out, e.g. an empty site).
    height, sigma_px : ndarray (E,)
        Start values.
    background : ndarray (n_proj,)
    occupancy : ndarray (n,), optional
        Amplitude factor per atom (default 1).
    n_iter : int
        Gauss-Newton iterations.
    border_px : int
        Pixels next to the image edges left out: atoms cut by the edge, and atoms outside the reference
        projection (not in the model) that a tilted projection shows there, would bias the widths.
    mask : ndarray (n_proj, ny * nx) bool, optional
        Pixels to use (e.g. without unmodelled signal, :func:`unmodelled_mask`).

    Returns
    -------
    height, sigma_px, height_err, sigma_err : ndarray (E,)
        Standard errors from the normal matrix times the reduced chi^2.
    """
    data = np.asarray(sums, float)
    n_proj = len(data)
    flat = data.reshape(n_proj, -1)
    weight = poisson_weights(data, border_px=border_px)
    if mask is not None:
        weight = weight * mask
    ny, nx = geometry.shape
    el = np.asarray(element, int)
    n_el = len(height)
    h = np.array(height, float)
    s = np.array(sigma_px, float)
    bg = np.array(background, float)
    occ = np.ones(len(el)) if occupancy is None else np.asarray(occupancy, float)
    use = el >= 0
    pos, el, occ = np.asarray(positions_A, float)[use], el[use], occ[use]
    uv = geometry.project(pos)
    npar = 2 * n_el + n_proj
    cov = np.full((npar, npar), np.nan)
    for _ in range(n_iter):
        rad = int(np.ceil(3.5 * s.max())) if radius is None else radius
        jtj = np.zeros((npar, npar))
        jtr = np.zeros(npar)
        cost = 0.0
        for k in range(n_proj):
            win = gaussian_windows(uv[k], s[el], (ny, nx), rad)
            idx = win.index.ravel()
            cols = np.zeros((2 * n_el, ny * nx))
            for e in range(n_el):
                sel = el == e
                if not sel.any():
                    continue
                ii = win.index[sel].ravel()
                cols[e] = np.bincount(ii, (win.g[sel] * occ[sel, None]).ravel(), ny * nx)
                dsig = win.g[sel] * (win.dy[sel] ** 2 + win.dx[sel] ** 2) / s[e] ** 3
                cols[n_el + e] = h[e] * np.bincount(ii, (dsig * occ[sel, None]).ravel(), ny * nx)
            model = h @ cols[:n_el] + bg[k]
            r = flat[k] - model
            w = weight[k]
            wc = cols * w
            blk = np.zeros((npar, npar))
            blk[: 2 * n_el, : 2 * n_el] = wc @ cols.T
            blk[: 2 * n_el, 2 * n_el + k] = blk[2 * n_el + k, : 2 * n_el] = wc.sum(axis=1)
            blk[2 * n_el + k, 2 * n_el + k] = w.sum()
            jtj += blk
            jtr[: 2 * n_el] += wc @ r
            jtr[2 * n_el + k] += (w * r).sum()
            cost += float((w * r * r).sum())
            del idx
        present = np.diag(jtj) > 0
        step = np.zeros(npar)
        sub = jtj[np.ix_(present, present)]
        step[present] = np.linalg.solve(sub, jtr[present])
        h += step[:n_el]
        s += np.clip(step[n_el: 2 * n_el], -0.2 * s, 0.2 * s)
        bg += step[2 * n_el:]
        chi2 = cost / max(flat.size - npar, 1)
        cov = np.full((npar, npar), np.nan)
        cov[np.ix_(present, present)] = np.linalg.inv(sub) * chi2
        if np.all(np.abs(step[n_el: 2 * n_el]) < 1e-4 * s):
            break
    err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return h, s, err[:n_el], err[n_el: 2 * n_el]


def amplitude_errors(geometry: ProjectionGeometry, weight: np.ndarray, positions_A: np.ndarray, sigma_px: np.ndarray,
                     pairs: np.ndarray, chi2: float, radius: int | None = None) -> np.ndarray:
    """Standard errors of the amplitudes of paired atoms (the two chalcogens of a site) with their correlation.

    The two chalcogens of a site coincide at zero tilt and overlap at small tilts, so their amplitudes are
    correlated; the error of each is taken from the inverse of the pair's ``2 x 2`` block of ``J^T W J`` (the
    other neighbours held fixed), not from its own diagonal alone.

    Parameters
    ----------
    geometry : atoms3d.Geometry
    weight : ndarray (n_proj, ny * nx)
        Pixel weights ``1 / variance``.
    positions_A : ndarray (n, 3)
    sigma_px : ndarray (n,)
    pairs : ndarray (m, 2)
        Atom indices of each pair (the atoms of one column of ``pairs`` must not overlap each other).
    chi2 : float
        Reduced chi^2.

    Returns
    -------
    ndarray (m, 2)
    """
    ny, nx = geometry.shape
    sig = np.asarray(sigma_px, float)
    rad = _radius(sig) if radius is None else radius
    uv = geometry.project(positions_A)
    a, b = pairs[:, 0], pairs[:, 1]
    blk = np.zeros((len(pairs), 3))  # aa, bb, ab
    for k in range(len(uv)):
        wa = gaussian_windows(uv[k, a], sig[a], (ny, nx), rad)
        wb = gaussian_windows(uv[k, b], sig[b], (ny, nx), rad)
        w_a = weight[k][wa.index] * wa.valid
        blk[:, 0] += (w_a * wa.g**2).sum(axis=1)
        blk[:, 1] += (weight[k][wb.index] * wb.valid * wb.g**2).sum(axis=1)
        # cross term: the b image (b atoms do not overlap each other) seen through a's windows
        img_b = np.bincount(wb.index.ravel(), wb.g.ravel(), ny * nx)
        blk[:, 2] += (w_a * wa.g * img_b[wa.index]).sum(axis=1)
    det = blk[:, 0] * blk[:, 1] - blk[:, 2] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        var_a = np.where(det > 0, blk[:, 1] / det, np.inf)
        var_b = np.where(det > 0, blk[:, 0] / det, np.inf)
    return np.sqrt(np.column_stack([var_a, var_b]) * chi2)
