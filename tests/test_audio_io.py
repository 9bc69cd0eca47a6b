"""safe_cli.data.audio_io: decoding real encoded files, broken files, batches, resampling.

Every fixture is generated into tmp_path: a 0.5 s test signal (440 Hz + 1000 Hz sines, 0.3
each) written at several rates by soundfile (WAV, FLAC, OGG/Vorbis) and by the ffmpeg binary
(MP3), then decoded with load_audio(path, 16000) and compared with the same signal generated
directly at 16 kHz.
"""

from __future__ import annotations

import pickle
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from safe_cli.data.audio_io import AudioDecodeError, load_audio, load_audio_many, resample

TARGET = 16000
DURATION = 0.5
AMP = 0.3
RATES = [8000, 16000, 22050, 44100, 48000]
# Skip resampling edge transients (filter run-in/out) when comparing samples: 25 ms each side.
EDGE = 400

# .ci/run installs ffmpeg, so in CI (CI=true) a missing binary fails these tests instead of skipping them.
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None and not os.environ.get("CI"), reason="ffmpeg binary not installed"
)


def make_signal(rate: int, stereo: bool = False) -> np.ndarray:
    """The test signal at `rate`. Stereo puts 2x the 440 Hz sine on L and 2x the 1000 Hz sine
    on R, so only a true channel mean gives back the mono reference."""
    t = np.arange(int(round(DURATION * rate))) / rate
    a = AMP * np.sin(2 * np.pi * 440 * t)
    b = AMP * np.sin(2 * np.pi * 1000 * t)
    out = np.stack([2 * a, 2 * b], axis=1) if stereo else a + b
    return out.astype(np.float32)


REFERENCE = make_signal(TARGET)


def write_ffmpeg(path, signal: np.ndarray, rate: int) -> None:
    channels = 1 if signal.ndim == 1 else signal.shape[1]
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(rate),
         "-ac", str(channels), "-i", "-", str(path)],
        input=np.ascontiguousarray(signal, dtype="<f4").tobytes(), check=True,
    )


def write_fixture(tmp_path, fmt: str, rate: int, stereo: bool):
    signal = make_signal(rate, stereo)
    path = tmp_path / f"tone_{rate}_{'stereo' if stereo else 'mono'}.{fmt}"
    if fmt == "wav":
        sf.write(path, signal, rate, subtype="PCM_16")
    elif fmt == "flac":
        sf.write(path, signal, rate, subtype="PCM_16")
    elif fmt == "ogg":
        sf.write(path, signal, rate, format="OGG", subtype="VORBIS")
    elif fmt == "mp3":
        write_ffmpeg(path, signal, rate)
    else:
        raise AssertionError(fmt)
    return path


def peak_frequencies(wave: np.ndarray, rate: int, n: int = 2) -> list[float]:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / rate)
    # Strongest local maxima, so one wide peak does not take both places.
    is_peak = (spectrum[1:-1] > spectrum[:-2]) & (spectrum[1:-1] >= spectrum[2:])
    idx = np.flatnonzero(is_peak) + 1
    return sorted(float(freqs[i]) for i in idx[np.argsort(spectrum[idx])[-n:]])


def best_alignment(got: np.ndarray, ref: np.ndarray, max_lag: int = 80) -> tuple[float, int]:
    """(correlation, lag) at the lag within +-max_lag samples that correlates best.

    The signal repeats every 25 ms (400 samples), so the search stays well inside one period.
    """
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        x = got[EDGE + lag: len(ref) - EDGE + lag]
        y = ref[EDGE: len(ref) - EDGE]
        if len(x) != len(y):
            continue
        corr = float(np.corrcoef(x, y)[0, 1])
        if corr > best[0]:
            best = (corr, lag)
    return best


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# ---------------------------------------------------------------- good files

CASES = [(fmt, rate, stereo) for fmt in ("wav", "flac", "ogg", "mp3") for rate in RATES
         for stereo in (False, True)]


def _case_id(case):
    fmt, rate, stereo = case
    return f"{fmt}-{rate}-{'stereo' if stereo else 'mono'}"


