"""Tomography input: a tilt-series session's per-tilt sums and the angles to use (nominal, calibrated or a file).

Angle priority and file layouts: ``docs/tomography.md`` (*Input*).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.analysis import reconstruct as rc

__all__ = ["ALPHA", "ALPHA_CAL", "BETA", "BETA_CAL", "CALIBRATION", "SUMS", "TiltSeries", "TomoInputError",
           "load_angles", "read_calibrated_geometry", "read_tilt_series"]

SUMS = "/results/tilt_series/sums"
ALPHA = "/results/tilt_series/tilt_alpha_deg"
BETA = "/results/tilt_series/tilt_beta_deg"
ALPHA_CAL = "/results/tilt_series/tilt_alpha_calibrated_deg"
BETA_CAL = "/results/tilt_series/tilt_beta_calibrated_deg"
CALIBRATION = "/results/tomo"  # the full calibrated geometry stemlive tomo atoms stores (live/apps/atoms.py)


class TomoInputError(ValueError):
    """The input cannot be exported or reconstructed (not a tilt series, no per-tilt sums, bad angles)."""


@dataclass(frozen=True)
class TiltSeries:
    """Per-tilt summed images and their angles.

    Attributes
    ----------
    sums : ndarray
        ``(n, ny, nx)`` float32.
    alpha_deg, beta_deg : ndarray
        ``(n,)`` stage angles used for the geometry (nominal, calibrated or from ``--angles``).
    pixel_size_nm : float
    session_id : str
    angle_source : str
        ``"nominal"``, ``"calibrated"`` or the path of the angles file.
    """

    sums: np.ndarray
    alpha_deg: np.ndarray
    beta_deg: np.ndarray
    pixel_size_nm: float
    session_id: str
    angle_source: str

    @property
    def rotations(self) -> np.ndarray:
        """``(n, 3, 3)`` sample-to-lab matrices."""
        return rc.stage_rotation(self.alpha_deg, self.beta_deg)

    @property
    def genfire_euler_deg(self) -> np.ndarray:
        """``(n, 3)`` GENFIRE ``(phi, theta, psi)`` for a ``(ny, nx, n)`` projection stack."""
        return np.atleast_2d(rc.stage_to_genfire_euler(self.alpha_deg, self.beta_deg))


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _truth_tilt_angles(records: list[Mapping[str, Any]], nominal: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Actual angles per tilt from the simulator's stage-move records.

    The instrument records every axis move, so one tilt leaves several records (alpha, then beta, possibly a
    re-confirm). Consecutive records with the same nominal pair form one tilt; its last record is the state
    the frames saw. With ``nominal`` (the session's tilts, in acquisition order) the groups are matched to them
    in order, skipping moves that belong to no tilt (e.g. the return to the starting tilt after an abort).
    """
    ordered = sorted(records, key=lambda r: r.get("index", 0))
    groups: list[Mapping[str, Any]] = []
    for rec in ordered:
        pair = (round(float(rec["nominal_alpha_deg"]), 6), round(float(rec["nominal_beta_deg"]), 6))
        if groups and (round(float(groups[-1]["nominal_alpha_deg"]), 6),
                       round(float(groups[-1]["nominal_beta_deg"]), 6)) == pair:
            groups[-1] = rec
        else:
            groups.append(rec)
    if nominal is not None:
        chosen: list[Mapping[str, Any]] = []
        g = 0
        for alpha, beta in nominal:
            while g < len(groups) and not (abs(float(groups[g]["nominal_alpha_deg"]) - alpha) < 1e-6
                                           and abs(float(groups[g]["nominal_beta_deg"]) - beta) < 1e-6):
                g += 1
            if g == len(groups):
                raise TomoInputError(f"no stage move to nominal ({alpha:g}, {beta:g}) deg in the ground truth")
            chosen.append(groups[g])
            g += 1
        groups = chosen
    alpha = np.array([r["actual_alpha_deg"] for r in groups], float)
    beta = np.array([r["actual_beta_deg"] for r in groups], float)
    return alpha, beta


