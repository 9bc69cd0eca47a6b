"""The policy's state: what it may look at before deciding whether audio is worth its cost.

Nothing here runs the audio encoder (else skipping audio would save nothing). Per example:

    question      the base's last-layer hidden state at the prompt's last position, and its
                  mean over the prompt's tokens (the base reads the question and image anyway;
                  its summary of them costs nothing extra). The last position alone mostly
                  encodes the coming answer: on avdigits a policy on it alone confused
                  "What is 3 plus 4?" with "Which digit is spoken?" on 13% of the arithmetic
                  questions; the mean keeps the question's words.
    words         the prompt's token ids hashed into ``QUESTION_BUCKETS`` counts (the hashing
                  trick; image and padding tokens left out): which words the question uses,
                  explicitly. With the hidden states alone a policy trained 600 steps still gave
                  audio to a third of the arithmetic questions; with the words it can
                  separate "spoken" from "plus" directly.
    confidence    the base's own next-token distribution there: top probability, top-1 minus
                  top-2 margin, entropy / log(vocab)
    clip          has a clip (0/1), its length in seconds, log10 of its mean energy

The prompt goes through the base left-padded, with position ids counted from each row's first
real token, so a row's state does not depend on the rows it is batched with.

Deployment uses the same function (see ``safe_cli.deploy``), so a policy or gate sees in
production exactly the features it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

QUESTION_BUCKETS = 128
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
    text_length: torch.Tensor  # (B,) long: prompt tokens, for the cost model
    clip_seconds: torch.Tensor  # (B,) float

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, rows) -> "PolicyInputs":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return PolicyInputs(self.features[rows], self.has_clip[rows], self.text_length[rows], self.clip_seconds[rows])

    @staticmethod
    def concat(parts: Sequence["PolicyInputs"]) -> "PolicyInputs":
        return PolicyInputs(*(torch.cat([getattr(p, name) for p in parts])
                              for name in ("features", "has_clip", "text_length", "clip_seconds")))


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


@torch.no_grad()
def policy_inputs(base, batcher, queries, waves: Sequence[Optional[np.ndarray]], sample_rate: int) -> PolicyInputs:
    """One forward of the frozen base over the prompts; never the audio encoder."""
    batch = batcher.for_generation(queries)
    mask = batch["attention_mask"]
    if base.kind != "hf-blip2":  # OPT (BLIP-2) already counts positions from the attention mask
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    captured = {}

    def keep_last_hidden(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.float()
        weights = mask.to(hidden.dtype)[..., None]
        captured["hidden"] = torch.cat([hidden[:, -1], (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)], 1)

    handle = base.decoder_layers[-1].register_forward_hook(keep_last_hidden)
    try:
        logits = base(**batch).logits[:, -1].float()
    finally:
        handle.remove()
    probs = logits.softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1) / math.log(probs.shape[-1])
    clip = torch.from_numpy(clip_statistics(waves, sample_rate)).to(logits.device)
    words = question_words(batch["input_ids"], mask, getattr(base, "image_token_id", None))
    features = torch.cat([captured["hidden"], words, top2[:, :1], top2[:, :1] - top2[:, 1:], entropy[:, None], clip],
                         dim=1)
    return PolicyInputs(features.cpu(), clip[:, 0].bool().cpu(), mask.sum(1).long().cpu(), clip[:, 1].cpu())


def pool_policy_inputs(base, batcher, pool, chosen, sample_rate: int) -> PolicyInputs:
    return policy_inputs(base, batcher, pool.queries(chosen, with_answers=False), pool.audio(chosen), sample_rate)


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
