"""Answer scoring: VQA-style normalisation and exact-match accuracy.

``normalize_answer`` lower-cases, turns punctuation into spaces (keeping a decimal point between
digits, a minus sign before a digit and dropping a thousands comma), drops the articles a/an/the
and spells number words zero..twenty as digits, so "Three." == "3" and "The cat" == "cat".
"""

from __future__ import annotations

import re
from typing import Sequence, Union

_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
        " fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact-match scoring (see the module docstring).

    An answer made only of articles (say the option letter "A") keeps them rather than
    normalising to nothing.
    """
    text = _THOUSANDS_COMMA.sub("", str(text).lower().strip())
    chars = []
    n = len(text)
    for i, ch in enumerate(text):
        if ch.isalnum() or ch.isspace():
            chars.append(ch)
        elif ch == "." and 0 < i < n - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            chars.append(ch)
        elif ch == "-" and i < n - 1 and text[i + 1].isdigit():
            chars.append(ch)
        else:
            chars.append(" ")
    tokens = "".join(chars).split()
    kept = [t for t in tokens if t not in _ARTICLES]
    if kept:
        tokens = kept
    return " ".join(_NUMBER_WORDS.get(t, t) for t in tokens)


References = Union[str, Sequence[str]]


def _as_references(references: References) -> list[str]:
    # A bare string is one reference, not a sequence of one-character references.
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("no reference answers")
    return refs


def is_correct(prediction: str, references: References) -> bool:
    """True when the normalised prediction equals any normalised reference.

    A prediction that normalises to nothing (empty, or only punctuation) is never correct.
    """
    refs = _as_references(references)
    pred = normalize_answer(prediction)
    if not pred:
        return False
    return any(pred == normalize_answer(r) for r in refs)


def accuracy(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Fraction of predictions that are correct; ValueError on a length mismatch or no examples."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("expected sequences of predictions and references, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no examples")
    correct = sum(is_correct(p, r) for p, r in zip(predictions, references))
    return correct / len(predictions)


# --------------------------------------------------------------------------- per-task metrics

METRICS = ("exact", "contains", "token_f1", "bleu", "chrf", "wer")
BINARY_METRICS = ("exact", "contains")


def metric_for(task: str, metrics: dict[str, str]) -> str:
    """The profile's metric of a task: its own entry, else its kind's, else exact match."""
    return metrics.get(task) or metrics.get(task.split("/", 1)[0]) or "exact"


def _token_f1(prediction: str, reference: str) -> float:
    from collections import Counter

    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, references: References, metric: str = "exact") -> float:
    """One answer's score in [0, 1] under ``metric`` (the best over the references).

    exact and contains are 0/1 on normalised text; token_f1 is SQuAD's word-overlap F1;
    bleu and chrf are sacrebleu's sentence scores / 100; wer is 1 - jiwer's word error rate
    on normalised text, floored at 0.
    """
    refs = _as_references(references)
    if metric == "exact":
        return float(is_correct(prediction, refs))
    if metric == "contains":
        pred = f" {normalize_answer(prediction)} "
        return float(bool(pred.strip()) and any(f" {normalize_answer(r)} " in pred for r in refs))
    if metric == "token_f1":
        return max(_token_f1(prediction, r) for r in refs)
    if metric in ("bleu", "chrf"):
        import sacrebleu

        scorer = sacrebleu.sentence_bleu if metric == "bleu" else sacrebleu.sentence_chrf
        return float(scorer(prediction.strip(), [r.strip() for r in refs]).score) / 100.0
    if metric == "wer":
        import jiwer

        pred = normalize_answer(prediction)
        best = 0.0
        for reference in refs:
            ref = normalize_answer(reference)
            if not ref:
                continue
            error = jiwer.wer(ref, pred) if pred else 1.0
            best = max(best, max(0.0, 1.0 - error))
        return best
    raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
