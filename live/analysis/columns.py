"""Atomic columns of a hexagonal transition-metal dichalcogenide (TMD) in one HAADF image (pure numpy/scipy).

1. :func:`lattice_from_fft`: the projected metal lattice from the two strongest first-order spots of the power
   spectrum (a tilted projection of the hexagonal lattice is oblique, so the second spot is searched 35-85 deg
   from the first, not at exactly 60 deg).
2. :func:`find_peaks`: local maxima of the lightly smoothed image, at least ~0.3 nearest-column distances apart.
3. :func:`fit_columns`: one 2D Gaussian (height, row, column, width) per column plus a common background, all
   columns fitted at once against the whole image (the model is the sum of all Gaussians) by a sparse
   Levenberg-Marquardt with analytic derivatives (:func:`~.gaussians.levenberg_marquardt`), Poisson weights
   ``1 / sqrt(counts)``; per-column standard errors from the column's block of ``J^T J`` (conditional on the
   neighbours). (``scipy.optimize.least_squares`` with the same sparse Jacobian and ``tr_solver="lsmr"`` took
   4.3 s for 330 columns of a 160^2 image with one BLAS thread: see ``docs/benchmarks.md``.) With the
   expected projected chalcogen offset, chalcogen columns are fitted as two Gaussians; a last pass adds
   Gaussians at positive residual peaks (atoms still missing, e.g. at the flake edges) and refits.
4. :func:`classify_sublattices`: metal or chalcogen. In a 1H TMD every column's three nearest neighbours belong
   to the other sublattice and the metal column is the brighter one (Mo 1.0 vs S2 0.39, W 2.6 vs Se2 1.4 at
   Z^1.7); a first pass compares each column with its nearest neighbours, a second pass takes the majority of
   the neighbours' first-pass labels, which corrects the rare Se2 column substituted into MoS2 next to Mo.

:func:`find_columns` chains the four steps. Positions are ``(row, col)`` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .gaussians import Windows, block_covariance, gaussian_windows, levenberg_marquardt, render

__all__ = ["Columns", "Lattice", "classify_sublattices", "find_columns", "find_peaks", "fit_columns",
           "lattice_from_fft"]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class Lattice:
    """Projected metal lattice.

    Attributes
    ----------
    g : ndarray (2, 2)
        Reciprocal vectors (cycles/px) as rows, ``(k_row, k_col)``.
    a : ndarray (2, 2)
        Real-space vectors (px) as rows, ``(row, col)``, with ``a_i . g_j = delta_ij``.
    """

    g: np.ndarray
    a: np.ndarray

    @property
    def spacing_px(self) -> float:
        """Shortest metal-metal distance in pixels (of a1, a2, a1 - a2, a1 + a2)."""
        a1, a2 = self.a
        return float(min(np.hypot(*v) for v in (a1, a2, a1 - a2, a1 + a2)))

    @property
    def column_distance_px(self) -> float:
        """Nearest metal-chalcogen column distance of the hexagonal projection, ``spacing / sqrt(3)``."""
        return self.spacing_px / np.sqrt(3.0)


@dataclass(frozen=True, eq=False)
class Columns:
    """Fitted columns of one image.

    Attributes
    ----------
    position : ndarray (n, 2)
        Row, column (px).
    position_err : ndarray (n, 2)
        Standard errors (px).
    height, height_err : ndarray (n,)
        Gaussian peak height above the background (counts) and its standard error.
    width, width_err : ndarray (n,)
        Gaussian sigma (px) and its standard error.
    is_metal : ndarray (n,) bool
        Metal sublattice.
    background : float
        Common background (counts per pixel).
    lattice : Lattice
    """

    position: np.ndarray
    position_err: np.ndarray
    height: np.ndarray
    height_err: np.ndarray
    width: np.ndarray
    width_err: np.ndarray
    is_metal: np.ndarray
    background: float
    lattice: Lattice

    def __len__(self) -> int:
        return len(self.height)

    @property
    def intensity(self) -> np.ndarray:
        """Integrated counts ``2 pi sigma^2 height``."""
        return 2.0 * np.pi * self.width**2 * self.height


def lattice_from_fft(image: np.ndarray, *, min_period_px: float = 4.0, max_period_px: float = 40.0) -> Lattice:
    """Projected lattice from the two strongest first-order spots of the Hann-windowed power spectrum.

    Parameters
    ----------
    image : ndarray (ny, nx)
    min_period_px, max_period_px : float
        Band of lattice-plane periods searched.

    Raises
    ------
    ValueError
        No two independent spots in the band (no crystal in the image).
    """
    img = np.asarray(image, float)
    ny, nx = img.shape
    win = np.outer(np.hanning(ny), np.hanning(nx))
    power = np.abs(np.fft.fftshift(np.fft.fft2((img - img.mean()) * win))) ** 2
    ky = (np.arange(ny) - ny // 2) / ny
    kx = (np.arange(nx) - nx // 2) / nx
    kk = np.hypot(ky[:, None], kx[None, :])
    band = (kk >= 1.0 / max_period_px) & (kk <= 1.0 / min_period_px)
    p = ndimage.gaussian_filter(power, 0.7) * band
    # keep one half plane (the spectrum is centrosymmetric)
    half = (ky[:, None] > 0) | ((ky[:, None] == 0) & (kx[None, :] > 0))
    p = p * half
    order = np.argsort(p.ravel())[::-1]

    def refined(i: int) -> np.ndarray:
        r, c = divmod(int(i), nx)
        r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, ny), max(c - 1, 0), min(c + 2, nx)
        w = power[r0:r1, c0:c1]
        rr, cc = np.mgrid[r0:r1, c0:c1]
        return np.array([(w * ky[rr]).sum() / w.sum(), (w * kx[cc]).sum() / w.sum()])

    g1 = refined(order[0])
    for i in order[1:200]:
        if p.ravel()[i] <= 0:
            break
        g = refined(i)
        cos = abs(g @ g1) / (np.hypot(*g) * np.hypot(*g1))
        ratio = np.hypot(*g) / np.hypot(*g1)
        if 0.08 < cos < 0.82 and 0.7 < ratio < 1.4:  # 35-85 deg apart, same order
            gm = np.stack([g1, g])
            return Lattice(gm, np.linalg.inv(gm).T)
    raise ValueError("no lattice: fewer than two independent first-order spots in the power spectrum")


def find_peaks(image: np.ndarray, lattice: Lattice, *, threshold_sigma: float = 6.0) -> np.ndarray:
    """Local maxima ``(n, 2)`` (row, col) of the image smoothed by 1 px, at least 0.45 column distances apart.

    The threshold is ``background + threshold_sigma * sqrt(background)`` (Poisson counts) with the background
    taken as the 1st percentile of the smoothed image.
    """
    from skimage.feature import peak_local_max

    smooth = ndimage.gaussian_filter(np.asarray(image, float), 1.0)
    bg = float(np.percentile(smooth, 1.0))
    thr = bg + threshold_sigma * np.sqrt(max(bg, 1.0))
    dist = max(2, int(0.45 * lattice.column_distance_px))
    return peak_local_max(smooth, min_distance=dist, threshold_abs=thr, exclude_border=False).astype(float)


def fit_columns(image: np.ndarray, peaks: np.ndarray, *, sigma_px: float, radius: int | None = None,
                n_iter: int = 25, tol: float = 1e-6, robust: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit one Gaussian per peak and a common background to the whole image at once.

    All columns are refined together (:func:`~.gaussians.levenberg_marquardt`: the model is the sum of all
    Gaussians, so neighbours' tails are accounted for; sparse normal equations).
    Weights are Poisson, ``1 / sqrt(max(counts, 1))``. The background is re-estimated in closed form between
    three rounds.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Counts.
    peaks : ndarray (n, 2)
        Start positions (row, col).
    sigma_px : float
        Start width.
    radius : int, optional
        Window half size; default ``ceil(3 sigma)``.
    n_iter : int
        Iterations per round.
    tol : float
        Relative cost decrease of a step below which the last round stops.
    robust : bool
        Per-column trust region, damping floor and linear start heights (``find_columns``); off: the plain
        solver with the widths bounded to 0.2-4 ``sigma_px`` (the refit of ``atomic_tomography.refit_metals``,
        whose results at 512^2 depend on the solver's path: it stops at its iteration limit, docs/benchmarks.md).

    Returns
    -------
    params : ndarray (n, 4)
        Height, row, col, sigma per column.
    errors : ndarray (n, 4)
        Standard errors (the column's block of the weighted ``J^T J``, scaled by the reduced chi^2).
    background : float
    """
    img = np.asarray(image, float)
    shape = img.shape
    size = img.size
    data = img.ravel()
    w = 1.0 / np.sqrt(np.maximum(data, 1.0))
    n = len(peaks)
    rad = int(radius or np.ceil(3.0 * sigma_px))
    smooth = ndimage.gaussian_filter(img, 1.0)
    bg = float(np.percentile(smooth, 1.0))
    idx = np.clip(np.rint(peaks).astype(int), 0, np.array(shape) - 1)
    h0 = np.maximum(smooth[idx[:, 0], idx[:, 1]] - bg, 1.0)
    p = np.column_stack([h0, peaks, np.full(n, sigma_px)])
    if n == 0:
        return p, np.zeros((0, 4)), bg
    if robust:
        p[:, 0] = _linear_heights(data - bg, w * w, gaussian_windows(peaks, sigma_px, shape, rad), h0)

    def evaluate(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        win = gaussian_windows(q[:, 1:3], np.abs(q[:, 3]), shape, rad)
        res = w * (data - render(win, q[:, 0], size) - bg)
        gy, gx = win.d_centre()
        a = q[:, 0:1]
        wk = w[win.index] * win.valid
        jac = np.stack([win.g, a * gy, a * gx, a * win.d_sigma()], axis=-1) * wk[..., None]
        return res, jac, np.where(win.valid, win.index, -1)

    # robust: per-column trust region and a damping floor, so a spurious peak does not stall the others
    # (docs/tomography.md); the width bounds always (a width collapsing to 0 makes its derivatives infinite)
    box = {"lower": np.array([-np.inf, -np.inf, -np.inf, 0.2 * sigma_px]),
           "upper": np.array([np.inf, np.inf, np.inf, 4.0 * sigma_px])}
    if robust:
        box["max_step"] = np.array([np.inf, 1.0, 1.0, 0.25 * sigma_px])
    floor = 1e-3 if robust else 0.0
    p, blocks, res, chi2 = levenberg_marquardt(evaluate, p, n_iter=n_iter, tol=1e-4, damping_floor=floor,
                                               **box)  # type: ignore[arg-type]
    bg += float((res * w).sum() / (w * w).sum())  # weighted least-squares constant
    p, blocks, res, chi2 = levenberg_marquardt(evaluate, p, n_iter=n_iter, tol=tol, damping_floor=floor,
                                               **box)  # type: ignore[arg-type]
    cov = block_covariance(blocks, chi2)
    err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
    p[:, 3] = np.abs(p[:, 3])
    return p, err, bg


def _linear_heights(data: np.ndarray, weight: np.ndarray, win: Windows, start: np.ndarray) -> np.ndarray:
    """Heights of fixed Gaussians by weighted linear least squares (Jacobi-preconditioned CG): a start that does
    not count a peak's overlapping neighbours twice (the peak-value start does), which saves Levenberg-Marquardt
    iterations where Gaussians overlap (split chalcogen pairs)."""
    from scipy.sparse.linalg import LinearOperator, cg

    n = len(start)
    gw = win.g * weight[win.index] * win.valid
    size = len(data)

    def normal(h: np.ndarray) -> np.ndarray:
        img = np.bincount(win.index.ravel(), weights=(win.g * h[:, None]).ravel(), minlength=size)
        return (gw * img[win.index]).sum(axis=1)

    diag = np.maximum((gw * win.g).sum(axis=1), 1e-12)
    h = cg(LinearOperator((n, n), matvec=normal), (gw * data[win.index]).sum(axis=1), x0=start,
           M=LinearOperator((n, n), matvec=lambda v: v / diag), rtol=1e-4, maxiter=30)[0]
    return np.where(np.isfinite(h) & (h > 0), h, np.maximum(start, 1.0) * 0.5)


def _residual_peaks(resid: np.ndarray, bg: float, known: np.ndarray, sigma0: float,
                    threshold_sigma: float) -> np.ndarray:
    """Maxima of the smoothed residual above ``threshold_sigma`` noise units, at least 1.5 sigma from known peaks."""
    from skimage.feature import peak_local_max

    smooth = ndimage.gaussian_filter(resid, sigma0)
    # smoothing by sigma0 divides white noise by ~ 2 sqrt(pi) sigma0
    thr = threshold_sigma * np.sqrt(max(bg, 1.0)) / (2.0 * np.sqrt(np.pi) * sigma0) * 2.0
    cand = peak_local_max(smooth, min_distance=max(1, int(sigma0)), threshold_abs=thr, exclude_border=False)
    if not len(cand) or not len(known):
        return cand.astype(float)
    d, _ = cKDTree(known).query(cand)
    return cand[d > 1.5 * sigma0].astype(float)


def classify_sublattices(position: np.ndarray, brightness: np.ndarray, column_distance_px: float) -> np.ndarray:
    """Metal (True) or chalcogen (False) for each column of a hexagonal TMD projection.

    Parameters
    ----------
    position : ndarray (n, 2)
    brightness : ndarray (n,)
        Integrated intensity or height.
    column_distance_px : float
        Nearest metal-chalcogen distance in the projection.
    """
    n = len(position)
    if n < 2:
        return np.ones(n, bool)
    tree = cKDTree(position)
    k = min(4, n)
    dist, nb = tree.query(position, k=k)
    dist, nb = dist[:, 1:], nb[:, 1:]
    near = dist < 1.35 * column_distance_px
    nb_b = np.where(near, brightness[nb], np.nan)
    count = near.sum(axis=1)
    mean_nb = np.where(near, nb_b, 0.0).sum(axis=1) / np.maximum(count, 1)
    first = brightness > mean_nb
    first = np.where(near.any(axis=1), first, True)
    votes_metal = np.where(near, first[nb], False).sum(axis=1)
    votes = near.sum(axis=1)
    # a column whose nearest neighbours are mostly metals is a chalcogen, and vice versa
    second = np.where(votes > 0, votes_metal * 2 < votes, first)
    tie = (votes > 0) & (votes_metal * 2 == votes)
    return np.where(tie, first, second)


def find_columns(image: np.ndarray, *, pixel_size_A: float | None = None, probe_fwhm_A: float = 1.3,
                 lattice: Lattice | None = None, threshold_sigma: float = 6.0,
                 chalcogen_offset_px: np.ndarray | None = None) -> Columns:
    """Lattice, peaks, batched Gaussian fit and sublattice labels of one image.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Counts (e.g. a per-tilt sum).
    pixel_size_A : float, optional
        With ``probe_fwhm_A`` sets the start width; default 1.7 px.
    lattice : Lattice, optional
        Default :func:`lattice_from_fft`.
    threshold_sigma : float
        Peak threshold in background noise units.
    chalcogen_offset_px : ndarray (2,), optional
        Expected (row, col) displacement of the top chalcogen from its column centre in this projection,
        ``h (R[1, 2], R[0, 2]) / pixel`` for chalcogen height ``h`` (the bottom one moves the other way). When it
        is larger than a third of the probe sigma each chalcogen column is fitted as two Gaussians starting
        there, so that the pair split by the tilt does not pull the neighbouring metal fits; the column is
        reported as their intensity-weighted mean.
    """
    img = np.asarray(image, float)
    lat = lattice if lattice is not None else lattice_from_fft(img)
    peaks = find_peaks(img, lat, threshold_sigma=threshold_sigma)
    sigma0 = probe_fwhm_A / FWHM_PER_SIGMA / pixel_size_A if pixel_size_A else 1.7
    # first fit: for the sublattice labels only
    q, err, bg = fit_columns(img, peaks, sigma_px=sigma0, n_iter=8, tol=1e-4, robust=True)
    q = q[_sane(q, img.shape, sigma0)]
    metal = classify_sublattices(q[:, 1:3], 2 * np.pi * q[:, 3] ** 2 * q[:, 0], lat.column_distance_px)
    n_m = int(metal.sum())
    order = np.concatenate([np.flatnonzero(metal), np.flatnonzero(~metal)])
    q, metal = q[order], metal[order]
    group = np.arange(len(q))
    start = q[:, 1:3]
    off = None if chalcogen_offset_px is None else np.asarray(chalcogen_offset_px, float)
    if off is not None and np.hypot(*off) > sigma0 / 3.0:
        chal = q[n_m:, 1:3]
        start = np.concatenate([q[:n_m, 1:3], chal + off, chal - off])
        group = np.concatenate([np.arange(len(q)), np.arange(n_m, len(q))])
    # 1e-5: the positions then differ from full convergence by ~0.25 of their errors in rms (docs/tomography.md)
    q2, err2, bg = fit_columns(img, start, sigma_px=sigma0, tol=1e-5, robust=True)
    err2 = np.where(np.isfinite(err2), err2, 1e3)
    # atoms still missing (e.g. at the flake edge) leave positive residual peaks: add them and refit
    model = render(gaussian_windows(q2[:, 1:3], q2[:, 3], img.shape, int(np.ceil(3 * sigma0))), q2[:, 0], img.size)
    extra = _residual_peaks(img - model.reshape(img.shape) - bg, bg, q2[:, 1:3], sigma0, threshold_sigma)
    if len(extra):
        q2, err2, bg = fit_columns(img, np.concatenate([q2[:, 1:3], extra]), sigma_px=sigma0, tol=1e-5, robust=True)
        err2 = np.where(np.isfinite(err2), err2, 1e3)
        group = np.concatenate([group, len(q) + np.arange(len(extra))])
        metal = np.concatenate([metal, np.zeros(len(extra), bool)])
    # one entry per column: intensity-weighted means of its Gaussians
    n_col = int(group.max()) + 1
    inten = 2 * np.pi * q2[:, 3] ** 2 * np.maximum(q2[:, 0], 0.0)
    tot = np.bincount(group, inten, n_col)
    wsum = np.maximum(tot, 1e-12)
    pos = np.stack([np.bincount(group, inten * q2[:, c], n_col) / wsum for c in (1, 2)], axis=1)
    perr = np.stack([np.sqrt(np.bincount(group, (inten * err2[:, c]) ** 2, n_col)) / wsum for c in (1, 2)], axis=1)
    height = np.bincount(group, q2[:, 0], n_col)
    height_err = np.sqrt(np.bincount(group, err2[:, 0] ** 2, n_col))
    cnt = np.maximum(np.bincount(group, minlength=n_col), 1)
    width = np.bincount(group, q2[:, 3], n_col) / cnt
    width_err = np.sqrt(np.bincount(group, err2[:, 3] ** 2, n_col)) / cnt
    single = np.bincount(group, minlength=n_col) == 1
    pos = np.where(single[:, None] | (tot[:, None] > 0), pos, 0.0)
    qq = np.column_stack([height, pos, width])
    keep = _sane(qq, img.shape, sigma0) & (tot > 0)
    return Columns(pos[keep], perr[keep], height[keep], height_err[keep], width[keep], width_err[keep],
                   metal[keep], bg, lat)


def _sane(q: np.ndarray, shape: tuple[int, ...], sigma0: float) -> np.ndarray:
    """Fits inside the image with a positive height and a plausible width."""
    inside = (q[:, 1] > -0.5) & (q[:, 1] < shape[0] - 0.5) & (q[:, 2] > -0.5) & (q[:, 2] < shape[1] - 0.5)
    return inside & (q[:, 0] > 0) & (q[:, 3] > 0.3 * sigma0) & (q[:, 3] < 3.0 * sigma0)
