"""Stage A's inputs for each step, made ahead in DataLoader worker processes.

A step's batch depends only on (seed, step): the records are drawn from a generator seeded by
both, with replacement, then a random positive budget per row, in the same order on every
rank. So the data position of a checkpoint is its step number, and a resumed run sees exactly
the batches the uninterrupted one saw, with or without workers.

Grouping by modality and length (``group_by_modality_length``, as LLaVA's trainer does): a row
with an image is ~600 tokens at LLaVA-1.5's shape, an audio-only question ~18, so a batch mixing
them is mostly padding. The step's rows (every micro-batch of every rank) are sorted by (image,
text length) before they are cut into micro-batches, and a micro-batch that still mixes rows
with and without an image is split in two. Which rows a step trains on does not change, only
how they are batched: the loss is normalised by the step's answer-token count (stage_a.py), so
the update is the same up to rounding. Rank r takes every world-th row of each micro-batch's
global rows, so ranks get rows of the same lengths and none waits on another's padding. The
sort is a function of the drawn rows alone, so grouping keeps the exact resume.

Workers read the records (by byte offset), decode the images and clips, run the base's
processor and find the answer positions; the training process only moves tensors to the
device. A record whose image or clip does not decode is dropped from its batch and reported
with the batch, never raised.
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
from ..data.manifest import Record
from .batches import answer_positions, draw_budgets, draw_rows, modality_length_key, training_batch
from .teacher_cache import KEYS as TEACHER_KEYS
from .teacher_cache import row_keys


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
    group_by_modality_length: bool = True


class StepBatches(Dataset):
    """``dataset[step]``: {"micro": [batch or None], "retention": [batch or None] or None,
    "bad": [(record id, reason)], "rows": rows drawn on this rank}.

    Each batch carries ``answer_index`` / ``answer_targets`` (``answer_positions``) and
    ``answer_tokens``, its count of labelled tokens (a host number: the step's normaliser is
    summed without a device sync).
    """

    def __init__(self, batcher: PromptBatcher, alignment: RecordPool, retention: Optional[RecordPool],
                 plan: StepPlan, alignment_weights: Optional[np.ndarray] = None,
                 retention_weights: Optional[np.ndarray] = None, teacher_keys: bool = False):
        self.teacher_keys = teacher_keys  # retention batches carry a key a row for the teacher cache
        self.batcher = copy.copy(batcher)
        self.batcher.device = torch.device("cpu")  # workers build CPU tensors; the trainer moves them
        self.alignment, self.retention, self.plan = alignment, retention, plan
        self.alignment_weights, self.retention_weights = alignment_weights, retention_weights

    def __len__(self) -> int:  # steps are indexed from 1; the sampler says which
        return 2**62

    def _draw(self, pool: RecordPool, weights, rng: np.random.Generator, batches: int,
              distractors: Optional[np.random.Generator] = None) -> list[list[tuple[Record, int]]]:
        """``batches`` global batches of (record, budget) drawn for the step, grouped when asked."""
        plan = self.plan
        total = plan.batch_size * plan.world
        chosen = draw_rows(rng, pool.examples, total * batches, weights)
        if distractors is not None:
            # Records without a clip of their own get one from the training audio, from their own
            # stream, so a corpus whose records all carry clips draws exactly as without this.
            chosen = with_distractors(chosen, pool.distractors, distractors)
        rows = list(zip(chosen, draw_budgets(rng, plan.positive_budgets, chosen)))
        if plan.group_by_modality_length:
            # Stable: equal keys keep their draw order, so the grouping is a function of the draw.
            rows.sort(key=lambda row: modality_length_key(row[0]))
        return [rows[i * total:(i + 1) * total] for i in range(batches)]

    def _mine(self, rows: list) -> list[list]:
        """This rank's rows of one global batch, split where rows with an image meet rows without."""
        plan = self.plan
        if not plan.group_by_modality_length:
            return [rows[plan.rank * plan.batch_size:(plan.rank + 1) * plan.batch_size]]
        mine = rows[plan.rank::plan.world]
        with_image = [row for row in mine if row[0].image is not None]
        without = [row for row in mine if row[0].image is None]
        return [part for part in (without, with_image) if part]

    def _batch(self, pool: RecordPool, rows: list, bad: list, keys: bool = False) -> Optional[dict]:
        kept, broken = pool.usable([record for record, _ in rows])
        bad += [(record.id, reason) for record, reason in broken]
        if not kept:
            return None
        keep = {id(r) for r in kept}
        budgets = [budget for record, budget in rows if id(record) in keep]
        batch = training_batch(self.batcher, pool, kept, budgets)
        batch["answer_index"], batch["answer_targets"] = answer_positions(batch["labels"])
        batch["answer_tokens"] = int((batch["answer_targets"] != -100).sum())
        batch["rows"] = len(kept)
        if keys:
            batch[TEACHER_KEYS] = row_keys(batch, self.batcher.image_token_id)
        return batch

    def __getitem__(self, step: int) -> dict[str, Any]:
        plan = self.plan
        rng = np.random.default_rng([plan.seed, step])
        bad: list = []
        micro = [self._batch(self.alignment, part, bad)
                 for rows in self._draw(self.alignment, self.alignment_weights, rng, plan.grad_accum)
                 for part in self._mine(rows)]
        retention = None
        if plan.uses_retention and self.retention is not None and step % plan.retention_every == 0:
            rows, = self._draw(self.retention, self.retention_weights, rng, 1,
                               distractors=np.random.default_rng([plan.seed, step, 1]))
            retention = [self._batch(self.retention, part, bad, self.teacher_keys) for part in self._mine(rows)]
        return {"micro": micro, "retention": retention, "bad": bad,
                "rows": plan.batch_size * (plan.grad_accum + (retention is not None))}


def _quiet_worker(_: int) -> None:
    # SIGTERM/SIGUSR1 are the trainer's to handle (checkpoint, then stop); a worker that died of
    # one first would turn a clean stop into a DataLoader crash.
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def step_loader(dataset: StepBatches, first: int, last: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """Yields ``dataset[step]`` for step = first..last, prepared ``workers`` processes ahead.

    ``pin_memory`` (for a CUDA device): batches land in page-locked memory, so ``to_device``'s
    copies are asynchronous and overlap the previous step's kernels.
    """
    return DataLoader(dataset, batch_size=None, sampler=range(first, last + 1), num_workers=workers,
                      worker_init_fn=_quiet_worker if workers else None, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, persistent_workers=False)


HOST_KEYS = ("token_budget",)  # read as Python numbers by the model: kept on the host


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device``, asynchronously from pinned memory (waveform lists stay as they are:
    the encoder takes them; the budgets stay on the host)."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) and key not in HOST_KEYS else value
            for key, value in batch.items()}


def drop(batch: dict, keys: Sequence[str]) -> dict:
    return {k: v for k, v in batch.items() if k not in keys}
