"""3D atomic model of a TMD monolayer refined against all projections of a tilt series at once (pure numpy/scipy).

Model: every atom is a 2D Gaussian in every projection, centred at its projected position
``u_ik = P(R_k r_i) / pixel + t_k`` (the calibrated geometry of :mod:`.tilt_calibration`), on a constant background
per projection; in the final model every element has one peak height and one width (fitted). The fits are the
block Gauss-Seidel refinement and the global element fit of :mod:`.atom_refinement`.

Steps (:func:`build_model`):

1. start model: metals from the calibration (3D), chalcogen columns of the reference projection lifted to two
   atoms at the local metal height ``+- h``; heights and ``(x, y, z)`` of all atoms refined against all
   projections (probe width for all);
2. Gaussians that did not settle on their own atom (faded to < 30 % of a light chalcogen, left the layer by more
   than 0.6 A, or moved 0.8 A in-plane: an empty site's Gaussian, or one of the two of a half-empty site that
   share the one atom) give their amplitude to the partner they sit on and are put back where their atom would
   be, the partner mirrored about the local metal plane;
3. amplitudes refitted at these positions (linear); species: two classes per sublattice from the log amplitudes
   (Otsu, e.g. Mo/W and S/Se, when the classes differ by > 1.6x); one peak height and one Gaussian width per
   element fitted to all projections (:func:`.atom_refinement.element_profiles`);
4. vacancies: every chalcogen's amplitude refitted with the element widths, in units of the lightest chalcogen's
   height (the *occupancy*), with its standard error from the site pair's ``2 x 2`` normal block (the two
   chalcogens of a site coincide at zero tilt); a site is empty when the likelihood ratio of "empty" against
   "a light chalcogen present" exceeds the prior odds (:func:`build_model` ``vacancy_prior``). The local R1 of
   every candidate with and without it (the reference's comparison) is kept alongside;
5. positions of all present atoms refined again with the per-element heights and widths fixed; per-atom
   standard errors from each atom's block of ``J^T W J`` times the reduced chi^2 (conditional on the neighbours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .atom_refinement import amplitude_errors, element_profiles, poisson_weights, refine_gauss_seidel, unmodelled_mask
from .gaussians import gaussian_windows

__all__ = ["AtomModel", "Geometry", "build_model", "lift_columns", "local_r1", "render_projections", "start_model"]

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
    distortion : ndarray (n, 2, 2), optional
        Linear image distortion ``D_k`` of each projection (e.g. the scan's, from the drift during a frame):
        ``u = D_k P(R_k r) / pixel + t_k``; None: the identity.
    """

    rotations: np.ndarray
    shifts_px: np.ndarray
    pixel_A: float
    shape: tuple[int, int]
    distortion: np.ndarray | None = None

    def project(self, r_A: np.ndarray) -> np.ndarray:
        """``(n_proj, n_atoms, 2)`` image positions (row, col)."""
        lab = np.einsum("kij,nj->kni", self.rotations, np.asarray(r_A, float))
        img = lab[..., [1, 0]] / self.pixel_A
        if self.distortion is not None:
            img = np.einsum("kij,knj->kni", self.distortion, img)
        return img + self.shifts_px[:, None, :]

    def jacobian(self) -> np.ndarray:
        """``(n_proj, 2, 3)``: d(row, col) / d(x, y, z)."""
        j = self.rotations[:, [1, 0], :] / self.pixel_A
        return j if self.distortion is None else np.einsum("kij,kjl->kil", self.distortion, j)


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
    sigma_px, element_height : dict
        Fitted Gaussian width (px) and peak height (counts per projection) per element.
    sigma_err, element_height_err : dict
        Their standard errors.
    occupancy, occupancy_err : ndarray (n_chalcogen_candidates,)
        Fitted amplitude of every chalcogen candidate (top atoms of all sites, then bottom atoms) in units of the
        lightest chalcogen's height, and its standard error (the pair's correlation included).
    candidate_start_A : ndarray (n_chalcogen_candidates, 3)
        Start position of each candidate (the order of ``occupancy`` and ``r1_present``).
    timings_s : dict
        CPU seconds of the steps of :func:`build_model` (``time.process_time``).
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
    element_height: dict[str, float]
    sigma_err: dict[str, float]
    element_height_err: dict[str, float]
    occupancy: np.ndarray
    occupancy_err: np.ndarray
    candidate_start_A: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)

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


