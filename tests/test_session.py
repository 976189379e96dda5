"""Session file v1: writer, reader, replay sequence, describe, format checks and crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from stemlive.live.storage.session import (
    FORMAT_VERSION,
    SessionFormatError,
    SessionReader,
    SessionWriter,
    describe,
    validate,
)
from stemlive.live.wire.protocol import Message, decode, encode

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import helpers_crash_writer as crash  # noqa: E402

T0 = 1.7e9
SID = "s-001"


@dataclass
class FakeResult:
    """Stands in for stemlive.live.pipeline.stage.Result (the writer accepts any object with these attributes)."""

    stage: str
    name: str
    value: np.ndarray
    index: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


class Seq:
    """Builds a protocol-valid message sequence of one session (through encode/decode)."""

    def __init__(self, kind: str, settings: dict[str, Any] | None = None) -> None:
        self.seq = 0
        self.messages: list[Message] = []
        self.add({"type": "session_start", "kind": kind, "settings": settings or {"detector": "HAADF", "n": 3}})

    def add(self, header: dict[str, Any], payload: np.ndarray | None = None) -> Message:
        header = {"session": SID, "seq": self.seq, "t": T0 + 0.25 * self.seq, **header}
        msg = decode(encode(header, payload))
        self.seq += 1
        self.messages.append(msg)
        return msg

    def end(self, status: str = "complete") -> Message:
        return self.add({"type": "session_end", "status": status, "messages": self.seq + 1})


def rng_image(seed: int, shape: tuple[int, int] = (24, 40)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def tilt_session() -> Seq:
    s = Seq("tilt_series")
    s.add({"type": "survey", "which": "before", "pixel_size_nm": 0.1}, rng_image(99, (16, 16)))
    for tilt, alpha in enumerate((-30.0, 0.0)):
        for i in range(3):
            header = {
                "type": "frame",
                "tilt_index": tilt,
                "frame_index": i,
                "alpha_deg": alpha,
                "beta_deg": 1.5,
                "pixel_size_nm": 0.02,
                "dwell_us": 4.0,
            }
            s.add(header, rng_image(10 * tilt + i))
    s.add({"type": "survey", "which": "after", "pixel_size_nm": 0.1}, rng_image(98, (16, 16)))
    return s


def spectrum_header(point: int, frame: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "spectrum",
        "point_index": point,
        "frame_index": frame,
        "x_nm": 1.6 * point,
        "y_nm": 0.0,
        "energy_offset_meV": -0.25 * frame,
        "dispersion_meV": 0.5,
        "exposure_ms": 300.0,
        **extra,
    }


def eels_session(kind: str = "eels_line_scan", n_channels: int = 64) -> Seq:
    settings = {"n_points": 3, "scan_shape": [1, 3]} if kind == "eels_map" else {"n_points": 3}
    s = Seq(kind, settings)
    rng = np.random.default_rng(5)
    for point in range(3):
        # a batch of 4, then two single spectra, per point
        k = 4
        batch = {
            "type": "spectrum",
            "point_index": [point] * k,
            "frame_index": list(range(k)),
            "x_nm": [1.6 * point] * k,
            "y_nm": [0.5] * k,
            "energy_offset_meV": [0.1 * j for j in range(k)],
            "t": [T0 + 10 * point + 0.1 * j for j in range(k)],
            "dispersion_meV": 0.5,
            "exposure_ms": 300.0,
        }
        s.add(batch, rng.random((k, n_channels), dtype=np.float32))
        for frame in (k, k + 1):
            s.add(spectrum_header(point, frame), rng.random(n_channels, dtype=np.float32))
    return s


def record(path: Path, s: Seq, *, close: str | None = "complete", **kw: Any) -> SessionWriter:
    writer = SessionWriter(path, s.messages[0], **kw)
    for msg in s.messages[1:]:
        writer.append(msg)
    if close:
        writer.close(close)
    return writer


def assert_same_messages(replayed: list[Message], original: list[Message]) -> None:
    assert [m.type for m in replayed] == [m.type for m in original]
    for a, b in zip(replayed, original, strict=True):
        assert a.header == b.header, (a.header, b.header)
        if b.payload is None:
            assert a.payload is None
        else:
            assert a.payload is not None
            assert a.payload.shape == b.payload.shape
            assert a.payload.tobytes() == np.ascontiguousarray(b.payload, np.float32).tobytes()


# ---------------------------------------------------------------------------------------------- round trips


def test_tilt_series_round_trip(tmp_path: Path) -> None:
    s = tilt_session()
    path = tmp_path / "tilt.h5"
    with SessionWriter(path, s.messages[0]) as writer:
        for msg in s.messages[1:]:
            writer.append(msg)
        for i in range(6):
            writer.write_result(FakeResult("tilt_series", "drift_px", np.array([0.5 * i, -0.25 * i]), index=i))
        writer.write_result(FakeResult("tilt_series", "sums", np.ones((24, 40), np.float32), index=1))
        writer.write_result(
            FakeResult(
                "tilt_series", "tilt_alpha_deg", np.array([-30.0, 0.0]), attrs={"units": "deg", "tilts": [0, 1], "n": 2}
            )
        )
    assert writer.status == "complete"

    with h5py.File(path, "r") as f:  # plain h5py view of the contract
        assert f.attrs["format"] == "stemlive-session" and f.attrs["format_version"] == 1
        assert f.attrs["kind"] == "tilt_series" and f.attrs["status"] == "complete"
        assert f.attrs["created"] == "2023-11-14T22:13:20+00:00"
        assert json.loads(f.attrs["settings"]) == {"detector": "HAADF", "n": 3}
        frames = f["tilt_series/frames"]
        assert frames.dtype == np.float32 and frames.shape == (6, 24, 40) and frames.chunks == (1, 24, 40)
        for name, dtype in [("tilt_index", "i4"), ("frame_index", "i4"), ("alpha_deg", "f8"), ("t", "f8")]:
            assert f["tilt_series"][name].dtype == np.dtype(dtype) and f["tilt_series"][name].shape == (6,)
        assert frames.attrs["pixel_size_nm"] == 0.02 and f["tilt_series"].attrs["dwell_us"] == 4.0

    with SessionReader(path) as r:
        assert (r.kind, r.status, r.session_id, r.closed) == ("tilt_series", "complete", SID, True)
        assert r.settings == {"detector": "HAADF", "n": 3}
        assert r.n_frames == 6 and r.n_spectra == 0
        frame_msgs = [m for m in s.messages if m.type == "frame"]
        np.testing.assert_array_equal(np.asarray(r.frames()), np.stack([m.payload for m in frame_msgs]))
        np.testing.assert_array_equal(r.frames()[-1], frame_msgs[-1].payload)
        np.testing.assert_array_equal(r.frames()[[3, 1]], np.stack([frame_msgs[3].payload, frame_msgs[1].payload]))
        table = r.frame_table()
        np.testing.assert_array_equal(table["tilt_index"], [0, 0, 0, 1, 1, 1])
        np.testing.assert_array_equal(table["alpha_deg"], [-30, -30, -30, 0, 0, 0])
        np.testing.assert_array_equal(table["seq"], [m.seq for m in frame_msgs])
        np.testing.assert_array_equal(table["t"], [m.t for m in frame_msgs])
        np.testing.assert_array_equal(r.survey("before"), s.messages[1].payload)
        np.testing.assert_array_equal(r.survey("after"), s.messages[-1].payload)
        res = r.results("tilt_series")
        np.testing.assert_array_equal(res["drift_px"], [[0.5 * i, -0.25 * i] for i in range(6)])
        assert res["sums"].shape == (2, 24, 40) and np.isnan(res["sums"][0]).all() and (res["sums"][1] == 1).all()
        attrs = r.result_attrs("tilt_series", "tilt_alpha_deg")
        assert attrs["units"] == "deg" and attrs["n"] == 2 and json.loads(attrs["tilts"]) == [0, 1]
        assert r.time_span == (frame_msgs[0].t, frame_msgs[-1].t)

    text = describe(path)
    for expected in (
        "tilt_series",
        "complete",
        SID,
        "6 x 24 x 40 float32",
        "2 tilts",
        "pixel size 0.02 nm",
        "dwell 4 us",
        "tilt_series/drift_px (6, 2)",
        "1.250 s",
        "file size",
    ):
        assert expected in text, (expected, text)
    assert "NOT CLOSED" not in text


@pytest.mark.parametrize("kind", ["eels_line_scan", "eels_map"])
def test_eels_round_trip_single_and_batched(tmp_path: Path, kind: str) -> None:
    s = eels_session(kind)
    path = tmp_path / "eels.h5"
    writer = record(path, s, close=None)
    peaks = np.array(
        [(0, 55.1, 0.2, 12.0, 3.5), (1, 61.0, 0.4, 9.5, 1.25)],
        dtype=[
            ("cluster", "<i4"),
            ("centre_meV", "<f8"),
            ("centre_err_meV", "<f8"),
            ("fwhm_meV", "<f8"),
            ("area", "<f8"),
        ],
    )
    writer.write_result(FakeResult("eels", "peaks", peaks, attrs={"method": "gauss"}))
    writer.write_result(FakeResult("eels", "labels", np.array([0, 1, 1], np.int32)))
    writer.write_result(FakeResult("eels", "temperature_K", np.array(300.0), index=0))
    writer.write_result(FakeResult("eels", "temperature_K", np.array(320.0), index=2))
    writer.write_result(FakeResult("eels", "labels", np.array([1, 1, 0], np.int32)))  # whole: replaced
    writer.close("complete")

    spectra = [m for m in s.messages if m.type == "spectrum"]
    expected = np.concatenate([np.atleast_2d(m.payload) for m in spectra])
    with SessionReader(path) as r:
        assert r.kind == kind and r.n_spectra == 18 and r.n_frames == 0
        np.testing.assert_array_equal(np.asarray(r.spectra()), expected)
        table = r.spectrum_table()
        np.testing.assert_array_equal(table["point_index"], np.repeat([0, 1, 2], 6))
        np.testing.assert_array_equal(table["frame_index"], np.tile(np.arange(6), 3))
        assert table["seq"].dtype == np.int64 and table["point_index"].dtype == np.int32
        np.testing.assert_array_equal(table["seq"][:5], [1, 1, 1, 1, 2])  # a batch shares its message's seq
        np.testing.assert_allclose(table["t"][:4], [T0 + 0.1 * j for j in range(4)])
        eels_attrs = r.attrs("eels")
        assert eels_attrs["dispersion_meV"] == 0.5 and eels_attrs["exposure_ms"] == 300.0
        assert ("scan_shape" in eels_attrs) == (kind == "eels_map")
        if kind == "eels_map":
            np.testing.assert_array_equal(eels_attrs["scan_shape"], [1, 3])
        res = r.results("eels")
        np.testing.assert_array_equal(res["peaks"], peaks)
        assert res["peaks"].dtype.names == peaks.dtype.names
        np.testing.assert_array_equal(res["labels"], [1, 1, 0])
        np.testing.assert_array_equal(res["temperature_K"], [300.0, np.nan, 320.0])
    text = describe(path)
    assert "18 x 64 float32 (3 points)" in text and "dispersion 0.5 meV/channel" in text
    assert "exposure 300 ms" in text and "eels/peaks (2,)" in text
    assert ("scan shape [1, 3]" in text) == (kind == "eels_map")


def test_spectra_written_in_blocks_and_chunked(tmp_path: Path) -> None:
    s = Seq("eels_line_scan")
    writer = SessionWriter(tmp_path / "blocks.h5", s.messages[0], commit_interval_s=3600)
    data = np.arange(3000 * 2048, dtype=np.float32).reshape(3000, 2048)
    for i in range(3000):
        writer.append(s.add(spectrum_header(i // 100, i % 100), data[i]))
    dataset = writer._spectra.spectra  # white box: what has reached the file so far
    assert dataset is not None
    chunks, written = dataset.chunks, dataset.shape[0]
    assert chunks is not None and 64 <= chunks[0] <= 256 and chunks[1] == 2048
    assert 0 < written < 3000 and written % chunks[0] == 0  # whole blocks so far, the rest buffered
    assert writer.n_spectra == 3000
    writer.close()
    with SessionReader(writer.path) as r:
        np.testing.assert_array_equal(np.asarray(r.spectra()), data)
        np.testing.assert_array_equal(r.spectrum_table()["seq"], np.arange(1, 3001))


# ---------------------------------------------------------------------------------------------- replay


@pytest.mark.parametrize("make", [tilt_session, eels_session])
def test_messages_reproduce_the_wire_sequence(tmp_path: Path, make: Any) -> None:
    s = make()
    s.end("complete")
    record(tmp_path / "a.h5", s)
    with SessionReader(tmp_path / "a.h5") as r:
        replayed = list(r.messages())
        assert r.n_messages == len(s.messages)
    assert_same_messages(replayed, s.messages)


def test_session_end_is_synthesised_when_not_recorded(tmp_path: Path) -> None:
    s = eels_session()
    record(tmp_path / "a.h5", s, close="aborted")
    with SessionReader(tmp_path / "a.h5") as r:
        replayed = list(r.messages())
    assert_same_messages(replayed[:-1], s.messages)
    end = replayed[-1].header
    assert end["type"] == "session_end" and end["status"] == "aborted"
    assert end["seq"] == s.seq and end["messages"] == s.seq + 1
    decode(encode(end))  # protocol-valid


@pytest.mark.parametrize("make", [tilt_session, lambda: eels_session("eels_map")])
def test_replay_into_a_second_file_is_identical(tmp_path: Path, make: Any) -> None:
    s = make()
    s.end()
    record(tmp_path / "a.h5", s)
    with SessionReader(tmp_path / "a.h5") as r:
        messages = list(r.messages())
    second = SessionWriter(tmp_path / "b.h5", messages[0])
    for msg in messages[1:]:
        second.append(msg)
    second.close("complete")
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        for key in (
            "format",
            "format_version",
            "session_id",
            "kind",
            "created",
            "status",
            "settings",
            "session_start",
            "session_end",
            "n_messages",
            "n_frames",
            "n_spectra",
        ):
            assert a.attrs[key] == b.attrs[key], key
        names: list[str] = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert names
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
            assert a[name].dtype == b[name].dtype
            assert {k: str(v) for k, v in a[name].attrs.items()} == {k: str(v) for k, v in b[name].attrs.items()}


# ---------------------------------------------------------------------------------------------- lifecycle


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    s = tilt_session()
    path = tmp_path / "x.h5"
    record(path, s)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        SessionWriter(path, s.messages[0])
    assert path.read_bytes() == before


def test_exception_in_with_block_closes_as_failed(tmp_path: Path) -> None:
    s = tilt_session()
    with pytest.raises(RuntimeError, match="boom"), SessionWriter(tmp_path / "f.h5", s.messages[0]) as writer:
        writer.append(s.messages[2])
        raise RuntimeError("boom")
    with SessionReader(tmp_path / "f.h5") as r:
        assert r.status == "failed" and r.closed and "boom" in r.message and r.n_frames == 1


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    s = tilt_session()
    writer = record(tmp_path / "c.h5", s, close=None)
    writer.close("aborted", gaps=[(3, 4)], message="operator stopped")
    writer.close("complete")  # no effect
    with pytest.raises(ValueError, match="closed"):
        writer.append(s.messages[2])
    with SessionReader(tmp_path / "c.h5") as r:
        assert r.status == "aborted" and r.message == "operator stopped" and r.gaps == [[3, 4]]
        assert r.closed_at is not None and r.file.attrs["n_messages"] == len(s.messages)
    with pytest.raises(ValueError, match="status"):
        record(tmp_path / "d.h5", s, close=None).close("done")


def test_rejects_bad_input(tmp_path: Path) -> None:
    s = tilt_session()
    with pytest.raises(ValueError, match="session_start"):
        SessionWriter(tmp_path / "n.h5", s.messages[1])
    writer = SessionWriter(tmp_path / "w.h5", s.messages[0])
    writer.append(s.messages[2])
    other = decode(encode({**s.messages[3].header, "seq": 50}, rng_image(1, (8, 8))))
    with pytest.raises(ValueError, match="shape"):
        writer.append(other)
    with pytest.raises(ValueError, match="session"):
        writer.append(Message({**s.messages[3].header, "session": "other"}, s.messages[3].payload))
    with pytest.raises(ValueError, match="result name"):
        writer.write_result(FakeResult("eels", "a/../b", np.zeros(2)))
    with pytest.raises(ValueError, match="result stage"):
        writer.write_result(FakeResult("", "x", np.zeros(2)))
    writer.write_result(FakeResult("eels", "fits/zlp", np.arange(3.0)))  # nested names are allowed
    writer.close()
    with SessionReader(writer.path) as r:
        np.testing.assert_array_equal(r.results("eels")["fits/zlp"], np.arange(3.0))
        assert r.result_names() == {"eels": {"fits/zlp": (3,)}}


# ---------------------------------------------------------------------------------------------- format checks


def test_other_files_are_refused_clearly(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(SessionFormatError, match="not a stemlive session file"):
        validate(plain)
    with pytest.raises(SessionFormatError, match="not a stemlive session file"):
        SessionReader(plain)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(SessionFormatError, match="not a stemlive session file"):
        describe(text)

    newer = tmp_path / "newer.h5"
    record(newer, tilt_session())
    assert validate(newer) == FORMAT_VERSION
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(SessionFormatError, match="format_version 2 is newer than this reader supports"):
        describe(newer)


def test_reader_trims_uncommitted_and_unfinished_rows(tmp_path: Path) -> None:
    s = tilt_session()
    path = tmp_path / "r.h5"
    writer = SessionWriter(path, s.messages[0], commit_interval_s=3600)
    frames = [m for m in s.messages if m.type == "frame"]
    for m in frames[:4]:
        writer.append(m)
    writer.commit()
    for m in frames[4:]:
        writer.append(m)  # frame data on disk, rows not committed
    writer._frames.write()  # even the metadata rows written and flushed: killed just before committed_rows moved
    writer._f.flush()
    writer._f.close()  # simulate the writer vanishing: no commit, no close, status stays "recording"
    with h5py.File(path, "r") as f:
        assert f["tilt_series/frames"].shape[0] == 6 and f["tilt_series/t"].shape[0] == 6

    with SessionReader(path) as r:
        assert r.status == "recording" and not r.closed and r.n_frames == 4
        assert r.frames().shape == (4, 24, 40)
        with pytest.raises(IndexError):
            r.frames()[4]
        assert [m.type for m in r.messages()] == ["session_start"] + ["frame"] * 4  # no session_end
    assert "NOT CLOSED: writer stopped while recording; 4 complete frames" in describe(path)

    with h5py.File(path, "r+") as f:  # a committed count beyond a row whose t never got written
        f["tilt_series"].attrs["committed_rows"] = 6
        f["tilt_series/t"].resize((6,))
        f["tilt_series/t"][2] = np.nan
    with SessionReader(path) as r:
        assert r.n_frames == 2


# ---------------------------------------------------------------------------------------------- crash safety


def _run_and_kill(path: Path, mode: str, delay_s: float) -> list[int]:
    """Start the writer subprocess, SIGKILL it ``delay_s`` after it is ready; the durable counts it printed."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "helpers_crash_writer.py"), str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "ready", first + (proc.stderr.read() if proc.stderr else "")
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith(mode)]


