"""The frozen base's logits on retention rows, computed once per row and kept on disk.

Stage A's KL term compares the student with the teacher: the base itself on the retention row
without audio. The base is frozen and a row's tokens and image are fixed, so a row drawn again
would get the same teacher logits; at LLaVA-7B's shape that forward is ~10% of a step. The
cache keeps each row's logits at its answer positions (P x vocabulary, in the base's dtype:
~190 KB a row at 3 positions x 32,064 in bf16, ~1.5 GB for 8,000 rows).

A row's key is a hash of exactly what the teacher reads: its unpadded token ids, its image's
pixel values and its answer positions. The base's fingerprint names the folder. A record whose
question, answer, prompt, processor or image changed hashes to another key and is computed
afresh; an entry that does not read back whole, or has another shape, is recomputed and
overwritten; nothing computed from other inputs is ever returned. Rows that miss run through
the teacher together, as one batch of the missing rows only.

Layout: ``<cache root>/teacher/<base fingerprint>/<key[:2]>/<key>.safetensors`` (tensor
``logits``), beside the encode-audio features; each file is written to a temporary name and
renamed, so concurrent ranks and a killed run leave whole files only.

The logits of a row are those of its first computation. They equal a live teacher's on the
same batch bit for bit; on another batch (other rows, other padding) they agree to float
rounding, as two live teachers on different batches do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..cache import cache_root

KEYS = "teacher_keys"  # the batch entry the data path fills (one key a row)


def image_rows(input_ids: torch.Tensor, image_token_id: Optional[int], pixel_rows: int) -> list[Optional[int]]:
    """Each row's index into ``pixel_values`` (None: no image).

    LLaVA's processor gives pixel values for the rows that have an image, in row order;
    BLIP-2's for every row (a black image where a question has none).
    """
    if pixel_rows == input_ids.shape[0]:
        return list(range(pixel_rows))
    has_image = (input_ids == image_token_id).any(1).tolist() if image_token_id is not None else [False] * len(input_ids)
    out, seen = [], 0
    for flag in has_image:
        out.append(seen if flag else None)
        seen += int(flag)
    return out


def row_keys(batch: dict, image_token_id: Optional[int]) -> list[str]:
    """A key per row of a prepared (CPU) batch: what the teacher reads of that row, hashed."""
    ids, mask, index, targets = batch["input_ids"], batch["attention_mask"].bool(), batch["answer_index"], \
        batch["answer_targets"]
    pixels = batch.get("pixel_values")
    images = image_rows(ids, image_token_id, 0 if pixels is None else pixels.shape[0])
    keys = []
    for row in range(ids.shape[0]):
        digest = hashlib.blake2b(digest_size=20)
        digest.update(ids[row][mask[row]].numpy().tobytes())
        digest.update(index[row][targets[row] != -100].numpy().tobytes())
        if images[row] is not None:
            image = pixels[images[row]]
            digest.update(str((tuple(image.shape), str(image.dtype))).encode())
            digest.update(image.contiguous().view(torch.uint8).numpy().tobytes())
        keys.append(digest.hexdigest())
    return keys


class TeacherCache:
    """The teacher's answer-position logits by row key, for one base."""

    def __init__(self, base_fingerprint: str, root: Optional[Path] = None):
        self.directory = (root or cache_root()) / "teacher" / base_fingerprint
        self.hits = 0
        self.computed = 0

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def read(self, key: str, positions: int, vocab: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The stored (positions, vocab) logits, or None when absent, unreadable, or of another
        shape or dtype (the same weights loaded in another precision give other logits)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            logits = load_file(path)["logits"]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None
        return logits if tuple(logits.shape) == (positions, vocab) and logits.dtype == dtype else None

    def write(self, key: str, logits: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"logits": logits.detach().contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)

    def logits(self, base, inputs: dict, index: torch.Tensor, counts: Sequence[int], keys: Sequence[str],
               forward: dict) -> torch.Tensor:
        """The teacher's logits (B, P, V) at ``index``: read where stored, computed for the rest.

        ``inputs`` are the base's inputs on the training device; ``index`` the batch's answer
        positions and ``counts`` each row's number of them (host numbers); ``forward`` the
        training forward's settings (no KV cache). Positions past a row's answer tokens are
        zeros: the KL leaves them out.
        """
        head = base.model.get_output_embeddings()
        vocab, dtype = head.out_features, head.weight.dtype
        found = [self.read(key, count, vocab, dtype) for key, count in zip(keys, counts)]
        missing = [row for row, value in enumerate(found) if value is None]
        self.hits += len(keys) - len(missing)
        if missing:
            live = self._compute(base, inputs, index, missing, forward)
            for j, row in enumerate(missing):
                found[row] = live[j, :counts[row]].detach()
                self.write(keys[row], found[row])
            self.computed += len(missing)
        out = torch.zeros(len(keys), index.shape[1], vocab, dtype=dtype, device=index.device)
        for row, value in enumerate(found):
            out[row, :counts[row]] = value.to(out.device)
        return out

    @staticmethod
    @torch.no_grad()
    def _compute(base, inputs: dict, index: torch.Tensor, rows: list[int], forward: dict) -> torch.Tensor:
        if len(rows) == index.shape[0]:
            return base(**inputs, **forward, logits_to_keep=index).logits
        chosen = torch.tensor(rows, device=index.device)
        sub = {key: value.index_select(0, chosen) for key, value in inputs.items()
               if torch.is_tensor(value) and key != "pixel_values"}
        pixels = inputs.get("pixel_values")
        if pixels is not None:
            images = image_rows(inputs["input_ids"], base.image_token_id, pixels.shape[0])
            picked = [images[row] for row in rows if images[row] is not None]
            if picked:
                sub["pixel_values"] = pixels.index_select(0, torch.tensor(picked, device=pixels.device))
        return base(**sub, **forward, logits_to_keep=index.index_select(0, chosen)).logits
