"""Find the trained weights a user points at, and rebuild the SAFE model around them.

``eval-retention`` accepts three kinds of folder (the layout is training/run_dir.py's):

    runs/demo/soft_retention/seed-0/                         a run: its latest stage is used
    runs/demo/soft_retention/seed-0/stage-a/                 a stage: its final weights, else
                                                             its latest checkpoint
    runs/demo/soft_retention/seed-0/stage-a/checkpoints/step-000200/   one checkpoint

Stage B and C folders (and Stage B checkpoints) add what decides the budgets: the policy
(``policy.safetensors``) or the gate (``gate.json`` + ``gate.safetensors``); the projector and
adapters are Stage B's when it tuned them, else Stage A's.

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
from ..models.builder import apply_precision, build_trainable
from ..models.safe_model import SAFEModel
from ..training import run_dir as layout
from ..rl.gate import CONFIG_FILE as GATE_CONFIG
from ..training.checkpoint import META, WEIGHTS, latest_checkpoint, load_weights_into

POLICY_WEIGHTS = "policy.safetensors"  # training/stage_b.py writes it (importing that module here would loop)

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
    policy_path: Optional[Path] = None  # safetensors with policy.* and normalizer.* (Stage B)
    gate_dir: Optional[Path] = None  # a distilled gate (Stage C)
    weights_prefix: str = ""  # "model." when the weights sit inside a Stage B checkpoint

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


def _model_weights(stage_dir: Path) -> Path:
    """Stage B's tuned adapters when it wrote them, else the run's Stage A weights."""
    tuned = stage_dir / layout.FINAL_WEIGHTS
    if tuned.is_file():
        return tuned
    stage_a = layout.stage_dir(stage_dir.parent, "a") / layout.FINAL_WEIGHTS
    if not stage_a.is_file():
        raise SafeError(f"{ARGUMENT}: {stage_dir} needs the run's Stage A weights, but {stage_a} is missing")
    return stage_a


def _from_stage(stage_dir: Path) -> TrainedWeights:
    latest = latest_checkpoint(stage_dir)
    final = stage_dir / layout.FINAL_WEIGHTS
    meta = latest.meta if latest is not None else {}
    summary = _read_json(stage_dir / layout.SUMMARY_FILE)
    fingerprint_file = stage_dir / layout.FINGERPRINT_FILE
    fingerprint = fingerprint_file.read_text().strip() if fingerprint_file.is_file() else meta.get("base_fingerprint")
    stage = _stage_of(stage_dir)
    variant, seed = summary.get("variant", meta.get("variant")), summary.get("seed", meta.get("seed"))
    if stage == "c":
        if not (stage_dir / GATE_CONFIG).is_file():
            raise SafeError(f"{ARGUMENT}: {stage_dir} holds no gate yet ({GATE_CONFIG} missing); run "
                            "`safe distill-policy` on the run")
        gate = _read_json(stage_dir / GATE_CONFIG)
        return TrainedWeights(stage_dir, "c", _model_weights(layout.stage_dir(stage_dir.parent, "b")), None,
                              fingerprint, gate.get("variant", variant), gate.get("seed", seed), gate_dir=stage_dir)
    if stage == "b":
        policy = stage_dir / POLICY_WEIGHTS
        if policy.is_file():
            return TrainedWeights(stage_dir, "b", _model_weights(stage_dir), None, fingerprint, variant, seed,
                                  policy_path=policy)
        if latest is None:
            raise SafeError(f"{ARGUMENT}: {stage_dir} holds no policy yet (no {POLICY_WEIGHTS} and no complete "
                            f"checkpoint under {layout.CHECKPOINTS}/)")
        return _from_stage_b_checkpoint(stage_dir, latest.path, latest.meta)
    if final.is_file():
        path, step = final, None
    elif latest is not None:
        path, step = latest.path / WEIGHTS, latest.step
    else:
        raise SafeError(f"{ARGUMENT}: {stage_dir} holds no trained weights yet (no {layout.FINAL_WEIGHTS} and no "
                        f"complete checkpoint under {layout.CHECKPOINTS}/)")
    return TrainedWeights(stage_dir, stage, path, step, fingerprint, variant, seed)


def _from_stage_b_checkpoint(stage_dir: Path, checkpoint: Path, meta: dict) -> TrainedWeights:
    """A Stage B checkpoint holds the policy, and the adapters (model.*) only when it tuned them."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / WEIGHTS), "pt") as handle:
        tuned = any(key.startswith("model.") for key in handle.keys())
    weights = checkpoint / WEIGHTS if tuned else _model_weights(stage_dir)
    return TrainedWeights(stage_dir, "b", weights, meta.get("step"), meta.get("base_fingerprint"), meta.get("variant"),
                          meta.get("seed"), policy_path=checkpoint / WEIGHTS, weights_prefix="model." if tuned else "")


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
        if _stage_of(stage_dir) == "b":
            return _from_stage_b_checkpoint(stage_dir, path, meta)
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
    model = apply_precision(SAFEModel(base, projector, fusion, encoder).to(device), profile)
    try:
        weights = load_file(str(trained.weights_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise SafeError(f"{trained.weights_path}: cannot read the trained weights: {exc}") from None
    if trained.weights_prefix:
        prefix = trained.weights_prefix
        weights = {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}
    load_weights_into(dict(model.trainable_named_parameters()), weights, trained.weights_path)
    return model.eval()


def load_decider(trained: TrainedWeights, state_dim: int, profile: Profile) -> dict:
    """What picks the budgets: the gate and/or the policy (with its normalizer), or nothing (always-max)."""
    decider: dict = {}
    policy_path = trained.policy_path
    if trained.gate_dir is not None:  # the policy it was distilled from is drawn beside it on the Pareto plot
        candidate = layout.stage_dir(trained.gate_dir.parent, "b") / POLICY_WEIGHTS
        policy_path = candidate if candidate.is_file() else None
    if policy_path is not None:
        from ..training.stage_b import load_policy

        policy, normalizer = load_policy(policy_path, state_dim, profile)
        decider.update(policy=policy, normalizer=normalizer)
    if trained.gate_dir is not None:
        from ..rl.gate import AudioGate, GateError

        try:
            gate = AudioGate.load(trained.gate_dir)
        except GateError as exc:
            raise SafeError(str(exc)) from None
        if gate.state_dim != state_dim:
            raise SafeError(f"{trained.gate_dir / GATE_CONFIG}: state_dim {gate.state_dim}, but this base gives "
                            f"{state_dim}; the gate was made for another base")
        decider["gate"] = gate
    return decider
