"""The notebook API: a few functions over numpy arrays or HyperSpy signals, re-exported as ``stemlive.*``.

Same analysis code as the pipeline (``stemlive.live.analysis``); no Qt, ZeroMQ or Swift. HyperSpy is needed only
when signals are passed in or asked for. Walk-through: ``docs/notebook.md`` (executed by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemlive.live.analysis import eels
from stemlive.live.storage.session import SessionReader

__all__ = [
    "Session",
    "align_and_sum",
    "analyze",
    "load",
    "segment",
    "temperature_map",
]

def _stage_default(name: str) -> Any:
    """The EELS stage's default for ``name`` as nested tuples: notebook and pipeline use the same windows."""
    from stemlive.live.pipeline.eels_stage import EELSStage

    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, list | tuple) else v

    return tuples(EELSStage.defaults[name])


@dataclass
class Session:
    """A session file read into memory (complete rows only; see :class:`stemlive.live.storage.session.SessionReader`).

    Attributes
    ----------
    path : Path
    kind, status, session_id : str
    settings : dict
    spectra : ndarray
        ``(n, n_channels)`` float32 EELS frames (empty for a tilt series).
    spectrum_table : dict of ndarray
        Per-row ``point_index``, ``frame_index``, ``x_nm``, ``y_nm``, ``energy_offset_meV``, ``t``.
    frames : ndarray
        ``(n, ny, nx)`` float32 images (empty for EELS).
    frame_table : dict of ndarray
        Per-frame ``tilt_index``, ``frame_index``, ``alpha_deg``, ``beta_deg``, ``t``.
    dispersion_meV, pixel_size_nm : float or None
    results : dict
        ``{stage: {name: array}}`` of ``/results``.
    """

    path: Path
    kind: str
    status: str
    session_id: str
    settings: dict[str, Any]
    spectra: np.ndarray
    spectrum_table: dict[str, np.ndarray]
    frames: np.ndarray
    frame_table: dict[str, np.ndarray]
    dispersion_meV: float | None
    pixel_size_nm: float | None
    results: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def energy_meV(self, row: int = 0) -> np.ndarray:
        """Energy axis of spectrum row ``row``: ``energy_offset_meV[row] + j * dispersion_meV``."""
        if self.dispersion_meV is None or not len(self.spectra):
            raise ValueError(f"{self.path}: no EELS spectra")
        return float(self.spectrum_table["energy_offset_meV"][row]) + self.dispersion_meV * np.arange(
            self.spectra.shape[1])

    def frames_by_point(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The spectra grouped by probe position: ``(points, frames, offsets)`` with ``frames``
        ``(n_points, n_frames, n_channels)`` and ``offsets`` ``(n_points, n_frames)`` (every point needs the
        same number of frames; the first ``min`` frames of each are used otherwise)."""
        pi = np.asarray(self.spectrum_table["point_index"], np.int64)
        points = np.unique(pi)
        rows = [np.flatnonzero(pi == p) for p in points]
        m = min(len(r) for r in rows)
        idx = np.stack([r[:m] for r in rows])
        return points, self.spectra[idx], np.asarray(self.spectrum_table["energy_offset_meV"])[idx]

    def signals(self) -> dict[str, Any]:
        """The analysed EELS session as HyperSpy/eXSpy signals (:func:`stemlive.live.storage.export.eels_signals`)."""
        from stemlive.live.storage.export import eels_signals

        return eels_signals(self.path)


def load(path: str | Path) -> Session:
    """Read a session file (any file that follows the v1 contract, see ``docs/session-format.md``).

    Examples
    --------
    >>> s = stemlive.load("session.h5")  # doctest: +SKIP
    >>> s.kind, s.spectra.shape, s.results["eels"]["temperature_K"]  # doctest: +SKIP
    """
    with SessionReader(path) as r:
        eels_attrs = r.attrs("eels") if r.n_spectra else {}
        ts_attrs = r.attrs("tilt_series") if r.n_frames else {}
        stages = list(r.result_names())
        dispersion = eels_attrs.get("dispersion_meV")
        pixel = ts_attrs.get("pixel_size_nm")
        return Session(
            path=Path(path), kind=r.kind, status=r.status, session_id=r.session_id, settings=dict(r.settings),
            spectra=np.asarray(r.spectra()[:]) if r.n_spectra else np.zeros((0, 0), np.float32),
            spectrum_table=r.spectrum_table() if r.n_spectra else {},
            frames=np.asarray(r.frames()[:]) if r.n_frames else np.zeros((0, 0, 0), np.float32),
            frame_table=r.frame_table() if r.n_frames else {},
            dispersion_meV=float(dispersion) if dispersion is not None else None,
            pixel_size_nm=float(pixel) if pixel is not None else None,
            results={stage: r.results(stage) for stage in stages},
        )


def _is_signal(x: Any) -> bool:
    return hasattr(x, "axes_manager") and hasattr(x, "data")


def _energy_from_signal(sig: Any) -> np.ndarray:
    axis = sig.axes_manager.signal_axes[0]
    scale = {"ev": 1e3, "mev": 1.0}.get(str(axis.units).strip().lower())
    if scale is None:
        raise ValueError(f"the signal's energy axis is in {axis.units!r}; expected eV or meV")
    return np.asarray(axis.axis, float) * scale


def _spectra_energy(spectra: Any, energy_meV: Any) -> tuple[np.ndarray, np.ndarray]:
    if _is_signal(spectra):
        return np.asarray(spectra.data, np.float64), _energy_from_signal(spectra)
    if energy_meV is None:
        raise ValueError("give energy_meV (the common energy axis) with a numpy array of spectra")
    return np.asarray(spectra, np.float64), np.asarray(energy_meV, float)


def _per_point_signal(template: Any, values: np.ndarray, title: str, quantity: str) -> Any:
    """A signal of per-point ``values`` whose axes are ``template``'s navigation axes."""
    out = template.isig[0].T.deepcopy()  # navigation axes become signal axes
    out.data = np.asarray(values)
    out.metadata.General.title = title
    out.metadata.Signal.quantity = quantity
    out.metadata.Signal.signal_type = ""
    return out


def align_and_sum(
    spectra: Any,
    *,
    dispersion_meV: float | None = None,
    energy_offset_meV: Any = 0.0,
    method: str = "xcorr",
) -> Any:
    """Align the frames of each probe position on the zero-loss peak and sum them (the pipeline's step).

    Parameters
    ----------
    spectra : ndarray or hyperspy Signal1D
        ``(..., n_frames, n_channels)``: frames along the last navigation axis (for a signal, the first axis
        of ``axes_manager.navigation_axes``); a signal's energy axis (eV or meV) gives the dispersion and offset.
    dispersion_meV : float
        Channel width, for arrays.
    energy_offset_meV : float or ndarray
        Energy of channel 0 (per frame: ``(..., n_frames)``), for arrays.
    method : {"xcorr", "com", ...}
        Frame alignment (:func:`stemlive.live.analysis.eels.sum_aligned`).

    Returns
    -------
    (energy_meV, summed, shifts_meV) for arrays: the common axis (zero-loss peak at 0 meV), the sums
    ``(..., n_channels)`` and the zero-loss position of every frame; for a signal: the sums as a signal of
    the same class with the energy axis in meV (shifts in ``metadata.stemlive.shifts_meV``).
    """
    if _is_signal(spectra):
        energy = _energy_from_signal(spectra)
        data = np.asarray(spectra.data, np.float64)
        step = float(np.mean(np.diff(energy)))
        e, summed, shifts = eels.sum_aligned(data, dispersion_meV=step, energy_offset_meV=float(energy[0]),
                                             method=method)
        out = spectra.sum(axis=spectra.axes_manager.navigation_axes[0])  # the frames: the last numpy axis
        out.data = np.asarray(summed)
        ax = out.axes_manager.signal_axes[0]
        if not ax.is_uniform:
            ax.convert_to_uniform_axis()
        ax.offset, ax.scale, ax.units = float(e[0]), float(e[1] - e[0]), "meV"
        out.metadata.set_item("stemlive.shifts_meV", np.asarray(shifts))
        return out
    if dispersion_meV is None:
        raise ValueError("give dispersion_meV with a numpy array of spectra")
    return eels.sum_aligned(np.asarray(spectra, np.float64), dispersion_meV=float(dispersion_meV),
                            energy_offset_meV=energy_offset_meV, method=method)


def temperature_map(spectra: Any, energy_meV: Any = None, **params: Any) -> Any:
    """Local temperature from detailed balance (gain/loss ratio) of aligned, summed spectra, each spectrum on its
    own (as the pipeline's EELS stage: the same numbers for the same sums).

    Parameters
    ----------
    spectra : ndarray or hyperspy Signal1D
        ``(..., n_channels)`` sums with the zero-loss peak at 0 (e.g. from :func:`align_and_sum`).
    energy_meV : ndarray
        The energy axis, for arrays.
    **params
        Passed to :func:`stemlive.live.analysis.eels.temperature` (``window_min_meV``, ``deconvolve``, ...).

    Returns
    -------
    (T_K, T_err_K) arrays of the navigation shape for arrays; for a signal, a signal of the temperature (K)
    over the navigation axes with the squared standard error as ``metadata.Signal.Noise_properties.variance``.
    """
    data, energy = _spectra_energy(spectra, energy_meV)
    params.setdefault("zlp_windows_meV", _stage_default("zlp_windows_meV"))
    flat = data.reshape(-1, data.shape[-1])
    # one spectrum at a time, as the pipeline does: a batch would share one zero-loss shape between all points
    fits = [eels.temperature(energy, row, **params) for row in flat]
    t = np.array([float(f.T_K) for f in fits]).reshape(data.shape[:-1])
    err = np.array([float(f.T_err_K) for f in fits]).reshape(data.shape[:-1])
    if not _is_signal(spectra):
        return t, err
    out = _per_point_signal(spectra, t, "temperature", "Temperature (K)")
    var = out.deepcopy()
    var.data = err**2
    var.metadata.General.title = "variance (standard error squared)"
    out.metadata.set_item("Signal.Noise_properties.variance", var)
    return out


def segment(spectra: Any, energy_meV: Any = None, *, k: int = 3, n_restarts: int = 10, seed: int = 0,
            window_meV: tuple[float, float] | None = None,
            background_windows_meV: tuple[tuple[float, float], ...] | None = None) -> Any:
    """k-means (correlation) clusters of background-subtracted spectra, as the pipeline segments a scan.

    Parameters
    ----------
    spectra : ndarray or hyperspy Signal1D
        ``(..., n_channels)`` aligned sums.
    energy_meV : ndarray
        The energy axis, for arrays.
    k, n_restarts, seed : int
        Clusters, k-means restarts, random seed.
    window_meV, background_windows_meV
        Energy window clustered (default 18-60 meV) and power-law background windows.

    Returns
    -------
    Labels ``(...)`` int for arrays; for a signal, a signal of the labels over its navigation axes.
    """
    from stemlive.live.analysis.eels_segmentation import segment_spectra

    data, energy = _spectra_energy(spectra, energy_meV)
    flat = data.reshape(-1, data.shape[-1])
    labels, _ = segment_spectra(
        energy, flat, k=k,
        window_meV=tuple(window_meV or _stage_default("segment_window_meV")),  # type: ignore[arg-type]
        background_windows_meV=tuple(background_windows_meV or _stage_default("background_windows_meV")),
        n_restarts=n_restarts, seed=seed,
    )
    labels = np.asarray(labels, np.int32).reshape(data.shape[:-1])
    if not _is_signal(spectra):
        return labels
    return _per_point_signal(spectra, labels, "labels", "Cluster")


def analyze(session_path: str | Path, out_path: str | Path, *overrides: str) -> Path:
    """Run the pipeline's analysis on a session file into a new file (``stemlive replay --analyze``).

    ``overrides`` are ``"stage.param=value"`` strings, e.g. ``analyze("s.h5", "a.h5", "eels.k=2")``.
    """
    from stemlive.live.pipeline.registry import make_params
    from stemlive.live.pipeline.replay import replay_analyze

    return replay_analyze(session_path, out_path, make_params(overrides=list(overrides)))
