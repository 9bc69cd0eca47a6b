"""The policy's state: what it may look at before deciding whether audio is worth its cost.

The state is read where the answer's own forward reaches the first fused layer, at its output
and before any audio is added (the *branch point*). Every layer up to there is the base's own
computation for every row, whatever the decision: so deployment runs the prompt through the
base once, decides there, and carries on with audio in only the rows that get it, in the same
forward, keeping the KV cache of every layer for decoding (``SAFEModel.generate_gated``).
Reading the state after the last layer instead (as SAFE did until issue 25) needed a second,
full prefill of every prompt: on LLaVA-1.5-7B about 8.6 TFLOPs to decide about a 0.35-TFLOP
encoder. Nothing here runs the audio encoder (else skipping audio would save nothing). Per
example:

    question      the branch point's hidden state at the prompt's last position, and its mean
                  over the prompt's tokens (the mean keeps the question's words: on avdigits a
                  policy on the last position alone confused "What is 3 plus 4?" with "Which
                  digit is spoken?" on 13% of the arithmetic questions)
    words         the prompt's token ids hashed into ``QUESTION_BUCKETS`` counts (the hashing
                  trick; image and padding tokens left out): which words the question uses,
                  explicitly, so a policy can separate "spoken" from "plus" directly
    confidence    the base's own output head read at the branch point, last position (a logit
                  lens: one H x vocab product, ~0.26 GFLOPs on a 7B base): top probability,
                  top-1 minus top-2 margin, entropy / log(vocab)
    clip          has a clip (0/1), its length in seconds, log10 of its mean energy

Position ids count from each row's first real token (left padding, as ``generate`` counts
them), so a row's state does not depend on the rows it is batched with.

Training (Stage B/C) and evaluation read the state with ``policy_inputs``, which runs the base
only up to the branch point and stops; deployment reads it inside the answer's forward with
the same ``BranchState``. A policy or gate therefore sees in production exactly the features it
was trained on (tests/test_policy_stages.py compares them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

QUESTION_BUCKETS = 128
# What the state is, for the files that store a policy or gate trained on it: "branch" = read at the
# first fused layer (issue 25). A policy trained on another state must not be fed this one.
STATE_VERSION = "branch-1"
CLIP_FEATURES = ("base_confidence", "base_margin", "base_entropy", "has_clip", "clip_seconds", "clip_log_energy")


def state_dim(hidden_size: int) -> int:
    """Width of the state for a base of this hidden size: last and mean hidden state, the hashed
    question words, the confidence and clip scalars."""
    return 2 * hidden_size + QUESTION_BUCKETS + len(CLIP_FEATURES)


def question_words(input_ids: torch.Tensor, mask: torch.Tensor, image_token_id: Optional[int]) -> torch.Tensor:
    """(B, QUESTION_BUCKETS): each prompt's token ids counted into id % QUESTION_BUCKETS, as fractions."""
    keep = mask.bool()
    if image_token_id is not None:
        keep &= input_ids != image_token_id
    counts = torch.zeros(input_ids.shape[0], QUESTION_BUCKETS, device=input_ids.device)
    counts.scatter_add_(1, input_ids % QUESTION_BUCKETS, keep.float())
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


@dataclass
class PolicyInputs:
    features: torch.Tensor  # (B, state_dim(hidden)) float32
    has_clip: torch.Tensor  # (B,) bool: only these rows may get a budget > 0
    text_length: torch.Tensor  # (B,) long: prompt tokens (image tokens included), for the cost model
    clip_seconds: torch.Tensor  # (B,) float
    has_image: torch.Tensor  # (B,) bool: the base encodes an image for this row (BLIP-2: always)

    FIELDS = ("features", "has_clip", "text_length", "clip_seconds", "has_image")

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, rows) -> "PolicyInputs":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return PolicyInputs(*(getattr(self, name)[rows] for name in self.FIELDS))

    @staticmethod
    def concat(parts: Sequence["PolicyInputs"]) -> "PolicyInputs":
        return PolicyInputs(*(torch.cat([getattr(p, name) for p in parts]) for name in PolicyInputs.FIELDS))


