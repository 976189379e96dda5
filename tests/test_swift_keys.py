"""``stemlive swift --allow-remote --keys DIR``: the in-process service speaks CURVE, as ``stemlive serve`` does.

A client without the key cannot record into the service ``stemlive swift`` starts; one with the keys in DIR can,
including a client that takes them from ``STEMLIVE_KEYS`` the way Swift's panels and result subscriber do (the
launcher sets it). ``--allow-remote`` without ``--keys`` is refused before Swift starts. The service binds
127.0.0.1 here, with the same CURVE set-up as for a network interface (tests/test_curve.py does the same for
``stemlive serve``); the last test runs the real command under Xvfb (``grid``: Swift takes tens of seconds to start).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zmq
from commands import STEMLIVE

from stemlive.live.apps import cli, launcher
from stemlive.live.wire import transport
from stemlive.live.wire.keys import Curve, create_keys

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE support")

FIELDS = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.1, "dwell_us": 2.0}
IMAGES = [np.arange(256, dtype=np.float32).reshape(16, 16) * (i + 1) for i in range(3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stemlive(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True,
                          timeout=60, env=env or os.environ.copy())


def record(sender: transport.FrameSender, timeout_s: float) -> str:
    stream = transport.SessionStream(sender, "tilt_series", {})
    stream.start()
    for i, image in enumerate(IMAGES):
        stream.frame(image, frame_index=i, **FIELDS)
    stream.end(timeout_s=timeout_s)
    return stream.session_id


def assert_recorded(path: Path, session_id: str) -> None:
    assert session_id in path.name
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert f["tilt_series/frames"][()].tobytes() == np.stack(IMAGES).tobytes()


def test_allow_remote_without_keys_is_refused_before_swift_starts(tmp_path: Path) -> None:
    out = tmp_path / "sessions"
    proc = stemlive("swift", "--allow-remote", "--frames", "tcp://0.0.0.0:7710", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stemlive swift: --allow-remote needs --keys DIR"), proc.stderr
    assert "starting Nion Swift" not in proc.stdout and not out.exists()
    # a keys folder without keys: bad input, one line, still before Swift
    (tmp_path / "empty").mkdir()
    proc = stemlive("swift", "--allow-remote", "--keys", str(tmp_path / "empty"), "--out", str(out))
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such key file" in lines[0] and "stemlive keys DIR" in lines[0], proc.stderr
    assert "starting Nion Swift" not in proc.stdout and not out.exists()


def test_the_service_swift_starts_admits_only_clients_with_the_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    keys = create_keys(tmp_path / "keys")
    out = tmp_path / "sessions"
    # the command line as typed, through the real parser and the launcher functions cmd_swift runs
    args = cli.build_parser().parse_args(["swift", "--allow-remote", "--keys", str(keys), "--frames",
                                          "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*", "--out", str(out)])
    curve = launcher.check_security(args)
    env = launcher.plugin_environment(args)
    assert env["STEMLIVE_KEYS"] == str(keys.resolve())
    service: Any = launcher.start_service(args, env, curve)
    try:
        monkeypatch.delenv("STEMLIVE_KEYS", raising=False)
        with transport.FrameSender(service.frame_endpoint, timeout_s=2, heartbeat_interval_s=0.2) as plain:
            with pytest.raises(transport.TransportError, match="unauthorized: the security handshake failed"):
                record(plain, timeout_s=2)
        assert service.stats.sessions == 0 and not list(out.glob("*.h5"))
        # Swift's panels build their FrameSender without keys: they find them through STEMLIVE_KEYS
        for name, value in env.items():  # what cmd_swift sets before Swift starts (launcher.apply_environment)
            monkeypatch.setenv(name, value)
        with transport.FrameSender(service.frame_endpoint, timeout_s=20) as panel:
            sid = record(panel, timeout_s=20)
        (path,) = service.wait_for_sessions(1)
        assert_recorded(path, sid)
        sub = transport.ResultSubscriber(service.result_endpoint, request_endpoint=service.request_endpoint)
        try:
            sub.sync(timeout_s=5)  # the result side answers the keyed subscriber
        finally:
            sub.close()
    finally:
        service.stop()


@pytest.mark.gui
@pytest.mark.grid
def test_stemlive_swift_allow_remote_keys_as_typed(tmp_path: Path) -> None:
    """The real command under Xvfb: a keyless client is refused, a keyed one records, SIGTERM quits (status 0)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("needs Xvfb (apt-get install xvfb)")
    keys = create_keys(tmp_path / "keys")
    home = tmp_path / "home"
    home.mkdir()
    frames, results = (_free_port() for _ in range(2))
    display = 120
    while Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists():
        display += 1
    xvfb = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM" and not k.startswith("STEMLIVE_")}
    env.update(DISPLAY=f":{display}", HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"))
    proc = subprocess.Popen([*STEMLIVE, "swift", "--allow-remote", "--keys",
                             str(keys), "--frames", f"tcp://127.0.0.1:{frames}", "--results", f"tcp://127.0.0.1:{results}",
                             "--out", str(tmp_path / "sessions")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("stemlive swift: service on"), first
        endpoint = f"tcp://127.0.0.1:{frames}"
        with transport.FrameSender(endpoint, timeout_s=2, heartbeat_interval_s=0.2) as plain:
            with pytest.raises(transport.TransportError, match="unauthorized"):
                record(plain, timeout_s=2)
        with transport.FrameSender(endpoint, timeout_s=30, curve=Curve.client(keys)) as client:
            sid = record(client, timeout_s=30)
        (path,) = (tmp_path / "sessions").glob("*.h5")
        assert_recorded(path, sid)
        time.sleep(5.0)  # let Swift come up: SIGTERM is its Quit from then on
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        xvfb.terminate()
        xvfb.wait(10)
    assert proc.returncode == 0, rest[-3000:]
    ours = [line for line in rest.strip().splitlines() if line.startswith("stemlive swift:")]
    assert ours[-1] == "stemlive swift: Nion Swift has quit; service stopped", rest[-2000:]
