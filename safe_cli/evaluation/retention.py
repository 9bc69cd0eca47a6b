"""The retention report: per-task paired statistics, the bypass check, a verdict.

Every example is answered by the frozen base (no audio) and by SAFE as deployed (the example's
clip at the budget the gate, the policy or, without either, the largest budget gives it; rows
without a clip get budget 0). SAFE on a row without a clip runs no
audio path at all, so its answers there are the base's by construction; what could still go
wrong is a *leak* from other rows of a batch, and that is what the bypass check measures: every
audio-free example is batched together with a copy of itself that does carry a clip, and the
budget-0 rows' logits must equal the base's own forward on the same batch, bit for bit.

Each task gets one of three verdicts (``stats.py`` has the statistics):

    non-inferior   the one-sided lower confidence bound of SAFE - base is >= -tolerance; a task
                   whose examples carry no clip is SAFE = base by construction once the
                   bypass check is bit-exact (bound 0, method "bypass")
    regressed      delta < -tolerance and the Holm-adjusted p < significance
    inconclusive   neither: the data cannot tell; the row says how many examples would

The report's verdict under ``evaluation.rule``:

    significant-harm   "regression" if any task regressed (or the bypass is not exact), else "pass"
    non-inferiority    as above, and "inconclusive" if a VL or text task is inconclusive: a
                       release is let through only when no harm to what the base could do is shown
                       beyond the tolerance. Audio tasks, new capability the base never had,
                       fail the gate only by regressing.

The report follows DESIGN.md section 4 (schema ``safe.retention-report/2``; /2 added the
verdicts, the bounds, ``rule`` as a name with ``rule_text``, ``confidence`` and ``correction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..models.bypass import check_bypass
from ..models.probe import probe_audio
from ..progress import progress_bar
from ..data.dataset import RecordPool
from .stats import RULE_TEXT, compare, examples_needed, holm, lower_bound
from .strategies import answer_at_every_budget, compare_strategies, strategy_tasks
from .tasks import TaskResult

SCHEMA = "safe.retention-report/2"
RETENTION_KINDS = ("vl", "text")  # what the base could already do: the non-inferiority gate's tasks


@dataclass
class BypassCheck:
    bit_exact: bool
    max_abs_logit_diff: float
    n: int  # budget-0 rows checked
    source: str = "examples"  # "probe": the data had no audio-free example, random inputs were used

    def to_dict(self) -> dict[str, Any]:
        return {"bit_exact": self.bit_exact, "max_abs_logit_diff": self.max_abs_logit_diff, "n": self.n,
                "source": self.source}


@torch.no_grad()
def check_bypass_on_examples(model, batcher, pool: RecordPool, budget: int, batch_size: int = 32,
                             max_examples: Optional[int] = None, seed: int = 0) -> BypassCheck:
    """Budget-0 rows of mixed batches against ``model.base`` on the same inputs, for real examples."""
    groups: dict[str, list] = {}
    for example in pool.examples:
        if example.audio is None:
            groups.setdefault(example.task, []).append(example)
    free = [e for chosen in groups.values() for e in chosen[:max_examples]]  # the cap is per task, as in evaluate
    if not free:  # e.g. a manifest of audio questions only: fall back to random probe inputs
        probe = check_bypass(model, [0, budget] * max(1, batch_size // 2), seed=seed)
        return BypassCheck(probe.bit_exact, probe.max_abs_logit_diff, probe.n_bypass_rows, "probe")
    half = max(1, batch_size // 2)
    chunks = [free[i: i + half] for i in range(0, len(free), half)]
    sample_rate = model.audio_encoder.sample_rate
    noise = probe_audio(sample_rate, 1, generator=torch.Generator().manual_seed(seed))[0]
    exact, worst = True, 0.0
    with progress_bar("bypass check", len(chunks)) as advance:
        for start, chunk in enumerate(chunks):
            queries = pool.queries(chunk, with_answers=False)
            batch = batcher.for_generation(queries + queries)  # each question twice: without, then with audio
            # The copies hear the pool's own clips when it has any (else a noise clip).
            clips = [pool.media.audio(pool.distractors[(start * half + i) % len(pool.distractors)])
                     if pool.distractors else None for i in range(len(chunk))]
            clips = [noise if clip is None else clip for clip in clips]
            budgets = torch.tensor([0] * len(chunk) + [budget] * len(chunk), device=batch["input_ids"].device)
            reference = model.base(**batch).logits
            fused = model(**batch, token_budget=budgets, audio=[None] * len(chunk) + clips).logits
            for row in range(len(chunk)):
                exact &= torch.equal(fused[row], reference[row])
                worst = max(worst, float((fused[row].double() - reference[row].double()).abs().max()))
            advance()
    return BypassCheck(bool(exact), worst, len(free))


def task_label(row: dict[str, Any], distractor: str = " + distractor") -> str:
    """vl/digit, vl/digit + distractor, audio/digit: the clip's role in the question."""
    if row["kind"] in ("vl", "text") and row["with_audio"]:
        return row["task"] + distractor
    return row["task"]


