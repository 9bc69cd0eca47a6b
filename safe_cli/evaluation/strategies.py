"""Budget strategies side by side: always-k, the learned policy, the distilled gate, the oracle.

Each test example is answered once at every budget of the set (budget 0 is the base's own
answer); a strategy is then one budget per example, and its accuracy reads the answers at the
budgets it chose. A row's answer does not depend on its batch neighbours (budget-0 rows are
bit-exact to the base, which the bypass check proves; rows with audio are computed row by
row), so this gives the same answers as running each strategy's mixed batches, at a fraction
of the cost: the always-k columns are needed anyway for the Pareto plot.

Compute is summed over the examples that have a clip (examples without one never cost audio),
two ways (``safe_cli.rl.cost``):

- relative audio compute: the encoder, projector and fused layers of the chosen budgets over
  those of always-max; what the policy was trained to save.
- end to end: everything an example costs, the base's image, prefill and decoding steps, the
  decision (the head read at the branch point and the gate's or policy's MLP) and audio, over
  always-max (``relative_end_to_end_compute``) and over the base alone (``end_to_end_vs_base``).
  Decoding is counted for each answer's own tokens (its text re-tokenized, plus the end token).
  This is what a deployment pays, and on a 7B base it is mostly the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data.batches import DEFAULT_MAX_NEW_TOKENS
from ..data.dataset import RecordPool
from ..data.manifest import Record
from ..progress import progress_bar
from ..rl.cost import EndToEndCost
from ..rl.state import PolicyInputs, pool_policy_inputs
from ..training.batches import generate_safe_answers
from .tasks import TaskResult, group_key


@dataclass
class BudgetAnswers:
    """Answers and correctness of every example at every budget, plus the policy's inputs."""

    examples: list[Record]
    budgets: list[int]  # the budget set, 0 first
    answers: dict[int, list[str]]
    correct: dict[int, np.ndarray]  # budget -> (N,) score in [0, 1] (0/1 under exact match)
    inputs: PolicyInputs
    relative_cost: np.ndarray  # (N, len(budgets)): cost of each budget / cost of the largest; 0 without a clip
    groups: list[tuple[str, bool]] = field(default_factory=list)  # (task, has a clip) per example, in order
    # (N, len(budgets)) FLOPs of the whole example at each budget, the decision left out; and the
    # cost model that prices a decision
    end_to_end: Optional[np.ndarray] = None
    cost: Optional[EndToEndCost] = None

    @property
    def has_clip(self) -> np.ndarray:
        return self.inputs.has_clip.numpy()

    @property
    def needs_audio(self) -> np.ndarray:
        return np.array([e.needs_audio for e in self.examples], dtype=bool)

    def oracle(self) -> np.ndarray:
        """The largest budget where the question needs audio, 0 elsewhere."""
        return np.where(self.needs_audio & self.has_clip, max(self.budgets), 0)

    def always(self, budget: int) -> np.ndarray:
        return np.where(self.has_clip, budget, 0)


def answer_at_every_budget(model, batcher, pool: RecordPool, budgets: Sequence[int], cost: EndToEndCost,
                           batch_size: int = 32, max_examples: Optional[int] = None,
                           description: str = "answers at every budget") -> BudgetAnswers:
    budgets = sorted(set(int(b) for b in budgets) | {0})
    grouped: dict[tuple[str, bool], list[Record]] = {}
    for example in pool.examples:
        grouped.setdefault(group_key(example), []).append(example)
    if max_examples:
        grouped = {key: chosen[:max_examples] for key, chosen in grouped.items()}
    examples = [e for chosen in grouped.values() for e in chosen]
    chunks = [(key, chosen[i: i + batch_size]) for key, chosen in grouped.items()
              for i in range(0, len(chosen), batch_size)]
    answers: dict[int, list[str]] = {b: [] for b in budgets}
    inputs = []
    with progress_bar(description, len(chunks)) as advance:
        for (task, has_clip), chunk in chunks:
            inputs.append(pool_policy_inputs(model, batcher, pool, chunk))
            base = generate_safe_answers(model, batcher, pool, chunk, budget=0)
            for budget in budgets:
                answers[budget] += (generate_safe_answers(model, batcher, pool, chunk, budget=budget)
                                    if budget and has_clip else base)
            advance()
    state = PolicyInputs.concat(inputs)
    correct = {b: np.asarray(pool.scores(answers[b], examples), dtype=np.float64) for b in budgets}
    relative = np.zeros((len(examples), len(budgets)))
    end_to_end = np.zeros((len(examples), len(budgets)))
    cap = batcher.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    # Each answer's decoding steps: its tokens and the end token, at most the cap (one tokenizer
    # call per budget; rows without a clip share the budget-0 text, so the count is the same).
    steps = {b: [min(cap, len(ids) + 1) for ids in
                 batcher.tokenizer(answers[b], add_special_tokens=False)["input_ids"]] for b in budgets}
    for row in range(len(examples)):
        length, seconds = int(state.text_length[row]), float(state.clip_seconds[row])
        has_clip, has_image = bool(state.has_clip[row]), bool(state.has_image[row])
        if has_clip:
            relative[row] = [cost.audio.relative(b, length, seconds) for b in budgets]
        for column, budget in enumerate(budgets):
            end_to_end[row, column] = cost.flops(budget if has_clip else 0, length, seconds, steps[budget][row],
                                                 has_image)
    return BudgetAnswers(examples, budgets, answers, correct, state, relative, [group_key(e) for e in examples],
                         end_to_end, cost)


