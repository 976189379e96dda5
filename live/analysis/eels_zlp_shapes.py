"""Zero-loss-peak shape families: the Pearson VII (:mod:`.eels_pearson7`), the pseudo-Voigt, a mix of a
Lorentzian and a Gaussian of one FWHM (a cold-field emitter's Lorentzian-tailed zero-loss peak), and the Pearson VII
with symmetric power-law tails (:mod:`.eels_zlp_power`: a detector's point-spread wings, or any background that is
the same on both sides).

The first two have four parameters ``(A, centre_meV, fwhm_meV, p3)``: ``A`` the peak height (counts per channel),
``p3`` the Pearson VII exponent ``m`` or the pseudo-Voigt's Lorentzian fraction of the peak height ``eta``; the third
adds ``(b, p)`` (:data:`NPARAMS`).  The functions here dispatch on the family's name (``"pearson7"`` |
``"pseudo_voigt"`` | ``"pearson7_power"``), so the zero-loss fit, the spill model and the thermometry bins evaluate
whichever family was fitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .eels_pearson7 import _BLOCK, Nodes, _p7_f, _p7_fj, channel_nodes, pearson7_model
from .eels_windows import Array
from .eels_zlp_power import _pw_f, _pw_fj

SHAPES = ("pearson7", "pseudo_voigt")
"""The zero-loss shape families of the peak alone (tried in this order)."""

POWER = "pearson7_power"
"""The Pearson VII with symmetric power-law tails (:mod:`.eels_zlp_power`): fitted only where neither family of
:data:`SHAPES` describes the zero-loss windows."""

NPARAMS = {"pearson7": 4, "pseudo_voigt": 4, POWER: 6}
"""Parameters of each family."""

PEAK = {"pearson7": "pearson7", "pseudo_voigt": "pseudo_voigt", POWER: "pearson7"}
"""The family of the peak alone (the resolution function: a background is not a blur of the phonon signal)."""

P3_BOUNDS = {"pearson7": (0.55, 200.0), "pseudo_voigt": (0.0, 1.0), POWER: (0.55, 200.0)}
"""Range of the fourth parameter (m, eta) kept by the fit."""

P3_START = {"pearson7": 1.5, "pseudo_voigt": 0.3, POWER: 1.5}
"""Starting value of the fourth parameter for a fit of the mean spectrum."""

_LN2 = float(np.log(2.0))


def _pv_block(x: NDArray[Any], par: list[NDArray[Any]], fs: NDArray[Any], jac: NDArray[Any]) -> None:
    """Pseudo-Voigt of a block of rows into ``fs`` ``(r, n)`` and its Jacobian into ``jac`` ``(r, 4, n)``.

    ``f = A (eta / (1 + u) + (1 - eta) exp(-ln2 u))`` with ``u = (2 (E - c) / w)^2``.
    """
    a, c, w, eta = par
    t = np.subtract(x, c)
    t /= w  # (E - c) / w
    u = t * t
    u *= 4.0
    lor = 1.0 / (1.0 + u)
    gau = np.exp(-_LN2 * u)
    np.multiply(eta, lor, out=fs)
    fs += (1.0 - eta) * gau
    np.copyto(jac[:, 0], fs)  # dF/dA = shape
    fs *= a
    # -dF/du / A = eta / (1 + u)^2 + (1 - eta) ln2 exp(-ln2 u); du/dc = -8 t / w, du/dw = -2 u / w
    b = eta * lor * lor + (1.0 - eta) * _LN2 * gau
    b *= a
    np.multiply(b, t, out=jac[:, 1])
    jac[:, 1] *= 8.0 / w
    np.multiply(b, u, out=jac[:, 2])
    jac[:, 2] *= 2.0 / w
    np.subtract(lor, gau, out=jac[:, 3])
    jac[:, 3] *= a


def _pv_fj(x: NDArray[Any], p: NDArray[Any], nodes: Nodes | None = None) -> tuple[NDArray[Any], NDArray[Any]]:
    """Pseudo-Voigt ``(k, n)`` and its Jacobian ``(k, 4, n)`` for ``p`` ``(k, 4)`` in the dtype of ``x`` (cache-blocked,
    channel means with ``nodes``), as :func:`~.eels_pearson7._p7_fj`."""
    k, n = x.shape
    dt = x.dtype
    f = np.zeros((k, n), dt)
    jac = np.zeros((k, 4, n), dt)
    step = max(1, _BLOCK // max(n, 1))
    offs, wts = nodes if nodes is not None else (np.zeros(1), np.ones(1))
    ft = np.empty((step, n), dt)
    jt = np.empty((step, 4, n), dt)
    for i in range(0, k, step):
        sl = slice(i, min(k, i + step))
        r = sl.stop - sl.start
        par = [p[sl, j, None].astype(dt) for j in range(4)]
        for off, wt in zip(offs, wts, strict=True):
            _pv_block(x[sl] + dt.type(off), par, ft[:r], jt[:r])
            f[sl] += dt.type(wt) * ft[:r]
            jac[sl] += dt.type(wt) * jt[:r]
    return f, jac


def _pv_f(x: Array, p: Array, nodes: Nodes | None = None, *, dtype: Any = np.float32) -> Array:
    """Pseudo-Voigt ``(k, n)`` at ``x`` ``(k, n)`` for ``p`` ``(k, 4)``, computed in ``dtype``, as float64."""
    return _pv_fj(np.asarray(x).astype(dtype), p, nodes)[0].astype(np.float64)


def shape_f(shape: str) -> Callable[..., Array]:
    """The model function ``f(x, p, nodes=None, *, dtype=float32) -> (k, n) float64`` of a family."""
    return {"pearson7": _p7_f, "pseudo_voigt": _pv_f, POWER: _pw_f}[shape]


def shape_fj(shape: str) -> Callable[..., tuple[NDArray[Any], NDArray[Any]]]:
    """The model and Jacobian ``fj(x, p, nodes=None) -> ((k, n), (k, NPARAMS, n))`` (dtype of ``x``) of a family."""
    return {"pearson7": _p7_fj, "pseudo_voigt": _pv_fj, POWER: _pw_fj}[shape]


def zlp_model(
    energy_meV: ArrayLike, params: ArrayLike, shape: str = "pearson7", *, channel_meV: float = 0.0, order: int = 1
) -> Array:
    """The zero-loss model of family ``shape`` on an energy axis: ``params`` ``(..., NPARAMS)`` broadcast against
    ``energy_meV`` ``(..., n)``; with ``channel_meV`` > 0 and ``order`` > 1 the mean over each channel."""
    if shape == "pearson7":
        return pearson7_model(energy_meV, params, channel_meV=channel_meV, order=order)  # type: ignore[return-value]
    e = np.asarray(energy_meV, float)
    p = np.asarray(params, float)
    npar = NPARAMS[shape]
    lead = np.broadcast_shapes(e.shape[:-1], p.shape[:-1])
    e2 = np.broadcast_to(e, lead + e.shape[-1:]).reshape(-1, e.shape[-1])
    p2 = np.broadcast_to(p, lead + (npar,)).reshape(-1, npar)
    nodes = channel_nodes(order, channel_meV) if channel_meV > 0 and order > 1 else None
    return shape_f(shape)(e2, p2, nodes, dtype=np.float64).reshape(lead + e.shape[-1:])
