"""The zero-regression check: budget-0 rows of a mixed batch against the base's own forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fusion_adapter import is_gate_parameter
from .probe import probe_audio, probe_batch
from .safe_model import SAFEModel


@dataclass
class BypassResult:
    bit_exact: bool  # every budget-0 row torch.equal to the base's own forward
    max_abs_logit_diff: float  # over budget-0 rows; must be exactly 0
    n_bypass_rows: int
    n_audio_rows: int
    audio_rows_max_diff: float  # over rows with audio; > 0 once the adapter is not the identity


@torch.no_grad()
def check_bypass(model: SAFEModel, budgets: list[int], seed: int = 0, text_length: int = 8) -> BypassResult:
    generator = torch.Generator().manual_seed(seed)
    inputs = probe_batch(model.base, len(budgets), text_length, generator)
    budget = torch.tensor(budgets, dtype=torch.long)
    sample_rate = model.audio_encoder.sample_rate if model.audio_encoder is not None else 16000
    audio = probe_audio(sample_rate, len(budgets), generator=generator)
    reference = model.base(**inputs).logits
    fused = model(token_budget=budget, audio=audio, **inputs).logits
    bypass = budget == 0
    diff = (fused.float() - reference.float()).abs()
    exact = all(torch.equal(fused[i], reference[i]) for i in torch.nonzero(bypass).flatten().tolist())
    return BypassResult(
        bit_exact=exact,
        max_abs_logit_diff=float(diff[bypass].max()) if bypass.any() else 0.0,
        n_bypass_rows=int(bypass.sum()),
        n_audio_rows=int((~bypass).sum()),
        audio_rows_max_diff=float(diff[~bypass].max()) if (~bypass).any() else 0.0,
    )


@torch.no_grad()
def perturb_adapters(model: SAFEModel, gate: float = 0.5, scale: float = 0.1, seed: int = 0) -> None:
    """Give every gate (the feed-forwards' too) and LoRA-B a non-zero value, so a bypass check
    can fail if rows leak through any of them."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.fusion.named_parameters():
        if is_gate_parameter(name):
            param.fill_(gate)
        elif "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
