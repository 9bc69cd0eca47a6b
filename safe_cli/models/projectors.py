"""Audio projector: encoder features -> up to K_max audio tokens in the LLM's hidden size.

Tokens are *nested*: token i depends only on its own learned query, never on the other
queries, so the first k tokens are the same whatever K the caller asks for. One projector
therefore serves every budget in the policy's set, and a budget of k costs k tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class AudioProjector(nn.Module):
    """Learned-query attention pooling over encoder frames, then a per-token MLP.

    Args:
        audio_embed_dim: width D of the encoder features.
        llm_hidden_size: width H of the LLM's hidden states.
        num_audio_tokens: K_max, the most tokens a caller may ask for.

    Input ``(B, D)`` (one pooled vector per clip) or ``(B, T, D)`` (frames), with an optional
    ``(B, T)`` boolean mask of valid frames; output ``(B, k, H)``.
    """

    def __init__(
        self,
        audio_embed_dim: int,
        llm_hidden_size: int,
        num_audio_tokens: int,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if llm_hidden_size % num_heads:
            num_heads = 1  # pooling heads are an inner detail; never refuse a hidden size for them
        self.audio_embed_dim = audio_embed_dim
        self.llm_hidden_size = llm_hidden_size
        self.num_audio_tokens = num_audio_tokens
        self.input_norm = nn.LayerNorm(audio_embed_dim)
        self.input_proj = nn.Linear(audio_embed_dim, llm_hidden_size)
        self.queries = nn.Parameter(torch.randn(num_audio_tokens, llm_hidden_size) * llm_hidden_size**-0.5)
        self.pool = nn.MultiheadAttention(llm_hidden_size, num_heads, dropout=dropout, batch_first=True)
        width = max(1, int(llm_hidden_size * mlp_ratio))
        self.mlp = nn.Sequential(
            nn.LayerNorm(llm_hidden_size),
            nn.Linear(llm_hidden_size, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, llm_hidden_size),
        )

    def forward(
        self,
        audio_features: torch.Tensor,
        num_tokens: Optional[int] = None,
        frame_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        k = self.num_audio_tokens if num_tokens is None else int(num_tokens)
        if not 0 < k <= self.num_audio_tokens:
            raise ValueError(f"num_tokens must be in 1..{self.num_audio_tokens}, got {k}")
        if audio_features.dim() == 2:
            audio_features = audio_features.unsqueeze(1)
        if audio_features.dim() != 3 or audio_features.shape[-1] != self.audio_embed_dim:
            raise ValueError(
                f"expected features (B, D) or (B, T, D) with D={self.audio_embed_dim}, "
                f"got {tuple(audio_features.shape)}"
            )
        frames = self.input_proj(self.input_norm(audio_features.to(self.input_proj.weight.dtype)))
        queries = self.queries[:k].unsqueeze(0).expand(frames.shape[0], -1, -1)
        padding = None if frame_mask is None else ~frame_mask.bool()
        pooled, _ = self.pool(queries, frames, frames, key_padding_mask=padding, need_weights=False)
        tokens = queries + pooled
        return tokens + self.mlp(tokens)
