"""``stemlive import``: files written by Nion Swift's own code and by HyperSpy become v1 session files that replay
and analyse like recorded ones; arrays and signals too; bad inputs end in one line and a documented exit code.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from commands import STEMLIVE

from stemlive.live.apps.cli import main
from stemlive.live.exitcodes import ExitCode
from stemlive.live.pipeline.replay import replay_analyze
from stemlive.live.storage.importer import ImportInputError, import_arrays, import_files, import_signal
from stemlive.live.storage.session import SessionReader

NY, NX, NF = 2, 4, 3  # a 2 x 4 spectrum image, 3 frames of 1200 ms per position
STEP_NM, X0_NM = 2.0, -12.0
CREATED = "2026-05-01T12:00:00"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True, timeout=300)


@functools.cache
def spectrum_image() -> tuple[np.ndarray, np.ndarray]:
    """``(frames, ny, nx, channels)`` counts of the simulator's AlN/SiC model (its default energy axis: -300 meV,
    0.44 meV/channel, 2048 channels) and the true temperature per position ``(ny, nx)``."""
    from stemlive.simulators.eels_model import VibrationalEELSSimulator

    sim = VibrationalEELSSimulator("aln_sic", seed=5, noise="compact")
    x = np.broadcast_to(X0_NM + STEP_NM * np.arange(NX), (NF, NY, NX))
    t = np.arange(NF * NY * NX).reshape(NF, NY, NX) * 1.2
    spectra, truth = sim.spectra(x_nm=x, t_s=t)
    return spectra, truth["temperature_K"][0]


def _calibrations(energy_units: str) -> list[dict[str, Any]]:
    offset, scale = (-0.3, 0.00044) if energy_units == "eV" else (-300.0, 0.44)
    return [{"offset": 0.0, "scale": 1.0, "units": ""}, {"offset": 0.0, "scale": STEP_NM, "units": "nm"},
            {"offset": X0_NM, "scale": STEP_NM, "units": "nm"},
            {"offset": offset, "scale": scale, "units": energy_units}]


def _swift_properties(energy_units: str) -> dict[str, Any]:
    return {"type": "data-item", "created": CREATED, "title": "spectrum image", "is_sequence": True,
            "collection_dimension_count": 2, "datum_dimension_count": 1,
            "dimensional_calibrations": _calibrations(energy_units),
            "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"},
            "metadata": {"hardware_source": {"exposure": 1.2}}}


def write_ndata(path: Path) -> Path:
    """With Swift's own NDataHandler, energy in eV."""
    from nion.swift.model import NDataHandler

    NDataHandler.write_zip(str(path), spectrum_image()[0], _swift_properties("eV"))
    return path


def write_swift_h5(path: Path) -> Path:
    """With Swift's own HDF5Handler (its library's .h5 data items), energy in meV."""
    import datetime

    from nion.swift.model import HDF5Handler

    handler = HDF5Handler.HDF5Handler(path)
    try:
        handler.write_data(spectrum_image()[0], datetime.datetime(2026, 5, 1, 12))
        handler.write_properties(_swift_properties("meV"), datetime.datetime(2026, 5, 1, 12))
    finally:
        handler.close()
    return path


def eels_signal() -> Any:
    exspy = pytest.importorskip("exspy")
    s = exspy.signals.EELSSpectrum(spectrum_image()[0])
    names = [("frame", 1.0, 0.0, ""), ("y", STEP_NM, 0.0, "nm"), ("x", STEP_NM, X0_NM, "nm"),
             ("Energy loss", 0.44, -300.0, "meV")]
    for ax in s.axes_manager._axes:
        ax.name, ax.scale, ax.offset, ax.units = names[ax.index_in_array]
    s.metadata.General.date, s.metadata.General.time, s.metadata.General.time_zone = "2026-05-01", "12:00:00", "UTC"
    s.metadata.set_item("Acquisition_instrument.TEM.Detector.EELS.exposure", 1.2)
    return s


def write_hspy(path: Path) -> Path:
    """With HyperSpy/eXSpy, energy in meV."""
    eels_signal().save(path)
    return path


EELS_COLUMNS = ("point_index", "frame_index", "x_nm", "y_nm", "energy_offset_meV", "t", "seq")


def session_content(path: Path) -> dict[str, Any]:
    with SessionReader(path) as r:
        content: dict[str, Any] = {"kind": r.kind, "spectra": np.asarray(r.spectra()).tobytes(),
                                   "scan_shape": r.start_header["settings"].get("scan_shape"),
                                   "start_t": r.start_header["t"]}
        content.update({c: r.spectrum_table()[c].tolist() for c in EELS_COLUMNS})
        content.update({k: float(r.attrs("eels")[k]) for k in ("dispersion_meV", "exposure_ms")})
        content["messages"] = [(m.type, m.seq) for m in r.messages()]
    return content


