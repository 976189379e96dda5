"""``stemlive tomo atoms``: calibrated tilt angles and the 3D atomic model of a tilt-series session.

Runs :func:`stemlive.live.analysis.atomic_tomography.reconstruct_atoms` on the session's per-tilt sums, writes the
model as extended XYZ (``ase.io.read`` reads it) and a VASP POSCAR, figures of the ripple, roughness, bond angles
and strain, and stores the calibrated angles in the session file (``/results/tomo`` and
``/results/tilt_series/tilt_{alpha,beta}_calibrated_deg``, which ``stemlive tomo export|reconstruct`` then use).
Conventions: ``docs/tomography.md`` (section *Atomic model*).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemlive.live.exitcodes import CLIError, ExitCode

__all__ = ["add_parser", "run_atoms", "save_figures", "store_calibration", "write_extxyz", "write_poscar"]

TOMO_GROUP = "/results/tomo"


def write_extxyz(path: str | Path, positions_A: np.ndarray, species: np.ndarray, sigma_A: np.ndarray, *,
                 comment: str = "") -> Path:
    """Extended XYZ: species, positions (Angstrom, sample frame) and per-atom standard errors ``sigma`` (3).

    No cell, ``pbc="F F F"``; ``ase.io.read`` returns the atoms with ``atoms.arrays["sigma"]``.
    """
    pos = np.asarray(positions_A, float)
    sig = np.asarray(sigma_A, float)
    sp = np.asarray(species)
    note = comment.replace('"', "'")
    lines = [str(len(pos)),
             f'Properties=species:S:1:pos:R:3:sigma:R:3 pbc="F F F" comment="{note}"']
    lines += [f"{s} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {e[0]:.6f} {e[1]:.6f} {e[2]:.6f}"
              for s, p, e in zip(sp, pos, sig, strict=True)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_poscar(path: str | Path, positions_A: np.ndarray, species: np.ndarray, *, vacuum_A: float = 15.0,
                 comment: str = "stemlive 3D atomic model") -> Path:
    """VASP POSCAR (Cartesian) in an orthorhombic box around the atoms with ``vacuum_A`` on every side.

    Atoms are shifted by ``vacuum_A - min(positions)`` per axis (written in the comment line).
    """
    pos = np.asarray(positions_A, float)
    sp = np.asarray(species)
    lo = pos.min(axis=0)
    cell = pos.max(axis=0) - lo + 2 * vacuum_A
    shift = vacuum_A - lo
    names = list(dict.fromkeys(sp.tolist()))
    order = np.concatenate([np.flatnonzero(sp == n) for n in names])
    lines = [f"{comment}; shift {shift[0]:.6f} {shift[1]:.6f} {shift[2]:.6f}", "1.0",
             f"{cell[0]:.6f} 0.0 0.0", f"0.0 {cell[1]:.6f} 0.0", f"0.0 0.0 {cell[2]:.6f}",
             " ".join(names), " ".join(str(int((sp == n).sum())) for n in names), "Cartesian"]
    lines += [f"{p[0]:.6f} {p[1]:.6f} {p[2]:.6f}" for p in pos[order] + shift]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def store_calibration(session_path: str | Path, cal: Any) -> None:
    """Write the calibrated geometry into the session file (appended; earlier calibrations are replaced).

    ``/results/tomo``: ``alpha_deg``, ``beta_deg``, ``gamma_deg`` and their ``*_err_deg``, ``shift_px``
    ``(n, 2)`` (row, col of the sample origin), ``distortion`` ``(2, 2)`` (``E`` of the image distortion
    ``D = I + E`` common to all projections) and ``distortion_err``, attrs ``rms_px``, ``reference``, ``pixel_A``,
    ``method``.
    ``/results/tilt_series/tilt_{alpha,beta}_calibrated_deg``: the angles ``stemlive tomo export`` and
    ``reconstruct`` use instead of the nominal ones.
    """
    from stemlive.live.apps.tomo_input import ALPHA_CAL, BETA_CAL

    with h5py.File(session_path, "a") as f:
        if TOMO_GROUP in f:
            del f[TOMO_GROUP]
        g = f.require_group(TOMO_GROUP)
        for name in ("alpha_deg", "beta_deg", "gamma_deg", "alpha_err_deg", "beta_err_deg", "gamma_err_deg",
                     "shift_px", "distortion", "distortion_err"):
            g.create_dataset(name, data=np.asarray(getattr(cal, name), float))
        g.attrs["rms_px"] = float(cal.rms_px)
        g.attrs["reference"] = int(cal.reference)
        g.attrs["pixel_A"] = float(cal.pixel_A)
        g.attrs["method"] = ("least squares over 3D metal coordinates and per-projection alpha, beta, in-plane "
                             "rotation and shift (Sci. Adv. 7, eabi6699 eq. 1), with a linear image distortion "
                             "common to all projections (u = (I + E) P R r / pixel + t; the slow scan axis's "
                             "stretch and shear fitted, the fast axis undistorted); sample frame: metal plane "
                             "horizontal, reference projection gamma = 0")
        for path, values in ((ALPHA_CAL, cal.alpha_deg), (BETA_CAL, cal.beta_deg)):
            if path in f:
                del f[path]
            f.create_dataset(path, data=np.asarray(values, float))


def save_figures(model: Any, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """PNG figures of the model: metal height map, roughness against the distance from the interface, X-M-X bond
    angles and local lattice constant (strain). Returns ``{name: path}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from stemlive.live.analysis import monolayer_metrics as mm

    out = Path(out_dir)
    pos, sp = model.positions_A, model.species
    metal = np.isin(sp, ["Mo", "W"])
    paths: dict[str, Path] = {}
    z, x, y = mm.height_map(pos[metal])
    xi = mm.interface_x(pos, sp)
    fig = Figure(figsize=(11, 4), dpi=110)
    ax = fig.subplots(1, 3)
    im = ax[0].imshow(z, origin="lower", extent=(x[0] / 10, x[-1] / 10, y[0] / 10, y[-1] / 10), cmap="RdBu_r")
    fig.colorbar(im, ax=ax[0], label="metal z (A)")
    if np.isfinite(xi):
        ax[0].axvline(xi / 10, color="k", lw=0.8, ls="--")
    ax[0].set_xlabel("x (nm)")
    ax[0].set_ylabel("y (nm)")
    ax[0].set_title("ripple: metal heights")
    if np.isfinite(xi):
        d, r, _n = mm.roughness_profile(pos[metal], xi)
        ax[1].plot(d / 10, r * 100, "o-")
    ax[1].set_xlabel("distance from interface (nm)")
    ax[1].set_ylabel("roughness (pm)")
    ax[1].set_title("roughness per 1 nm strip")
    ang, owner = mm.bond_angles(pos, sp)
    for name in ("Mo", "W"):
        sel = sp[owner] == name if len(owner) else np.zeros(0, bool)
        if sel.any():
            ax[2].hist(ang[sel], bins=30, alpha=0.6, label=f"{name}: {np.mean(ang[sel]):.1f} deg")
    ax[2].set_xlabel("X-M-X angle (deg)")
    ax[2].legend()
    ax[2].set_title("bond angles")
    fig.tight_layout()
    paths["structure"] = out / f"{stem}_structure.png"
    fig.savefig(paths["structure"])
    a_loc = mm.local_lattice_constant(pos[metal])
    a0 = np.where(sp[metal] == "W", 3.34, 3.165)
    fig = Figure(figsize=(5, 4), dpi=110)
    ax1 = fig.subplots()
    sc = ax1.scatter(pos[metal, 0] / 10, pos[metal, 1] / 10, c=100 * (a_loc / a0 - 1), s=6, cmap="coolwarm",
                     vmin=-3, vmax=3)
    fig.colorbar(sc, ax=ax1, label="strain vs bulk a (%)")
    ax1.set_xlabel("x (nm)")
    ax1.set_ylabel("y (nm)")
    ax1.set_aspect("equal")
    fig.tight_layout()
    paths["strain"] = out / f"{stem}_strain.png"
    fig.savefig(paths["strain"])
    return paths


