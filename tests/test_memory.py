"""The memory estimate (safe_cli/models/memory.py): exact parameter counts against the models the
loaders build, the activation formula against what autograd really saves, one Stage A step's
optimizer state byte for byte, the real-model profiles offline, and `safe validate --estimate`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST
from safe_cli.config import load_profile
from safe_cli.errors import SafeError
from safe_cli.models import build_safe_model
from safe_cli.rl.cost import estimate_compute
from safe_cli.training.batches import answer_positions
from safe_cli.training.stage_a import BATCH_EXTRAS, TRAINING_FORWARD, answer_loss
from safe_cli.training.step_data import drop, to_device
from safe_cli.models.memory import (
    FP32, base_shape, encoder_shape, estimate_memory, forward_activation_bytes, meta_base,
    saved_tensor_bytes,
)


def counts(model) -> dict[str, int]:
    """What the estimate reports, counted on a model the loaders really built."""
    def n(module, trainable=None):
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    return {"base": n(model.base_model), "audio_encoder": n(model.audio_encoder), "projector": n(model.projector),
            "fusion_trainable": n(model.fusion, True), "fusion_frozen": n(model.fusion, False),
            "trainable": sum(p.numel() for _, p in model.trainable_named_parameters())}


# --------------------------------------------------------------------------- parameter counts

TINY = {
    "demo": [],
    "wider-gqa-no-init": ["base.tiny.hidden_size=96", "base.tiny.num_attention_heads=6", "base.tiny.num_key_value_heads=2",
                          "base.tiny.num_layers=5", "fusion.layers=[0,2,4]", "fusion.init_from_base=false",
                          "fusion.null_slot=false", "projector.num_tokens=8", "policy.token_budgets=[0,4,8]",
                          "audio_encoder.tiny_state=32", "audio_encoder.tiny_window_seconds=1.0"],
    "lora-rank-4": ["fusion.lora_rank=4", "projector.mlp_ratio=1.5"],
    "feed-forward": ["fusion.ffn_width=256"],
}


@pytest.mark.parametrize("overrides", TINY.values(), ids=TINY.keys())
def test_tiny_profile_counts_equal_the_built_model(overrides):
    profile = load_profile("demo", overrides)
    assert estimate_memory(profile).params == counts(build_safe_model(profile))


def test_local_checkpoints_are_counted_from_their_configs(tiny_checkpoints):
    """hf-llava / hf-blip2 directories through AutoConfig, whisper's dims from the .pt, CLAP's config."""
    cases = [
        ["base.kind=hf-llava", f"base.name_or_path={tiny_checkpoints['hf-llava']}",
         "audio_encoder.kind=whisper", f"audio_encoder.whisper.name_or_path={tiny_checkpoints['whisper']}"],
        ["base.kind=hf-blip2", f"base.name_or_path={tiny_checkpoints['hf-blip2']}", "fusion.layers=[1,2]",
         "audio_encoder.kind=both", f"audio_encoder.whisper.name_or_path={tiny_checkpoints['whisper']}",
         f"audio_encoder.clap.name_or_path={tiny_checkpoints['clap']}"],
    ]
    for overrides in cases:
        profile = load_profile("demo", overrides)
        assert estimate_memory(profile).params == counts(build_safe_model(profile)), overrides


# Exact meta-device counts of the published configs, and the sizes the model cards state.
REAL = {
    "llava15-7b-whisper-small": (7_063_427_072, 7.06e9, 87_002_112),
    "llava15-13b-clap": (13_351_494_656, 13.35e9, 153_492_890),
    "blip2-opt27b-clap": (3_744_761_856, 3.74e9, 153_492_890),
}


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the estimate tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", REAL)
def test_real_profiles_estimate_offline(name, no_network):
    base, published, encoder = REAL[name]
    est = estimate_memory(load_profile(name))
    assert est.params["base"] == base
    assert abs(base - published) / published < 0.02
    assert est.params["audio_encoder"] == encoder
    # Trainable state is fp32: weights + gradients + two AdamW moments.
    trainable = est.params["trainable"]
    assert {r.component: r.bytes for r in est.training}["AdamW state (exp_avg, exp_avg_sq)"] == 8 * trainable
    assert est.totals["training_checkpointed"] < est.totals["training"]


def test_unknown_hub_id_names_the_key(no_network):
    profile = load_profile("demo", ["base.kind=hf-llava", "base.name_or_path=someone/llava-x"])
    with pytest.raises(SafeError, match=r"^base\.name_or_path: cannot estimate 'someone/llava-x' offline"):
        estimate_memory(profile)
    profile = load_profile("demo", ["audio_encoder.kind=clap", "audio_encoder.clap.name_or_path=someone/clap-x"])
    with pytest.raises(SafeError, match=r"^audio_encoder\.clap\.name_or_path: cannot estimate 'someone/clap-x'"):
        estimate_memory(profile)


# --------------------------------------------------------------------------- activations

ACTIVATION_CASES = {
    "llava-bf16-fused-1": ("tiny-llava", "bfloat16", [1], 0),
    "llava-fp32-fused-0-2": ("tiny-llava", "float32", [0, 2], 0),
    "llava-fp32-fused-0-2-feed-forward": ("tiny-llava", "float32", [0, 2], 1024),
    "blip2-bf16-fused-1": ("hf-blip2", "bfloat16", [1], 0),
}


def test_training_forwards_build_no_kv_cache(cache, tmp_path, monkeypatch):
    """A Stage A step (alignment, teacher and student) never writes a KV cache: transformers
    builds a DynamicCache by default and concatenates into it at every layer."""
    from transformers import cache_utils

    from safe_cli.training.stage_a import StageATrainer

    trainer = StageATrainer(load_profile("demo", FAST), variant="soft_retention", seed=0, run_dir=tmp_path / "run")
    trainer.build()
    trainer.model.train()
    updates = []
    original = cache_utils.DynamicCache.update
    monkeypatch.setattr(cache_utils.DynamicCache, "update",
                        lambda self, *args, **kwargs: updates.append(1) or original(self, *args, **kwargs))
    forwards = []
    handle = trainer.model.base_model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
    inputs = trainer.step_batches()[1]
    assert inputs["retention"], "the step has no retention batch: the teacher would not run"
    trainer._step(1, inputs)
    handle.remove()
    assert len(forwards) >= 3 and not updates  # the alignment, teacher and student forwards ran
    # The counter itself works: a plain forward of the base writes into its cache.
    batch = drop(to_device(inputs["micro"][0], trainer.device), BATCH_EXTRAS + ("token_budget", "audio"))
    trainer.model.base(**batch)
    assert updates


@pytest.mark.parametrize("kind, dtype, layers, ffn_width", ACTIVATION_CASES.values(), ids=ACTIVATION_CASES.keys())
def test_activation_formula_matches_what_autograd_saves(kind, dtype, layers, ffn_width, tiny_checkpoints):
    """The formula against the bytes autograd holds for backward on a real forward (Llama-like
    MLP ratio so the MLP term weighs as in LLaVA). 6%: the formula leaves out RoPE tables,
    logsumexps and the like, each well under 1% at these sizes."""
    overrides = [f"base.dtype={dtype}", f"fusion.layers={layers}", f"fusion.ffn_width={ffn_width}"]
    if kind == "tiny-llava":
        overrides += ["base.tiny.hidden_size=256", "base.tiny.intermediate_size=688", "base.tiny.num_layers=4",
                      "base.tiny.num_attention_heads=4", "base.tiny.num_key_value_heads=2"]
    else:
        overrides += ["base.kind=hf-blip2", f"base.name_or_path={tiny_checkpoints['hf-blip2']}"]
    profile = load_profile("demo", overrides)
    model = build_safe_model(profile)
    shape = base_shape(meta_base(profile.base))
    encoder = encoder_shape(profile.audio_encoder, profile.data.max_audio_seconds)
    rows, tokens = 3, 80
    ids = torch.randint(3, 250, (rows, tokens))
    ids[:, 1: 1 + shape.num_image_tokens] = model.base.image_token_id
    side = model.base_model.config.vision_config.image_size
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # a 4-token answer: the LM head and the loss run on its 4 positions
    index, targets = answer_positions(labels)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(rows, 3, side, side, dtype=getattr(torch, dtype)),
                  token_budget=torch.full((rows,), 12), audio_features=torch.randn(rows, encoder.frames, encoder.feature_dim))

    def training_forward():  # as Stage A's: no KV cache, logits at the answer positions, the loss
        output = model(**inputs, **TRAINING_FORWARD, logits_to_keep=index)
        return output, answer_loss(output.logits, targets, 12.0)

    (output, _), measured = saved_tensor_bytes(training_forward, model)
    parts = forward_activation_bytes(shape, dtype, profile.fusion.layers, rows, tokens, encoder, profile.projector, 12,
                                     ffn_width=profile.fusion.ffn_width, answer_tokens=4)
    saved = sum(parts.values()) - parts["logits"]  # the returned logits are alive but not a saved tensor
    assert parts["logits"] == output.logits.numel() * output.logits.element_size()
    assert abs(saved - measured) / measured < 0.06, (saved, measured, parts)


def test_one_stage_a_step_matches_the_estimate(cache, tmp_path):
    """A real Stage A step on the demo profile: AdamW's state and the gradients equal the estimate
    byte for byte; the rows that keep a graph until backward are the ones the estimate assumes; the
    bytes autograd saved are within 10% of the formula at the step's own sequence lengths."""
    from safe_cli.training.stage_a import StageATrainer

    profile = load_profile("demo", FAST + ["training.stage_a.grad_accum=2"])
    trainer = StageATrainer(profile, variant="soft_retention", seed=0, run_dir=tmp_path / "run")
    trainer.build()
    trainer.model.train()
    forwards = []  # (rows, tokens) of every base forward that builds a graph

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            assert kwargs["use_cache"] is False
            forwards.append((*kwargs["input_ids"].shape, kwargs["logits_to_keep"].shape[1]))

    handle = trainer.model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    # Autograd packs tensors only in forwards (backward builds no graph): the step packs its
    # three forwards' tensors, and frees each batch's at that batch's backward.
    inputs = trainer.step_batches()[1]
    result, measured = saved_tensor_bytes(lambda: trainer._step(1, inputs), trainer.model)
    handle.remove()
    assert result["skipped"] == 0.0

    est = estimate_memory(profile, "soft_retention")
    trainable = est.params["trainable"]
    state = trainer.optimizer.state
    moments = sum(s[key].numel() * s[key].element_size() for s in state.values() for key in ("exp_avg", "exp_avg_sq"))
    rows = {r.component: r for r in est.training}
    assert moments == rows["AdamW state (exp_avg, exp_avg_sq)"].bytes == 2 * FP32 * trainable
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainer.trainable.values() if p.grad is not None)
    assert grads == rows["gradients"].bytes
    assert len(state) == len(trainer.trainable)  # every trainable tensor got a gradient and a state

    # grad_accum micro-batches (split where rows with an image meet rows without), then the
    # retention batch (split the same way), each backpropagated before the next forward: one
    # batch's graph is held at a time, never more rows than the estimate's.
    size = profile.training.stage_a.batch_size
    micro, retention = inputs["micro"], inputs["retention"]
    assert [r for r, _, _ in forwards] == [b["rows"] for b in micro + retention]
    assert sum(b["rows"] for b in micro) == 2 * size and sum(b["rows"] for b in retention) == size
    assert est.sequence["held_rows"] == size >= max(r for r, _, _ in forwards)
    shape = base_shape(meta_base(profile.base))
    encoder = encoder_shape(profile.audio_encoder, profile.data.max_audio_seconds)
    formula = 0
    for batch, tokens, kept in forwards:
        parts = forward_activation_bytes(shape, profile.base.dtype, profile.fusion.layers, batch, tokens, encoder,
                                         profile.projector, profile.projector.num_tokens,
                                         ffn_width=profile.fusion.ffn_width, answer_tokens=kept)
        formula += sum(parts.values()) - parts["logits"]
    assert abs(formula - measured) / measured < 0.10, (formula, measured, forwards)


