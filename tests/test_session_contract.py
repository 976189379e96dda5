"""Files of other writers: a v1-minimum file (DESIGN.md fields only) replays and is analysed; files that break
the contract are refused with one line naming the file and the problem, and ExitCode.BAD_INPUT, by every command.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import v1_writer
from commands import STEMLIVE

from stemlive.live.apps.cli import main
from stemlive.live.exitcodes import ExitCode
from stemlive.live.pipeline.problems import problems_in
from stemlive.live.storage.session import SessionFormatError, SessionReader, describe


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------- v1 minimum


def test_v1_minimum_eels_replays_and_is_analysed(tmp_path: Path) -> None:
    src = tmp_path / "independent.h5"
    truth = v1_writer.write_eels(src, n_points=8, n_frames=4, temperature_K=600.0)
    with SessionReader(src) as r:
        assert not r.stored_start and not r.stored_seq and r.n_spectra == 32
        messages = list(r.messages())
    assert [m.type for m in messages[:2]] == ["session_start", "spectrum"] and messages[-1].type == "session_end"
    assert messages[0].header["kind"] == "eels_line_scan" and messages[0].t == v1_writer.T0
    assert [m.seq for m in messages] == list(range(len(messages)))  # row order, no gaps
    assert len(messages) == 1 + 8 + 1  # one batch per probe position
    replayed = np.concatenate([np.atleast_2d(m.payload) for m in messages if m.type == "spectrum"])
    assert replayed.tobytes() == truth["spectra"].tobytes()
    assert "v1 minimum:  session_start rebuilt" in describe(src)

    out = tmp_path / "analysed.h5"
    # a uniform 8-point line has no interface to fit: that one result is missing (exit 4), the rest is there
    assert main(["replay", str(src), "--analyze", str(out)]) == ExitCode.INCOMPLETE
    assert [(p.stage, p.result) for p in problems_in(out)] == [("eels", "interface")]
    with SessionReader(out) as r:
        res = r.results("eels")
        assert r.status == "complete" and r.spectra().shape == (32, 1024)
    temps, errs = res["temperature_K"], res["temperature_err_K"]
    assert temps.shape == (8,) and np.isfinite(temps).all()
    pulls = (temps - 600.0) / errs
    # measured: |T - 600 K| <= 5.1 K, pull RMS 0.67 (an independent model: limits with a margin)
    assert np.abs(temps - 600.0).max() < 15.0 and np.sqrt(np.mean(pulls**2)) < 2.0, (temps, errs)


def test_v1_minimum_map_and_tilt_series(tmp_path: Path) -> None:
    emap = tmp_path / "map.h5"
    v1_writer.write_eels(emap, kind="eels_map", scan_shape=(2, 3), n_frames=2, n_channels=512, dispersion_meV=1.0,
                         offset_meV=-250.0)
    out = tmp_path / "map_analysed.h5"
    assert main(["replay", str(emap), "--analyze", str(out)]) == 0
    with SessionReader(emap) as r:
        assert r.start_header["settings"]["scan_shape"] == [2, 3]  # from /eels scan_shape for the map stage
    with SessionReader(out) as r:
        assert r.results("eels")["temperature_K"].shape == (2, 3)

    tilt = tmp_path / "tilt.h5"
    truth = v1_writer.write_tilt_series(tilt, n_tilts=3, n_frames=2)
    out = tmp_path / "tilt_analysed.h5"
    assert main(["replay", str(tilt), "--analyze", str(out)]) == 0
    with SessionReader(out) as r:
        res = r.results("tilt_series")
        assert res["sums"].shape == (3, 32, 32)
        np.testing.assert_allclose(res["tilt_alpha_deg"], truth["alpha_deg"])
        assert np.asarray(r.frames()).tobytes() == truth["frames"].tobytes()


def test_v1_minimum_replays_to_a_real_service(tmp_path: Path) -> None:
    from stemlive.live.pipeline.service import PipelineService

    src = tmp_path / "independent.h5"
    truth = v1_writer.write_eels(src, n_points=3, n_frames=2, n_channels=512, dispersion_meV=1.0,
                                 offset_meV=-250.0)
    with PipelineService(tmp_path / "svc", {}, frame_endpoint="tcp://127.0.0.1:*",
                         result_endpoint="tcp://127.0.0.1:*") as service:
        done = run("replay", str(src), "--to", service.frame_endpoint)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(f"to {service.frame_endpoint}")
        (recorded,) = service.wait_for_sessions(1, timeout_s=60)
    with SessionReader(recorded) as r:
        assert r.status == "complete" and r.kind == "eels_line_scan" and r.session_id == "independent-eels_line_scan"
        assert np.asarray(r.spectra()).tobytes() == truth["spectra"].tobytes()
        np.testing.assert_array_equal(r.spectrum_table()["point_index"], np.repeat(np.arange(3), 2))
        assert r.results("eels")["temperature_K"].shape == (3,)


def test_recording_file_without_markers_is_read_up_to_the_last_finite_t(tmp_path: Path) -> None:
    path = tmp_path / "crashed.h5"
    v1_writer.write_tilt_series(path, n_tilts=3, n_frames=2, status="recording")
    with h5py.File(path, "r+") as f:
        f["tilt_series/t"][4:] = np.nan  # the other writer died while writing row 4
    with SessionReader(path) as r:
        assert r.n_frames == 4 and [m.type for m in r.messages()] == ["session_start"] + ["frame"] * 4


# ---------------------------------------------------------------------------------------------- malformed files


def _eels(path: Path) -> Path:
    v1_writer.write_eels(path, n_points=3, n_frames=2, n_channels=256, offset_meV=-60.0)
    return path


def _tilt(path: Path) -> Path:
    v1_writer.write_tilt_series(path, n_tilts=2, n_frames=1, size=16)
    return path


def _edit(make: Callable[[Path], Path], change: Callable[[h5py.File], None]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        make(path)
        with h5py.File(path, "r+") as f:
            change(f)
        return path

    return build


def _truncated(path: Path) -> Path:
    _eels(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _set(name: str, value: object, where: str = "/") -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        f[where].attrs[name] = value

    return change


def _delete(name: str, where: str = "/") -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        if name in f[where].attrs:
            del f[where].attrs[name]
        else:
            del f[where][name]

    return change


def _replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        del f[name]
        f[name] = data

    return change


def _zero_spectra(f: h5py.File) -> None:
    del f["eels"]
    f.create_group("eels")


NEGATIVE_POINTS = np.array([0, 0, -1, -1, 2, 2], np.int32)

MALFORMED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda p: p, "no such file"),
    "directory": (lambda p: (p.mkdir(), p)[1], "is a directory"),
    "empty": (lambda p: (p.touch(), p)[1], "empty file (0 bytes)"),
    "truncated": (_truncated, "truncated HDF5 file"),
    "text": (lambda p: (p.write_text("not hdf5\n" * 10), p)[1], "not an HDF5 file"),
    "other_hdf5": (_edit(_eels, _delete("format")), "not a stemlive session file"),
    "newer_version": (_edit(_eels, _set("format_version", 2)), "format_version 2 is newer"),
    "unknown_kind": (_edit(_eels, _set("kind", "spectrum_image")), "kind 'spectrum_image' is not one of"),
    "no_created": (_edit(_eels, _delete("created")), "no root attribute created"),
    "unknown_status": (_edit(_eels, _set("status", "done")), "status 'done' is not one of"),
    "settings_not_json": (_edit(_eels, _set("settings", "{oops")), "settings is not valid JSON"),
    "no_settings": (_edit(_eels, _delete("settings")), "no settings"),
    "tilt_without_alpha": (_edit(_tilt, _delete("alpha_deg", "tilt_series")), "/tilt_series has no alpha_deg"),
    "eels_without_t": (_edit(_eels, _delete("t", "eels")), "/eels has no t dataset"),
    "negative_committed": (_edit(_eels, _set("committed_rows", -3, "eels")), "committed_rows is -3, negative"),
    "committed_beyond_rows": (_edit(_eels, _set("committed_rows", 99, "eels")), "committed_rows is 99, more than"),
    "short_column": (_edit(_eels, _replace("eels/x_nm", np.zeros(4))), "/eels/x_nm has 4 rows, spectra has 6"),
    "spectra_3d": (_edit(_eels, _replace("eels/spectra", np.zeros((6, 2, 256), np.float32))),
                   "/eels/spectra must be (n, n_channels)"),
    "text_spectra": (_edit(_eels, _replace("eels/spectra", np.array([b"a"] * 6))), "/eels/spectra must be"),
    "no_dispersion": (_edit(_eels, _delete("dispersion_meV", "eels")), "/eels has no dispersion_meV"),
    "zero_dispersion": (_edit(_eels, _set("dispersion_meV", 0.0, "eels")),
                        "dispersion_meV is 0, must be a positive number"),
    "negative_point": (_edit(_eels, _replace("eels/point_index", NEGATIVE_POINTS)),
                       "/eels/point_index has a negative value at row 2"),
    "map_without_shape": (_edit(_eels, _set("kind", "eels_map")), "scan_shape None is not [ny, nx]"),
    "nan_angle": (_edit(_tilt, _replace("tilt_series/alpha_deg", np.array([0.0, np.nan]))),
                  "/tilt_series/alpha_deg is not finite at row 1"),
    "data_in_wrong_group": (_edit(_tilt, _set("kind", "eels_line_scan")), "but the data is in /tilt_series"),
    "zero_spectra": (_edit(_eels, _zero_spectra), "no complete spectra"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_give_one_line_and_bad_input(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = MALFORMED[case]
    path = make(tmp_path / f"{case}.h5")
    out = tmp_path / "out.h5"
    for argv in (["info", str(path)], ["replay", str(path), "--analyze", str(out)],
                 ["replay", str(path), "--to", "tcp://127.0.0.1:9"], ["tomo", "export", str(path)]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == ExitCode.BAD_INPUT, (argv, code, err)
        assert len(err) == 1 and err[0].startswith(f"stemlive {argv[0]}: {path}"), (argv, err)
        if argv[0] != "tomo" or case not in {"zero_spectra", "data_in_wrong_group"}:
            assert expected in err[0], (argv, err)
        assert not out.exists()


def test_kinds_of_malformed_files() -> None:
    assert len(MALFORMED) >= 12
    assert issubclass(SessionFormatError, ValueError)


# as a user types them: real processes, the representative cases (the others in the grid run)
SUBPROCESS_CASES = ("missing", "truncated", "tilt_without_alpha", "zero_spectra")
GRID_CASES = ("directory", "empty", "eels_without_t", "negative_committed")


@pytest.mark.parametrize("case", [*SUBPROCESS_CASES, *(pytest.param(c, marks=pytest.mark.grid) for c in GRID_CASES)])
def test_malformed_files_as_a_user_types_them(case: str, tmp_path: Path) -> None:
    make, expected = MALFORMED[case]
    path = make(tmp_path / f"{case}.h5")
    commands = [("info", str(path)), ("replay", str(path), "--analyze", str(tmp_path / "o.h5"))]
    if case in {"missing", "directory", "empty", "truncated"}:
        commands.append(("tomo", "export", str(path)))
    for args in commands:
        proc = run(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == ExitCode.BAD_INPUT, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"stemlive {args[0]}: {path}") and expected in lines[0], lines
    if path.is_dir():
        shutil.rmtree(path)
