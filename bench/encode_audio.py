"""openai-whisper's own per-file loop vs `safe encode-audio`, same encoder and clips, one run.

    python bench/encode_audio.py [--clips 120] [--dims tiny] [--batch-size 16] [--workers 0] [--out FILE]

The encoder is a whisper-architecture model with whisper's real 30 s window (1500 positions)
and the dimensions of a named whisper size (`tiny`: 384 wide, 4 layers), randomly initialised
(no weights can be downloaded here; speed and equality do not depend on the values), saved as
a whisper `.pt` and loaded with `whisper.load_model` by both paths:

* naive: for each file `whisper.load_audio` (an ffmpeg process), `pad_or_trim`,
  `log_mel_spectrogram`, the encoder on that one clip;
* ours: `safe_cli.features.encode.encode_audio` into an empty cache (hashing, soundfile
  decoding, batched log-mel and encoder, shard writing included).

Clips are FSDD recordings from $SAFE_DATA_ROOT or ../shared/data. Prints clips/s of both, their
ratio and the largest feature difference, and writes them as JSON.
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
def naive(model, files: list[str], load=None) -> tuple[float, dict[str, torch.Tensor]]:
    """whisper's per-file path; ``load`` replaces ``whisper.load_audio`` (to isolate decoding)."""
    import whisper

    started = time.perf_counter()
    out = {}
    for path in files:
        audio = whisper.pad_or_trim(torch.as_tensor(load(path)) if load else whisper.load_audio(path))
        mel = whisper.log_mel_spectrogram(audio)
        out[path] = model.encoder(mel[None])[0]
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--dims", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encode_audio.json"))
    args = parser.parse_args()

    import whisper

    from safe_cli.features.cache import FeatureCache, content_hash
    from safe_cli.features.encode import encode_audio, encoder_fingerprint
    from safe_cli.models.audio_encoders import WhisperEncoder

    files = fsdd_files(args.clips)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / f"whisper-{args.dims}-random.pt"
        save_encoder(checkpoint, args.dims)
        model = whisper.load_model(str(checkpoint), device="cpu")
        encoder = WhisperEncoder.load(str(checkpoint), "cpu")
        naive(model, files[:2])  # warm both paths up (allocator, ffmpeg binary in page cache)
        encode_audio(files[:2], FeatureCache(Path(tmp) / "warm"), encoder, args.batch_size, args.workers,
                     progress=False)

        naive_seconds, reference = naive(model, files)
        cache = FeatureCache(Path(tmp) / "cache")
        report = encode_audio(files, cache, encoder, args.batch_size, args.workers, progress=False)
        fp = encoder_fingerprint(encoder)
        cached = {p: cache.lookup(content_hash(p), fp) for p in files}
        diff = max(float((cached[p] - reference[p]).abs().max()) for p in files)
        # The same decoded samples through whisper's per-file log-mel and encoder: what remains
        # of ``diff`` beyond this is decoding (ffmpeg's resampler vs scipy's polyphase filter).
        from safe_cli.data.audio_io import load_audio

        _, same_input = naive(model, files, load=lambda path: load_audio(path, 16000))
        pipeline_diff = max(float((cached[p] - same_input[p]).abs().max()) for p in files)
        scale = max(float(reference[p].abs().max()) for p in files)

    result = {
        "clips": len(files), "encoder": f"whisper-{args.dims} dims, 1500 positions (30 s window), random init",
        "naive_clips_per_second": len(files) / naive_seconds,
        "safe_clips_per_second": len(files) / report.seconds,
        "speedup": naive_seconds / report.seconds,
        "max_abs_feature_difference": diff,
        "max_abs_difference_same_decoded_audio": pipeline_diff,
        "feature_abs_max": scale,
        "batch_size": args.batch_size, "workers": args.workers,
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"naive whisper loop: {result['naive_clips_per_second']:.2f} clips/s")
    print(f"safe encode-audio:  {result['safe_clips_per_second']:.2f} clips/s "
          f"(batch {args.batch_size}, {args.workers} decode workers)")
    print(f"speed-up: {result['speedup']:.2f}x")
    print(f"largest feature difference: {diff:.2e} end to end (features up to {scale:.2f}); "
          f"{pipeline_diff:.2e} from the same decoded samples (the rest is the resampler)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