@pytest.mark.parametrize("fmt,rate,stereo", [
    pytest.param(*c, id=_case_id(c), marks=[needs_ffmpeg] if c[0] == "mp3" else [])
    for c in CASES
])
def test_decodes_to_reference(tmp_path, fmt, rate, stereo):
    path = write_fixture(tmp_path, fmt, rate, stereo)
    got = load_audio(path, TARGET)

    assert got.dtype == np.float32 and got.ndim == 1
    assert np.isfinite(got).all()
    if fmt in ("wav", "flac"):
        # Lossless: exact length (every rate here maps to 8000 samples exactly) and samples
        # within 2e-3 of the reference. Measured worst case is ~7e-4 (PCM_16 quantisation plus
        # the polyphase filter's passband ripple at 8 kHz -> 16 kHz); a wrong mix, gain or rate
        # is off by >= 0.1.
        assert len(got) == len(REFERENCE)
        err = np.abs(got[EDGE:-EDGE] - REFERENCE[EDGE:-EDGE]).max()
        assert err < 2e-3, f"max abs error {err:.2e}"
    else:
        # Lossy (Vorbis, MP3): the waveform is only approximately kept, so check
        #  - length within 2% (decoders should strip encoder delay/padding),
        #  - correlation > 0.99 at the best lag within +-5 ms (measured >= 0.999), and that lag
        #    within 1 ms: encoder delay/padding must be stripped (measured: lag 0 everywhere),
        #  - RMS level within 10% (LAME's output is ~5% quieter; a wrong stereo mix is +-41%),
        #  - the two strongest spectral peaks at 440 and 1000 Hz (2 Hz bins).
        assert abs(len(got) - len(REFERENCE)) <= 0.02 * len(REFERENCE), len(got)
        corr, lag = best_alignment(got, REFERENCE)
        assert corr > 0.99, f"correlation {corr:.4f} at lag {lag}"
        assert abs(lag) <= 16, f"decoded signal shifted by {lag} samples"
        ratio = rms(got) / rms(REFERENCE)
        assert 0.9 < ratio < 1.1, f"RMS ratio {ratio:.3f}"
        peaks = peak_frequencies(got, TARGET)
        assert peaks == pytest.approx([440, 1000], abs=4), peaks


def test_other_target_rate_and_mono_mean(tmp_path):
    # Stereo 44.1 kHz WAV to 8 kHz: channel mean of the decoded file, resampled.
    path = write_fixture(tmp_path, "wav", 44100, stereo=True)
    got = load_audio(path, 8000)
    ref = make_signal(8000)
    assert len(got) == len(ref)
    assert np.abs(got[200:-200] - ref[200:-200]).max() < 2e-3


@needs_ffmpeg
@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_ffmpeg_path_matches_soundfile_path(tmp_path, rate):
    # Lossless stereo content under an extension soundfile is not asked about (.m4a) goes
    # through ffmpeg, which then downmixes and resamples: same mean-of-channels signal expected
    # (measured max error ~4e-5; ffmpeg's own downmix would be sqrt(2) too loud).
    src = write_fixture(tmp_path, "wav", rate, stereo=True)
    renamed = tmp_path / "really_a_wav.m4a"
    renamed.write_bytes(src.read_bytes())
    got = load_audio(renamed, TARGET)
    assert abs(len(got) - len(REFERENCE)) <= 2
    n = min(len(got), len(REFERENCE))
    err = np.abs(got[EDGE:n - EDGE] - REFERENCE[EDGE:n - EDGE]).max()
    assert err < 1e-3, f"max abs error {err:.2e}"


# ---------------------------------------------------------------- broken files

def _empty(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    return p


def _truncated_header(tmp_path):
    good = write_fixture(tmp_path, "wav", 16000, stereo=False)
    p = tmp_path / "truncated.wav"
    p.write_bytes(good.read_bytes()[:20])
    return p


def _text_as_flac(tmp_path):
    p = tmp_path / "notes.flac"
    p.write_text("this is a text file, not audio\n" * 20)
    return p


def _random_mp3(tmp_path):
    p = tmp_path / "noise.mp3"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    return p


def _nan_wav(tmp_path):
    signal = make_signal(16000)
    signal[[10, 20, 30]] = np.nan
    signal[40] = np.inf
    p = tmp_path / "nan.wav"
    sf.write(p, signal, 16000, subtype="FLOAT")
    return p


def _no_frames(tmp_path):
    p = tmp_path / "no_frames.wav"
    sf.write(p, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    return p


def _missing(tmp_path):
    return tmp_path / "does_not_exist.wav"


# (builder, words the reason must contain, needs ffmpeg for that message)
BROKEN = {
    "empty": (_empty, ["empty", "0 bytes"], False),
    "truncated-header": (_truncated_header, ["corrupt", "ffmpeg:"], True),
    "text-as-flac": (_text_as_flac, ["corrupt", "ffmpeg:"], True),
    "random-mp3": (_random_mp3, ["corrupt", "ffmpeg:"], True),
    "nan-samples": (_nan_wav, ["contains 4 non-finite samples"], False),
    "no-frames": (_no_frames, ["no audio samples"], False),
    "missing": (_missing, ["not found"], False),
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[needs_ffmpeg] if BROKEN[n][2] else []) for n in BROKEN
])
def test_broken_file_raises_decode_error(tmp_path, name):
    build, words, _ = BROKEN[name]
    path = build(tmp_path)
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path, TARGET)
    err = info.value
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: ")
    for word in words:
        assert word in err.reason, err.reason
    # No ffmpeg pointer noise ("[mp3 @ 0x55...]") in the message.
    assert "@ 0x" not in err.reason
    # Survives a trip to and from a worker process.
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.path, back.reason) == (AudioDecodeError, err.path, err.reason)


