"""Build a SAFEModel from a profile: load and freeze the base and encoder, create the trainable parts."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..config.schema import Profile
from ..errors import SafeError
from .audio_encoders import AudioEncoder, load_audio_encoder
from .base import BaseVLModel, load_base
from .fusion_adapter import FusionAdapter
from .projectors import AudioProjector
from .safe_model import SAFEModel


def build_trainable(
    profile: Profile, base: BaseVLModel, audio_feature_dim: int, seed: Optional[int] = None
) -> tuple[AudioProjector, FusionAdapter]:
    """Projector and fusion adapter for this base, initialised from ``seed`` (default: profile.seed)."""
    outside = [layer for layer in profile.fusion.layers if layer >= base.num_layers]
    if outside:
        raise SafeError(
            f"fusion.layers: layers {outside} are outside the base LLM's {base.num_layers} decoder layers "
            f"(0..{base.num_layers - 1})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed if seed is None else seed)
        projector = AudioProjector(
            audio_feature_dim,
            base.hidden_size,
            profile.projector.num_tokens,
            num_heads=profile.projector.num_heads,
            mlp_ratio=profile.projector.mlp_ratio,
            dropout=profile.projector.dropout,
            frame_pool=profile.projector.frame_pool,
        )
        fusion = FusionAdapter(
            profile.fusion.layers,
            base.hidden_size,
            base.num_attention_heads,
            base.num_key_value_heads,
            base.head_dim,
            bias=base.attention_bias,
            gate_init=profile.fusion.gate_init,
            null_slot=profile.fusion.null_slot,
            ffn_width=profile.fusion.ffn_width,
        )
        if profile.fusion.init_from_base:
            fusion.init_from_base(
                {layer: base.attention(layer) for layer in profile.fusion.layers},
                rank=profile.fusion.lora_rank,
                alpha=profile.fusion.lora_alpha,
                dropout=profile.fusion.lora_dropout,
            )
    return projector, fusion


def build_safe_model(
    profile: Profile,
    device: Union[str, torch.device] = "cpu",
    base: Optional[BaseVLModel] = None,
    audio_encoder: Optional[AudioEncoder] = None,
    seed: Optional[int] = None,
) -> SAFEModel:
    """The whole model; pass ``base``/``audio_encoder`` to reuse ones already loaded."""
    base = base or load_base(profile.base, device)
    audio_encoder = audio_encoder or load_audio_encoder(profile.audio_encoder, device, profile.seed)
    projector, fusion = build_trainable(profile, base, audio_encoder.feature_dim, seed)
    return apply_precision(SAFEModel(base, projector, fusion, audio_encoder).to(device), profile)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise SafeError("training.device: cuda requested but torch sees no GPU")
    return torch.device(setting)


def apply_precision(model: SAFEModel, profile: Profile) -> SAFEModel:
    """training.autocast: the trainable parts compute in bfloat16 under autocast (weights stay float32)."""
    model.autocast_dtype = torch.bfloat16 if profile.training.autocast == "bf16" else None
    return model

