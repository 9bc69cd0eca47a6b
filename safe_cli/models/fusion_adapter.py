"""Gated cross-attention from LLM hidden states (queries) to audio tokens (keys/values).

``CrossAttentionBlock`` is the unit: ``h + tanh(gate) * attn(norm(h), norm(audio))``. Its gate
starts at zero, so a fresh block returns its input exactly and training starts at the base.

Each block also has a *null slot*: one learned key whose value is zero. Softmax attention must
otherwise spread all its weight over the audio tokens, so every text position, even of a
question that has nothing to do with the clip, would receive some audio. With the null slot a
query can attend to nothing, which is what retention (answer a VL question as the base does,
a distractor clip notwithstanding) asks of it.

With ``ffn_width`` a block also has a gated feed-forward after the attention, as Flamingo's
gated xattn-dense blocks do, its gate at zero too. Attention adds a weighted mean of audio
values, linear in what it read; the feed-forward can combine the text position's own state
(say, the shown digit) with it nonlinearly, which questions about both need.

``FusionAdapter`` holds one block per chosen decoder layer. With ``init_from_base`` each block's
q/k/v/o start as copies of that layer's own self-attention projections (frozen) and learn LoRA
deltas through peft, so the adapter begins by attending the way the layer already does.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Each block's tanh gates (attention, feed-forward): zero means the block adds nothing.
GATE_SUFFIXES = (".gate", ".ffn_gate")


def is_gate_parameter(name: str) -> bool:
    """True for a block's gate: what training must update and a bypass check must open.
    One place owns the list, so a new gate cannot be trained but left shut by a check."""
    return name.endswith(GATE_SUFFIXES)


def attend_few_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Softmax attention of many queries over a handful of keys (at most K_max + 1 here).

    q is (B, L, heads, d); k and v are (B, S, kv_heads, d), as the projections give them;
    ``key_mask`` (B, S) is True on keys a query may see; ``scale`` defaults to d ** -0.5 (pass
    1.0 when q is already scaled). Returns (B, L, heads * d), equal to
    ``scaled_dot_product_attention`` up to float rounding. Query head h reads k/v head
    h // (heads // kv_heads), the grouped-query convention of Llama and of SDPA's enable_gqa.

    Why not SDPA: on CPU, SDPA and a softmax over a last dimension of a few elements both run
    a slow per-row loop. For S = 9 keys over 32 heads x 49 queries that takes 180 us; the same
    softmax over dimension -2 of the transposed scores takes 13 us (torch 2.13, AVX-512, see
    bench/bypass_overhead.py). So the scores are laid out (keys, queries). They are only S/d
    the size of q, so materialising them costs nothing on any device. Grouped queries share
    their k/v head through the layout, not through copies of k and v.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # (B, kv_heads, d, group * L): the queries of one k/v head side by side.
    queries = q.view(batch, length, kv_heads, group, dim).permute(0, 2, 4, 3, 1).reshape(batch, kv_heads, dim, group * length)
    scores = torch.matmul(k.transpose(1, 2), queries)  # (B, kv_heads, S, group * L)
    if scale != 1.0:
        scores = scores * (dim**-0.5 if scale is None else scale)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, :, None], torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-2).to(v.dtype)
    out = torch.matmul(weights.transpose(-1, -2), v.transpose(1, 2))  # (B, kv_heads, group * L, d)
    return out.view(batch, kv_heads, group, length, dim).permute(0, 3, 1, 2, 4).reshape(batch, length, heads * dim)


class AudioReadout(NamedTuple):
    """What a block reads from the audio before it sees any text (``CrossAttentionBlock.read_audio``).

    Training (grad on): ``keys``/``values`` are the audio's k and v, (B, S, kv_heads, d), and
    ``key_mask`` (B, S) marks the keys a query may see.

    Inference (grad off, ``absorbed``): the block's output is
    ``sum_h softmax_s(q_h . k_hs) (v_hs W_o,h)`` with ``q_h = W_q,h x``. Since
    ``q_h . k_hs = x . (W_q,h^T k_hs)``, each key is taken through its head's query weights and
    each value through its head's output weights once per clip, giving ``keys`` and ``values``
    of shape (B, heads * S, H); ``key_bias`` (B, heads * S, 1) holds the q-bias terms and the
    masked keys. Per text position the block then costs two products with heads * S columns
    instead of the q and o projections' H each: for LLaVA-7B with 13 keys, 416 against 4,096.
    It pays from a few dozen text positions on, and in every ``generate`` step, where the
    readout is reused (``bench/fusion_absorb.py``: 3.4-4.3x per layer at 600 positions and
    H 512-1024; 0.95x on the demo's 64-wide layer, where small ops dominate either way).
    DeepSeek-V2's MLA absorbs its projections into cached keys the same way at inference.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_mask: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    out_bias: Optional[torch.Tensor] = None
    absorbed: bool = False


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
        ffn_width: int = 0,
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
        self._fold_cache: Optional[tuple] = None  # inference-only fold of LoRA deltas and gate
        # Optional gated feed-forward after the attention (Flamingo's xattn-dense), gate at zero.
        self.ffn: Optional[nn.Sequential] = None
        if ffn_width:
            self.norm_ffn = nn.LayerNorm(hidden_size)
            self.ffn = nn.Sequential(nn.Linear(hidden_size, ffn_width), nn.GELU(), nn.Linear(ffn_width, hidden_size))
            self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        llm_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        audio_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.fuse(llm_states, self.read_audio(audio_tokens, audio_mask))

    def read_audio(self, audio_tokens: torch.Tensor, audio_mask: Optional[torch.Tensor] = None) -> AudioReadout:
        """Everything the block computes from the audio alone, before it sees any text.

        None of it depends on the text, so ``SAFEModel`` calls this once per forward (and once
        per ``generate`` call, not at every decoding step) and ``fuse`` reads the result at each
        fused layer.

        With grad on (training) the readout is the audio's keys and values, from peft's LoRA
        layers as they are. With grad off it is *absorbed* (see ``AudioReadout``).
        """
        batch = audio_tokens.shape[0]
        audio = self.norm_audio(audio_tokens)
        if self.null_key is not None and audio_mask is not None:
            audio_mask = torch.cat([audio_mask.new_ones(batch, 1), audio_mask.bool()], 1)
        folded = self._folded_weights()
        if folded is None:
            k, v = self.k_proj(audio), self.v_proj(audio)
            if self.null_key is not None:
                k = torch.cat([self.null_key.to(k.dtype).expand(batch, 1, -1), k], 1)
                v = torch.cat([v.new_zeros(batch, 1, v.shape[-1]), v], 1)
            shape = (batch, -1, self.num_kv_heads, self.head_dim)
            return AudioReadout(k.view(shape), v.view(shape), key_mask=audio_mask)

        kv = F.linear(audio, folded["kv"], folded["kv_bias"])
        if self.null_key is not None:  # the null key and its zero value, one row
            kv = torch.cat([folded["null_kv"].to(kv.dtype).expand(batch, 1, -1), kv], 1)
        keys = kv.shape[1]
        k, v = kv.view(batch, keys, 2, self.num_kv_heads, self.head_dim).unbind(2)
        group = self.num_heads // self.num_kv_heads
        # Query head h = g * group + j reads k/v head g (Llama's grouped-query convention).
        # Each key goes through its query heads' (pre-scaled) q weights, each value through
        # its heads' slice of the gated o weights: (B, heads * S, H) both.
        q_weight = folded["q"].view(self.num_kv_heads, group, self.head_dim, -1)
        o_weight = folded["o"].view(-1, self.num_kv_heads, group, self.head_dim).permute(1, 2, 3, 0)
        absorbed_keys = torch.einsum("bsgd,gjdx->bgjsx", k, q_weight).reshape(batch, self.num_heads * keys, -1)
        absorbed_values = torch.einsum("bsgd,gjdx->bgjsx", v, o_weight).reshape(batch, self.num_heads * keys, -1)
        key_bias = None
        if folded["q_bias"] is not None:  # (W x + b) . k = x . (W^T k) + b . k: a constant per key
            q_bias = folded["q_bias"].view(self.num_kv_heads, group, self.head_dim).to(k.dtype)
            key_bias = torch.einsum("bsgd,gjd->bgjs", k, q_bias).reshape(batch, self.num_heads * keys, 1)
        if audio_mask is not None:
            blocked = (~audio_mask.bool())[:, None, :].expand(batch, self.num_heads, keys)
            blocked = blocked.reshape(batch, self.num_heads * keys, 1)
            if key_bias is None:
                key_bias = absorbed_keys.new_zeros(batch, self.num_heads * keys, 1)
            key_bias = key_bias.masked_fill(blocked, torch.finfo(key_bias.dtype).min)
        return AudioReadout(absorbed_keys, absorbed_values, key_bias=key_bias, out_bias=folded["o_bias"], absorbed=True)

    def fuse(self, llm_states: torch.Tensor, audio: AudioReadout) -> torch.Tensor:
        """``llm_states`` (B, L, H) with the audio of ``read_audio`` added through the gate(s)."""
        fused = self._attend(llm_states, audio)
        if self.ffn is None:
            return fused
        return fused + torch.tanh(self.ffn_gate) * self.ffn(self.norm_ffn(fused))

    def _attend(self, llm_states: torch.Tensor, audio: AudioReadout) -> torch.Tensor:
        batch, length, _ = llm_states.shape
        if not audio.absorbed:
            q = self.q_proj(self.norm_query(llm_states)).view(batch, length, self.num_heads, self.head_dim)
            attended = attend_few_keys(q, audio.keys, audio.values, audio.key_mask)
            return llm_states + torch.tanh(self.gate) * self.o_proj(attended)
        # Scores laid out (heads * keys, queries), softmax over the keys of each head: the fast
        # layout on CPU (see attend_few_keys).
        scores = torch.matmul(audio.keys, self.norm_query(llm_states).transpose(1, 2))
        if audio.key_bias is not None:
            scores = scores + audio.key_bias
        weights = scores.view(batch, self.num_heads, -1, length).softmax(dim=-2).view_as(scores)
        out = torch.matmul(weights.transpose(1, 2).to(audio.values.dtype), audio.values)
        if audio.out_bias is not None:
            out = out + audio.out_bias
        # The residual add stays a separate float32 add so that, under bf16 autocast, the
        # hidden state is not rounded to bf16 on its way through.
        return llm_states + out

    def _folded_weights(self) -> Optional[dict[str, Optional[torch.Tensor]]]:
        """q (pre-scaled), fused k|v and gated o weights with any LoRA deltas folded in, for inference.

        Training runs peft's LoRA layers as they are (the deltas need their own gradients). With
        grad off and no live dropout, ``W x + s B A x`` equals ``(W + s B A) x`` up to float
        rounding, and the folded form is one matrix product instead of three plus peft's
        dispatch; ``read_audio`` then absorbs q and o into the audio side. The fold is cached
        and recomputed whenever a source tensor changes: optimizer steps and ``load_state_dict``
        bump a tensor's version, ``.to()`` moves its storage, and ``_apply`` (``.to``, ``.float``)
        drops the cache in case it replaced the tensors themselves.
        """
        if torch.is_grad_enabled():
            return None
        if self.training and any(not isinstance(layer.lora_dropout[a], nn.Identity)
                                 for layer in self._lora_projections() for a in layer.active_adapters):
            return None  # dropout is live: keep the exact training computation
        cache = self._fold_cache
        if cache is not None:
            sources, key, folded = cache
            if key == tuple((t.data_ptr(), t._version) for t in sources):
                return folded
        sources = self._fold_sources()
        if any(t.is_inference() for t in sources):
            return None  # weights made under inference_mode have no version counter to watch
        with torch.inference_mode(False), torch.no_grad():
            weights = {name: self._folded(getattr(self, f"{name}_proj")) for name in "qkvo"}
            gate = torch.tanh(self.gate.detach())
            scale = self.head_dim**-0.5  # the attention's scale, applied once to q's weights
            folded = {
                "q": scale * weights["q"][0], "q_bias": None if weights["q"][1] is None else scale * weights["q"][1],
                "kv": torch.cat([weights["k"][0], weights["v"][0]]),
                "kv_bias": None if weights["k"][1] is None else torch.cat([weights["k"][1], weights["v"][1]]),
                "o": gate * weights["o"][0], "o_bias": None if weights["o"][1] is None else gate * weights["o"][1],
                "null_kv": None if self.null_key is None
                else torch.cat([self.null_key.detach(), torch.zeros_like(self.null_key)]).view(1, 1, -1),
            }
        self._fold_cache = (sources, tuple((t.data_ptr(), t._version) for t in sources), folded)
        return folded

    def _fold_sources(self) -> list[torch.Tensor]:
        sources = [self.gate] + ([] if self.null_key is None else [self.null_key])
        for layer in self._projections():
            base = layer.get_base_layer() if isinstance(layer, LoraLinear) else layer
            sources += [t for t in (base.weight, base.bias) if t is not None]
            for adapter in (layer.active_adapters if isinstance(layer, LoraLinear) else ()):
                if adapter in layer.lora_A and not layer.disable_adapters:
                    sources += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        return sources

    def _apply(self, fn, recurse=True):
        self._fold_cache = None  # .to()/.float() may replace the tensors the fold was built from
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fold_cache = None  # load_state_dict(assign=True) replaces tensors instead of copying
        return super()._load_from_state_dict(*args, **kwargs)

    def _projections(self) -> tuple[nn.Module, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    def _lora_projections(self) -> list["LoraLinear"]:
        return [layer for layer in self._projections() if isinstance(layer, LoraLinear)]

    @staticmethod
    def _folded(layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A projection's weight and bias, with its active LoRA deltas added when it has them."""
        lora = isinstance(layer, LoraLinear)
        base = layer.get_base_layer() if lora else layer
        weight = base.weight.detach().clone()
        if lora and not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)  # peft's own B A * scaling
        bias = None if base.bias is None else base.bias.detach().clone()
        return weight, bias

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
        ffn_width: int = 0,
    ):
        super().__init__()
        self.layers = list(layers)
        self.blocks = nn.ModuleDict(
            {
                str(layer): CrossAttentionBlock(
                    hidden_size, num_attention_heads, num_key_value_heads, head_dim, bias, gate_init, null_slot,
                    ffn_width,
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
        # peft froze everything but LoRA; norms, gates, null keys and feed-forwards are the adapter's
        # own and must train.
        for name, param in self.named_parameters():
            param.requires_grad = (
                "lora_" in name or "norm_" in name or is_gate_parameter(name) or name.endswith(".null_key")
                or ".ffn." in name
            )
        self.uses_lora = True

    def gates(self) -> dict[int, float]:
        return {layer: float(torch.tanh(self.block(layer).gate.detach())) for layer in self.layers}