def run_atoms(session_path: str | Path, out_xyz: str | Path, *, store: bool = True, figures: bool = True,
              probe_fwhm_A: float = 1.3, workers: int | None = None) -> dict[str, Any]:
    """Calibrate the angles and build the 3D model of a tilt-series session; write the outputs.

    ``workers`` processes fit the tilts' columns (default: the CPUs this process may use).

    Returns a dict with ``calibration``, ``model``, ``paths`` and ``timings_s``.

    Raises
    ------
    CLIError
        BAD_INPUT for a session that is not a tilt series with sums; INCOMPLETE when the chain finds no lattice
        or too few matched columns.
    """
    from threadpoolctl import threadpool_limits

    from stemlive.live.analysis.atomic_tomography import reconstruct_atoms
    from stemlive.live.apps.tomo_input import TomoInputError, read_tilt_series

    session_path = Path(session_path)
    try:
        if not session_path.is_file():
            raise TomoInputError(f"{session_path}: no such file")
        series = read_tilt_series(session_path)
    except (TomoInputError, OSError) as e:
        raise CLIError(str(e), ExitCode.BAD_INPUT) from None
    if series.angle_source != "nominal":
        # start from the stage readings even when a calibration is stored
        with h5py.File(session_path, "r") as f:
            alpha = np.asarray(f["/results/tilt_series/tilt_alpha_deg"][()], float).reshape(-1)
            beta = np.asarray(f["/results/tilt_series/tilt_beta_deg"][()], float).reshape(-1)
    else:
        alpha, beta = series.alpha_deg, series.beta_deg
    try:
        # one BLAS thread: the solvers' small products lose badly to thread start-up on a shared machine
        with threadpool_limits(limits=1, user_api="blas"):
            res = reconstruct_atoms(series.sums, alpha, beta, 10.0 * series.pixel_size_nm, probe_fwhm_A=probe_fwhm_A,
                                    workers=workers if workers is not None else len(os.sched_getaffinity(0)))
    except (ValueError, np.linalg.LinAlgError) as e:
        raise CLIError(f"{session_path}: no atomic model: {e}", ExitCode.INCOMPLETE) from None
    out = Path(out_xyz)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, cal = res.model, res.calibration
    assert model is not None
    comment = (f"stemlive tomo atoms {series.session_id}; sample frame (docs/tomography.md), Angstrom; "
               f"sigma = standard errors; R1 = {model.r1:.3f}")
    paths = {"xyz": write_extxyz(out, model.positions_A, model.species, model.position_err_A, comment=comment),
             "poscar": write_poscar(out.with_suffix(".POSCAR"), model.positions_A, model.species)}
    summary = {"session_id": series.session_id, "n_atoms": len(model), "counts": {
        str(k): int(v) for k, v in zip(*np.unique(model.species, return_counts=True), strict=True)},
        "vacancies": int(len(model.vacancy_sites_A)), "r1": model.r1, "rms_px": cal.rms_px,
        "alpha_deg": cal.alpha_deg.tolist(), "beta_deg": cal.beta_deg.tolist(), "gamma_deg": cal.gamma_deg.tolist(),
        "alpha_err_deg": cal.alpha_err_deg.tolist(), "beta_err_deg": cal.beta_err_deg.tolist(),
        "distortion": cal.distortion.tolist(), "distortion_err": cal.distortion_err.tolist(),
        "nominal_alpha_deg": np.asarray(alpha).tolist(), "nominal_beta_deg": np.asarray(beta).tolist(),
        "vacancy_sites_A": model.vacancy_sites_A.tolist(), "timings_s": res.timings_s,
        "element_sigma_px": model.sigma_px, "element_sigma_err_px": model.sigma_err,
        "element_height": model.element_height, "element_height_err": model.element_height_err,
        "atoms_timings_cpu_s": model.timings_s}
    paths["json"] = out.with_suffix(".json")
    paths["json"].write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if figures:
        paths.update(save_figures(model, out.parent, out.stem))
    if store:
        store_calibration(session_path, cal)
    return {"calibration": cal, "model": model, "paths": paths, "timings_s": res.timings_s, "summary": summary,
            "nominal": (np.asarray(alpha), np.asarray(beta))}


