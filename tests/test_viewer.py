"""Tests of the live viewer: the model over real result sockets, and the Qt window offscreen."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from stemlive.live.apps import viewer, viewer_model, viewer_window
from stemlive.live.pipeline.service import publish_result
from stemlive.live.pipeline.stage import Result
from stemlive.live.wire.protocol import Message, decode, encode
from stemlive.live.wire.transport import ResultPublisher, ResultSubscriber

LOOPBACK = "tcp://127.0.0.1:*"


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def publisher() -> Iterator[ResultPublisher]:
    pub = ResultPublisher(LOOPBACK)
    yield pub
    pub.close()


def connect(pub: ResultPublisher, **kwargs: Any) -> ResultSubscriber:
    """A subscriber that is known to receive (PUB/SUB "slow joiner": ping until one arrives, then drain)."""
    sub = ResultSubscriber(pub.endpoint, **kwargs)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        pub.publish({"session": "warmup", "stage": "warmup", "name": "ping"})
        if sub.recv(timeout_s=0.05) is not None:
            break
    else:
        raise AssertionError("subscriber never received")
    while sub.recv(timeout_s=0.1) is not None:
        pass
    return sub


def drain(model: viewer_model.ViewerModel, sub: ResultSubscriber, expect: int, timeout_s: float = 10.0) -> int:
    """Poll until ``expect`` more results were applied (or the timeout)."""
    n = 0
    deadline = time.monotonic() + timeout_s
    while n < expect and time.monotonic() < deadline:
        got = model.poll(sub)
        n += got
        if not got:
            time.sleep(0.01)
    return n


def fresh_model(sub: ResultSubscriber) -> viewer_model.ViewerModel:
    """A model that ignores the warm-up session."""
    model = viewer_model.ViewerModel()
    model.poll(sub)
    model.sessions.pop("warmup", None)
    model.current = None
    return model


def emit(pub: ResultPublisher, session: str, stage: str, name: str, value: Any, index: int | None = None,
         **attrs: Any) -> None:
    """Publish like the service does (structured arrays as JSON rows)."""
    publish_result(pub, session, Result(stage, name, np.asarray(value), index=index, attrs=attrs))


def message(session: str, stage: str, name: str, value: Any = None, index: int | None = None,
            seq: int = 0, **attrs: Any) -> Message:
    """A decoded result message without sockets (for the window tests)."""
    header: dict[str, Any] = {"type": "result", "session": session, "stage": stage, "name": name, "seq": seq,
                              "t": time.time()}
    if index is not None:
        header["index"] = index
    if attrs:
        header["attrs"] = attrs
    payload = None
    if isinstance(value, list):
        header["value"] = value
    elif value is not None:
        payload = np.ascontiguousarray(value)
    return decode([bytes(p) for p in encode(header, payload)])


def tilt_messages(session: str, n_tilts: int = 3, frames: int = 4, size: int = 64) -> list[Message]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    msgs = []
    row = 0
    for tilt in range(n_tilts):
        for f in range(frames):
            img = (np.sin(xx / 3.0 + f) * np.cos(yy / 4.0) + rng.normal(0, 0.2, (size, size))).astype(np.float32)
            msgs.append(message(session, "tilt_series", "frame_preview", img, index=row, tilt_index=tilt,
                                frame_index=f))
            msgs.append(message(session, "tilt_series", "drift_px", np.array([0.3 * f, -0.2 * f]), index=row))
            row += 1
        msgs.append(message(session, "tilt_series", "sums", (np.cos(xx / 5.0 + tilt) * yy).astype(np.float32),
                            index=tilt))
        msgs.append(message(session, "tilt_series", "tilt_alpha_deg", np.array(10.0 * tilt), index=tilt))
        msgs.append(message(session, "tilt_series", "tilt_beta_deg", np.array(-5.0 * tilt), index=tilt))
    return msgs


def eels_spectrum(x: float, energy: np.ndarray) -> np.ndarray:
    zlp = 1e6 * np.exp(-0.5 * (energy / 8.0) ** 2)
    phonon = 2e3 * (1 + x / 20) * np.exp(-0.5 * ((energy - 110.0) / 10.0) ** 2)
    return (zlp + phonon + 50.0).astype(np.float32)


def eels_messages(session: str, n_points: int = 12, scan_shape: tuple[int, int] | None = None) -> list[Message]:
    energy = np.linspace(-50, 250, 301)
    msgs = [message(session, "eels", "energy_meV", energy)]
    attrs: dict[str, Any] = {"scan_shape": list(scan_shape)} if scan_shape else {}
    for p in range(n_points):
        x = 1.6 * p - 8
        msgs.append(message(session, "eels", "sum", eels_spectrum(x, energy), index=p, x_nm=x, **attrs))
        msgs.append(message(session, "eels", "temperature_K", np.array(300 + 40 * np.tanh(x / 3)), index=p,
                            x_nm=x, **attrs))
        msgs.append(message(session, "eels", "temperature_err_K", np.array(8.0 + p % 3), index=p, **attrs))
    msgs.append(message(session, "eels", "labels", (np.arange(n_points) * 3 // n_points).astype(np.int32)))
    msgs.append(message(session, "eels", "peaks", [
        {"cluster": 0, "centre_meV": 110.2, "centre_err_meV": 0.4, "fwhm_meV": 20.1, "area": 1.5e4},
        {"cluster": 1, "centre_meV": 95.0, "centre_err_meV": 0.6, "fwhm_meV": 18.0, "area": 9.1e3},
    ]))
    return msgs


# ------------------------------------------------------------------------------------------------ model


def test_import_is_cheap() -> None:
    code = ("import sys, stemlive.live.apps.viewer; "
            "bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', 'zmq'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_model_tilt_series_late_join(publisher: ResultPublisher) -> None:
    size = 32
    # The session started before the viewer connected: rows 0..4 are never seen.
    for row in range(5):
        emit(publisher, "S1", "tilt_series", "drift_px", [1.0, 2.0], index=row)
    sub = connect(publisher)
    try:
        model = fresh_model(sub)
        n = 0
        for row in range(5, 10):
            emit(publisher, "S1", "tilt_series", "drift_px", [0.5 * row, -0.25 * row], index=row)
            emit(publisher, "S1", "tilt_series", "frame_preview", np.full((size, size), row, np.float32),
                 index=row, tilt_index=1, frame_index=row - 5)
            n += 2
        emit(publisher, "S1", "tilt_series", "sums", np.ones((size, size), np.float32), index=1, alpha_deg=12.6)
        emit(publisher, "S1", "tilt_series", "tilt_alpha_deg", np.float64(12.6), index=1)
        emit(publisher, "S1", "tilt_series", "tilt_beta_deg", np.float64(-12.6), index=1)
        n += 3
        assert drain(model, sub, n) == n
        view = model.view
        assert view is not None and view.session == "S1" and view.kind == "tilt_series"
        rows, dy, dx = view.drift_trace()
        assert rows.size == 10
        assert np.isnan(dy[:5]).all()  # joined late: a gap, not a loss
        np.testing.assert_allclose(dy[5:], 0.5 * np.arange(5, 10))
        np.testing.assert_allclose(dx[5:], -0.25 * np.arange(5, 10))
        assert view.frame is not None and view.frame[0, 0] == 9
        assert view.frame_attrs == {"tilt_index": 1, "frame_index": 4}
        assert view.tilt_rows() == [1]
        assert view.tilt_label(1) == "tilt 1, alpha 12.6 deg, beta -12.6 deg"
        assert model.dropped == 0 and sub.dropped == 0
        assert "S1" in model.status_text() and "0 dropped" in model.status_text()
    finally:
        sub.close()


def test_model_counts_drops_from_topic_seq_gaps() -> None:
    """A raw PUB socket sends results with topic_seq gaps; the model shows the subscriber's counts."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ResultSubscriber(f"tcp://127.0.0.1:{port}")
    try:
        def send(seq: int, index: int, name: str = "drift_px") -> None:
            header = {"type": "result", "session": "D", "stage": "tilt_series", "name": name, "seq": seq,
                      "topic_seq": index, "t": time.time(), "index": index}
            pub.send_multipart(encode(header, np.array([float(index), 0.0])))

        deadline = time.monotonic() + 10
        while sub.recv(timeout_s=0.05) is None:  # slow joiner: first one received starts the count
            send(0, 0)
            assert time.monotonic() < deadline
        model = viewer_model.ViewerModel()
        for i in (1, 2, 5, 6, 9):  # 3, 4, 7, 8 lost
            send(i, i)
        assert drain(model, sub, 5) == 5
        assert model.dropped == 4 == sub.dropped
        view = model.view
        assert view is not None and view.dropped == 4
        rows, dy, _ = view.drift_trace()
        assert np.isnan(dy[[0, 3, 4, 7, 8]]).all() and dy[9] == 9
        assert "4 dropped" in model.status_text()
    finally:
        sub.close()
        pub.close(linger=0)