def test_swift_and_hyperspy_files_import_to_the_same_session(tmp_path: Path) -> None:
    spectra, true_T = spectrum_image()
    ndata, hspy = write_ndata(tmp_path / "si.ndata"), write_hspy(tmp_path / "si.hspy")
    swift_h5 = write_swift_h5(tmp_path / "si_swift.h5")
    from_ndata = tmp_path / "from_ndata.h5"
    proc = run("import", str(ndata), "-o", str(from_ndata))  # as a user types it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"imported 1 file(s) -> {from_ndata} (eels_map, 24 spectra)"
    sessions = {"ndata": from_ndata, "hspy": import_files([hspy], tmp_path / "from_hspy.h5"),
                "swift_h5": import_files([swift_h5], tmp_path / "from_swift_h5.h5"),
                "signal": import_signal(eels_signal(), tmp_path / "from_signal.h5"),
                "arrays": import_arrays(spectra, tmp_path / "from_arrays.h5", kind="eels_map", frames_axis=True,
                                        dispersion_meV=0.44, energy_offset_meV=-300.0, step_nm=STEP_NM,
                                        settings={"exposure_ms": 1200.0, "t0": CREATED + "+00:00"})}
    info = run("info", str(from_ndata))
    assert info.returncode == 0 and f"imported:    {ndata} (nion swift ndata)" in info.stdout, info.stdout
    reference = session_content(sessions["ndata"])
    assert reference["kind"] == "eels_map" and reference["scan_shape"] == [NY, NX]
    assert reference["dispersion_meV"] == 0.44 and reference["exposure_ms"] == 1200.0  # eV -> meV, s -> ms
    assert set(reference["energy_offset_meV"]) == {-300.0}
    assert reference["x_nm"][:: NF][:NX] == [-12.0, -10.0, -8.0, -6.0] and reference["y_nm"][NX * NF] == 2.0
    # rows point after point (row-major over the map), frames of a point one after another; raw counts kept
    expected = np.ascontiguousarray(spectra.transpose(1, 2, 0, 3).reshape(-1, spectra.shape[-1]), np.float32)
    assert reference["spectra"] == expected.tobytes()
    for name, path in sessions.items():
        content = session_content(path)
        if name == "arrays":  # an array has no scan offset
            content["x_nm"] = [x + X0_NM for x in content["x_nm"]]
        assert content == reference, name

    # the analysis of the Swift (eV) and the HyperSpy (meV) imports: the same temperatures, honest against the truth
    temps = {}
    for name in ("ndata", "hspy"):
        out = replay_analyze(sessions[name], tmp_path / f"{name}_analysed.h5", {})
        with SessionReader(out) as r:
            temps[name] = (r.results("eels")["temperature_K"], r.results("eels")["temperature_err_K"])
    (t_a, err), (t_b, _) = temps["ndata"], temps["hspy"]
    assert t_a.shape == (NY, NX) and np.abs(t_a - t_b).max() <= 0.01
    pull = (t_a - true_T) / err
    # measured: pull RMS 0.72, |T - truth| <= 0.9 K at ~652 K
    assert np.sqrt(np.mean(pull**2)) <= 1.5, (t_a, true_T, err)


def test_large_files_are_read_lazily_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stemlive.live.storage import importer

    hspy = write_hspy(tmp_path / "si.hspy")
    (source,) = importer.read_file(hspy)
    assert type(source.data).__module__.startswith("dask")  # nothing read yet
    monkeypatch.setattr(importer, "BLOCK_BYTES", 2 * NF * 2048 * 4 + 1)  # two positions per read: 4 reads
    spectra, _ = spectrum_image()
    with SessionReader(import_files([hspy], tmp_path / "si.h5")) as r:
        expected = spectra.transpose(1, 2, 0, 3).reshape(-1, spectra.shape[-1]).astype(np.float32)
        assert np.asarray(r.spectra()).tobytes() == expected.tobytes()


