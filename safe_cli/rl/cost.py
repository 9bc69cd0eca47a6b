"""What audio costs: FLOPs of the audio encoder for a clip and of the fusion path for k tokens.

Counted from the model's dimensions, FLOPs = 2 x multiply-accumulates of the matrix products
(linear layers, convolutions, attention's two products); norms, activations, softmax and
additions are left out (they are a few percent and do not change with k). Symbols:

    Whisper encoder (n_mels M, width d, n_layer blocks, T positions: 1500 for the faithful 30 s
    window, the clip's rounded length when trimmed):
        mel     2 * (2T) * 201 * M              (the mel filterbank over 2T STFT frames)
        conv1   2 * (2T) * 3 * M * d            (kernel 3 over 2T mel frames)
        conv2   2 *  T   * 3 * d * d            (kernel 3, stride 2)
        block   2 * T * 12 * d^2                (q, k, v, out: 4 d^2; MLP d->4d->d: 8 d^2)
              + 4 * T^2 * d                     (scores and weighted sum)
    Projector (features of width D, T' frames after frame_pool, k tokens, LLM width H, MLP width W):
        2*2 * k * T' * D + 2 * k * D * H + 2*2 * k * H * W
    Fusion, per fused layer, as inference runs it (L text positions, k audio tokens + 1 null
    slot, n query heads, query width Hq, key/value width Hkv; LoRA is folded into the weights,
    and q and o are absorbed into each clip's keys and values, see ``AudioReadout``):
        k, v     2 * 2 * k * H * Hkv
        absorb   2 * 2 * (k + 1) * Hq * H       (keys through q, values through o, once a clip)
        attend   2 * 2 * L * n * (k + 1) * H    (scores and weighted sum, per text position)
        ffn      2 * 2 * L * H * F              (the gated feed-forward of width F, when there is one)

CLAP's audio tower (a Swin transformer) has no such simple formula; its FLOPs are measured
once with torch's FLOP counter on a clip of the tower's fixed input length (CLAP pads or cuts
every clip to it, so the cost does not depend on the clip).

``relative_cost(k)`` = cost(k) / cost(k_max), 0 for k = 0: the encoder is not run and no
adapter is touched. With the encoder in the sum, the saving of a smaller k is small, and
skipping audio is where the compute goes; that is the design's point, and the numbers show it.
This is Stage B's cost term (relative audio compute).

End to end (``EndToEndCost``, issue 25) counts everything one answer costs: the base's image
(its vision side, measured by torch's FLOP counter, also on the meta device), its prefill and
decoding steps (``LLMDims``), the decision (the base's output head read once at the branch
point, and the gate's or policy's MLP) and audio, whose fused layers run over the prompt and
every generated position. The decision reads the state inside the answer's own prefill, so no
forward is counted twice. Checked against torch's counter on the demo model for text, VL,
VL-with-clip and audio examples (tests/test_policy_stages.py): equal.

Stage B keeps relative audio compute as its cost: the base's share is the same whatever the
policy chooses, so the end-to-end cost would only rescale alpha by the base's size (a 7B base
makes every audio saving look a few percent), and the policy learned on the demo would mean
something else on LLaVA. The end-to-end figures are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..models.audio_encoders import AudioEncoder, ClapEncoder, WhisperClapEncoder, WhisperEncoder
from ..models.fusion_adapter import FusionAdapter
from ..models.projectors import AudioProjector


N_FFT = 400  # whisper's STFT window


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    width: int
    layers: int
    window: int  # positions of the faithful window (1500 = 30 s)
    trim_step: Optional[int] = None  # positions a trimmed clip is rounded up to; None = faithful

    def positions(self, clip_seconds: float) -> int:
        if self.trim_step is None:
            return self.window
        exact = max(1, math.ceil(clip_seconds * 50))  # 50 positions a second (hop 160, stride 2, 16 kHz)
        return min(self.window, -(-exact // self.trim_step) * self.trim_step)

    def flops(self, clip_seconds: float) -> float:
        t, d, m = self.positions(clip_seconds), self.width, self.n_mels
        mel = 2 * (2 * t) * (N_FFT // 2 + 1) * m
        convs = 2 * (2 * t) * 3 * m * d + 2 * t * 3 * d * d
        block = 2 * t * 12 * d * d + 4 * t * t * d
        return float(mel + convs + self.layers * block)


def whisper_dims(encoder: WhisperEncoder) -> WhisperDims:
    inner = encoder.encoder
    return WhisperDims(
        n_mels=inner.conv1.in_channels, width=inner.conv1.out_channels, layers=len(inner.blocks),
        window=int(inner.positional_embedding.shape[0]),
        trim_step=encoder.trim_step if encoder.trim_to_clip else None,
    )


def count_cpu_attention() -> None:
    """Teach torch's FLOP counter the CPU attention kernel.

    The counter has formulas for the GPU SDPA kernels (flash, efficient, cuDNN) but none for
    ``_scaled_dot_product_flash_attention_for_cpu``, so on a CPU every attention's products
    count as 0. This registers the counter's own SDPA formula for it (idempotent).
    """
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    flop_counter.register_flop_formula(op)(cpu_sdpa_flop)


def clap_flops(encoder: ClapEncoder) -> float:
    """FLOPs of one clip through CLAP's audio tower (to its time steps), measured by torch's counter."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()

    silence = np.zeros(int(encoder.sample_rate), dtype=np.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder([silence])
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class FusionDims:
    hidden: int  # H, the LLM's width
    heads: int  # n, query heads
    query_width: int  # Hq = heads * head_dim
    kv_width: int  # Hkv = kv heads * head_dim
    layers: int  # fused layers
    null_slot: bool
    feature_dim: int  # D, the encoder's width
    frame_pool: int
    projector_mlp: int  # W
    ffn_width: int = 0  # F, the fused layers' feed-forward (0 = none)

    def projector_flops(self, k: int, frames: int) -> float:
        pooled = -(-frames // self.frame_pool)
        d, h = self.feature_dim, self.hidden
        return float(2 * 2 * k * pooled * d + 2 * k * d * h + 2 * 2 * k * h * self.projector_mlp)

    def layer_flops(self, k: int, length: int) -> float:
        h, hq, hkv = self.hidden, self.query_width, self.kv_width
        slots = k + (1 if self.null_slot else 0)
        k_and_v = 2 * 2 * k * h * hkv
        absorb = 2 * 2 * slots * hq * h
        attend = 2 * 2 * length * self.heads * slots * h
        ffn = 2 * 2 * length * h * self.ffn_width
        return float(k_and_v + absorb + attend + ffn)


def fusion_dims(projector: AudioProjector, fusion: FusionAdapter) -> FusionDims:
    block = fusion.block(fusion.layers[0])
    return FusionDims(
        hidden=block.hidden_size, heads=block.num_heads, query_width=block.num_heads * block.head_dim,
        kv_width=block.num_kv_heads * block.head_dim, layers=len(fusion.layers),
        null_slot=block.null_key is not None,
        feature_dim=projector.audio_embed_dim, frame_pool=projector.frame_pool,
        projector_mlp=projector.mlp[1].out_features,
        ffn_width=0 if block.ffn is None else block.ffn[0].out_features,
    )


class AudioCostModel:
    """FLOPs of audio for one example, and the same normalised to the always-max-budget cost."""

    def __init__(self, encoder_flops, frames, fusion: FusionDims, max_budget: int):
        self._encoder_flops = encoder_flops  # clip seconds -> FLOPs
        self._frames = frames  # clip seconds -> encoder frames the projector pools
        self.fusion = fusion
        self.max_budget = int(max_budget)

    @classmethod
    def for_model(cls, model, max_budget: int) -> "AudioCostModel":
        """From a SAFEModel: its encoder's kind decides the encoder formula."""
        return cls.build(model.audio_encoder, model.projector, model.fusion, max_budget)

    @classmethod
    def build(cls, encoder: AudioEncoder, projector: AudioProjector, fusion: FusionAdapter,
              max_budget: int) -> "AudioCostModel":
        parts = []
        if isinstance(encoder, WhisperClapEncoder):
            parts = [encoder.whisper, encoder.clap]
        else:
            parts = [encoder]
        counters, frames = [], None
        for part in parts:
            if isinstance(part, WhisperEncoder):
                dims = whisper_dims(part)
                counters.append(dims.flops)
                frames = dims.positions
            elif isinstance(part, ClapEncoder):
                flops = clap_flops(part)
                counters.append(lambda seconds, flops=flops: flops)
                if len(parts) == 1:  # CLAP alone: the tower's time steps, whatever the clip's length
                    frames = lambda seconds, steps=part.frames: steps  # noqa: E731
            else:
                raise ValueError(f"no cost formula for audio encoder {type(part).__name__}")
        return cls(lambda seconds: sum(c(seconds) for c in counters), frames,
                   fusion_dims(projector, fusion), max_budget)

    def encoder_flops(self, clip_seconds: float) -> float:
        return self._encoder_flops(clip_seconds)

    def fusion_flops(self, k: int, text_length: int, clip_seconds: float) -> float:
        """Projector for k tokens plus every fused layer's cross-attention over ``text_length`` positions."""
        if k <= 0:
            return 0.0
        fusion = self.fusion
        return fusion.projector_flops(k, self._frames(clip_seconds)) + fusion.layers * fusion.layer_flops(k, text_length)

    def flops(self, k: int, text_length: int, clip_seconds: float) -> float:
        if k <= 0:
            return 0.0
        return self.encoder_flops(clip_seconds) + self.fusion_flops(k, text_length, clip_seconds)

    def relative(self, k: int, text_length: int, clip_seconds: float) -> float:
        """cost(k) / cost(k_max) for this example: 0 for k = 0, 1 for the largest budget."""
        return self.flops(k, text_length, clip_seconds) / self.flops(self.max_budget, text_length, clip_seconds)


# --------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class LLMDims:
    """The base LLM's shape, for the FLOPs of its prefill and decoding steps.

    Per position, per layer: q/k/v/o projections 2 * (2 * H * Hq + 2 * H * Hkv); the MLP 2 * 3 * H * I
    (Llama's SwiGLU: gate, up, down) or 2 * 2 * H * F (OPT's fc1, fc2); attention's two products
    2 * 2 * Hq * (keys it attends). A prefill of L positions attends L x L (counted whole, as torch's
    FLOP counter counts SDPA; a causal kernel may skip the upper half). ``generate`` reads the
    logits of the prompt's last position only (``logits_to_keep``), so the head costs 2 * H * V once
    in the prefill and once per decoding step.
    """

    family: str  # "llama" or "opt"
    hidden: int
    query_width: int
    kv_width: int
    mlp_width: int
    layers: int
    vocab: int

    def position_flops(self) -> float:
        """One position through one layer, attention's products left out."""
        h = self.hidden
        projections = 2 * (2 * h * self.query_width + 2 * h * self.kv_width)
        mlp = 2 * (3 if self.family == "llama" else 2) * h * self.mlp_width
        return float(projections + mlp)

    def head_flops(self) -> float:
        return float(2 * self.hidden * self.vocab)

    def prefill_flops(self, length: int) -> float:
        attention = 2 * 2 * self.query_width * length * length
        return self.layers * (length * self.position_flops() + attention) + self.head_flops()

    def decode_flops(self, context: int) -> float:
        """One decoding step whose new token attends ``context`` keys (the prompt and tokens so far)."""
        return self.layers * (self.position_flops() + 2 * 2 * self.query_width * context) + self.head_flops()

    def generation_flops(self, length: int, new_tokens: int) -> float:
        """The prefill of ``length`` positions and the ``new_tokens - 1`` steps after the first token."""
        return self.prefill_flops(length) + sum(self.decode_flops(length + step + 1) for step in range(new_tokens - 1))


def llm_dims(base) -> LLMDims:
    from ..models.memory import base_shape

    shape = base_shape(base)
    return LLMDims(shape.family, shape.hidden_size, shape.q_width, shape.kv_width, shape.mlp_width,
                   shape.num_layers, shape.vocab_size)


def image_flops(base) -> float:
    """FLOPs of one image through the base's vision side (LLaVA: vision tower and projector; BLIP-2:
    ViT, Q-Former and projection), measured by torch's FLOP counter; works on the meta device too."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    parameter = next(base.model.parameters())
    side = int(base.model.config.vision_config.image_size)
    pixels = torch.zeros(1, 3, side, side, dtype=parameter.dtype, device=parameter.device)
    model = base.model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if base.kind == "hf-blip2":
            # get_image_features' steps, without its all-ones Q-Former masks: the same products,
            # and a mask check (``mask.all()``) would need real data, which the meta device has not.
            image = model.vision_model(pixel_values=pixels).last_hidden_state
            queries = model.query_tokens.expand(1, -1, -1)
            model.language_projection(model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state)
        else:
            model.get_image_features(pixel_values=pixels)
    return float(counter.get_total_flops())


def network_flops(network) -> float:
    """2 x multiply-accumulates of a small MLP's linear layers (the gate, the policy), per example."""
    from torch import nn

    return float(sum(2 * m.in_features * m.out_features for m in network.modules() if isinstance(m, nn.Linear)))


class EndToEndCost:
    """Everything one example costs: the base's image encoding, prefill and decoding steps, the
    decision (read-out of the base's head at the branch point and the gate's MLP), and audio
    (encoder, projector, fused layers over the prompt and the generated positions).

    Relative end-to-end compute against always-max says what the gate saves of the whole system;
    against the base alone, what adding audio costs over not having it.
    """

    def __init__(self, llm: LLMDims, image: float, audio: Optional[AudioCostModel]):
        self.llm, self.image, self.audio = llm, float(image), audio

    @classmethod
    def for_model(cls, model, audio: AudioCostModel) -> "EndToEndCost":
        """From a SAFEModel and its audio cost model (``AudioCostModel.for_model``)."""
        return cls(llm_dims(model.base), image_flops(model.base), audio)

    def decision_flops(self, network) -> float:
        """What deciding costs per example: the head read at one position and ``network``'s MLP."""
        return self.llm.head_flops() + network_flops(network)

    def base_flops(self, text_length: int, new_tokens: int, has_image: bool) -> float:
        """The base's own answer: its image (if any), its prefill and decoding."""
        return (self.image if has_image else 0.0) + self.llm.generation_flops(text_length, new_tokens)

    def flops(self, k: int, text_length: int, clip_seconds: float, new_tokens: int, has_image: bool,
              decision: float = 0.0) -> float:
        audio = 0.0
        if k > 0 and self.audio is not None:  # the fused layers run over the prompt and every new token
            audio = self.audio.flops(k, text_length + max(new_tokens - 1, 0), clip_seconds)
        return self.base_flops(text_length, new_tokens, has_image) + decision + audio


# --------------------------------------------------------------------------- from a profile alone


@dataclass
class ComputeEstimate:
    """End-to-end FLOPs of one example, from a profile's dimensions (``safe validate --estimate``)."""

    profile: str
    assumptions: dict
    flops: dict  # what each way of answering costs per example

    def relative(self) -> dict:
        top, base = self.flops["always-max"], self.flops["base alone"]
        return {name: {"vs_always_max": value / top, "vs_base": value / base} for name, value in self.flops.items()}

    def to_json(self) -> dict:
        return {"profile": self.profile, "assumptions": self.assumptions, "flops_per_example": self.flops,
                "relative": self.relative()}


def _encoder_cost_from_profile(cfg):
    """(clip seconds -> encoder FLOPs, clip seconds -> frames the projector pools), from the config:
    whisper from its dims, CLAP's tower counted by torch's counter on the meta device."""
    from ..models.audio_encoders import TRIM_STEP_POSITIONS, whisper_positions
    from ..models.memory import _whisper_dims

    parts, frames = [], None
    if cfg.kind in ("whisper", "both", "tiny-whisper"):
        if cfg.kind == "tiny-whisper":
            mels, ctx, state, layers = 80, whisper_positions(cfg.tiny_window_seconds), cfg.tiny_state, cfg.tiny_layers
        else:
            mels, ctx, state, _, layers = _whisper_dims(cfg.whisper.name_or_path)
        dims = WhisperDims(mels, state, layers, ctx, TRIM_STEP_POSITIONS if cfg.whisper.trim_to_clip else None)
        parts.append(dims.flops)
        frames = dims.positions
    if cfg.kind in ("clap", "both"):
        clap = meta_clap_encoder(cfg.clap.name_or_path)
        flops = clap_flops(clap)
        parts.append(lambda seconds: flops)
        if frames is None:  # CLAP alone: the tower's time steps, whatever the clip's length
            frames = lambda seconds, steps=clap.frames: steps  # noqa: E731
    if not parts:
        raise ValueError(f"no cost formula for audio encoder kind {cfg.kind!r}")
    return (lambda seconds: sum(part(seconds) for part in parts)), frames


def meta_clap_encoder(name_or_path: str):
    """SAFE's CLAP encoder around a ClapModel built on the meta device from its config (no weights)."""
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from ..models.audio_encoders import ClapEncoder
    from ..models.memory import KNOWN_CLAP, _from_pretrained_config, _known, _local_dir

    directory = _local_dir(name_or_path)
    key = "audio_encoder.clap.name_or_path"
    config = (_from_pretrained_config(directory, key) if directory is not None
              else _known(KNOWN_CLAP, name_or_path, key))
    with torch.device("meta"):
        model = ClapModel(config)
    return ClapEncoder(model, ClapFeatureExtractor())  # the 48 kHz, 10 s, 64-bin defaults every released CLAP uses


def estimate_compute(profile, audio_usage: float, text_tokens: int, new_tokens: int,
                     clip_seconds: float) -> ComputeEstimate:
    """Per-example FLOPs of the base alone, always-max audio and the deployed gate at ``audio_usage``
    (before issue 25, with its second prefill; and now), for a prompt of the base's image tokens plus
    ``text_tokens``, ``new_tokens`` answer tokens and a clip of ``clip_seconds``; no weights needed."""
    import torch
    from torch import nn

    from ..models.builder import build_trainable
    from ..models.memory import encoder_shape, meta_base
    from .state import state_dim

    base = meta_base(profile.base)
    llm = llm_dims(base)
    image = image_flops(base)
    encoder_flops, frames = _encoder_cost_from_profile(profile.audio_encoder)
    feature_dim = encoder_shape(profile.audio_encoder, profile.data.max_audio_seconds).feature_dim
    with torch.device("meta"):
        projector, fusion = build_trainable(profile, base, feature_dim)
        gate_net = nn.Sequential(nn.Linear(state_dim(base.hidden_size), profile.training.stage_c.hidden_size),
                                 nn.Tanh(), nn.Linear(profile.training.stage_c.hidden_size, 1))
    budget = max(profile.policy.token_budgets)
    cost = EndToEndCost(llm, image, AudioCostModel(encoder_flops, frames, fusion_dims(projector, fusion), budget))
    length = base.num_image_tokens + text_tokens
    decision = cost.decision_flops(gate_net)
    alone = cost.flops(0, length, clip_seconds, new_tokens, True)
    always = cost.flops(budget, length, clip_seconds, new_tokens, True)
    gated = alone + decision + audio_usage * (always - alone)
    before = gated + image + llm.prefill_flops(length)  # the old state: a second full forward, image included
    return ComputeEstimate(profile.name, {
        "audio_usage": audio_usage, "image_tokens": base.num_image_tokens, "text_tokens": text_tokens,
        "new_tokens": new_tokens, "clip_seconds": clip_seconds, "budget": budget,
        "audio_encoder_flops": encoder_flops(clip_seconds), "decision_flops": decision,
    }, {"base alone": alone, "always-max": always, "gate, before (two prefills)": before, "gate": gated})
