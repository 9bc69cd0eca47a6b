"""Mixed precision: the trainable parts under bfloat16 autocast, the encoder in bfloat16, and the
frozen base untouched by either, so budget-0 rows stay bit-identical to it."""

import json

import torch

from safe_cli.config import load_profile
from safe_cli.models import build_safe_model
from safe_cli.models.audio_encoders import load_audio_encoder
from safe_cli.models.bypass import perturb_adapters
from safe_cli.models.probe import probe_audio, probe_batch
from safe_cli.training.stage_a import train_stage_a

from conftest import FAST

BUDGETS = [0, 8, 0, 4]


def _model(*overrides):
    model = build_safe_model(load_profile("demo", list(overrides)))
    perturb_adapters(model)
    return model


def _batch(model):
    generator = torch.Generator().manual_seed(0)
    inputs = probe_batch(model.base, len(BUDGETS), 8, generator)
    audio = probe_audio(model.audio_encoder.sample_rate, len(BUDGETS), generator=generator)
    return inputs, audio, torch.tensor(BUDGETS)


def test_autocast_keeps_budget_zero_rows_bit_exact_and_changes_only_the_audio_rows():
    model = _model("training.autocast=bf16")
    assert model.autocast_dtype == torch.bfloat16
    inputs, audio, budgets = _batch(model)
    with torch.no_grad():
        reference = model.base(**inputs).logits
        mixed = model(token_budget=budgets, audio=audio, **inputs).logits
        model.autocast_dtype = None
        full = model(token_budget=budgets, audio=audio, **inputs).logits
    for row, k in enumerate(BUDGETS):
        if k == 0:
            assert torch.equal(mixed[row], reference[row])
        else:
            # bfloat16 products: near the float32 answer, not equal to it, and not the base's.
            gap = float((mixed[row] - full[row]).abs().max())
            assert 0 < gap < 0.05 * float(full[row].abs().max()), gap
            assert not torch.allclose(mixed[row], reference[row], atol=1e-3)


def test_autocast_trains_float32_weights_with_float32_gradients():
    model = _model("training.autocast=bf16")
    inputs, audio, budgets = _batch(model)
    out = model(token_budget=budgets, audio=audio, **inputs).logits
    out[torch.tensor(BUDGETS) > 0].float().pow(2).mean().backward()
    trainable = dict(model.trainable_named_parameters())
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.base_model.parameters())


def test_audio_encoder_in_bfloat16_feeds_the_float32_projector():
    profile = load_profile("demo", ["audio_encoder.dtype=bfloat16"])
    encoder = load_audio_encoder(profile.audio_encoder)
    dtypes = {name: p.dtype for name, p in encoder.named_parameters()}
    assert {d for n, d in dtypes.items() if "ln" not in n} == {torch.bfloat16}  # whisper's LayerNorms stay float32
    waves = probe_audio(encoder.sample_rate, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = encoder(waves)
        reference = load_audio_encoder(load_profile("demo").audio_encoder)(waves)
    assert features.dtype == torch.bfloat16
    relative = float((features.float() - reference).abs().max() / reference.abs().max())
    assert 0 < relative < 0.05, relative
    model = build_safe_model(profile, audio_encoder=encoder)
    inputs = probe_batch(model.base, 2, 8, torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(token_budget=torch.tensor([0, 12]), audio=waves, **inputs).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_stage_a_with_autocast_finishes_and_leaves_the_base_alone(cache, tmp_path):
    result = train_stage_a(load_profile("demo", FAST + ["training.autocast=bf16"]), variant="full_retention", seed=0,
                           run_dir=tmp_path / "run")
    assert result.base_unchanged and result.skipped_steps == 0
    summary = json.loads((tmp_path / "run/stage-a/summary.json").read_text())
    assert summary["steps"] == 4