def test_single_spectra_lines_and_sequences(tmp_path: Path) -> None:
    spectra, _ = spectrum_image()
    line = spectra[:, 0]  # (frames, points, channels): a line scan with frames
    path = import_arrays(line, tmp_path / "line.h5", kind="eels_line_scan", frames_axis=True, dispersion_meV=0.44,
                         energy_offset_meV=-300.0, step_nm=1.5)
    with SessionReader(path) as r:
        assert r.kind == "eels_line_scan" and r.n_spectra == NF * NX
        table = r.spectrum_table()
        np.testing.assert_array_equal(table["x_nm"][::NF], 1.5 * np.arange(NX))
        np.testing.assert_array_equal(table["frame_index"], np.tile(np.arange(NF), NX))
    one = import_arrays(spectra[0, 0], tmp_path / "one.h5", kind="eels_line_scan", dispersion_meV=0.44,
                        energy_offset_meV=-300.0)  # a line of single spectra, one frame each
    with SessionReader(one) as r:
        assert r.n_spectra == NX and [m.type for m in r.messages()][1] == "spectrum"
        assert np.asarray(r.messages().__next__().header["settings"]["source"]["readers"]) == ["numpy"]


def test_swift_sequence_of_spectra_is_one_point_with_frames(tmp_path: Path) -> None:
    from nion.swift.model import NDataHandler

    frames = spectrum_image()[0][:, 0, 0]  # (3 frames, 2048 channels) of one probe position
    properties = {"created": CREATED, "is_sequence": True, "collection_dimension_count": 0,
                  "datum_dimension_count": 1, "metadata": {"hardware_source": {"exposure": 1.2}},
                  "dimensional_calibrations": [{"offset": 0.0, "scale": 1.0, "units": ""},
                                               {"offset": -0.3, "scale": 0.00044, "units": "eV"}]}
    NDataHandler.write_zip(str(tmp_path / "seq.ndata"), frames, properties)
    with SessionReader(import_files([tmp_path / "seq.ndata"], tmp_path / "seq.h5")) as r:
        assert r.kind == "eels_line_scan" and r.spectra().shape == (3, 2048)
        np.testing.assert_array_equal(r.spectrum_table()["point_index"], [0, 0, 0])
        np.testing.assert_array_equal(r.spectrum_table()["frame_index"], [0, 1, 2])
        assert [m.type for m in r.messages()] == ["session_start", "spectrum", "session_end"]  # one batch


@pytest.mark.parametrize("suffix", [".dm3", ".dm4"])
def test_digitalmicrograph_spectrum_image(suffix: str, tmp_path: Path) -> None:
    """A DM spectrum image (energy in eV, slowest in the file; RosettaSciIO flags it as a navigation axis)."""
    import dm_writer

    spectra = spectrum_image()[0][0]  # (ny, nx, channels): one frame per position
    dm = dm_writer.write_spectrum_image(tmp_path / f"si{suffix}", spectra, step_nm=STEP_NM, x0_nm=X0_NM,
                                         energy_offset_eV=-0.3, dispersion_eV=0.00044, exposure_s=1.2)
    if suffix == ".dm3":  # as a user types it
        proc = run("import", str(dm), "-o", str(tmp_path / "si.h5"))
        assert proc.returncode == 0, proc.stderr
    else:
        import_files([dm], tmp_path / "si.h5")
    with SessionReader(tmp_path / "si.h5") as r:
        assert r.kind == "eels_map" and r.start_header["settings"]["scan_shape"] == [NY, NX]
        assert np.asarray(r.spectra()).tobytes() == spectra.reshape(-1, spectra.shape[-1]).tobytes()
        table = r.spectrum_table()
        assert r.attrs("eels")["dispersion_meV"] == 0.44 and set(table["energy_offset_meV"]) == {-300.0}
        np.testing.assert_allclose(table["x_nm"], np.tile(X0_NM + STEP_NM * np.arange(NX), NY))
        np.testing.assert_allclose(table["y_nm"], np.repeat(STEP_NM * np.arange(NY), NX))
        assert r.attrs("eels")["exposure_ms"] == 1200.0  # from DM's ImageTags.EELS.Acquisition


def test_emd_line_scan(tmp_path: Path) -> None:
    """Berkeley EMD (RosettaSciIO's reader flags no navigation axis: the eV axis is the spectrum)."""
    exspy = pytest.importorskip("exspy")
    data = np.random.default_rng(0).poisson(100, (5, 256)).astype(np.float32)
    s = exspy.signals.EELSSpectrum(data)
    x, e = s.axes_manager[0], s.axes_manager[1]
    x.name, x.units, x.scale, x.offset = "x", "nm", 1.6, 0.0
    e.name, e.units, e.scale, e.offset = "Energy loss", "eV", 0.001, -0.05
    s.save(tmp_path / "line.emd")
    with SessionReader(import_files([tmp_path / "line.emd"], tmp_path / "line.h5")) as r:
        assert r.kind == "eels_line_scan" and np.asarray(r.spectra()).tobytes() == data.tobytes()
        assert r.attrs("eels")["dispersion_meV"] == 1.0 and set(r.spectrum_table()["energy_offset_meV"]) == {-50.0}
        np.testing.assert_array_equal(r.spectrum_table()["x_nm"], 1.6 * np.arange(5))


