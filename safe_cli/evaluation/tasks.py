"""Per-task score of the frozen base and of SAFE on the same test examples, paired.

Every example is answered twice: by the base, which never hears audio, and by SAFE, with the
example's clip at a given token budget (rows without a clip get budget 0, the bypass). For VL
and text questions the clip, when present, is a *distractor*: SAFE must answer as the base does.
Per-example scores are kept, not only the means, so paired statistics can be computed. A
score is in [0, 1] under the task's metric (``evaluation.metrics``): 0/1 for exact match, a
fraction for token F1, chrF, BLEU or 1 - WER. ``base_correct`` / ``safe_correct`` hold them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..data.dataset import RecordPool
from ..data.manifest import Record
from ..progress import progress_bar
from ..training.batches import generate_safe_answers


@dataclass
class TaskResult:
    task: str
    with_audio: bool
    base_correct: list[float] = field(default_factory=list)  # per-example scores (0/1 for exact match)
    safe_correct: list[float] = field(default_factory=list)
    base_answers: list[str] = field(default_factory=list)
    safe_answers: list[str] = field(default_factory=list)
    safe_budgets: list[int] = field(default_factory=list)  # SAFE's token budget per example, when it varies

    @property
    def kind(self) -> str:
        return self.task.split("/")[0]

    @property
    def n(self) -> int:
        return len(self.safe_correct)

    @property
    def base_accuracy(self) -> float:
        return float(np.mean(self.base_correct)) if self.base_correct else float("nan")

    @property
    def safe_accuracy(self) -> float:
        return float(np.mean(self.safe_correct)) if self.safe_correct else float("nan")

    def summary(self) -> dict:
        return {"task": self.task, "kind": self.kind, "with_audio": self.with_audio, "n": self.n,
                "base_accuracy": self.base_accuracy, "safe_accuracy": self.safe_accuracy,
                "delta": self.safe_accuracy - self.base_accuracy}

    def to_dict(self) -> dict:
        return {**self.summary(), **asdict(self)}


def group_key(example: Record) -> tuple[str, bool]:
    return example.task, example.audio is not None


def evaluate(model, batcher, pool: RecordPool, budget: int, batch_size: int = 64,
             max_examples: Optional[int] = None, description: str = "evaluate") -> list[TaskResult]:
    """Base and SAFE answers for every example of ``pool``, grouped by (task, has a clip)."""
    groups: dict[tuple[str, bool], list[Record]] = {}
    for example in pool.examples:
        groups.setdefault(group_key(example), []).append(example)
    if max_examples:
        groups = {key: chosen[:max_examples] for key, chosen in groups.items()}
    results = {key: TaskResult(*key) for key in groups}
    batches = [(key, chosen[i: i + batch_size]) for key, chosen in groups.items()
               for i in range(0, len(chosen), batch_size)]
    with progress_bar(description, len(batches)) as advance:
        for key, chunk in batches:
            base = generate_safe_answers(model, batcher, pool, chunk, budget=0)
            safe = generate_safe_answers(model, batcher, pool, chunk, budget=budget) if key[1] else base
            results[key].base_correct += pool.scores(base, chunk)
            results[key].safe_correct += pool.scores(safe, chunk)
            results[key].base_answers += base
            results[key].safe_answers += safe
            advance()
    return list(results.values())


def audio_accuracy_by_budget(model, batcher, pool: RecordPool, budgets: Sequence[int], task: Optional[str] = None,
                             batch_size: int = 64, max_examples: Optional[int] = None) -> dict[int, float]:
    """SAFE's score on one audio task at each positive budget (nested tokens: all should work)."""
    task = task or audio_task(pool)
    chosen = [e for e in pool.examples if e.task == task][:max_examples]
    out = {}
    for budget in budgets:
        correct = []
        for i in range(0, len(chosen), batch_size):
            chunk = chosen[i: i + batch_size]
            answers = generate_safe_answers(model, batcher, pool, chunk, budget=budget)
            correct += pool.scores(answers, chunk)
        out[int(budget)] = float(np.mean(correct)) if correct else float("nan")
    return out


def audio_task(pool: RecordPool) -> Optional[str]:
    """The task the by-budget figures follow: audio/digit on AV-digits, else the first audio task."""
    tasks = [e.task for e in pool.examples if e.kind == "audio"]
    return "audio/digit" if "audio/digit" in tasks else (tasks[0] if tasks else None)
