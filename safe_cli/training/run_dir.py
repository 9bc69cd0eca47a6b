"""Where a run lives: one map from stage to folder, shared by every stage and command.

    <runs_dir>/<profile>/<variant>/seed-<N>/     the run (``--run-dir`` names it directly)
        stage-a/                                  STAGE_FOLDERS["a"]
            profile.yaml        the resolved profile, every key under its description
            env.json            package versions, git commit, device, host
            base_fingerprint    sha256 of the frozen base's weights (checked on resume/load)
            metrics.jsonl       one JSON object per logged step
            checkpoints/step-000100/{trainable.safetensors, state.pt, meta.json}
            trainable.safetensors   the final trainable weights
            summary.json        the final evaluation, timings and peak memory
        stage-b/ ...

Stage B reads Stage A's weights from ``stage_dir(run, "a")``; nothing else knows the names.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_text

STAGE_FOLDERS = {"a": "stage-a", "b": "stage-b", "c": "stage-c"}

PROFILE_FILE = "profile.yaml"
ENV_FILE = "env.json"
FINGERPRINT_FILE = "base_fingerprint"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL_WEIGHTS = "trainable.safetensors"
SUMMARY_FILE = "summary.json"
EVAL_EXAMPLES_FILE = "eval_examples.json"  # per-task, per-example answers and scores of the stage's evaluation


def run_root(runs_dir: str, profile: str, variant: str, seed: int, run_dir: Optional[str] = None) -> Path:
    """The run's folder: ``--run-dir`` when given, else ``runs_dir/profile/variant/seed-N``."""
    if run_dir:
        return Path(run_dir).expanduser()
    return Path(runs_dir).expanduser() / profile / variant / f"seed-{seed}"


def stage_dir(root: Path, stage: str) -> Path:
    return Path(root) / STAGE_FOLDERS[stage]


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str) -> dict[str, Any]:
    import torch

    packages = ("safe-cli", "torch", "transformers", "peft", "openai-whisper", "safetensors", "numpy")
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": {name: _version(name) for name in packages},
        "git_commit": _git_commit(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a resumed run logs them again, identically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
