"""Synthetic probe batches with the right shape for any base: used by `safe check`, the bypass
benchmark and the tests. They exercise the arithmetic, not the model's knowledge."""

from __future__ import annotations

from typing import Optional

import torch

from .base import BaseVLModel


def probe_batch(
    base: BaseVLModel, batch_size: int, text_length: int = 8, generator: Optional[torch.Generator] = None
) -> dict[str, torch.Tensor]:
    """input_ids with the image placeholder tokens where this kind expects them, pixel_values, mask."""
    config = base.model.config
    vocab = config.text_config.vocab_size
    special = {base.image_token_id, 0, 1, 2}
    text = torch.randint(3, vocab, (batch_size, text_length), generator=generator)
    text[torch.isin(text, torch.tensor(sorted(special)))] = 3
    image = torch.full((batch_size, base.num_image_tokens), base.image_token_id)
    bos = torch.full((batch_size, 1), getattr(config.text_config, "bos_token_id", None) or 1)
    # LLaVA puts the image inside the prompt after BOS; HF BLIP-2 puts the query tokens first.
    parts = [image, bos, text] if base.kind == "hf-blip2" else [bos, image, text]
    input_ids = torch.cat(parts, dim=1)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    device = next(base.model.parameters()).device
    dtype = next(base.model.parameters()).dtype
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


def probe_audio(sample_rate: int, batch_size: int, seconds: float = 1.0, generator: Optional[torch.Generator] = None):
    """Noisy tones, one clip per row, at the encoder's sample rate."""
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    clips = []
    for _ in range(batch_size):
        freq = 200 + 800 * torch.rand(1, generator=generator)
        clips.append(0.3 * torch.sin(2 * torch.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=generator))
    return clips
