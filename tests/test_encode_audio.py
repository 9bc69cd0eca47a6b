"""safe encode-audio: the feature cache is exact, content-addressed, crash-safe and shareable.

Audio: short sine tones written with soundfile at 16 kHz and 8 kHz. Encoder: a tiny whisper
checkpoint (tests/tiny_models.py) loaded by path, so nothing is pretrained or downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import tiny_models
from safe_cli.data.audio_io import load_audio
from safe_cli.features.cache import FeatureCache, content_hash, read_shard_header
from safe_cli.features.encode import encode_audio, encoder_fingerprint
from safe_cli.models.audio_encoders import WhisperEncoder

EXAMPLE = "safe encode-audio --input ../shared/data/fsdd/recordings --output features/"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    return {
        # 1 s window: fast, for the in-process tests and the short CLI runs
        "fast": tiny_models.save_tiny_whisper(root / "fast.pt", n_audio_ctx=50),
        # whisper's own 30 s window: ~30x the work per clip, so a run can be killed half-way
        "slow": tiny_models.save_tiny_whisper(root / "slow.pt", n_audio_ctx=1500),
    }


@pytest.fixture(scope="module")
def encoder(checkpoints):
    return WhisperEncoder.load(str(checkpoints["fast"]))


def write_tone(path: Path, freq: float, seconds: float = 0.5, rate: int = 16000) -> Path:
    t = np.arange(int(round(seconds * rate))) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


def write_tones(folder: Path, n: int, seconds: float = 0.5, start: int = 0) -> list[Path]:
    """n distinct clips (distinct frequencies), alternating 16 kHz and 8 kHz."""
    return [write_tone(folder / f"clip{i:03d}.wav", 200 + 37 * i, seconds, 16000 if i % 2 == 0 else 8000)
            for i in range(start, start + n)]


def set_encoder(checkpoint: Path) -> list[str]:
    return ["--set", "audio_encoder.kind=whisper", "--set", f"audio_encoder.whisper.name_or_path={checkpoint}"]


def safe_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "safe_cli", "encode-audio", *map(str, args)]


def cli_env(**extra) -> dict:
    return {**os.environ, "SAFE_NO_PROGRESS": "1", **extra}


def safe(*args, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(safe_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=300, env=cli_env(**env))


def shard_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "shards").glob("*.safetensors") if not p.name.startswith("."))


def assert_consistent(cache_dir: Path) -> dict[str, dict[str, str]]:
    """index.json is valid JSON and says exactly what the shards hold; no temp file is left. The index."""
    from safetensors import safe_open

    index = json.loads((cache_dir / "index.json").read_text())
    from_shards: dict[str, dict[str, str]] = {}
    for path in shard_files(cache_dir):
        fp, clips = read_shard_header(path)
        with safe_open(str(path), framework="pt") as handle:
            assert set(handle.keys()) == set(clips)
        for h in clips:
            assert h not in from_shards.get(fp, {}), f"clip {h} stored twice"
            from_shards.setdefault(fp, {})[h] = path.stem
    assert index == from_shards
    leftovers = [p.name for folder in (cache_dir, cache_dir / "shards") for p in folder.iterdir()
                 if p.name.endswith(".tmp")]
    assert leftovers == []
    return index


# --------------------------------------------------------------------------- in process


def test_cached_features_equal_the_encoder_run_on_the_fly(tmp_path, encoder):
    files = write_tones(tmp_path / "audio", 5, seconds=0.7)
    report = encode_audio(files, FeatureCache(tmp_path / "cache"), encoder, batch_size=1, workers=0,
                          shard_size=2, progress=False)
    assert (report.total, report.unique, report.reused, report.encoded, report.failed) == (5, 5, 0, 5, 0)
    assert report.shards_written == 3 and len(shard_files(tmp_path / "cache")) == 3

    fp = encoder_fingerprint(encoder)
    cache = FeatureCache(tmp_path / "cache")  # reopened: read from disk, not from memory
    for path in files:
        wave = load_audio(path, encoder.sample_rate)
        with torch.no_grad():
            expected = encoder([wave])[0]
        cached = cache.lookup(content_hash(path), fp)
        assert cached.dtype == torch.float32 and cached.shape == (50, 64)
        assert torch.equal(cached, expected)  # one clip per batch: bit for bit
    _, clips = read_shard_header(shard_files(tmp_path / "cache")[0])
    for meta in clips.values():
        assert meta["samples"] == round(0.7 * 16000) and Path(meta["path"]).name.startswith("clip")

    # Batched, the same clips differ from the one-clip forward by float rounding only (BLAS
    # blocking depends on the batch size): for this 50-frame encoder up to ~9e-7 on values of ~1.
    encode_audio(files, FeatureCache(tmp_path / "batched"), encoder, batch_size=4, workers=0, progress=False)
    batched = FeatureCache(tmp_path / "batched")
    for path in files:
        with torch.no_grad():
            expected = encoder([load_audio(path, encoder.sample_rate)])[0]
        assert torch.allclose(batched.lookup(content_hash(path), fp), expected, rtol=1e-5, atol=1e-5)  # observed max |diff| 9e-7
    assert_consistent(tmp_path / "cache")


def test_a_changed_file_is_encoded_again_a_renamed_one_is_not(tmp_path, encoder):
    files = write_tones(tmp_path / "audio", 4)
    cache_dir = tmp_path / "cache"
    first = encode_audio(files, FeatureCache(cache_dir), encoder, batch_size=2, progress=False)
    assert (first.encoded, first.reused) == (4, 0)

    again = encode_audio(files, FeatureCache(cache_dir), encoder, batch_size=2, progress=False)
    assert (again.encoded, again.reused, again.shards_written) == (0, 4, 0)

    write_tone(files[0], 1234.0)  # same name, new bytes
    changed = encode_audio(files, FeatureCache(cache_dir), encoder, batch_size=2, progress=False)
    assert (changed.encoded, changed.reused) == (1, 3)

    features = FeatureCache(cache_dir).lookup(content_hash(files[1]), encoder_fingerprint(encoder))
    moved = tmp_path / "elsewhere" / "renamed.wav"
    moved.parent.mkdir()
    files[1].rename(moved)
    renamed = encode_audio([files[0], moved, *files[2:]], FeatureCache(cache_dir), encoder, progress=False)
    assert (renamed.encoded, renamed.reused) == (0, 4)
    assert torch.equal(FeatureCache(cache_dir).lookup(content_hash(moved), encoder_fingerprint(encoder)), features)

    # The same bytes twice are one clip, encoded once.
    twin = tmp_path / "twin.wav"
    twin.write_bytes(files[2].read_bytes())
    dup = encode_audio([files[2], twin], FeatureCache(tmp_path / "dup"), encoder, progress=False)
    assert (dup.total, dup.unique, dup.encoded) == (2, 1, 1)
    assert_consistent(cache_dir)


def test_another_encoder_is_a_miss(tmp_path, encoder):
    files = write_tones(tmp_path / "audio", 3)
    cache_dir = tmp_path / "cache"
    encode_audio(files, FeatureCache(cache_dir), encoder, progress=False)
    other = WhisperEncoder.tiny(state=64, layers=2, heads=2, seed=7, window_seconds=1.0)
    assert encoder_fingerprint(other) != encoder_fingerprint(encoder)
    assert not FeatureCache(cache_dir).contains(content_hash(files[0]), encoder_fingerprint(other))
    report = encode_audio(files, FeatureCache(cache_dir), other, progress=False)
    assert (report.encoded, report.reused) == (3, 0)
    index = assert_consistent(cache_dir)
    assert {fp: len(clips) for fp, clips in index.items()} == {
        encoder_fingerprint(encoder): 3, encoder_fingerprint(other): 3}


def test_an_unindexed_shard_is_found_and_temp_files_are_removed(tmp_path, encoder):
    """What a kill between writing a shard and updating the index, or mid-write, leaves behind."""
    files = write_tones(tmp_path / "audio", 3)
    cache_dir = tmp_path / "cache"
    encode_audio(files, FeatureCache(cache_dir), encoder, shard_size=1, progress=False)
    (cache_dir / "index.json").write_text('{"truncated')
    half = cache_dir / "shards" / ".abc-123.safetensors.0f0f.tmp"
    half.write_bytes(b"\x00" * 100)
    cache = FeatureCache(cache_dir)
    assert not half.exists()
    assert all(cache.contains(content_hash(f), encoder_fingerprint(encoder)) for f in files)
    assert len(assert_consistent(cache_dir)[encoder_fingerprint(encoder)]) == 3


class PickyEncoder(WhisperEncoder):
    """Fails on any batch holding a clip of exactly ``bad_samples`` samples (or on all, if None)."""

    bad_samples = None

    def forward(self, waves):
        if self.bad_samples is None or any(len(w) == self.bad_samples for w in waves):
            raise RuntimeError("cannot encode this\nsecond line")
        return super().forward(waves)


def test_an_encoder_error_costs_only_that_clip(tmp_path, encoder):
    from safe_cli.errors import RunFailed

    files = write_tones(tmp_path / "audio", 3, seconds=0.5) + [write_tone(tmp_path / "audio" / "odd.wav", 99.0, 0.25)]
    picky = PickyEncoder(encoder.encoder, encoder.n_mels)
    picky.bad_samples = 4000
    report = encode_audio(files, FeatureCache(tmp_path / "cache"), picky, batch_size=4, progress=False)
    assert (report.encoded, report.failed) == (3, 1)
    assert report.failures == [(str(files[-1]), "encoder failed: RuntimeError: cannot encode this")]
    assert len(assert_consistent(tmp_path / "cache")[encoder_fingerprint(picky)]) == 3

    picky.bad_samples = None  # fails on everything: a broken encoder or device, not bad files
    with pytest.raises(RunFailed, match="the encoder failed on every clip"):
        encode_audio(files, FeatureCache(tmp_path / "other"), picky, batch_size=4, progress=False)
    assert len(FeatureCache(tmp_path / "other").failures()) == 4  # still listed


# --------------------------------------------------------------------------- the command


def test_kill_9_mid_run_loses_nothing_already_written(tmp_path, checkpoints):
    n = 40
    files = write_tones(tmp_path / "audio", n, seconds=1.0)
    cache_dir = tmp_path / "cache"
    cmd = safe_cmd("--input", tmp_path / "audio", "--output", cache_dir, *set_encoder(checkpoints["slow"]),
                   "--shard-size", 4, "--batch-size", 2, "--workers", 0, "--json")
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, env=cli_env())
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (cache_dir / "shards").is_dir() and len(shard_files(cache_dir)) >= 2:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # Finished already? Then this run is too fast to test a kill: make it slower (more or longer clips).
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, (tmp_path / "first.err").read_text())

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard_files(cache_dir)}
    clips_before = sum(len(read_shard_header(p)[1]) for p in shard_files(cache_dir))
    assert len(before) >= 2 and 8 <= clips_before < n

    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cli_env())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["total"], report["reused"], report["encoded"], report["failed"]) == (
        n, clips_before, n - clips_before, 0)

    after = {p.name: p for p in shard_files(cache_dir)}
    for name, (mtime, data) in before.items():
        assert name in after, f"shard {name} written before the kill is gone"
        assert after[name].stat().st_mtime_ns == mtime and after[name].read_bytes() == data
    index = assert_consistent(cache_dir)
    (fp,) = index
    assert set(index[fp]) == {content_hash(f) for f in files}
    cache = FeatureCache(cache_dir)
    assert all(cache.lookup(content_hash(f), fp) is not None for f in files)


def test_broken_files_are_listed_and_the_good_ones_cached(tmp_path, checkpoints):
    audio = tmp_path / "audio"
    good = write_tones(audio, 3)
    broken = {
        audio / "empty.wav": b"",
        audio / "notes.flac": b"these are my notes, not audio\n" * 10,
        audio / "noise.mp3": np.random.default_rng(0).bytes(3000),
    }
    for path, data in broken.items():
        path.write_bytes(data)
    args = ("--input", audio, "--output", tmp_path / "cache", *set_encoder(checkpoints["fast"]), "--workers", 0)

    result = safe(*args, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["total"], report["encoded"], report["failed"]) == (6, 3, 3)
    assert "warning" in result.stderr and "Traceback" not in result.stderr
    for path in broken:
        assert path.name in result.stderr

    records = {Path(r["path"]).name: r["reason"]
               for r in map(json.loads, (tmp_path / "cache" / "failures.jsonl").read_text().splitlines())}
    assert set(records) == {p.name for p in broken}
    assert "empty file" in records["empty.wav"]
    for name in ("notes.flac", "noise.mp3"):
        assert "unreadable or corrupt audio" in records[name] or "ffmpeg is not installed" in records[name]
    index = assert_consistent(tmp_path / "cache")
    assert set(next(iter(index.values()))) == {content_hash(p) for p in good}

    strict = safe(*args, "--strict", cwd=tmp_path)
    assert strict.returncode == 1
    assert "Traceback" not in strict.stderr and "--strict" in strict.stderr
    for path in broken:
        assert path.name in strict.stderr
    assert "reused from cache" in strict.stdout  # the summary table is still printed

    # A file fixed since is encoded and leaves failures.jsonl; the others stay listed.
    fixed = write_tone(audio / "fixed.flac", 880.0)
    fixed.rename(audio / "notes.flac")
    encoder = WhisperEncoder.load(str(checkpoints["fast"]))
    report = encode_audio([*good, *broken], FeatureCache(tmp_path / "cache"), encoder, progress=False)
    assert (report.reused, report.encoded, report.failed) == (3, 1, 2)
    listed = [Path(r["path"]).name for r in FeatureCache(tmp_path / "cache").failures()]
    assert sorted(listed) == ["empty.wav", "noise.mp3"]


def test_two_processes_share_one_cache(tmp_path, checkpoints):
    files = write_tones(tmp_path / "audio", 24, seconds=0.4)

    def manifest(name: str, clips: list[Path]) -> Path:
        lines = [json.dumps({"id": str(i), "audio": f"audio/{p.name}", "task": "audio/tone", "conversations": [
            {"from": "human", "value": "<audio>\nWhat is it?"}, {"from": "gpt", "value": "a tone"}]})
            for i, p in enumerate(clips)]
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path

    inputs = [manifest("a.jsonl", files[:16]), manifest("b.jsonl", files[8:])]  # 8 clips in both
    cache_dir = tmp_path / "cache"
    # The slow encoder (~0.1 s a clip) keeps both processes encoding at the same time.
    procs = [subprocess.Popen(safe_cmd("--input", m, "--output", cache_dir, *set_encoder(checkpoints["slow"]),
                                       "--shard-size", 2, "--batch-size", 2, "--workers", 0, "--json"),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
             for m in inputs]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    reports = [json.loads(out) for out, _ in outputs]
    assert all(r["total"] == 16 and r["failed"] == 0 for r in reports)
    assert all(r["reused"] + r["encoded"] == 16 for r in reports)

    index = assert_consistent(cache_dir)
    (fp,) = index
    assert set(index[fp]) == {content_hash(f) for f in files}
    cache = FeatureCache(cache_dir)
    assert all(cache.lookup(content_hash(f), fp) is not None for f in files)


def test_bad_input_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = safe("--input", missing, "--output", tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "--input" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()

    (tmp_path / "empty").mkdir()
    result = safe("--input", tmp_path / "empty", "--output", tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 2 and "no audio files" in result.stderr and "Traceback" not in result.stderr

    write_tones(tmp_path / "audio", 1)
    result = safe("--input", tmp_path / "audio", "--output", tmp_path / "cache", "--encoder", "wav2vec", cwd=tmp_path)
    assert result.returncode == 2 and "--encoder" in result.stderr and "wav2vec" in result.stderr

    # --encoder goes through the profile, which checks the encoder's settings before anything loads.
    result = safe("--input", tmp_path / "audio", "--output", tmp_path / "cache", "--encoder", "clap",
                  "--set", "audio_encoder.clap.name_or_path=./no-such-clap", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "audio_encoder.clap.name_or_path" in result.stderr and "no-such-clap" in result.stderr


def test_help_shows_an_example_and_the_exit_codes(tmp_path):
    result = safe("--help", cwd=tmp_path, COLUMNS="200")
    assert result.returncode == 0
    assert EXAMPLE in result.stdout
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 every readable clip is cached" in text
    assert "1 with --strict when any file failed" in text and "2 bad usage or input" in text
