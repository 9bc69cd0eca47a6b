"""Paired statistics for base-vs-SAFE accuracy on the same examples.

Each example is answered by both models, so the comparison is paired:

* delta: SAFE's accuracy minus the base's.
* McNemar's exact test: only the discordant pairs carry information. With b examples the base
  got right and SAFE wrong, and c the other way round, under "no difference" c ~ Binomial(b + c,
  1/2); the two-sided p-value is scipy's exact binomial test. No discordant pairs: p = 1.
* 95% paired bootstrap interval of the delta: resample examples (pairs kept together) and take
  the percentile interval of the mean per-example difference (scipy.stats.bootstrap).
  Percentile rather than BCa: BCa is undefined when every difference is equal (the common
  all-zero case of a perfect bypass), percentile gives the honest [0, 0].

The regression rule (the one ``eval-retention`` and its report state):

    regressed  <=>  delta < -tolerance  and  McNemar p < significance

A drop smaller than the tolerance is accepted however significant; a larger drop that could be
chance (too few discordant pairs) is reported, with its interval, but not called a regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

REGRESSION_RULE = "regressed = delta < -tolerance and McNemar exact two-sided p < significance"


@dataclass(frozen=True)
class PairedComparison:
    n: int
    base_accuracy: float
    safe_accuracy: float
    delta: float
    ci95: tuple[Optional[float], Optional[float]]
    p_value: float
    base_only: int  # discordant: base right, SAFE wrong
    safe_only: int  # discordant: SAFE right, base wrong


def mcnemar_exact_p(base_correct: Sequence[bool], safe_correct: Sequence[bool]) -> float:
    base, safe = _paired(base_correct, safe_correct)
    base_only, safe_only = int(np.sum(base & ~safe)), int(np.sum(~base & safe))
    if base_only + safe_only == 0:
        return 1.0
    return float(stats.binomtest(safe_only, base_only + safe_only, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap_ci(base_correct: Sequence[bool], safe_correct: Sequence[bool], samples: int = 2000,
                        seed: int = 0, confidence: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """Percentile interval of mean(safe - base) over resampled pairs; (None, None) below 2 pairs."""
    base, safe = _paired(base_correct, safe_correct)
    differences = safe.astype(np.float64) - base.astype(np.float64)
    if differences.size < 2:
        return None, None
    if np.all(differences == differences[0]):
        # Every resample has the same mean; scipy would warn about degenerate data.
        value = float(differences[0])
        return value, value
    result = stats.bootstrap((differences,), np.mean, n_resamples=samples, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(base_correct: Sequence[bool], safe_correct: Sequence[bool], samples: int = 2000,
            seed: int = 0) -> PairedComparison:
    base, safe = _paired(base_correct, safe_correct)
    n = int(base.size)
    base_accuracy = float(base.mean()) if n else float("nan")
    safe_accuracy = float(safe.mean()) if n else float("nan")
    return PairedComparison(
        n=n, base_accuracy=base_accuracy, safe_accuracy=safe_accuracy, delta=safe_accuracy - base_accuracy,
        ci95=paired_bootstrap_ci(base, safe, samples, seed), p_value=mcnemar_exact_p(base, safe),
        base_only=int(np.sum(base & ~safe)), safe_only=int(np.sum(~base & safe)),
    )


def is_regression(delta: float, p_value: float, tolerance: float, significance: float) -> bool:
    return bool(delta < -tolerance and p_value < significance)


def _paired(base_correct: Sequence[bool], safe_correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    base, safe = np.asarray(base_correct, dtype=bool), np.asarray(safe_correct, dtype=bool)
    if base.shape != safe.shape or base.ndim != 1:
        raise ValueError(f"paired results must be two 1-D sequences of equal length, got {base.shape} and {safe.shape}")
    return base, safe
