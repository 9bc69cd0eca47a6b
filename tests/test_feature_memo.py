"""The in-memory memo of frozen-encoder features Stage A uses (safe_cli/features/memo.py)."""

import numpy as np
import pytest
import torch

from safe_cli.config import load_profile
from safe_cli.features.memo import FeatureMemo, clip_key, memo_for
from safe_cli.models.audio_encoders import WhisperEncoder
from safe_cli.training.stage_a import StageATrainer

from conftest import FAST


class CountingEncoder:
    """A tiny whisper-architecture encoder that counts the clips it is asked to encode."""

    def __init__(self, trim: bool):
        self.encoder = WhisperEncoder.tiny(32, 2, 2, 0, 1.0, trim).eval()
        self.clips = 0

    def __call__(self, waves):
        self.clips += len(waves)
        with torch.no_grad():
            return self.encoder(waves)


def clips(seed: int, count: int, seconds=(0.3, 0.9)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(16000 * rng.uniform(*seconds))).astype(np.float32) * 0.1 for _ in range(count)]


@pytest.mark.parametrize("trim", [False, True])
def test_each_row_is_the_clip_encoded_alone_whatever_batch_it_came_in(trim):
    counting = CountingEncoder(trim)
    memo = FeatureMemo(64 * 2**20)
    waves = clips(0, 6)
    encoder = counting.encoder
    # Two batches that share clips, in another order, with one clip twice in the same batch.
    first = memo.encode(counting, waves[:4])
    second_batch = [waves[5], waves[2], waves[5], waves[0], waves[4]]
    second = memo.encode(counting, second_batch)
    assert counting.clips == 6, "each distinct clip is encoded once, a repeat in one batch too"
    assert (memo.hits, memo.misses) == (3, 6)
    for batch, out in ((waves[:4], first), (second_batch, second)):
        reference = encoder(batch)  # what the model got before: the batch encoded together
        assert out.shape == reference.shape
        for row, wave in enumerate(batch):
            alone = encoder([wave])[0]
            assert torch.equal(out[row, : alone.shape[0]], alone)
            assert not out[row, alone.shape[0]:].any(), "rows past a shorter clip stay zero, as the encoder's"
            assert torch.allclose(out[row], reference[row], atol=1e-4)


def test_a_full_memo_stores_no_more_and_still_answers():
    counting = CountingEncoder(False)
    row_bytes = counting.encoder.num_frames * counting.encoder.feature_dim * 4
    memo = FeatureMemo(2 * row_bytes)
    waves = clips(1, 3)
    memo.encode(counting, waves)
    assert len(memo.rows) == 2 and memo.bytes == 2 * row_bytes
    out = memo.encode(counting, waves)
    assert counting.clips == 4, "the clip that did not fit is encoded again, the others are not"
    assert torch.equal(out[2], counting.encoder([waves[2]])[0])


def test_the_key_is_the_samples_not_the_array():
    wave = clips(2, 1)[0]
    assert clip_key(wave) == clip_key(wave.copy()) == clip_key(torch.from_numpy(wave.copy()))
    changed = wave.copy()
    changed[100] += 1e-3
    assert clip_key(changed) != clip_key(wave)
    assert clip_key(wave[:-1]) != clip_key(wave)


def test_memo_for_only_when_every_clip_fits():
    encoder = CountingEncoder(False).encoder
    row_bytes = encoder.num_frames * encoder.feature_dim * 4
    assert isinstance(memo_for(encoder, 10, 10 * row_bytes), FeatureMemo)
    assert memo_for(encoder, 11, 10 * row_bytes) is None
    assert memo_for(encoder, 10, 0) is None
    assert memo_for(object(), 1, 2**30) is None  # no known window (CLAP): no memo


def test_stage_a_uses_the_memo_unless_turned_off(cache, tmp_path):
    trainer = StageATrainer(load_profile("demo", FAST), seed=0, run_dir=tmp_path / "on")
    trainer.build()
    assert isinstance(trainer.model.feature_memo, FeatureMemo)
    off = StageATrainer(load_profile("demo", FAST + ["audio_encoder.memory_cache_mb=0"]), seed=0,
                        run_dir=tmp_path / "off")
    off.build()
    assert off.model.feature_memo is None
