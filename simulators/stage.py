"""Double-tilt stage geometry, stage hysteresis/settling/non-eucentric height, and sample drift.

Axis convention (same as ``reference/tilt_series_mos2_wse2.json``)
-----------------------------------------------------------------
Lab frame: x, y in the image plane (image column = +x, image row = +y), z along the optical axis (the sample
normal at zero tilt). Angles are right-handed rotations about the stated axis vectors:

* alpha (the goniometer rod, outer axis): rotation by alpha about [0 -1 0],
* beta (the cradle, carried by the rod, inner axis): rotation by beta about [-1 0 0].

A sample-frame vector r maps to the lab frame as ``r_lab = R(alpha, beta) @ r`` with
``R = R_[0,-1,0](alpha) @ R_[-1,0,0](beta)``. In the reference's calibrated Euler ZYX angles
(R = Rz(Z) Ry(Y) Rx(X)) this is Z = 0, Y = -alpha, X = -beta (:func:`to_euler_zyx_deg`).

What the reference table says about hysteresis: only row 1 (nominal 0, 0) can be compared directly: calibrated
(Z, Y, X) = (0.3, 1.1, -2.0) deg, i.e. alpha off by -1.1 deg and beta by +2.0 deg (2.3 deg in total). The other rows'
calibrated angles live in the reconstruction's own frame: no global rotation offset in any of the 16 orderings and
sign conventions tried maps the nominal rotations onto them better than 26 deg rms, so they cannot be used row by
row. The default :class:`StageParams` therefore use a backlash of (1.1, 2.0) deg plus a 0.3 deg random part.

Non-eucentric height: the sample sits ``eucentric_offset_nm`` above the eucentric point, so tilting moves the
imaged area laterally by ``h * R[:2, 2]`` (dx = -h sin(alpha) cos(beta), dy = h sin(beta)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stemlive.simulators.scenario import DriftParams, StageParams

__all__ = [
    "ALPHA_AXIS",
    "BETA_AXIS",
    "DriftModel",
    "StageModel",
    "TiltState",
    "axis_rotation",
    "fov_shift_nm",
    "rotation_matrix",
    "to_euler_zyx_deg",
]

ALPHA_AXIS = np.array([0.0, -1.0, 0.0])
BETA_AXIS = np.array([-1.0, 0.0, 0.0])


def axis_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Right-handed rotation matrix (3, 3) by ``angle_deg`` about the unit vector ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    t = math.radians(angle_deg)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(t) * kx + (1.0 - math.cos(t)) * (kx @ kx)


def rotation_matrix(alpha_deg: float, beta_deg: float) -> np.ndarray:
    """Sample -> lab rotation of the double-tilt holder: ``R_[0,-1,0](alpha) @ R_[-1,0,0](beta)``."""
    return axis_rotation(ALPHA_AXIS, alpha_deg) @ axis_rotation(BETA_AXIS, beta_deg)


def to_euler_zyx_deg(rotation: np.ndarray) -> tuple[float, float, float]:
    """Euler (Z, Y, X) in degrees with ``rotation = Rz(Z) @ Ry(Y) @ Rx(X)`` (the reference's calibrated angles)."""
    r = np.asarray(rotation)
    y = math.degrees(math.asin(-max(-1.0, min(1.0, r[2, 0]))))
    z = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    x = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    return z, y, x


def fov_shift_nm(alpha_deg: float, beta_deg: float, eucentric_offset_nm: float) -> tuple[float, float]:
    """Lateral (dy, dx) shift in nm, lab frame, of the imaged sample area caused by tilting at height offset."""
    col = rotation_matrix(alpha_deg, beta_deg)[:, 2] * eucentric_offset_nm
    return float(col[1]), float(col[0])


@dataclass(frozen=True)
class TiltState:
    """Ground truth of one stage move.

    ``actual_*`` are the angles the stage reaches once settled; ``start_*`` where it was when the move began.
    """

    index: int
    nominal_alpha_deg: float
    nominal_beta_deg: float
    actual_alpha_deg: float
    actual_beta_deg: float
    start_alpha_deg: float
    start_beta_deg: float
    direction: tuple[int, int]
    t_move_s: float
    settled_at_s: float
    fov_shift_nm: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["direction"], d["fov_shift_nm"] = list(self.direction), list(self.fov_shift_nm)
        return d


@dataclass
class StageModel:
    """Double-tilt stage with backlash, a reproducible random error, settling and non-eucentric height.

    ``actual = nominal + direction_of_last_move * hysteresis_deg + N(0, random_deg)`` per axis, the random part
    drawn from a generator seeded with ``seed`` in move order (same moves -> same angles). A zero move keeps the
    previous direction; the initial direction is +1 on both axes. After a move the angle relaxes exponentially
    from the previous actual angle, tau = settle_time_s / 5.
    """

    params: StageParams = field(default_factory=StageParams)
    seed: int = 0
    history: list[TiltState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._direction = (1, 1)

    @property
    def state(self) -> TiltState | None:
        """The latest move, or None before the first."""
        return self.history[-1] if self.history else None

    def move_to(self, alpha_deg: float, beta_deg: float, t_s: float = 0.0) -> TiltState:
        """Command nominal angles at time ``t_s``; returns (and records) the ground truth of the move.

        Raises
        ------
        ValueError
            Angles beyond ``params.limits_deg``.
        """
        lim_a, lim_b = self.params.limits_deg
        if abs(alpha_deg) > lim_a or abs(beta_deg) > lim_b:
            raise ValueError(f"tilt ({alpha_deg}, {beta_deg}) deg outside stage limits +-{lim_a}, +-{lim_b} deg")
        prev = self.state
        nom0 = (0.0, 0.0) if prev is None else (prev.nominal_alpha_deg, prev.nominal_beta_deg)
        start = (0.0, 0.0) if prev is None else self.actual_angles_deg(t_s)
        direction = tuple(int(np.sign(new - old)) or d for new, old, d in
                          zip((alpha_deg, beta_deg), nom0, self._direction, strict=True))
        self._direction = direction  # type: ignore[assignment]
        rand = self._rng.normal(0.0, self.params.random_deg, 2) if self.params.random_deg > 0 else np.zeros(2)
        act_a = alpha_deg + direction[0] * self.params.hysteresis_deg[0] + float(rand[0])
        act_b = beta_deg + direction[1] * self.params.hysteresis_deg[1] + float(rand[1])
        st = TiltState(index=len(self.history), nominal_alpha_deg=float(alpha_deg), nominal_beta_deg=float(beta_deg),
                       actual_alpha_deg=act_a, actual_beta_deg=act_b, start_alpha_deg=start[0],
                       start_beta_deg=start[1], direction=(direction[0], direction[1]), t_move_s=float(t_s),
                       settled_at_s=float(t_s) + self.params.settle_time_s,
                       fov_shift_nm=fov_shift_nm(act_a, act_b, self.params.eucentric_offset_nm))
        self.history.append(st)
        return st

    def actual_angles_deg(self, t_s: float | None = None) -> tuple[float, float]:
        """Actual (alpha, beta) at time ``t_s`` (None: settled), including the settling transient."""
        st = self.state
        if st is None:
            return 0.0, 0.0
        if t_s is None or self.params.settle_time_s == 0 or t_s >= st.settled_at_s + 10 * self.params.settle_time_s:
            return st.actual_alpha_deg, st.actual_beta_deg
        f = math.exp(-max(0.0, t_s - st.t_move_s) / (self.params.settle_time_s / 5.0))
        return (st.actual_alpha_deg + (st.start_alpha_deg - st.actual_alpha_deg) * f,
                st.actual_beta_deg + (st.start_beta_deg - st.actual_beta_deg) * f)

    def is_settled(self, t_s: float) -> bool:
        """True once ``settle_time_s`` has passed since the last move."""
        st = self.state
        return st is None or t_s >= st.settled_at_s

    def fov_shift_nm(self, t_s: float | None = None) -> tuple[float, float]:
        """Lateral (dy, dx) field shift in nm at the actual angles at ``t_s``."""
        a, b = self.actual_angles_deg(t_s)
        return fov_shift_nm(a, b, self.params.eucentric_offset_nm)


class DriftModel:
    """Sample drift trajectory: ``position_nm(t) = velocity * t + W(t)``, lab frame, (dy, dx) in nm.

    ``W`` is a smooth (C1, Catmull-Rom) random walk through knots every ``knot_interval_s``: independent Gaussian
    steps of standard deviation ``random_walk_nm_per_sqrt_s * sqrt(knot_interval_s)`` per axis, W(0) = 0.
    Knots are drawn in fixed blocks from generators seeded with (seed, block), so the trajectory is the same
    whatever the order or range of the queries. Defined for t >= 0 s.
    """

    _BLOCK = 1024

    def __init__(self, velocity_nm_per_s: tuple[float, float] = (0.0, 0.0), random_walk_nm_per_sqrt_s: float = 0.0,
                 seed: int = 0, knot_interval_s: float = 0.5) -> None:
        self.velocity_nm_per_s = np.asarray(velocity_nm_per_s, dtype=np.float64).reshape(2)
        self.random_walk_nm_per_sqrt_s = float(random_walk_nm_per_sqrt_s)
        self.seed = int(seed)
        self.knot_interval_s = float(knot_interval_s)
        step = self.random_walk_nm_per_sqrt_s * math.sqrt(self.knot_interval_s)
        before = np.random.default_rng([self.seed, 2**32 - 1]).normal(0.0, step, 2)
        self._knots = np.stack([-before, np.zeros(2)])  # knots k = -1, 0

    @classmethod
    def from_params(cls, params: DriftParams, seed: int) -> DriftModel:
        """Build from a scenario's drift section (``params.seed`` wins over ``seed`` when set)."""
        return cls(params.velocity_nm_per_s, params.random_walk_nm_per_sqrt_s,
                   params.seed if params.seed is not None else seed, params.knot_interval_s)

    def _ensure(self, k_max: int) -> None:
        step = self.random_walk_nm_per_sqrt_s * math.sqrt(self.knot_interval_s)
        while len(self._knots) - 2 < k_max:
            block = (len(self._knots) - 2) // self._BLOCK
            inc = np.random.default_rng([self.seed, block]).normal(0.0, step, (self._BLOCK, 2))
            self._knots = np.concatenate([self._knots, self._knots[-1] + np.cumsum(inc, axis=0)])

    def random_walk_nm(self, t_s: np.ndarray | float) -> np.ndarray:
        """The random-walk part W(t), shape t.shape + (2,)."""
        t = np.asarray(t_s, dtype=np.float64)
        if np.any(t < 0):
            raise ValueError("drift is defined for t >= 0 s")
        if self.random_walk_nm_per_sqrt_s == 0:
            return np.zeros(t.shape + (2,))
        u = t / self.knot_interval_s
        k = np.floor(u).astype(np.int64)
        self._ensure(int(k.max(initial=0)) + 3)
        s = (u - k)[..., None]
        p0, p1, p2, p3 = (self._knots[k + i] for i in range(4))  # knot index k-1 .. k+2 (array offset 1)
        return 0.5 * (2 * p1 + (p2 - p0) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2
                      + (3 * p1 - p0 - 3 * p2 + p3) * s**3)

    def position_nm(self, t_s: np.ndarray | float) -> np.ndarray:
        """Drift (dy, dx) in nm at times ``t_s`` (any shape), shape t.shape + (2,); zero at t = 0."""
        t = np.asarray(t_s, dtype=np.float64)
        return t[..., None] * self.velocity_nm_per_s + self.random_walk_nm(t)
