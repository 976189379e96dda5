"""The vibrational-EELS stage: per probe position, energy-drift alignment and sum, temperature; then k-means
segmentation, phonon-peak fits and the interface fit.

It adapts :mod:`stemlive.live.analysis` (``eels``, ``segment``, ``interface``) to the message stream: it keeps
per-session state, decides when a probe position is complete and emits
:class:`~stemlive.live.pipeline.stage.Result` objects (the results table in ``docs/architecture.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from stemlive.live.analysis import eels, interface, segment
from stemlive.live.analysis._threads import single_threaded_blas
from stemlive.live.analysis.eels_power_profile import M_GRID, ExponentProfile
from stemlive.live.analysis.eels_segmentation import segment_spectra, segmentation_windows
from stemlive.live.analysis.eels_zlp_shapes import POWER
from stemlive.live.pipeline.stage import Result, Stage, register_stage
from stemlive.live.wire.protocol import Message

log = logging.getLogger(__name__)


def _scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _lists(windows: Iterable[Iterable[float]]) -> list[list[float]]:
    """Windows as JSON-friendly lists of rounded floats (result attributes)."""
    return [[round(float(v), 3) for v in w] for w in windows]


def _first(failures: dict[int, str]) -> str:
    point = min(failures)
    return f"point {point}: {failures[point]}"


@dataclass
class EELSPoints:
    """The EELS stage's per-point state: what its final step (segmentation, peaks, interface, the whole-map
    datasets) reads.  Parts of one session analysed elsewhere (batch workers, :mod:`stemlive.live.pipeline.batch`) are
    merged with :meth:`EELSStage.add_points`."""

    dispersion_meV: float = 0.0
    energy_meV: np.ndarray | None = None
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)
    sums: dict[int, np.ndarray] = field(default_factory=dict)
    temps: dict[int, tuple[float, float]] = field(default_factory=dict)
    temp_skipped: dict[int, str] = field(default_factory=dict)  # point -> why its temperature was not measured
    temp_failed: dict[int, str] = field(default_factory=dict)  # point -> why its temperature fit failed
    temp_windows: dict[str, Any] = field(default_factory=dict)
    m_profiles: dict[int, ExponentProfile] = field(default_factory=dict)  # power-law tails: each point's m profile


@register_stage
class EELSStage(Stage):
    """Per probe position: align the frames for energy drift and sum; temperature; then k-means and peak fits.

    Frames of one probe position arrive consecutively; a spectrum with a new ``point_index`` closes the
    previous position.  Closed positions are analysed in *blocks* (``temperature_block`` points: positions
    ``point_index // temperature_block`` together; default one scan row of a map, one point of a line scan):
    the alignment and the temperature run vectorised over a block (one spectrum at a time costs ~40x more per
    spectrum), and a block's results are emitted when a position of another block arrives (or at the end).
    Temperature, segmentation, peak fits and the interface fit are independent steps: one that cannot run (a
    window the acquired range leaves too narrow, a failed fit) is reported as a ``problem`` result (``attrs``:
    result, severity ``skipped`` | ``failed``, reason) and the others go on.

    The per-point step is public for batch analysis (:mod:`stemlive.live.pipeline.batch`): :meth:`runs`,
    :meth:`use_energy_axis`, :meth:`flush`, :meth:`points` and :meth:`add_points`.
    """

    name = "eels"
    kinds = frozenset({"eels_line_scan", "eels_map"})
    defaults: ClassVar[dict[str, Any]] = {
        "align_method": "xcorr",
        "zlp_windows_meV": [[6.0, 30.0], [130.0, 200.0]],
        "background_windows_meV": [[16.0, 20.0], [60.0, 70.0]],
        "window_min_meV": 55.0,
        "window_max_meV": None,
        "deconvolve": False,
        "lr_iterations": 5,
        "k": 3,
        "n_restarts": 10,
        "seed": 0,
        "segment_window_meV": [18.0, 60.0],
        "n_peaks": 5,
        "peak_window_meV": [18.0, 60.0],
        # starting centres (meV) of the peak fits: one list for every cluster, or one list per cluster in
        # spatial order; None finds them from the spectrum (close pairs may then be missed)
        "peak_initial_meV": None,
        "labels_every": 5,  # refresh the live segmentation every N points
        # a temperature whose log ratio is no line through the origin (reduced chi-square above this) is refused:
        # the zero-loss or background model does not describe the spectrum (measured: <= 7 where it does,
        # 120-24,000 with a pseudo-Voigt zero-loss peak or a power-law background under both sides)
        "max_line_chi2": 25.0,
        # ... and so is one whose zero-loss fit does not describe its windows (reduced chi-square above this): phonon
        # modes inside the zero-loss windows (measured: <= 2.3 on the corpus's thermometry scenarios, <= 0.7 on the
        # demo's sums; 68 with material A's modes at 23 and 36 meV, whose temperatures were 15-46 % low)
        "max_zlp_chi2": 25.0,
        # positions analysed together (point_index // N): None = one scan row of a map, 1 for a line scan;
        # 1 = one spectrum at a time (batch and one at a time agree within 0.1 sigma, docs/eels-analysis.md)
        "temperature_block": None,
        # power-law zero-loss tails: the session's spectra share one exponent m and one tail exponent p (the
        # spectrometer's), pooled at the end and every temperature recomputed with them (eels_tail_pool; refused with
        # the reason where the spectra disagree); False: each point keeps the m of its own profile
        "shared_tail_shape": True,
    }

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._scan_shape: list[int] | None = None
        self._block = 1
        self._open: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._closed: list[tuple[int, np.ndarray, np.ndarray]] = []  # closed positions awaiting their block
        self._closed_blocks: set[int] = set()  # their blocks
        self._state = EELSPoints()

    # the per-point state under its former names (read by the final step)
    @property
    def _dispersion(self) -> float:
        return self._state.dispersion_meV

    @property
    def _energy(self) -> np.ndarray | None:
        return self._state.energy_meV

    @property
    def _positions(self) -> dict[int, tuple[float, float]]:
        return self._state.positions

    @property
    def _sums(self) -> dict[int, np.ndarray]:
        return self._state.sums

    @property
    def _temps(self) -> dict[int, tuple[float, float]]:
        return self._state.temps

    def problem(self, result: str, reason: str, severity: str = "skipped") -> Result:
        """A ``problem`` result: ``result`` (e.g. "temperature") could not be produced, for ``reason`` (one line)."""
        return Result(self.name, "problem", np.zeros(0),
                      attrs={"result": result, "severity": severity, "reason": reason})

    def start(self, start: Message) -> Iterable[Result]:
        settings = start.header.get("settings") or {}
        shape = settings.get("scan_shape")
        self._scan_shape = [int(v) for v in shape] if shape else None
        block = self.params["temperature_block"]
        if block is None:
            is_map = start.header.get("kind") == "eels_map" and self._scan_shape and len(self._scan_shape) == 2
            block = self._scan_shape[1] if is_map and self._scan_shape else 1
        self._block = max(1, int(block))
        return ()

    # --- the per-point step (public for batch analysis) ---
    def runs(self, points: Sequence[int]) -> list[list[int]]:
        """Split positions in arrival order into the runs this stage analyses together (consecutive positions
        of one block).  A part of a session made of whole runs gives the same results alone as in the session."""
        out: list[list[int]] = []
        last = None
        for p in points:
            b = int(p) // self._block
            if b != last:
                out.append([])
                last = b
            out[-1].append(int(p))
        return out

    def use_energy_axis(self, energy_meV: np.ndarray | None) -> None:
        """Fix the common energy axis of the session (a part analysed apart from the session's first run,
        which fixes it: :attr:`energy_meV` of a stage that analysed that run)."""
        self._state.energy_meV = None if energy_meV is None else np.asarray(energy_meV, dtype=np.float64)

    @property
    def energy_meV(self) -> np.ndarray | None:
        """The common energy axis of the sums (None before the first run was analysed)."""
        return self._state.energy_meV

    def flush(self) -> Iterator[Result]:
        """Close every open position and analyse every pending one (the end of a session or of a part of it)."""
        for point in list(self._open):
            self._close_point(point)
        yield from self._run_pending(None)

    def points(self) -> EELSPoints:
        """The per-point state (after :meth:`flush`, complete for the messages processed)."""
        return self._state

    def add_points(self, part: EELSPoints) -> None:
        """Merge the per-point state of a part of this session analysed elsewhere (same energy axis)."""
        s = self._state
        if part.energy_meV is not None:
            if s.energy_meV is None:
                s.energy_meV = part.energy_meV
            elif not np.array_equal(s.energy_meV, part.energy_meV):
                raise ValueError("a part of the session was analysed on another energy axis")
        if part.dispersion_meV:
            s.dispersion_meV = part.dispersion_meV
        for name in ("positions", "sums", "temps", "temp_skipped", "temp_failed", "m_profiles"):
            getattr(s, name).update(getattr(part, name))
        if part.temp_windows:
            s.temp_windows = part.temp_windows

    def process(self, msg: Message) -> Iterator[Result]:
        if msg.type != "spectrum" or msg.payload is None:
            return
        h = msg.header
        self._state.dispersion_meV = float(h["dispersion_meV"])
        spectra = np.atleast_2d(np.asarray(msg.payload, dtype=np.float64))
        points = np.atleast_1d(np.asarray(h["point_index"], dtype=np.int64))
        offsets = np.broadcast_to(np.asarray(h["energy_offset_meV"], dtype=np.float64), points.shape)
        xs = np.broadcast_to(np.asarray(h["x_nm"], dtype=np.float64), points.shape)
        ys = np.broadcast_to(np.asarray(h["y_nm"], dtype=np.float64), points.shape)
        for point in np.unique(points):
            rows = points == point
            # A new position closes every other open one (positions are acquired one after another), and the
            # closed positions of other blocks are analysed.
            for done in [p for p in self._open if p != point]:
                self._close_point(done)
            yield from self._run_pending(int(point) // self._block)
            self._open.setdefault(int(point), []).append((spectra[rows], offsets[rows]))
            self._positions[int(point)] = (float(xs[rows][0]), float(ys[rows][0]))

    def _close_point(self, point: int) -> None:
        chunks = self._open.pop(point)
        self._closed.append((point, np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])))
        self._closed_blocks.add(point // self._block)

    def _run_pending(self, current_block: int | None) -> Iterator[Result]:
        """Analyse the closed positions unless they belong to ``current_block`` (None: all of them)."""
        if not self._closed or (current_block is not None and self._closed_blocks == {current_block}):
            return
        self._closed_blocks = set()
        todo, self._closed = self._closed, []
        yield from self._run_block(todo)

    def _run_block(self, todo: list[tuple[int, np.ndarray, np.ndarray]]) -> Iterator[Result]:
        """Align and sum the frames of a block of positions, then their temperatures (vectorised)."""
        with single_threaded_blas():
            sums, temps = self._align_and_fit(todo)
        every = int(self.params["labels_every"])
        before = len(self._sums)
        for i, (point, frames, _) in enumerate(todo):
            self._sums[point] = sums[point]
            attrs: dict[str, Any] = {"n_frames": int(len(frames)), "x_nm": self._positions[point][0],
                                     "y_nm": self._positions[point][1]}
            if self._scan_shape:
                attrs["scan_shape"] = self._scan_shape  # lets viewers draw a map while it fills
            yield Result(self.name, "sum", sums[point].astype(np.float32), index=point, attrs=attrs)
            temp = temps[i]
            if temp is not None:
                t_attrs = {**attrs, **self._state.temp_windows}
                yield Result(self.name, "temperature_K", _scalar(temp[0]), index=point, attrs=t_attrs)
                yield Result(self.name, "temperature_err_K", _scalar(temp[1]), index=point, attrs=t_attrs)
        # the live segmentation: refreshed once per block when its point count passed a multiple of labels_every
        # (a k-means over every point so far: once per point of a map row would cost O(points^2))
        n = len(self._sums)
        if every > 0 and n >= max(2 * int(self.params["k"]), 2) and n // every > before // every:
            yield from self._segmentation(final=False)

    def _align_and_fit(self, todo: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[
        dict[int, np.ndarray], list[tuple[float, float] | None]
    ]:
        points = [p for p, _, _ in todo]
        sums: dict[int, np.ndarray] = {}
        by_frames: dict[int, list[int]] = {}
        for i, (_, frames, _) in enumerate(todo):
            by_frames.setdefault(len(frames), []).append(i)
        for members in by_frames.values():  # one vectorised alignment per number of frames
            frames = np.stack([todo[i][1] for i in members])
            offsets = np.stack([todo[i][2] for i in members])
            energy, summed, _shifts = eels.sum_aligned(
                frames, dispersion_meV=self._dispersion, energy_offset_meV=offsets,
                method=str(self.params["align_method"]),
            )
            for i, s in zip(members, summed, strict=True):
                sums[todo[i][0]] = self._on_common_axis(energy, s)
        stacked = np.stack([sums[p] for p in points])
        return sums, self._temperatures(points, stacked)

    def _temperatures(self, points: list[int], sums: np.ndarray) -> list[tuple[float, float] | None]:
        """Temperatures of a block of positions, vectorised; where the block's fit raises, one at a time (one
        spectrum's failure never costs the others their temperature)."""
        if len(points) > 1:
            try:
                t = self._thermometry(sums)
            except eels.WindowError:
                pass  # the same windows for every spectrum: each point gets the reason below
            except Exception as e:  # noqa: BLE001
                log.info("temperature of points %d-%d as a block failed (%s); one at a time", points[0], points[-1], e)
            else:
                return [self._accept(p, t, i) for i, p in enumerate(points)]
        return [self._temperature(p, s) for p, s in zip(points, sums, strict=True)]

    def _thermometry(self, sums: np.ndarray, **kw: Any) -> Any:
        assert self._energy is not None
        return eels.temperature(
            self._energy, sums,
            window_min_meV=float(self.params["window_min_meV"]),
            window_max_meV=self.params["window_max_meV"],
            zlp_windows_meV=tuple(tuple(w) for w in self.params["zlp_windows_meV"]),
            deconvolve=bool(self.params["deconvolve"]),
            lr_iterations=int(self.params["lr_iterations"]), **kw,
        )

    def _temperature(self, point: int, summed: np.ndarray) -> tuple[float, float] | None:
        """The point's temperature and error, or None (the reason is kept for the session's problems)."""
        self._temps[point] = (np.nan, np.nan)
        try:
            t = self._thermometry(summed)
        except eels.WindowError as e:
            self._state.temp_skipped[point] = str(e)
            return None
        except Exception as e:  # noqa: BLE001  (one point's fit never stops the others)
            log.warning("temperature of point %d failed: %s", point, e)
            self._state.temp_failed[point] = f"{type(e).__name__}: {e}"
            return None
        return self._accept(point, t, ())

    def _accept(self, point: int, t: Any, i: int | tuple[()]) -> tuple[float, float] | None:
        """Point ``point``'s temperature from ``t`` (element ``i`` of a block's result), or None with the reason."""
        self._temps[point] = (np.nan, np.nan)
        if t.m_profile is not None:  # kept for the session's shared tail shape (final step)
            self._state.m_profiles[point] = t.m_profile.select(i)
        temp, err = float(np.asarray(t.T_K)[i]), float(np.asarray(t.T_err_K)[i])
        self._state.temp_windows = {
            "zlp_windows_loss_meV": _lists(t.zlp.loss_windows_meV),
            "zlp_windows_gain_meV": _lists(t.zlp.gain_windows_meV),
            "thermometry_window_meV": _lists([t.window_meV])[0],
            "zlp_shape": str(getattr(t.zlp, "shape", "pearson7")),
        }
        # a zero-loss model that does not describe its windows is the cause of whatever follows (a background on
        # the loss side only leaves no gain signal): named first
        zlp_chi2_all = np.ravel(t.zlp.chi2_red)
        zlp_chi2 = float(zlp_chi2_all[i if isinstance(i, int) and zlp_chi2_all.size > 1 else 0])
        if zlp_chi2 > float(self.params["max_zlp_chi2"]):
            windows = ", ".join(f"{lo:g}-{hi:g}" for lo, hi in t.zlp.windows_meV)
            would = f"T would be {temp:.4g} +- {err:.2g} K" if np.isfinite(temp) and np.isfinite(err) else "no T"
            self._state.temp_failed[point] = (
                f"the zero-loss model does not describe its fit windows {windows} meV (chi2_red {zlp_chi2:.3g} > "
                f"{float(self.params['max_zlp_chi2']):g}): phonon modes inside them, another zero-loss shape or a "
                f"background would bias the temperature ({would})"
            )
            return None
        lo, hi = t.window_meV
        unbounded = getattr(t, "m_unbounded", None)
        if unbounded is not None and bool(np.asarray(unbounded)[i]):
            self._state.temp_failed[point] = (
                f"the zero-loss peak's exponent m (power-law tails) is not bounded within {M_GRID[0]:g}-"
                f"{M_GRID[-1]:g} by the zero-loss windows and the log ratio: the temperature's error is not known"
            )
            return None
        if not (np.isfinite(temp) and np.isfinite(err)):
            self._state.temp_failed[point] = (
                f"no gain-side signal above {2:g} sigma in the thermometry window {lo:.0f}-{hi:.0f} meV"
                if int(np.asarray(t.n_bins)[i]) == 0
                else f"the log-ratio slope in {lo:.0f}-{hi:.0f} meV is not positive"
            )
            return None
        chi2 = float(np.asarray(t.chi2_red)[i])
        if chi2 > float(self.params["max_line_chi2"]):
            self._state.temp_failed[point] = (
                f"the log ratio in {lo:.0f}-{hi:.0f} meV is not a line through the origin (chi2_red {chi2:.3g} > "
                f"{float(self.params['max_line_chi2']):g}): the zero-loss or background model does not describe "
                f"this spectrum (T would be {temp:.4g} +- {err:.2g} K)"
            )
            return None
        self._temps[point] = (temp, err)
        return temp, err

    def _temperature_problems(self) -> Iterator[Result]:
        n = len(self._temps)
        skipped, failed = self._state.temp_skipped, self._state.temp_failed
        if skipped and len(skipped) == n and len(set(skipped.values())) == 1:
            yield self.problem("temperature", next(iter(skipped.values())))
        elif skipped:
            yield self.problem("temperature", f"skipped at {len(skipped)} of {n} points ({_first(skipped)})")
        if failed:
            yield self.problem("temperature", f"failed at {len(failed)} of {n} points ({_first(failed)})", "failed")

    def _on_common_axis(self, energy: np.ndarray, summed: np.ndarray) -> np.ndarray:
        """The first position fixes the axis; later sums (ZLP at 0 by construction) are moved onto it."""
        if self._energy is None:
            self._state.energy_meV = np.asarray(energy, dtype=np.float64)
            return summed
        if np.array_equal(energy, self._energy):
            return summed
        # Both axes are dispersion x (j - j0) with integer j0: an exact shift, zero where no data.
        return np.interp(self._energy, energy, summed, left=0.0, right=0.0)

    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        points = np.array(sorted(self._sums))
        return points, np.stack([self._sums[p] for p in points])

    def _segmentation(self, *, final: bool, shape: tuple[int, ...] | None = None,
                      stacked: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[Result]:
        assert self._energy is not None
        points, sums = stacked if stacked is not None else self._stacked()
        k = int(self.params["k"])
        if len(points) < k:
            if final:
                reason = f"{len(points)} points for k = {k} clusters"
                yield self.problem("segmentation", reason)
                yield self.problem("peaks", f"no segmentation ({reason})")
            return
        window = (float(self.params["segment_window_meV"][0]), float(self.params["segment_window_meV"][1]))
        background = tuple((float(a), float(b)) for a, b in self.params["background_windows_meV"])
        try:
            used, used_bg = segmentation_windows(self._energy, window, background)
            labels, corrected = segment_spectra(
                self._energy, sums, k=k, window_meV=used, background_windows_meV=used_bg,
                n_restarts=int(self.params["n_restarts"]), seed=int(self.params["seed"]),
            )
        except Exception as e:  # noqa: BLE001  (independent steps: the other results go on)
            if final:
                severity = "skipped" if isinstance(e, eels.WindowError) else "failed"
                reason = str(e) if severity == "skipped" else f"{type(e).__name__}: {e}"
                if severity == "failed":
                    log.warning("segmentation failed: %s", reason)
                yield self.problem("segmentation", reason, severity)
                yield self.problem("peaks", f"no segmentation ({reason})")
            return
        out = labels.astype(np.int32).reshape(shape if shape is not None else (-1,))
        attrs = {"segment_window_meV": _lists([used])[0], "background_windows_meV": _lists(used_bg)}
        yield Result(self.name, "labels", out, attrs={"points": points.tolist(), "final": final, **attrs})
        if not final:
            return
        yield Result(self.name, "cluster_mean", np.asarray(segment.cluster_means(corrected, labels, k)), attrs=attrs)
        yield from self._peak_table(sums, labels, k)

    def _initial_centres(self, cluster: int) -> list[float] | None:
        initial = self.params["peak_initial_meV"]
        if not initial:
            return None
        if isinstance(initial[0], int | float):
            return [float(c) for c in initial]
        return [float(c) for c in initial[cluster]] if cluster < len(initial) else None

    def _peak_table(self, sums: np.ndarray, labels: np.ndarray, k: int) -> Iterator[Result]:
        """Fit each cluster's mean spectrum (with its zero-loss peak: the fit convolves with the resolution).

        Clusters are numbered in spatial order along a line, so an interior cluster (an interface) lies between
        its neighbours: their mean spectra enter its fit as components with free weights, for the delocalised
        signal of both sides that an interface spectrum contains.  The fit covers ``+-window`` (both sides).
        """
        assert self._energy is not None
        n_peaks = int(self.params["n_peaks"])
        try:
            window = eels.both_sides(
                (float(self.params["peak_window_meV"][0]), float(self.params["peak_window_meV"][1])),
                eels.axis_reach(self._energy), "the peak window", min_channels=max(8, 3 * n_peaks),
            )
        except eels.WindowError as e:
            yield self.problem("peaks", str(e))
            return
        means = np.asarray(segment.cluster_means(sums, labels, k))
        line = self._scan_shape is None
        tables = []
        for cluster in range(k):
            neighbours = [c for c in (cluster - 1, cluster + 1) if 0 <= c < k] if line else []
            components = means[neighbours] if len(neighbours) == 2 else None
            try:
                tables.append(segment.fit_gaussians(
                    self._energy, means[cluster], n_peaks,
                    window_meV=window, cluster=cluster,
                    initial=self._initial_centres(cluster), components=components,
                ))
            except Exception as e:  # noqa: BLE001  (one cluster's fit never removes the others)
                log.warning("peak fit of cluster %d failed: %s", cluster, e)
                yield self.problem("peaks", f"cluster {cluster}: {type(e).__name__}: {e}", "failed")
        if tables:
            yield Result(self.name, "peaks", np.concatenate(tables), attrs={"peak_window_meV": _lists([window])[0]})

    def _interface(self) -> Iterator[Result]:
        points = np.array(sorted(self._temps))
        temps = np.array([self._temps[p] for p in points]).reshape(-1, 2)
        finite = np.isfinite(temps).all(axis=1)
        if finite.sum() < 8:  # e.g. no phonon signal in the thermometry window: no profile to fit
            yield self.problem("interface", f"{int(finite.sum())} of {len(points)} points have a temperature (needs 8)")
            return
        xy = np.array([self._positions[p] for p in points])
        distance = np.hypot(*(xy - xy[0]).T)  # along the line from its first point
        distance, temps = distance[finite], temps[finite]
        try:
            fit = interface.fit_interface_profile(distance, temps[:, 0], temps[:, 1])
        except ValueError as e:  # the line's geometry allows no profile (e.g. too few points on one side)
            yield self.problem("interface", f"no interface profile on this line: {e}")
            return
        except Exception as e:  # noqa: BLE001  (independent steps)
            log.warning("interface fit failed: %s", e)
            yield self.problem("interface", f"{type(e).__name__}: {e}", "failed")
            return
        table = np.array(
            [(fit.interface_x_nm, fit.drop_K, fit.drop_err_K, fit.width_nm, fit.width_err_nm,
              fit.left[1], fit.right[1], fit.length_left_nm, fit.length_right_nm)],
            dtype=INTERFACE_DTYPE,
        )
        yield Result(self.name, "interface", table, attrs={"x_axis": "distance along the line from its first point"})

    def finish(self, status: str) -> Iterator[Result]:
        yield from self.flush()
        with single_threaded_blas():
            yield from self._final()

    def _shared_tail_shape(self) -> None:
        """Power-law tails: the temperatures again with the session's shared m and p (:mod:`~stemlive.live.analysis.
        eels_tail_pool`; each point's live temperature used its own), the shape stored with the temperatures."""
        points = sorted(self._state.m_profiles)
        if len(points) < 2 or self._energy is None or not self.params["shared_tail_shape"]:
            return
        sums = np.stack([self._sums[p] for p in points])
        try:
            shape = eels.pool_tail_shape(self._energy, sums, eels.stack_profiles(
                [self._state.m_profiles[p] for p in points]), zlp_windows_meV=tuple(
                    tuple(w) for w in self.params["zlp_windows_meV"]))
            t = self._thermometry(sums, tails_shape=shape) if shape.shared else None
        except Exception as e:  # noqa: BLE001  (the points keep their own temperatures)
            log.warning("shared tail shape failed: %s", e)
            self._state.temp_windows["zlp_shape_not_shared"] = f"{type(e).__name__}: {e}"
            return
        if t is not None and t.zlp.shape != POWER:  # the family is judged again over every such point: not tails
            self._state.temp_windows["zlp_shape_not_shared"] = (
                f"the zero-loss fit of the {len(points)} spectra together is {t.zlp.shape}, not power-law tails")
            return
        if t is not None:
            for i, p in enumerate(points):
                self._state.temp_failed.pop(p, None)
                self._accept(p, t, i)
        self._state.temp_windows.update(shape.attrs())

    def _final(self) -> Iterator[Result]:
        if not self._sums or self._energy is None:
            return
        self._shared_tail_shape()
        points, sums = self._stacked()
        temps = np.array([self._temps[p] for p in points])
        yield Result(self.name, "energy_meV", self._energy.astype(np.float64))
        shape: tuple[int, ...] = (len(points),)
        if self._scan_shape and int(np.prod(self._scan_shape)) == len(points):
            shape = tuple(self._scan_shape)
        yield Result(self.name, "sum", sums.reshape(*shape, -1).astype(np.float32))
        # NaN where no temperature was measured (the problems say why)
        yield Result(self.name, "temperature_K", temps[:, 0].reshape(shape), attrs=self._state.temp_windows)
        yield Result(self.name, "temperature_err_K", temps[:, 1].reshape(shape),
                     attrs=self._state.temp_windows)
        yield from self._temperature_problems()
        yield Result(self.name, "point_index", points.reshape(shape).astype(np.int32))
        yield from self._segmentation(final=True, shape=shape, stacked=(points, sums))
        if len(shape) == 1:
            yield from self._interface()


INTERFACE_DTYPE = np.dtype([
    ("interface_x_nm", "f8"), ("drop_K", "f8"), ("drop_err_K", "f8"), ("width_nm", "f8"), ("width_err_nm", "f8"),
    ("gradient_left_K_per_nm", "f8"), ("gradient_right_K_per_nm", "f8"),
    ("length_left_nm", "f8"), ("length_right_nm", "f8"),
])
