"""Fingerprint of a frozen model: a SHA-256 over every parameter and buffer, by name.

It goes into every checkpoint and is checked on load, so an adapter is never silently
applied to a base it was not trained on, and "the base is unchanged" is a comparison of two
strings rather than a belief.
"""

from __future__ import annotations

import hashlib
import itertools

import torch
from torch import nn


def fingerprint_module(module: nn.Module) -> str:
    digest = hashlib.sha256()
    # Non-persistent buffers (rotary tables) count too: they change the outputs as much as weights.
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    state = {name: tensor for name, tensor in named}
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # Raw bytes, not values: bit-level identity is the promise, and bf16 has no numpy dtype.
        flat = tensor.contiguous().reshape(-1).view(torch.uint8) if tensor.numel() else tensor.new_empty(0, dtype=torch.uint8)
        digest.update(flat.cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