def tilt_stack(n: int = 4, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / 18.0)
    return np.stack([100 * blob + rng.normal(0, 1, blob.shape) for _ in range(n)]).astype(np.float32)


def test_image_stacks_become_tilt_series(tmp_path: Path) -> None:
    hs = pytest.importorskip("hyperspy.api")
    stack = tilt_stack()
    s = hs.signals.Signal2D(stack)
    tilt, y, x = (s.axes_manager[i] for i in (0, 1, 2))
    tilt.name, tilt.units, tilt.offset, tilt.scale = "tilt", "deg", -30.0, 20.0
    for ax in (y, x):
        ax.units, ax.scale = "Å", 0.5  # 0.05 nm pixels
    s.save(tmp_path / "stack.hspy")
    out = import_files([tmp_path / "stack.hspy"], tmp_path / "tilt.h5", settings={"dwell_us": 2.0})
    with SessionReader(out) as r:
        assert r.kind == "tilt_series" and np.asarray(r.frames()).tobytes() == stack.tobytes()
        np.testing.assert_allclose(r.frame_table()["alpha_deg"], [-30.0, -10.0, 10.0, 30.0])
        assert r.attrs("tilt_series")["pixel_size_nm"] == 0.05

    # a TIFF stack (RosettaSciIO's reader) with a CSV of (alpha, beta): two frames at each of two tilts
    plain = hs.signals.Signal2D(stack)
    for ax in plain.axes_manager.signal_axes:
        ax.units, ax.scale = "nm", 0.05
    plain.save(tmp_path / "stack.tif")
    (tmp_path / "angles.csv").write_text("alpha,beta\n-14.3,-22.9\n-14.3,-22.9\n20.1,17.1\n20.1,17.1\n")
    analysed = tmp_path / "tif_analysed.h5"
    proc = run("import", str(tmp_path / "stack.tif"), "--angles", str(tmp_path / "angles.csv"), "-o",
               str(tmp_path / "tif.h5"), "--set", "dwell_us=4", "--set", "operator=\"me\"")
    assert proc.returncode == 0, proc.stderr
    done = run("replay", str(tmp_path / "tif.h5"), "--analyze", str(analysed))
    assert done.returncode == 0, done.stderr
    with SessionReader(analysed) as r:
        table = r.frame_table()
        np.testing.assert_array_equal(table["tilt_index"], [0, 0, 1, 1])
        np.testing.assert_array_equal(table["frame_index"], [0, 1, 0, 1])
        np.testing.assert_allclose(r.results("tilt_series")["tilt_beta_deg"], [-22.9, 17.1])
        assert r.results("tilt_series")["sums"].shape == (2, 24, 24) and r.settings["operator"] == "me"
        assert np.asarray(r.frames()).tobytes() == stack.tobytes() and r.attrs("tilt_series")["dwell_us"] == 4.0


def test_single_swift_images_with_stage_tilts_become_a_tilt_series(tmp_path: Path) -> None:
    """One Swift scan per file, the stage tilts (radians) and the dwell in each image's metadata."""
    from nion.swift.model import NDataHandler

    stack = tilt_stack(n=3)
    alpha, beta = [0.0, -14.3, 20.1], [0.0, -22.9, 17.1]
    files = []
    for i in range(3):
        properties = {"created": CREATED, "collection_dimension_count": 0, "datum_dimension_count": 2,
                      "dimensional_calibrations": [{"offset": 0.0, "scale": 0.032, "units": "nm"}] * 2,
                      "metadata": {"hardware_source": {"pixel_time_us": 4.0},
                                   "instrument": {"ImageScanned": {"StageOutA": np.radians(alpha[i]),
                                                                   "StageOutB": np.radians(beta[i])}}}}
        files.append(tmp_path / f"scan{i}.ndata")
        NDataHandler.write_zip(str(files[-1]), stack[i], properties)
    with SessionReader(import_files(files, tmp_path / "tilt.h5")) as r:
        table = r.frame_table()
        np.testing.assert_allclose(table["alpha_deg"], alpha, atol=1e-12)
        np.testing.assert_allclose(table["beta_deg"], beta, atol=1e-12)
        np.testing.assert_array_equal(table["tilt_index"], [0, 1, 2])
        assert r.attrs("tilt_series")["pixel_size_nm"] == 0.032 and r.attrs("tilt_series")["dwell_us"] == 4.0
        assert np.asarray(r.frames()).tobytes() == stack.tobytes()


