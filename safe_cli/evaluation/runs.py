"""Find the trained weights a user points at, and rebuild the SAFE model around them.

``eval-retention`` accepts three kinds of folder (the layout is training/run_dir.py's):

    runs/demo/soft_retention/seed-0/                         a run: its latest stage is used
    runs/demo/soft_retention/seed-0/stage-a/                 a stage: its final weights, else
                                                             its latest checkpoint
    runs/demo/soft_retention/seed-0/stage-a/checkpoints/step-000200/   one checkpoint

The stage's ``profile.yaml`` says how the model was built; the base is loaded from it and its
fingerprint compared with the one the run recorded, so adapters are never evaluated on a base
they were not trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..config.schema import Profile
from ..errors import SafeError
from ..foundation.prepare import load_prepared_models
from ..models.builder import build_trainable
from ..models.safe_model import SAFEModel
from ..training import run_dir as layout
from ..training.checkpoint import META, WEIGHTS, latest_checkpoint, load_weights_into

ARGUMENT = "RUN_OR_CKPT_DIR"


@dataclass
class TrainedWeights:
    stage_dir: Path
    stage: str
    weights_path: Path
    step: Optional[int]  # the checkpoint's step; None for a stage's final weights
    base_fingerprint: Optional[str]
    variant: Optional[str]
    seed: Optional[int]

    @property
    def profile_path(self) -> Path:
        return self.stage_dir / layout.PROFILE_FILE


def _stage_of(stage_dir: Path) -> str:
    for stage, folder in layout.STAGE_FOLDERS.items():
        if stage_dir.name == folder:
            return stage
    return "a"  # a stage folder chosen with --run-dir under another name holds Stage A's layout


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _from_stage(stage_dir: Path) -> TrainedWeights:
    latest = latest_checkpoint(stage_dir)
    final = stage_dir / layout.FINAL_WEIGHTS
    meta = latest.meta if latest is not None else {}
    summary = _read_json(stage_dir / layout.SUMMARY_FILE)
    fingerprint_file = stage_dir / layout.FINGERPRINT_FILE
    fingerprint = fingerprint_file.read_text().strip() if fingerprint_file.is_file() else meta.get("base_fingerprint")
    if final.is_file():
        path, step = final, None
    elif latest is not None:
        path, step = latest.path / WEIGHTS, latest.step
    else:
        raise SafeError(f"{ARGUMENT}: {stage_dir} holds no trained weights yet (no {layout.FINAL_WEIGHTS} and no "
                        f"complete checkpoint under {layout.CHECKPOINTS}/)")
    return TrainedWeights(stage_dir, _stage_of(stage_dir), path, step, fingerprint,
                          summary.get("variant", meta.get("variant")), summary.get("seed", meta.get("seed")))


def locate(path: Union[str, Path]) -> TrainedWeights:
    """The weights behind a run, stage or checkpoint folder; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SafeError(f"{ARGUMENT}: {path} does not exist")
    if not path.is_dir():
        raise SafeError(f"{ARGUMENT}: {path} is a file; give the run, stage or checkpoint folder")
    if (path / WEIGHTS).is_file() and (path / META).is_file():  # one checkpoint
        stage_dir = path.parent.parent
        if not (stage_dir / layout.PROFILE_FILE).is_file():
            raise SafeError(f"{ARGUMENT}: {path} looks like a checkpoint, but {stage_dir / layout.PROFILE_FILE} "
                            "(how the model was built) is missing")
        meta = _read_json(path / META)
        return TrainedWeights(stage_dir, _stage_of(stage_dir), path / WEIGHTS, meta.get("step"),
                              meta.get("base_fingerprint"), meta.get("variant"), meta.get("seed"))
    if (path / layout.PROFILE_FILE).is_file():
        return _from_stage(path)
    # A run folder: the latest stage that has a profile (c after b after a).
    for stage in reversed(list(layout.STAGE_FOLDERS)):
        stage_dir = layout.stage_dir(path, stage)
        if (stage_dir / layout.PROFILE_FILE).is_file():
            return _from_stage(stage_dir)
    folders = ", ".join(f"{f}/" for f in layout.STAGE_FOLDERS.values())
    raise SafeError(f"{ARGUMENT}: {path} is not a SAFE run: expected {layout.PROFILE_FILE} (a stage folder), "
                    f"{WEIGHTS} + {META} (a checkpoint), or one of {folders} (a run)")


def load_trained_model(trained: TrainedWeights, profile: Profile, device: Union[str, torch.device]) -> SAFEModel:
    """The frozen base and encoder of ``profile`` with the run's projector and fusion weights."""
    from safetensors.torch import load_file

    base, encoder = load_prepared_models(profile, device)
    fingerprint = base.fingerprint()
    if trained.base_fingerprint and trained.base_fingerprint != fingerprint:
        raise SafeError(f"{trained.stage_dir}: these weights were trained on base {trained.base_fingerprint}, "
                        f"but the profile's base is {fingerprint}; evaluate with the profile the run used "
                        f"(the default) or one with the same base.* settings")
    projector, fusion = build_trainable(profile, base, encoder.feature_dim, trained.seed)
    model = SAFEModel(base, projector, fusion, encoder).to(device)
    try:
        weights = load_file(str(trained.weights_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise SafeError(f"{trained.weights_path}: cannot read the trained weights: {exc}") from None
    load_weights_into(dict(model.trainable_named_parameters()), weights, trained.weights_path)
    return model.eval()