def clip_statistics(waves: Sequence[Optional[np.ndarray]], sample_rate: int) -> np.ndarray:
    """(B, 3): has a clip, seconds, log10 mean energy (-10 for silence or no clip)."""
    rows = []
    for wave in waves:
        if wave is None or len(wave) == 0:
            rows.append((0.0, 0.0, -10.0))
            continue
        wave = np.asarray(wave, dtype=np.float64)
        energy = float(np.mean(wave * wave))
        rows.append((1.0, len(wave) / sample_rate, math.log10(energy) if energy > 1e-10 else -10.0))
    return np.asarray(rows, dtype=np.float32)


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch as ``generate`` gives them: counted from each row's first
    real token (padding positions get 1, as Hugging Face's ``prepare_inputs_for_generation``)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class BranchState:
    """Turns the branch point's hidden states of a prompt batch into the policy's features.

    ``layer`` is the first fused layer; ``batch`` the prompt batch (``PromptBatcher.for_generation``);
    ``waves`` each row's clip (None for none) at ``sample_rate``.
    """

    def __init__(self, base, layer: int, batch: dict, waves: Sequence[Optional[np.ndarray]], sample_rate: int):
        self.base, self.layer = base, int(layer)
        self.mask, self.input_ids = batch["attention_mask"], batch["input_ids"]
        self.clip = torch.from_numpy(clip_statistics(waves, sample_rate))
        if len(waves) != self.mask.shape[0]:
            raise ValueError(f"{len(waves)} clips for {self.mask.shape[0]} prompts")

    def read(self, hidden: torch.Tensor) -> PolicyInputs:
        """The policy's inputs from ``hidden`` (B, L, H), the branch layer's output over the prompt."""
        mask = self.mask
        hidden = hidden.float()
        weights = mask.to(hidden.dtype)[..., None]
        question = torch.cat([hidden[:, -1], (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)], 1)
        probs = self.base.read_out(hidden[:, -1]).float().softmax(-1)
        top2 = probs.topk(2, dim=-1).values
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1) / math.log(probs.shape[-1])
        clip = self.clip.to(hidden.device)
        words = question_words(self.input_ids, mask, getattr(self.base, "image_token_id", None))
        features = torch.cat([question, words, top2[:, :1], top2[:, :1] - top2[:, 1:], entropy[:, None], clip], dim=1)
        image = getattr(self.base, "image_token_id", None)
        has_image = (self.input_ids == image).any(1) if image is not None else torch.zeros_like(mask[:, 0]).bool()
        return PolicyInputs(features.cpu(), clip[:, 0].bool().cpu(), mask.sum(1).long().cpu(), clip[:, 1].cpu(),
                            has_image.cpu())


class _BranchReached(Exception):
    """Raised by the branch layer's hook to stop a state-only forward there."""


def base_inputs(base, batch: dict) -> dict:
    """The prompt batch with generation's position ids (OPT counts them from the mask itself)."""
    batch = dict(batch)
    if base.kind != "hf-blip2":
        batch["position_ids"] = generation_positions(batch["attention_mask"])
    return batch


@torch.no_grad()
def policy_inputs(model, batcher, queries, waves: Sequence[Optional[np.ndarray]]) -> PolicyInputs:
    """The state of each prompt: the base runs up to the branch point and stops; no audio encoder."""
    base = model.base
    batch = batcher.for_generation(queries)
    reader = BranchState(base, model.branch_layer, batch, waves, model.audio_encoder.sample_rate)
    captured = {}

    def read_and_stop(module, args, output):
        captured["inputs"] = reader.read(output[0] if isinstance(output, tuple) else output)
        raise _BranchReached

    handle = base.decoder_layers[reader.layer].register_forward_hook(read_and_stop)
    try:
        base(**base_inputs(base, batch), use_cache=False)
    except _BranchReached:
        pass
    finally:
        handle.remove()
    return captured["inputs"]


def pool_policy_inputs(model, batcher, pool, chosen) -> PolicyInputs:
    return policy_inputs(model, batcher, pool.queries(chosen, with_answers=False), pool.audio(chosen))


class StateNormalizer(nn.Module):
    """Per-feature standardisation fitted once on training states (hidden states and energies
    live on very different scales); stored with the policy and in the deployed gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> "StateNormalizer":
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-4) if features.shape[0] > 1 else torch.ones_like(self.std))
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features.to(self.mean) - self.mean) / self.std