def test_import_then_export_keeps_raw_spectra_and_frames_bit_for_bit(tmp_path: Path) -> None:
    hs = pytest.importorskip("hyperspy.api")
    export = pytest.importorskip("stemlive.live.storage.export")
    spectra, _ = spectrum_image()
    session = import_files([write_ndata(tmp_path / "si.ndata")], tmp_path / "si.h5")
    analysed = replay_analyze(session, tmp_path / "si_analysed.h5", {})
    paths = export.export(analysed, tmp_path / "si_export.hspy", "hspy")
    raw = hs.load(paths["raw"])
    expected = np.ascontiguousarray(spectra.transpose(1, 2, 0, 3).reshape(-1, spectra.shape[-1]), np.float32)
    assert np.asarray(raw.data).reshape(expected.shape).tobytes() == expected.tobytes()

    stack = tilt_stack()
    tilt = import_arrays(stack, tmp_path / "tilt.h5", kind="tilt_series", pixel_size_nm=0.05,
                         angles=np.array([-30.0, -10.0, 10.0, 30.0]), settings={"dwell_us": 4.0})
    tilt_analysed = replay_analyze(tilt, tmp_path / "tilt_analysed.h5", {})
    emd = export.export(tilt_analysed, tmp_path / "tilt.emd", "emd", align="none")["emd"]
    with h5py.File(emd, "r") as f:
        assert f["stemlive/raw/frames"][()].tobytes() == stack.tobytes()


def test_bad_inputs_are_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.xyz").write_text("hello")
    (tmp_path / "empty.ndata").touch()
    np.save(tmp_path / "stack.npy", tilt_stack())
    hs = pytest.importorskip("hyperspy.api")
    hs.signals.Signal2D(tilt_stack()).save(tmp_path / "no_angles.hspy")
    hs.signals.Signal2D(tilt_stack()).save(tmp_path / "stack.tif")
    (tmp_path / "angles.csv").write_text("0\n10\n20\n")
    cases = [
        (["missing.ndata"], ExitCode.BAD_INPUT, "no such file"),
        (["notes.xyz"], ExitCode.BAD_INPUT, "no reader for .xyz files"),
        (["empty.ndata"], ExitCode.BAD_INPUT, "empty file (0 bytes)"),
        (["no_angles.hspy", "--set", "dwell_us=2"], ExitCode.BAD_INPUT, "give --set pixel_size_nm=..."),
        (["no_angles.hspy", "--set", "dwell_us=2", "--set", "pixel_size_nm=0.1"], ExitCode.BAD_INPUT,
         "no tilt angles"),
        (["stack.tif", "--angles", "angles.csv", "--set", "pixel_size_nm=0.1"], ExitCode.BAD_INPUT,
         "no pixel dwell time"),
        (["stack.tif", "--angles", "angles.csv", "--set", "dwell_us=2", "--set", "pixel_size_nm=0.1"],
         ExitCode.BAD_INPUT, "3 angle rows for 4"),
        (["no_angles.hspy", "--kind", "eels_map"], ExitCode.BAD_INPUT, "holds 2-D signals"),
        (["no_angles.hspy", "--set", "novalue"], ExitCode.USAGE, "expected KEY=VALUE"),
    ]
    for args, code, text in cases:
        files = [str(tmp_path / a) if a.endswith((".ndata", ".xyz", ".hspy", ".tif", ".csv")) else a for a in args]
        if args[0] in {"missing.ndata", "no_angles.hspy"} and len(args) == 1 + 2 * (args[0] != "missing.ndata"):
            proc = run("import", *files, "-o", str(tmp_path / "out.h5"))  # as a user types it
            returncode, err = proc.returncode, proc.stderr
        else:
            capsys.readouterr()
            returncode, err = main(["import", *files, "-o", str(tmp_path / "out.h5")]), capsys.readouterr().err
        lines = err.strip().splitlines()
        assert returncode == code and len(lines) == 1 and text in lines[0], (args, returncode, err)
        assert lines[0].startswith("stemlive import: ") and not (tmp_path / "out.h5").exists()
    (tmp_path / "out.h5").touch()
    assert main(["import", str(tmp_path / "no_angles.hspy"), "-o", str(tmp_path / "out.h5")]) == ExitCode.USAGE
    assert "exists" in capsys.readouterr().err
    with pytest.raises(ImportInputError, match="needs dispersion_meV"):
        import_arrays(np.zeros((3, 8)), tmp_path / "x.h5", kind="eels_line_scan")
