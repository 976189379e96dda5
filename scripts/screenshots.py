"""CI smoke test of the GUIs: run a pipeline service, stream a small session into it, and screenshot the viewers.

Steps
-----
1. A display: if ``DISPLAY`` is unset, start ``Xvfb :99`` (when it exists; else Qt's ``offscreen`` platform).
2. A :class:`~stemlive.live.pipeline.service.PipelineService` in this process on random free loopback ports.
3. ``stemlive view`` in a subprocess subscribed to the service's results (``--screenshot``).
4. Sessions into the service: ``stemlive.live.apps.demo.make_demo_sessions(dir, small=True)`` replayed with
   :func:`~stemlive.live.pipeline.replay.replay_to` when that module exists; otherwise a small simulated tilt series
   (HAADF simulator) and EELS line scan (vibrational EELS simulator) streamed through a
   :class:`~stemlive.live.wire.transport.SessionStream`, as live acquisition would.
5. Nion Swift as ``stemlive swift`` starts it (simulated instrument, scenario ``eels_aln_sic``, its own
   in-process service) in a subprocess that runs a tilt series from the Tilt Series panel and an EELS line scan
   from the Vibrational EELS panel, waits until both panels say the analysis has finished, and grabs the window
   with each panel next to its result (a tilt sum in nm per pixel; the temperature profile, T and T +/- sigma).
6. PNGs in ``docs/screenshots/`` (``viewer.png``, ``swift.png``, ``swift-eels.png``).

Exits non-zero if a window did not open, a screenshot is missing or blank, or the viewer received no results.
It is a smoke test: no pixel comparison.

Example::

    .venv/bin/python scripts/screenshots.py            # writes docs/screenshots/{viewer,swift,swift-eels}.png
    .venv/bin/python scripts/screenshots.py --skip-swift --out /tmp/shots
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SWIFT_PNGS = ("swift.png", "swift-eels.png")


def log(text: str) -> None:
    """Progress line on stdout."""
    print(f"[screenshots] {text}", flush=True)


# ------------------------------------------------------------------------------------------------------ display


def ensure_display(env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Make sure Qt has a display: start ``Xvfb :99`` if ``DISPLAY`` is unset. Returns the Xvfb process."""
    if env.get("DISPLAY") or env.get("QT_QPA_PLATFORM") == "offscreen":
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        log("no DISPLAY and no Xvfb (apt-get install xvfb libxcb-cursor0 libxkbcommon-x11-0): "
            "using QT_QPA_PLATFORM=offscreen")
        env["QT_QPA_PLATFORM"] = "offscreen"
        return None
    display = 99
    while Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists():
        display += 1
    proc = subprocess.Popen([xvfb, f":{display}", "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{display}").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"Xvfb :{display} did not start (exit {proc.poll()})")
        time.sleep(0.05)
    env["DISPLAY"] = f":{display}"
    env.pop("QT_QPA_PLATFORM", None)
    log(f"started Xvfb :{display}")
    return proc


