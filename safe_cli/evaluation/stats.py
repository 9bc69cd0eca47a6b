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

Non-inferiority (``evaluation.rule: non-inferiority``, the default). Not finding a significant
drop is not evidence of no drop, so a task passes only when the data *show* it did not drop
by more than the tolerance: the one-sided lower confidence bound of the paired delta is
>= -tolerance. For 0/1 scores the bound is Tango's asymptotic score bound for a difference of
paired proportions (Tango 1998; one of the intervals Fagerland, Lydersen and Laake 2013
recommend): the delta0 at which the score statistic

    T(delta0) = (c - b - N delta0) / sqrt(N (2 q(delta0) + delta0 (1 - delta0)))

equals z_{1-alpha}, with q(delta0) the maximum-likelihood rate of base-only pairs under
delta = delta0 (a quadratic's root). The percentile bootstrap is not used for this decision:
with no discordant pair its interval is [0, 0] whatever N, so five identical answers would
"prove" non-inferiority. Tango's bound for no discordant pair is -z^2 / (N + z^2) (-1.3 points
at N = 200, 95%), which is the honest figure. For graded scores the bound is the bootstrap's
one-sided percentile, and no lower than -(1 - alpha^(1/N)) (the Clopper-Pearson bound on the
rate of a difference not seen among N) when every difference is zero.

The report's gate is an intersection-union test: "every task is non-inferior" is concluded only
if each task's own level-alpha test concludes it, which needs no multiplicity correction.
"Some task regressed" is a union of claims, so its p-values are Holm-adjusted across the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

REGRESSION_RULE = ("regressed = delta < -tolerance and Holm-adjusted p < significance (McNemar exact two-sided "
                   "for 0/1 scores, Wilcoxon signed-rank two-sided for graded scores)")
RULE_TEXT = {
    "significant-harm": "fail on a regressed task; " + REGRESSION_RULE,
    "non-inferiority": ("fail on a regressed task, or on a VL/text task that is not shown non-inferior: one-sided "
                        "lower confidence bound of SAFE - base >= -tolerance (Tango score bound for 0/1 scores, "
                        "bootstrap percentile for graded ones; a task without clips is SAFE = base by the "
                        "bit-exact bypass); " + REGRESSION_RULE),
}


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


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence)."""
    order = np.argsort(p_values, kind="stable")
    m, running, adjusted = len(p_values), 0.0, [1.0] * len(p_values)
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[int(index)] = running
    return adjusted


def _tango_statistic(delta0: float, safe_only: int, base_only: int, n: int) -> float:
    """Tango's score statistic for H0: P(SAFE right) - P(base right) = delta0."""
    # Restricted MLE of the base-only rate q (the SAFE-only rate is then q + delta0): the
    # positive root of 2N q^2 - B q - base_only delta0 (1 - delta0) = 0, from setting the
    # derivative of the multinomial log-likelihood to zero.
    b_coef = base_only * (1 - delta0) + safe_only * (1 + delta0) - 2 * n * delta0
    q = (b_coef + np.sqrt(b_coef ** 2 + 8 * n * base_only * delta0 * (1 - delta0))) / (4 * n)
    variance = n * (2 * q + delta0 * (1 - delta0))
    if variance <= 0:
        return np.inf if safe_only - base_only - n * delta0 > 0 else -np.inf
    return float((safe_only - base_only - n * delta0) / np.sqrt(variance))


def tango_lower_bound(safe_only: int, base_only: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of P(SAFE right) - P(base right) from paired 0/1 scores."""
    from scipy.optimize import brentq

    estimate = (safe_only - base_only) / n
    if estimate <= -1:
        return -1.0
    z = float(stats.norm.ppf(confidence))
    # T falls as delta0 rises; the bound is where it crosses z, below the estimate.
    low = -1 + 1e-12
    if _tango_statistic(low, safe_only, base_only, n) < z:
        return -1.0
    return float(brentq(lambda d: _tango_statistic(d, safe_only, base_only, n) - z, low, estimate,
                        xtol=1e-10))


def graded_lower_bound(base_scores: Sequence[float], safe_scores: Sequence[float], confidence: float = 0.95,
                       samples: int = 2000, seed: int = 0) -> float:
    """One-sided lower bound of mean(safe - base) for graded scores (bootstrap percentile)."""
    base, safe = _paired(base_scores, safe_scores, binary=False)
    differences = safe - base
    n = differences.size
    if n == 0:
        return float("nan")
    unseen = -(1 - (1 - confidence) ** (1 / n))  # a difference of -1 at the rate not excluded by N zeros
    if not np.any(differences != 0):
        return float(unseen)
    low, _ = paired_bootstrap_ci(base, safe, samples, seed, confidence=1 - 2 * (1 - confidence))
    return float(min(low, float(differences.mean())))


def lower_bound(base_scores: Sequence[float], safe_scores: Sequence[float], confidence: float = 0.95,
                samples: int = 2000, seed: int = 0) -> tuple[float, str]:
    """(lower confidence bound of the paired delta, the method that gave it)."""
    base, safe = _paired(base_scores, safe_scores, binary=False)
    if not base.size:
        return float("nan"), "none"
    if is_binary(base, safe):
        return tango_lower_bound(int(np.sum(safe > base)), int(np.sum(base > safe)), int(base.size),
                                 confidence), "tango-score"
    return graded_lower_bound(base, safe, confidence, samples, seed), "bootstrap-percentile"


def examples_needed(base_only: int, safe_only: int, n: int, tolerance: float, confidence: float = 0.95,
                    power: float = 0.8) -> Optional[int]:
    """Examples a paired 0/1 task needs to decide non-inferiority with ``power`` at the observed rates.

    The normal-approximation sample size for a paired non-inferiority test (as in Nam 1997 and
    the usual paired-proportion formula): N = (z_{1-alpha} + z_power)^2 (p_b + p_s - d^2) /
    (d + tolerance)^2, with p_b, p_s the observed base-only and SAFE-only rates and d their
    difference; at least what no discordant pair needs, z^2 (1 - tolerance) / tolerance.
    None when the observed delta is itself below -tolerance: more data would show harm, not
    non-inferiority.
    """
    if n <= 0:
        return None
    p_b, p_s = base_only / n, safe_only / n
    d = p_s - p_b
    if d <= -tolerance:
        return None
    z_a, z_b = float(stats.norm.ppf(confidence)), float(stats.norm.ppf(power))
    floor = z_a ** 2 * (1 - tolerance) / tolerance if tolerance > 0 else float("inf")
    needed = (z_a + z_b) ** 2 * max(p_b + p_s - d ** 2, 0.0) / (d + tolerance) ** 2
    return int(np.ceil(max(needed, floor)))


def _paired(base_correct: Sequence[float], safe_correct: Sequence[float],
            binary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    dtype = bool if binary else np.float64
    base, safe = np.asarray(base_correct, dtype=dtype), np.asarray(safe_correct, dtype=dtype)
    if base.shape != safe.shape or base.ndim != 1:
        raise ValueError(f"paired results must be two 1-D sequences of equal length, got {base.shape} and {safe.shape}")
    return base, safe
