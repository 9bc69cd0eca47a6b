"""Each clip's frozen-encoder features, kept in memory after the clip's first encoding.

Stage A draws its rows with replacement from a pool of clips, so a clip is encoded many times
over a run: the demo's 400 steps encode about 25,000 clips from the run's 2,480 clips, and the
frozen encoder (log-mel and forward) was about half of a step's compute (cProfile). The encoder is
frozen and in eval mode, so a clip's features are a function of its samples alone: they are
computed once, on the first batch that holds the clip, and read back afterwards.

Keyed by a hash of the samples (blake2b, 128 bits), not by record id, so two records of one
file share an entry and a changed file never hits a stale one. Rows are stored as the encoder
returned them, cut to the clip's own feature length (``feature_lengths``), on the encoder's
device.

A clip the memo has not seen is encoded alone, never with the other clips of its batch: a
GEMM's rounding can depend on how many rows it has, so this way a clip's features are the same
whichever batch first held it, and a resumed run (which starts with an empty memo) stays
bit-identical to an uninterrupted one. They differ from batched encoding by rounding (1e-6 on
the demo's encoder), so turning the memo on or off changes a run's rounding (the demo's AV
same / sum, near chance after 400 steps, by a point or two). Stage A uses
it only when every clip of the run fits in ``audio_encoder.memory_cache_mb`` (:func:`memo_for`);
a larger corpus is what ``safe encode-audio`` is for.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

Encoder = Callable[[Sequence], torch.Tensor]


def clip_key(wave) -> bytes:
    """128-bit blake2b of the clip's float32 samples, with its length."""
    samples = wave.detach().cpu().numpy() if torch.is_tensor(wave) else np.asarray(wave)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    digest = hashlib.blake2b(samples.data, digest_size=16)
    digest.update(len(samples).to_bytes(8, "little"))
    return digest.digest()


class FeatureMemo:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.rows: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def encode(self, encoder: Encoder, waves: Sequence, lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``encoder(waves)`` as (B, T, D), T the longest row (zeros past a shorter clip's rows, as a
        trimmed encoder returns them), running the encoder on the clips not seen before only.

        ``lengths``: each clip's feature rows (``AudioEncoder.feature_lengths``); None: all rows.
        """
        keys = [clip_key(wave) for wave in waves]
        fresh: dict[bytes, torch.Tensor] = {}
        missing: list[int] = []  # the first row of each clip not in the memo
        seen: set[bytes] = set()
        for i, key in enumerate(keys):
            if key not in self.rows and key not in seen:
                seen.add(key)
                missing.append(i)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for i in missing:
            features = encoder([waves[i]])  # alone: see the module's docstring
            length = features.shape[1] if lengths is None else int(lengths[i])
            row = features[0, :length].clone()
            fresh[keys[i]] = row
            size = row.numel() * row.element_size()
            if self.bytes + size <= self.max_bytes:
                self.rows[keys[i]] = row
                self.bytes += size
        rows = [self.rows.get(key, fresh.get(key)) for key in keys]
        width = max(row.shape[0] for row in rows)
        out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        return out


def memo_for(encoder, clips: int, max_bytes: int) -> Optional[FeatureMemo]:
    """A memo for a run of ``clips`` distinct clips, or None when they may not all fit in
    ``max_bytes`` (each clip counted at the encoder's full window, float32) or the encoder's
    window is not known (``num_frames``: the whisper family)."""
    rows = getattr(encoder, "num_frames", None)
    if max_bytes <= 0 or rows is None or clips * rows * encoder.feature_dim * 4 > max_bytes:
        return None
    return FeatureMemo(max_bytes)
