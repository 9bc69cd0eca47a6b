"""What every training stage does around its steps: open the stage folder, stop on a signal,
write the final weights whole, measure memory. Stage A, B and C share these, so a run folder
and its failure modes look the same whichever stage wrote it.
"""

from __future__ import annotations

import resource
import signal
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..atomic import atomic_write_text, write_json
from ..config.loader import dump_profile
from ..config.schema import Profile
from ..errors import SafeError
from . import run_dir as layout
from .checkpoint import latest_checkpoint


def profile_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key.path: old in the run, new now`` for every leaf that differs."""
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += profile_differences(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} in the run, {b!r} now")
    return out


def saved_profile(path: Path) -> dict:
    """A run's saved profile.yaml, with defaults filled in for keys added since it was written (so
    a run from an older version compares equal when nothing it used changed)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    try:
        return Profile.model_validate(raw).model_dump(mode="json")
    except ValueError:  # a key since removed or renamed: compare as written, the difference is named
        return raw


def prepare_stage_dir(directory: Path, profile: Profile, resume: bool) -> None:
    """Refuse to mix two runs in one folder; on resume, refuse a changed profile."""
    has_checkpoints = latest_checkpoint(directory) is not None
    if has_checkpoints and not resume:
        raise SafeError(
            f"--run-dir: {directory} already holds a run's checkpoints; pass --resume to continue it, "
            f"or choose another --run-dir/--seed"
        )
    saved_path = directory / layout.PROFILE_FILE
    if resume and saved_path.exists():
        differences = profile_differences(saved_profile(saved_path), profile.model_dump(mode="json"))
        if differences:
            raise SafeError(
                f"{saved_path}: the run was started with another profile; resuming would mix two "
                "trainings:\n" + "\n".join(differences[:20])
            )
    # Nothing is created yet: a run that fails on its data or models leaves no folder behind.


def open_stage_dir(directory: Path, profile: Profile, device: torch.device, base_fingerprint: str) -> None:
    """Write the resolved profile, env.json and the base fingerprint (refusing another base's folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / layout.PROFILE_FILE, dump_profile(profile))
    write_json(directory / layout.ENV_FILE, layout.environment(str(device)))
    fingerprint_file = directory / layout.FINGERPRINT_FILE
    if fingerprint_file.exists() and fingerprint_file.read_text().strip() != base_fingerprint:
        raise SafeError(f"{fingerprint_file}: this run was trained on base {fingerprint_file.read_text().strip()}, "
                        f"the profile's base is {base_fingerprint}")
    atomic_write_text(fingerprint_file, base_fingerprint + "\n")


def save_weights(path: Path, weights: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors written to a temporary name and renamed: never half a file under the real name."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


class StopSignals:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / SIGINT: stop after this step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: Optional[str] = None
        self.previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test worker): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (and of the GPU, when training there)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if device.type == "cuda":
        return rss + torch.cuda.max_memory_allocated(device) / 2**20
    return rss
