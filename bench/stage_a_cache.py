"""Stage A examples/s: encoding audio on the fly vs reading features from the encode-audio cache.

Two trainers of the same profile, variant and seed are built side by side; the second has
``data.audio_features`` pointing at a cache that ``encode_audio`` filled with the clips the
examples use (timed separately: it is paid once for every stage, variant and seed). Their
optimizer steps are interleaved (fly, cache, fly, cache, ...) so machine noise hits both alike;
the medians and their ratio are printed and written as JSON.

Encoders:
    profile        the profile's own encoder (avdigits: the tiny whisper, 2.4 s window)
    whisper-tiny   whisper-tiny's dimensions (384 wide, 4 layers, 6 heads) over whisper's
                   faithful 30 s window, random init (speed does not depend on the weights)

    python bench/stage_a_cache.py --encoder whisper-tiny --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SAFE_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
WHISPER_TINY = [
    "audio_encoder.tiny_state=384", "audio_encoder.tiny_layers=4", "audio_encoder.tiny_heads=6",
    "audio_encoder.tiny_window_seconds=30", "audio_encoder.tiny_pretrain.steps=1",
    "audio_encoder.tiny_pretrain.batch_size=4",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="avdigits")
    parser.add_argument("--encoder", choices=("profile", "whisper-tiny"), default="profile")
    parser.add_argument("--variant", default="soft_retention")
    parser.add_argument("--steps", type=int, default=12, help="Timed steps per trainer (after 2 warm-up steps).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage_a_cache.json"))
    args = parser.parse_args()

    if not os.environ.get("SAFE_DATA_ROOT") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["SAFE_DATA_ROOT"] = str(ROOT.parent / "shared" / "data")
    import torch

    from safe_cli.config import load_profile
    from safe_cli.features.cache import FeatureCache
    from safe_cli.features.encode import encode_audio
    from safe_cli.training.stage_a import StageATrainer

    overrides = ["data.num_train=40", "data.num_eval=4"] + (WHISPER_TINY if args.encoder == "whisper-tiny" else [])
    overrides += args.overrides
    work = Path(tempfile.mkdtemp(prefix="bench-stage-a-cache-"))

    fly = StageATrainer(load_profile(args.profile, overrides), variant=args.variant, seed=0, run_dir=work / "fly")
    fly.build()
    profile = fly.profile
    # Every clip the run can hear: the training records' (their distractor pool) and the test records'.
    used = sorted(set(fly.alignment.distractors) | {e.audio for e in fly.test_pool.examples if e.audio})
    cache_dir = work / "features"
    began = time.perf_counter()
    report = encode_audio(used, FeatureCache(cache_dir), fly.model.audio_encoder, batch_size=16, progress=False)
    encode_seconds = time.perf_counter() - began

    cached = StageATrainer(load_profile(args.profile, overrides + [f"data.audio_features={cache_dir}"]),
                           variant=args.variant, seed=0, run_dir=work / "cached")
    cached.build()
    trainers = {"on_the_fly": fly, "from_cache": cached}
    for trainer in trainers.values():
        trainer.model.train()
        steps = trainer.step_batches()
        for step in (1, 2):
            trainer._step(step, steps[step])
    seconds = {name: [] for name in trainers}
    for step in range(3, 3 + args.steps):
        for name, trainer in trainers.items():
            inputs = trainer.step_batches()[step]  # made outside the timed part: the encoder is what differs
            began = time.perf_counter()
            trainer._step(step, inputs)
            seconds[name].append(time.perf_counter() - began)

    examples_per_step = profile.training.stage_a.batch_size * profile.training.stage_a.grad_accum
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "profile": args.profile, "encoder": args.encoder, "variant": args.variant, "steps": args.steps,
        "torch_threads": torch.get_num_threads(), "clips_cached": report.encoded, "encode_seconds": encode_seconds,
        "median_step_seconds": median,
        "examples_per_second": {name: examples_per_step / value for name, value in median.items()},
        "speedup": median["on_the_fly"] / median["from_cache"],
    }
    for name in trainers:
        print(f"{name:>11}: median step {1000 * median[name]:8.1f} ms  "
              f"{result['examples_per_second'][name]:7.1f} examples/s")
    print(f"from the cache: {result['speedup']:.2f}x the examples/s of encoding on the fly "
          f"({args.encoder} encoder; filling the cache took {encode_seconds:.1f} s for {report.encoded} clips)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
