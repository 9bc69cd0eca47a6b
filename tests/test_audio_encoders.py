"""Real loading paths of the audio encoders, fed a real WAV file read from disk."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import whisper
from scipy.signal import resample_poly

import tiny_models
from conftest import shared_data_root
from safe_cli.config import load_profile
from safe_cli.errors import SafeError
from safe_cli.models import ClapEncoder, WhisperClapEncoder, WhisperEncoder, load_audio_encoder
from safe_cli.models.audio_encoders import whisper_log_mel


@pytest.fixture(scope="module")
def wav_file(tmp_path_factory) -> Path:
    """An FSDD recording (8 kHz) when the shared data is here; else a WAV written with soundfile."""
    root = shared_data_root()
    if root is not None:
        return root / "fsdd" / "recordings" / "3_jackson_0.wav"
    path = tmp_path_factory.mktemp("wav") / "tone.wav"
    t = np.arange(8000) / 8000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    return path


def read_wav(path: Path, rate: int) -> np.ndarray:
    samples, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return resample_poly(mono, rate, source_rate).astype(np.float32)


def encoder_profile(**sets):
    return load_profile("demo", [f"{key}={value}" for key, value in sets.items()]).audio_encoder


def test_whisper_pt_checkpoint_loads_through_whisper_load_model(tiny_checkpoints, wav_file):
    path = tiny_checkpoints["whisper"]
    cfg = encoder_profile(**{"audio_encoder.kind": "whisper", "audio_encoder.whisper.name_or_path": path})
    encoder = load_audio_encoder(cfg)
    assert isinstance(encoder, WhisperEncoder)
    saved = torch.load(path, weights_only=True)["model_state_dict"]
    for name, tensor in encoder.encoder.state_dict().items():
        assert torch.equal(tensor, saved[f"encoder.{name}"]), name
    clip = read_wav(wav_file, 16000)
    features = encoder([clip, clip[: len(clip) // 2]])
    assert features.shape == (2, 1500, 64)
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    assert not any(p.requires_grad for p in encoder.parameters())


def test_batched_log_mel_equals_whispers_own_per_clip(wav_file):
    clips = [read_wav(wav_file, 16000), np.random.default_rng(0).normal(0, 0.5, 24000).astype(np.float32)]
    batched = whisper_log_mel(clips, 80, torch.device("cpu"))
    for i, clip in enumerate(clips):
        own = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(clip)))
        torch.testing.assert_close(batched[i], own, atol=1e-5, rtol=1e-5)


def test_clap_loads_by_path_with_its_feature_extractor(tiny_checkpoints, wav_file):
    cfg = encoder_profile(**{"audio_encoder.kind": "clap", "audio_encoder.clap.name_or_path": tiny_checkpoints["clap"]})
    encoder = load_audio_encoder(cfg)
    assert isinstance(encoder, ClapEncoder) and encoder.sample_rate == 48000
    clip = read_wav(wav_file, 48000)
    features = encoder([clip, clip[::-1].copy()])
    assert features.shape == (2, encoder.frames, encoder.feature_dim) == (2, 128, 32)  # the tower's time steps
    assert torch.isfinite(features).all()
    # Deterministic: clips are cut by us, never cropped at random by the extractor.
    torch.testing.assert_close(encoder([clip]), features[:1])


def test_both_joins_the_clap_embedding_to_every_whisper_frame(tiny_checkpoints, wav_file):
    cfg = encoder_profile(**{
        "audio_encoder.kind": "both",
        "audio_encoder.whisper.name_or_path": tiny_checkpoints["whisper"],
        "audio_encoder.clap.name_or_path": tiny_checkpoints["clap"],
    })
    encoder = load_audio_encoder(cfg)
    assert isinstance(encoder, WhisperClapEncoder) and encoder.feature_dim == 64 + 16
    features = encoder([read_wav(wav_file, 16000)])
    assert features.shape == (1, 1500, 80)
    torch.testing.assert_close(features[0, 0, 64:], features[0, -1, 64:])


def test_tiny_whisper_is_deterministic_per_seed(wav_file):
    cfg = encoder_profile()
    clip = read_wav(wav_file, 16000)
    first, second = load_audio_encoder(cfg, seed=0)([clip]), load_audio_encoder(cfg, seed=0)([clip])
    # The built-in tiny encoder's window is tiny_window_seconds, at whisper's 50 frames a second.
    assert first.shape == (1, round(cfg.tiny_window_seconds * 50), cfg.tiny_state)
    assert torch.equal(first, second)
    assert not torch.equal(first, load_audio_encoder(cfg, seed=1)([clip]))


def test_missing_whisper_checkpoint_names_the_key(tmp_path):
    with pytest.raises(SafeError, match=r"audio_encoder\.whisper\.name_or_path: whisper checkpoint not found"):
        WhisperEncoder.load(str(tmp_path / "missing.pt"))


def test_missing_clap_directory_names_the_key(tmp_path):
    with pytest.raises(SafeError, match=r"audio_encoder\.clap\.name_or_path: local model directory not found"):
        ClapEncoder.load(str(tmp_path / "no-clap"))


def test_whisper_window_follows_the_checkpoint_and_frame_mask_covers_the_clip(tmp_path):
    """A whisper checkpoint with a 2 s window pads to 2 s; the frame mask marks the clip's frames."""
    path = tiny_models.save_tiny_whisper(tmp_path / "short.pt", n_audio_ctx=100)
    encoder = WhisperEncoder.load(str(path))
    assert encoder.window_samples == 32000
    clips = [np.zeros(16000, np.float32), np.zeros(100, np.float32), np.zeros(48000, np.float32)]
    assert encoder(clips).shape == (3, 100, 64)
    assert encoder.frame_mask(clips).sum(1).tolist() == [50, 1, 100]
