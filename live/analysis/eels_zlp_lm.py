"""Batched, weighted Levenberg-Marquardt fits of a zero-loss shape (:data:`~.eels_zlp_shapes.SHAPES` or
:data:`~.eels_zlp_shapes.POWER`) over many spectra, and the starting values of a large batch (a shared shape,
amplitudes re-solved)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .eels_pearson7 import Nodes
from .eels_windows import Array
from .eels_zlp_power import B_BOUNDS, FIXED, P_BOUNDS
from .eels_zlp_shapes import NPARAMS, P3_BOUNDS, POWER, shape_f, shape_fj


def _normal_j(jac: Array, wt: Array, r: Array | None = None) -> tuple[Array, Array | None]:
    """Weighted normal matrix ``(k, q, q)`` (and gradient ``(k, q)``) from a Jacobian ``(k, q, n)``."""
    jw = jac * wt[:, None, :]
    # einsum, not matmul: the (4, n) x (n, 4) products are too small for BLAS, whose threads only add
    # overhead (and contend on a shared machine)
    h = np.einsum("kin,kjn->kij", jw, jac)
    g = None if r is None else np.einsum("kin,kn->ki", jw, r)
    return h, g


def _lm(
    x: Array,
    y: Array,
    wt: Array,
    p0: Array,
    *,
    max_iter: int,
    tol: float = 1e-6,
    lam0: float = 1e-3,
    init: tuple[Array, Array] | None = None,
    cov: bool = True,
    nodes: Nodes | None = None,
    shape: str = "pearson7",
    held_m: bool = False,
    held_p: bool = False,
) -> tuple[Array, Array | None, Array, int, Array, Array]:
    """Batched Levenberg-Marquardt for a zero-loss shape (``shape``: :data:`~.eels_zlp_shapes.SHAPES` or
    :data:`~.eels_zlp_shapes.POWER`, whose peak height and FWHM -- and m with ``held_m``, the tails' exponent p with
    ``held_p`` -- are held at ``p0``:
    :func:`held_params`, their Jacobian columns 0).

    Returns params, normal matrix (float64, for the covariance; None with ``cov=False``, e.g. a first pass
    whose result is refitted), chi2, iterations, and the model ``(k, n)`` and float32 Jacobian
    ``(k, q, n)`` at the returned params; ``init`` = (model, Jacobian) at ``p0`` when already known
    (a refit with other weights starts where the previous fit ended).

    ``lam0`` is the initial damping (relative to the normal matrix's diagonal): 1e-3 from a rough start;
    from a start near the optimum 1e-5, since the amplitude, FWHM and m are strongly correlated and a
    damping of 1e-3 shrinks the steps along their poorly determined combination for several iterations.

    Only the spectra that have not converged (relative chi-square change of the last step below ``tol``)
    are carried to the next iteration.  The model and Jacobian are evaluated once per iteration, at
    the trial point (kept when the step is accepted).
    """
    p = p0.copy()
    k = len(p)
    # the centre stays within half a FWHM of its start and the FWHM within a factor 3: a spectrum the Pearson VII
    # does not describe (Lorentzian tails, a background) otherwise runs the centre off the axis (1e6 meV) and
    # its temperature would be refused for a misleading reason (the window "left" beyond that centre)
    c_lo, c_hi = p0[:, 1] - 0.5 * p0[:, 2], p0[:, 1] + 0.5 * p0[:, 2]
    w_lo, w_hi = p0[:, 2] / 3.0, 3.0 * p0[:, 2]
    npar = NPARAMS[shape]
    eye = np.eye(npar)
    # parameters held at their start (zero Jacobian column): a unit diagonal keeps the normal matrix regular
    held = np.zeros(npar)
    held[list(held_params(shape, held_m, held_p))] = 1.0
    idle = held > 0
    any_held = bool(idle.any())

    def fj(xx: NDArray[np.floating], pp: Array, nn: Nodes | None) -> tuple[Array, Array]:
        f_, j_ = shape_fj(shape)(xx, pp, nn)
        if any_held:
            j_[:, idle] = 0.0
        return f_, j_

    # model and Jacobian in float32 (rounding 6e-8 relative, far below the Poisson noise of any count);
    # residuals, chi-square and the solve in float64
    x32 = x.astype(np.float32)
    p3_lo, p3_hi = P3_BOUNDS[shape]
    if init is None:
        f, jac = fj(x32, p, nodes)
    else:
        f, jac = init[0], init[1].copy()
        if any_held:
            jac[:, idle] = 0.0
    r = y - f
    chi2 = np.einsum("kn,kn->k", wt * r, r)
    # state of the active (not yet converged) spectra, compacted when some converge
    act = np.arange(k)
    xa, ya, wa, w32a = x32, y, wt, wt.astype(np.float32)
    pa, ja, ra, chi2a = p.copy(), jac, r, chi2.copy()
    lam = np.full(k, lam0)
    it = 0
    def retire(finished: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """Store the finished spectra's results; compact the active state to the others (returned mask)."""
        nonlocal act, xa, ya, wa, w32a, pa, ja, ra, chi2a, lam
        fin = act[finished]
        p[fin], chi2[fin], jac[fin], r[fin] = pa[finished], chi2a[finished], ja[finished], ra[finished]
        keep = ~finished
        act = act[keep]
        xa, ya, wa, w32a = xa[keep], ya[keep], wa[keep], w32a[keep]
        pa, ja, ra, chi2a, lam = pa[keep], ja[keep], ra[keep], chi2a[keep], lam[keep]
        return keep

    for n_it in range(1, max_iter + 1):
        it = n_it
        jw = ja * w32a[:, None, :]
        h = np.matmul(jw, ja.transpose(0, 2, 1)).astype(float)
        g = np.matmul(jw, ra.astype(np.float32)[:, :, None]).astype(float)
        diag = np.einsum("kii->ki", h)
        h += (lam[:, None] * np.maximum(diag, 1e-300) + held)[:, :, None] * eye
        dp = np.linalg.solve(h, g)[..., 0]
        # converged already where the (nearly undamped) Gauss-Newton step predicts a chi2 decrease
        # ``dp . g`` below tol / 2: the model need not be evaluated there again
        flat_ = (lam < 1e-2) & (np.einsum("ki,ki->k", dp, g[..., 0]) < 0.5 * tol * chi2a)
        if flat_.any():
            dp = dp[retire(flat_)]
            if act.size == 0:
                break
        pt = pa + dp
        np.maximum(pt[:, 0], 1e-3 * pa[:, 0], out=pt[:, 0])
        np.minimum(np.maximum(pt[:, 2], 0.2 * pa[:, 2]), 5.0 * pa[:, 2], out=pt[:, 2])
        np.minimum(np.maximum(pt[:, 3], p3_lo), p3_hi, out=pt[:, 3])
        np.minimum(np.maximum(pt[:, 1], c_lo[act]), c_hi[act], out=pt[:, 1])
        if shape == POWER:
            np.minimum(np.maximum(pt[:, 4], B_BOUNDS[0]), B_BOUNDS[1], out=pt[:, 4])
            np.minimum(np.maximum(pt[:, 5], P_BOUNDS[0]), P_BOUNDS[1], out=pt[:, 5])
        np.minimum(np.maximum(pt[:, 2], w_lo[act]), w_hi[act], out=pt[:, 2])
        ft32, jt = fj(xa, pt, nodes)
        ft = ft32.astype(float)
        # the amplitude is linear: re-solve it exactly (removes its strong correlation with FWHM and m)
        wf = wa * ft
        sc = np.einsum("kn,kn->k", wf, ya) / np.maximum(np.einsum("kn,kn->k", wf, ft), 1e-300)
        sc = np.where((sc > 0) & (held[0] == 0), sc, 1.0)  # a held amplitude is not re-solved
        pt[:, 0] *= sc
        ft *= sc[:, None]
        jt[:, 1:] *= sc.astype(np.float32)[:, None, None]  # d/da does not depend on a
        rt = np.subtract(ya, ft, out=ft)
        chi2t = np.einsum("kn,kn->k", wa * rt, rt)
        acc = chi2t <= chi2a
        rel = np.abs(chi2a - chi2t) / np.maximum(chi2a, 1e-300)
        if acc.all():
            pa, chi2a, ra, ja = pt, chi2t, rt, jt
        else:
            pa[acc] = pt[acc]
            chi2a[acc] = chi2t[acc]
            ra[acc] = rt[acc]
            ja[acc] = jt[acc]
        lam = np.where(acc, np.maximum(lam / 5.0, 1e-7), lam * 5.0)
        # converged: a step (accepted or not) changes chi2 by less than tol (rounding of the float32 model)
        done = (rel < tol) | (lam > 1e8)
        if done.any():
            retire(done)
            if act.size == 0:
                break
    if act.size:
        p[act], chi2[act], jac[act], r[act] = pa, chi2a, ja, ra
    h_cov = _normal_j(jac.astype(float), wt)[0] if cov else None  # the covariance from a float64 normal matrix
    if h_cov is not None:
        h_cov = hold(h_cov, shape, held_m, held_p)
    return p, h_cov, chi2, it, y - r, jac


def held_params(shape: str, held_m: bool = False, held_p: bool = False) -> tuple[int, ...]:
    """Indices of the parameters of family ``shape`` held at their start (``held_m``: the exponent m too;
    ``held_p``: the tails' exponent p too)."""
    if shape != POWER:
        return ()
    return FIXED + ((3,) if held_m else ()) + ((5,) if held_p else ())


def hold(h: Array, shape: str, held_m: bool = False, held_p: bool = False) -> Array:
    """The normal matrix ``h`` ``(k, q, q)`` with the held parameters' rows and columns 0 and their diagonal 1e12 x
    its largest element: their variance becomes negligible (held, not fitted) and the matrix stays invertible."""
    idx = list(held_params(shape, held_m, held_p))
    if not idx:
        return h
    big = 1e12 * np.max(np.abs(np.einsum("kii->ki", h)), axis=1)
    h[:, idx, :] = 0.0
    h[:, :, idx] = 0.0
    for i in idx:
        h[:, i, i] = np.maximum(big, 1e-300)
    return h


def _shared_shape(
    x: Array, y: Array, var_sys: Array, p0: Array, *, max_iter: int, tol: float, nodes: Nodes | None = None,
    shape: str = "pearson7",
) -> Array:
    """Starting shape of a large batch: the median (FWHM, m) of a few spectra fitted individually.

    The ZLP shape is an instrument property that varies little across a map, so every spectrum starts from
    the median shape of ``_START_ROWS`` evenly spaced spectra fitted first (same windows, weights and spill
    correction; ``x``, ``y``, ``var_sys``, ``p0`` are theirs), its centre from ``zlp_centre`` and its amplitude
    re-solved linearly (:func:`_solve_amplitude`); the full fit then needs 2-3 iterations instead of ~15
    from the shape of the (uncorrected) mean spectrum.
    """
    wt = 1.0 / (np.maximum(shape_f(shape)(x, p0, nodes), 1e-3) + var_sys)
    ps = _lm(x, y, wt, p0, max_iter=max_iter, tol=tol, cov=False, nodes=nodes, shape=shape)[0]
    return np.median(ps[:, 2:], axis=0)


def _solve_amplitude(
    x: Array, y: Array, var_sys: Array, p: Array, nodes: Nodes | None = None, shape: str = "pearson7"
) -> tuple[Array, tuple[Array, Array]]:
    """Weighted least-squares amplitude of the zero-loss shape ``p`` (weights from its model at ``p``).

    Returns the amplitudes ``(k,)`` and the model ``(k, n)`` with its float32 Jacobian ``(k, 4, n)`` at
    ``p`` with those amplitudes (the starting point of the fit, as :func:`_lm`'s ``init``).
    """
    unit = p.copy()
    unit[:, 0] = 1.0
    f32, jac = shape_fj(shape)(x.astype(np.float32), unit, nodes)
    f = f32.astype(float)
    wf = f / (np.maximum(f * p[:, :1], 1e-3) + var_sys)
    amp = np.einsum("kn,kn->k", wf, y) / np.maximum(np.einsum("kn,kn->k", wf, f), 1e-300)
    amp = np.where(amp > 0, amp, p[:, 0])
    f *= amp[:, None]
    jac[:, 1:] *= amp.astype(np.float32)[:, None, None]  # d/da does not depend on a
    return amp, (f, jac)
