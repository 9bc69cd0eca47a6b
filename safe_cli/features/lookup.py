"""Clip features from a cache made by ``safe encode-audio``, for training and evaluation.

A profile points at the cache with ``data.audio_features``. Clips are found by the content
hash of their file and the fingerprint of the profile's encoder, exactly as encode-audio keyed
them, so a renamed file still hits and a retrained encoder never reads stale features. Only
the clips the examples use are looked up; a missing one is an error that says how to fill the
cache, never a silent fallback (results would change speed, and a user would not know why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import SafeError
from .cache import FeatureCache, content_hash
from .encode import encoder_fingerprint

KEY = "data.audio_features"


def cached_clip_features(paths: Sequence[str], cache_dir: str, encoder) -> dict[str, torch.Tensor]:
    """``{clip path: (T, D) features}`` for every clip in ``paths``, read from the cache."""
    directory = Path(cache_dir).expanduser()
    if not (directory / "index.json").is_file() and not any(directory.glob("*.safetensors")):
        raise SafeError(f"{KEY}: {directory} is not a feature cache (no index.json or shards); "
                        "create it with `safe encode-audio --input AUDIO_DIR --output CACHE --profile P`")
    cache = FeatureCache(directory)
    fingerprint = encoder_fingerprint(encoder)
    features, missing = {}, []
    for path in sorted(set(paths)):
        tensor = cache.lookup(content_hash(path), fingerprint)
        if tensor is None:
            missing.append(path)
        else:
            features[path] = tensor
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SafeError(f"{KEY}: {len(missing)} of {len(set(paths))} clips are not in {directory} for this encoder "
                        f"({fingerprint[:60]}...): {shown}; run `safe encode-audio --input <their folder> "
                        f"--output {directory} --profile <this profile>` first" + _other_variants(cache, fingerprint))
    return features


def _other_variants(cache: FeatureCache, fingerprint: str) -> str:
    """A hint when the cache holds the same weights' features made with other settings: the
    usual cause is encoding with --trim (or a backend) and training without it, or the reverse."""
    weights = fingerprint.split("+", 1)[0]
    variants = sorted(fp.split("+", 1)[1] if "+" in fp else "faithful" for fp in cache.entries()
                      if fp != fingerprint and fp.split("+", 1)[0] == weights)
    if not variants:
        return ""
    ours = fingerprint.split("+", 1)[1] if "+" in fingerprint else "faithful"
    return (f". The cache has this encoder's features as {', '.join(variants)}, and this profile asks for {ours}: "
            "match audio_encoder.whisper.trim_to_clip (encode-audio --trim) and audio_encoder.whisper.backend "
            "to the settings the cache was made with")


def stack_features(rows: Sequence[Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """SAFEModel inputs for one batch: ``audio_features`` (B, T, D), zeros for rows without a clip,
    and ``audio_frame_mask`` when clips have different lengths (trimmed encoders)."""
    present = [row for row in rows if row is not None]
    if not present:
        return {}  # no row hears audio: every budget is 0 and the model never looks
    length = max(row.shape[0] for row in present)
    out = present[0].new_zeros((len(rows), length, present[0].shape[-1]))
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is not None:
            out[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
    if all(row.shape[0] == length for row in present):
        return {"audio_features": out}
    return {"audio_features": out, "audio_frame_mask": mask}
