"""Temperature profile across an interface: bulk lines, interface drop, its width, characteristic lengths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.special
from numpy.typing import ArrayLike, NDArray

__all__ = ["InterfaceFit", "fit_interface_profile"]

Array = NDArray[np.float64]
ERF_10_90 = 2.0 * np.sqrt(2.0) * scipy.special.erfinv(0.8)  # 10-90 % width of an erf step / sigma


@dataclass
class InterfaceFit:
    """Result of :func:`fit_interface_profile` (temperatures in K, lengths in nm).

    ``left`` / ``right`` are (T at the interface, gradient K/nm) of the weighted bulk lines with their
    covariances; ``drop_K = T_left(x0) - T_right(x0)``; ``width_nm`` is the 10-90 % width of an erf step
    between the two lines fitted to all points; ``length_left_nm`` / ``length_right_nm`` are the interface
    characteristic lengths ``|drop / gradient|`` (inf for a flat side).
    """

    interface_x_nm: float
    left: Array
    left_cov: Array
    right: Array
    right_cov: Array
    drop_K: float
    drop_err_K: float
    width_nm: float
    width_err_nm: float
    length_left_nm: float
    length_right_nm: float
    chi2_red_left: float
    chi2_red_right: float


def _line(x: Array, y: Array, s: Array) -> tuple[Array, Array, float]:
    a = np.stack([np.ones_like(x), x], axis=1) / s[:, None]
    b = y / s
    cov: Array = np.linalg.inv(a.T @ a).astype(np.float64, copy=False)
    p = cov @ a.T @ b
    chi2 = float(((a @ p - b) ** 2).sum()) / max(1, len(x) - 2)
    return p, cov * max(1.0, chi2), chi2


def _steepest_point(x: Array, t: Array, exclude_nm: float, width: int = 5) -> float:
    """Position of the steepest change of ``t(x)`` after a ``width``-point running mean.

    The profile is extended by repeating its end values (``np.pad(mode="edge")``) and smoothed with
    ``mode="valid"``, so the smoothed curve has no zero-padding edge artefacts; the outermost ``width // 2``
    points (where the window reaches into the padding) and the points that would leave fewer than two
    points on either side outside ``exclude_nm`` are not candidates.
    """
    half = width // 2
    if x.size < 2 * half + 3:
        raise ValueError(f"need at least {2 * half + 3} points to locate the interface")
    sm = np.convolve(np.pad(t, half, mode="edge"), np.ones(width) / width, mode="valid")
    g = np.abs(np.gradient(sm, x))
    cand = np.zeros(x.size, bool)
    cand[half:-half] = True
    n_left = np.array([(x < xi - exclude_nm).sum() for xi in x])
    n_right = np.array([(x > xi + exclude_nm).sum() for xi in x])
    ok = cand & (n_left >= 2) & (n_right >= 2)
    if ok.any():
        cand = ok
    return float(x[np.argmax(np.where(cand, g, -np.inf))])


def _fit_at(
    x: Array, t: Array, s: Array, x0: float, exclude_nm: float
) -> tuple[Array, Array, float, Array, Array, float, scipy.optimize.OptimizeResult]:
    """Bulk lines outside ``x0 +- exclude_nm`` and the erf step (centre, sigma) between them."""
    lm = x < x0 - exclude_nm
    rm = x > x0 + exclude_nm
    if lm.sum() < 2 or rm.sum() < 2:
        raise ValueError("need at least two points on each side outside exclude_nm")
    pl, cl, c2l = _line(x[lm] - x0, t[lm], s[lm])
    pr, cr, c2r = _line(x[rm] - x0, t[rm], s[rm])

    def model(q: Array) -> Array:
        xc, sig = q
        step = 0.5 * (1 + scipy.special.erf((x - xc) / (np.sqrt(2) * abs(sig) + 1e-9)))
        return (pl[0] + pl[1] * (x - x0)) * (1 - step) + (pr[0] + pr[1] * (x - x0)) * step

    res = scipy.optimize.least_squares(lambda q: (model(q) - t) / s, [x0, 0.5], method="lm")
    return pl, cl, c2l, pr, cr, c2r, res


def fit_interface_profile(
    x_nm: ArrayLike,
    T_K: ArrayLike,
    T_err_K: ArrayLike,
    *,
    interface_x_nm: float | None = None,
    exclude_nm: float = 2.0,
    refine_iterations: int = 3,
) -> InterfaceFit:
    """Fit a temperature profile across an interface.

    Parameters
    ----------
    x_nm, T_K, T_err_K
        Positions, temperatures and their one-sigma errors (non-finite points are ignored).
    interface_x_nm
        Interface position; default: the point of steepest change of the profile smoothed over 5 points
        (edge-padded running mean; the two outermost points on each side are not candidates).
    exclude_nm
        Points within this distance of the interface are left out of the bulk lines.
    refine_iterations
        With the default position only: the centre of the fitted erf step replaces the position and the
        fit is repeated, up to this many times (until it moves by < 0.01 nm).

    Notes
    -----
    Each side's line ``T = T0 + g (x - x0)`` is a weighted least-squares fit (covariance scaled by
    max(1, chi2_red)); the drop is ``T0_left - T0_right`` with the two covariances added.  The width comes
    from fitting ``line_left (1 - s) + line_right s`` with ``s = (1 + erf((x - x0) / (sqrt(2) sigma))) / 2``
    to all points, lines fixed, (x0, sigma) free.
    """
    x = np.asarray(x_nm, float)
    t = np.asarray(T_K, float)
    s = np.asarray(T_err_K, float)
    ok = np.isfinite(x) & np.isfinite(t) & np.isfinite(s) & (s > 0)
    x, t, s = x[ok], t[ok], s[ok]
    order = np.argsort(x)
    x, t, s = x[order], t[order], s[order]
    refine = interface_x_nm is None and refine_iterations > 0
    x0 = _steepest_point(x, t, exclude_nm) if interface_x_nm is None else float(interface_x_nm)
    for it in range(int(refine_iterations) + 1 if refine else 1):
        pl, cl, c2l, pr, cr, c2r, res = _fit_at(x, t, s, x0, exclude_nm)
        xc = float(res.x[0])
        if not refine or it == refine_iterations or not (x[0] < xc < x[-1]) or abs(xc - x0) < 0.01:
            break
        try:
            _fit_at(x, t, s, xc, exclude_nm)
        except ValueError:
            break
        x0 = xc
    drop = float(pl[0] - pr[0])
    drop_err = float(np.sqrt(cl[0, 0] + cr[0, 0]))
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac) * max(1.0, float(res.fun @ res.fun) / max(1, len(x) - 2))
        w_err = float(ERF_10_90 * np.sqrt(max(cov[1, 1], 0.0)))
    except np.linalg.LinAlgError:
        w_err = float("nan")
    width = float(ERF_10_90 * abs(res.x[1]))
    with np.errstate(divide="ignore"):
        ll = float(abs(drop / pl[1])) if pl[1] != 0 else float("inf")
        lr = float(abs(drop / pr[1])) if pr[1] != 0 else float("inf")
    return InterfaceFit(
        interface_x_nm=x0,
        left=pl,
        left_cov=cl,
        right=pr,
        right_cov=cr,
        drop_K=drop,
        drop_err_K=drop_err,
        width_nm=width,
        width_err_nm=w_err,
        length_left_nm=ll,
        length_right_nm=lr,
        chi2_red_left=c2l,
        chi2_red_right=c2r,
    )