def _local_plane(metals: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Metal-plane height below each ``xy``: mean z of the (up to) 3 nearest metals."""
    k = min(3, len(metals))
    if k == 0:
        return np.zeros(len(xy))
    _, nb = cKDTree(metals[:, :2]).query(xy, k=k)
    return metals[np.asarray(nb).reshape(len(xy), k), 2].mean(axis=1)


def _sites_without_column(metals_A: np.ndarray, chalcogen_px: np.ndarray, geometry: Geometry,
                          reference: int) -> np.ndarray:
    """Reference-projection positions (row, col) of chalcogen sites of the metal lattice with no column found.

    In the 1H structure the chalcogen sites sit at the centroids of half of the metal triangles; the centroids of
    the other half (hollow sites) have three chalcogen columns at ``a / sqrt(3)``, the centroid of an empty site's
    triangle has none nearer than ``a``. Only regular triangles (edges within 15 % of the median metal spacing).
    """
    from scipy.spatial import Delaunay

    metals = np.asarray(metals_A, float)
    cols = np.asarray(chalcogen_px, float).reshape(-1, 2)
    if len(metals) < 3 or len(cols) < 3:
        return np.zeros((0, 2))
    tri = Delaunay(metals[:, :2]).simplices
    corners = metals[tri]  # (t, 3, 3)
    edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2)
    a = float(np.median(edges))
    regular = np.all(np.abs(edges / a - 1.0) < 0.15, axis=1)
    centre = corners.mean(axis=1)[regular]
    uv = geometry.project(centre)[reference]
    d, _ = cKDTree(cols).query(uv)
    return uv[d * geometry.pixel_A > 0.8 * a]


def build_model(sums: np.ndarray, geometry: Geometry, metals_A: np.ndarray, chalcogen_px: np.ndarray,
                reference: int, sigma_px: float, *, metal_names: tuple[str, str] = ("Mo", "W"),
                chalcogen_names: tuple[str, str] = ("S", "Se"), chalcogen_height_A: float = 1.6,
                sweeps: int = 8, vacancy_prior: float = 0.02) -> AtomModel:
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
    sweeps : int
        Gauss-Seidel sweeps of the first (free) refinement (:func:`.atom_refinement.refine_gauss_seidel`).
    vacancy_prior : float
        Prior probability that a chalcogen site is empty, in the likelihood-ratio test of the occupancies.
    """
    times: dict[str, float] = {}
    t0 = time.process_time()

    def lap(name: str) -> None:
        nonlocal t0
        times[name] = time.process_time() - t0
        t0 = time.process_time()

    data = np.asarray(sums, float)
    n_proj = len(data)
    # a site with both chalcogens missing shows no column: candidates also where the metal lattice puts a site
    chalcogen_px = np.concatenate([np.asarray(chalcogen_px, float).reshape(-1, 2),
                                   _sites_without_column(metals_A, chalcogen_px, geometry, reference)])
    pos, sub, _site = start_model(metals_A, chalcogen_px, geometry, reference, chalcogen_height_A)
    start = pos.copy()
    n_met, n_sites = int((sub == METAL).sum()), len(chalcogen_px)
    top, bot = n_met + np.arange(n_sites), n_met + n_sites + np.arange(n_sites)
    met, chal = np.arange(n_met), np.concatenate([top, bot])
    groups = [met, top, bot]  # atoms of one group do not overlap in any projection
    bg0 = np.array([np.percentile(d, 1.0) for d in data])
    # start heights: the reference image at the projected position, halved for the two chalcogens of a column
    uv = geometry.project(pos)[reference]
    ij = np.clip(np.rint(uv).astype(int), 0, np.array(data.shape[1:]) - 1)
    h0 = np.maximum(data[reference][ij[:, 0], ij[:, 1]] - bg0[reference], 1.0) * np.where(sub == CHALCOGEN, 0.5, 1.0)
    # 1. heights and positions of all atoms, the probe width for all
    free = refine_gauss_seidel(data, geometry, pos, h0, sigma_px, groups, background=bg0, sweeps=sweeps)
    pos, amp, bg = free.positions_A.copy(), free.amplitude.copy(), free.background
    lap("refine_free")
    # 2. sites whose Gaussians did not settle on their own atom: an empty site's Gaussian fades, drifts onto a
    # neighbour or onto its partner (the two of a half-empty site share the one atom). Such a Gaussian gives its
    # amplitude to the partner it sits on and is put back where its atom would be: the partner mirrored about
    # the local metal plane (in-plane the pair shares its position)
    z_loc = _local_plane(pos[met], start[top, :2])
    side = np.concatenate([np.ones(n_sites), -np.ones(n_sites)])
    z_rel = (pos[chal, 2] - np.tile(z_loc, 2)) * side
    light = np.percentile(amp[chal][amp[chal] > 0], 25) if np.any(amp[chal] > 0) else 1.0
    sane = ((amp[chal] > 0.3 * light) & (np.abs(z_rel - chalcogen_height_A) < 0.6)
            & (np.linalg.norm(pos[chal, :2] - start[chal, :2], axis=1) < 0.8))
    h_site = float(np.median(z_rel[sane])) if sane.any() else chalcogen_height_A
    partner = np.concatenate([bot, top])
    sane_p = np.concatenate([sane[n_sites:], sane[:n_sites]])
    on_partner = ~sane & sane_p & (np.linalg.norm(pos[chal] - pos[partner], axis=1) < 0.5)
    np.add.at(amp, partner[on_partner], amp[chal][on_partner])
    reset = chal[~sane]
    amp[reset] = 0.5 * light
    xy_site = np.where(sane_p[:, None], pos[partner, :2], start[chal, :2])[~sane]
    z_mirror = np.where(sane_p, 2 * np.tile(z_loc, 2) - pos[partner, 2], np.tile(z_loc, 2) + side * h_site)
    pos[reset] = np.column_stack([xy_site, z_mirror[~sane]])
    # 3. amplitudes again at these positions (linear, quickly converged), then species: two classes per sublattice
    # from the log amplitudes, then one height and one width per element
    amp_fit = refine_gauss_seidel(data, geometry, pos, amp, sigma_px, groups, background=bg, fit_pos=False, sweeps=3)
    amp, bg = amp_fit.amplitude, amp_fit.background
    species = np.empty(len(pos), dtype="<U2")
    species[met] = _two_classes(amp[met], metal_names)
    species[chal] = _two_classes(np.where(sane, amp[chal], 0.0), chalcogen_names)
    names = [str(x) for x in dict.fromkeys([*metal_names, *chalcogen_names])]
    el = np.array([names.index(s) for s in species])
    el_fit = el.copy()
    el_fit[chal[~sane | (amp[chal] < 0.5 * light)]] = -1
    present_names = [nm for nm in names if np.any(el_fit == names.index(nm))]
    h_start = np.array([np.median(amp[el_fit == i]) if np.any(el_fit == i) else 1.0 for i in range(len(names))])
    s_start = np.full(len(names), float(sigma_px))
    lap("amplitudes_species")
    # pixels with signal the model lacks (atoms outside the reference projection that a tilted one shows) would
    # pull the widths of the weak chalcogens next to them: left out of the element fit
    usable = unmodelled_mask(amp_fit.residual, poisson_weights(data), data.shape[1:])
    h_el, s_el, h_err, s_err = element_profiles(data, geometry, pos, el_fit, h_start, s_start, background=bg,
                                                mask=usable)
    lap("element_profiles")
    # 4. occupancy of every chalcogen: all amplitudes refitted (linear) at these positions with the element
    # widths; a site is empty when the likelihood ratio of "empty" against "the lightest chalcogen present"
    # exceeds the prior odds. For an amplitude a with standard error s, in units of the light chalcogen's height
    # H: log LR = (H^2 - 2 a H) / (2 s^2) (Gaussian errors, the pair's correlation in s)
    chal_light = [names.index(nm) for nm in chalcogen_names if nm in present_names]
    sig_atom = s_el[el]
    if chal_light:
        sig_atom[chal[el_fit[chal] < 0]] = s_el[chal_light[0]]
    occ_fit = refine_gauss_seidel(data, geometry, pos, amp, sig_atom, groups, background=bg, fit_pos=False,
                                  sweeps=3)
    amp, bg = occ_fit.amplitude, occ_fit.background
    weight = poisson_weights(data)
    a_err = amplitude_errors(geometry, weight, pos, sig_atom, np.column_stack([top, bot]), occ_fit.chi2).T.ravel()
    h_light = float(min(h_el[i] for i in chal_light)) if chal_light else float(light)
    occupancy = amp[chal] / h_light
    occ_err = a_err / h_light
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lr = (1.0 - 2.0 * occupancy) / (2.0 * occ_err**2)
    empty = np.nan_to_num(log_lr, nan=0.0, posinf=0.0) > np.log((1.0 - vacancy_prior) / vacancy_prior)
    # local R1 (sum |d - m| / sum |d - b| over the atom's pixels in all projections) with and without each
    # chalcogen, the comparison of the reference's method, kept for the report
    model_flat = data.reshape(n_proj, -1) - occ_fit.residual
    r1p, r1a = local_r1(data, model_flat.reshape(data.shape), geometry, pos[chal], np.maximum(amp[chal], 0.0),
                        sig_atom[chal], int(np.ceil(3.0 * sig_atom.max())))
    vacant = chal[empty]
    # an empty site is where its partner's mirror image about the local metal plane is
    p_of = partner[empty]
    mirror = np.column_stack([pos[p_of, :2], 2 * np.tile(z_loc, 2)[empty] - pos[p_of, 2]])
    vac_pos = np.where(np.isin(p_of, vacant)[:, None], pos[vacant], mirror)
    keep = np.setdiff1d(np.arange(len(pos)), vacant)
    # present atoms: species by the nearest element height (log) of their sublattice (e.g. an S on a Se site)
    for names_sub, idx_sub in ((metal_names, met), (chalcogen_names, np.setdiff1d(chal, vacant))):
        cand = [names.index(nm) for nm in names_sub if nm in present_names]
        if len(cand) == 2 and len(idx_sub):
            lh = np.log(np.maximum(amp[idx_sub], 1e-9))
            heavy = np.abs(lh - np.log(h_el[cand[1]])) < np.abs(lh - np.log(h_el[cand[0]]))
            el[idx_sub] = np.where(heavy, cand[1], cand[0])
            species[idx_sub] = np.array(names)[el[idx_sub]]
    lap("occupancy")
    # 5. positions again with the per-element heights and widths fixed; per-atom errors
    kk = keep
    groups_k = [np.flatnonzero(np.isin(kk, g)) for g in groups]
    final = refine_gauss_seidel(data, geometry, pos[kk], h_el[el[kk]], s_el[el[kk]], groups_k, background=bg,
                                fit_amp=False, sweeps=4)
    r1 = float(np.abs(final.residual).sum() / np.abs(data.reshape(n_proj, -1) - final.background[:, None]).sum())
    lap("refine_final")
    return AtomModel(final.positions_A, final.position_err_A, species[kk], sub[kk], free.amplitude[kk], vac_pos,
                     r1p, r1a, r1, {nm: float(s_el[names.index(nm)]) for nm in present_names},
                     {nm: float(h_el[names.index(nm)]) for nm in present_names},
                     {nm: float(s_err[names.index(nm)]) for nm in present_names},
                     {nm: float(h_err[names.index(nm)]) for nm in present_names},
                     occupancy, occ_err, start[chal], times)
