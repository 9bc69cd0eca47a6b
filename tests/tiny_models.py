"""Tiny checkpoints of the real architectures, saved the way their libraries save them.

Tests load them back through the same code a GPU user runs with real weights
(``from_pretrained`` by path, ``whisper.load_model(path)``); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from safe_cli.config.schema import TinyLlavaConfig
from safe_cli.models.base import tiny_llava_config


def save_tiny_hf_llava(directory: Path, seed: int = 1) -> Path:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(TinyLlavaConfig(vocab_size=300, num_layers=4)))
    model.save_pretrained(directory)
    return directory


def save_tiny_hf_blip2(directory: Path, seed: int = 2) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    torch.manual_seed(seed)
    vision = Blip2VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100, cross_attention_frequency=1)
    text = OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                         image_token_index=299)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def save_tiny_whisper(path: Path, seed: int = 3, n_audio_ctx: int = 1500) -> Path:
    """A whisper-architecture model saved in whisper's own checkpoint format (dims as a plain dict)."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                           n_vocab=51865, n_text_ctx=16, n_text_state=64, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def save_tiny_clap(directory: Path, seed: int = 4) -> Path:
    """A ClapModel (unfused HTSAT audio tower) and its feature extractor, both by save_pretrained."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    torch.manual_seed(seed)
    text = ClapTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=64, projection_dim=16)
    audio = ClapAudioConfig(spec_size=256, num_mel_bins=64, patch_size=4, patch_stride=(4, 4),
                            patch_embeds_hidden_size=16, hidden_size=32, depths=[1, 1],
                            num_attention_heads=[1, 2], window_size=8, projection_dim=16, enable_fusion=False)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(directory)
    ClapFeatureExtractor().save_pretrained(directory)
    return directory
