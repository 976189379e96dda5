"""Sample models: a monolayer MoS2-WSe2 lateral heterojunction with ground-truth atom positions.

Sample frame (Angstrom): the monolayer lies in the x-y plane, z is its normal (the beam direction at zero
tilt). The metal plane is at z = 0 (before ripple); chalcogens sit at z = +-h (1H, trigonal prismatic).

Lattice orientation: the lattice vector a1 = a (0, 1) (the zigzag direction, nearest metal-metal) runs along
y, a2 = a (sqrt(3)/2, 1/2). The interface is a zigzag line along y at ``x = interface_x_nm``: MoS2 for
x < interface, WSe2 for x > interface. Metal rows (zigzag chains along y) are spaced d = a sqrt(3)/2 in x;
the chalcogen column of each 1H cell is at (a1 + a2) / 3 from the metal. In projection along z the first-order
Fourier spots ({100} planes, spacing a sqrt(3)/2) lie at 0, 60, 120 ... deg from kx with |k| = 2 / (a sqrt(3)):
periods 2.741 A (MoS2) and 2.893 A (WSe2), 5.53 % apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["ATOMIC_NUMBER", "REGION_MOS2", "REGION_WSE2", "AtomSet", "Heterojunction"]

ATOMIC_NUMBER: dict[str, int] = {"S": 16, "Se": 34, "Mo": 42, "W": 74}
REGION_MOS2 = 0
REGION_WSE2 = 1


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class AtomSet:
    """Ground-truth atoms (immutable arrays).

    Attributes
    ----------
    positions_A : ndarray, shape (n, 3), float64
        x, y, z in Angstrom (sample frame unless stated otherwise).
    Z : ndarray, shape (n,), int64
        Atomic numbers.
    species : ndarray, shape (n,), str
        Element symbols ("Mo", "W", "S", "Se").
    region : ndarray, shape (n,), int8
        Ground-truth region label of the lattice site: 0 = MoS2 side, 1 = WSe2 side (substituted chalcogens keep
        the label of their site).
    """

    positions_A: np.ndarray
    Z: np.ndarray
    species: np.ndarray
    region: np.ndarray

    def __post_init__(self) -> None:
        pos = np.asarray(self.positions_A, dtype=np.float64).reshape(-1, 3)
        n = len(pos)
        z = np.asarray(self.Z, dtype=np.int64).reshape(-1)
        sp = np.asarray(self.species, dtype=str).reshape(-1)
        reg = np.asarray(self.region, dtype=np.int8).reshape(-1)
        if not (len(z) == len(sp) == len(reg) == n):
            raise ValueError(f"AtomSet arrays disagree in length: {n}, {len(z)}, {len(sp)}, {len(reg)}")
        object.__setattr__(self, "positions_A", _readonly(pos))
        object.__setattr__(self, "Z", _readonly(z))
        object.__setattr__(self, "species", _readonly(sp))
        object.__setattr__(self, "region", _readonly(reg))

    @classmethod
    def from_species(cls, positions_A: np.ndarray, species: np.ndarray, region: np.ndarray | int = 0) -> AtomSet:
        """Build from positions and element symbols (Z looked up in :data:`ATOMIC_NUMBER`)."""
        sp = np.asarray(species, dtype=str).reshape(-1)
        z = np.array([ATOMIC_NUMBER[s] for s in sp], dtype=np.int64)
        reg = np.broadcast_to(np.asarray(region, dtype=np.int8), sp.shape)
        return cls(np.asarray(positions_A, dtype=np.float64), z, sp, reg)

    def __len__(self) -> int:
        return len(self.Z)

    def select(self, mask: np.ndarray) -> AtomSet:
        """Subset by boolean mask or index array."""
        return AtomSet(self.positions_A[mask], self.Z[mask], self.species[mask], self.region[mask])

    def transformed(self, rotation: np.ndarray, shift_A: np.ndarray | None = None) -> AtomSet:
        """Atoms at ``rotation @ r + shift_A`` (e.g. sample frame -> lab frame)."""
        pos = self.positions_A @ np.asarray(rotation, dtype=np.float64).T
        if shift_A is not None:
            pos = pos + np.asarray(shift_A, dtype=np.float64)
        return AtomSet(pos, self.Z, self.species, self.region)

    def counts(self) -> dict[str, int]:
        """Number of atoms per species."""
        names, n = np.unique(self.species, return_counts=True)
        return {str(k): int(v) for k, v in zip(names, n, strict=True)}

    def to_dict(self) -> dict[str, list]:
        """JSON-ready dict (lists)."""
        return {"positions_A": self.positions_A.tolist(), "Z": self.Z.tolist(),
                "species": self.species.tolist(), "region": self.region.tolist()}


def _side(a_A: float, h_A: float, metal: str, chalc: str, rows: np.ndarray, x0_A: float,
          y_half_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1H lattice on metal rows ``rows`` (integer k, metal x = x0 + k d): positions, species, is_chalcogen."""
    d = a_A * math.sqrt(3.0) / 2.0
    nj = int(math.ceil(y_half_A / a_A)) + 2
    j = np.arange(-nj, nj + 1)
    k, jj = np.meshgrid(rows, j, indexing="ij")
    k, jj = k.ravel(), jj.ravel()
    mx, my = x0_A + k * d, jj * a_A + 0.5 * a_A * (k % 2)  # a2 adds a/2 in y per row; reduce modulo a
    cx, cy = mx + d / 3.0, my + 0.5 * a_A
    n = len(k)
    pos = np.concatenate([
        np.stack([mx, my, np.zeros(n)], axis=1),
        np.stack([cx, cy, np.full(n, h_A)], axis=1),
        np.stack([cx, cy, np.full(n, -h_A)], axis=1),
    ])
    species = np.array([metal] * n + [chalc] * (2 * n))
    is_chalc = np.arange(3 * n) >= n
    return pos, species, is_chalc


