"""Structure of a rippled TMD monolayer from its 3D atoms: metal height map, roughness against the distance from a
lateral interface (Fig. 1F of Sci. Adv. 7, eabi6699), X-M-X bond angles and in-plane strain (pure numpy/scipy).

Positions are sample-frame Angstrom ``(n, 3)``; metals and chalcogens are told apart by ``species``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["bond_angles", "height_map", "interface_x", "local_lattice_constant", "roughness_profile"]


def height_map(metals_A: np.ndarray, *, step_A: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The metals' z (ripple) interpolated on a regular grid.

    Returns ``(z (ny, nx), x (nx,), y (ny,))``; NaN outside the metals' convex hull.
    """
    from scipy.interpolate import griddata

    m = np.asarray(metals_A, float)
    x = np.arange(m[:, 0].min(), m[:, 0].max() + step_A, step_A)
    y = np.arange(m[:, 1].min(), m[:, 1].max() + step_A, step_A)
    gx, gy = np.meshgrid(x, y)
    z = griddata(m[:, :2], m[:, 2], (gx, gy), method="linear")
    return z, x, y


def interface_x(positions_A: np.ndarray, species: np.ndarray, left: Sequence[str] = ("Mo",),
                right: Sequence[str] = ("W",)) -> float:
    """x of a straight lateral interface along y: the x that best separates ``left`` from ``right`` metals."""
    sp = np.asarray(species)
    xl = np.asarray(positions_A)[np.isin(sp, left), 0]
    xr = np.asarray(positions_A)[np.isin(sp, right), 0]
    if not len(xl) or not len(xr):
        return float("nan")
    cand = np.sort(np.concatenate([xl, xr]))
    errors = [(xl > c).sum() + (xr < c).sum() for c in cand]
    best = int(np.argmin(errors))
    nxt = cand[min(best + 1, len(cand) - 1)]
    return float(0.5 * (cand[best] + nxt))


def roughness_profile(metals_A: np.ndarray, x_interface_A: float, *, strip_A: float = 10.0,
                      min_atoms: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RMS height (after removing the mean plane) of the metals in strips parallel to the interface.

    Returns ``(distance (m,), roughness (m,), counts (m,))``: strip centres as signed distance from the
    interface (Angstrom; negative on the low-x side), RMS of z about the fitted plane, atoms per strip.
    """
    m = np.asarray(metals_A, float)
    a = np.column_stack([m[:, 0], m[:, 1], np.ones(len(m))])
    coef, *_ = np.linalg.lstsq(a, m[:, 2], rcond=None)
    dz = m[:, 2] - a @ coef
    d = m[:, 0] - x_interface_A
    edges = np.arange(np.floor(d.min() / strip_A) * strip_A, d.max() + strip_A, strip_A)
    idx = np.digitize(d, edges) - 1
    centres, rough, counts = [], [], []
    for k in range(len(edges) - 1):
        sel = idx == k
        if sel.sum() >= min_atoms:
            centres.append(0.5 * (edges[k] + edges[k + 1]))
            rough.append(float(np.sqrt(np.mean(dz[sel] ** 2))))
            counts.append(int(sel.sum()))
    return np.array(centres), np.array(rough), np.array(counts)


def bond_angles(positions_A: np.ndarray, species: np.ndarray, metals: Sequence[str] = ("Mo", "W"),
                max_bond_A: float = 2.9) -> tuple[np.ndarray, np.ndarray]:
    """X-M-X angles (degrees) between each metal's bonds to the top and bottom chalcogen of the same site.

    For every metal, its chalcogen neighbours within ``max_bond_A`` are paired by in-plane position (top and
    bottom of one site); the angle at the metal between the two bonds is returned with the metal's index.
    Returns ``(angles (k,), metal_index (k,))``.
    """
    pos = np.asarray(positions_A, float)
    sp = np.asarray(species)
    is_m = np.isin(sp, metals)
    mi, ci = np.flatnonzero(is_m), np.flatnonzero(~is_m)
    if not len(mi) or not len(ci):
        return np.zeros(0), np.zeros(0, int)
    tree = cKDTree(pos[ci])
    angles, owner = [], []
    for i, nbs in zip(mi, tree.query_ball_point(pos[mi], max_bond_A), strict=True):
        nb = ci[np.asarray(nbs, int)]
        if len(nb) < 2:
            continue
        up, down = nb[pos[nb, 2] > pos[i, 2]], nb[pos[nb, 2] <= pos[i, 2]]
        for u in up:
            if not len(down):
                break
            j = down[np.argmin(np.hypot(*(pos[down, :2] - pos[u, :2]).T))]
            if np.hypot(*(pos[j, :2] - pos[u, :2])) > 0.8:
                continue
            v1, v2 = pos[u] - pos[i], pos[j] - pos[i]
            c = v1 @ v2 / (np.linalg.norm(v1) * np.linalg.norm(v2))
            angles.append(float(np.degrees(np.arccos(np.clip(c, -1, 1)))))
            owner.append(int(i))
    return np.array(angles), np.array(owner, int)


def local_lattice_constant(metals_A: np.ndarray, k: int = 6) -> np.ndarray:
    """Median 3D distance of every metal to its ``k`` nearest metals (the local lattice constant, Angstrom).

    Strain relative to a reference ``a0`` is ``local / a0 - 1``; edge atoms (fewer neighbours) are biased high.
    """
    m = np.asarray(metals_A, float)
    if len(m) <= k:
        return np.full(len(m), np.nan)
    d, _ = cKDTree(m).query(m, k=k + 1)
    return np.median(d[:, 1:], axis=1)
