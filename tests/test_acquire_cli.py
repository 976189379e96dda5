"""``stemlive acquire`` as a user types it (a real subprocess): exit code, one-line refusals, the path last.

The command loads the installed Swift plug-ins (usim among them) and runs Swift's instrumentation layer headless.
Each run works in tmp_path (nothing is written into the source tree or the working directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest
from commands import STEMLIVE

pytestmark = [pytest.mark.swift]

pytest.importorskip("nion.usim_device")
pytest.importorskip("nion.swift")

EELS_LINE_USIM = ["--set", "points=4", "--set", "step_nm=null", "--set", "frames_per_point=5", "--set",
                  "exposure_ms=0.2", "--set", "survey_size_px=128"]


def stemlive(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def test_eels_line_on_usim(tmp_path: Path) -> None:
    proc = stemlive("acquire", "eels-line", "--instrument", "usim", *EELS_LINE_USIM, "--out", str(tmp_path / "out"),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    path = Path(lines[-1])
    assert path.is_file() and path.parent == (tmp_path / "out").resolve()
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete" and f.attrs["kind"] == "eels_line_scan"
        assert f["eels/spectra"].shape[0] == 20
        assert float(f["eels"].attrs["dispersion_meV"]) == pytest.approx(1000.0)  # usim's 1 eV per channel
    assert "Traceback" not in proc.stdout
    # usim's 1 eV channels leave no temperature: the reason is printed (stored as an analysis problem)
    reasons = [line for line in lines[:-1] if line.startswith("eels/temperature")]
    assert len(reasons) == 1 and ("skipped" in reasons[0] or "failed" in reasons[0]), lines


def test_eels_line_on_the_stemlive_simulator(tmp_path: Path) -> None:
    proc = stemlive("acquire", "eels-line", "--instrument", "stemlive", "--scenario", "eels_mos2_wse2",
                    "--set", "points=4", "--set", "step_nm=null", "--set", "frames_per_point=5",
                    "--set", "exposure_ms=50", "--set", "survey_size_px=128", "--out", str(tmp_path / "out"),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert f["eels/spectra"].shape[0] == 20
        assert float(f["eels"].attrs["dispersion_meV"]) == pytest.approx(0.44, rel=0.2)


def test_tilt_series_on_usim_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = stemlive("acquire", "tilt-series", "--instrument", "usim", "--set", "tilts_deg=[[0,0],[10,0],[-10,0]]",
                    "--set", "frames_per_tilt=3", "--set", "size_px=64", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("stemlive acquire: plan refused:") and "StageOutA/StageOutB" in line
    assert "Traceback" not in proc.stderr and "RuntimeError" not in line
    assert not list((tmp_path / "out").glob("*.h5"))


def test_unknown_plan_setting_and_instrument_are_refused(tmp_path: Path) -> None:
    proc = stemlive("acquire", "eels-line", "--instrument", "usim", "--set", "frames=5", "--out", str(tmp_path),
                    cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "unknown plan setting frames" in line and "frames_per_point" in line


def test_ctrl_c_ends_the_session_as_aborted(tmp_path: Path) -> None:
    # the stemlive simulator in real time: 40 points x 20 spectra x 50 ms would take a minute
    proc = subprocess.Popen(
        [*STEMLIVE, "acquire", "eels-line", "--instrument", "stemlive",
         "--scenario", "realtime", "--set", "points=40", "--set", "step_nm=null", "--set", "frames_per_point=20",
         "--set", "exposure_ms=50", "--set", "survey_size_px=64", "--out", str(tmp_path / "out")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed after the Check, as the acquisition starts
        assert first.startswith("stemlive acquire: eels-line on stemlive_stem_controller"), first
        deadline = time.monotonic() + 60
        while not list((tmp_path / "out").glob("*.h5")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    path = Path(out.strip().splitlines()[-1])
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "aborted"
        assert 0 < f["eels/spectra"].shape[0] < 800
    assert "Traceback" not in err


def test_instrument_failure_exits_5(tmp_path: Path) -> None:
    # the simulated stage cannot confirm a move within 1 us: the instrument fails Check's test move
    proc = stemlive("acquire", "tilt-series", "--instrument", "stemlive", "--scenario", "default",
                    "--set", "tilts_deg=[[0,0],[10,0]]", "--set", "size_px=64", "--set", "confirm_timeout_s=1e-6",
                    "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "the stage did not confirm StageOutA" in line and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.h5"))
