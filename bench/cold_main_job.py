"""The README's main job on an empty cache: wall time, peak memory, where the time goes, what it learned.

Each run is ``safe train --stage a --variant soft_retention`` (the demo profile) in a fresh
process with its own empty ``SAFE_CACHE_DIR`` and run directory, as a first-time user runs it.
Per run it records the wall time, the peak RSS (``wait4``'s ``ru_maxrss`` of the process), the
pretraining times the cache wrote (``pretraining.json``: vision tower + tiny LLaVA, tiny
Whisper), Stage A's training time, and every task's base and SAFE accuracy from Stage A's
summary (printed: spoken digits, audio/even, av/same, av/sum). Medians over the runs are
printed and everything is written as JSON, with the CPU's cores and SIMD flags from lscpu.

Run it on an otherwise idle machine (a figure taken while other jobs share the cores is not a
figure):

    python bench/cold_main_job.py --runs 3
    python bench/cold_main_job.py --runs 1 --set seed=1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("audio/digit", "audio/even", "av/same", "av/sum")


def cpu_description() -> dict:
    """Cores and the CPU flags that change float rounding (the figures depend on them, issue 28)."""
    info = {"cores": os.cpu_count(), "machine": platform.machine()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    info["model"] = fields.get("Model name", "").strip()
    flags = set(fields.get("Flags", "").split())
    info["simd"] = sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
    return info


def one_run(safe: str, overrides: list[str], threads: int | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-cold-main-"))
    cache, run_dir = work / "cache", work / "run"
    env = dict(os.environ, SAFE_CACHE_DIR=str(cache), SAFE_NO_PROGRESS="1")
    command = [safe, "train", "--stage", "a", "--variant", "soft_retention", "--run-dir", str(run_dir)]
    for item in overrides:
        command += ["--set", item]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        sys.exit(f"the main job failed (status {status}):\n{output[-4000:]}")
    record = {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "pretraining": {}}
    for path in cache.rglob("pretraining.json"):
        kind = path.parent.parent.name  # <cache>/<kind>/<key>/pretraining.json
        record["pretraining"][kind] = json.loads(path.read_text())
    summary = json.loads(next(run_dir.rglob("summary.json")).read_text())
    record["stage_a_train_seconds"] = summary["train_seconds"]
    record["accuracy"] = {t["task"]: t["safe_accuracy"] for t in summary["tasks"] if t["task"] in WATCHED}
    # Every task's, base and SAFE: the base's VL and text figures are what its pretraining reached.
    record["tasks"] = {t["task"]: {"base": t["base_accuracy"], "safe": t["safe_accuracy"]} for t in summary["tasks"]}
    shutil.rmtree(work, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the job (default: torch's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--label", default="", help="A name for this measurement in the JSON (e.g. before/after).")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cold_main_job.json"))
    args = parser.parse_args()

    safe = shutil.which("safe") or str(Path(sys.executable).with_name("safe"))
    runs = []
    for index in range(args.runs):
        record = one_run(safe, args.overrides, args.threads)
        runs.append(record)
        parts = {kind: round(p["wall_seconds"], 1) for kind, p in record["pretraining"].items()}
        print(f"run {index + 1}: {record['wall_seconds']:.1f} s, peak {record['peak_rss_mb']:.0f} MB, "
              f"pretraining {parts}, Stage A training {record['stage_a_train_seconds']:.1f} s, "
              f"accuracy {record['accuracy']}", flush=True)
    median = {
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "stage_a_train_seconds": statistics.median(r["stage_a_train_seconds"] for r in runs),
    }
    for kind in runs[0]["pretraining"]:
        median[f"pretrain_{kind}_seconds"] = statistics.median(r["pretraining"][kind]["wall_seconds"] for r in runs)
    print(f"median of {len(runs)}: " + ", ".join(f"{k} {v:.1f}" for k, v in median.items()))
    result = {"label": args.label, "overrides": args.overrides, "threads": args.threads, "cpu": cpu_description(),
              "date": time.strftime("%Y-%m-%d"), "runs": runs, "median": median}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
