"""Run the EELS robustness corpus (tests/corpus) and write the per-scenario table (docs/eels-corpus.md).

    PYTHONPATH=... python scripts/eels_corpus_table.py OUT.md [--fast] [-k SUBSTRING]

Each scenario is replayed in-process through the analysis (a session file in a temporary folder) and scored
by tests/corpus/evaluate.py; the table lists the figures, what each expected result became (ok / the stated
reason) and every contract violation or missed tolerance.  An existing OUT.md keeps its text: the whole grid
replaces its table and run-time line; ``-k`` or ``--fast`` replace only the rows of the scenarios run.
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

HEADER = """# EELS robustness corpus

Spectra that stemlive's simulator did not make, through the analysis as a user runs it (a session file replayed
in-process, `replay --analyze`).  The generator (`tests/corpus/generator.py`) shares no code with
`stemlive.simulators`: its own phonon densities of states (materials A, B, C with modes at 20-55 meV and
optical modes above; P, Q, R with optical modes only, like AlN/SiC), single phonon scattering with
detailed balance (loss `g(E)/E (n+1)`, gain `g(E)/E n`, Bose-Einstein `n`), zero-loss shapes (Pearson VII,
pseudo-Voigt, a Pearson VII with a heavier loss-side tail), an optional power-law background, exact channel
integration at any dispersion, Poisson counting per frame and a random-walk energy drift between frames.
Scenarios (`tests/corpus/scenarios.py`): dispersion 0.2-2 meV/channel, axes from +-100 to +-500 meV and
asymmetric ones (-180..+300, -200..+312, -120..+276), resolution 5-15 meV, 1e5-1e9 zero-loss electrons per
frame, 1-500 frames per point, maps of two and three materials with temperature gradients, a 40-point
three-region line (A | interface | B) at the reference dose, a thermometry line across a 15 K interface drop,
and usim-like spectra at 1 eV per channel.

Contract, asserted at every grid point (`pytest -m grid tests/test_corpus_grid.py`; a fast subset in the default
suite, `tests/test_corpus.py`): each expected result (temperature, segmentation, peaks, interface) is produced,
or is absent with a stated reason (a `problem` result, published and stored in `/results/<stage>/problems`);
never an exception, never a stage switched off, never silence.

Tolerances, measured (`tests/corpus/evaluate.py`), for scenarios marked "thermometry targets" (symmetric
zero-loss shape and background, no modes in the zero-loss fit windows, enough counts): |bias| <= 0.3 % (+ twice
the standard error of the mean over the points), scatter <= 1.3x the counting limit (computed by the corpus
from the noise-free spectrum with a perfect zero-loss subtraction; it agrees with
`eels.counting_limit_sigma_T` within 1 %), pull RMS 0.8-1.2, each on 96 points (the rule below); a 15 K interface
drop within +-3 K; ARI >= 0.95 where segmentation is expected.  Other scenarios list their figures without a target.

Regenerate: `PYTHONPATH=... python scripts/eels_corpus_table.py docs/eels-corpus.md`.

"""


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


TABLE_HEAD = ("| scenario | acquisition | thermometry targets | bias % | scatter / limit | pull RMS | mean sigma_T K "
              "| ARI | interface drop K | results | violations / misses | s |")


def merge(text: str, rows: list[str], summary: str | None) -> str:
    """``text`` with its table's rows replaced by ``rows`` (matched by scenario name), or the whole table and
    its run-time line replaced when ``summary`` is given (a whole-grid run)."""
    lines = text.split("\n")
    if TABLE_HEAD not in lines:  # a new file
        return "\n".join([text.rstrip("\n"), "", TABLE_HEAD, "|" + "---|" * 12, *rows]) + (
            f"\n\n{summary}\n" if summary else "\n")
    start = lines.index(TABLE_HEAD) + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if summary is not None:
        tail = end + 1 if end < len(lines) and not lines[end].strip() else end
        if tail < len(lines) and " scenarios in " in lines[tail]:
            lines[tail] = summary
        return "\n".join(lines[:start] + rows + lines[end:])
    new = {r.split("|")[1].strip(): r for r in rows}
    table = [new.pop(r.split("|")[1].strip(), r) for r in lines[start:end]] + list(new.values())
    return "\n".join(lines[:start] + table + lines[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="markdown file to write")
    p.add_argument("--fast", action="store_true", help="only the default-suite subset")
    p.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = p.parse_args(argv)
    chosen = [s for s in (scenarios.fast() if args.fast else scenarios.grid()) if args.k in s.name]
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for sc in chosen:
            t0 = time.perf_counter()
            out = evaluate.run(sc, Path(tmp))
            rows.append(row(sc, out, time.perf_counter() - t0))
            print(rows[-1], flush=True)
    total = time.perf_counter() - t_all
    summary = None if args.fast or args.k else (
        f"{len(chosen)} scenarios in {total:.0f} s (2-core machine shared with other jobs: times are under load).")
    args.out.write_text(merge(args.out.read_text() if args.out.exists() else HEADER, rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
