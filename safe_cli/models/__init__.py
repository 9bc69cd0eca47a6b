"""Models: the frozen base and audio encoder, the trainable projector and fusion, and SAFEModel."""

from .audio_encoders import AudioEncoder, ClapEncoder, WhisperClapEncoder, WhisperEncoder, load_audio_encoder
from .base import BaseVLModel, load_base
from .builder import build_safe_model, build_trainable, resolve_device
from .fingerprint import fingerprint_module
from .fusion_adapter import CrossAttentionBlock, FusionAdapter
from .projectors import AudioProjector
from .safe_model import SAFEModel

__all__ = [
    "AudioEncoder",
    "AudioProjector",
    "BaseVLModel",
    "ClapEncoder",
    "CrossAttentionBlock",
    "FusionAdapter",
    "SAFEModel",
    "WhisperClapEncoder",
    "WhisperEncoder",
    "build_safe_model",
    "build_trainable",
    "fingerprint_module",
    "load_audio_encoder",
    "load_base",
    "resolve_device",
]