def free_port() -> int:
    """A free TCP port on loopback (bound and released; the service binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------------ stages


def stage_classes() -> dict[str, Any] | None:
    """None (the registered stages) when :mod:`stemlive.live.pipeline.registry` exists, else placeholder stages."""
    if importlib.util.find_spec("stemlive.live.pipeline.registry") is not None:
        return None
    log("stemlive.live.pipeline.registry is not available yet: using this script's placeholder preview stages")
    return placeholder_stages()


def placeholder_stages() -> dict[str, Any]:
    """Minimal numpy-only stages emitting the documented result names (drift, previews, sums, spectra, T)."""
    from stemlive.live.pipeline.stage import Result, Stage

    def shift(ref: np.ndarray, img: np.ndarray) -> tuple[float, float]:
        f = np.fft.fft2(img - img.mean()) * np.conj(np.fft.fft2(ref - ref.mean()))
        corr = np.fft.ifft2(f / np.maximum(np.abs(f), 1e-12)).real
        iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
        ny, nx = corr.shape
        return float(iy if iy <= ny // 2 else iy - ny), float(ix if ix <= nx // 2 else ix - nx)

    class TiltPreview(Stage):
        name = "tilt_series"
        kinds = frozenset({"tilt_series"})

        def start(self, start: Any) -> Iterable[Any]:
            self.row, self.tilt, self.ref, self.acc, self.angles = 0, None, None, None, (0.0, 0.0)
            self.tilt_row = -1
            return ()

        def _close_tilt(self) -> list[Any]:
            if self.acc is None:
                return []
            r = self.tilt_row
            return [Result(self.name, "sums", self.acc.astype(np.float32), index=r),
                    Result(self.name, "tilt_alpha_deg", np.asarray(self.angles[0]), index=r),
                    Result(self.name, "tilt_beta_deg", np.asarray(self.angles[1]), index=r)]

        def process(self, msg: Any) -> Iterable[Any]:
            if msg.type != "frame":
                return []
            img = np.asarray(msg.payload, dtype=np.float32)
            h = msg.header
            out = []
            if h["tilt_index"] != self.tilt:
                out += self._close_tilt()
                self.tilt, self.ref, self.acc = h["tilt_index"], img, np.zeros_like(img)
                self.tilt_row += 1
                self.angles = (float(h["alpha_deg"]), float(h["beta_deg"]))
            assert self.ref is not None and self.acc is not None
            dy, dx = shift(self.ref, img)
            self.acc += np.roll(img, (-int(dy), -int(dx)), axis=(0, 1))
            step = max(1, int(np.ceil(max(img.shape) / 256)))
            preview = img[::step, ::step]
            attrs = {"tilt_index": h["tilt_index"], "frame_index": h["frame_index"]}
            out += [Result(self.name, "frame_preview", preview, index=self.row, attrs=attrs, store=False),
                    Result(self.name, "drift_px", np.array([dy, dx]), index=self.row)]
            self.row += 1
            return out

        def finish(self, status: str) -> Iterable[Any]:
            return self._close_tilt()

    class EELSPreview(Stage):
        name = "eels"
        kinds = frozenset({"eels_line_scan", "eels_map"})

        def start(self, start: Any) -> Iterable[Any]:
            self.sums: dict[int, np.ndarray] = {}
            self.energy: np.ndarray | None = None
            return ()

        def _temperature(self, s: np.ndarray) -> tuple[float, float]:
            assert self.energy is not None
            e = self.energy
            loss = (e > 60) & (e < 140)
            gain = np.interp(-e[loss], e, s)
            ratio = np.clip(s[loss] / np.maximum(gain, 1e-9), 1.0 + 1e-6, None)
            t = e[loss] / (0.08617333 * np.log(ratio))
            return float(np.median(t)), float(np.std(t) / np.sqrt(max(t.size / 10, 1)))

        def process(self, msg: Any) -> Iterable[Any]:
            if msg.type != "spectrum":
                return []
            h = msg.header
            spectra = np.atleast_2d(np.asarray(msg.payload, dtype=np.float64))
            points = h["point_index"] if isinstance(h["point_index"], list) else [h["point_index"]]
            xs = h["x_nm"] if isinstance(h["x_nm"], list) else [h["x_nm"]]
            out = []
            if self.energy is None:
                off = h["energy_offset_meV"]
                off = off[0] if isinstance(off, list) else off
                self.energy = off + h["dispersion_meV"] * np.arange(spectra.shape[1])
                out.append(Result(self.name, "energy_meV", self.energy))
            for p, x, s in zip(points, xs, spectra, strict=True):
                self.sums[p] = self.sums.get(p, 0.0) + s
                t, err = self._temperature(self.sums[p])
                out += [Result(self.name, "sum", self.sums[p], index=p, attrs={"x_nm": x}),
                        Result(self.name, "temperature_K", np.asarray(t), index=p, attrs={"x_nm": x}),
                        Result(self.name, "temperature_err_K", np.asarray(err), index=p)]
            return out

        def finish(self, status: str) -> Iterable[Any]:
            if len(self.sums) < 3:
                return []
            keys = sorted(self.sums)
            spectra = np.array([self.sums[k] for k in keys])
            z = np.log(np.maximum(spectra, 1.0))
            z = (z - z.mean(1, keepdims=True)) / np.maximum(z.std(1, keepdims=True), 1e-12)
            pos = np.linspace(0, 1, len(keys))  # placeholder "clusters": left / middle / right thirds
            labels = np.minimum((pos * 3).astype(np.int32), 2)
            rows = np.array([(c, 0.0, 0.0, 0.0, float(z[labels == c].mean())) for c in range(3)],
                            dtype=[("cluster", "i4"), ("centre_meV", "f8"), ("centre_err_meV", "f8"),
                                   ("fwhm_meV", "f8"), ("area", "f8")])
            return [Result(self.name, "labels", labels), Result(self.name, "peaks", rows)]

    return {"tilt_series": TiltPreview, "eels": EELSPreview}


# ------------------------------------------------------------------------------------------------------ data


def stream_simulated(frame_endpoint: str, *, tilts: int, frames: int, size: int, points: int,
                     spectra_per_point: int) -> int:
    """Acquire a small tilt series and EELS line scan from the simulators into the service; returns sessions."""
    from stemlive.live.wire.transport import FrameSender, SessionStream
    from stemlive.simulators.eels_model import VibrationalEELSSimulator
    from stemlive.simulators.haadf import HAADFSimulator
    from stemlive.simulators.scenario import load_scenario

    scenario = load_scenario("default")
    haadf = HAADFSimulator(scenario)
    fov_nm, dwell_us = 8.0, 2.0
    angles = [(0.0, 0.0), (-14.3, -22.9), (20.1, 17.1), (12.6, -12.6), (-6.3, 6.3), (6.3, 6.3)][:tilts]
    with FrameSender(frame_endpoint, timeout_s=30) as sender:
        stream = SessionStream(sender, "tilt_series", {"scenario": "default", "fov_nm": fov_nm, "shape": [size, size],
                                                       "dwell_us": dwell_us, "source": "scripts/screenshots.py"})
        stream.start()
        t0 = 0.0
        for ti, (a, b) in enumerate(angles):
            for fi in range(frames):
                img, _ = haadf.render_frame(alpha_deg=a, beta_deg=b, shape=(size, size), fov_nm=fov_nm,
                                            dwell_us=dwell_us, t_start_s=t0)
                t0 += size * size * dwell_us * 1e-6 * 1.2
                stream.frame(img.astype(np.float32), tilt_index=ti, frame_index=fi, alpha_deg=a, beta_deg=b,
                             pixel_size_nm=fov_nm / size, dwell_us=dwell_us)
        stream.end()
        log(f"tilt series: {tilts} tilts x {frames} frames of {size}^2 px streamed")

        sim = VibrationalEELSSimulator("aln_sic", seed=1)
        n_channels, dispersion, offset, exposure = 512, 0.5, -60.0, 300.0
        x = (np.arange(points) - points / 2) * 1.6
        stream = SessionStream(sender, "eels_line_scan", {"scenario": "aln_sic", "n_points": points,
                                                          "step_nm": 1.6, "source": "scripts/screenshots.py"})
        stream.start()
        for fi in range(spectra_per_point):
            for p in range(points):
                s, _ = sim.spectra(x_nm=x[p], exposure_ms=exposure, n_channels=n_channels,
                                   dispersion_meV=dispersion, energy_offset_meV=offset, t_s=fi * points + p)
                stream.spectra(np.asarray(s, dtype=np.float32).reshape(-1, n_channels)[0], point_index=p,
                               frame_index=fi, x_nm=float(x[p]), y_nm=0.0, energy_offset_meV=offset,
                               dispersion_meV=dispersion, exposure_ms=exposure)
        stream.end()
        log(f"EELS line scan: {points} points x {spectra_per_point} spectra streamed")
    return 2


def send_sessions(frame_endpoint: str, work: Path, args: argparse.Namespace) -> int:
    """Demo sessions replayed (when ``stemlive.live.apps.demo`` exists) or simulated ones streamed; returns sessions."""
    from stemlive.live.pipeline.replay import replay_to

    if args.sessions:
        for path in args.sessions:
            n = replay_to(path, frame_endpoint, speed=args.speed)
            log(f"replayed {path.name}: {n} messages")
        return len(args.sessions)
    try:
        demo = importlib.import_module("stemlive.live.apps.demo")
        make = demo.make_demo_sessions
    except (ImportError, AttributeError):
        log("stemlive.live.apps.demo.make_demo_sessions not available: streaming a small simulated acquisition")
        return stream_simulated(frame_endpoint, tilts=args.tilts, frames=args.frames, size=args.size,
                                points=args.points, spectra_per_point=args.spectra)
    log("making the demo sessions (stemlive.live.apps.demo.make_demo_sessions(small=True))")
    made = make(work / "demo", small=True)
    paths = [Path(p) for p in (made.values() if isinstance(made, dict) else made)]
    for path in paths:
        n = replay_to(path, frame_endpoint, speed=args.speed)
        log(f"replayed {path.name}: {n} messages")
    return len(paths)


# ------------------------------------------------------------------------------------------------------ swift


SWIFT_BOOTSTRAP = r'''
# Nion Swift as `stemlive swift` starts it (simulated instrument, in-process service), driven through the panels:
# a tilt series and an EELS line scan run from the Tilt Series and Vibrational EELS panels; once the panels say the
# analysis has finished, each panel is grabbed next to its result (a tilt sum in nm, the temperature profile).
import os, pathlib, sys, time
from PySide6 import QtCore, QtWidgets
from nionui_app.nionswift import main
from stemlive.live.pipeline.service import PipelineService
from stemlive.live.pipeline.registry import make_params

out_dir, timeout_s = pathlib.Path(sys.argv[1]), float(sys.argv[2])
TILT, EELS = "stemlive-tilt-series-panel", "stemlive-eels-panel"
home = pathlib.Path(os.environ["HOME"])
service = PipelineService(home / "sessions", make_params(overrides=["eels.labels_every=4"]),
                          frame_endpoint=os.environ["STEMLIVE_FRAME_ENDPOINT"],
                          result_endpoint=os.environ["STEMLIVE_RESULT_ENDPOINT"]).start()
app = main.main([], {"qt": None})
state = {"code": 2, "deadline": time.monotonic() + timeout_s}

def say(text):
    print(f"swift: {text}", flush=True)

def finish(code):
    state["code"] = code
    app.exit()
    app.ui.request_quit()

def later(ms, fn):
    def guarded():
        try:
            fn()
        except Exception as e:
            import traceback
            traceback.print_exc()
            say(f"failed: {e!r}")
            finish(6)
    QtCore.QTimer.singleShot(ms, guarded)

def controller():
    return next(dc for dc in app.document_controllers if hasattr(dc, "find_dock_panel"))

def panel(pid):
    p = controller().find_dock_panel(pid)
    if p is None:
        raise RuntimeError(f"panel {pid} is not registered (is the plug-in installed?)")
    return p

def wait(until, then, what):
    if until():
        then()
    elif time.monotonic() > state["deadline"]:
        say(f"timed out waiting for {what}")
        finish(5)
    else:
        later(300, lambda: wait(until, then, what))

def run_tilt_series():
    p = panel(TILT)
    p.show()
    m = p.model
    m.tilts_text = "0, 0\n-14.3, -22.9\n20.1, 17.1\n"
    m.frames_text, m.size_text, m.dwell_text, m.fov_text = "4", "192", "2", "8"
    m.settle_text, m.tracking = "0", False
    if not m.start():
        raise RuntimeError(f"tilt series not started: {m.status_text}")
    say(f"tilt series: {m.status_text}")
    wait(lambda: not m.running, run_eels, "the tilt series")

def run_eels():
    p = panel(EELS)
    p.show()
    m = p.model
    m.start_text, m.end_text, m.step_text, m.points_text = "0.5, 0.1", "0.5, 0.9", "3.2", "21"
    m.frames_text, m.exposure_text = "20", "300"
    m.survey_size_text, m.survey_fov_text, m.survey_after = "128", "80", False
    if not m.start():
        raise RuntimeError(f"EELS not started: {m.status_text}")
    say(f"EELS: {m.status_text}")
    done = lambda: not m.running and "Analysis " in m.status_text and "Analysing" not in m.status_text \
        and "Analysis " in panel(TILT).model.status_text
    wait(done, shoot, "the final results of both sessions")

def show_item(match):
    dc = controller()
    items = [d for d in dc.document_model.data_items if match(d.title or "")]
    if not items:
        raise RuntimeError("no matching data item")
    display_item = dc.document_model.get_display_item_for_data_item(items[-1])
    dc.workspace_controller.display_panels[0].set_display_panel_display_item(display_item)
    return items[-1].title

def grab(name):
    windows = [w for w in QtWidgets.QApplication.topLevelWidgets() if w.isVisible() and w.width() > 200]
    window = max(windows, key=lambda w: w.width() * w.height())
    path = out_dir / name
    if not window.grab().save(str(path), "PNG"):
        raise RuntimeError(f"could not write {path}")
    say(f"wrote {path}")

def shoot():
    for pid in (TILT, EELS):
        say(f"{pid}: " + panel(pid).model.status_text.replace("\n", " | "))
    panel(EELS).hide()
    panel(TILT).show()
    say("showing " + show_item(lambda t: "drift-corrected sum" in t))
    later(1500, lambda: (grab("swift.png"), shoot_eels()))

def shoot_eels():
    panel(TILT).hide()
    panel(EELS).show()
    say("showing " + show_item(lambda t: "temperature profile" in t))
    later(1500, lambda: (grab("swift-eels.png"), finish(0)))

original_start = app.start

def start(*args, **kwargs):
    ok = original_start(*args, **kwargs)
    if not any(hasattr(dc, "find_dock_panel") for dc in app.document_controllers):
        # a fresh profile asks for a project: close that dialog, create one and open it
        for w in QtWidgets.QApplication.topLevelWidgets():
            if w.isVisible() and "Project" in w.windowTitle():
                w.close()
        reference = app.profile.create_project(home / "stemlive-screenshots", "Screenshots")
        app.open_project_window(reference)
    later(2000, run_tilt_series)
    return ok

app.start = start
try:
    app.run()
finally:
    service.stop()
sys.exit(state["code"])
'''


def start_swift(out: Path, env: dict[str, str], timeout_s: float) -> tuple[subprocess.Popen[str], Path]:
    """Start Nion Swift with the simulated instrument and an in-process service in a subprocess that runs a tilt
    series and an EELS line scan from the panels and grabs ``swift.png`` and ``swift-eels.png`` into ``out``."""
    home = Path(tempfile.mkdtemp(prefix="stemlive-swift-home-"))
    swift_env = {k: v for k, v in env.items() if not k.startswith("STEMLIVE_")}
    swift_env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"), XDG_CONFIG_HOME=str(home / ".config"),
                     STEMLIVE_INSTRUMENT="simulated", STEMLIVE_SCENARIO="eels_aln_sic",
                     STEMLIVE_FRAME_ENDPOINT=f"tcp://127.0.0.1:{free_port()}",
                     STEMLIVE_RESULT_ENDPOINT=f"tcp://127.0.0.1:{free_port()}")
    cmd = [sys.executable, "-c", textwrap.dedent(SWIFT_BOOTSTRAP), str(out), str(timeout_s)]
    proc = subprocess.Popen(cmd, env=swift_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, home


def finish_swift(proc: subprocess.Popen[str], home: Path, timeout_s: float) -> tuple[bool, str]:
    """Wait for the Swift subprocess; returns (ok, the tail of its output)."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return False, f"Nion Swift did not finish within {timeout_s:.0f} s:\n{out[-2000:]}"
    finally:
        shutil.rmtree(home, ignore_errors=True)
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("swift:") or "Error" in ln]
    tail = "\n".join(lines[-15:])
    if proc.returncode != 0:
        return False, f"Nion Swift exited {proc.returncode}:\n{tail}\n{out[-3000:]}"
    return True, tail


