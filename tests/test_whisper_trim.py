"""Whisper trimmed to the clip (``audio_encoder.whisper.trim_to_clip``, ``safe encode-audio --trim``).

The faithful default stays whisper's own computation (every clip padded to the window); the
trimmed mode runs whisper's encoder over the clip's own length rounded up to whole seconds,
with the first rows of its positional embedding: its features are those of whisper's own
encoder built for that shorter window, independent of the other clips of the batch, and kept
apart from the faithful ones in the cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import whisper
from whisper.model import AudioEncoder as WhisperAudioEncoder

import tiny_models
from safe_cli.config import load_profile
from safe_cli.data.audio_io import load_audio
from safe_cli.features.cache import FeatureCache, content_hash
from safe_cli.features.encode import encode_audio, encoder_fingerprint
from safe_cli.models import WhisperClapEncoder, WhisperEncoder, fingerprint_module, load_audio_encoder
from test_encode_audio import assert_consistent, safe, set_encoder, write_tone, write_tones

WINDOW = 1500  # whisper's own 30 s window


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_models.save_tiny_whisper(tmp_path_factory.mktemp("trim") / "whisper.pt", n_audio_ctx=WINDOW)


@pytest.fixture(scope="module")
def faithful(checkpoint):
    return WhisperEncoder.load(str(checkpoint))


@pytest.fixture(scope="module")
def trimmed(checkpoint):
    return WhisperEncoder.load(str(checkpoint), trim_to_clip=True)


def noise(samples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.3, samples).astype(np.float32)


def positions(samples: int) -> int:
    """Encoder positions covering a clip: 320 samples (two 10 ms mel frames) each, at least one."""
    return max(1, -(-min(samples, WINDOW * 320) // 320))


def whisper_at(checkpoint, window: int) -> WhisperAudioEncoder:
    """whisper's own AudioEncoder built for a ``window``-position input, with the checkpoint's weights."""
    model = whisper.load_model(str(checkpoint), device="cpu")
    dims = model.dims
    short = WhisperAudioEncoder(dims.n_mels, window, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    state = dict(model.encoder.state_dict())
    state["positional_embedding"] = state["positional_embedding"][:window]
    short.load_state_dict(state)
    return short.eval()


@torch.no_grad()
def test_the_faithful_default_is_whispers_own_computation(checkpoint, faithful):
    model = whisper.load_model(str(checkpoint), device="cpu")
    clips = [noise(8000), noise(16001, 1), noise(600_000, 2)]  # 0.5 s, just over 1 s, over 30 s
    batched = faithful(clips)
    assert batched.shape == (3, WINDOW, 64) and faithful.feature_lengths(clips) == [WINDOW] * 3
    for i, clip in enumerate(clips):
        own = model.encoder(whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(clip)))[None])[0]
        assert torch.equal(faithful([clip])[0], own)  # one clip: bit for bit
        torch.testing.assert_close(batched[i], own, atol=1e-5, rtol=1e-5)
    # The faithful fingerprint is still the weights' hash: caches written before trimming existed stay valid.
    assert faithful.fingerprint() == fingerprint_module(faithful)


@torch.no_grad()
def test_trimmed_lengths_follow_the_clip_rounded_up_to_whole_seconds(trimmed):
    samples = [100, 8000, 16000, 16001, 40000, 600_000]
    clips = [noise(n, i) for i, n in enumerate(samples)]
    own = [positions(n) for n in samples]
    assert own == [1, 25, 50, 51, 125, WINDOW]
    expected = [50, 50, 50, 100, 150, WINDOW]  # ceil(positions / 50) * 50, at most the window
    assert trimmed.feature_lengths(clips) == expected
    out = trimmed(clips)
    assert out.shape == (len(clips), WINDOW, 64)
    mask = trimmed.frame_mask(clips)
    assert mask.shape == (len(clips), WINDOW) and mask.sum(1).tolist() == own
    for i, length in enumerate(expected):
        assert out[i, length:].abs().sum() == 0  # past the clip's own length: nothing
        assert out[i, :length].abs().amin(dim=-1).gt(0).all()

    short = clips[:3]  # the batch is as long as its longest clip
    assert trimmed(short).shape == (3, 50, 64) and trimmed.frame_mask(short).shape == (3, 50)


@torch.no_grad()
def test_trimmed_equals_whispers_encoder_built_for_the_shorter_window(checkpoint, trimmed, faithful):
    for samples, window in ((8000, 50), (40000, 150)):
        clip = noise(samples, samples)
        own = whisper_at(checkpoint, window)(
            whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(clip), window * 320))[None])[0]
        torch.testing.assert_close(trimmed([clip])[0], own, atol=1e-5, rtol=1e-5)
        # ... and that is not whisper's faithful computation, which attends over 30 s of padding.
        n = positions(samples)
        assert not torch.allclose(trimmed([clip])[0, :n], faithful([clip])[0, :n], atol=1e-2)
    # A clip that fills the window is encoded exactly as the faithful path does.
    full = noise(WINDOW * 320, 9)
    torch.testing.assert_close(trimmed([full]), faithful([full]), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_a_trimmed_clip_does_not_depend_on_its_batch(trimmed):
    short, long_ = noise(8000, 3), noise(70000, 4)
    together = trimmed([short, long_, short])
    alone = trimmed([short])[0]
    assert together.shape[1] == 250 and alone.shape == (50, 64)
    torch.testing.assert_close(together[0, :50], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[2, :50], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], trimmed([long_])[0], atol=1e-5, rtol=1e-5)


def test_trimmed_and_faithful_fingerprints_differ(checkpoint, faithful, trimmed, tiny_checkpoints):
    assert encoder_fingerprint(trimmed) != encoder_fingerprint(faithful)
    assert encoder_fingerprint(trimmed).endswith("+trim50")
    assert encoder_fingerprint(WhisperEncoder.load(str(checkpoint), trim_to_clip=True)) == encoder_fingerprint(trimmed)

    def both(trim: bool) -> WhisperClapEncoder:
        return load_audio_encoder(load_profile("demo", [
            "audio_encoder.kind=both", f"audio_encoder.whisper.name_or_path={tiny_checkpoints['whisper']}",
            f"audio_encoder.clap.name_or_path={tiny_checkpoints['clap']}",
            f"audio_encoder.whisper.trim_to_clip={str(trim).lower()}",
        ]).audio_encoder)

    plain, cut = both(False), both(True)
    assert encoder_fingerprint(plain) != encoder_fingerprint(cut)
    clip = noise(8000)
    with torch.no_grad():
        assert plain([clip]).shape == (1, WINDOW, 80) and cut([clip]).shape == (1, 50, 80)
    assert cut.feature_lengths([clip]) == [50]


def test_the_cache_keeps_trimmed_and_faithful_apart_each_clip_at_its_own_length(tmp_path, faithful, trimmed):
    files = [write_tone(tmp_path / "audio" / f"clip{i}.wav", 300 + 50 * i, seconds, 16000)
             for i, seconds in enumerate((0.5, 1.5, 0.7, 2.5))]
    cache_dir = tmp_path / "cache"
    cut = encode_audio(files, FeatureCache(cache_dir), trimmed, batch_size=4, progress=False)
    full = encode_audio(files, FeatureCache(cache_dir), faithful, batch_size=4, progress=False)
    assert (cut.encoded, full.encoded, full.reused) == (4, 4, 0)
    again = encode_audio(files, FeatureCache(cache_dir), trimmed, batch_size=4, progress=False)
    assert (again.encoded, again.reused) == (0, 4)

    index = assert_consistent(cache_dir)
    assert {fp: len(clips) for fp, clips in index.items()} == {
        encoder_fingerprint(trimmed): 4, encoder_fingerprint(faithful): 4}
    cache = FeatureCache(cache_dir)
    for path, length in zip(files, (50, 100, 50, 150)):
        wave = load_audio(path, 16000)
        stored = cache.lookup(content_hash(path), encoder_fingerprint(trimmed))
        assert stored.shape == (length, 64)  # the clip's own length, not the batch's (150)
        with torch.no_grad():
            torch.testing.assert_close(stored, trimmed([wave])[0], atol=1e-5, rtol=1e-5)
        assert cache.lookup(content_hash(path), encoder_fingerprint(faithful)).shape == (WINDOW, 64)


def test_cli_trim_flag_overrides_the_profile_and_caches_apart(tmp_path, checkpoint):
    write_tones(tmp_path / "audio", 3, seconds=0.6)
    args = ["--input", tmp_path / "audio", "--output", tmp_path / "cache", *set_encoder(checkpoint), "--json"]

    def run(*extra) -> dict:
        result = safe(*args, *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    cut = run("--trim")
    assert cut["trim_to_clip"] is True and cut["encoder"].endswith("+trim50") and cut["encoded"] == 3
    full = run()  # the profile's default: faithful, a different fingerprint, so nothing is reused
    assert full["trim_to_clip"] is False and (full["encoded"], full["reused"]) == (3, 0)
    assert full["encoder"] == cut["encoder"][: -len("+trim50")]
    # The profile setting does the same as --trim; --no-trim overrides it.
    by_profile = run("--set", "audio_encoder.whisper.trim_to_clip=true")
    assert by_profile["encoder"] == cut["encoder"] and (by_profile["encoded"], by_profile["reused"]) == (0, 3)
    overridden = run("--set", "audio_encoder.whisper.trim_to_clip=true", "--no-trim")
    assert overridden["encoder"] == full["encoder"] and overridden["reused"] == 3

    shapes = {fp: {tuple(FeatureCache(tmp_path / "cache").lookup(h, fp).shape) for h in clips}
              for fp, clips in assert_consistent(tmp_path / "cache").items()}
    assert shapes == {cut["encoder"]: {(50, 64)}, full["encoder"]: {(WINDOW, 64)}}

    refused = safe(*args, "--trim", "--encoder", "clap", cwd=tmp_path)
    assert refused.returncode == 2 and "--trim" in refused.stderr and "Traceback" not in refused.stderr

    help_text = " ".join(safe("--help", cwd=tmp_path, COLUMNS="200").stdout.split())
    assert "--trim" in help_text and "bench/encode_audio.py" in help_text


def test_trimmed_tokens_on_the_fly_equal_those_from_the_cache(tmp_path, trimmed, faithful):
    """A batch of clips of different rounded lengths: SAFEModel masks the zero rows it pads on the
    fly exactly as stack_features does for per-clip tensors read from the cache."""
    from safe_cli.features.lookup import stack_features
    from safe_cli.models import build_safe_model

    files = [write_tone(tmp_path / f"c{i}.wav", 300 + 90 * i, seconds, 16000)
             for i, seconds in enumerate((0.4, 1.3, 0.8))]
    encode_audio(files, FeatureCache(tmp_path / "cache"), trimmed, batch_size=3, progress=False)
    cache = FeatureCache(tmp_path / "cache")
    cached = [cache.lookup(content_hash(f), encoder_fingerprint(trimmed)) for f in files]
    waves = [load_audio(f, 16000) for f in files]
    budgets = torch.tensor([4, 8, 8])
    model = build_safe_model(load_profile("demo"), audio_encoder=trimmed).eval()
    with torch.no_grad():
        fly, fly_mask = model.audio_tokens(budgets, audio=waves)
        inputs = stack_features(cached)
        assert set(inputs) == {"audio_features", "audio_frame_mask"}
        read, read_mask = model.audio_tokens(budgets, audio_features=inputs["audio_features"],
                                             frame_mask=inputs["audio_frame_mask"])
        torch.testing.assert_close(fly, read, atol=1e-5, rtol=1e-5)
        assert torch.equal(fly_mask, read_mask)
        # Each clip's tokens are its own: the same as with the clip alone in its batch.
        alone, _ = model.audio_tokens(budgets[2:], audio=waves[2:])  # 0.8 s: padded to 1.3 s in the batch
        torch.testing.assert_close(fly[2:], alone, atol=1e-5, rtol=1e-5)
        assert trimmed.batch_mask(waves[2:]) is None and faithful.batch_mask(waves) is None
