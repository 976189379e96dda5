"""Receive-thread CPU per 512x512 frame: the bare recorder vs `stemlive serve`, outside their chunk writes.

Run ``python benchmarks/wire_profile.py [--rounds 3] [--frames 1000] [--transport tcp] [--dir /dev/shm]``.
The sender is the one of ``benchmarks/wire.py`` (its own process). In the receiving process the CPU time of the
one thread that receives and records (``time.thread_time_ns``) is split into the chunk writes (``set_extent`` +
``write_direct_chunk``: the same for both) and everything else (receiving, decoding, validation, bookkeeping,
commits): the per-message cost of the recorder's own Python, which does not depend much on the machine's load,
unlike the wall-time ratios of ``wire.py``. Rounds alternate bare / service. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).parent))
import wire  # noqa: E402


def bare(case: wire.Case, tmp: Path) -> tuple[float, float, float]:
    """The bare recorder with the service's queue bounds: (frames/s, thread CPU us/frame, of it writes)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, wire.SERVICE_RCVHWM)
    record = wire.BareRecorder(tmp / "bare.h5")
    proc = wire._start_sender(case, wire._bind(sock, case.transport, tmp), tmp)
    record(sock.recv(copy=False).buffer)
    writes = 0
    t0, w0 = time.thread_time_ns(), time.perf_counter()
    for _ in range(case.messages - 1):
        frame = sock.recv(copy=False)
        a = time.thread_time_ns()
        record(frame.buffer)
        writes += time.thread_time_ns() - a
    total, elapsed = time.thread_time_ns() - t0, time.perf_counter() - w0
    record.close()
    sock.close(linger=0)
    ctx.term()
    proc.join(60)
    n = case.messages - 1
    return n / elapsed, total / n / 1e3, writes / n / 1e3


def service(case: wire.Case, tmp: Path) -> tuple[float, float, float]:
    """`PipelineService` without stages: (frames/s, receive-thread CPU us/frame, of it chunk writes)."""
    from stemlive.live.pipeline.service import PipelineService
    from stemlive.live.storage import session_layout

    writes = [0]
    write_held = session_layout.FrameStore.write_held

    def timed(self: Any) -> None:
        a = time.thread_time_ns()
        try:
            write_held(self)
        finally:
            writes[0] += time.thread_time_ns() - a

    endpoint = f"ipc://{tmp}/bench.ipc" if case.transport == "ipc" else "tcp://127.0.0.1:*"
    svc = PipelineService(tmp / "sessions", {}, frame_endpoint=endpoint, result_endpoint="tcp://127.0.0.1:*",
                          stage_classes={}, reserve_bytes=0, ballast_bytes=0)
    loop, total = svc._receive_loop, [0]

    def measured_loop() -> None:
        t0 = time.thread_time_ns()
        try:
            loop()
        finally:
            total[0] = time.thread_time_ns() - t0

    svc._receive_loop = measured_loop  # type: ignore[method-assign]
    session_layout.FrameStore.write_held = timed  # type: ignore[method-assign]
    try:
        with svc:
            proc = wire._start_sender(case, svc.frame_endpoint, tmp)
            svc.wait_for_sessions(1, timeout_s=600)
            proc.join(60)
    finally:
        session_layout.FrameStore.write_held = write_held  # type: ignore[method-assign]
    n = case.messages
    elapsed = svc.stats.last_recorded_s - svc.stats.first_recorded_s
    return (n - 1) / elapsed, total[0] / n / 1e3, writes[0] / n / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    parser.add_argument("--dir", default=None, help="where the files are written (e.g. /dev/shm)")
    args = parser.parse_args(argv)
    print("receive thread, CPU us per frame: total = chunk writes + the rest (receiving, decoding, checks, "
          "bookkeeping, commits)")
    for _ in range(args.rounds):
        bare_name = f"bare recorder (HWM {wire.SERVICE_SNDHWM}/{wire.SERVICE_RCVHWM})"
        for name, run in ((bare_name, bare), ("stemlive serve", service)):
            case = wire.Case("frames", "raw" if run is bare else "stemlive", args.transport,
                             "h5hwm" if run is bare else "service", args.frames)
            with tempfile.TemporaryDirectory(prefix="stemlive-bench-", dir=args.dir) as tmp:
                rate, total, writes = run(case, Path(tmp))
            print(f"{name:26} {args.transport}: {rate:6.0f} frames/s, thread {total:6.1f} = writes {writes:6.1f} "
                  f"+ rest {total - writes:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
