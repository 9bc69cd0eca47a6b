"""Forward-time overhead of SAFE over its frozen base, measured side by side in one process.

    python bench/bypass_overhead.py [--profile demo] [--batch-size 8] [--repeats 200] [--set K=V ...] [--out FILE]

Three forwards on the same batch, interleaved in rotating order so drift and noise hit all
three alike: the base's own forward, SAFE with every budget 0, and SAFE with every budget 8.
The audio encoder is excluded (features are precomputed), as the targets state:
budget 0 <= 1.02x the base, budget 8 <= 1.15x the base on the tiny model. Prints medians and
ratios and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from safe_cli.config import load_profile
from safe_cli.models import build_safe_model
from safe_cli.models.bypass import perturb_adapters
from safe_cli.models.probe import probe_audio, probe_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Profile override, e.g. --set base.tiny.hidden_size=512 for a larger model.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bypass_overhead.json"))
    args = parser.parse_args()

    profile = load_profile(args.profile, args.overrides)
    model = build_safe_model(profile, "cpu")
    perturb_adapters(model)  # a real, non-identity adapter: the work budget 8 pays for is real
    generator = torch.Generator().manual_seed(0)
    inputs = probe_batch(model.base, args.batch_size, args.text_length, generator)
    with torch.no_grad():
        features = model.encode_audio(probe_audio(model.audio_encoder.sample_rate, args.batch_size, generator=generator))
    zeros = torch.zeros(args.batch_size, dtype=torch.long)
    budget = torch.full((args.batch_size,), args.budget, dtype=torch.long)

    runs = {
        "base": lambda: model.base(**inputs),
        "safe_budget_0": lambda: model(token_budget=zeros, audio_features=features, **inputs),
        f"safe_budget_{args.budget}": lambda: model(token_budget=budget, audio_features=features, **inputs),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            order = names[i % 3:] + names[: i % 3]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "bypass_overhead",
        "profile": profile.name,
        "overrides": args.overrides,
        "base_parameters": sum(p.numel() for p in model.base_model.parameters()),
        "batch_size": args.batch_size,
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "median_ms": {name: 1000 * value for name, value in medians.items()},
        "ratio_budget_0_over_base": medians["safe_budget_0"] / medians["base"],
        f"ratio_budget_{args.budget}_over_base": medians[f"safe_budget_{args.budget}"] / medians["base"],
        "targets": {"budget_0": 1.02, f"budget_{args.budget}": 1.15},
    }
    for name, value in result["median_ms"].items():
        print(f"{name:>16}: median {value:8.3f} ms")
    print(f"ratio budget 0 / base: {result['ratio_budget_0_over_base']:.3f} (target <= 1.02)")
    ratio_k = result[f"ratio_budget_{args.budget}_over_base"]
    print(f"ratio budget {args.budget} / base: {ratio_k:.3f} (target <= 1.15)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
