"""What one Stage A step computes, and on which rows (issue 27: a step that wastes nothing).

* The loss runs on the answer positions only (``logits_to_keep``) and equals the base's own
  full-logits loss.
* Grouping by modality and length batches the same rows as the draw, with less padding, and
  gives the same gradient as the ungrouped step.
* Checkpoints beyond ``keep_last`` are deleted, and a run resumes from the newest.

The exact resume with grouping is ``test_stage_a.py``'s killed-run test (grouping is on by
default there).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from safe_cli.config import load_profile
from safe_cli.training.batches import answer_positions, modality_length_key
from safe_cli.training.stage_a import BATCH_EXTRAS, TRAINING_FORWARD, StageATrainer, answer_loss, train_stage_a
from safe_cli.training.step_data import drop, to_device

sys.path.insert(0, str(Path(__file__).parent))
from conftest import FAST  # noqa: E402

# Steps of 2 micro-batches of 6 rows: enough rows that a step mixes audio-only and AV questions.
STEP = FAST + ["training.stage_a.batch_size=6", "training.stage_a.grad_accum=2", "data.num_train=24"]


def _trainer(tmp_path, *extra: str, name: str = "run", variant: str = "soft_retention") -> StageATrainer:
    trainer = StageATrainer(load_profile("demo", STEP + list(extra)), variant=variant, seed=0,
                            run_dir=tmp_path / name)
    trainer.build()
    return trainer


def test_answer_positions_pick_every_labelled_token_once():
    labels = torch.tensor([[-100, -100, 7, 8, -100],
                           [-100, 5, -100, -100, 9],
                           [-100, -100, -100, -100, -100]])
    index, targets = answer_positions(labels)
    # Logit t predicts token t + 1; the short row repeats its last position, ignored (-100).
    assert index.tolist() == [[1, 2], [0, 3], [0, 0]]
    assert targets.tolist() == [[7, 8], [5, 9], [-100, -100]]


def test_the_loss_at_answer_positions_equals_the_full_logits_loss(cache, tmp_path):
    trainer = _trainer(tmp_path)
    batch = to_device(trainer.step_batches()[1]["micro"][0], trainer.device)
    inputs = drop(batch, BATCH_EXTRAS)
    with torch.no_grad():
        full = trainer.model(**inputs, labels=batch["labels"]).loss  # Hugging Face's mean over answer tokens
        kept = trainer.model(**inputs, **TRAINING_FORWARD, logits_to_keep=batch["answer_index"]).logits
    assert kept.shape[:2] == batch["answer_index"].shape and kept.shape[1] < batch["input_ids"].shape[1]
    ours = answer_loss(kept, batch["answer_targets"], batch["answer_tokens"])
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)


def _rows(step: dict) -> list[list[tuple]]:
    """Each micro-batch's rows as (token ids without padding, budget)."""
    out = []
    for batch in step["micro"]:
        ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        out.append([(tuple(i), int(b)) for i, b in zip(ids, batch["token_budget"])])
    return out


def test_grouping_batches_the_drawn_rows_by_image_and_length(cache, tmp_path):
    grouped = _trainer(tmp_path, name="grouped")
    plain = _trainer(tmp_path, "training.stage_a.group_by_modality_length=false", name="plain")
    for step in (1, 2, 3):
        a, b = grouped.step_batches()[step], plain.step_batches()[step]
        # The same rows with the same budgets: only how they are batched differs.
        assert Counter(r for m in _rows(a) for r in m) == Counter(r for m in _rows(b) for r in m)
        assert len(b["micro"]) == 2 and sum(m["rows"] for m in a["micro"]) == 12
        image = grouped.model.base.image_token_id
        for batch in a["micro"]:
            has_image = (batch["input_ids"] == image).any(1)
            assert bool(has_image.all()) or not bool(has_image.any()), "a micro-batch mixes rows with and without an image"
        padding = [sum(int((m["attention_mask"] == 0).sum()) for m in s["micro"]) for s in (a, b)]
        assert padding[0] < padding[1], padding
        # Rows sorted by (image, text length) across the step's micro-batches.
        keys = [modality_length_key(r) for r in _records(grouped, step)]
        assert keys == sorted(keys)


def _records(trainer: StageATrainer, step: int) -> list:
    """The step's alignment records in batch order, as the data path grouped them."""
    data = trainer.step_batches()
    batches = data._draw(data.alignment, data.alignment_weights, np.random.default_rng([trainer.seed, step]),
                         trainer.cfg.grad_accum)
    return [record for rows in batches for record, _ in rows]


def _gradient(trainer: StageATrainer, step: int) -> dict[str, torch.Tensor]:
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    inputs = trainer.step_batches()[step]
    micro = [b for b in inputs["micro"] if b is not None]
    retention = [b for b in inputs["retention"] or [] if b is not None]
    trainer.losses.backward(micro, retention, sum(b["answer_tokens"] for b in micro),
                            sum(b["answer_tokens"] for b in retention))
    return {name: p.grad.detach().clone() for name, p in trainer.trainable.items() if p.grad is not None}


def test_grouped_and_ungrouped_steps_give_the_same_gradient(cache, tmp_path):
    """The loss is the step's token mean, so batching the same rows differently changes rounding only."""
    grouped = _gradient(_trainer(tmp_path, name="grouped"), 2)
    plain = _gradient(_trainer(tmp_path, "training.stage_a.group_by_modality_length=false", name="plain"), 2)
    assert grouped.keys() == plain.keys() and grouped
    for name in grouped:
        scale = float(plain[name].abs().max()) or 1.0
        torch.testing.assert_close(grouped[name], plain[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_keep_last_deletes_older_checkpoints_and_resume_takes_the_newest(cache, tmp_path):
    profile = load_profile("demo", FAST + ["training.stage_a.checkpoint_every=1", "training.stage_a.keep_last=2"])
    train_stage_a(profile, variant="no_retention", seed=0, run_dir=tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run/stage-a/checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004"]
    result = train_stage_a(profile, variant="no_retention", seed=0, run_dir=tmp_path / "run", resume=True)
    assert result.resumed_from == 4