def task_rows(results: list[TaskResult], tolerance: float, significance: float, bootstrap_samples: int,
              seed: int = 0, bypass_exact: bool = False) -> list[dict[str, Any]]:
    """Per-task statistics and verdict (module docstring); ``bypass_exact`` from this report's check."""
    confidence = 1 - significance
    rows = []
    for index, result in enumerate(results):
        stat = compare(result.base_correct, result.safe_correct, bootstrap_samples, seed=seed + index)
        if not result.with_audio and bypass_exact:
            # No clip: SAFE runs the base's own arithmetic on every such input, not only on these.
            bound, method = 0.0, "bypass"
        else:
            bound, method = lower_bound(result.base_correct, result.safe_correct, confidence, bootstrap_samples,
                                        seed + index)
        rows.append({
            "task": result.task, "kind": result.kind, "with_audio": result.with_audio, "n": stat.n,
            "base_accuracy": stat.base_accuracy, "safe_accuracy": stat.safe_accuracy, "delta": stat.delta,
            "ci95": list(stat.ci95), "p_value": stat.p_value, "test": stat.test,
            "discordant": {"base_only": stat.base_only, "safe_only": stat.safe_only},
            "lower_bound": bound, "bound_method": method,
        })
        if result.safe_budgets:  # how often SAFE spent audio on this task (a policy or gate decides)
            rows[-1]["audio_usage_rate"] = sum(b > 0 for b in result.safe_budgets) / len(result.safe_budgets)
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_holm"] = adjusted
        if row["delta"] < -tolerance and adjusted < significance:
            row["verdict_task"] = "regressed"
        elif row["lower_bound"] >= -tolerance:
            row["verdict_task"] = "non-inferior"
        else:
            row["verdict_task"] = "inconclusive"
            if row["test"] == "mcnemar-exact":
                row["examples_needed"] = examples_needed(row["discordant"]["base_only"],
                                                         row["discordant"]["safe_only"], row["n"], tolerance,
                                                         confidence)
        row["regressed"] = row["verdict_task"] == "regressed"
    order = {"vl": 0, "text": 1, "audio": 2, "av": 3}
    return sorted(rows, key=lambda r: (order.get(r["kind"], 9), r["task"], r["with_audio"]))


def report_verdict(tasks: list[dict[str, Any]], bypass_exact: bool, rule: str) -> tuple[str, list[str], list[str]]:
    """(verdict, regressed task labels, inconclusive retention task labels) under ``rule``."""
    regressions = [task_label(t) for t in tasks if t["verdict_task"] == "regressed"]
    inconclusive = [task_label(t) for t in tasks
                    if t["verdict_task"] == "inconclusive" and t["kind"] in RETENTION_KINDS]
    if regressions or not bypass_exact:
        return "regression", regressions, inconclusive
    if rule == "non-inferiority" and inconclusive:
        return "inconclusive", regressions, inconclusive
    return "pass", regressions, inconclusive


def verdict_from_examples(examples: list[dict[str, Any]], evaluation) -> str:
    """A stage's verdict under ``evaluation.rule`` from its own evaluation (``eval_examples.json``).

    There SAFE's answers to questions without a clip are the base's answers (the bypass), so
    those tasks count as the base by construction; the bypass itself is what ``safe check``
    and ``eval-retention`` verify.
    """
    results = [TaskResult(e["task"], bool(e["with_audio"]), list(e["base_correct"]), list(e["safe_correct"]))
               for e in examples]
    tasks = task_rows(results, evaluation.tolerance, evaluation.significance, evaluation.bootstrap_samples,
                      bypass_exact=True)
    return report_verdict(tasks, True, evaluation.rule)[0]