# ------------------------------------------------------------------------------------------------------ main


def check_png(path: Path) -> str | None:
    """None if ``path`` is a non-blank image, else what is wrong."""
    from stemlive.live.apps.viewer_window import image_stats, is_blank

    if not path.exists():
        return f"{path} was not written"
    w, h, colours, std = image_stats(path)
    if is_blank(path):
        return f"{path} is blank ({w}x{h}, {colours} colours, std {std:.1f})"
    log(f"{path}: {w}x{h}, {colours} colours, grey std {std:.1f}")
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="folder for the PNGs")
    p.add_argument("--sessions", type=Path, nargs="+", help="replay these session files instead of the demo ones")
    p.add_argument("--skip-swift", action="store_true", help="only the stemlive viewer")
    p.add_argument("--tilts", type=int, default=4, help="simulated tilts (default 4)")
    p.add_argument("--frames", type=int, default=5, help="frames per tilt (default 5)")
    p.add_argument("--size", type=int, default=192, help="frame size in px (default 192)")
    p.add_argument("--points", type=int, default=24, help="EELS points (default 24)")
    p.add_argument("--spectra", type=int, default=6, help="spectra per point (default 6)")
    p.add_argument("--speed", type=float, default=float("inf"), help="replay speed of demo sessions (default max)")
    p.add_argument("--viewer-timeout", type=float, default=120.0, help="seconds the viewer may wait at most")
    p.add_argument("--swift-timeout", type=float, default=420.0,
                   help="seconds Swift may take for both runs and their analysis")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the smoke test; returns the exit status."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    xvfb = ensure_display(env)
    os.environ.update({k: v for k, v in env.items() if k in ("DISPLAY", "QT_QPA_PLATFORM")})
    failures: list[str] = []
    viewer_png = args.out / "viewer.png"
    viewer_png.unlink(missing_ok=True)
    try:
        from stemlive.live.pipeline.service import PipelineService

        classes = stage_classes()
        frames_ep = f"tcp://127.0.0.1:{free_port()}"
        results_ep = f"tcp://127.0.0.1:{free_port()}"
        with tempfile.TemporaryDirectory(prefix="stemlive-screenshots-") as tmp:
            work = Path(tmp)
            service = PipelineService(work / "sessions", params={} if classes is not None else None,
                                      frame_endpoint=frames_ep, result_endpoint=results_ep, stage_classes=classes)
            with service:
                log(f"service: frames {frames_ep}, results {results_ep}")
                viewer = subprocess.Popen(
                    [sys.executable, "-m", "stemlive.live.apps.cli", "view", results_ep,
                     "--screenshot", str(viewer_png),
                     "--after", str(args.viewer_timeout), "--idle", "12", "--min-results", "10"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                ) if _cli_has_view() else subprocess.Popen(
                    [sys.executable, "-c", "import sys; from stemlive.live.apps.viewer import run_viewer; "
                     "sys.exit(run_viewer(sys.argv[1], screenshot=sys.argv[2], after_s=float(sys.argv[3]), "
                     "idle_s=3.0, min_results=10))", results_ep, str(viewer_png), str(args.viewer_timeout)],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                time.sleep(3.0)  # window up and subscribed before the first result (PUB/SUB slow joiner)
                if viewer.poll() is not None:
                    failures.append(f"the viewer exited early ({viewer.returncode}):\n{viewer.stdout.read()}")
                else:
                    n = send_sessions(frames_ep, work, args)
                    service.wait_for_sessions(n, timeout_s=120)
                    log(f"{n} sessions recorded and analysed")
                try:
                    out, _ = viewer.communicate(timeout=args.viewer_timeout + 30)
                except subprocess.TimeoutExpired:
                    viewer.kill()
                    out, _ = viewer.communicate()
                    failures.append("the viewer did not exit")
                lines = [ln for ln in out.splitlines() if "propagateSizeHints" not in ln]
                log("viewer: " + "\n  ".join(lines[-8 if viewer.returncode == 0 else -60:]))
                if viewer.returncode != 0:
                    failures.append(f"the viewer exited with status {viewer.returncode}")
                if not args.skip_swift:  # after the viewer: the two would compete for the CPU
                    for name in SWIFT_PNGS:
                        (args.out / name).unlink(missing_ok=True)
                    swift = start_swift(args.out, env, args.swift_timeout)
                    ok, message = finish_swift(*swift, timeout_s=args.swift_timeout + 60)
                    log(f"Swift: {message}")
                    if not ok:
                        failures.append(message)
                    else:
                        for name in SWIFT_PNGS:
                            problem = check_png(args.out / name)
                            if problem:
                                failures.append(problem)
        problem = check_png(viewer_png)
        if problem:
            failures.append(problem)

        if args.skip_swift:
            log("Swift: skipped (--skip-swift)")
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(10)
    for f in failures:
        log(f"FAILED: {f}")
    log("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


def _cli_has_view() -> bool:
    """Whether ``stemlive view`` is registered on the CLI (``apps.viewer`` in ``SUBCOMMAND_MODULES``)."""
    try:
        from stemlive.live.apps import cli
    except ImportError:
        return False
    return "apps.viewer" in getattr(cli, "SUBCOMMAND_MODULES", ())


if __name__ == "__main__":
    sys.exit(main())
