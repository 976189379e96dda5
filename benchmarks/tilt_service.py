"""Does the live service keep up with a tilt series arriving at 10 frames/s (512x512 float32)?

Streams simulated HAADF frames (with the scenario's drift) to a real :class:`PipelineService` running the real
tilt-series stage, paced at ``--rate`` frames per second, and measures for every frame the latency from its
send to the arrival of its ``drift_px`` result on the result stream. The service keeps up when the latency stays
flat (no growing backlog) and well below the frame interval.

    .venv/bin/python benchmarks/tilt_service.py [--rate 10] [--tilts 3] [--frames 10] [--size 512]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from stemlive.live.pipeline.registry import make_params
from stemlive.live.pipeline.service import PipelineService
from stemlive.live.wire import transport
from stemlive.simulators.haadf import HAADFSimulator
from stemlive.simulators.scenario import load_scenario


def render(n_tilts: int, n_frames: int, size: int) -> list[tuple[int, int, np.ndarray, float]]:
    sim = HAADFSimulator(load_scenario("default"))
    fov = size * 0.032
    out, t = [], 0.0
    for tilt in range(n_tilts):
        for frame in range(n_frames):
            image, truth = sim.render_frame(alpha_deg=0.0, beta_deg=0.0, shape=(size, size), fov_nm=fov,
                                            dwell_us=4.0, t_start_s=t)
            out.append((tilt, frame, image, t))
            t = truth.t_end_s
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=10.0, help="frames per second sent (default 10)")
    p.add_argument("--tilts", type=int, default=3)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()

    frames = render(args.tilts, args.frames, args.size)
    arrived: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, PipelineService(
        Path(tmp), make_params(), frame_endpoint="tcp://127.0.0.1:*", result_endpoint="tcp://127.0.0.1:*"
    ) as service:
        subscriber = transport.ResultSubscriber(service.result_endpoint, topics=["tilt_series/drift_px"])
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                msg = subscriber.recv(timeout_s=0.1)
                if msg is not None and msg.header.get("index") is not None:
                    arrived.setdefault(int(msg.header["index"]), time.perf_counter())

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        time.sleep(0.3)
        sent: list[float] = []
        with transport.FrameSender(service.frame_endpoint) as sender:
            stream = transport.SessionStream(sender, "tilt_series", {"benchmark": "tilt_service"})
            stream.start()
            t0 = time.perf_counter()
            for i, (tilt, frame, image, t_sim) in enumerate(frames):
                due = t0 + i / args.rate
                time.sleep(max(0.0, due - time.perf_counter()))
                sent.append(time.perf_counter())
                stream.frame(image, t=1.7e9 + t_sim, tilt_index=tilt, alpha_deg=0.0, beta_deg=0.0,
                             frame_index=frame, pixel_size_nm=0.032, dwell_us=4.0)
            stream.end("complete")
        service.wait_for_sessions(1, timeout_s=120)
        time.sleep(0.5)
        stop.set()
        listener.join()
        subscriber.close()

    latency = np.array([arrived[i] - sent[i] for i in range(len(sent)) if i in arrived]) * 1e3
    n = len(sent)
    half = latency[: len(latency) // 2], latency[len(latency) // 2:]
    interval_ms = 1e3 / args.rate
    print(f"tilt-series service, {args.size}x{args.size} float32 frames sent at {args.rate:g} frames/s "
          f"({args.tilts} tilts x {args.frames} frames)")
    print(f"  results received for {len(latency)}/{n} frames")
    print(f"  latency send -> drift result: median {np.median(latency):.1f} ms, 95th percentile "
          f"{np.percentile(latency, 95):.1f} ms, max {latency.max():.1f} ms (frame interval {interval_ms:.0f} ms)")
    print(f"  backlog trend: median latency first half {np.median(half[0]):.1f} ms, second half "
          f"{np.median(half[1]):.1f} ms")
    keeps_up = (len(latency) == n and np.median(half[1]) < interval_ms
                and np.median(half[1]) < 2 * np.median(half[0]) + 20)
    print(f"  keeps up with {args.rate:g} frames/s: {'yes' if keeps_up else 'NO'}")


if __name__ == "__main__":
    main()
