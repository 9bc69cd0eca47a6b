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

Scores that are not 0/1 (token F1, chrF, BLEU, 1 - WER) are compared with the Wilcoxon
signed-rank test on the paired differences (scipy; zero differences dropped, as Wilcoxon's
original test does; none left: p = 1) instead of McNemar; each result names its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

REGRESSION_RULE = ("regressed = delta < -tolerance and p < significance (McNemar exact two-sided for 0/1 scores, "
                   "Wilcoxon signed-rank two-sided for graded scores)")


@dataclass(frozen=True)
class PairedComparison:
    n: int
    base_accuracy: float
    safe_accuracy: float
    delta: float
    ci95: tuple[Optional[float], Optional[float]]
    p_value: float
    base_only: int  # discordant: base right (or better), SAFE wrong (or worse)
    safe_only: int  # discordant: SAFE right (or better), base wrong (or worse)
    test: str = "mcnemar-exact"


def mcnemar_exact_p(base_correct: Sequence[bool], safe_correct: Sequence[bool]) -> float:
    base, safe = _paired(base_correct, safe_correct)
    base_only, safe_only = int(np.sum(base & ~safe)), int(np.sum(~base & safe))
    if base_only + safe_only == 0:
        return 1.0
    return float(stats.binomtest(safe_only, base_only + safe_only, 0.5, alternative="two-sided").pvalue)


def wilcoxon_p(base_scores: Sequence[float], safe_scores: Sequence[float]) -> float:
    base, safe = _paired(base_scores, safe_scores, binary=False)
    differences = safe - base
    if not np.any(differences != 0):
        return 1.0
    return float(stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def is_binary(*scores: Sequence[float]) -> bool:
    return all(np.isin(np.asarray(s, dtype=np.float64), (0.0, 1.0)).all() for s in scores)


def paired_bootstrap_ci(base_correct: Sequence[float], safe_correct: Sequence[float], samples: int = 2000,
                        seed: int = 0, confidence: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """Percentile interval of mean(safe - base) over resampled pairs; (None, None) below 2 pairs."""
    base, safe = _paired(base_correct, safe_correct, binary=False)
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


def compare(base_correct: Sequence[float], safe_correct: Sequence[float], samples: int = 2000,
            seed: int = 0) -> PairedComparison:
    """Paired comparison of per-example scores: McNemar for 0/1 scores, Wilcoxon for graded ones."""
    base, safe = _paired(base_correct, safe_correct, binary=False)
    n = int(base.size)
    base_accuracy = float(base.mean()) if n else float("nan")
    safe_accuracy = float(safe.mean()) if n else float("nan")
    binary = is_binary(base, safe)
    return PairedComparison(
        n=n, base_accuracy=base_accuracy, safe_accuracy=safe_accuracy, delta=safe_accuracy - base_accuracy,
        ci95=paired_bootstrap_ci(base, safe, samples, seed),
        p_value=mcnemar_exact_p(base, safe) if binary else wilcoxon_p(base, safe),
        base_only=int(np.sum(base > safe)), safe_only=int(np.sum(safe > base)),
        test="mcnemar-exact" if binary else "wilcoxon-signed-rank",
    )


def is_regression(delta: float, p_value: float, tolerance: float, significance: float) -> bool:
    return bool(delta < -tolerance and p_value < significance)


def _paired(base_correct: Sequence[float], safe_correct: Sequence[float],
            binary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    dtype = bool if binary else np.float64
    base, safe = np.asarray(base_correct, dtype=dtype), np.asarray(safe_correct, dtype=dtype)
    if base.shape != safe.shape or base.ndim != 1:
        raise ValueError(f"paired results must be two 1-D sequences of equal length, got {base.shape} and {safe.shape}")
    return base, safe
