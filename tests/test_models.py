"""The SAFE model's promises, table-driven over every base kind.

Adapters are given non-zero gates and LoRA weights (perturb_adapters) so that rows with audio
really change: a bypass that leaked would make these tests fail.
"""

import pytest
import torch

from safe_cli.config import load_profile
from safe_cli.models import AudioProjector, CrossAttentionBlock, FusionAdapter, build_safe_model, fingerprint_module
from safe_cli.models.bypass import perturb_adapters
from safe_cli.models.fusion_adapter import attend_few_keys, is_gate_parameter
from safe_cli.models.probe import probe_audio, probe_batch
from safe_cli.rl.policy import AudioPolicyNetwork

BASE_KINDS = ["tiny-llava", "hf-llava", "hf-blip2"]
MIXED_BUDGETS = [0, 4, 0, 12, 8, 0]


def profile_for(kind, checkpoints, *extra):
    overrides = list(extra)
    if kind != "tiny-llava":
        overrides += [f"base.kind={kind}", f"base.name_or_path={checkpoints[kind]}"]
    return load_profile("demo", overrides)


@pytest.fixture(params=BASE_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def perturbed_model(kind, tiny_checkpoints):
    # With the optional feed-forward, so bypass, freezing and the inference fold cover it too.
    model = build_safe_model(profile_for(kind, tiny_checkpoints, "fusion.ffn_width=48"))
    perturb_adapters(model)
    return model


def mixed_batch(model, budgets, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = probe_batch(model.base, len(budgets), 8, generator)
    audio = probe_audio(model.audio_encoder.sample_rate, len(budgets), generator=generator)
    return inputs, audio, torch.tensor(budgets)


@torch.no_grad()
def test_budget_zero_rows_equal_base_bit_for_bit(perturbed_model):
    inputs, audio, budget = mixed_batch(perturbed_model, MIXED_BUDGETS)
    reference = perturbed_model.base(**inputs).logits
    fused = perturbed_model(token_budget=budget, audio=audio, **inputs).logits
    for row, k in enumerate(MIXED_BUDGETS):
        if k == 0:
            assert torch.equal(fused[row], reference[row]), f"budget-0 row {row} differs from the base"
        else:
            assert not torch.allclose(fused[row], reference[row], atol=1e-4), f"audio row {row} equals the base"


@torch.no_grad()
def test_all_zero_budgets_skip_encoder_and_adapters(perturbed_model, monkeypatch):
    inputs, audio, _ = mixed_batch(perturbed_model, [0, 0, 0])

    def must_not_run(*args, **kwargs):
        raise AssertionError("the audio encoder ran for a budget-0 batch")

    monkeypatch.setattr(perturbed_model.audio_encoder, "forward", must_not_run)
    reference = perturbed_model.base(**inputs).logits
    fused = perturbed_model(token_budget=torch.zeros(3, dtype=torch.long), audio=audio, **inputs).logits
    assert torch.equal(fused, reference)


@torch.no_grad()
def test_row_result_does_not_depend_on_other_rows_budgets(perturbed_model):
    """A k=4 row padded to the batch's k_max=12 attends to its own 4 tokens only."""
    inputs, audio, budget = mixed_batch(perturbed_model, MIXED_BUDGETS)
    together = perturbed_model(token_budget=budget, audio=audio, **inputs).logits
    alone_inputs = {key: value[1:2] for key, value in inputs.items()}
    alone = perturbed_model(token_budget=torch.tensor([4]), audio=[audio[1]], **alone_inputs).logits
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_training_step_changes_only_projector_and_fusion(perturbed_model):
    model = perturbed_model
    base_before = {name: t.detach().clone() for name, t in model.base_model.state_dict(keep_vars=True).items()}
    base_before.update({f"buffer:{n}": b.clone() for n, b in model.base_model.named_buffers()})
    encoder_before = {n: t.detach().clone() for n, t in model.audio_encoder.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    fingerprint_before = model.base_fingerprint()

    model.train()
    inputs, audio, budget = mixed_batch(model, MIXED_BUDGETS)
    logits = model(token_budget=budget, audio=audio, **inputs).logits
    targets = inputs["input_ids"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    loss.backward()
    optimizer.step()

    assert model.base_model.training is False and model.audio_encoder.training is False
    assert not any(p.requires_grad for p in model.base_model.parameters())
    after = dict(model.base_model.state_dict(keep_vars=True))
    after.update({f"buffer:{n}": b for n, b in model.base_model.named_buffers()})
    for name, tensor in base_before.items():
        assert torch.equal(after[name].detach(), tensor), f"base tensor {name} changed"
    for name, tensor in model.audio_encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), f"encoder tensor {name} changed"
    assert model.base_fingerprint() == fingerprint_before

    changed = {n for n, p in model.trainable_named_parameters() if not torch.equal(p.detach(), trainable_before[n])}
    assert any(n.startswith("projector.") for n in changed)
    assert any(n.startswith("fusion.") and "lora_" in n for n in changed)
    assert any(n.endswith(".gate") for n in changed)
    assert any(".ffn." in n for n in changed) and any(n.endswith(".ffn_gate") for n in changed)
    assert all(n.startswith(("projector.", "fusion.")) for n in trainable_before)


def test_fingerprint_detects_a_one_ulp_change_and_survives_reload(tiny_checkpoints):
    profile = profile_for("hf-llava", tiny_checkpoints)
    first = build_safe_model(profile)
    again = build_safe_model(profile)
    assert first.base_fingerprint() == again.base_fingerprint()
    with torch.no_grad():
        weight = again.base_model.lm_head.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    assert first.base_fingerprint() != again.base_fingerprint()


# The schema's default: gates closed (the demo profile opens them a little, issue 28).
CLOSED_GATES = "fusion.gate_init=0.0"


def test_fusion_starts_from_the_base_layers_own_attention(kind, tiny_checkpoints):
    model = build_safe_model(profile_for(kind, tiny_checkpoints, CLOSED_GATES))
    for layer in model.fusion.layers:
        block, attention = model.fusion.block(layer), model.base.attention(layer)
        out_name = "o_proj" if hasattr(attention, "o_proj") else "out_proj"
        for mine, theirs in [("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", out_name)]:
            adapted = getattr(block, mine)
            assert torch.equal(adapted.base_layer.weight, getattr(attention, theirs).weight.float())
            assert not adapted.base_layer.weight.requires_grad
            assert adapted.lora_A["default"].weight.requires_grad
        assert block.gate.requires_grad and float(block.gate.detach()) == 0.0


def test_untrained_model_equals_base_on_every_row(kind, tiny_checkpoints):
    """Zero-initialised gates: before training, even rows with audio give the base's logits."""
    model = build_safe_model(profile_for(kind, tiny_checkpoints, CLOSED_GATES))
    inputs, audio, budget = mixed_batch(model, MIXED_BUDGETS)
    with torch.no_grad():
        assert torch.equal(model(token_budget=budget, audio=audio, **inputs).logits, model.base(**inputs).logits)


@pytest.mark.parametrize("ffn_width", [0, 128])
def test_fresh_cross_attention_block_returns_its_input_exactly(ffn_width):
    block = CrossAttentionBlock(hidden_size=96, num_attention_heads=4, ffn_width=ffn_width)
    states, tokens = torch.randn(3, 7, 96), torch.randn(3, 5, 96)
    assert torch.equal(block(states, tokens), states)
    with torch.no_grad():
        assert torch.equal(block(states, tokens), states)  # the inference path too
        block.gate.fill_(0.3)
    assert not torch.allclose(block(states, tokens), states)
    if ffn_width:  # the feed-forward's own gate opens it alone, without any audio attention
        with torch.no_grad():
            block.gate.fill_(0.0)
            block.ffn_gate.fill_(0.3)
        assert not torch.allclose(block(states, tokens), states)


@torch.no_grad()
def test_the_gates_are_all_that_stands_between_a_block_and_its_input():
    # Training updates and bypass checks open the parameters is_gate_parameter names. Every other
    # weight of an adapter with LoRA, a null slot and a feed-forward is randomised here: with the
    # named gates shut each block must still return its input, so a gated branch added without
    # its gate in the list fails this test.
    adapter = FusionAdapter([0, 1], hidden_size=64, num_attention_heads=4, ffn_width=32)
    adapter.init_from_base({layer: adapter.block(layer) for layer in (0, 1)}, rank=4, alpha=8, dropout=0.0)
    gates = [name for name, _ in adapter.named_parameters() if is_gate_parameter(name)]
    assert sorted(gates) == ["blocks.0.ffn_gate", "blocks.0.gate", "blocks.1.ffn_gate", "blocks.1.gate"]
    generator = torch.Generator().manual_seed(0)
    for name, param in adapter.named_parameters():
        param.copy_(torch.zeros_like(param) if is_gate_parameter(name) else torch.randn(param.shape, generator=generator))
    states, tokens = torch.randn(2, 6, 64), torch.randn(2, 5, 64)
    for layer in (0, 1):
        assert torch.equal(adapter.block(layer)(states, tokens), states)
    for name, param in adapter.named_parameters():
        if is_gate_parameter(name):
            param.fill_(0.5)
    assert not torch.allclose(adapter.block(0)(states, tokens), states)


def test_null_slot_lets_a_query_attend_to_nothing():
    # With every audio token masked out only the zero-valued null slot is left: the block adds
    # exactly nothing (without the slot, a softmax over no keys would be NaN).
    torch.manual_seed(0)
    block = CrossAttentionBlock(hidden_size=32, num_attention_heads=4)
    states, tokens = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        block.gate.fill_(0.5)
        attending = block(states, tokens, torch.ones(2, 3, dtype=torch.bool))
        nothing = block(states, tokens, torch.zeros(2, 3, dtype=torch.bool))
    assert not torch.allclose(attending, states)
    assert torch.equal(nothing, states)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_few_key_attention_equals_sdpa_with_grouped_heads_and_masks(kv_heads):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 7, 4, 8, generator=generator)
    k, v = torch.randn(2, 3, 5, kv_heads, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None, None, :], enable_gqa=kv_heads != 4,
    ).transpose(1, 2).reshape(3, 7, 32)
    torch.testing.assert_close(attend_few_keys(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attend_few_keys(q * 8**-0.5, k, v, mask, scale=1.0), expected, atol=1e-6, rtol=1e-5)


def test_inference_fold_matches_the_lora_layers_and_follows_weight_changes(perturbed_model):
    """Without grad the blocks fold LoRA and gate into their weights; the answer must stay the
    training computation's (to float rounding), also after an optimizer-style in-place update
    and after load_state_dict, which must not leave a stale fold behind."""
    inputs, audio, budget = mixed_batch(perturbed_model, [4, 12, 8])
    features = perturbed_model.encode_audio(audio)

    def logits(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return perturbed_model(token_budget=budget, audio_features=features, **inputs).logits.detach()

    before = logits(False)
    torch.testing.assert_close(before, logits(True), atol=1e-5, rtol=1e-5)
    block = perturbed_model.fusion.block(perturbed_model.fusion.layers[0])
    snapshot = {name: value.clone() for name, value in perturbed_model.fusion.state_dict().items()}
    with torch.no_grad():
        block.q_proj.lora_B["default"].weight.add_(0.5)  # what an optimizer step does: in place
        block.gate.add_(0.2)
    changed = logits(False)
    assert not torch.allclose(changed, before, atol=1e-4)
    torch.testing.assert_close(changed, logits(True), atol=1e-5, rtol=1e-5)
    perturbed_model.fusion.load_state_dict(snapshot)
    torch.testing.assert_close(logits(False), before, atol=0, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("null_slot", [True, False])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("ffn_width", [0, 24])
def test_absorbed_inference_equals_the_training_computation(kv_heads, bias, null_slot, lora, ffn_width):
    """Grad off, a block absorbs q and o into each clip's keys and values (AudioReadout); its
    output must be the training path's (peft's LoRA layers, q and o per position) to float
    rounding, with grouped heads, biases, masks, and with or without the null slot."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads,
                                bias=bias, null_slot=null_slot, ffn_width=ffn_width)
    if lora:
        adapter = FusionAdapter([0], 32, 4, kv_heads, bias=bias, null_slot=null_slot, ffn_width=ffn_width)
        attention = torch.nn.Module()
        for name, out in [("q_proj", 32), ("k_proj", 8 * kv_heads), ("v_proj", 8 * kv_heads), ("o_proj", 32)]:
            setattr(attention, name, torch.nn.Linear(32 if name != "o_proj" else 32, out, bias=bias))
        adapter.init_from_base({0: attention}, rank=4, alpha=8, dropout=0.0)
        block = adapter.block(0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3)
        block.gate.fill_(0.7)
    states, tokens = torch.randn(3, 11, 32), torch.randn(3, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    for key_mask in (None, mask):
        exact_readout = block.read_audio(tokens, key_mask)
        assert not exact_readout.absorbed
        exact = block.fuse(states, exact_readout).detach()
        with torch.no_grad():
            readout = block.read_audio(tokens, key_mask)
            assert readout.absorbed and readout.keys.shape == (3, 4 * (5 + null_slot), 32)
            absorbed = block.fuse(states, readout)
        assert not torch.allclose(exact, states, atol=1e-3)
        torch.testing.assert_close(absorbed, exact, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_reads_the_audio_once_and_decodes_as_step_by_step_forwards(monkeypatch):
    """generate() runs the fusion hooks at every decoding step with the KV cache; the audio
    readout is computed once per call, and the greedy tokens must be those of full forwards
    re-run at every step, with and without audio in the same batch."""
    model = build_safe_model(load_profile("demo"))
    perturb_adapters(model, gate=0.9, scale=0.5)
    inputs, audio, budget = mixed_batch(model, [0, 8, 12, 4], seed=3)
    features = model.encode_audio(audio)
    reads = []
    original = CrossAttentionBlock.read_audio
    monkeypatch.setattr(CrossAttentionBlock, "read_audio", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    steps = 4
    generated = model.generate(**inputs, token_budget=budget, audio_features=features, max_new_tokens=steps,
                               min_new_tokens=steps, do_sample=False)
    assert len(reads) == len(model.fusion.layers)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=attention, pixel_values=inputs["pixel_values"],
                       token_budget=budget, audio_features=features).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], 1)
    assert torch.equal(generated[:, -steps:], ids[:, -steps:])
    without_audio = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert not torch.equal(generated[1:, -steps:], without_audio[1:, -steps:])


def test_projector_tokens_are_nested():
    projector = AudioProjector(audio_embed_dim=40, llm_hidden_size=32, num_audio_tokens=12)
    frames = torch.randn(2, 50, 40)
    full = projector(frames)
    assert full.shape == (2, 12, 32)
    for k in (1, 4, 8):
        torch.testing.assert_close(projector(frames, k), full[:, :k], atol=1e-6, rtol=1e-6)
    assert projector(torch.randn(2, 40), 8).shape == (2, 8, 32)
    with pytest.raises(ValueError, match="num_tokens"):
        projector(frames, 13)


def test_policy_log_probs_are_right_for_every_action_including_skip():
    policy = AudioPolicyNetwork(state_feature_dim=6, token_budgets=[0, 4, 8, 12])
    states = torch.randn(5, 6)
    actions = torch.tensor([0, 1, 2, 3, 0])
    out = policy.get_actions(states, actions=actions)
    expected = torch.log_softmax(policy(states)[0], -1).gather(1, actions[:, None]).squeeze(1)
    torch.testing.assert_close(out.log_probs, expected)
    assert out.budgets.tolist() == [0, 4, 8, 12, 0]
    sampled = policy.get_actions(states)
    assert set(sampled.budgets.tolist()) <= {0, 4, 8, 12}
    with pytest.raises(ValueError):
        AudioPolicyNetwork(6, [4, 8])


def test_budget_outside_projector_range_is_refused(tiny_checkpoints):
    model = build_safe_model(profile_for("tiny-llava", tiny_checkpoints))
    inputs, audio, _ = mixed_batch(model, [0, 4])
    with pytest.raises(ValueError, match="token budgets"):
        model(token_budget=torch.tensor([0, 13]), audio=audio, **inputs)


def test_fingerprint_covers_buffers():
    module = torch.nn.BatchNorm1d(4)
    before = fingerprint_module(module)
    module.running_mean += 1
    assert fingerprint_module(module) != before


def test_fusion_layers_beyond_depth_fail_at_load_when_validation_could_not_know(tiny_checkpoints):
    """A hub id's depth is unknown offline at validation time; loading must still refuse it clearly."""
    from safe_cli.config.schema import Profile
    from safe_cli.errors import SafeError

    raw = load_profile("demo").model_dump()
    raw["fusion"]["layers"] = [1, 9]
    with pytest.raises(SafeError, match=r"fusion\.layers: layers \[9\] are outside the base LLM's 4 decoder layers"):
        build_safe_model(Profile.model_validate(raw))
