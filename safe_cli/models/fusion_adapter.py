"""Gated cross-attention from LLM hidden states (queries) to audio tokens (keys/values).

``CrossAttentionBlock`` is the unit: ``h + tanh(gate) * attn(norm(h), norm(audio))``. Its gate
starts at zero, so a fresh block returns its input exactly and training starts at the base.

Each block also has a *null slot*: one learned key whose value is zero. Softmax attention must
otherwise spread all its weight over the audio tokens, so every text position, even of a
question that has nothing to do with the clip, would receive some audio. With the null slot a
query can attend to nothing, which is what retention (answer a VL question as the base does,
a distractor clip notwithstanding) asks of it.

``FusionAdapter`` holds one block per chosen decoder layer. With ``init_from_base`` each block's
q/k/v/o start as copies of that layer's own self-attention projections (frozen) and learn LoRA
deltas through peft, so the adapter begins by attending the way the layer already does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class CrossAttentionBlock(nn.Module):
    """One gated cross-attention block.

    Called as ``block(llm_states, audio_tokens)`` with ``llm_states`` (B, L, H) and
    ``audio_tokens`` (B, k, H); ``audio_mask`` (B, k), True on real tokens, lets rows with
    different budgets share one padded batch. Returns (B, L, H).
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = False,
        gate_init: float = 0.0,
        null_slot: bool = True,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_attention_heads
        self.num_kv_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.norm_query = nn.LayerNorm(hidden_size)
        self.norm_audio = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=bias)
        self.gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.null_key = nn.Parameter(torch.zeros(self.num_kv_heads * self.head_dim)) if null_slot else None

    def forward(
        self,
        llm_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        audio_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        batch, length, _ = llm_states.shape
        kv_len = audio_tokens.shape[1]
        q = self.q_proj(self.norm_query(llm_states))
        audio = self.norm_audio(audio_tokens)
        k, v = self.k_proj(audio), self.v_proj(audio)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if self.null_key is not None:
            k = torch.cat([self.null_key.to(k.dtype).expand(batch, 1, -1), k], 1)
            v = torch.cat([v.new_zeros(batch, 1, v.shape[-1]), v], 1)
            kv_len += 1
            if audio_mask is not None:
                audio_mask = torch.cat([audio_mask.new_ones(batch, 1), audio_mask.bool()], 1)
        k = k.view(batch, kv_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, kv_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = None if audio_mask is None else audio_mask.bool()[:, None, None, :]
        gqa = self.num_kv_heads != self.num_heads  # grouped-query: SDPA shares each k/v head
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        attended = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        return llm_states + torch.tanh(self.gate) * attended

    @torch.no_grad()
    def load_attention_weights(self, attention: nn.Module) -> None:
        """Copy q/k/v/o (and biases) from a decoder layer's self-attention (Llama or OPT naming)."""
        names = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj"}
        names["o_proj"] = "o_proj" if hasattr(attention, "o_proj") else "out_proj"
        for mine, theirs in names.items():
            source = getattr(attention, theirs)
            target = getattr(self, mine)
            if source.weight.shape != target.weight.shape:
                raise ValueError(
                    f"{theirs} of the base attention has shape {tuple(source.weight.shape)}, "
                    f"the adapter expects {tuple(target.weight.shape)}"
                )
            target.weight.copy_(source.weight.float())
            if target.bias is not None and source.bias is not None:
                target.bias.copy_(source.bias.float())


class FusionAdapter(nn.Module):
    """One ``CrossAttentionBlock`` per fused decoder layer, keyed by the layer index."""

    def __init__(
        self,
        layers: list[int],
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = False,
        gate_init: float = 0.0,
        null_slot: bool = True,
    ):
        super().__init__()
        self.layers = list(layers)
        self.blocks = nn.ModuleDict(
            {
                str(layer): CrossAttentionBlock(
                    hidden_size, num_attention_heads, num_key_value_heads, head_dim, bias, gate_init, null_slot
                )
                for layer in self.layers
            }
        )
        self.uses_lora = False

    def block(self, layer: int) -> CrossAttentionBlock:
        return self.blocks[str(layer)]

    def init_from_base(self, attentions: dict[int, nn.Module], rank: int, alpha: float, dropout: float) -> None:
        """Copy each layer's attention into its block, freeze those copies, and add LoRA (peft)."""
        for layer, attention in attentions.items():
            self.block(layer).load_attention_weights(attention)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(PROJECTIONS))
        inject_adapter_in_model(config, self)
        # peft froze everything but LoRA; norms, gates and null keys are the adapter's own and must train.
        for name, param in self.named_parameters():
            param.requires_grad = (
                "lora_" in name or "norm_" in name or name.endswith(".gate") or name.endswith(".null_key")
            )
        self.uses_lora = True

    def gates(self) -> dict[int, float]:
        return {layer: float(torch.tanh(self.block(layer).gate.detach())) for layer in self.layers}
