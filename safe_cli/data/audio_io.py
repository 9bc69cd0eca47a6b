"""Decode audio files into float32 mono waveforms at a requested sample rate.

Policy:

* soundfile (libsndfile) first, for the formats it reads natively (WAV, FLAC, OGG, AIFF, ...):
  it is fast, needs no subprocess and returns the stored samples exactly.
* ffmpeg (the binary, through a pipe) for everything else (MP3, M4A, ...) and as the fallback
  when soundfile cannot open a file; ffmpeg also resamples and mixes to mono in that path
  (told to average the channels, as the soundfile path does).
* Resampling of soundfile output uses scipy's polyphase filter (``resample_poly``) with the
  rate ratio reduced by its gcd, which is exact in length and cheap for common rate pairs.

Every problem with a file (missing, empty, corrupt, no samples, NaN/Inf samples, ffmpeg not
installed) is reported as an :class:`AudioDecodeError` naming the file, so a batch can skip the
bad files and list them instead of dying on the first traceback.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

# Extensions handed to soundfile first. MP3 is left out on purpose: libsndfile's MP3 support
# depends on how it was built, while ffmpeg decodes MP3 everywhere and honours the encoder's
# gapless (delay/padding) header.
_SOUNDFILE_EXTS = {
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".aifc", ".au", ".snd",
    ".caf", ".w64", ".rf64",
}

# ffmpeg prefixes messages with "[demuxer @ 0x55ca...] "; the pointer changes every run and
# means nothing to a user.
_FFMPEG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")


class AudioDecodeError(Exception):
    """One file that could not be decoded."""

    def __init__(self, path, reason: str):
        # Passing both to Exception keeps the error picklable, so worker processes can return it.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample along axis 0 with a polyphase filter; float32 out, a no-op for equal rates."""
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    wave = np.asarray(wave, dtype=np.float32)
    if orig_rate == target_rate:
        return wave
    g = math.gcd(int(orig_rate), int(target_rate))
    out = resample_poly(wave, int(target_rate) // g, int(orig_rate) // g, axis=0)
    return out.astype(np.float32, copy=False)


def _read_soundfile(path: str) -> tuple[np.ndarray, int]:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data.mean(axis=1, dtype=np.float32), rate


def _read_ffmpeg(path: str, sample_rate: int) -> np.ndarray:
    # -rematrix_maxval 1: ffmpeg's own stereo->mono downmix is (L+R)/sqrt(2), 3 dB louder than
    # the soundfile path; capping the mixing coefficients at a sum of 1 makes it the mean.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-rematrix_maxval", "1.0",
           "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except FileNotFoundError:
        raise AudioDecodeError(
            path, "ffmpeg is not installed, so this format cannot be decoded "
                  "(install ffmpeg, e.g. apt-get install ffmpeg)") from None
    except OSError as e:
        raise AudioDecodeError(path, f"could not run ffmpeg: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines()]
        first = next((_FFMPEG_PREFIX.sub("", ln) for ln in lines if ln), "no message")
        raise AudioDecodeError(path, f"unreadable or corrupt audio (ffmpeg: {first})")
    # Drop a partial trailing float rather than failing on it.
    usable = len(proc.stdout) - len(proc.stdout) % 4
    return np.frombuffer(proc.stdout[:usable], dtype="<f4").astype(np.float32)


def load_audio(path, sample_rate: int) -> np.ndarray:
    """Decode ``path`` to a float32 1-D mono waveform at ``sample_rate``.

    Raises AudioDecodeError (and nothing else) for a file that cannot be used.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise AudioDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise AudioDecodeError(path, "empty file (0 bytes)")

    wave = None
    if os.path.splitext(path)[1].lower() in _SOUNDFILE_EXTS:
        try:
            wave, rate = _read_soundfile(path)
        except Exception:
            # Any soundfile failure (wrong extension, odd codec, damage) gets a second chance
            # with ffmpeg, whose message is the one reported if that fails too.
            wave = None
    if wave is None:
        wave, rate = _read_ffmpeg(path, sample_rate), sample_rate

    if wave.size == 0:
        raise AudioDecodeError(path, "no audio samples after decoding")
    # Checked before resampling: the filter would smear one NaN over many samples.
    bad = int(wave.size - np.count_nonzero(np.isfinite(wave)))
    if bad:
        raise AudioDecodeError(path, f"contains {bad} non-finite samples (NaN/Inf)")
    return resample(wave, rate, sample_rate)


def _load_one(path, sample_rate: int) -> tuple[Optional[np.ndarray], Optional[AudioDecodeError]]:
    # Top level so a spawned worker process can import and call it.
    try:
        return load_audio(path, sample_rate), None
    except AudioDecodeError as e:
        return None, e


def load_audio_many(
    paths, sample_rate: int, workers: int = 0
) -> tuple[list[Optional[np.ndarray]], list[AudioDecodeError]]:
    """Decode every path; waves are aligned with ``paths`` (None where decoding failed).

    ``workers > 0`` decodes in that many processes, otherwise in this one.
    """
    paths = list(paths)
    if workers > 0 and paths:
        # spawn, not fork: the caller may already hold threads (torch, BLAS) that fork would
        # copy in a broken state; spawn behaves the same on Linux, macOS and Windows.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, len(paths) // (workers * 4))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(_load_one, paths, [sample_rate] * len(paths), chunksize=chunk))
    else:
        results = [_load_one(p, sample_rate) for p in paths]
    waves = [wave for wave, _ in results]
    errors = [err for _, err in results if err is not None]
    return waves, errors