# --------------------------------------------------------------------------- the command


def safe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SAFE_DATA_ROOT", "FORCE_COLOR")}
    env.update(NO_COLOR="1", COLUMNS="200", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "safe_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_validate_estimate_prints_the_table(tmp_path):
    result = safe("validate", "llava15-7b-whisper-small", "--estimate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in ["base VL model (frozen)", "7,063,427,072", "bfloat16", "AdamW state", "total, training",
                     "total, training if the base's layers were checkpointed (not built yet)", "total, inference",
                     "ok: estimate for llava15-7b-whisper-small"]:
        assert fragment in result.stdout, fragment


def test_validate_estimate_json_agrees_with_the_library(tmp_path):
    result = safe("validate", "demo", "--estimate", "--json", "--set", "fusion.layers=[0,3]", "--text-tokens", "32",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = estimate_memory(load_profile("demo", ["fusion.layers=[0,3]"]), text_tokens=32).to_json()
    compute = report.pop("compute")
    assert report == expected
    assert compute == estimate_compute(load_profile("demo", ["fusion.layers=[0,3]"]), 0.494, 32, 8, 5.0).to_json()
    assert report["schema"] == "safe.memory-estimate/1"
    assert report["sequence"]["tokens"] == 16 + 32
    assert np.isclose(report["totals_gib"]["training"], report["totals_bytes"]["training"] / 2**30, atol=1e-3)


def test_answer_tokens_size_the_logits_of_the_estimate(tmp_path):
    """Stage A's LM head runs on the answer positions: the logits rows scale with --answer-tokens."""
    rows = {}
    for n in (2, 64):
        result = safe("validate", "llava15-7b-whisper-small", "--estimate", "--json", "--answer-tokens", str(n),
                      cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["sequence"]["answer_tokens"] == n
        rows[n] = {r["component"]: r["bytes"] for r in report["training"]}
    logits = "  of which logits + log_softmax"
    assert rows[64][logits] == 32 * rows[2][logits] == 8 * 64 * 32064 * (2 + 4)  # bf16 logits + fp32 log-softmax
    assert rows[64]["teacher logits (retention batch, no grad)"] == 32 * rows[2]["teacher logits (retention batch, no grad)"]


def test_validate_estimate_unknown_model_exits_2(tmp_path):
    result = safe("validate", "demo", "--estimate", "--set", "base.kind=hf-llava", "--set",
                  "base.name_or_path=someone/llava-x", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "error: base.name_or_path: cannot estimate 'someone/llava-x' offline" in result.stderr
    assert "ok: estimate" not in result.stdout


def test_validate_without_estimate_is_unchanged(tmp_path):
    result = safe("validate", "demo", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "demo"


@pytest.mark.parametrize("name", REAL)
def test_real_profiles_compute_estimate_offline(name, no_network):
    """From dimensions alone: deciding inside the prefill costs next to nothing, the old second
    prefill about doubled the base, and on these bases audio is a few percent of an answer."""
    compute = estimate_compute(load_profile(name), audio_usage=0.5, text_tokens=64, new_tokens=8, clip_seconds=5.0)
    flops, relative = compute.flops, compute.relative()
    assert flops["base alone"] < flops["gate"] < flops["always-max"] < flops["gate, before (two prefills)"]
    assert relative["gate, before (two prefills)"]["vs_base"] > 1.9
    assert relative["always-max"]["vs_base"] < 1.1
    assert compute.assumptions["decision_flops"] < 1e-3 * flops["base alone"]


def test_compute_estimate_from_the_profile_is_the_cost_model_of_the_built_model():
    """The meta-device estimate and the cost model of the model the loaders build agree exactly."""
    from safe_cli.rl.cost import AudioCostModel, EndToEndCost

    profile = load_profile("demo")
    compute = estimate_compute(profile, audio_usage=0.25, text_tokens=20, new_tokens=3, clip_seconds=1.5)
    model = build_safe_model(profile)
    cost = EndToEndCost.for_model(model, AudioCostModel.for_model(model, 12))
    length = model.base.num_image_tokens + 20
    assert compute.flops["base alone"] == cost.flops(0, length, 1.5, 3, True)
    assert compute.flops["always-max"] == cost.flops(12, length, 1.5, 3, True)


def test_validate_estimate_prints_the_compute_table(tmp_path):
    result = safe("validate", "blip2-opt27b-clap", "--estimate", "--audio-usage", "0.25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for fragment in ["compute per example: blip2-opt27b-clap (32 image + 64 text tokens", "gate on 25.0% of clips",
                     "gate, before (two prefills)", "ok: end to end, the gate at 25.0% audio usage costs"]:
        assert fragment in result.stdout, fragment
