"""Which queue setting makes the bare recorder faster than `stemlive serve` over tcp: interleaved variants.

Run ``python benchmarks/wire_queues.py [--rounds 3] [--frames 2000] [--transport tcp] [--dir /dev/shm]
[--only NAME ...]``. Each round runs every variant once, back to back (the machine's load hits all of them);
every row prints its per-round rate as a ratio to the bare recorder as defined (ZeroMQ's default queues) of the
same round, and the receiving and the sending process's CPU per frame (all threads, ZeroMQ's I/O thread
included). Variants are the bare recorder and `stemlive serve` (no stages) with the sender's SNDHWM, the
receiver's RCVHWM and the kernel socket buffers (SO_SNDBUF / SO_RCVBUF) set as named; "sleeps" are the receiving
process's voluntary context switches per frame from the first data message to the file closed (all threads, the
service's close + fsync included; ``--threads`` prints them per thread).

On a machine shared with other jobs, ``chrt -r 1 python benchmarks/wire_queues.py`` (root) runs the benchmark's
processes ahead of them, like on an idle machine but without the idle cores' wake-up latency. See
docs/benchmarks.md, "Round of 2026-12-05 (issue 13, tcp queues)".
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import wire  # noqa: E402

MiB = 2**20
#: name -> (path, sink, SNDHWM, RCVHWM, kernel buffers); None keeps the row's own setting.
VARIANTS: dict[str, tuple[str, str, int | None, int | None, int | None]] = {
    "bare (reference: 1000/1000)": ("raw", "h5", None, None, None),
    "bare 64/16 (service's)": ("raw", "h5", 64, 16, None),
    "bare 256/32": ("raw", "h5", 256, 32, None),
    "bare 1000/16": ("raw", "h5", None, 16, None),
    "bare 64/1000": ("raw", "h5", 64, None, None),
    "serve 64/16 (service's)": ("stemlive", "service", 64, 16, None),
    "serve 64/64": ("stemlive", "service", 64, 64, None),
    "serve 256/16": ("stemlive", "service", 256, 16, None),
    "serve 256/64": ("stemlive", "service", 256, 64, None),
    "serve 256/32": ("stemlive", "service", 256, 32, None),
    "serve 128/32": ("stemlive", "service", 128, 32, None),
    "serve 64/32": ("stemlive", "service", 64, 32, None),
    "serve 64/16, kbuf 4 MiB": ("stemlive", "service", 64, 16, 4 * MiB),
    "serve 1000/1000": ("stemlive", "service", 1000, 1000, None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    parser.add_argument("--dir", default=None, help="where the files are written (e.g. /dev/shm)")
    parser.add_argument("--only", nargs="*", help="variant names (prefixes) to run besides the reference")
    parser.add_argument("--threads", action="store_true",
                        help="also print each receiving thread's sleeps per frame (first data message to file closed)")
    args = parser.parse_args(argv)
    names = [n for n in VARIANTS if n.startswith("bare (reference") or not args.only
             or any(n.startswith(p) for p in args.only)]
    runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    faults: dict[str, list[float]] = {n: [] for n in names}  # receiving process: voluntary context switches per frame
    per_thread: dict[str, list[dict[str, int]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            path, sink, snd, rcv, kbuf = VARIANTS[name]
            case = wire.Case("frames", path, args.transport, sink, args.frames, sndhwm=snd, rcvhwm=rcv, kbuf=kbuf)
            runs[name].append(wire.run_case(case, args.dir))
            # from the first data message to the file closed, all threads (not the process's whole count: that
            # held the benchmark's own polling while the sender process starts, ~1 sleep per frame for `serve`)
            faults[name].append(sum(wire.LAST_SWITCHES.values()) / args.frames)
            per_thread[name].append(dict(wire.LAST_SWITCHES))
            rate, cpu, send = runs[name][-1]
            threads = ", ".join(f"{t} {n / args.frames:.3f}" for t, n in sorted(wire.LAST_SWITCHES.items()) if n)
            print(f"round {r + 1} {name:30} {rate:6.0f} frames/s, recv CPU {1e6 * cpu:5.0f} us, send CPU "
                  f"{1e6 * send:5.0f} us, {faults[name][-1]:5.2f} sleeps"
                  + (f" (per thread, stream + close: {threads})" if args.threads else ""), flush=True)
    ref = runs[names[0]]
    print(f"{args.transport}, {args.frames} frames of 512x512 float32, {args.rounds} interleaved rounds; ratio = rate "
          "/ the reference's rate in the same round (min/median/max); CPU us per frame: median of the rounds")
    for name in names:
        ratios = sorted(a[0] / b[0] for a, b in zip(runs[name], ref, strict=True))
        print(f"{name:30} {statistics.median(r[0] for r in runs[name]):6.0f} frames/s  ratio "
              f"{ratios[0]:.2f}/{statistics.median(ratios):.2f}/{ratios[-1]:.2f}  recv CPU "
              f"{1e6 * statistics.median(r[1] for r in runs[name]):5.0f}  send CPU "
              f"{1e6 * statistics.median(r[2] for r in runs[name]):5.0f}  sleeps "
              f"{statistics.median(faults[name]):4.2f}")
        if args.threads:
            names_seen = sorted({t for d in per_thread[name] for t in d})
            print("    sleeps per frame, median of the rounds: " + ", ".join(
                f"{t} {statistics.median(d.get(t, 0) for d in per_thread[name]) / args.frames:.3f}"
                for t in names_seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