def test_model_real_drops_under_flood() -> None:
    """A subscriber that does not read while large results flood in loses some; nothing breaks."""
    publisher = ResultPublisher(LOOPBACK, high_water_mark=4)
    sub = connect(publisher, high_water_mark=2)
    try:
        model = fresh_model(sub)
        big = np.zeros((512, 512), np.float32)
        n = 200
        for i in range(n):
            big[0, 0] = i
            emit(publisher, "F", "tilt_series", "frame_preview", big, index=i)
        # read what survived the flood until the queues are empty; only then can later results get through
        got, quiet_since = 0, time.monotonic()
        while time.monotonic() - quiet_since < 0.5:
            n_read = model.poll(sub)
            got += n_read
            if n_read:
                quiet_since = time.monotonic()
            time.sleep(0.01)
        big[0, 0] = n  # one more preview reveals the gap in the preview topic
        emit(publisher, "F", "tilt_series", "frame_preview", big, index=n)
        emit(publisher, "F", "tilt_series", "drift_px", [0.0, 0.0], index=0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got += model.poll(sub)
            if model.view is not None and 0 in model.view.drift and model.view.frame_index == n:
                break
            time.sleep(0.01)
        view = model.view
        assert view is not None and 0 in view.drift
        assert model.dropped == sub.dropped > 0
        assert got + model.dropped == n + 2
        assert view.frame is not None and view.frame_index == n == int(view.frame[0, 0])
    finally:
        sub.close()
        publisher.close()


def test_model_session_switch_and_late_results(publisher: ResultPublisher) -> None:
    sub = connect(publisher)
    try:
        model = fresh_model(sub)
        emit(publisher, "A", "tilt_series", "drift_px", [1.0, 1.0], index=0)
        assert drain(model, sub, 1) == 1 and model.current == "A"
        energy = np.linspace(-10, 100, 111)
        emit(publisher, "B", "eels", "energy_meV", energy)
        emit(publisher, "B", "eels", "sum", np.ones(111), index=3)
        emit(publisher, "A", "tilt_series", "drift_px", [2.0, 2.0], index=1)  # late result of the old session
        assert drain(model, sub, 3) == 3
        assert model.current == "B" and model.session_switches == 1
        assert len(model.sessions["A"].drift) == 2  # updated, but not shown
        view = model.view
        assert view is not None and view.kind == "eels"
        wf = view.waterfall()
        assert wf is not None and wf.shape == (4, 111) and np.isnan(wf[:3]).all()
        np.testing.assert_array_equal(view.energy_axis(), energy)
        assert "2 sessions seen" in model.status_text()
    finally:
        sub.close()


def test_model_eels_line_scan_out_of_order(publisher: ResultPublisher) -> None:
    sub = connect(publisher)
    try:
        model = fresh_model(sub)
        energy = np.linspace(-50, 250, 301)
        order = [4, 0, 2, 1, 3]  # any order
        for p in order:
            emit(publisher, "L", "eels", "sum", eels_spectrum(p, energy), index=p, x_nm=1.6 * p)
            emit(publisher, "L", "eels", "temperature_K", np.float64(300 + p), index=p, x_nm=1.6 * p)
            if p != 2:
                emit(publisher, "L", "eels", "temperature_err_K", np.float64(5.0), index=p)
        emit(publisher, "L", "eels", "energy_meV", energy)  # the axis may come late
        emit(publisher, "L", "eels", "labels", np.array([0, 0, 1, 1, 2]))
        table = np.array([(0, 110.0, 0.5, 20.0, 1e4)], dtype=[("cluster", "i4"), ("centre_meV", "f8"),
                         ("centre_err_meV", "f8"), ("fwhm_meV", "f8"), ("area", "f8")])
        emit(publisher, "L", "eels", "peaks", table)
        n = 3 * len(order) - 1 + 3
        assert drain(model, sub, n) == n
        view = model.view
        assert view is not None
        x, t, err = view.temperature_profile()
        np.testing.assert_allclose(x, 1.6 * np.arange(5))
        np.testing.assert_allclose(t, 300 + np.arange(5))
        assert np.isnan(err[2]) and err[0] == 5.0
        assert not view.is_map and view.temperature_image() is None
        labels = view.labels_image()
        assert labels is not None and labels.shape == (1, 5)
        assert view.peaks == [{"cluster": 0, "centre_meV": 110.0, "centre_err_meV": 0.5, "fwhm_meV": 20.0,
                               "area": 1e4}]
        assert view.waterfall() is not None and view.waterfall().shape == (5, 301)
    finally:
        sub.close()


def test_model_eels_map(publisher: ResultPublisher) -> None:
    sub = connect(publisher)
    try:
        model = fresh_model(sub)
        ny, nx, nc = 4, 5, 64
        for p in range(0, ny * nx, 2):  # every other point so far
            emit(publisher, "M", "eels", "temperature_K", np.float64(300 + p), index=p, scan_shape=[ny, nx])
        assert drain(model, sub, ny * nx // 2) == ny * nx // 2
        view = model.view
        assert view is not None and view.is_map
        live = view.temperature_image()
        assert live is not None and live.shape == (ny, nx) and live[0, 0] == 300 and np.isnan(live[0, 1])
        # the end of the session: whole datasets
        final = 300.0 + np.arange(ny * nx, dtype=np.float64).reshape(ny, nx)
        emit(publisher, "M", "eels", "temperature_K", final)
        emit(publisher, "M", "eels", "temperature_err_K", np.full((ny, nx), 7.0))
        emit(publisher, "M", "eels", "sum", np.ones((ny, nx, nc), np.float32))
        emit(publisher, "M", "eels", "labels", np.arange(ny * nx) % 3)
        assert drain(model, sub, 4) == 4
        np.testing.assert_array_equal(view.temperature_image(), final)
        err = view.temperature_err_image()
        assert err is not None and err.shape == (ny, nx)
        labels = view.labels_image()
        assert labels is not None and labels.shape == (ny, nx)
        wf = view.waterfall()
        assert wf is not None and wf.shape == (ny * nx, nc)
        assert "4x5 map" in view.summary()
    finally:
        sub.close()


def test_model_ignores_junk() -> None:
    model = viewer_model.ViewerModel()
    assert model.apply(message("X", "tilt_series", "frame_preview", np.zeros(4), index=0)) is not None
    assert model.view is not None and model.view.frame is None  # a 1-D "frame" is ignored
    model.apply(message("X", "eels", "temperature_K", np.zeros(3), index=0))  # not a scalar
    assert model.view.temperature_K == {}
    model.apply(message("X", "tilt_series", "stage_error", np.zeros(0), error="boom"))
    assert model.view.errors == ["tilt_series: boom"]
    model.apply(message("X", "other", "thing", np.zeros(2)))
    assert model.results == 4


def test_subcommand_registers() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    viewer.add_subcommand(sub)
    args = parser.parse_args(["view"])
    assert args.endpoint == viewer.DEFAULT_ENDPOINT and args.func is viewer.cmd_view
    args = parser.parse_args(["view", "tcp://127.0.0.1:9999", "--screenshot", "x.png", "--after", "2"])
    assert args.endpoint == "tcp://127.0.0.1:9999" and args.screenshot == Path("x.png") and args.after == 2.0


# ------------------------------------------------------------------------------------------------ window


@pytest.fixture(scope="module")
def qapp() -> Any:
    pytest.importorskip("pyqtgraph")
    import pyqtgraph as pg

    return pg.mkQApp("stemlive viewer tests")


def _grab(window: Any, qapp: Any, path: Path) -> tuple[int, int, int, float]:
    window.show()
    for _ in range(5):
        qapp.processEvents()
    assert window.grab_png(path)
    return viewer_window.image_stats(path)


def test_window_offscreen_tilt_and_eels(qapp: Any, tmp_path: Path) -> None:
    model = viewer_model.ViewerModel()
    window = viewer_window.make_viewer_window(model)
    try:
        empty = _grab(window, qapp, tmp_path / "empty.png")
        model.apply_all(eels_messages("E1"))
        model.apply_all(tilt_messages("T1"))  # the newer session is shown
        window.refresh()
        w, h, colours, std = _grab(window, qapp, tmp_path / "tilt.png")
        assert w > 200 and h > 200
        assert not viewer_window.is_blank(tmp_path / "tilt.png")
        assert colours > empty[2]  # the images drew something
        assert "session T1" in window.status_label.text()
        assert window.sums_slider.maximum() == 2 and "alpha 20.0 deg" in window.sums_label.text()
        window.sums_slider.setValue(0)
        assert window.sums_label.text().startswith("tilt 0")
        model.apply_all(eels_messages("E2", n_points=20, scan_shape=(4, 5)))
        window.refresh()
        _grab(window, qapp, tmp_path / "map.png")
        assert not viewer_window.is_blank(tmp_path / "map.png")
        assert window.temp_img.isVisible() and window.peaks_table.rowCount() == 2
        assert window.labels_img.image is not None and window.labels_img.image.shape[:2] == (4, 5)
    finally:
        window.dispose()


def test_window_polls_subscriber(qapp: Any, publisher: ResultPublisher, tmp_path: Path) -> None:
    sub = connect(publisher)
    model = fresh_model(sub)
    window = viewer_window.make_viewer_window(model, sub, endpoint=publisher.endpoint)
    try:
        assert window.timer.isActive()
        for msg in eels_messages("P", n_points=8):
            publisher.publish({k: v for k, v in msg.header.items() if k not in ("proto", "type", "seq", "dtype",
                                                                                   "shape", "topic_seq")},
                              None if msg.payload is None else np.array(msg.payload))
        deadline = time.monotonic() + 10
        while (model.view is None or len(model.view.spectra) < 8) and time.monotonic() < deadline:
            qapp.processEvents()
            time.sleep(0.02)
        assert model.view is not None and len(model.view.spectra) == 8
        window.poll()
        _grab(window, qapp, tmp_path / "live.png")
        assert not viewer_window.is_blank(tmp_path / "live.png")
        assert "session P" in window.status_label.text()
    finally:
        window.dispose()
        sub.close()


def test_model_recovers_final_results_missed_by_a_stalled_viewer() -> None:
    """A viewer that stalls while a session ends gets its final results by asking the service again."""
    import threading

    publisher = ResultPublisher(LOOPBACK, high_water_mark=4)
    sub = connect(publisher, high_water_mark=2)
    stop = threading.Event()
    try:
        model = fresh_model(sub)
        energy = np.linspace(-50, 250, 301)
        for p in range(30):
            emit(publisher, "E", "eels", "sum", eels_spectrum(p, energy), index=p, x_nm=float(p))
        big = np.zeros((512, 512), np.float32)
        for _ in range(40):  # the viewer stalls during a flood of 40 MiB: more than every buffer on the way
            emit(publisher, "E", "eels", "cluster_mean", big)
        emit(publisher, "E", "eels", "labels", np.arange(300, dtype=np.int32) % 3)
        emit(publisher, "E", "eels", "peaks", np.array([(0, 110.2), (1, 95.0)],
                                                       dtype=[("cluster", "<i4"), ("centre_meV", "<f8")]))
        server = threading.Thread(target=lambda: [publisher.serve_requests() or time.sleep(0.005)
                                                  for _ in iter(stop.is_set, True)])
        server.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            model.poll(sub)
            view = model.sessions.get("E")
            if view is not None and view.labels is not None and view.peaks:
                break
            time.sleep(0.02)
        view = model.sessions.get("E")
        assert view is not None and view.labels is not None and len(view.labels) == 300
        assert [p["centre_meV"] for p in view.peaks] == [110.2, 95.0]
        assert model.dropped == sub.dropped > 0
        assert model._recovery.recovered >= 2  # labels and peaks came from the request, not the stream
    finally:
        stop.set()
        if "server" in locals():
            server.join()
        sub.close()
        publisher.close()
