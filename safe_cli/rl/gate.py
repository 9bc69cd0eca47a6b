"""The distilled audio gate: the deployable form of the Stage B policy.

A small MLP over the policy's standardised state gives the probability that audio is worth
running; at or above the calibrated threshold the example gets ``budget_on`` tokens, else 0
(the base's own answer, no encoder, no adapter). Rows without a clip always get 0.

On disk (a folder, written by ``safe distill-policy``):

    gate.safetensors   net.* (the MLP) and normalizer.mean / normalizer.std
    gate.json          schema "safe.audio-gate/2": threshold, budget_on, token_budgets,
                       state_dim, hidden_size, state_features (with the state's version and the
                       layer it is read at), base_fingerprint, calibration

Schema 2 (issue 25) reads the state at the first fused layer, inside the answer's own prefill;
a schema-1 gate was trained on the last layer's state and is refused with a message, not fed
features it never saw.

Loading needs torch and safetensors only, no training code: see ``safe_cli.deploy``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .state import CLIP_FEATURES, QUESTION_BUCKETS, STATE_VERSION, StateNormalizer

SCHEMA = "safe.audio-gate/2"
OLD_SCHEMAS = {"safe.audio-gate/1": "the last layer's state (before issue 25)"}
WEIGHTS_FILE = "gate.safetensors"
CONFIG_FILE = "gate.json"


class GateError(ValueError):
    """A gate folder that cannot be loaded; the message names the file."""


class AudioGate(nn.Module):
    def __init__(self, state_dim: int, hidden_size: int, budget_on: int, token_budgets: Sequence[int],
                 threshold: float = 0.5, metadata: Optional[dict[str, Any]] = None):
        super().__init__()
        if budget_on not in token_budgets or budget_on <= 0:
            raise ValueError(f"budget_on must be a positive budget of {list(token_budgets)}, got {budget_on}")
        self.state_dim = int(state_dim)
        self.hidden_size = int(hidden_size)
        self.budget_on = int(budget_on)
        self.token_budgets = [int(b) for b in token_budgets]
        self.threshold = float(threshold)
        self.metadata = dict(metadata or {})
        self.normalizer = StateNormalizer(state_dim)
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) logit of "run audio" from raw (unstandardised) state features."""
        return self.net(self.normalizer(features)).squeeze(-1)

    @torch.no_grad()
    def probability(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))

    @torch.no_grad()
    def decide(self, features: torch.Tensor, has_clip: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """(B,) LongTensor of token budgets: ``budget_on`` where p >= threshold and there is a clip, else 0."""
        threshold = self.threshold if threshold is None else float(threshold)
        on = (self.probability(features) >= threshold) & has_clip.to(features.device).bool()
        return torch.where(on, torch.tensor(self.budget_on), torch.tensor(0)).long()

    # ------------------------------------------------------------------ artifact

    def config(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "state_dim": self.state_dim, "hidden_size": self.hidden_size,
            "budget_on": self.budget_on, "token_budgets": self.token_budgets, "threshold": self.threshold,
            "state_features": {"version": STATE_VERSION,
                               "read_at": "output of the first fused layer, before any audio",
                               "base_hidden": ["last position", "mean over the prompt"],
                               "base_hidden_size": (self.state_dim - QUESTION_BUCKETS - len(CLIP_FEATURES)) // 2,
                               "question_buckets": QUESTION_BUCKETS, "extra": list(CLIP_FEATURES)},
            **self.metadata,
        }

    def save(self, directory: Union[str, Path]) -> Path:
        """gate.safetensors then gate.json, each written whole (temporary name, then rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        tmp = directory / f".{WEIGHTS_FILE}.tmp"
        save_file(weights, str(tmp))
        tmp.replace(directory / WEIGHTS_FILE)
        tmp = directory / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(self.config(), indent=1, sort_keys=True) + "\n")
        tmp.replace(directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "AudioGate":
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise GateError(f"{path}: missing; a gate folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                "(made by `safe distill-policy`)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise GateError(f"{config_path}: not valid JSON: {exc}") from None
        if config.get("schema") in OLD_SCHEMAS:
            raise GateError(f"{config_path}: schema {config['schema']!r} was trained on "
                            f"{OLD_SCHEMAS[config['schema']]}; this SAFE reads the state at the first fused layer "
                            "(one prefill per example): retrain Stage B and C (safe train --stage b, then "
                            "safe distill-policy)")
        if config.get("schema") != SCHEMA:
            raise GateError(f"{config_path}: schema {config.get('schema')!r}, expected {SCHEMA!r}")
        known = {"schema", "state_dim", "hidden_size", "budget_on", "token_budgets", "threshold", "state_features"}
        missing = sorted(known - set(config))
        if missing:
            raise GateError(f"{config_path}: missing key(s) {', '.join(missing)}")
        gate = cls(config["state_dim"], config["hidden_size"], config["budget_on"], config["token_budgets"],
                   config["threshold"], {k: v for k, v in config.items() if k not in known})
        try:
            gate.load_state_dict(load_file(str(weights_path)))
        except Exception as exc:  # safetensors' own errors, or shapes that do not match gate.json
            raise GateError(f"{weights_path}: does not match {CONFIG_FILE}: {exc}") from None
        return gate.eval()
