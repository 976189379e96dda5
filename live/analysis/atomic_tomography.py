"""The chain from per-tilt sums to calibrated tilt angles and a 3D atomic model (pure numpy/scipy).

:func:`reconstruct_atoms` runs, on the per-tilt sums of a TMD monolayer tilt series:

1. column finding in every projection (:func:`.columns.find_columns`; chalcogen pairs split along the nominal
   projected normal);
2. a first angle calibration from the matched metal columns (:func:`.tilt_calibration.calibrate_tilts`);
3. every projection's atoms refitted as Gaussians started at their positions predicted by the first calibration
   (metals from the 3D metal model, chalcogens lifted from the reference projection at +- h), which removes the
   pull of unresolved neighbours on the metal fits; the calibration is solved again with these
   correspondences (:func:`.tilt_calibration.recalibrate`);
4. the 3D model of all atoms refined against all projections at the calibrated geometry
   (:func:`.atoms3d.build_model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import atoms3d, columns, tilt_calibration
from .reconstruct import stage_rotation

__all__ = ["AtomicTomography", "fit_tilt_columns", "geometry_of", "reconstruct_atoms", "refit_metals",
           "running_update"]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True, eq=False)
class AtomicTomography:
    """Result of :func:`reconstruct_atoms`.

    Attributes
    ----------
    calibration : tilt_calibration.Calibration
        Final (second) calibration.
    first_calibration : tilt_calibration.Calibration
        From the peak-found metal columns.
    columns : list of columns.Columns
        Per-projection column fits (step 1).
    model : atoms3d.AtomModel or None
        3D atoms (None when ``atoms=False``).
    timings_s : dict
        Seconds per step.
    """

    calibration: tilt_calibration.Calibration
    first_calibration: tilt_calibration.Calibration
    columns: list[columns.Columns]
    model: atoms3d.AtomModel | None
    timings_s: dict[str, float] = field(default_factory=dict)


def geometry_of(cal: tilt_calibration.Calibration, shape: tuple[int, int]) -> atoms3d.Geometry:
    """The :class:`.atoms3d.Geometry` of a calibration, with its image distortion (the same in every projection)."""
    dist = np.broadcast_to(cal.distortion_matrix, (len(cal.alpha_deg), 2, 2)).copy()
    return atoms3d.Geometry(cal.rotations, cal.shift_px, cal.pixel_A, (int(shape[0]), int(shape[1])), dist)


def _per_tilt(fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], workers: int) -> list[Any]:
    """``[fn(*t) for t in tasks]``, in ``workers`` processes when more than one.

    The per-tilt Gaussian fits are independent and hold the GIL for much of their time (``np.bincount``, fancy
    indexing), so threads do not scale; worker processes are started with ``spawn`` (safe from a process with
    threads, e.g. Swift or the live service) and run with one BLAS thread each.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_blas_thread) as pool:
        return list(pool.map(fn, *zip(*tasks, strict=True)))


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _find_columns_task(image: np.ndarray, pixel_A: float, probe_fwhm_A: float,
                       offset_px: np.ndarray) -> columns.Columns:
    return columns.find_columns(image, pixel_size_A=pixel_A, probe_fwhm_A=probe_fwhm_A,
                                chalcogen_offset_px=offset_px)


def fit_tilt_columns(sums: np.ndarray, nominal_alpha_deg: np.ndarray, nominal_beta_deg: np.ndarray, pixel_A: float,
                     *, probe_fwhm_A: float = 1.3, chalcogen_height_A: float = 1.6,
                     workers: int = 1) -> list[columns.Columns]:
    """Step 1 of :func:`reconstruct_atoms`: :func:`.columns.find_columns` on every per-tilt sum (chalcogen pairs
    split along the nominal projected normal), in ``workers`` processes."""
    data = np.asarray(sums, float)
    rot = stage_rotation(np.asarray(nominal_alpha_deg, float), np.asarray(nominal_beta_deg, float)).reshape(-1, 3, 3)
    tasks = [(data[k], pixel_A, probe_fwhm_A,
              chalcogen_height_A * np.array([rot[k, 1, 2], rot[k, 0, 2]]) / pixel_A) for k in range(len(data))]
    return _per_tilt(_find_columns_task, tasks, workers)