def build_report(model, batcher, pool: RecordPool, *, budgets: list[int], cost, tolerance: float,
                 significance: float, bootstrap_samples: int, batch_size: int, max_examples: Optional[int],
                 seed: int = 0, context: Optional[dict[str, Any]] = None, policy=None, normalizer=None,
                 gate=None, rule: str = "non-inferiority") -> dict[str, Any]:
    """Base vs SAFE as deployed: with the gate when there is one, else the policy, else always the
    largest budget. Every example is answered at every budget once (``strategies.py``), so the
    report also places always-k, the oracle, the policy and the gate on one accuracy/compute plot.
    """
    answers = answer_at_every_budget(model, batcher, pool, budgets, cost, batch_size, max_examples,
                                     description="base vs SAFE at every budget")
    points, deployed, chosen = compare_strategies(answers, policy, normalizer, gate)
    results = strategy_tasks(answers, chosen)
    bypass = check_bypass_on_examples(model, batcher, pool, max(budgets), batch_size, max_examples, seed)
    tasks = task_rows(results, tolerance, significance, bootstrap_samples, seed, bypass.bit_exact)
    verdict, regressions, inconclusive = report_verdict(tasks, bypass.bit_exact, rule)
    point = next(p for p in points if p["strategy"] == deployed)
    return {
        "schema": SCHEMA,
        **(context or {}),
        "tolerance": tolerance,
        "significance": significance,
        "rule": rule,
        "rule_text": RULE_TEXT[rule],
        "confidence": 1 - significance,
        "correction": "holm",
        "verdict": verdict,
        "regressions": regressions,
        "inconclusive": inconclusive,
        "strategy": deployed,
        "tasks": tasks,
        "bypass": bypass.to_dict(),
        "efficiency": {"policy": deployed, **{k: point[k] for k in (
            "audio_usage_rate", "mean_token_budget", "relative_audio_compute", "relative_end_to_end_compute",
            "end_to_end_vs_base", "examples_with_audio", "accuracy", "audio_accuracy", "retention_accuracy")
            if k in point}},
        "strategies": points,
        "examples": [{"task": r.task, "with_audio": r.with_audio, "base_answers": r.base_answers,
                      "safe_answers": r.safe_answers, "base_correct": r.base_correct,
                      "safe_correct": r.safe_correct, "safe_budgets": r.safe_budgets} for r in results],
    }


CAPABILITY_KINDS = ("audio", "av")  # what the base could not do: promise 2's tasks


def audio_capability(tasks: list[dict[str, Any]], floors: dict[str, float], require_gain: bool) -> dict[str, Any]:
    """Promise 2 (audio capability) as a check: accuracy floors per audio task, and a gain over the base.

    ``floors`` maps an audio or AV task to the lowest SAFE accuracy (a fraction) it may end at;
    ``require_gain`` asks every audio task (kind "audio") to gain over the base beyond chance:
    the one-sided lower confidence bound of SAFE - base, the same bound the retention verdicts
    read, above zero. A run whose encoder never learned to hear fails either, though its VL
    answers are the base's. An unknown task in ``floors`` is a ``ValueError`` naming the known.
    """
    rows = {row["task"]: row for row in tasks if row["kind"] in CAPABILITY_KINDS}
    unknown = sorted(set(floors) - set(rows))
    if unknown:
        raise ValueError(f"no audio or AV task {', '.join(unknown)} in this evaluation (it has: "
                         f"{', '.join(sorted(rows)) or 'none'})")
    failures = []
    for task, floor in sorted(floors.items()):
        accuracy = rows[task]["safe_accuracy"]
        if accuracy < floor:
            failures.append(f"{task} at {accuracy:.1%}, below its floor {floor:.1%}")
    audio_tasks = sorted(task for task, row in rows.items() if row["kind"] == "audio")
    if require_gain:
        for task in audio_tasks:
            row = rows[task]
            if not row["lower_bound"] > 0:
                failures.append(f"{task} gains {100 * row['delta']:+.1f} pt over the base, lower bound "
                                f"{100 * row['lower_bound']:+.1f} pt: no gain shown")
        if not audio_tasks:
            failures.append("no audio task in this evaluation to show a gain on")
    return {"floors": dict(sorted(floors.items())), "require_gain": require_gain,
            "gain_tasks": audio_tasks if require_gain else [], "failures": failures, "ok": not failures}


def capability_line(capability: dict[str, Any]) -> str:
    if capability["ok"]:
        checked = [f"{task} >= {floor:.1%}" for task, floor in capability["floors"].items()]
        if capability["require_gain"]:
            checked.append("a gain on " + ", ".join(capability["gain_tasks"]))
        return "audio capability: ok (" + "; ".join(checked) + ")"
    return "audio capability: FAILED: " + "; ".join(capability["failures"])


def summary_line(report: dict[str, Any]) -> str:
    bypass = report["bypass"]
    parts = [f"verdict: {report['verdict']} ({report['rule']})"]
    if report["regressions"]:
        parts.append(f"regressed: {', '.join(report['regressions'])}")
    if report.get("inconclusive"):
        rows = {task_label(t): t for t in report["tasks"]}
        parts.append("inconclusive: " + ", ".join(_needs(label, rows.get(label)) for label in report["inconclusive"]))
    parts.append(f"bypass {'bit-exact' if bypass['bit_exact'] else 'NOT bit-exact'} "
                 f"(max |Δlogit| {bypass['max_abs_logit_diff']:.3g} over {bypass['n']} audio-free examples)")
    return "; ".join(parts)


def _needs(label: str, row: Optional[dict[str, Any]]) -> str:
    """What an inconclusive task would need to decide: a power estimate at its observed discordance."""
    if row is None or row.get("examples_needed") is None:
        return f"{label} (lower bound {100 * row['lower_bound']:+.1f} pt)" if row else label
    return (f"{label} (lower bound {100 * row['lower_bound']:+.1f} pt from {row['n']} examples; about "
            f"{row['examples_needed']} would decide it with 80% power at the observed discordance)")