def test_frames_survive_sigkill_at_random_moments(tmp_path: Path) -> None:
    rng = np.random.default_rng(20240501)
    for k, delay in enumerate([0.0, *rng.uniform(0.02, 0.5, size=4)]):
        path = tmp_path / f"kill{k}.h5"
        committed = _run_and_kill(path, "frames", float(delay))
        durable = committed[-1] if committed else 0
        with h5py.File(path, "r") as f:  # plain h5py opens the killed writer's file
            assert f.attrs["status"] == "recording"
        with SessionReader(path) as r:
            assert r.n_frames >= durable, (delay, r.n_frames, durable)
            frames = r.frames()
            table = r.frame_table()
            for i in range(r.n_frames):  # every row reported complete is bit-identical, not only the printed ones
                assert frames[i].tobytes() == crash.frame_image(i).tobytes(), (delay, i)
            np.testing.assert_array_equal(table["seq"], np.arange(1, r.n_frames + 1))
            np.testing.assert_array_equal(table["t"], T0 + np.arange(r.n_frames))
            n = r.n_frames
        assert f"NOT CLOSED: writer stopped while recording; {n} complete frames recovered" in describe(path)


def test_spectra_survive_sigkill_during_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for k, delay in enumerate(rng.uniform(0.02, 0.35, size=3)):
        path = tmp_path / f"spec{k}.h5"
        committed = _run_and_kill(path, "spectra", float(delay))
        durable = committed[-1] if committed else 0
        with SessionReader(path) as r:
            n = r.n_spectra
            assert n >= durable and n % crash.BATCH == 0, (delay, n, durable)
            assert np.asarray(r.spectra()).tobytes() == crash.spectrum_block(0, n).tobytes()
            table = r.spectrum_table()
            rows = np.arange(n)
            np.testing.assert_array_equal(table["point_index"], rows // 200)
            np.testing.assert_array_equal(table["seq"], rows // crash.BATCH + 1)
            np.testing.assert_array_equal(table["t"], T0 + rows * 1e-3)
            assert sum(1 for m in r.messages() if m.type == "spectrum") == n // crash.BATCH
        assert "NOT CLOSED" in describe(path)


def test_held_frames_make_the_same_file(tmp_path: Path) -> None:
    """``hold_frames`` (the service writes a burst of frames together) changes when chunks are written, not the
    file: the same frames, rows, chunks (one per frame, unfiltered, same bytes) and committed rows."""
    s = tilt_session()
    paths = []
    for hold in (0, 4):
        path = tmp_path / f"hold{hold}.h5"
        writer = SessionWriter(path, s.messages[0], hold_frames=hold)
        for i, msg in enumerate(s.messages[1:]):
            writer.append(msg)
            if hold and i == 2:
                writer.write_held()
        if hold:
            assert writer._frames.held, "frames are held until written"
            writer.commit()
            assert not writer._frames.held
        writer.close("complete")
        paths.append(path)
    with h5py.File(paths[0], "r") as a, h5py.File(paths[1], "r") as b:
        fa, fb = a["tilt_series/frames"], b["tilt_series/frames"]
        assert fa.shape == fb.shape == (6, 24, 40) and fa.chunks == fb.chunks == (1, 24, 40)
        assert fa.compression is None and fb.compression is None
        assert fa.id.get_num_chunks() == fb.id.get_num_chunks() == 6
        for i in range(6):
            ca, cb = fa.id.read_direct_chunk((i, 0, 0)), fb.id.read_direct_chunk((i, 0, 0))
            assert ca[0] == cb[0] == 0 and ca[1] == cb[1] == s.messages[1 + 1 + i].payload.tobytes()
        for name in ("tilt_index", "frame_index", "alpha_deg", "beta_deg", "t", "seq"):
            if name in a["tilt_series"]:
                assert np.array_equal(a["tilt_series"][name][()], b["tilt_series"][name][()])
        assert dict(a["tilt_series"].attrs) == dict(b["tilt_series"].attrs)
    ra, rb = SessionReader(paths[0]), SessionReader(paths[1])
    assert_same_messages(list(rb.messages()), list(ra.messages()))
