"""The whole EELS robustness grid (issue 12), ``-m grid``: at every grid point each expected result is produced
or comes with a stated reason (published and stored), never an exception, never silence.

The figures of every scenario against the stated tolerances (tests/corpus/evaluate.py) are tabulated in
docs/eels-corpus.md by scripts/eels_corpus_table.py.
"""

from __future__ import annotations

import pytest
from corpus import evaluate, scenarios

pytestmark = pytest.mark.grid

_OUTCOMES: dict[str, evaluate.Outcome] = {}


def _outcome(scenario: scenarios.Scenario, factory: pytest.TempPathFactory) -> evaluate.Outcome:
    """Each scenario is analysed once for both tests (the thermometry scenarios are half the grid's time)."""
    if scenario.name not in _OUTCOMES:
        _OUTCOMES[scenario.name] = evaluate.run(scenario, factory.mktemp(scenario.name))
    return _OUTCOMES[scenario.name]


@pytest.mark.parametrize("scenario", scenarios.grid(), ids=lambda s: s.name)
def test_grid_results_or_reasons(scenario: scenarios.Scenario, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = _outcome(scenario, tmp_path_factory)
    assert not out.violations, (out.violations, out.status)
    assert out.figures["analysis_finished"] == ("incomplete" if out.problems else "complete"), out.figures


# Thermometry scenarios that do not meet the targets on the corpus's realisation (measured at the commit that
# last changed this list, docs/eels-corpus.md): listed so that the others are held to them; remove a name when it
# is met.  Met since issue 12a: disp_2 (pull RMS 0.41 -> 0.85), axis_-500_500 (0.74 -> 0.98), dose_1e+07 (scatter
# 1.32 -> 1.15, bias -0.35 -> +0.14 %).  Met since issue 12c: res_15 (scatter 1.34 -> 1.13x the counting limit, pull
# 1.18 -> 1.07; 12 realisations: 1.25 -> 1.16, pull 1.09; the near zero-loss window reaches 3 FWHM at coarse
# resolution); zlp_pseudo_voigt (refused -> bias -0.14 %, scatter 0.80, pull 0.82: a pseudo-Voigt zero-loss family,
# chosen by chi2 where the Pearson VII does not describe its windows; 3 other draws: pull 1.10-1.23).
# Met under the rule of 96 points per thermometry scenario (scenarios.THERMOMETRY_POINTS, docs/eels-corpus.md: at 16
# points a calibrated analysis fails the pull band on 26 % of draws): frames_500 (16 points: pull RMS 1.33, scatter
# 1.31, point 5 at -3.6 sigma; 96 points of the same seed: bias +0.01 %, scatter 1.09, pull 1.08).
# Met since issue 12h: background_power_law (symmetric power-law tails; 96 points, seeds 0-3: scatter 1.50 / 1.52 /
# 1.43 / 1.32 -> 0.95 / 1.09 / 1.04 / 0.99x the counting limit, pull 1.16 / 1.19 / 1.09 / 1.00 -> 0.94 / 1.10 / 1.04 /
# 0.98, bias +0.10..+0.23 -> -0.04..+0.12 %): the session's spectra share the spectrometer's tail shape (m, p pooled,
# eels_tail_pool), where each spectrum's own m profile left 1.3-1.5x.
NOT_MET: dict[str, str] = {}


@pytest.mark.parametrize("scenario", [s for s in scenarios.grid() if s.thermometry and s.name not in NOT_MET],
                         ids=lambda s: s.name)
def test_grid_thermometry_targets(scenario: scenarios.Scenario, tmp_path_factory: pytest.TempPathFactory) -> None:
    """|bias| <= 0.3 % (+ 2 SEM), scatter <= 1.3x the counting limit, pull RMS 0.8-1.2 on 96 points, ARI >= 0.95
    where segmentation is expected, a 15 K interface drop within +-3 K."""
    out = _outcome(scenario, tmp_path_factory)
    assert not out.violations and not out.misses, (out.misses, out.figures)
    # every point of a thermometry scenario has a temperature: a stated reason is not enough there (13 of disp_2's 96
    # points lost theirs to power-law tails fitted where there were none, with every target still met on the rest)
    assert out.figures["n_temperatures"] == scenario.n_points, (out.figures, out.status)