def add_parser(subparsers: Any) -> None:
    """Register ``stemlive tomo atoms`` on the ``tomo`` sub-parsers."""
    a = subparsers.add_parser("atoms", help="calibrate the tilt angles and build the 3D atomic model (XYZ, POSCAR)")
    a.add_argument("session", type=Path, help="tilt-series session file (.h5) with /results/tilt_series/sums")
    a.add_argument("-o", "--out", type=Path, required=True, metavar="MODEL.xyz", help="extended XYZ to write")
    a.add_argument("--no-store", action="store_true", help="do not write the calibrated angles into the session")
    a.add_argument("--no-figures", action="store_true", help="do not save the structure figures")
    a.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the per-tilt column fits (default: the CPUs available)")
    a.set_defaults(func=_cmd_atoms)


def _cmd_atoms(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be at least 1, not {args.workers}", ExitCode.USAGE)
    result = run_atoms(args.session, args.out, store=not args.no_store, figures=not args.no_figures,
                       workers=args.workers)
    cal = result["calibration"]
    alpha0, beta0 = result["nominal"]
    print(" tilt  nominal alpha, beta (deg)   calibrated alpha, beta +- s.e. (deg)   gamma (deg)")
    for k in range(len(cal.alpha_deg)):
        print(f" {k:4d}  {alpha0[k]:7.2f} {beta0[k]:7.2f}        "
              f"{cal.alpha_deg[k]:7.3f} +- {cal.alpha_err_deg[k]:.3f}  {cal.beta_deg[k]:7.3f} +- "
              f"{cal.beta_err_deg[k]:.3f}   {cal.gamma_deg[k]:6.3f}")
    e, e_err = cal.distortion, cal.distortion_err
    print(f" image distortion (common to all tilts): slow-axis stretch {e[0, 0]:.2e} +- {e_err[0, 0]:.1e}, "
          f"shear {e[1, 0]:.2e} +- {e_err[1, 0]:.1e}")
    for what, path in result["paths"].items():
        print(f"{what}: {path}")
    s = result["summary"]
    print(f"model: {result['paths']['xyz']} ({s['n_atoms']} atoms, {s['vacancies']} vacancies, R1 {s['r1']:.3f})")
    return int(ExitCode.OK)
