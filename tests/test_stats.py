"""harness/stats.py: the paired interval against a hand computation, the window bootstrap, the verdict rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import stats
from harness.stats import CONTRADICTED, INCONCLUSIVE, INDICATIVE, SUPPORTED, Interval


def test_paired_interval_matches_a_hand_computation():
    # differences 0.10, 0.30, 0.20: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half-width 0.248414
    a = {0: 4.10, 1: 4.50, 2: 4.20, 7: 9.0}  # seed 7 has no partner: left out
    b = {0: 4.00, 1: 4.20, 2: 4.00}
    interval = stats.paired(a, b)
    assert interval.n == 3
    assert interval.mean == pytest.approx(0.2)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert interval.low == pytest.approx(0.2 - half, abs=1e-6)
    assert interval.high == pytest.approx(0.2 + half, abs=1e-6)
    assert interval.half_width == pytest.approx(half, abs=1e-6)


def test_pairing_removes_the_shared_seed_effect():
    # seed 1 is bad for both arms: unpaired spreads overlap, the paired difference is consistent
    a, b = {0: 5.00, 1: 5.40, 2: 5.05}, {0: 5.05, 1: 5.46, 2: 5.09}
    assert stats.verdict_below(stats.paired(a, b)) == SUPPORTED
    assert stats.t_interval(list(a.values())).high > stats.t_interval(list(b.values())).low


@pytest.mark.parametrize("differences, expected", [
    ((-0.10, -0.12, -0.11), SUPPORTED),
    ((0.10, 0.12, 0.11), CONTRADICTED),
    ((-0.10, 0.12, 0.01), INCONCLUSIVE),
    ((-0.10, -0.12), INDICATIVE),       # two seeds: never a verdict, however clear
    ((-0.5,), INDICATIVE),
])
def test_verdict_needs_three_seeds_and_the_whole_interval_on_one_side(differences, expected):
    assert stats.verdict_below(stats.t_interval(differences)) == expected


def test_threshold_moves_the_bar_and_above_mirrors_below():
    interval = stats.t_interval([0.004, 0.006, 0.005])
    assert stats.verdict_below(interval, 0.0) == CONTRADICTED
    assert stats.verdict_below(interval, math.log(1.01)) == SUPPORTED
    assert stats.verdict_above(interval, 0.0) == SUPPORTED
    assert stats.verdict_above(interval, 0.01) == CONTRADICTED


def test_indicative_text_names_the_seeds():
    assert stats.indicative_text(INDICATIVE, 2) == "indicative (2 seeds)"
    assert stats.indicative_text(INDICATIVE, 1) == "indicative (1 seed)"
    assert stats.indicative_text(SUPPORTED, 5) == SUPPORTED


def test_single_value_has_no_interval():
    interval = stats.t_interval([0.3])
    assert interval.n == 1 and math.isnan(interval.low)
    assert "no interval" in interval.text()
    assert stats.half_width([0.3]) == 0.0


def test_window_bootstrap_brackets_the_mean_difference_and_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    base = rng.normal(4.0, 0.5, size=(3, 200))
    a = {s: list(base[s] + 0.05 + rng.normal(0, 0.01, 200)) for s in range(3)}
    b = {s: list(base[s]) for s in range(3)}
    low, high = stats.window_bootstrap(a, b)
    assert low < 0.05 < high and high - low < 0.01  # paired: the shared window difficulty cancels
    noisy = {s: list(base[s] + 0.05 + rng.normal(0, 0.3, 200)) for s in range(3)}
    n_low, n_high = stats.window_bootstrap(noisy, b)
    assert n_high - n_low > 5 * (high - low)


def test_window_bootstrap_is_deterministic_and_needs_common_windows():
    a, b = {0: [1.0, 2.0, 3.0]}, {0: [1.5, 2.0, 2.5]}
    assert stats.window_bootstrap(a, b) == stats.window_bootstrap(a, b)
    assert stats.window_bootstrap({0: [1.0]}, {1: [1.0]}) is None
    assert stats.window_bootstrap({0: [1.0, 2.0]}, {0: [1.0]}) is None


def test_interval_text():
    assert Interval(0.25, 0.1, 0.4, 3).text(2) == "+0.25 [+0.10, +0.40], n=3"
    assert Interval(0.25, 0.1, 0.4, 3).text(2, signed=False) == "0.25 [0.10, 0.40], n=3"
