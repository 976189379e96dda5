"""The zero-loss-peak model: a symmetric Pearson VII, its Jacobian, and fast float32 evaluations."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .eels_windows import Array

PARAM_NAMES = ("amplitude", "centre_meV", "fwhm_meV", "m")


def pearson7_model(
    energy_meV: ArrayLike,
    params: ArrayLike,
    *,
    jacobian: bool = False,
) -> Array | tuple[Array, Array]:
    """Symmetric Pearson VII ``A (1 + 4 (2^(1/m) - 1) ((E - c) / w)^2)^(-m)`` (A = peak height, w = FWHM).

    ``params`` is ``(..., 4)`` = (A, c, w, m) and broadcasts against ``energy_meV`` ``(..., n)``.  With
    ``jacobian=True`` also returns the derivatives ``(..., n, 4)``.
    """
    p = np.asarray(params, float)
    a, c, w, m = (p[..., i, None] for i in range(4))
    d = np.asarray(energy_meV, float) - c
    cc = np.exp2(1.0 / m) - 1.0
    u = (d / w) ** 2
    q = 1.0 + 4.0 * cc * u
    lq = np.log(q)
    qm = np.exp(-m * lq)
    f = a * qm
    if not jacobian:
        return f
    g = a * m * qm / q * 8.0 * cc  # common factor of the c and w derivatives
    dcc_dm = -(cc + 1.0) * np.log(2.0) / m**2
    jac = np.stack([qm + 0 * d, g * d / w**2, g * u / w, f * (-lq - m * 4.0 * u * dcc_dm / q)], axis=-1)
    return f, jac


_BLOCK = 1 << 14
"""Elements per array in the cache-blocked Pearson VII evaluation (keeps the temporaries in L2)."""


def _p7_fj(x: NDArray[Any], p: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Pearson VII ``(k, n)`` and its Jacobian ``(k, 4, n)`` for ``p`` ``(k, 4)``, in the dtype of ``x``.

    Evaluated in blocks of rows so that the ~10 temporaries stay in cache (the full-size version is
    bound by memory bandwidth: ~25 passes over ``k n`` doubles).
    """
    k, n = x.shape
    dt = x.dtype
    f = np.empty((k, n), dt)
    jac = np.empty((k, 4, n), dt)
    step = max(1, _BLOCK // max(n, 1))
    ln2 = np.log(2.0)
    for i in range(0, k, step):
        sl = slice(i, min(k, i + step))
        a, c, w, m = (p[sl, j, None].astype(dt) for j in range(4))
        cc = np.exp2(1.0 / m) - 1.0
        t = np.subtract(x[sl], c)
        t /= w  # (E - c) / w
        u = t * t
        q = u * (4.0 * cc)
        q += 1.0
        lq = np.log(q)
        qm = jac[sl, 0]
        np.multiply(lq, -m, out=qm)
        np.exp(qm, out=qm)  # dF/da = q^-m
        fs = f[sl]
        np.multiply(qm, a, out=fs)
        g = np.divide(qm, q)
        g *= 8.0 * a * m * cc / w  # common factor of the c and w derivatives
        np.multiply(g, t, out=jac[sl, 1])
        np.multiply(g, u, out=jac[sl, 2])
        u *= 4.0 * m * (-(cc + 1.0) * ln2 / m**2)  # 4 m dcc/dm u
        u /= q
        u += lq
        u *= fs
        np.negative(u, out=jac[sl, 3])
    return f, jac


def _p7_f(x: Array, p: Array) -> Array:
    """Pearson VII ``(k, n)`` at ``x`` ``(k, n)`` for ``p`` ``(k, 4)``, computed in float32 blocks, as float64."""
    k, n = x.shape
    out = np.empty((k, n))
    step = max(1, 4 * _BLOCK // max(n, 1))
    for i in range(0, k, step):
        sl = slice(i, min(k, i + step))
        a, c, w, m = (p[sl, j, None].astype(np.float32) for j in range(4))
        t = x[sl].astype(np.float32)
        t -= c
        t /= w
        t *= t
        t *= 4.0 * (np.exp2(1.0 / m) - 1.0)
        t += 1.0
        np.log(t, out=t)
        t *= -m
        np.exp(t, out=t)
        t *= a
        out[sl] = t
    return out