def strategy_point(answers: BudgetAnswers, name: str, chosen: np.ndarray, decider=None, **extra: Any) -> dict[str, Any]:
    """Accuracy and compute of one budget per example, over the examples that have a clip;
    ``decider`` is the network (gate or policy) that chose them, whose decision is counted."""
    chosen = np.asarray(chosen)
    clip = answers.has_clip
    column = {b: i for i, b in enumerate(answers.budgets)}
    rows, columns = np.arange(len(chosen)), np.array([column[int(b)] for b in chosen], dtype=np.int64)
    correct = np.array([answers.correct[int(b)][i] for i, b in enumerate(chosen)])
    cost = answers.relative_cost[rows, columns]
    max_cost = answers.relative_cost[:, -1][clip].sum()
    needs = answers.needs_audio & clip
    distractor = ~answers.needs_audio & clip
    compute = {}
    if answers.end_to_end is not None and clip.any():
        decision = answers.cost.decision_flops(decider) if decider is not None else 0.0
        spent = answers.end_to_end[rows, columns][clip].sum() + decision * int(clip.sum())
        compute = {"relative_end_to_end_compute": float(spent / answers.end_to_end[clip, -1].sum()),
                   "end_to_end_vs_base": float(spent / answers.end_to_end[clip, 0].sum())}
    return {
        "strategy": name, **extra,
        "accuracy": float(correct[clip].mean()) if clip.any() else float("nan"),
        "audio_accuracy": float(correct[needs].mean()) if needs.any() else float("nan"),
        "retention_accuracy": float(correct[distractor].mean()) if distractor.any() else float("nan"),
        "audio_usage_rate": float((chosen[clip] > 0).mean()) if clip.any() else 0.0,
        "mean_token_budget": float(chosen[clip].mean()) if clip.any() else 0.0,
        "relative_audio_compute": float(cost[clip].sum() / max_cost) if max_cost > 0 else 0.0,
        **compute,
        "examples_with_audio": int(clip.sum()),
    }


def strategy_tasks(answers: BudgetAnswers, chosen: np.ndarray) -> list[TaskResult]:
    """Base (budget 0) vs SAFE at the chosen budgets, grouped like ``evaluate``'s results."""
    results: dict[tuple[str, bool], TaskResult] = {}
    for row, key in enumerate(answers.groups):
        result = results.setdefault(key, TaskResult(*key))
        budget = int(chosen[row])
        result.base_correct.append(float(answers.correct[0][row]))
        result.safe_correct.append(float(answers.correct[budget][row]))
        result.base_answers.append(answers.answers[0][row])
        result.safe_answers.append(answers.answers[budget][row])
        result.safe_budgets.append(budget)
    return list(results.values())


def fixed_strategies(answers: BudgetAnswers) -> list[dict[str, Any]]:
    """always-k for every k of the set (always-0 is the base) and the oracle."""
    points = [strategy_point(answers, f"always-{b}", answers.always(b), kind="fixed") for b in answers.budgets]
    points.append(strategy_point(answers, "oracle", answers.oracle(), kind="oracle"))
    return points


@torch.no_grad()
def policy_budgets(policy, normalizer, inputs: PolicyInputs) -> np.ndarray:
    """The policy's most likely budget per example (deployment is deterministic)."""
    actions = policy.get_actions(normalizer(inputs.features), deterministic=True, has_audio=inputs.has_clip)
    return actions.budgets.cpu().numpy()


GATE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def compare_strategies(answers: BudgetAnswers, policy=None, normalizer=None, gate=None
                       ) -> tuple[list[dict[str, Any]], str, np.ndarray]:
    """Every strategy's point; and the one SAFE deploys (gate > policy > always-max) with its budgets.

    The gate is also scored at ``GATE_THRESHOLDS`` (its accuracy/compute curve); its
    calibrated threshold is the point called "gate".
    """
    points = fixed_strategies(answers)
    deployed, chosen = f"always-{max(answers.budgets)}", answers.always(max(answers.budgets))
    if policy is not None:
        chosen = policy_budgets(policy, normalizer, answers.inputs)
        deployed = "policy"
        points.append(strategy_point(answers, "policy", chosen, decider=policy, kind="policy"))
    if gate is not None:
        for threshold in GATE_THRESHOLDS:
            budgets = gate.decide(answers.inputs.features, answers.inputs.has_clip, threshold).numpy()
            points.append(strategy_point(answers, f"gate@{threshold:g}", budgets, decider=gate.net,
                                         kind="gate-curve", threshold=threshold))
        chosen = gate.decide(answers.inputs.features, answers.inputs.has_clip).numpy()
        deployed = "gate"
        points.append(strategy_point(answers, "gate", chosen, decider=gate.net, kind="gate", threshold=gate.threshold))
    return points, deployed, chosen