def load_angles(path: str | Path, n: int, nominal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read actual ``(alpha, beta)`` per tilt from a file.

    Accepted: a simulator ground truth ``<session>.truth.json`` (stage-move records ``records.tilt[*]``, grouped
    per tilt and matched to ``nominal`` ``(n, 2)`` when given); a JSON object with ``alpha_deg`` and ``beta_deg``
    lists; or a text file with two columns ``alpha beta`` (degrees, ``#`` comments).

    Raises
    ------
    TomoInputError
        Unknown layout or a number of tilts different from ``n``.
    """
    p = Path(path)
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and "records" in data and data["records"].get("tilt"):
            alpha, beta = _truth_tilt_angles(data["records"]["tilt"], nominal)
        elif isinstance(data, Mapping) and "alpha_deg" in data and "beta_deg" in data:
            alpha, beta = np.asarray(data["alpha_deg"], float), np.asarray(data["beta_deg"], float)
        else:
            raise TomoInputError(f"{p}: no tilt angles (expected records.tilt[] or alpha_deg/beta_deg)")
    else:
        arr = np.atleast_2d(np.loadtxt(p, dtype=float, comments="#"))
        if arr.shape[1] != 2:
            raise TomoInputError(f"{p}: expected two columns 'alpha beta', got {arr.shape[1]}")
        alpha, beta = arr[:, 0], arr[:, 1]
    if alpha.shape != (n,) or beta.shape != (n,):
        raise TomoInputError(f"{p}: {alpha.size} tilt angles for {n} tilts")
    return alpha, beta


def read_tilt_series(session_path: str | Path, *, angles: str | Path | None = None) -> TiltSeries:
    """Read per-tilt sums and angles from a session file (v1, plain h5py).

    Angle priority: ``angles`` file > ``/results/tilt_series/tilt_*_calibrated_deg`` > nominal.

    Raises
    ------
    TomoInputError
        Not a tilt-series session, or no ``/results/tilt_series/sums``.
    """
    path = Path(session_path)
    with h5py.File(path, "r") as f:
        kind = _attr_str(f.attrs.get("kind", ""))
        if kind != "tilt_series":
            raise TomoInputError(f"{path}: session kind is {kind!r}, not 'tilt_series'")
        if SUMS not in f:
            raise TomoInputError(
                f"{path}: no {SUMS} (status {_attr_str(f.attrs.get('status', '?'))!s}); "
                "run the tilt-series analysis first (stemlive replay --analyze)"
            )
        sums = np.asarray(f[SUMS][()], dtype=np.float32)
        if sums.ndim != 3 or sums.shape[0] == 0:
            raise TomoInputError(f"{path}: {SUMS} must be (n_tilts, ny, nx), got {sums.shape}")
        n = sums.shape[0]
        if ALPHA_CAL in f and BETA_CAL in f:
            alpha, beta, source = f[ALPHA_CAL][()], f[BETA_CAL][()], "calibrated"
        elif ALPHA in f and BETA in f:
            alpha, beta, source = f[ALPHA][()], f[BETA][()], "nominal"
        else:
            raise TomoInputError(f"{path}: no {ALPHA} / {BETA}")
        frames = f.get("tilt_series/frames")
        pixel = frames.attrs.get("pixel_size_nm") if frames is not None else None
        pixel = float(pixel) if pixel is not None else float(f[SUMS].attrs.get("pixel_size_nm", 1.0))
        session_id = _attr_str(f.attrs.get("session_id", path.stem))
    if angles is not None:
        nominal = np.column_stack([np.ravel(alpha), np.ravel(beta)]) if source == "nominal" else None
        alpha, beta = load_angles(angles, n, nominal)
        source = str(angles)
    alpha, beta = np.asarray(alpha, float).reshape(-1), np.asarray(beta, float).reshape(-1)
    if alpha.shape != (n,) or beta.shape != (n,):
        raise TomoInputError(f"{path}: {alpha.size} angles for {n} tilts")
    return TiltSeries(sums, alpha, beta, pixel, session_id, source)


def read_calibrated_geometry(session_path: str | Path, n: int
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The calibrated geometry ``stemlive tomo atoms`` stored, or None when the session has none.

    Returns
    -------
    rotations : ndarray (n, 3, 3)
        ``Rz(gamma) R_[0,-1,0](alpha) R_[-1,0,0](beta)``: the stage angles and the in-plane rotation of each
        projection in the sample frame of ``docs/tomography.md``.
    shift_px : ndarray (n, 2)
        Image position (row, col) of the sample origin in each projection.
    distortion : ndarray (2, 2) or None
        ``D = I + E``, the image distortion common to all projections (``u = D P(R r) / pixel + t``); None in
        files written before it was calibrated.
    """
    from stemlive.live.analysis.tilt_calibration import rotation_from_angles

    with h5py.File(session_path, "r") as f:
        if CALIBRATION not in f:
            return None
        g = f[CALIBRATION]
        if not all(k in g for k in ("alpha_deg", "beta_deg", "gamma_deg", "shift_px")):
            return None
        alpha, beta, gamma = (np.asarray(g[k][()], float).reshape(-1) for k in ("alpha_deg", "beta_deg", "gamma_deg"))
        shift = np.asarray(g["shift_px"][()], float)
        distortion = np.eye(2) + np.asarray(g["distortion"][()], float) if "distortion" in g else None
    if alpha.shape != (n,) or shift.shape != (n, 2):
        return None  # a calibration of another set of tilts
    if distortion is not None and distortion.shape != (2, 2):
        distortion = None
    return rotation_from_angles(alpha, beta, gamma), shift, distortion
