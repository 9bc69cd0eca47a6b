"""Checkpoints: written whole or not at all, loaded without pickle, refused on a different base.

A checkpoint is a folder ``checkpoints/step-000100/``:

    trainable.safetensors   the trainable weights (projector, adapters), by parameter name
    state.pt                optimizer, scheduler, RNG states, retention state, step
                            (tensors and plain containers only: loaded with weights_only=True)
    meta.json               step, base fingerprint, variant; written last

It is assembled in a hidden temporary folder and renamed into place, so a run killed at any
moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import SafeError
from .run_dir import CHECKPOINTS

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    def weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return load_file(self.path / WEIGHTS, device=str(device))

    def state(self) -> dict[str, Any]:
        return torch.load(self.path / STATE, map_location="cpu", weights_only=True)


def save_checkpoint(
    stage_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any],
    weights_metadata: Optional[dict[str, str]] = None,
) -> Path:
    root = Path(stage_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, str(tmp / WEIGHTS),
              metadata=weights_metadata)
    torch.save(state, tmp / STATE)
    (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=1, sort_keys=True) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (a resumed run's final step): replace it
        old = root / f".step-{step:06d}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def prune_checkpoints(stage_dir: Path, keep_last: Optional[int]) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns what was deleted.

    Called after a save completed, so the newest is whole before an older one goes; a crash
    in between leaves one checkpoint too many, never one too few. None keeps everything.
    """
    if keep_last is None:
        return []
    old = list_checkpoints(stage_dir)[:-keep_last]
    for checkpoint in old:
        shutil.rmtree(checkpoint.path, ignore_errors=True)
    return [checkpoint.path for checkpoint in old]


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())


def list_checkpoints(stage_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (temporary folders of a crashed save are ignored)."""
    root = Path(stage_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / META).is_file() and (child / WEIGHTS).is_file() and (child / STATE).is_file():
                try:
                    meta = json.loads((child / META).read_text())
                except json.JSONDecodeError:
                    continue
                found.append(Checkpoint(child, int(match.group(1)), meta))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(stage_dir: Path) -> Optional[Checkpoint]:
    found = list_checkpoints(stage_dir)
    return found[-1] if found else None


def check_fingerprint(checkpoint: Checkpoint, base_fingerprint: str) -> None:
    """Refuse a checkpoint trained on another base (its adapters would be silently wrong)."""
    saved = checkpoint.meta.get("base_fingerprint")
    if saved != base_fingerprint:
        raise SafeError(
            f"{checkpoint.path}: this checkpoint was trained on base {saved}, but the profile's base is "
            f"{base_fingerprint}; load it with the base it was trained on (base.* in the profile)"
        )


def load_weights_into(parameters: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable weights into the model's parameters; the names must match exactly."""
    if set(weights) != set(parameters):
        missing, extra = set(parameters) - set(weights), set(weights) - set(parameters)
        raise SafeError(f"{source}: trainable weights do not match this model "
                        f"(missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}); "
                        "was it trained with other projector/fusion settings?")
    with torch.no_grad():
        for name, tensor in weights.items():
            if parameters[name].shape != tensor.shape:
                raise SafeError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model's is "
                                f"{tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)
