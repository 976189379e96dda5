"""``stemlive export``: EELS sessions to eXSpy/HyperSpy files, read back with the real ``hs.load``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stemlive.live.exitcodes import ExitCode
from stemlive.live.storage import export
from stemlive.live.storage.session import SessionReader

hs = pytest.importorskip("hyperspy.api")
exspy = pytest.importorskip("exspy")

sys.path.insert(0, str(Path(__file__).parent))
import export_sessions as es  # noqa: E402
from commands import STEMLIVE  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def line_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return es.eels_line_session(tmp_path_factory.mktemp("line") / "line.h5")


@pytest.fixture(scope="module")
def map_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return es.eels_map_session(tmp_path_factory.mktemp("map") / "map.h5")


def _check_energy_axis(s, session: Path) -> None:
    with SessionReader(session) as r:
        energy = r.results("eels")["energy_meV"]
        dispersion = float(r.attrs("eels")["dispersion_meV"])
    ax = s.axes_manager.signal_axes[0]
    assert ax.units == "meV"
    assert ax.scale == pytest.approx(dispersion, rel=1e-12)  # the session's scale
    np.testing.assert_allclose(ax.axis, energy, atol=1e-9)
    zlp = s.estimate_zero_loss_peak_centre().data
    assert np.all(np.abs(zlp) <= 0.1), zlp  # aligned sums: the zero-loss peak at 0 +- 0.1 meV


def test_line_scan_exports_an_eels_spectrum_hs_load_reads(line_session: Path, tmp_path: Path) -> None:
    paths = export.export(line_session, tmp_path / "line", "hspy")
    assert set(paths) == {"spectrum", "temperature", "labels", "raw"}
    s = hs.load(paths["spectrum"])
    assert isinstance(s, exspy.signals.EELSSpectrum) and s.metadata.Signal.signal_type == "EELS"
    _check_energy_axis(s, line_session)
    (nav,) = s.axes_manager.navigation_axes
    assert (nav.name, nav.units, nav.size) == ("position", "nm", 6)
    np.testing.assert_allclose(nav.axis, es.LINE_STEP_NM * np.arange(6), atol=1e-9)  # along the line, from 0
    with SessionReader(line_session) as r:
        res = r.results("eels")
        raw = np.asarray(r.spectra()[:])
        table = r.spectrum_table()
    np.testing.assert_array_equal(s.data, res["sum"])
    peaks = s.metadata.stemlive.peaks
    for name in res["peaks"].dtype.names:
        np.testing.assert_array_equal(peaks[name], res["peaks"][name])

    t = hs.load(paths["temperature"])
    np.testing.assert_array_equal(t.data, res["temperature_K"])
    np.testing.assert_allclose(t.metadata.Signal.Noise_properties.variance.data, res["temperature_err_K"] ** 2)
    assert t.axes_manager.signal_axes[0].units == "nm" and t.metadata.Signal.quantity == "Temperature (K)"
    assert 400 < float(np.mean(t.data)) < 900  # the AlN/SiC scenario runs at several hundred K

    labels = hs.load(paths["labels"])
    np.testing.assert_array_equal(labels.data, res["labels"])

    r = hs.load(paths["raw"])
    assert r.data.dtype == np.float32
    np.testing.assert_array_equal(r.data, raw)  # bit for bit
    for name in ("point_index", "frame_index", "x_nm", "energy_offset_meV", "t"):
        np.testing.assert_array_equal(r.metadata.stemlive.rows[name], table[name])


def test_map_exports_scan_axes_in_nm(map_session: Path, tmp_path: Path) -> None:
    paths = export.export(map_session, tmp_path / "map.hspy", "hspy")
    s = hs.load(paths["spectrum"])
    assert isinstance(s, exspy.signals.EELSSpectrum)
    _check_energy_axis(s, map_session)
    x, y = s.axes_manager.navigation_axes
    assert (x.name, x.units, x.size, y.name, y.units, y.size) == ("x", "nm", 3, "y", "nm", 2)
    assert (x.offset, x.scale) == pytest.approx((-2.0, es.MAP_STEP_NM[1]))
    assert (y.offset, y.scale) == pytest.approx((1.0, es.MAP_STEP_NM[0]))
    t = hs.load(paths["temperature"])
    assert t.data.shape == (2, 3)
    with SessionReader(map_session) as r:
        err = r.results("eels")["temperature_err_K"]
    np.testing.assert_allclose(t.metadata.Signal.Noise_properties.variance.data, err**2)
    tx, ty = t.axes_manager.signal_axes
    assert (tx.name, tx.scale, ty.name, ty.scale) == ("x", pytest.approx(1.5), "y", pytest.approx(2.0))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_export_and_its_refusals(line_session: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.hspy"
    done = _run("export", str(line_session), "--format", "hspy", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[0] == f"spectrum: {out}"
    assert isinstance(hs.load(out), exspy.signals.EELSSpectrum)
    again = _run("export", str(line_session), "--format", "hspy", "-o", str(out))
    assert again.returncode == ExitCode.USAGE and again.stderr.strip().splitlines()[-1] == (
        f"stemlive export: {out} exists; refusing to overwrite it")
    emd = _run("export", str(line_session), "--format", "emd", "-o", str(tmp_path / "x.emd"))
    assert emd.returncode == ExitCode.BAD_INPUT
    assert emd.stderr.strip().splitlines()[-1].endswith("EELS sessions export as hspy (eXSpy EELSSpectrum), not emd")
    missing = _run("export", str(tmp_path / "nope.h5"), "--format", "hspy", "-o", str(tmp_path / "y"))
    assert missing.returncode == ExitCode.BAD_INPUT and "nope.h5: no such file" in missing.stderr


def test_cli_refuses_a_session_without_analysis_and_a_directory(tmp_path: Path) -> None:
    import v1_writer

    raw = tmp_path / "raw.h5"
    v1_writer.write_eels(raw, n_points=3, n_frames=2)
    done = _run("export", str(raw), "--format", "hspy", "-o", str(tmp_path / "x.hspy"))
    assert done.returncode == ExitCode.BAD_INPUT
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stemlive export: {raw}: no /results/eels/sum") and "stemlive replay --analyze" in last
    assert not (tmp_path / "x.hspy").exists()
    folder = _run("export", str(tmp_path), "--format", "hspy", "-o", str(tmp_path / "y.hspy"))
    assert folder.returncode == ExitCode.BAD_INPUT and "Traceback" not in folder.stderr
    assert folder.stderr.strip().splitlines()[-1] == f"stemlive export: {tmp_path}: is a directory, not a session file"


def test_navigation_axes_from_probe_positions() -> None:
    pi = np.repeat(np.arange(4), 2)
    table = {"point_index": pi, "x_nm": np.repeat([0.0, 1.6, 3.2, 4.8], 2), "y_nm": np.zeros(8)}
    (ax,) = export.eels_axes("eels_line_scan", table, np.arange(4))
    assert (ax["name"], ax["offset"], ax["scale"], ax["size"]) == ("position", 0.0, pytest.approx(1.6), 4)
    table["x_nm"] = np.repeat([0.0, 1.0, 3.0, 6.0], 2)  # uneven steps: a non-uniform axis with the distances
    (ax,) = export.eels_axes("eels_line_scan", table, np.arange(4))
    np.testing.assert_allclose(ax["axis"], [0.0, 1.0, 3.0, 6.0])
    table["x_nm"] = np.repeat([0.0, 2.0, 1.0, 3.0], 2)  # back and forth: HyperSpy needs monotonic axes
    (ax,) = export.eels_axes("eels_line_scan", table, np.arange(4))
    assert ax["name"] == "position index" and ax["size"] == 4
    diagonal = {"point_index": pi, "x_nm": np.repeat([0.0, 3.0, 6.0, 9.0], 2), "y_nm": np.repeat([0, 4, 8, 12.0], 2)}
    (ax,) = export.eels_axes("eels_line_scan", diagonal, np.arange(4))
    assert ax["scale"] == pytest.approx(5.0)  # distance along the line, not x
