"""The built-in analysis stages on simulated data with known ground truth, through the socket-free pipeline.

The same ``analyze_messages`` path runs inside the live service and in ``stemlive replay --analyze``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from commands import STEMLIVE
from sklearn.metrics import adjusted_rand_score

from stemlive.live.analysis import drift
from stemlive.live.pipeline.registry import make_params, registered_stages
from stemlive.live.pipeline.run import analyze_messages
from stemlive.live.storage.session import SessionReader
from stemlive.live.wire.protocol import Message
from stemlive.simulators.eels_model import VibrationalEELSSimulator
from stemlive.simulators.haadf import HAADFSimulator
from stemlive.simulators.scenario import load_scenario


def header(mtype: str, seq: int, t: float, **fields: Any) -> dict[str, Any]:
    return {"proto": "stemlive/1", "type": mtype, "session": "sim", "seq": seq, "t": t, **fields}


def tilt_series_messages(n_tilts: int, n_frames: int, size: int, truth: list[np.ndarray]) -> Iterator[Message]:
    """A simulated tilt series at the reference pixel size and dose; ``truth`` receives the true shifts."""
    scenario = load_scenario("default")
    sim = HAADFSimulator(scenario)
    pixel_nm = 0.032
    fov = size * pixel_nm
    seq, t = 0, 0.0
    yield Message(header("session_start", seq, t, kind="tilt_series", settings={"fov_nm": fov}), None)
    rng = np.random.default_rng(5)
    for tilt, (alpha, beta) in enumerate([(0.0, 0.0), (12.6, -12.6)][:n_tilts]):
        first: np.ndarray | None = None
        for frame_index in range(n_frames):
            image, ft = sim.render_frame(alpha_deg=alpha, beta_deg=beta, shape=(size, size), fov_nm=fov, dwell_us=4.0,
                                         t_start_s=t, rng=rng)
            # content of the frame about its centre time, relative to the tilt's first frame
            centre = ft.row_drift_px[size // 2 - 1: size // 2 + 1].mean(axis=0)
            first = centre if first is None else first
            truth.append(centre - first)
            seq += 1
            yield Message(header("frame", seq, t, tilt_index=tilt, alpha_deg=alpha, beta_deg=beta,
                                 frame_index=frame_index, pixel_size_nm=pixel_nm, dwell_us=4.0), image)
            t = ft.t_end_s
        t += 5.0  # stage move and settling between tilts
    seq += 1
    yield Message(header("session_end", seq, t, status="complete", messages=seq + 1), None)


def test_tilt_series_stage_recovers_the_simulated_drift(tmp_path: Path) -> None:
    truth: list[np.ndarray] = []
    out = analyze_messages(tilt_series_messages(2, 6, 256, truth), tmp_path / "tilt.h5", make_params(),
                           stage_classes={"tilt_series": registered_stages()["tilt_series"]})
    with SessionReader(out) as r:
        results = r.results("tilt_series")
        frames = np.asarray(r.frames())
        table = r.frame_table()
    measured = results["drift_px"]
    true = np.array(truth)
    assert measured.shape == (12, 2) and results["sums"].shape == (2, 256, 256)
    assert results["sums"].dtype == np.float32
    np.testing.assert_allclose(results["tilt_alpha_deg"], [0.0, 12.6])
    np.testing.assert_allclose(results["tilt_beta_deg"], [0.0, -12.6])
    step = np.abs(np.diff(true, axis=0)).max()
    assert 0.05 < step < 1.5, f"scenario drift per frame {step:.2f} px is outside the issue's 0.1-1 px range"
    rms = float(np.sqrt(np.mean((measured - true) ** 2)))
    assert rms <= 0.05, f"per-frame registration RMS error {rms:.3f} px (target <= 0.05 px)"
    # the drift-corrected sum is sharper than the plain sum (height of the lattice FFT peaks)
    first_tilt = table["tilt_index"] == 0
    plain = frames[first_tilt].sum(axis=0)
    corrected = results["sums"][0]
    gain = drift.sharpness(corrected) / drift.sharpness(plain)
    assert gain > 1.0, f"corrected/plain lattice peak height {gain:.3f}"


def eels_line_scan_messages(n_points: int, n_frames: int, truth: dict[str, list[Any]]) -> Iterator[Message]:
    scenario = load_scenario("eels_mos2_wse2")
    sim = VibrationalEELSSimulator(scenario)
    cfg = scenario.eels
    step_nm = 1.6
    x = cfg["interface_x_nm"] + (np.arange(n_points) - (n_points - 1) / 2) * step_nm
    seq, t = 0, time.time()
    yield Message(header("session_start", seq, t, kind="eels_line_scan", settings={"points": n_points}), None)
    rng = np.random.default_rng(11)
    exposure = float(cfg["exposure_ms"])
    for point in range(n_points):
        times = t + np.arange(n_frames) * exposure * 1e-3
        spectra, tr = sim.spectra(x_nm=np.full(n_frames, x[point]), y_nm=0.0, exposure_ms=exposure,
                                  t_s=times - times[0], rng=rng)
        truth["region"].append(int(np.asarray(tr["region"]).ravel()[0]))
        truth["temperature_K"].append(float(np.asarray(tr["temperature_K"]).ravel()[0]))
        seq += 1
        h = header("spectrum", seq, 0.0, point_index=[point] * n_frames, frame_index=list(range(n_frames)),
                   x_nm=[float(x[point])] * n_frames, y_nm=[0.0] * n_frames,
                   energy_offset_meV=[float(cfg["energy_offset_meV"])] * n_frames,
                   dispersion_meV=float(cfg["dispersion_meV"]), exposure_ms=exposure)
        h["t"] = times.tolist()  # a batch carries one time per spectrum
        yield Message(h, spectra)
        t = float(times[-1]) + exposure * 1e-3
    seq += 1
    yield Message(header("session_end", seq, t, status="complete", messages=seq + 1), None)


@pytest.mark.slow
def test_eels_stage_segments_a_mos2_wse2_line_scan(tmp_path: Path) -> None:
    truth: dict[str, list[Any]] = {"region": [], "temperature_K": []}
    n_points, n_frames = 40, 40
    out = analyze_messages(eels_line_scan_messages(n_points, n_frames, truth), tmp_path / "eels.h5", make_params(),
                           stage_classes={"eels": registered_stages()["eels"]})
    with SessionReader(out) as r:
        res = r.results("eels")
    energy, sums = res["energy_meV"], res["sum"]
    assert sums.shape == (n_points, energy.size)
    zlp_at = energy[np.argmax(sums, axis=1)]
    assert np.all(np.abs(zlp_at) <= 0.5 * abs(energy[1] - energy[0]) + 1e-9), "zero-loss peak not at 0 meV"
    ari = adjusted_rand_score(truth["region"], res["labels"])
    assert ari >= 0.8, f"adjusted Rand index {ari:.3f} at {n_frames} frames per point"
    # MoS2/WSe2 phonons (<= 50 meV) lie below the default thermometry window (from 55 meV): no temperature
    assert res["temperature_K"].shape == (n_points,)
    peaks = res["peaks"]
    assert set(peaks.dtype.names) >= {"cluster", "centre_meV", "centre_err_meV", "fwhm_meV", "area"}
    assert set(np.unique(peaks["cluster"])) <= {0, 1, 2} and len(peaks) >= 3


def test_the_file_records_the_analysis_parameters(tmp_path: Path) -> None:
    import json

    truth: list[np.ndarray] = []
    params = make_params(overrides=["tilt_series.search_radius_px=1.5"])
    out = analyze_messages(tilt_series_messages(1, 2, 64, truth), tmp_path / "p.h5", params,
                           stage_classes={"tilt_series": registered_stages()["tilt_series"]})
    import h5py

    with h5py.File(out) as f:
        recorded = json.loads(f["results/tilt_series/parameters"].attrs["parameters"])
    assert recorded == params["tilt_series"] and recorded["search_radius_px"] == 1.5


# ------------------------------------------------------------------------------------------- windows and problems
def aln_line_messages(
    n_points: int, n_frames: int, lo_meV: float, hi_meV: float, truth: list[float] | None = None
) -> Iterator[Message]:
    """An AlN/SiC line scan acquired on the energy range ``lo_meV .. hi_meV`` (0.44 meV per channel);
    ``truth`` receives each point's temperature."""
    disp = 0.44
    sim = VibrationalEELSSimulator({"system": "aln_sic", "energy_offset_meV": lo_meV,
                                    "n_channels": int((hi_meV - lo_meV) / disp) + 1}, seed=7)
    x = np.linspace(-12.0, 12.0, n_points)
    seq, t = 0, 1.0e9
    yield Message(header("session_start", seq, t, kind="eels_line_scan", settings={"points": n_points}), None)
    rng = np.random.default_rng(3)
    for point in range(n_points):
        times = t + np.arange(n_frames) * 1.2
        spectra, tr = sim.spectra(x_nm=np.full(n_frames, x[point]), exposure_ms=1200.0, t_s=times - 1.0e9, rng=rng)
        if truth is not None:
            truth.append(float(np.asarray(tr["temperature_K"]).ravel()[0]))
        seq += 1
        h = header("spectrum", seq, 0.0, point_index=[point] * n_frames, frame_index=list(range(n_frames)),
                   x_nm=[float(x[point])] * n_frames, y_nm=[0.0] * n_frames,
                   energy_offset_meV=[lo_meV] * n_frames, dispersion_meV=disp, exposure_ms=1200.0)
        h["t"] = times.tolist()
        yield Message(h, spectra.astype(np.float32))
        t = float(times[-1]) + 1.2
    seq += 1
    yield Message(header("session_end", seq, t, status="complete", messages=seq + 1), None)


