"""Stage A's inputs for each step, made ahead in DataLoader worker processes.

A step's batch depends only on (seed, step): the records are drawn from a generator seeded by
both, with replacement, then a random positive budget per row, in the same order on every
rank (each rank keeps its slice). So the data position of a checkpoint is its step number,
and a resumed run sees exactly the batches the uninterrupted one saw, with or without workers.

Workers read the records (by byte offset), decode the images and clips, and run the base's
processor; the training process only moves tensors to the device. A record whose image or
clip does not decode is dropped from its batch and reported with the batch, never raised.
"""

from __future__ import annotations

import copy
import signal
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.batches import PromptBatcher
from ..data.dataset import RecordPool, with_distractors
from .batches import draw_budgets, draw_rows, training_batch


@dataclass(frozen=True)
class StepPlan:
    seed: int
    batch_size: int  # per rank
    world: int
    rank: int
    grad_accum: int
    retention_every: int
    uses_retention: bool
    positive_budgets: tuple[int, ...]


class StepBatches(Dataset):
    """``dataset[step]``: {"micro": [batch or None] * grad_accum, "retention": batch or None,
    "bad": [(record id, reason)], "rows": rows drawn on this rank}."""

    def __init__(self, batcher: PromptBatcher, alignment: RecordPool, retention: Optional[RecordPool],
                 plan: StepPlan, alignment_weights: Optional[np.ndarray] = None,
                 retention_weights: Optional[np.ndarray] = None):
        self.batcher = copy.copy(batcher)
        self.batcher.device = torch.device("cpu")  # workers build CPU tensors; the trainer moves them
        self.alignment, self.retention, self.plan = alignment, retention, plan
        self.alignment_weights, self.retention_weights = alignment_weights, retention_weights

    def __len__(self) -> int:  # steps are indexed from 1; the sampler says which
        return 2**62

    def _pick(self, pool: RecordPool, weights, rng: np.random.Generator, distractors: Optional[np.random.Generator] = None):
        plan = self.plan
        total = plan.batch_size * plan.world
        chosen = draw_rows(rng, pool.examples, total, weights)
        if distractors is not None:
            # Records without a clip of their own get one from the training audio, from their own
            # stream, so a corpus whose records all carry clips draws exactly as without this.
            chosen = with_distractors(chosen, pool.distractors, distractors)
        budgets = draw_budgets(rng, plan.positive_budgets, chosen)
        rows = slice(plan.rank * plan.batch_size, (plan.rank + 1) * plan.batch_size)
        return chosen[rows], budgets[rows]

    def _batch(self, pool: RecordPool, chosen, budgets, bad: list) -> Optional[dict]:
        kept, broken = pool.usable(chosen)
        bad += [(record.id, reason) for record, reason in broken]
        if not kept:
            return None
        if broken:
            keep = {id(r) for r in kept}
            budgets = [b for r, b in zip(chosen, budgets) if id(r) in keep]
        batch = training_batch(self.batcher, pool, kept, budgets)
        batch["rows"] = len(kept)
        return batch

    def __getitem__(self, step: int) -> dict[str, Any]:
        plan = self.plan
        rng = np.random.default_rng([plan.seed, step])
        bad: list = []
        micro = []
        for _ in range(plan.grad_accum):
            chosen, budgets = self._pick(self.alignment, self.alignment_weights, rng)
            micro.append(self._batch(self.alignment, chosen, budgets, bad))
        retention = None
        if plan.uses_retention and self.retention is not None and step % plan.retention_every == 0:
            chosen, budgets = self._pick(self.retention, self.retention_weights, rng,
                                         distractors=np.random.default_rng([plan.seed, step, 1]))
            retention = self._batch(self.retention, chosen, budgets, bad)
        return {"micro": micro, "retention": retention, "bad": bad,
                "rows": plan.batch_size * (plan.grad_accum + (retention is not None))}


def _quiet_worker(_: int) -> None:
    # SIGTERM/SIGUSR1 are the trainer's to handle (checkpoint, then stop); a worker that died of
    # one first would turn a clean stop into a DataLoader crash.
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def step_loader(dataset: StepBatches, first: int, last: int, workers: int) -> DataLoader:
    """Yields ``dataset[step]`` for step = first..last, prepared ``workers`` processes ahead."""
    return DataLoader(dataset, batch_size=None, sampler=range(first, last + 1), num_workers=workers,
                      worker_init_fn=_quiet_worker if workers else None,
                      prefetch_factor=2 if workers else None, persistent_workers=False)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (waveform lists stay as they are: the encoder takes them)."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def drop(batch: dict, keys: Sequence[str]) -> dict:
    return {k: v for k, v in batch.items() if k not in keys}
