"""Stage A with the frozen encoder's features memoised per clip, against encoding every clip every step.

    python bench/feature_memo.py [--pairs 3] [--out FILE]

The README's main job (``safe train --stage a --variant soft_retention``, demo profile) on a
warm cache (the foundation models are pretrained once first, or found in ``$SAFE_CACHE_DIR``,
not timed), in fresh processes,
alternating ``audio_encoder.memory_cache_mb=0`` (every clip encoded in its batch, as before the
memo) and the default (each clip encoded once, alone). Interleaved so that a machine getting
slower or faster affects both alike. Prints the medians of Stage A's training seconds,
examples/s and the process's wall time, their ratio, and every watched task's accuracy per
setting; writes bench/results/feature_memo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"memo off": ["--set", "audio_encoder.memory_cache_mb=0"], "memo on": []}
WATCHED = ("audio/digit", "audio/even", "av/same", "av/sum")


def run_once(extra: list[str], work: Path, env: dict) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "safe_cli", "train", "--stage", "a", "--variant", "soft_retention",
                    "--run-dir", str(run_dir), *extra], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "stage-a" / "summary.json").read_text())
    accuracy = {t["task"]: t["safe_accuracy"] for t in summary["tasks"] if t["task"] in WATCHED}
    return {"wall_seconds": wall, "train_seconds": summary["train_seconds"],
            "examples_per_second": summary["examples_per_second"], "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/feature_memo.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safe-memo-"))
    # $SAFE_CACHE_DIR when set (its foundation models are reused), else a fresh cache here.
    env = dict(os.environ, SAFE_CACHE_DIR=os.environ.get("SAFE_CACHE_DIR") or str(work / "cache"),
               SAFE_NO_PROGRESS="1")
    subprocess.run([sys.executable, "-m", "safe_cli", "prepare"], env=env, check=True, stdout=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for pair in range(args.pairs):
        for name, extra in SETTINGS.items():
            row = run_once(extra, work, env)
            runs[name].append(row)
            print(f"pair {pair + 1} {name}: Stage A {row['train_seconds']:.1f} s, "
                  f"{row['examples_per_second']:.0f} examples/s, process {row['wall_seconds']:.1f} s, "
                  + ", ".join(f"{task} {acc:.1%}" for task, acc in row["accuracy"].items()), flush=True)
    median = {name: {key: statistics.median(r[key] for r in rows)
                     for key in ("train_seconds", "examples_per_second", "wall_seconds")}
              for name, rows in runs.items()}
    ratio = median["memo on"]["train_seconds"] / median["memo off"]["train_seconds"]
    for name, values in median.items():
        print(f"median {name}: Stage A {values['train_seconds']:.1f} s, {values['examples_per_second']:.0f} "
              f"examples/s, process {values['wall_seconds']:.1f} s")
    print(f"Stage A training time, memo on / off: {ratio:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "median": median, "train_seconds_ratio": ratio}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
