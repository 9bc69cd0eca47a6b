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

One prefill per example (issue 25): the prompt runs through the base up to the first fused
layer, the gate reads its state there (``safe_cli.rl.state``: the same features Stage B/C
trained on; never the audio encoder), and the same forward carries on, with audio fused into
the rows the gate chose, and decodes from that prefill's KV cache
(``SAFEModel.generate_gated``). Deciding costs the gate's MLP and one read of the base's output
head at one position; nothing runs twice.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .data.batches import PromptBatcher, Query
from .rl.gate import AudioGate, GateError
from .rl.state import BranchState, PolicyInputs, policy_inputs

__all__ = ["AudioGate", "GateError", "PolicyInputs", "policy_inputs", "decide_budgets", "answer", "generate_gated"]


@torch.no_grad()
def decide_budgets(model, gate: AudioGate, batcher: PromptBatcher, queries: Sequence[Query],
                   waves: Sequence[Optional[np.ndarray]], threshold: Optional[float] = None) -> torch.Tensor:
    """(B,) token budgets the gate gives these questions and clips (clips at the encoder's rate),
    without answering: the base runs only up to the first fused layer."""
    inputs = policy_inputs(model, batcher, queries, waves)
    return gate.decide(inputs.features, inputs.has_clip, threshold)


@torch.no_grad()
def generate_gated(model, gate: AudioGate, batcher: PromptBatcher, queries: Sequence[Query],
                   waves: Sequence[Optional[np.ndarray]], max_new_tokens: Optional[int] = None,
                   threshold: Optional[float] = None, **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor, PolicyInputs]:
    """Generation (greedy unless ``generate_kwargs`` say otherwise, e.g. ``do_sample=True``) with the
    gate deciding inside the prefill; returns (new token ids, budgets, the state the gate read)."""
    batch = batcher.for_generation(queries)
    reader = BranchState(model.base, model.branch_layer, batch, list(waves), model.audio_encoder.sample_rate)
    seen: dict[str, PolicyInputs] = {}

    def decide(hidden: torch.Tensor) -> torch.Tensor:
        seen["inputs"] = inputs = reader.read(hidden)
        return gate.decide(inputs.features, inputs.has_clip, threshold)

    output, budgets = model.generate_gated(**batch, decide=decide, audio=list(waves),
                                           **{**batcher.greedy_settings(max_new_tokens), **generate_kwargs})
    return output[:, batch["input_ids"].shape[1]:], budgets, seen["inputs"]


@torch.no_grad()
def answer(model, gate: AudioGate, batcher: PromptBatcher, queries: Sequence[Query],
           waves: Sequence[Optional[np.ndarray]], max_new_tokens: int = 8,
           threshold: Optional[float] = None, **generate_kwargs) -> tuple[list[str], torch.Tensor]:
    """Greedy answers with audio only where the gate says it pays; returns (answers, budgets).
    ``generate_kwargs`` go to Hugging Face's ``generate`` (sampling, ``min_new_tokens``, ...)."""
    new_ids, budgets, _ = generate_gated(model, gate, batcher, queries, waves, max_new_tokens, threshold,
                                         **generate_kwargs)
    return batcher.decode(new_ids), budgets
