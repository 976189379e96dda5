"""Run the EELS robustness corpus (tests/corpus) and write the per-scenario table (docs/eels-corpus.md).

    PYTHONPATH=... python scripts/eels_corpus_table.py OUT.md [--fast] [-k SUBSTRING]

Each scenario is replayed in-process through the analysis (a session file in a temporary folder) and scored
by tests/corpus/evaluate.py; the table lists the figures, what each expected result became (ok / the stated
reason) and every contract violation or missed tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import evaluate, scenarios  # noqa: E402


def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def row(sc: scenarios.Scenario, out: evaluate.Outcome, seconds: float) -> str:
    f = out.figures
    status = "; ".join(f"{k}: {v}" for k, v in out.status.items())
    flags = "; ".join(out.violations + out.misses) or "-"
    return (f"| {sc.name} | {sc.describe()} | {'yes' if sc.thermometry else 'no'} | "
            f"{_f(f.get('bias_pct'), '+.2f')} | {_f(f.get('scatter_vs_limit'), '.2f')} | "
            f"{_f(f.get('pull_rms'), '.2f')} | {_f(f.get('sigma_T_K'), '.2f')} | {_f(f.get('ari'), '.2f')} | "
            f"{_f(f.get('interface_drop_K'), '.1f')} | {status} | {flags} | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="markdown file to write")
    p.add_argument("--fast", action="store_true", help="only the default-suite subset")
    p.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = p.parse_args(argv)
    chosen = [s for s in (scenarios.fast() if args.fast else scenarios.grid()) if args.k in s.name]
    lines = [
        "| scenario | acquisition | thermometry targets | bias % | scatter / limit | pull RMS | mean sigma_T K "
        "| ARI | interface drop K | results | violations / misses | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for sc in chosen:
            t0 = time.perf_counter()
            out = evaluate.run(sc, Path(tmp))
            lines.append(row(sc, out, time.perf_counter() - t0))
            print(lines[-1], flush=True)
    total = time.perf_counter() - t_all
    args.out.write_text("\n".join(lines) + f"\n\n{len(chosen)} scenarios in {total:.0f} s.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