def test_windows_adapt_to_an_asymmetric_axis(tmp_path: Path) -> None:
    """-120..+276 meV: the gain side has no zero-loss tail window (130-200 meV), the loss side keeps it; the
    thermometry window ends where the gain side does. Every point gets a temperature; the windows are recorded."""
    import json

    from stemlive.live.pipeline.problems import problems_in

    truth: list[float] = []
    out = analyze_messages(aln_line_messages(12, 3, -120.0, 276.0, truth), tmp_path / "asym.h5", make_params(),
                           stage_classes={"eels": registered_stages()["eels"]})
    with SessionReader(out) as r:
        res = r.results("eels")
        attrs = r.result_attrs("eels", "temperature_K")
    temps, errs = res["temperature_K"], res["temperature_err_K"]
    assert np.all(np.isfinite(temps)) and np.all((errs > 0) & (errs < 30)), (temps, errs)
    assert np.all(np.abs(temps - truth) < 4 * errs + 1.0), (temps - truth, errs)
    assert json.loads(attrs["zlp_windows_loss_meV"]) == [[6.0, 30.0], [130.0, 200.0]]
    assert json.loads(attrs["zlp_windows_gain_meV"]) == [[6.0, 30.0]]
    lo, hi = json.loads(attrs["thermometry_window_meV"])
    assert lo == 55.0 and 110.0 < hi <= 119.0, hi
    assert "labels" in res and "peaks" in res
    assert all(p.result != "temperature" for p in problems_in(out)), problems_in(out)