def _refit_task(image: np.ndarray, start_px: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    q, e, _bg = columns.fit_columns(image, start_px, sigma_px=sigma_px)
    return q, e


def refit_metals(sums: np.ndarray, cal: tilt_calibration.Calibration, chalcogen_px: np.ndarray,
                 sigma_px: float, chalcogen_height_A: float = 1.6, *,
                 workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fit all atoms of every projection started at their predicted positions; return the metals' fits.

    Returns ``(metal_px, metal_err_px)``, each ``(N_metals, n_proj, 2)``, NaN where a metal is outside an image.
    The projections are fitted independently, in ``workers`` processes.
    """
    data = np.asarray(sums, float)
    n_proj, ny, nx = data.shape
    geo = geometry_of(cal, (ny, nx))
    pos, sub, _ = atoms3d.start_model(cal.metals_A, chalcogen_px, geo, cal.reference, chalcogen_height_A)
    n_m = int((sub == atoms3d.METAL).sum())
    uv = geo.project(pos)
    out = np.full((n_m, n_proj, 2), np.nan)
    err = np.full((n_m, n_proj, 2), np.nan)
    margin = 2.0
    inside = ((uv[..., 0] > -margin) & (uv[..., 0] < ny - 1 + margin) & (uv[..., 1] > -margin)
              & (uv[..., 1] < nx - 1 + margin))
    fits = _per_tilt(_refit_task, [(data[k], uv[k, inside[k]], sigma_px) for k in range(n_proj)], workers)
    for k, (q, e) in enumerate(fits):
        sel = np.flatnonzero(inside[k])
        is_m = sel < n_m
        good = ((q[is_m, 0] > 0) & (q[is_m, 1] > 0) & (q[is_m, 1] < ny - 1) & (q[is_m, 2] > 0)
                & (q[is_m, 2] < nx - 1))
        mi = sel[is_m][good]
        out[mi, k] = q[is_m][good][:, 1:3]
        err[mi, k] = e[is_m][good][:, 1:3]
    return out, err


def reconstruct_atoms(sums: np.ndarray, nominal_alpha_deg: np.ndarray, nominal_beta_deg: np.ndarray,
                      pixel_A: float, *, probe_fwhm_A: float = 1.3, chalcogen_height_A: float = 1.6,
                      atoms: bool = True, fit_distortion: bool = True, workers: int = 1) -> AtomicTomography:
    """Calibrated tilt angles and the 3D atomic model from per-tilt sums.

    Parameters
    ----------
    sums : ndarray (n, ny, nx)
        Per-tilt sums (counts).
    nominal_alpha_deg, nominal_beta_deg : ndarray (n,)
        Stage readings (start values).
    pixel_A : float
        Pixel size (the fixed scale).
    probe_fwhm_A : float
        Start width of the Gaussians.
    chalcogen_height_A : float
        Start height of the chalcogens above/below the metals.
    atoms : bool
        Also build the 3D model of all atoms (step 4).
    fit_distortion : bool
        Fit the image distortion common to all projections in the recalibration (step 3; never from the first
        pass's column fits, which unresolved neighbours bias: fitted there too, the 512^2 angles came out 0.105 deg
        off): ``tilt_calibration.recalibrate(distortion=True)``, on fields of >= 1,000 metals (docs/tomography.md,
        *Image distortion*: 512^2 angles within 0.017 deg, in-plane RMSD 4.25 pm, against 0.076 deg and 6.1 pm).
    workers : int
        Processes for the per-tilt Gaussian fits (steps 1 and 3); 2 halves their wall time on 2 free cores.
    """
    data = np.asarray(sums, float)
    al = np.asarray(nominal_alpha_deg, float)
    be = np.asarray(nominal_beta_deg, float)
    shape = data.shape[1:]
    sigma = probe_fwhm_A / FWHM_PER_SIGMA / pixel_A
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    cols = fit_tilt_columns(data, al, be, pixel_A, probe_fwhm_A=probe_fwhm_A, chalcogen_height_A=chalcogen_height_A,
                            workers=workers)
    times["columns"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    obs = tilt_calibration.MetalObservations([c.position[c.is_metal] for c in cols],
                                             [c.position_err[c.is_metal] for c in cols],
                                             [c.intensity[c.is_metal] for c in cols])
    cal1 = tilt_calibration.calibrate_tilts(obs, al, be, pixel_A, (int(shape[0]), int(shape[1])))
    times["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_cols = cols[cal1.reference]
    chalcogen_px = ref_cols.position[~ref_cols.is_metal]
    metal_px, metal_err = refit_metals(data, cal1, chalcogen_px, sigma, chalcogen_height_A, workers=workers)
    cal2 = tilt_calibration.recalibrate(cal1, metal_px, metal_err, distortion=fit_distortion)
    times["recalibration"] = time.perf_counter() - t0
    model = None
    if atoms:
        t0 = time.perf_counter()
        model = atoms3d.build_model(data, geometry_of(cal2, shape), cal2.metals_A, chalcogen_px, cal2.reference,
                                    sigma, chalcogen_height_A=chalcogen_height_A)
        times["atoms"] = time.perf_counter() - t0
    return AtomicTomography(cal2, cal1, cols, model, times)


def running_update(columns_so_far: list[columns.Columns], images: list[np.ndarray], alpha_deg: list[float],
                   beta_deg: list[float], pixel_A: float, *, probe_fwhm_A: float = 1.3,
                   chalcogen_height_A: float = 1.6) -> tuple[columns.Columns, tilt_calibration.Calibration | None]:
    """Live step: fit the columns of a new tilt's sum and calibrate over all tilts so far (3 or more).

    ``images`` are the sums of all tilts so far (the new one last), ``columns_so_far`` the column fits of the
    earlier ones (extended in place); ``alpha_deg``/``beta_deg`` hold the nominal angles of all tilts. The
    calibration is the two-pass one of :func:`reconstruct_atoms` (steps 2 and 3). Returns the new columns and the
    calibration (None with fewer than 3 tilts).
    """
    image = images[-1]
    if pixel_A <= 0:
        raise ValueError("no pixel size in the frame header")
    k = len(columns_so_far)
    rot = stage_rotation(alpha_deg[k], beta_deg[k])
    off = chalcogen_height_A * np.array([rot[1, 2], rot[0, 2]]) / pixel_A
    cols = columns.find_columns(np.asarray(image, float), pixel_size_A=pixel_A, probe_fwhm_A=probe_fwhm_A,
                                chalcogen_offset_px=off)
    columns_so_far.append(cols)
    if len(columns_so_far) < 3:
        return cols, None
    obs = tilt_calibration.MetalObservations([c.position[c.is_metal] for c in columns_so_far],
                                             [c.position_err[c.is_metal] for c in columns_so_far],
                                             [c.intensity[c.is_metal] for c in columns_so_far])
    n = len(columns_so_far)
    cal = tilt_calibration.calibrate_tilts(obs, np.asarray(alpha_deg[:n]), np.asarray(beta_deg[:n]), pixel_A,
                                           np.asarray(image).shape)
    ref = columns_so_far[cal.reference]
    sigma = probe_fwhm_A / FWHM_PER_SIGMA / pixel_A
    metal_px, metal_err = refit_metals(np.stack(images[:n]), cal, ref.position[~ref.is_metal], sigma,
                                       chalcogen_height_A)
    return cols, tilt_calibration.recalibrate(cal, metal_px, metal_err)
