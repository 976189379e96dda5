"""CURVE authentication: keys from `stemlive keys`; only a client with an authorised key can record.

The service is bound to 127.0.0.1 with keys, exactly as `stemlive serve --allow-remote --keys DIR` sets up its
sockets for a network interface (the CURVE set-up does not depend on the address); no other interface is bound.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
from commands import STEMLIVE

from stemlive.live.pipeline.service import PipelineService
from stemlive.live.wire import transport
from stemlive.live.wire.keys import Curve, create_keys

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE support")

FIELDS = {"tilt_index": 0, "alpha_deg": 0.0, "beta_deg": 0.0, "pixel_size_nm": 0.1, "dwell_us": 2.0}


def stemlive(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEMLIVE, *args], capture_output=True, text=True,
                          timeout=60, env=os.environ.copy())


def session(sender: transport.FrameSender, timeout_s: float) -> str:
    stream = transport.SessionStream(sender, "tilt_series", {})
    stream.start()
    for i in range(3):
        stream.frame(np.full((16, 16), i, np.float32), frame_index=i, **FIELDS)
    stream.end(timeout_s=timeout_s)
    return stream.session_id


def test_stemlive_keys_and_remote_serve_without_keys_is_refused(tmp_path: Path) -> None:
    proc = stemlive("keys", str(tmp_path / "keys"))
    assert proc.returncode == 0, proc.stderr
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                 "authorized_clients/client.key"):
        assert (tmp_path / "keys" / name).is_file()
    assert (tmp_path / "keys" / "server.key_secret").stat().st_mode & 0o077 == 0
    again = stemlive("keys", str(tmp_path / "keys"))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr.strip().splitlines()[-1]
    # refused before anything is bound
    refused = stemlive("serve", "--frames", "tcp://0.0.0.0:*", "--allow-remote", "--out", str(tmp_path / "s"))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-remote needs --keys" in lines[0], refused.stderr
    for flag in ("--end-analysis-budget", "--idle-timeout"):  # a negative time: refused in one line, not bound
        bad = stemlive("serve", flag, "-1", "--out", str(tmp_path / "s"))
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
            f"stemlive serve: {flag} must be a number of seconds >= 0, got -1"], bad.stderr
    with pytest.raises(ValueError, match="without CURVE keys"):
        PipelineService(tmp_path, {}, frame_endpoint="tcp://0.0.0.0:*", result_endpoint="tcp://127.0.0.1:*",
                        allow_remote=True, stage_classes={}).start()


def test_only_a_client_with_an_authorised_key_can_record(tmp_path: Path) -> None:
    keys = create_keys(tmp_path / "keys")
    create_keys(tmp_path / "stranger")  # a valid key pair the service does not know
    (tmp_path / "stranger" / "server.key").write_bytes((keys / "server.key").read_bytes())
    out = tmp_path / "sessions"
    svc = PipelineService(out, {}, frame_endpoint="tcp://127.0.0.1:*", result_endpoint="tcp://127.0.0.1:*",
                          stage_classes={}, curve=Curve.server(keys))
    with svc:
        # no key at all: the handshake fails, nothing arrives
        with transport.FrameSender(svc.frame_endpoint, timeout_s=2, heartbeat_interval_s=0.2,
                                   liveness=5) as plain:
            with pytest.raises(transport.TransportError, match="unauthorized: the security handshake failed"):
                session(plain, timeout_s=2)
        # a key pair the service does not admit: refused by the ZAP authenticator
        with transport.FrameSender(svc.frame_endpoint, timeout_s=2, heartbeat_interval_s=0.2,
                                   curve=Curve.client(tmp_path / "stranger")) as unknown:
            with pytest.raises(transport.TransportError, match="unauthorized: the service refused this client's key"):
                session(unknown, timeout_s=2)
        assert svc.stats.sessions == 0 and not list(out.glob("*.h5"))
        # the authorised client records
        with transport.FrameSender(svc.frame_endpoint, timeout_s=20, curve=Curve.client(keys)) as client:
            sid = session(client, timeout_s=20)
        (path,) = svc.wait_for_sessions(1)
        assert sid in path.name
        # results too: the request endpoint answers a client with the key, not one without
        for curve, answers in ((Curve.client(keys), True), (None, False)):
            sub = transport.ResultSubscriber(svc.result_endpoint, curve=curve, request_endpoint=svc.request_endpoint)
            try:
                if answers:
                    sub.sync(timeout_s=5)
                else:
                    with pytest.raises(transport.TransportError, match="no answer"):
                        sub.sync(timeout_s=1)
            finally:
                sub.close()


def test_clients_take_their_keys_from_STEMLIVE_KEYS(tmp_path: Path) -> None:
    """`stemlive replay --to` (like the viewer and the Swift plug-in) speaks CURVE with $STEMLIVE_KEYS set."""
    keys = create_keys(tmp_path / "keys")
    plain = PipelineService(tmp_path / "plain", {}, frame_endpoint="tcp://127.0.0.1:*",
                            result_endpoint="tcp://127.0.0.1:*", stage_classes={})
    with plain, transport.FrameSender(plain.frame_endpoint, timeout_s=20) as sender:
        sid = session(sender, timeout_s=20)
        (source,) = plain.wait_for_sessions(1)
    secured = PipelineService(tmp_path / "secured", {}, frame_endpoint="tcp://127.0.0.1:*",
                              result_endpoint="tcp://127.0.0.1:*", stage_classes={}, curve=Curve.server(keys))
    with secured:
        env = {**os.environ, "STEMLIVE_KEYS": str(keys)}
        proc = subprocess.run([*STEMLIVE, "replay", str(source), "--to",
                               secured.frame_endpoint, "--timeout", "20"], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (copy,) = secured.wait_for_sessions(1)
    assert sid in copy.name
    with h5py.File(source, "r") as a, h5py.File(copy, "r") as b:
        assert b.attrs["status"] == "complete"
        assert a["tilt_series/frames"][()].tobytes() == b["tilt_series/frames"][()].tobytes()