def test_replay_of_a_too_narrow_axis_lists_every_missing_result(tmp_path: Path) -> None:
    """-30..+35 meV leaves every window too narrow: `stemlive replay --analyze` (a real process) prints one
    line per missing result, exits INCOMPLETE (4), and the output file holds the reasons."""
    import subprocess

    from stemlive.live.exitcodes import ExitCode
    from stemlive.live.pipeline.problems import problems_in
    from stemlive.live.storage.session import SessionWriter

    raw = tmp_path / "narrow.h5"
    messages = list(aln_line_messages(10, 2, -30.0, 35.0))
    with SessionWriter(raw, messages[0]) as writer:
        for msg in messages[1:-1]:
            writer.append(msg)
    out = tmp_path / "narrow_analysed.h5"
    cli = STEMLIVE
    proc = subprocess.run([*cli, "replay", str(raw), "--analyze", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == ExitCode.INCOMPLETE, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("eels/")]
    assert [line.split()[0] for line in lines] == ["eels/temperature", "eels/segmentation", "eels/peaks",
                                                   "eels/interface"], proc.stdout
    assert ("the zero-loss tail window 130-200 meV is too narrow on both sides: loss side ends at +35 meV (0 meV "
            "left), gain side at -30 meV (0 meV left)") in lines[0]
    assert "the segmentation window 18-60 meV has" in lines[1]
    assert "could not be produced" in proc.stderr.strip().splitlines()[-1]
    stored = problems_in(out)
    assert [p.line() for p in stored] == lines
    assert all(p.severity == "skipped" for p in stored)
    with SessionReader(out) as r:
        finished = r.result_attrs("pipeline", "analysis_finished")
        assert finished["status"] == "incomplete" and int(finished["problems"]) == 4
        assert r.results("eels")["sum"].shape[0] == 10  # the sums are there all the same
    info = subprocess.run([*cli, "info", str(out)], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "analysis:    incomplete (4 problems)" in info.stdout
    assert all(line in info.stdout for line in lines)


def test_usim_like_spectra_give_reasons_not_errors(tmp_path: Path) -> None:
    """Nion usim's EELS camera: 1 eV per channel, Gaussian zero-loss peak, a plasmon. No vibrational window spans
    a channel: each result is skipped with that reason (formerly "Singular matrix" and the stage switched off)."""
    from stemlive.live.pipeline.problems import problems_in

    rng = np.random.default_rng(0)
    energy = -20000.0 + 1000.0 * np.arange(256)
    mu = 1e5 * np.exp(-0.5 * (energy / 500.0) ** 2) + 2e3 * np.exp(-0.5 * ((energy - 15000.0) / 4000.0) ** 2) + 5

    def messages() -> Iterator[Message]:
        yield Message(header("session_start", 0, 1.0, kind="eels_map", settings={"scan_shape": [2, 3]}), None)
        for point in range(6):
            h = header("spectrum", point + 1, 1.0 + point, point_index=[point] * 4, frame_index=list(range(4)),
                       x_nm=[float(point % 3)] * 4, y_nm=[float(point // 3)] * 4, energy_offset_meV=[-20000.0] * 4,
                       dispersion_meV=1000.0, exposure_ms=10.0)
            yield Message(h, rng.poisson(mu, (4, energy.size)).astype(np.float32))
        yield Message(header("session_end", 7, 8.0, status="complete", messages=8), None)

    out = analyze_messages(messages(), tmp_path / "usim.h5", make_params(),
                           stage_classes={"eels": registered_stages()["eels"]})
    found = {p.result: p for p in problems_in(out)}
    assert set(found) == {"temperature", "segmentation", "peaks"}, found
    assert found["temperature"].reason == "the zero-loss window 6-30 meV spans 0 channels at 1000 meV per channel " \
                                          "(needs 3)"
    assert "spans 0 channels at 1000 meV per channel" in found["segmentation"].reason
    assert all(p.severity == "skipped" for p in found.values())
    with SessionReader(out) as r:
        assert "stage_error" not in r.results("eels") and r.results("eels")["sum"].shape == (2, 3, 256)
