"""The policy's parts by their defining properties: log-probabilities, the cost model's count,
budget 0 skipping the encoder, the gate's artifact, threshold calibration."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from safe_cli.models.audio_encoders import WhisperEncoder
from safe_cli.models.fusion_adapter import CrossAttentionBlock, FusionAdapter
from safe_cli.models.projectors import AudioProjector
from safe_cli.rl.cost import AudioCostModel, FusionDims, WhisperDims, count_cpu_attention, fusion_dims, whisper_dims
from safe_cli.rl.gate import AudioGate, GateError
from safe_cli.rl.policy import AudioPolicyNetwork
from safe_cli.rl.state import StateNormalizer, clip_statistics
from safe_cli.training.stage_c import choose_threshold


# --------------------------------------------------------------------------- log-probabilities


def test_log_probability_of_every_budget_including_zero_matches_a_hand_softmax():
    torch.manual_seed(0)
    policy = AudioPolicyNetwork(6, (0, 4, 8, 12))
    states = torch.randn(4, 6)
    logits, _ = policy(states)
    for action, budget in enumerate((0, 4, 8, 12)):
        chosen = torch.full((4,), action)
        out = policy.get_actions(states, actions=chosen)
        for row in range(4):
            row_logits = [float(v) for v in logits[row].detach()]
            hand = row_logits[action] - math.log(sum(math.exp(v) for v in row_logits))
            assert float(out.log_probs[row].detach()) == pytest.approx(hand, abs=1e-6)
        assert out.budgets.tolist() == [budget] * 4


def test_rows_without_a_clip_take_budget_zero_with_probability_one():
    torch.manual_seed(1)
    policy = AudioPolicyNetwork(5, (0, 4, 8))
    states = torch.randn(3, 5)
    has_audio = torch.tensor([True, False, True])
    for _ in range(20):
        sampled = policy.get_actions(states, has_audio=has_audio)
        assert int(sampled.budgets[1]) == 0
    zero = policy.get_actions(states, actions=torch.zeros(3, dtype=torch.long), has_audio=has_audio)
    assert float(zero.log_probs[1].detach()) == 0.0 and float(zero.entropy[1].detach()) == pytest.approx(0.0, abs=1e-6)
    # A row with a clip keeps the unmasked distribution.
    logits, _ = policy(states)
    assert float(zero.log_probs[0].detach()) == pytest.approx(float(logits[0].detach().log_softmax(-1)[0]), abs=1e-6)
    assert torch.isfinite(zero.entropy).all()


# --------------------------------------------------------------------------- cost model


def test_whisper_cost_matches_a_hand_count():
    # n_mels 80, width 32, 2 layers, 100 positions (a 2 s window):
    # mel 2*200*201*80 = 6,432,000; conv1 2*200*3*80*32 = 3,072,000; conv2 2*100*3*32*32 = 614,400;
    # block 2*100*12*32^2 + 4*100^2*32 = 2,457,600 + 1,280,000 = 3,737,600 (x2 layers)
    dims = WhisperDims(n_mels=80, width=32, layers=2, window=100)
    assert dims.flops(0.7) == 6_432_000 + 3_072_000 + 614_400 + 2 * 3_737_600
    trimmed = WhisperDims(n_mels=80, width=32, layers=2, window=100, trim_step=50)
    assert trimmed.positions(0.7) == 50 and trimmed.positions(1.01) == 100 and trimmed.positions(9.0) == 100


def test_whisper_formula_agrees_with_torchs_flop_counter_once_it_counts_cpu_attention():
    """torch's counter has no formula for the CPU attention kernel; count_cpu_attention gives it one
    (and without it the encoder's attention products are missing, which the cost model must not copy)."""
    encoder = WhisperEncoder.tiny(32, 2, 4, window_seconds=2.0)
    dims = whisper_dims(encoder)
    count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        encoder([np.zeros(16000, np.float32)])
    assert counter.get_total_flops() == dims.flops(1.0)


def test_fusion_cost_matches_a_hand_count():
    # H 16, 2 heads of 8 (Hq = Hkv = 16), 1 layer, null slot; D 8, frame_pool 1, W 32.
    dims = FusionDims(hidden=16, heads=2, query_width=16, kv_width=16, layers=1, null_slot=True,
                      feature_dim=8, frame_pool=1, projector_mlp=32)
    k, length, frames = 4, 10, 6
    # projector: 2*2*4*6*8 + 2*4*8*16 + 2*2*4*16*32 = 768 + 1024 + 8192
    assert dims.projector_flops(k, frames) == 768 + 1024 + 8192
    # k,v 2*2*4*16*16 = 4096; absorb 2*2*5*16*16 = 5120; attend 2*2*10*2*5*16 = 6400
    assert dims.layer_flops(k, length) == 4096 + 5120 + 6400


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("ffn_width", [0, 48])
def test_fused_layer_cost_is_what_the_inference_path_computes(kv_heads, ffn_width):
    """The formula must count the matrix products a fused layer really runs at inference (the
    absorbed path, and the feed-forward when there is one), as torch's FLOP counter sees them."""
    block = CrossAttentionBlock(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads,
                                ffn_width=ffn_width)
    dims = fusion_dims(AudioProjector(8, 32, 12), FusionAdapter([0], 32, 4, kv_heads, ffn_width=ffn_width))
    assert dims.ffn_width == ffn_width
    k, length = 5, 7
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block.fuse(torch.randn(2, length, 32), block.read_audio(torch.randn(2, k, 32)))
    assert counter.get_total_flops() == 2 * dims.layer_flops(k, length)


def test_relative_cost_is_zero_at_budget_zero_one_at_the_largest_and_grows_with_k():
    encoder = WhisperEncoder.tiny(32, 2, 4, window_seconds=2.0)
    projector = AudioProjector(32, 16, 12)
    fusion = FusionAdapter([0, 1], 16, 2)
    model = AudioCostModel.build(encoder, projector, fusion, max_budget=12)
    costs = [model.relative(k, 20, 1.0) for k in (0, 4, 8, 12)]
    assert costs[0] == 0.0 and costs[-1] == 1.0
    assert costs[1] < costs[2] < costs[3]
    # The encoder dominates: skipping audio saves far more than a smaller budget.
    assert costs[1] > 0.9


# --------------------------------------------------------------------------- state


def test_clip_statistics():
    stats = clip_statistics([None, np.zeros(8000, np.float32), np.full(16000, 0.1, np.float32)], 16000)
    assert stats[0].tolist() == [0.0, 0.0, -10.0]
    assert stats[1].tolist() == [1.0, 0.5, -10.0]
    assert stats[2][0] == 1.0 and stats[2][1] == 1.0 and stats[2][2] == pytest.approx(-2.0, abs=1e-5)


def test_normalizer_standardises():
    features = torch.randn(64, 5) * torch.tensor([1.0, 10.0, 100.0, 0.1, 1.0]) + 3.0
    normed = StateNormalizer(5).fit(features)(features)
    assert torch.allclose(normed.mean(0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(normed.std(0), torch.ones(5), atol=1e-4)


# --------------------------------------------------------------------------- gate


def _gate(threshold=0.5):
    torch.manual_seed(3)
    gate = AudioGate(7, 4, budget_on=8, token_budgets=[0, 4, 8, 12], threshold=threshold,
                     metadata={"base_fingerprint": "sha256:x"})
    gate.normalizer.fit(torch.randn(32, 7))
    return gate


def test_gate_decisions_follow_the_threshold_and_never_give_audio_without_a_clip():
    gate = _gate()
    features = torch.randn(50, 7)
    has_clip = torch.tensor([True] * 40 + [False] * 10)
    p = gate.probability(features)
    budgets = gate.decide(features, has_clip)
    assert budgets.tolist() == [8 if (p[i] >= 0.5 and i < 40) else 0 for i in range(50)]
    assert gate.decide(features, has_clip, threshold=0.0)[:40].eq(8).all()
    assert gate.decide(features, has_clip, threshold=1.01).eq(0).all()


def test_the_exported_gate_loads_in_a_fresh_process_with_the_same_decisions(tmp_path):
    gate = _gate(threshold=0.42)
    gate.save(tmp_path / "gate")
    features = torch.randn(64, 7)
    has_clip = torch.rand(64) > 0.2
    torch.save({"features": features, "has_clip": has_clip}, tmp_path / "states.pt")
    expected = gate.decide(features, has_clip)
    script = (
        "import sys, torch\n"
        "from safe_cli.deploy import AudioGate\n"
        f"gate = AudioGate.load({str(tmp_path / 'gate')!r})\n"
        f"s = torch.load({str(tmp_path / 'states.pt')!r}, weights_only=True)\n"
        "print(gate.threshold, gate.budget_on, gate.metadata['base_fingerprint'])\n"
        "print(','.join(str(int(b)) for b in gate.decide(s['features'], s['has_clip'])))\n"
        "assert 'safe_cli.training' not in ' '.join(sys.modules), 'deployment imported training code'\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    head, decisions = out.stdout.strip().splitlines()
    assert head == "0.42 8 sha256:x"
    assert decisions == ",".join(str(int(b)) for b in expected)


def test_a_damaged_gate_folder_is_refused_with_the_file_named(tmp_path):
    gate = _gate()
    gate.save(tmp_path)
    (tmp_path / "gate.json").write_text('{"schema": "something-else"}')
    with pytest.raises(GateError, match="gate.json: schema"):
        AudioGate.load(tmp_path)
    (tmp_path / "gate.safetensors").unlink()
    with pytest.raises(GateError, match="gate.safetensors: missing"):
        AudioGate.load(tmp_path)


# --------------------------------------------------------------------------- calibration


def _candidates():
    # Higher thresholds: less audio, eventually less accuracy.
    return [{"threshold": t, "audio_usage_rate": u, "accuracy": a}
            for t, u, a in [(0.1, 0.9, 0.80), (0.3, 0.6, 0.80), (0.5, 0.5, 0.79), (0.7, 0.3, 0.70), (0.9, 0.1, 0.6)]]


def test_accuracy_target_takes_the_least_audio_that_keeps_the_accuracy():
    chosen, met = choose_threshold(_candidates(), {"accuracy": 0.80}, "accuracy", 1.0)
    assert (chosen["threshold"], met) == (0.3, True)
    chosen, met = choose_threshold(_candidates(), {"accuracy": 0.80}, "accuracy", 0.98)
    assert (chosen["threshold"], met) == (0.5, True)


def test_unreachable_accuracy_keeps_the_most_accurate_threshold_and_says_so():
    chosen, met = choose_threshold(_candidates(), {"accuracy": 0.95}, "accuracy", 1.0)
    assert (chosen["threshold"], met) == (0.3, False)


def test_usage_target_takes_the_closest_usage():
    chosen, met = choose_threshold(_candidates(), {"accuracy": 0.8}, "audio_usage", 0.35)
    assert (chosen["threshold"], met) == (0.7, True)
