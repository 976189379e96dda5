"""The GUI as a user starts it: ``stemlive swift`` under Xvfb, and the screenshot script (into ``tmp_path``; a
``grid`` test, run after the default suite).

``stemlive swift`` is run exactly as the README types it, as a subprocess with a fresh home folder: its window must
appear (a fresh profile shows Swift's "Choose Project" dialog), the in-process service must still take connections
then, and SIGTERM -- which ``stemlive swift`` turns into Swift's own quit -- must end the process with status 0 in
a bounded time. Needs ``Xvfb`` and ``xwininfo`` (``bootstrap.sh test`` installs both as root); skipped without.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def xvfb_display() -> Iterator[str]:
    """A private Xvfb display (skips without Xvfb or xwininfo)."""
    if shutil.which("Xvfb") is None or shutil.which("xwininfo") is None:
        pytest.skip("needs Xvfb and xwininfo (apt-get install xvfb x11-utils)")
    display = 90
    while Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists():
        display += 1
    proc = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{display}").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.05)
    try:
        yield f":{display}"
    finally:
        proc.terminate()
        proc.wait(10)


def _windows(display: str) -> list[tuple[str, int, int]]:
    """(title, width, height) of the named top-level windows on ``display``."""
    out = subprocess.run(["xwininfo", "-root", "-tree"], capture_output=True, text=True,
                         env=dict(os.environ, DISPLAY=display), timeout=10).stdout
    found = []
    for line in out.splitlines():
        if '"' not in line or "has no name" in line:
            continue
        title = line.split('"')[1]
        geometry = line.rsplit(")", 1)[-1].split()
        size = geometry[0].split("+")[0] if geometry else "0x0"
        w, h = (int(v) for v in size.split("x"))
        found.append((title, w, h))
    return found


def test_stemlive_swift_opens_a_window_and_ends_when_swift_quits(xvfb_display: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    frames, results = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM",) and not k.startswith("STEMLIVE_")}
    env.update(DISPLAY=xvfb_display, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"))
    stemlive = shutil.which("stemlive", path=os.path.dirname(sys.executable)) or "stemlive"
    # the README's command; only the ports differ so that parallel runs do not collide
    proc = subprocess.Popen([stemlive, "swift", "--frames", f"tcp://127.0.0.1:{frames}",
                             "--results", f"tcp://127.0.0.1:{results}", "--out", str(tmp_path / "sessions")],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        windows: list[tuple[str, int, int]] = []
        while time.monotonic() < deadline and proc.poll() is None:
            windows = [w for w in _windows(xvfb_display) if w[1] > 100 and w[2] > 100]
            if windows:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"stemlive swift ended before a window opened:\n{proc.communicate()[0][-3000:]}"
        assert windows, "no Swift window within 120 s"
        titles = [w[0] for w in windows]
        assert any(t in ("Choose Project", "Nion Swift") or t.startswith("Nion Swift") for t in titles), titles
        time.sleep(3.0)  # the old launcher's service stopped about 2 s after start: it must still listen now
        with socket.create_connection(("127.0.0.1", frames), timeout=5):
            pass
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # handled as Swift's Quit
        out, _ = proc.communicate(timeout=60)
        quit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert quit_s < 30, f"quitting took {quit_s:.1f} s"
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("stemlive swift:")]
    assert lines[-1] == "stemlive swift: Nion Swift has quit; service stopped", out[-2000:]
    with pytest.raises(OSError):  # the service's sockets are closed with it
        socket.create_connection(("127.0.0.1", frames), timeout=2).close()


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM" and not k.startswith("STEMLIVE_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"))
    return env


def test_the_installed_plugin_is_listed_by_swift_and_is_this_checkout(tmp_path: Path) -> None:
    """Swift lists plug-ins with ``pkgutil.iter_modules(nionswift_plugin.__path__)`` (PlugInManager.load_plug_ins):
    the install (the README's ``bootstrap.sh``, i.e. a strict editable install, or ``pip install .``) must put a
    listable ``nionswift_plugin/stemlive`` folder there, with this checkout's code behind it."""
    code = ("import os, pkgutil, nionswift_plugin; "
            "names = [m.name for m in pkgutil.iter_modules(list(nionswift_plugin.__path__))]; "
            "import nionswift_plugin.stemlive as p; "
            "print('stemlive' in names, os.path.realpath(p.__file__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_clean_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    listed, path = out.stdout.split()
    assert listed == "True", "Swift's plug-in scan does not list nionswift_plugin.stemlive"
    assert Path(path) == (ROOT / "plugin" / "__init__.py").resolve(), path


def test_plain_nionswift_loads_the_panels_but_not_the_simulator(xvfb_display: str, tmp_path: Path) -> None:
    """Nion Swift started the way Nion documents it for PySide6 (``python -m nionswift --ui qt``; the ``nionswift``
    console script of nionswift 16.16.2 passes ``{"pyqt": None}``, which nionui 10.2.2 rejects, so it cannot start
    any Swift), with no stemlive settings: the panels load, the simulator does not."""
    env = dict(_clean_env(tmp_path), DISPLAY=xvfb_display)
    proc = subprocess.Popen([sys.executable, "-m", "nionswift", "--ui", "qt"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(w[1] > 100 and w[2] > 100 for w in _windows(xvfb_display)):
                break
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        proc.terminate()  # a plain nionswift has no quit-on-signal: its exit status is not ours to test
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "Plug-in 'nionswift_plugin.stemlive' initialized" in out, out[-3000:]
    assert "stemlive: could not register the panels" not in out
    assert "stemlive_scan" not in out and "simulated instrument registered" not in out, \
        "a plain Swift registered the stemlive simulator"
    assert "usim_scan_device" in out  # Nion's simulator is the instrument of a plain Swift here


@pytest.mark.grid  # several minutes (demo sessions, the viewer, two acquisitions in Swift): after the default suite
def test_screenshots_of_swift_and_the_viewer_during_a_replay(tmp_path: Path) -> None:
    out = tmp_path / "screenshots"
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}  # a real (virtual) display if any
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from PIL import Image

    assert "Analysis complete" in proc.stdout, proc.stdout[-3000:]  # the panels said the final results are in
    for name in ("viewer.png", "swift.png", "swift-eels.png"):
        path = out / name
        assert path.exists(), f"{name} was not written"
        image = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        assert image.shape[0] > 200 and image.shape[1] > 300, f"{name} is only {image.shape}"
        assert image.std() > 5.0, f"{name} looks blank (grey-level std {image.std():.1f})"
