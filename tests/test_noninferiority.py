"""The non-inferiority verdict: known outcomes, and the bound checked by a second computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from safe_cli.evaluation.retention import report_verdict, task_rows
from safe_cli.evaluation.stats import examples_needed, holm, lower_bound, mcnemar_exact_p, tango_lower_bound
from safe_cli.evaluation.tasks import TaskResult

Z95 = float(stats.norm.ppf(0.95))


def paired(n, base_only, safe_only, both_right=None):
    """Per-example 0/1 scores with the given discordant counts (the rest: both right)."""
    both_right = n - base_only - safe_only if both_right is None else both_right
    both_wrong = n - base_only - safe_only - both_right
    base = [1] * both_right + [1] * base_only + [0] * safe_only + [0] * both_wrong
    safe = [1] * both_right + [0] * base_only + [1] * safe_only + [0] * both_wrong
    return base, safe


def task(name, n, base_only, safe_only, with_audio=True):
    base, safe = paired(n, base_only, safe_only)
    return TaskResult(name, with_audio, base, safe)


def verdicts(results, tolerance=0.005, bypass_exact=True):
    return {(r["task"], r["with_audio"]): r for r in task_rows(results, tolerance, 0.05, 500,
                                                               bypass_exact=bypass_exact)}


# ------------------------------------------------------------------ the known outcomes


def test_identical_answers_are_non_inferior_when_there_are_enough_of_them():
    rows = verdicts([task("vl/a", 1000, 0, 0), task("vl/b", 200, 0, 0), task("vl/c", 200, 0, 0, with_audio=False)])
    assert rows[("vl/a", True)]["verdict_task"] == "non-inferior"  # bound -z^2/(N+z^2) = -0.27 points
    # 200 identical answers bound the drop only to -1.3 points: at a 0.5-point tolerance that decides nothing.
    assert rows[("vl/b", True)]["verdict_task"] == "inconclusive"
    assert rows[("vl/b", True)]["examples_needed"] == 539
    # Without a clip SAFE is the base on every input (the bit-exact bypass), whatever N.
    assert rows[("vl/c", False)]["verdict_task"] == "non-inferior" and rows[("vl/c", False)]["bound_method"] == "bypass"
    assert verdicts([task("vl/c", 200, 0, 0, with_audio=False)], bypass_exact=False)[("vl/c", False)][
        "verdict_task"] == "inconclusive"


def test_a_three_point_drop_on_100_examples_is_inconclusive_and_the_rules_disagree():
    rows = verdicts([task("vl/a", 100, 3, 0)])
    row = rows[("vl/a", True)]
    # McNemar's exact p for 3 vs 0 discordant is 0.25 (the chi-square approximation gives 0.08): not significant.
    assert row["delta"] == pytest.approx(-0.03) and row["p_value"] == pytest.approx(0.25)
    assert row["verdict_task"] == "inconclusive"
    assert examples_needed(3, 0, 100, 0.005) is None  # the observed drop is past the tolerance: more data shows harm
    tasks = list(rows.values())
    assert report_verdict(tasks, True, "non-inferiority")[0] == "inconclusive"
    assert report_verdict(tasks, True, "significant-harm")[0] == "pass"


def test_a_large_drop_is_regressed_under_both_rules():
    rows = verdicts([task("vl/a", 100, 30, 0), task("vl/b", 1000, 0, 0)])
    assert rows[("vl/a", True)]["verdict_task"] == "regressed" and rows[("vl/a", True)]["regressed"]
    for rule in ("non-inferiority", "significant-harm"):
        verdict, regressions, _ = report_verdict(list(rows.values()), True, rule)
        assert verdict == "regression" and regressions == ["vl/a + distractor"]


def test_twenty_null_tasks_just_under_p_005_are_not_regressions_after_holm():
    results = [task(f"vl/t{i:02d}", 200, 8, 1) for i in range(20)]
    p = mcnemar_exact_p(*paired(200, 8, 1))
    assert 0.03 < p < 0.05  # each one alone: delta -3.5 points at p = 0.039 would be called a regression
    rows = verdicts(results)
    assert all(not r["regressed"] for r in rows.values())
    assert all(r["p_holm"] == pytest.approx(min(1.0, 20 * p), rel=1e-9) or r["p_holm"] >= p for r in rows.values())
    assert verdicts(results[:1])[("vl/t00", True)]["verdict_task"] == "regressed"


def test_audio_tasks_gate_only_by_regressing():
    rows = verdicts([task("vl/a", 1000, 0, 0), task("av/sum", 50, 0, 0)])
    assert rows[("av/sum", True)]["verdict_task"] == "inconclusive"
    verdict, _, inconclusive = report_verdict(list(rows.values()), True, "non-inferiority")
    assert verdict == "pass" and inconclusive == []


def test_a_non_exact_bypass_fails_whatever_the_tasks_say():
    rows = verdicts([task("vl/a", 1000, 0, 0)])
    assert report_verdict(list(rows.values()), False, "significant-harm")[0] == "regression"


# ------------------------------------------------------------------ the bound and its helpers


def restricted_mle_bound(safe_only, base_only, n, confidence=0.95):
    """Tango's bound again, the restricted MLE found numerically instead of by the quadratic's root."""
    z = stats.norm.ppf(confidence)
    rest = n - safe_only - base_only

    def statistic(delta0):
        def negative_log_likelihood(q):  # q: base-only rate; the SAFE-only rate is q + delta0
            cells = np.array([q + delta0, q, 1 - 2 * q - delta0])
            if np.any(cells <= 0):
                return np.inf
            return -(safe_only * np.log(cells[0]) + base_only * np.log(cells[1]) + rest * np.log(cells[2]))

        low, high = max(0.0, -delta0), (1 - delta0) / 2
        q = optimize.minimize_scalar(negative_log_likelihood, bounds=(low + 1e-12, high - 1e-12),
                                     method="bounded", options={"xatol": 1e-13}).x
        return (safe_only - base_only - n * delta0) / np.sqrt(n * (2 * q + delta0 * (1 - delta0)))

    estimate = (safe_only - base_only) / n
    return optimize.brentq(lambda d: statistic(d) - z, -0.999999, estimate - 1e-12)


@pytest.mark.parametrize("safe_only, base_only, n", [(1, 7, 21), (6, 16, 161), (5, 5, 200), (0, 3, 100),
                                                     (12, 2, 60), (1, 0, 200)])
def test_the_tango_bound_matches_a_numerical_restricted_mle(safe_only, base_only, n):
    assert tango_lower_bound(safe_only, base_only, n) == pytest.approx(restricted_mle_bound(safe_only, base_only, n),
                                                                       abs=2e-6)


def test_the_bound_without_discordant_pairs_is_the_closed_form():
    for n in (20, 200, 2000):
        assert tango_lower_bound(0, 0, n) == pytest.approx(-Z95 ** 2 / (n + Z95 ** 2), abs=1e-9)


def test_examples_needed_is_the_first_n_at_which_no_discordance_decides():
    needed = examples_needed(0, 0, 200, 0.005)
    assert needed == int(np.ceil(Z95 ** 2 * 0.995 / 0.005)) == 539  # by hand: 2.7055 * 0.995 / 0.005 = 538.4
    assert tango_lower_bound(0, 0, needed) >= -0.005 > tango_lower_bound(0, 0, needed - 1)
    # Discordance in both directions costs examples: the usual paired formula, 80% power.
    with_noise = examples_needed(6, 7, 200, 0.02)
    assert with_noise == int(np.ceil((Z95 + stats.norm.ppf(0.8)) ** 2 * (13 / 200 - (1 / 200) ** 2)
                                     / (1 / 200 + 0.02) ** 2))


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, max(that, 3*0.03), max(that, 2*0.04), max(that, 0.5).
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 * 0.8 caps at 1, and the larger p follows it
    assert holm([0.02, 0.9]) == pytest.approx([0.04, 0.9])


def test_graded_scores_use_the_bootstrap_and_never_claim_more_than_n_zeros_show():
    base = [0.5] * 200
    bound, method = lower_bound(base, base)
    assert method == "bootstrap-percentile" and bound == pytest.approx(-(1 - 0.05 ** (1 / 200)))
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.6, 400)
    safe = base - 0.01 + rng.normal(0, 0.001, 400)
    bound, _ = lower_bound(base, safe)
    assert -0.0102 < bound < -0.0099
