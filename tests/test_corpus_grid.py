"""The whole EELS robustness grid (issue 12), ``-m grid``: at every grid point each expected result is produced
or comes with a stated reason (published and stored), never an exception, never silence.

The figures of every scenario against the stated tolerances (tests/corpus/evaluate.py) are tabulated in
docs/eels-corpus.md by scripts/eels_corpus_table.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import evaluate, scenarios

pytestmark = pytest.mark.grid


@pytest.mark.parametrize("scenario", scenarios.grid(), ids=lambda s: s.name)
def test_grid_results_or_reasons(scenario: scenarios.Scenario, tmp_path: Path) -> None:
    out = evaluate.run(scenario, tmp_path)
    assert not out.violations, (out.violations, out.status)
    assert out.figures["analysis_finished"] == ("incomplete" if out.problems else "complete"), out.figures
