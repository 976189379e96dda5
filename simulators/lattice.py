"""Synthetic HAADF-like lattice images rendered exactly at any sub-pixel displacement (for registration tests).

A honeycomb lattice of Gaussian columns (MoS2-like by default: metal and S2 sites, period 9.9 px = 3.165 A at
0.32 A/px) is evaluated as its analytic Fourier series, so a displacement, including a different one for every
scan row (scan distortion), is exact rather than interpolated. Missing metal columns (vacancies) make the image
non-periodic so that registration has a unique answer. Add Poisson noise with ``rng.poisson``.
"""

from __future__ import annotations

import numpy as np

PERIOD_PX = 9.9  # MoS2 a = 3.165 A at 0.32 A/px (reference/tilt_series_mos2_wse2.json)


def lattice_vectors(period: float = PERIOD_PX, angle_deg: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """The two primitive vectors ``(y, x)`` in pixels of the hexagonal lattice."""
    th = np.deg2rad(angle_deg)
    a1 = period * np.array([np.sin(th), np.cos(th)])
    a2 = period * np.array([np.sin(th + np.pi / 3), np.cos(th + np.pi / 3)])
    return a1, a2


def metal_sites(
    shape: tuple[int, int], *, period: float = PERIOD_PX, angle_deg: float = 12.0, margin: float = -10.0
) -> np.ndarray:
    """Positions ``(n, 2)`` of the metal columns at least ``margin`` px inside the image (negative: outside)."""
    a1, a2 = lattice_vectors(period, angle_deg)
    n = int(2 * max(shape) / period) + 4
    i, j = np.meshgrid(np.arange(-n, n), np.arange(-n, n))
    p = np.array([0.3, 0.7]) + i.ravel()[:, None] * a1 + j.ravel()[:, None] * a2
    ok = (p[:, 0] > margin) & (p[:, 0] < shape[0] - margin) & (p[:, 1] > margin) & (p[:, 1] < shape[1] - margin)
    return p[ok]


def random_vacancies(
    shape: tuple[int, int],
    rng: np.random.Generator,
    fraction: float = 0.01,
    *,
    period: float = PERIOD_PX,
    angle_deg: float = 12.0,
) -> np.ndarray:
    """A random ``fraction`` of the metal sites in and around the image."""
    p = metal_sites(shape, period=period, angle_deg=angle_deg)
    return p[rng.random(len(p)) < fraction]


def render_lattice(
    shape: tuple[int, int],
    displacement: np.ndarray | tuple[float, float] = (0.0, 0.0),
    *,
    period: float = PERIOD_PX,
    angle_deg: float = 12.0,
    sigma: float = 1.7,
    counts: tuple[float, float] = (1000.0, 400.0),
    vacancies: np.ndarray | None = None,
) -> np.ndarray:
    """Expected counts of a honeycomb lattice; ``displacement`` (2,) or per row (ny, 2), contract convention."""
    ny, nx = shape
    d = np.broadcast_to(np.asarray(displacement, float), (ny, 2))
    a1, a2 = lattice_vectors(period, angle_deg)
    amat = np.stack([a1, a2])
    bmat = np.linalg.inv(amat).T
    origin = np.array([0.3, 0.7])
    basis = [(origin, counts[0]), (origin + (a1 + a2) / 3, counts[1])]
    gmax = np.sqrt(np.log(1e7) / (2 * np.pi**2 * sigma**2))
    hmax = int(np.ceil(gmax * period * 1.2)) + 1
    h, k = np.meshgrid(np.arange(-hmax, hmax + 1), np.arange(-hmax, hmax + 1))
    g = h.ravel()[:, None] * bmat[0] + k.ravel()[:, None] * bmat[1]
    g = g[np.hypot(g[:, 0], g[:, 1]) <= gmax]
    coef = sum(n * np.exp(-2j * np.pi * g @ p) for p, n in basis)
    coef = coef * np.exp(-2 * np.pi**2 * sigma**2 * (g**2).sum(1)) / abs(np.linalg.det(amat))
    r = np.arange(ny)[:, None]
    e1 = np.exp(2j * np.pi * (g[:, 0][None] * (r - d[:, :1]) - g[:, 1][None] * d[:, 1:])) * coef[None]
    img = (e1 @ np.exp(2j * np.pi * g[:, 1][:, None] * np.arange(nx)[None])).real
    if vacancies is not None:
        half = int(np.ceil(4 * sigma))
        off = np.arange(-half, half + 1)
        amp = counts[0] / (2 * np.pi * sigma**2)
        for vy, vx in vacancies:
            rows = int(round(vy + d[int(np.clip(round(vy), 0, ny - 1)), 0])) + off
            rows = rows[(rows >= 0) & (rows < ny)]
            if rows.size == 0:
                continue
            dy, dx = d[rows, :1], d[rows, 1:]
            cols = int(round(vx + dx.mean())) + off
            cols = cols[(cols >= 0) & (cols < nx)]
            if cols.size:
                img[np.ix_(rows, cols)] -= amp * np.exp(
                    -((rows[:, None] - vy - dy) ** 2 + (cols[None] - vx - dx) ** 2) / (2 * sigma**2)
                )
    return np.clip(img, 0.0, None)

