"""Records -> SAFEModel inputs: the base's prompt tokens, the clips, the budgets.

The prompt is the base's own (``PromptBatcher``): audio reaches the LLM only through the
fusion adapters' cross-attention, never as text, so a retention example with a distractor clip
has exactly the base's input tokens, and the teacher (the base without audio) and the student
(SAFE with the clip) are compared position by position.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..data.batches import IGNORE_INDEX, PromptBatcher, generate_answers
from ..data.dataset import RecordPool, Records
from ..data.manifest import Record


def training_batch(batcher: PromptBatcher, pool: RecordPool, chosen: Sequence[Record],
                   budgets: Sequence[int]) -> dict:
    """Inputs with ``labels`` on the answer tokens, the clips and a budget per row.

    The budgets stay on the CPU whatever the device: the model reads them as Python numbers
    (which rows to fuse), and a budget on the GPU would cost a device sync to read back.
    """
    batch = batcher.for_training(pool.queries(chosen, with_answers=True))
    batch.update(pool.audio_inputs(chosen, batch["input_ids"].device))
    batch["token_budget"] = torch.as_tensor(list(budgets), dtype=torch.long)
    return batch


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a batch's answer tokens are predicted: ``index`` (B, P) and ``targets`` (B, P).

    Logit t predicts token t+1, so row r's positions are the t with ``labels[r, t+1]`` labelled,
    and ``targets`` holds those tokens. P is the largest count of any row; a row with fewer
    repeats its last position, with target -100 there (ignored). Passed to the base as
    ``logits_to_keep``, the LM head and the loss run on these P positions instead of all L:
    16-24 of 5,120 positions a micro-batch at LLaVA-7B's shape.
    """
    scored = labels[:, 1:] != IGNORE_INDEX
    counts = scored.sum(1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    index = torch.zeros(labels.shape[0], width, dtype=torch.long)
    targets = torch.full((labels.shape[0], width), IGNORE_INDEX, dtype=torch.long)
    for row in range(labels.shape[0]):
        positions = scored[row].nonzero().flatten().cpu()
        if not len(positions):
            continue
        index[row, :len(positions)] = positions
        index[row, len(positions):] = positions[-1]
        targets[row, :len(positions)] = labels[row, 1:].cpu()[positions]
    return index.to(labels.device), targets.to(labels.device)


def rows_exact(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool from logits (B, P, V) at ``answer_positions``: every answer token is the argmax."""
    scored = targets != IGNORE_INDEX
    return ((logits.argmax(-1) == targets) | ~scored).all(1) & scored.any(1)


def modality_length_key(record: Record) -> tuple[bool, int]:
    """What a row's padded length depends on: an image (hundreds of tokens: 576 in LLaVA-1.5),
    then the text's length in characters (a tokenizer-free proxy for its tokens)."""
    text = len(record.question) + len(record.answer) + len(record.system or "")
    text += sum(len(q) + len(a) for q, a in record.history)
    return record.image is not None, text


def draw_budgets(rng: np.random.Generator, positive_budgets: Sequence[int], chosen: Sequence[Record]) -> list[int]:
    """A random positive budget for each row with a clip (nested tokens: every k must work); 0 otherwise."""
    return [int(rng.choice(positive_budgets)) if r.audio is not None else 0 for r in chosen]


def sampling_weights(records: Records, task_weights: dict[str, float]) -> Optional[np.ndarray]:
    """Per-record draw probabilities giving each task its share (``data.task_weights``); None: uniform."""
    if not task_weights or not len(records):
        return None
    tasks = records.tasks
    names, counts = np.unique(tasks.astype(str), return_counts=True)
    share = {name: float(task_weights.get(name, task_weights.get(name.split("/", 1)[0], 1.0))) for name in names}
    per_task = {name: share[name] / count for name, count in zip(names, counts)}
    weights = np.asarray([per_task[str(t)] for t in tasks], dtype=np.float64)
    if weights.sum() <= 0:
        return None
    return weights / weights.sum()


def draw_rows(rng: np.random.Generator, records: Records, size: int,
              weights: Optional[np.ndarray] = None) -> list[Record]:
    """``size`` records drawn with replacement (uniformly, or by ``weights``)."""
    rows = rng.integers(len(records), size=size) if weights is None else rng.choice(len(records), size=size, p=weights)
    return [records[int(i)] for i in rows]


def generate_safe_answers(model, batcher: PromptBatcher, pool: RecordPool, chosen: Sequence[Record],
                          budget: Union[int, Sequence[int]], max_new_tokens: Optional[int] = None) -> list[str]:
    """Greedy answers of the SAFE model, each row with ``budget`` audio tokens (one for all rows, or
    one per row) if it has a clip."""
    per_row = [budget] * len(chosen) if isinstance(budget, int) else [int(b) for b in budget]
    if max_new_tokens is None:
        max_new_tokens = batcher.new_tokens([r.task for r in chosen], [r.answers for r in chosen])
    budgets = torch.as_tensor([b if r.audio is not None else 0 for b, r in zip(per_row, chosen)],
                              device=batcher.device)
    return generate_answers(model, batcher, pool.queries(chosen, with_answers=False), max_new_tokens,
                            token_budget=budgets, **pool.audio_inputs(chosen, batcher.device))


def row_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every answer token of the row is the argmax (teacher-forced exact match).

    Greedy decoding of a row gives its answer exactly when this holds, so it scores a row in
    one forward instead of a generation loop. Rows without answer tokens are False.
    """
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return ((predicted == target) | ~scored).all(1) & scored.any(1)
