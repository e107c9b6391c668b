"""Paired statistics for comparing arms of a study: the one place claims, tables and plots take them from.

Seed s gives every method the same training batches, the same validation windows and the same initial
values of the parameters they share (tests/test_pairing.py), so two arms' runs at the same seed are a
pair. A comparison of arm A with arm B is therefore the per-seed difference d_s = A_s - B_s over their
common seeds, summarised by its mean, a 95% Student-t interval mean +- t(0.975, n-1) sd / sqrt(n), and
n (Miller 2024, "Adding error bars to evals": paired differences remove the variance both arms share).

* With n < 3 a comparison is *indicative*: never supported or contradicted (two seeds give a t interval
  of 12.7 sd; one gives none).
* A verdict is supported or contradicted only when the whole interval lies on one side of the claim's
  threshold; the interval's half-width is the smallest difference the study could have detected.
* Beside the seed interval, :func:`window_bootstrap` gives the evaluation's own noise: the same paired
  difference with the validation windows resampled (the same windows for both arms, every seed).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
MIN_SEEDS = 3  # fewer paired seeds than this: indicative only
BOOTSTRAP_RESAMPLES = 2000

SUPPORTED, CONTRADICTED, INCONCLUSIVE, INDICATIVE = "supported", "contradicted", "inconclusive", "indicative"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values (paired differences, or one arm's values) with its 95% Student-t interval.

    ``low``/``high`` are NaN for n < 2 (no spread to estimate).
    """

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, digits: int = 4, signed: bool = True) -> str:
        """``+0.0123 [-0.0040, +0.0286], n=3`` (no interval for n < 2); ``signed``: differences carry a sign."""
        f = f"{'+' if signed else ''}.{digits}f"
        if self.n < 2:
            return f"{self.mean:{f}} (n={self.n}, no interval)"
        return f"{self.mean:{f}} [{self.low:{f}}, {self.high:{f}}], n={self.n}"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of ``values`` (mean +- t_{(1+c)/2, n-1} sd / sqrt(n))."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """The 95% t half-width of the mean of ``values`` (0 for fewer than two values: no spread to show)."""
    interval = t_interval(values, confidence)
    return interval.half_width if interval.n >= 2 else 0.0


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """A_s - B_s for every seed s both arms ran, in seed order."""
    return [float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))]


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> Interval:
    """The paired difference A - B over the common seeds (``{seed: value}`` each)."""
    return t_interval(paired_differences(a, b), confidence)


def window_bootstrap(a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]],
                     resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of the mean paired difference A - B when the validation windows are resampled.

    ``a``/``b``: per seed, the per-window mean losses (result.json ``val_window_loss``). Each resample draws
    one set of window indices and applies it to every seed and both arms (the windows are the same text for
    all), so it measures the evaluation's noise for the models as trained. None when the arms share no seed
    with windows of equal count.
    """
    seeds = [s for s in sorted(set(a) & set(b)) if len(a[s]) == len(b[s]) and len(a[s]) > 0]
    if not seeds or len({len(a[s]) for s in seeds}) != 1:
        return None
    diff = np.array([np.asarray(a[s], dtype=np.float64) - np.asarray(b[s], dtype=np.float64) for s in seeds])
    n_windows = diff.shape[1]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_windows, size=(resamples, n_windows))
    means = diff[:, draws].mean(axis=(0, 2))  # mean over seeds and resampled windows, per resample
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def verdict_below(interval: Interval, threshold: float = 0.0) -> str:
    """Is the true difference below ``threshold``? Supported when the whole interval is below it, contradicted
    when the whole interval is above it, indicative with fewer than :data:`MIN_SEEDS` pairs, else inconclusive."""
    if interval.n < MIN_SEEDS or math.isnan(interval.low):
        return INDICATIVE
    if interval.high < threshold:
        return SUPPORTED
    if interval.low > threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def verdict_above(interval: Interval, threshold: float = 0.0) -> str:
    """Is the true difference above ``threshold``? (:func:`verdict_below` mirrored.)"""
    mirrored = Interval(-interval.mean, -interval.high, -interval.low, interval.n)
    return verdict_below(mirrored, -threshold)


def indicative_text(verdict: str, n: int) -> str:
    """``indicative (2 seeds)`` for an indicative verdict, the verdict itself otherwise."""
    return f"{INDICATIVE} ({n} seed{'s' if n != 1 else ''})" if verdict == INDICATIVE else verdict


__all__ = ["BOOTSTRAP_RESAMPLES", "CONFIDENCE", "CONTRADICTED", "INCONCLUSIVE", "INDICATIVE", "Interval", "MIN_SEEDS",
           "SUPPORTED", "half_width", "indicative_text", "paired", "paired_differences", "t_interval",
           "verdict_above", "verdict_below", "window_bootstrap"]
