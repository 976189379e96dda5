"""3D atomic model of a TMD monolayer refined against all projections of a tilt series at once (pure numpy/scipy).

Model: every atom is a 2D Gaussian in every projection, centred at its projected position
``u_ik = P(R_k r_i) / pixel + t_k`` (the calibrated geometry of :mod:`.tilt_calibration`), with a height per atom
(one per element after classification) and a width per projection (the probe; per element when fitted), on a
constant background per projection. All atoms are refined against all projections together: the parameters of
each atom are its height and ``(x, y, z)``; the normal equations are sparse (atoms couple only where their
images overlap) and are solved by the Levenberg-Marquardt of :mod:`.gaussians` in spatial tiles (a large field
is processed tile by tile with the rest of the model held fixed, two sweeps, so memory stays bounded).

Steps (:func:`build_model`):

1. start model: metals from the calibration (3D), chalcogen columns of the reference projection lifted to two
   atoms at the local metal height ``+- h``;
2. refine heights and positions of all atoms;
3. vacancies: two Gaussians that settled on one atom (both start atoms of a half-empty site, or an empty
   site's chalcogen that drifted onto a neighbour) are merged and the emptied chalcogen is a candidate; then
   for every chalcogen the local R1 factor ``sum |data - model| / sum |data|`` over its pixels in all
   projections is computed with the atom present and with it removed; an atom whose removal lowers R1 (or with
   less than 35 % of a light chalcogen's height, or more than 2.5 h from the metal plane) is a vacancy, placed
   at the mirror image of its site partner about the local metal plane; finally the comparison is repeated at
   that position with an atom of the partner's element (present vs absent): if it lowers R1 the site is kept
   occupied (its Gaussian had wandered off), with the median chalcogen error as its (approximate) error;
4. species from the heights (two classes per sublattice, split at the Otsu threshold of the log heights when the
   two clusters differ by more than a factor 1.6, e.g. Mo/W and S/Se);
5. per-element heights and widths fixed from the classified atoms, positions refined again; standard errors
   per atom from its block of ``J^T J`` (conditional on the neighbours) scaled by the reduced chi^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .gaussians import block_covariance, gaussian_windows, levenberg_marquardt

__all__ = ["AtomModel", "Geometry", "build_model", "lift_columns", "local_r1", "refine_atoms", "render_projections"]

METAL = 0
CHALCOGEN = 1


@dataclass(frozen=True, eq=False)
class Geometry:
    """Projection geometry of a tilt series.

    Attributes
    ----------
    rotations : ndarray (n, 3, 3)
        Sample-to-lab rotations (including in-plane image rotation).
    shifts_px : ndarray (n, 2)
        (row, col) of the sample origin in each image.
    pixel_A : float
    shape : (ny, nx)
    """

    rotations: np.ndarray
    shifts_px: np.ndarray
    pixel_A: float
    shape: tuple[int, int]

    def project(self, r_A: np.ndarray) -> np.ndarray:
        """``(n_proj, n_atoms, 2)`` image positions (row, col)."""
        lab = np.einsum("kij,nj->kni", self.rotations, np.asarray(r_A, float))
        return lab[..., [1, 0]] / self.pixel_A + self.shifts_px[:, None, :]

    def jacobian(self) -> np.ndarray:
        """``(n_proj, 2, 3)``: d(row, col) / d(x, y, z)."""
        return self.rotations[:, [1, 0], :] / self.pixel_A


@dataclass(frozen=True, eq=False)
class AtomModel:
    """Refined 3D atoms.

    Attributes
    ----------
    positions_A : ndarray (n, 3)
        Sample frame, Angstrom.
    position_err_A : ndarray (n, 3)
        Standard errors.
    species : ndarray (n,) str
    sublattice : ndarray (n,) int
        0 metal, 1 chalcogen.
    height : ndarray (n,)
        Fitted peak height per atom (counts per projection) before classification.
    vacancy_sites_A : ndarray (m, 3)
        Chalcogen positions judged empty (the R1 test).
    r1_present, r1_absent : ndarray (n_chalcogen_candidates,)
        Local R1 of every chalcogen candidate with and without it.
    r1 : float
        R1 factor of the whole model over all projections.
    sigma_px : dict
        Width per element.
    """

    positions_A: np.ndarray
    position_err_A: np.ndarray
    species: np.ndarray
    sublattice: np.ndarray
    height: np.ndarray
    vacancy_sites_A: np.ndarray
    r1_present: np.ndarray
    r1_absent: np.ndarray
    r1: float
    sigma_px: dict[str, float]

    def __len__(self) -> int:
        return len(self.species)


# ------------------------------------------------------------------------------------------------ start model
def lift_columns(columns_px: np.ndarray, z_A: np.ndarray, rotation: np.ndarray, shift_px: np.ndarray,
                 pixel_A: float) -> np.ndarray:
    """Sample-frame ``(x, y)`` of columns seen at ``columns_px`` (row, col) in one projection at heights ``z_A``."""
    r = np.asarray(rotation, float)
    a = r[:2, :2]  # lab (x, y) from sample (x, y)
    lab_xy = (np.asarray(columns_px, float) - shift_px)[:, [1, 0]] * pixel_A - np.outer(z_A, r[:2, 2])
    return np.linalg.solve(a, lab_xy.T).T


def start_model(metals_A: np.ndarray, chalcogen_px: np.ndarray, geometry: Geometry, reference: int,
                chalcogen_height_A: float = 1.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Metals plus two chalcogens per chalcogen column of the reference projection.

    Returns positions ``(n, 3)``, sublattice ``(n,)`` and the chalcogen site index ``(n,)`` (-1 for metals).
    """
    metals = np.asarray(metals_A, float)
    tree = cKDTree(metals[:, :2])
    xy = lift_columns(chalcogen_px, np.zeros(len(chalcogen_px)), geometry.rotations[reference],
                      geometry.shifts_px[reference], geometry.pixel_A)
    _, nb = tree.query(xy, k=min(3, len(metals)))
    z_loc = metals[np.atleast_2d(nb.T).T, 2].mean(axis=1) if len(metals) >= 3 else np.zeros(len(xy))
    xy = lift_columns(chalcogen_px, z_loc, geometry.rotations[reference], geometry.shifts_px[reference],
                      geometry.pixel_A)
    top = np.column_stack([xy, z_loc + chalcogen_height_A])
    bottom = np.column_stack([xy, z_loc - chalcogen_height_A])
    pos = np.concatenate([metals, top, bottom])
    sub = np.concatenate([np.full(len(metals), METAL), np.full(2 * len(xy), CHALCOGEN)])
    site = np.concatenate([np.full(len(metals), -1), np.arange(len(xy)), np.arange(len(xy))])
    return pos, sub, site