def test_missing_ffmpeg_is_reported(tmp_path, monkeypatch):
    wav = write_fixture(tmp_path, "wav", 22050, stereo=False)
    mp3 = tmp_path / "x.mp3"
    mp3.write_bytes(b"\xff\xfb" + b"\0" * 1000)  # contents do not matter: ffmpeg is never found
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))

    with pytest.raises(AudioDecodeError, match="install ffmpeg, e.g. apt-get install ffmpeg"):
        load_audio(mp3, TARGET)
    # WAV/FLAC/OGG never needed ffmpeg.
    assert len(load_audio(wav, TARGET)) == len(REFERENCE)


# ---------------------------------------------------------------- batches

@pytest.mark.parametrize("workers", [0, 2])
def test_load_audio_many_aligns_results_and_errors(tmp_path, workers):
    good = [
        write_fixture(tmp_path, "wav", 16000, stereo=False),
        write_fixture(tmp_path, "flac", 44100, stereo=True),
        write_fixture(tmp_path, "ogg", 22050, stereo=False),
    ]
    if shutil.which("ffmpeg"):
        good.append(write_fixture(tmp_path, "mp3", 48000, stereo=True))
    bad = [build(tmp_path) for build, _, _ in BROKEN.values()]
    # Interleave good and bad so a shifted result list would be caught.
    paths = []
    for i in range(max(len(good), len(bad))):
        if i < len(good):
            paths.append(good[i])
        if i < len(bad):
            paths.append(bad[i])

    waves, errors = load_audio_many(paths, TARGET, workers=workers)

    assert len(waves) == len(paths)
    for path, wave in zip(paths, waves):
        if path in good:
            assert wave is not None, path
            assert wave.dtype == np.float32 and wave.ndim == 1
            assert abs(len(wave) - len(REFERENCE)) <= 0.02 * len(REFERENCE)
            corr, _ = best_alignment(wave, REFERENCE)
            assert corr > 0.99, (path, corr)
        else:
            assert wave is None, path
    assert sorted(e.path for e in errors) == sorted(str(p) for p in bad)
    assert all(isinstance(e, AudioDecodeError) for e in errors)


def test_load_audio_many_empty():
    assert load_audio_many([], TARGET) == ([], [])
    assert load_audio_many([], TARGET, workers=2) == ([], [])


# ---------------------------------------------------------------- resample

@pytest.mark.parametrize("orig,target", [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 44100)])
def test_resample_keeps_length_ratio_and_frequency(orig, target):
    t = np.arange(orig) / orig  # 1 s
    sine = np.sin(2 * np.pi * 1000 * t).astype(np.float64)
    out = resample(sine, orig, target)
    assert out.dtype == np.float32
    assert len(out) == target  # 1 s in, 1 s out
    assert peak_frequencies(out, target, n=1) == pytest.approx([1000], abs=1)
    # Amplitude kept (1000 Hz is far inside the passband).
    assert rms(out[100:-100]) == pytest.approx(1 / np.sqrt(2), rel=1e-2)


def test_resample_identity_and_axis():
    x = np.random.default_rng(1).standard_normal((1000, 2))
    same = resample(x, 16000, 16000)
    assert same.dtype == np.float32 and np.array_equal(same, x.astype(np.float32))
    halved = resample(x, 16000, 8000)
    assert halved.shape == (500, 2)  # resamples along time, keeps channels
    with pytest.raises(ValueError):
        resample(x, 0, 16000)
