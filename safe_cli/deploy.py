"""Inference with a distilled audio gate: the small API a deployment needs, no training code.

    from safe_cli.data.batches import PromptBatcher, Query
    from safe_cli.deploy import AudioGate, answer
    from safe_cli.evaluation.runs import load_trained_model, locate
    from safe_cli.config import load_profile

    trained = locate("runs/demo/soft_retention/seed-0/stage-a")
    model = load_trained_model(trained, load_profile(str(trained.profile_path)), "cpu")
    gate = AudioGate.load("runs/demo/soft_retention/seed-0/stage-c")
    texts, budgets = answer(model, gate, PromptBatcher(model.base),
                            [Query("Which digit is spoken?"), Query("Which digit is shown?", image)],
                            [clip, clip])

``budgets`` says what each example cost: 0 = the base's own answer (no encoder, no adapter).
The gate reads the same state the policy was trained on (``safe_cli.rl.state``): one base
forward over the prompt, plus the clip's length and energy; never the audio encoder.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .data.batches import PromptBatcher, Query, generate_answers
from .rl.gate import AudioGate, GateError
from .rl.state import PolicyInputs, policy_inputs

__all__ = ["AudioGate", "GateError", "PolicyInputs", "policy_inputs", "decide_budgets", "answer"]


@torch.no_grad()
def decide_budgets(model, gate: AudioGate, batcher: PromptBatcher, queries: Sequence[Query],
                   waves: Sequence[Optional[np.ndarray]], threshold: Optional[float] = None) -> torch.Tensor:
    """(B,) token budgets the gate gives these questions and clips (clips at the encoder's rate)."""
    inputs = policy_inputs(model.base, batcher, queries, waves, model.audio_encoder.sample_rate)
    return gate.decide(inputs.features, inputs.has_clip, threshold)


@torch.no_grad()
def answer(model, gate: AudioGate, batcher: PromptBatcher, queries: Sequence[Query],
           waves: Sequence[Optional[np.ndarray]], max_new_tokens: int = 8,
           threshold: Optional[float] = None) -> tuple[list[str], torch.Tensor]:
    """Greedy answers with audio only where the gate says it pays; returns (answers, budgets)."""
    budgets = decide_budgets(model, gate, batcher, queries, waves, threshold)
    texts = generate_answers(model, batcher, queries, max_new_tokens, token_budget=budgets.to(batcher.device),
                             audio=list(waves))
    return texts, budgets