# ------------------------------------------------------------------------------------------------ forward model
def render_projections(positions_A: np.ndarray, height: np.ndarray, sigma_px: np.ndarray | float,
                       geometry: Geometry, background: np.ndarray, radius: int) -> np.ndarray:
    """Model images ``(n_proj, ny, nx)`` of Gaussian atoms."""
    ny, nx = geometry.shape
    uv = geometry.project(positions_A)
    out = np.empty((len(uv), ny, nx))
    sig = np.broadcast_to(np.asarray(sigma_px, float), (len(positions_A),))
    for k in range(len(uv)):
        win = gaussian_windows(uv[k], sig, (ny, nx), radius)
        out[k] = (np.bincount(win.index.ravel(), (win.g * height[:, None]).ravel(), ny * nx).reshape(ny, nx)
                  + background[k])
    return out


def _tiles(xy: np.ndarray, tile_A: float) -> list[np.ndarray]:
    lo = xy.min(axis=0)
    key = np.floor((xy - lo) / tile_A).astype(int)
    ids = key[:, 0] * (key[:, 1].max() + 1) + key[:, 1]
    return [np.flatnonzero(ids == u) for u in np.unique(ids)]


def refine_atoms(sums: np.ndarray, geometry: Geometry, positions_A: np.ndarray, height: np.ndarray,
                 sigma_px: np.ndarray | float, *, fit_height: bool = True, tile_A: float = 30.0,
                 sweeps: int = 2, n_iter: int = 15,
                 background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Refine ``(x, y, z)`` (and the height, with ``fit_height``) of every atom against all projections.

    Parameters
    ----------
    sums : ndarray (n_proj, ny, nx)
        Counts.
    geometry : Geometry
    positions_A : ndarray (n, 3)
        Start positions.
    height : ndarray (n,)
        Start heights (counts).
    sigma_px : float or ndarray (n,)
        Gaussian width per atom (fixed).
    fit_height : bool
        Refine heights too.
    tile_A : float
        Tile size in the sample plane (Angstrom); atoms of one tile are refined together.
    sweeps, n_iter : int
        Passes over all tiles and Levenberg-Marquardt iterations per tile.
    background : ndarray (n_proj,), optional
        Start background per projection (default: 1st percentile of each image).

    Returns
    -------
    positions, heights, errors (n, 3 or 4 parameter standard errors), background, chi2
    """
    data = np.asarray(sums, float)
    n_proj, ny, nx = data.shape
    npx = ny * nx
    flat = data.reshape(-1)
    w = 1.0 / np.sqrt(np.maximum(flat, 1.0))
    pos = np.array(positions_A, float)
    h = np.array(height, float)
    n = len(pos)
    sig = np.broadcast_to(np.asarray(sigma_px, float), (n,)).copy()
    radius = int(np.ceil(3.0 * sig.max()))
    bg = np.array([np.percentile(d, 1.0) for d in data]) if background is None else np.array(background, float)
    dj = geometry.jacobian()
    npar = 4 if fit_height else 3
    err = np.full((n, npar), np.inf)
    chi2 = np.nan

    def windows(p: np.ndarray, hh: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray, np.ndarray]:
        """Flat indices (m, n_proj*K), values, d/dh, d/dr (m, n_proj*K, 3) of atoms ``idx``."""
        uv = geometry.project(p)
        inds, vals, dh, dr = [], [], [], []
        for k in range(n_proj):
            win = gaussian_windows(uv[k], sig[idx], (ny, nx), radius)
            gy, gx = win.d_centre()
            d_uv = np.stack([gy, gx], axis=-1) * hh[:, None, None]  # (m, K, 2)
            inds.append(np.where(win.valid, win.index + k * npx, -1))
            vals.append(win.g * hh[:, None])
            dh.append(win.g)
            dr.append(d_uv @ dj[k])
        return (np.concatenate(inds, axis=1), np.concatenate(vals, axis=1), np.concatenate(dh, axis=1),
                np.concatenate(dr, axis=1), np.zeros(0))

    def full_model(p: np.ndarray, hh: np.ndarray) -> np.ndarray:
        ind, val, _, _, _ = windows(p, hh, np.arange(n))
        ok = ind >= 0
        m = np.bincount(ind[ok], val[ok], n_proj * npx)
        return m + np.repeat(bg, npx)

    for _sweep in range(sweeps):
        model = full_model(pos, h)
        bg += np.array([((flat - model)[k * npx:(k + 1) * npx] * w[k * npx:(k + 1) * npx] ** 2).sum()
                        / (w[k * npx:(k + 1) * npx] ** 2).sum() for k in range(n_proj)])
        model = full_model(pos, h)
        for idx in _tiles(pos[:, :2], tile_A):
            ind0, val0, _, _, _ = windows(pos[idx], h[idx], idx)
            pix = np.unique(ind0[ind0 >= 0])
            if not len(pix):  # atoms outside every image
                continue
            own0 = np.bincount(np.searchsorted(pix, ind0[ind0 >= 0]), val0[ind0 >= 0], len(pix))
            others = model[pix] - own0
            target, wt = flat[pix], w[pix]

            def evaluate(q: np.ndarray, idx: np.ndarray = idx, pix: np.ndarray = pix, others: np.ndarray = others,
                         target: np.ndarray = target, wt: np.ndarray = wt) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
                hh = q[:, 0] if fit_height else h[idx]
                p = q[:, -3:]
                ind, val, dh, dr, _ = windows(p, hh, idx)
                ok = ind >= 0
                rows = np.full(ind.shape, -1)
                loc = np.searchsorted(pix, np.where(ok, ind, 0))
                loc = np.clip(loc, 0, len(pix) - 1)
                inside = ok & (pix[loc] == ind)
                rows[inside] = loc[inside]
                own = np.bincount(rows[inside], val[inside], len(pix))
                res = wt * (target - others - own)
                wk = np.where(inside, wt[np.maximum(rows, 0)], 0.0)
                jac = dr * wk[..., None]
                if fit_height:
                    jac = np.concatenate([(dh * wk)[..., None], jac], axis=-1)
                return res, jac, rows

            q0 = np.column_stack([h[idx], pos[idx]]) if fit_height else pos[idx].copy()
            q, blocks, res, chi2 = levenberg_marquardt(evaluate, q0, n_iter=n_iter, tol=1e-6)
            if fit_height:
                h[idx] = q[:, 0]
            pos[idx] = q[:, -3:]
            cov = block_covariance(blocks, chi2)
            err[idx] = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
            ind1, val1, _, _, _ = windows(pos[idx], h[idx], idx)
            ok1 = ind1 >= 0
            loc1 = np.clip(np.searchsorted(pix, ind1[ok1]), 0, len(pix) - 1)
            in_pix = pix[loc1] == ind1[ok1]
            model[pix] = others + np.bincount(loc1[in_pix], val1[ok1][in_pix], len(pix))
            # the old windows lay inside ``pix``; a moved atom may now also reach pixels outside it
            np.add.at(model, ind1[ok1][~in_pix], val1[ok1][~in_pix])
    final = full_model(pos, h)
    chi2 = float((((flat - final) * w) ** 2).sum() / max(len(flat) - npar * n, 1))
    return pos, h, err, bg, chi2


def local_r1(sums: np.ndarray, model: np.ndarray, geometry: Geometry, positions_A: np.ndarray,
             contribution_height: np.ndarray, sigma_px: np.ndarray | float,
             radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Local R1 ``sum |d - m| / sum |d - background|`` over each atom's pixels in all projections, with the
    model as given and with the atom's own contribution removed.

    Returns ``(r1_present, r1_absent)`` per atom.
    """
    data = np.asarray(sums, float)
    n_proj, ny, nx = data.shape
    uv = geometry.project(positions_A)
    sig = np.broadcast_to(np.asarray(sigma_px, float), (len(positions_A),))
    num_p = np.zeros(len(positions_A))
    num_a = np.zeros(len(positions_A))
    den = np.zeros(len(positions_A))
    bg = np.array([np.percentile(d, 1.0) for d in data])
    for k in range(n_proj):
        win = gaussian_windows(uv[k], sig, (ny, nx), radius)
        d = data[k].ravel()[win.index]
        m = model[k].ravel()[win.index]
        g = win.g * contribution_height[:, None]
        v = win.valid
        num_p += (np.abs(d - m) * v).sum(axis=1)
        num_a += (np.abs(d - (m - g)) * v).sum(axis=1)
        den += (np.abs(d - bg[k]) * v).sum(axis=1)
    den = np.maximum(den, 1e-12)
    return num_p / den, num_a / den


def _two_classes(height: np.ndarray, names: tuple[str, str], ratio: float = 1.6) -> np.ndarray:
    """Split heights into a light and a heavy class (Otsu on log height) when their medians differ by ``ratio``."""
    from skimage.filters import threshold_otsu

    out = np.full(len(height), names[0], dtype="<U2")
    good = height > 0
    if good.sum() < 4:
        return out
    lh = np.log(height[good])
    if np.ptp(lh) < 1e-6:
        return out
    t = threshold_otsu(lh)
    lo, hi = lh[lh <= t], lh[lh > t]
    if len(lo) and len(hi) and np.exp(np.median(hi) - np.median(lo)) > ratio:
        sel = np.flatnonzero(good)
        out[sel[lh > t]] = names[1]
    else:
        # a single species: name it by its height relative to the other sublattice is not possible here
        pass
    return out


def build_model(sums: np.ndarray, geometry: Geometry, metals_A: np.ndarray, chalcogen_px: np.ndarray,
                reference: int, sigma_px: float, *, metal_names: tuple[str, str] = ("Mo", "W"),
                chalcogen_names: tuple[str, str] = ("S", "Se"), chalcogen_height_A: float = 1.6,
                tile_A: float = 30.0, sweeps: int = 2, single_species: Sequence[str] | None = None) -> AtomModel:
    """Steps 1-5 of the module docstring: the 3D atomic model from the sums at the calibrated geometry.

    Parameters
    ----------
    sums : ndarray (n_proj, ny, nx)
    geometry : Geometry
        Calibrated rotations and shifts.
    metals_A : ndarray (m, 3)
        3D metals from the calibration.
    chalcogen_px : ndarray (c, 2)
        Chalcogen columns (row, col) in the reference projection.
    reference : int
        Reference projection.
    sigma_px : float
        Probe width (start of the per-element widths).
    metal_names, chalcogen_names : (light, heavy)
        Element names of the two classes per sublattice.
    chalcogen_height_A : float
        Start height of the chalcogens above/below the metal plane.
    tile_A, sweeps : float, int
        See :func:`refine_atoms`.
    single_species : sequence of str, optional
        Unused; reserved.
    """
    data = np.asarray(sums, float)
    pos, sub, _site = start_model(metals_A, chalcogen_px, geometry, reference, chalcogen_height_A)
    start = pos.copy()
    bg0 = np.array([np.percentile(d, 1.0) for d in data])
    # start heights: the reference image at the projected position, halved for the two chalcogens of a column
    uv = geometry.project(pos)[reference]
    ij = np.clip(np.rint(uv).astype(int), 0, np.array(data.shape[1:]) - 1)
    h0 = np.maximum(data[reference][ij[:, 0], ij[:, 1]] - bg0[reference], 1.0) * np.where(sub == CHALCOGEN, 0.5, 1.0)
    # keep atoms that land in at least one image
    pos, h, _err, bg, _chi2 = refine_atoms(data, geometry, pos, h0, sigma_px, fit_height=True, tile_A=tile_A,
                                           sweeps=sweeps, background=bg0)
    radius = int(np.ceil(3.0 * sigma_px))
    # a site with one chalcogen: its two start atoms may both settle on the one present (half height each);
    # merge such pairs and mark the mirror position (about the local metal plane) as the empty one
    n_sites = len(chalcogen_px)
    n_met = int((sub == METAL).sum())
    top, bot = n_met + np.arange(n_sites), n_met + n_sites + np.arange(n_sites)
    metals = pos[:n_met]
    _, nb = cKDTree(metals[:, :2]).query(pos[top, :2], k=min(3, n_met))
    z_loc = metals[np.atleast_2d(nb.T).T, 2].mean(axis=1)
    # two Gaussians on one atom (the pair of a half-empty site, or an empty site's chalcogen that drifted onto a
    # neighbour): merge them; the emptied chalcogen is a vacancy candidate
    close = cKDTree(pos).query_pairs(0.35 * chalcogen_height_A)
    pairs = {(int(i), int(j)) for i, j in close if sub[i] == CHALCOGEN or sub[j] == CHALCOGEN}
    collapsed = (pos[top, 2] - pos[bot, 2]) < chalcogen_height_A  # a site's pair closer than h in z
    pairs |= {(int(a), int(b)) for a, b in zip(top[collapsed], bot[collapsed], strict=True)}
    merged_away: list[int] = []
    for a, b in sorted(pairs):
        if h[a] <= 0 or h[b] <= 0:
            continue
        if sub[a] == METAL or sub[b] == METAL:  # a chalcogen Gaussian on a metal: the metal takes it
            keep_i, gone_i = (a, b) if sub[a] == METAL else (b, a)
        else:
            keep_i, gone_i = (a, b) if h[a] >= h[b] else (b, a)
        ha, hb = h[keep_i], h[gone_i]
        pos[keep_i] = (pos[keep_i] * ha + pos[gone_i] * hb) / (ha + hb)
        h[keep_i], h[gone_i] = ha + hb, 0.0
        merged_away.append(int(gone_i))
    model = render_projections(pos, h, sigma_px, geometry, bg, radius)
    chal = np.flatnonzero(sub == CHALCOGEN)
    r1p, r1a = local_r1(data, model, geometry, pos[chal], np.maximum(h[chal], 0.0), sigma_px, radius)
    # besides the R1 test: a Gaussian with a small fraction of a light chalcogen's height, or one that left the
    # layer, describes noise
    light = np.percentile(h[chal][h[chal] > 0], 25) if np.any(h[chal] > 0) else 0.0
    _, nb_c = cKDTree(metals[:, :2]).query(pos[chal, :2], k=min(3, n_met))
    off_layer = np.abs(pos[chal, 2] - metals[np.atleast_2d(nb_c.T).T, 2].mean(axis=1)) > 2.5 * chalcogen_height_A
    vacant = chal[(r1a <= r1p) | (h[chal] <= 0.35 * light) | off_layer]
    # an empty site is where its partner's mirror image is (an atom fitted to nothing may have wandered off)
    partner = np.empty(len(pos), int)
    partner[top], partner[bot] = bot, top
    site_of = np.empty(len(pos), int)
    site_of[top], site_of[bot] = np.arange(n_sites), np.arange(n_sites)
    vac_pos = start[vacant].copy()
    has_partner = ~np.isin(partner[vacant], vacant)
    mirror = pos[partner[vacant]].copy()
    mirror[:, 2] = 2 * z_loc[site_of[vacant]] - mirror[:, 2]
    vac_pos[has_partner] = mirror[has_partner]
    keep = np.setdiff1d(np.arange(len(pos)), vacant)
    species = np.empty(len(pos), dtype="<U2")
    m_idx = np.flatnonzero(sub == METAL)
    species[m_idx] = _two_classes(h[m_idx], metal_names)
    c_keep = np.setdiff1d(chal, vacant)
    species[c_keep] = _two_classes(h[c_keep], chalcogen_names)
    # per-element heights and widths, then positions again with them fixed
    pos_k, sp_k, sub_k, h_raw = pos[keep], species[keep], sub[keep], h[keep]
    h_el = np.empty(len(keep))
    sig_el: dict[str, float] = {}
    for name in np.unique(sp_k):
        sel = sp_k == name
        h_el[sel] = np.median(h_raw[sel])
        sig_el[str(name)] = float(sigma_px)
    pos_k, _h, err, bg, _chi2 = refine_atoms(data, geometry, pos_k, h_el, sigma_px, fit_height=False,
                                             tile_A=tile_A, sweeps=1, background=bg)
    # the present/absent comparison at each empty site itself: an atom of the partner's element there, does it
    # lower the local R1? Then the site is occupied after all (its Gaussian had wandered off)
    if len(vac_pos):
        partner_sp = np.where(has_partner, species[partner[vacant]], chalcogen_names[0])
        h_try = np.array([np.median(h_el[sp_k == s_]) if np.any(sp_k == s_) else np.median(h_el) for s_ in partner_sp])
        model_try = render_projections(np.concatenate([pos_k, vac_pos]), np.concatenate([h_el, h_try]), sigma_px,
                                       geometry, bg, radius)
        r1_with, r1_without = local_r1(data, model_try, geometry, vac_pos, h_try, sigma_px, radius)
        occupied = r1_with < r1_without
        if occupied.any():
            pos_k = np.concatenate([pos_k, vac_pos[occupied]])
            sp_k = np.concatenate([sp_k, partner_sp[occupied]])
            sub_k = np.concatenate([sub_k, np.full(int(occupied.sum()), CHALCOGEN)])
            h_raw = np.concatenate([h_raw, h_try[occupied]])
            h_el = np.concatenate([h_el, h_try[occupied]])
            typical = np.nanmedian(err[sub_k[: len(err)] == CHALCOGEN], axis=0) if np.any(sub_k == CHALCOGEN) else 0.1
            err = np.concatenate([err, np.tile(typical, (int(occupied.sum()), 1))])
            vac_pos = vac_pos[~occupied]
    model = render_projections(pos_k, h_el, sigma_px, geometry, bg, radius)
    r1 = float(np.abs(data - model).sum() / np.abs(data - bg[:, None, None]).sum())
    return AtomModel(pos_k, err[:, -3:], sp_k, sub_k, h_raw, vac_pos, r1p, r1a, r1, sig_el)