@dataclass(frozen=True)
class Heterojunction:
    """Parameters of a monolayer MoS2 | WSe2 lateral heterojunction; :meth:`atoms` builds it.

    Defaults follow ``reference/tilt_series_mos2_wse2.json``. A 16 x 16 nm flake holds ~8,300 atoms
    (MoS2 34.6, WSe2 31.0 atoms/nm^2); the reference reconstruction's 1,886 atoms correspond to ~7.5 x 7.5 nm.

    Attributes
    ----------
    lattice_MoS2_A, lattice_WSe2_A : float
        In-plane lattice constants (3.165, 3.34 A: 5.53 % mismatch).
    chalcogen_height_S_A, chalcogen_height_Se_A : float
        Height of the chalcogen planes above/below the metal plane (X-X distance / 2).
    extent_x_nm, extent_y_nm : float
        Flake size, centred on the origin of the sample frame.
    interface_x_nm : float
        Position of the zigzag interface (a line along y).
    in_plane_rotation_deg : float
        Rotation of the whole flake about z (0: interface along y).
    vacancy_fraction : float
        Probability that a chalcogen site is empty (reference: 16 of ~1,250 -> 0.013).
    interface_width_nm, interface_substitution_fraction : float
        Chalcogens within +-width/2 of the interface are swapped S <-> Se with this probability.
    random_substitution_fraction : float
        Swap probability everywhere else.
    ripple_amplitude_A, ripple_wavelength_nm, ripple_decay_nm, ripple_phase_deg : float
        Out-of-plane ripple z += A cos(2 pi y / lambda + phase) exp(-|x - x_interface| / decay): running along
        the interface and decaying away from it (reference: 1.5 A, 5 nm).
    min_atom_distance_A : float
        WSe2-side atoms closer than this to a MoS2-side atom are removed (reference: 1.6 A).
    seed : int
        Seed of the random vacancies and substitutions.
    """

    lattice_MoS2_A: float = 3.165
    lattice_WSe2_A: float = 3.34
    chalcogen_height_S_A: float = 1.56
    chalcogen_height_Se_A: float = 1.67
    extent_x_nm: float = 16.0
    extent_y_nm: float = 16.0
    interface_x_nm: float = 0.0
    in_plane_rotation_deg: float = 0.0
    vacancy_fraction: float = 0.013
    interface_width_nm: float = 1.0
    interface_substitution_fraction: float = 0.25
    random_substitution_fraction: float = 0.01
    ripple_amplitude_A: float = 1.5
    ripple_wavelength_nm: float = 5.0
    ripple_decay_nm: float = 3.0
    ripple_phase_deg: float = 0.0
    min_atom_distance_A: float = 1.6
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.lattice_MoS2_A > 0 and self.lattice_WSe2_A > 0, "lattice constants must be > 0"),
            (self.chalcogen_height_S_A >= 0 and self.chalcogen_height_Se_A >= 0, "chalcogen heights must be >= 0"),
            (self.extent_x_nm > 0 and self.extent_y_nm > 0, "extent must be > 0"),
            (0 <= self.vacancy_fraction <= 1, "vacancy_fraction must be in [0, 1]"),
            (0 <= self.interface_substitution_fraction <= 1, "interface_substitution_fraction must be in [0, 1]"),
            (0 <= self.random_substitution_fraction <= 1, "random_substitution_fraction must be in [0, 1]"),
            (self.interface_width_nm >= 0, "interface_width_nm must be >= 0"),
            (self.ripple_wavelength_nm > 0 and self.ripple_decay_nm > 0, "ripple wavelength/decay must be > 0"),
            (self.min_atom_distance_A >= 0, "min_atom_distance_A must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"sample: {msg}")

    @property
    def mismatch_percent(self) -> float:
        """Lattice mismatch (a_WSe2 - a_MoS2) / a_MoS2 in percent."""
        return 100.0 * (self.lattice_WSe2_A - self.lattice_MoS2_A) / self.lattice_MoS2_A

    def plane_spacing_A(self, region: int) -> float:
        """{100} plane spacing a sqrt(3)/2 of a side (region 0 MoS2, 1 WSe2): the first-order projected period."""
        a = self.lattice_MoS2_A if region == REGION_MOS2 else self.lattice_WSe2_A
        return a * math.sqrt(3.0) / 2.0

    def ripple_z_A(self, x_A: np.ndarray, y_A: np.ndarray) -> np.ndarray:
        """Out-of-plane ripple displacement at sample-frame (x, y) before the in-plane rotation."""
        xi = self.interface_x_nm * 10.0
        phase = 2 * np.pi * np.asarray(y_A) / (self.ripple_wavelength_nm * 10.0) + np.radians(self.ripple_phase_deg)
        return self.ripple_amplitude_A * np.cos(phase) * np.exp(-np.abs(np.asarray(x_A) - xi)
                                                                  / (self.ripple_decay_nm * 10.0))

    def atoms(self) -> AtomSet:
        """Build the heterojunction: positions (A), Z, species and region labels; reproducible from ``seed``."""
        rng = np.random.default_rng(self.seed)
        hx, hy = 5.0 * self.extent_x_nm, 5.0 * self.extent_y_nm  # half extents in A
        xi = self.interface_x_nm * 10.0
        d_mo = self.lattice_MoS2_A * math.sqrt(3) / 2
        d_w = self.lattice_WSe2_A * math.sqrt(3) / 2
        rows_mo = np.arange(-int(math.ceil((xi + hx) / d_mo)) - 1, 0)
        rows_w = np.arange(0, int(math.ceil((hx - xi) / d_w)) + 1)
        p0, s0, c0 = _side(self.lattice_MoS2_A, self.chalcogen_height_S_A, "Mo", "S", rows_mo, xi, hy)
        p1, s1, c1 = _side(self.lattice_WSe2_A, self.chalcogen_height_Se_A, "W", "Se", rows_w, xi, hy)
        pos = np.concatenate([p0, p1])
        species = np.concatenate([s0, s1]).astype("<U2")
        is_chalc = np.concatenate([c0, c1])
        region = np.concatenate([np.zeros(len(p0), np.int8), np.ones(len(p1), np.int8)])
        inside = (np.abs(pos[:, 0]) <= hx) & (np.abs(pos[:, 1]) <= hy)
        inside &= np.where(region == REGION_MOS2, pos[:, 0] < xi, pos[:, 0] >= xi)
        pos, species, is_chalc, region = pos[inside], species[inside], is_chalc[inside], region[inside]
        # substitutions S <-> Se (chalcogen height of the new species, same site)
        near = np.abs(pos[:, 0] - xi) <= 5.0 * self.interface_width_nm
        p_swap = np.where(near, self.interface_substitution_fraction, self.random_substitution_fraction)
        swap = is_chalc & (rng.random(len(pos)) < p_swap)
        to_se = swap & (species == "S")
        to_s = swap & (species == "Se")
        species[to_se], species[to_s] = "Se", "S"
        zsign = np.sign(pos[:, 2])
        pos[to_se, 2] = zsign[to_se] * self.chalcogen_height_Se_A
        pos[to_s, 2] = zsign[to_s] * self.chalcogen_height_S_A
        keep = ~(is_chalc & (rng.random(len(pos)) < self.vacancy_fraction))
        pos, species, region = pos[keep], species[keep], region[keep]
        pos[:, 2] += self.ripple_z_A(pos[:, 0], pos[:, 1])
        if self.min_atom_distance_A > 0 and np.any(region == 0) and np.any(region == 1):
            tree = cKDTree(pos[region == REGION_MOS2])
            dist, _ = tree.query(pos[region == REGION_WSE2], k=1)
            w_idx = np.flatnonzero(region == REGION_WSE2)
            keep = np.ones(len(pos), bool)
            keep[w_idx[dist < self.min_atom_distance_A]] = False
            pos, species, region = pos[keep], species[keep], region[keep]
        if self.in_plane_rotation_deg:
            rot = math.radians(self.in_plane_rotation_deg)
            c, s = math.cos(rot), math.sin(rot)
            pos[:, :2] = pos[:, :2] @ np.array([[c, s], [-s, c]])
        return AtomSet.from_species(pos, species, region)
