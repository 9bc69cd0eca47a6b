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


# --------------------------------------------------------------------------- the teacher cache


def _retention_batch(trainer: StageATrainer) -> tuple[dict, dict, list[int], list[str]]:
    from safe_cli.training.teacher_cache import row_keys

    host = max(trainer.step_batches()[1]["retention"], key=lambda b: b["rows"])
    assert host["rows"] >= 3
    counts = (host["answer_targets"] != -100).sum(1).tolist()
    keys = row_keys(host, trainer.model.base.image_token_id)
    batch = to_device(host, trainer.device)
    inputs = drop(batch, BATCH_EXTRAS + ("token_budget", "audio", "audio_features", "audio_frame_mask"))
    return batch, inputs, counts, keys


def test_cached_teacher_logits_equal_the_live_teachers_bit_for_bit(cache, tmp_path):
    from safe_cli.training.teacher_cache import TeacherCache

    trainer = _trainer(tmp_path)
    batch, inputs, counts, keys = _retention_batch(trainer)
    assert len(set(keys)) == len(keys)
    with torch.no_grad():
        live = trainer.model.base(**inputs, **TRAINING_FORWARD, logits_to_keep=batch["answer_index"]).logits
    teacher = TeacherCache(trainer.base_fingerprint, root=tmp_path / "cache")
    base = trainer.model.base
    first = teacher.logits(base, inputs, batch["answer_index"], counts, keys, TRAINING_FORWARD)
    assert (teacher.computed, teacher.hits) == (len(keys), 0)
    again = teacher.logits(base, inputs, batch["answer_index"], counts, keys, TRAINING_FORWARD)
    assert (teacher.computed, teacher.hits) == (len(keys), len(keys))  # the second time, nothing ran
    for row, count in enumerate(counts):
        assert torch.equal(first[row, :count], live[row, :count])
        assert torch.equal(again[row, :count], live[row, :count])

    # One entry gone, one truncated, one of another shape: those three rows are recomputed (as
    # one batch of the missing rows) and rewritten; the others are read.
    teacher.path(keys[0]).unlink()
    teacher.path(keys[1]).write_bytes(teacher.path(keys[1]).read_bytes()[:40])
    teacher.write(keys[2], torch.zeros(counts[2] + 1, live.shape[-1]))
    mended = teacher.logits(base, inputs, batch["answer_index"], counts, keys, TRAINING_FORWARD)
    assert teacher.computed == len(keys) + 3
    for row, count in enumerate(counts):
        torch.testing.assert_close(mended[row, :count], live[row, :count], rtol=1e-5, atol=1e-5)
    assert all(teacher.read(k, c, live.shape[-1], live.dtype) is not None for k, c in zip(keys, counts))


def test_the_teacher_key_is_what_the_teacher_reads(cache, tmp_path):
    from safe_cli.training.teacher_cache import row_keys

    trainer = _trainer(tmp_path)
    host = trainer.step_batches()[1]["retention"]
    image_id = trainer.model.base.image_token_id
    with_image = next(b for b in host if "pixel_values" in b)
    keys = row_keys(with_image, image_id)
    changed = dict(with_image, pixel_values=with_image["pixel_values"].clone())
    changed["pixel_values"][0, 0, 0, 0] += 1.0  # one pixel of the first row's image
    after = row_keys(changed, image_id)
    assert after[0] != keys[0] and after[1:] == keys[1:]
    moved = dict(with_image, answer_index=with_image["answer_index"] + 1)  # other answer positions
    assert all(a != b for a, b in zip(row_keys(moved, image_id), keys))


def test_stage_a_with_the_teacher_cache_trains_as_with_the_live_teacher(cache, tmp_path):
    from safetensors.torch import load_file

    runs, teachers = {}, {}
    for flag in ("true", "false"):
        profile = load_profile("demo", STEP + ["data.num_train=4", f"training.stage_a.cache_teacher={flag}"])
        trainer = StageATrainer(profile, variant="soft_retention", seed=0, run_dir=tmp_path / flag)
        trainer.run()
        runs[flag] = load_file(tmp_path / flag / "stage-a" / "trainable.safetensors")
        teachers[flag] = trainer.losses.teacher_cache
    assert teachers["false"] is None
    cached = teachers["true"]
    # 4 steps x 6 retention rows drawn from 16 records: at least 8 come from the cache.
    assert cached.hits + cached.computed == 4 * 6 and cached.hits >= 8
    for name in runs["true"]:
        torch.testing.assert_close(runs["true"][name], runs["false"][name], rtol=1e-4, atol=1e-5, msg=name)
