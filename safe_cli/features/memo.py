"""Each clip's frozen-encoder features, kept in memory after the clip's first encoding.

Stage A draws its rows with replacement from a pool of clips, so a clip is encoded many times
over a run: the demo's 400 steps encode about 25,000 clips from the run's 2,480 clips, and the
frozen encoder (log-mel and forward) was about half of a step's compute (cProfile). The encoder is
frozen and in eval mode, so a clip's features are a function of its samples alone: they are
computed once, on the first batch that holds the clip, and read back afterwards.

Keyed by a hash of the samples (blake2b, 128 bits), not by record id, so two records of one
file share an entry and a changed file never hits a stale one. Rows are stored as the encoder
returned them for the clip alone (its own feature length), on the encoder's device, and a
batch is stacked as a feature cache's clips are (``lookup.stack_features``).

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

from .lookup import stack_features

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

    def encode(self, encoder: Encoder, waves: Sequence) -> torch.Tensor:
        """``encoder(waves)`` as (B, T, D), T the longest row (zeros past a shorter clip's rows, as a
        trimmed encoder returns them), running the encoder on the clips not seen before only.

        A clip encoded alone comes back exactly as long as its own features (a trimmed encoder
        pads only to the batch's longest clip), so its row is stored whole.
        """
        rows: dict[bytes, torch.Tensor] = {}  # this batch's clips, each once
        keys = [clip_key(wave) for wave in waves]
        for key, wave in zip(keys, waves):
            if key in rows:
                self.hits += 1
            elif key in self.rows:
                self.hits += 1
                rows[key] = self.rows[key]
            else:
                self.misses += 1
                row = encoder([wave])[0].clone()  # alone: see the module's docstring
                rows[key] = row
                size = row.numel() * row.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.rows[key] = row
                    self.bytes += size
        return stack_features([rows[key] for key in keys])["audio_features"]

def memo_for(encoder, clips: int, max_bytes: int) -> Optional[FeatureMemo]:
    """A memo for a run of ``clips`` distinct clips, or None when they may not all fit in
    ``max_bytes`` (each clip counted at the encoder's full window, float32) or the encoder's
    window is not known (``num_frames``: the whisper family)."""
    rows = getattr(encoder, "num_frames", None)
    if max_bytes <= 0 or rows is None or clips * rows * encoder.feature_dim * 4 > max_bytes:
        return None
    return FeatureMemo(max_bytes)
