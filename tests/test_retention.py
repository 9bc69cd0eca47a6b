"""The three Stage-A retention mechanisms (safe_cli/training/retention.py), each on tiny tensors.

Every test checks a defining property of the mechanism (KL is a divergence to the teacher on the
answer tokens only, EWC's penalty is the Fisher-weighted squared distance, the null-space update
leaves the protected layer's outputs on the protected inputs unchanged), so that a mechanism that
broke would make its test fail.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safe_cli.models.fusion_adapter import FusionAdapter
from safe_cli.training.retention import (
    IGNORE_INDEX,
    FisherPenalty,
    NullSpaceProjector,
    distillation_kl,
    distillation_kl_at,
    protected_linears,
)

# --------------------------------------------------------------------------- distillation

B, L, V = 2, 6, 7


def _labels() -> torch.Tensor:
    """(B, L) labels: answer tokens at positions 3, 4 of row 0 and 2, 3, 5 of row 1.

    Logit t predicts token t+1, so the answer *logit* positions are 2, 3 (row 0) and 1, 2, 4 (row 1).
    """
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    labels[0, 3], labels[0, 4] = 1, 2
    labels[1, 2], labels[1, 3], labels[1, 5] = 3, 4, 5
    return labels


ANSWER_LOGITS = [(0, 2), (0, 3), (1, 1), (1, 2), (1, 4)]
OTHER_LOGITS = [(b, t) for b in range(B) for t in range(L) if (b, t) not in ANSWER_LOGITS]


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed)) * 2.0


def _manual_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over answer logits of sum_v p log(p / q), p = softmax(teacher/T), q = softmax(student/T)."""
    terms = []
    for b, t in ANSWER_LOGITS:
        p = torch.softmax(teacher[b, t].double() / temperature, -1)
        q = torch.softmax(student[b, t].double() / temperature, -1)
        terms.append((p * (p.log() - q.log())).sum())
    return torch.stack(terms).mean() * temperature**2


def _total_variation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    rows = torch.tensor(ANSWER_LOGITS)
    p = torch.softmax(teacher[rows[:, 0], rows[:, 1]] / temperature, -1)
    q = torch.softmax(student[rows[:, 0], rows[:, 1]] / temperature, -1)
    return float(0.5 * (p - q).abs().sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kl_is_zero_when_student_equals_teacher(temperature):
    teacher = _logits(0)
    value = distillation_kl(teacher.clone(), teacher, _labels(), temperature)
    assert value.dim() == 0
    assert abs(float(value)) < 1e-7


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kl_matches_hand_formula_with_t_squared(temperature):
    student, teacher, labels = _logits(1), _logits(2), _labels()
    value = distillation_kl(student, teacher, labels, temperature)
    assert float(value) > 1e-3  # different distributions: strictly positive
    torch.testing.assert_close(value.double(), _manual_kl(student, teacher, temperature), rtol=1e-5, atol=1e-7)
    # The same with torch's own kl_div (input = student log-probs, target = teacher probs).
    rows = torch.tensor(ANSWER_LOGITS)
    s = F.log_softmax(student[rows[:, 0], rows[:, 1]] / temperature, -1)
    p = F.softmax(teacher[rows[:, 0], rows[:, 1]] / temperature, -1)
    reference = F.kl_div(s, p, reduction="sum") / len(ANSWER_LOGITS) * temperature**2
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


def test_kl_t_squared_factor_is_applied():
    """The raw (un-scaled) divergence at T times T^2: not the divergence alone, not times T."""
    student, teacher, labels = _logits(3), _logits(4), _labels()
    temperature = 3.0
    value = float(distillation_kl(student, teacher, labels, temperature))
    raw = float(_manual_kl(student, teacher, temperature)) / temperature**2
    assert value == pytest.approx(raw * temperature**2, rel=1e-5)
    assert value > 5 * raw  # the factor 9 is there


def test_kl_counts_only_answer_positions():
    student, teacher, labels = _logits(5), _logits(6), _labels()
    base_value = float(distillation_kl(student, teacher, labels, 2.0))
    for b, t in OTHER_LOGITS:
        changed = student.clone()
        changed[b, t] += torch.randn(V, generator=torch.Generator().manual_seed(100 + t)) * 10
        assert float(distillation_kl(changed, teacher, labels, 2.0)) == pytest.approx(base_value, abs=1e-7), (b, t)
        changed_teacher = teacher.clone()
        changed_teacher[b, t] += 5.0 * torch.arange(V, dtype=torch.float32)
        assert float(distillation_kl(student, changed_teacher, labels, 2.0)) == pytest.approx(base_value, abs=1e-7)
    for b, t in ANSWER_LOGITS:
        changed = student.clone()
        changed[b, t] += 5.0 * torch.arange(V, dtype=torch.float32)
        assert abs(float(distillation_kl(changed, teacher, labels, 2.0)) - base_value) > 1e-3, (b, t)


def test_kl_without_answer_tokens_is_zero_and_differentiable():
    student = _logits(7).requires_grad_(True)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    labels[:, 0] = 1  # a label at position 0 is predicted by no logit
    value = distillation_kl(student, _logits(8), labels, 2.0)
    assert float(value.detach()) == 0.0
    value.backward()
    assert student.grad is not None and float(student.grad.abs().max()) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_gradient_moves_student_toward_teacher(temperature):
    teacher = _logits(9).requires_grad_(True)
    student = _logits(10).requires_grad_(True)
    labels = _labels()
    value = distillation_kl(student, teacher, labels, temperature)
    value.backward()
    # The teacher is a fixed target: no gradient reaches it.
    assert teacher.grad is None or float(teacher.grad.abs().max()) == 0.0
    grad = student.grad
    assert float(grad.abs().max()) > 0
    for b, t in OTHER_LOGITS:  # non-answer positions are not pulled anywhere
        assert float(grad[b, t].abs().max()) == 0.0
    with torch.no_grad():
        stepped = student - 0.5 * grad
        after = distillation_kl(stepped, teacher, labels, temperature)
        assert float(after) < float(value) - 1e-4
        tv_before = _total_variation(student, teacher, temperature)
        tv_after = _total_variation(stepped, teacher, temperature)
        assert tv_after < tv_before - 1e-4
        # ...and the distributions at T=1 (what generation sees) also get closer.
        assert _total_variation(stepped, teacher, 1.0) < _total_variation(student, teacher, 1.0)


# --------------------------------------------------------------------------- Fisher


def _fisher_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    xs = torch.randn(5, 3)
    ys = torch.randn(5, 2)

    def loss_for(i):
        return lambda: 0.5 * ((model(xs[i]) - ys[i]) ** 2).sum()

    return model, xs, ys, [loss_for(i) for i in range(len(xs))]


def _hand_fisher(model: nn.Linear, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of per-example squared gradients of 0.5 * ||W x + b - y||^2, over the largest entry."""
    with torch.no_grad():
        residuals = xs @ model.weight.T + model.bias - ys  # (N, out)
        grad_w = residuals[:, :, None] * xs[:, None, :]  # (N, out, in): r x^T per example
        grad_b = residuals
        fisher = {"weight": (grad_w**2).mean(0), "bias": (grad_b**2).mean(0)}
    largest = max(float(v.max()) for v in fisher.values())
    return {k: v / largest for k, v in fisher.items()}


def test_fisher_is_mean_of_per_example_squared_gradients():
    model, xs, ys, losses = _fisher_setup()
    penalty = FisherPenalty(model.named_parameters())
    assert not penalty.ready
    assert penalty.estimate(losses) == len(losses)
    assert penalty.ready
    expected = _hand_fisher(model, xs, ys)
    assert set(penalty.fisher) == {"weight", "bias"}
    # Proportional to the hand computation (the normalisation is checked on its own below).
    largest = max(float(f.max()) for f in penalty.fisher.values())
    for name in expected:
        torch.testing.assert_close(penalty.fisher[name] / largest, expected[name], rtol=1e-5, atol=1e-7)
    # Not the square of the batch gradient (which would let examples cancel each other).
    with torch.no_grad():
        residuals = xs @ model.weight.T + model.bias - ys
        batch_w = (residuals[:, :, None] * xs[:, None, :]).mean(0) ** 2
    assert not torch.allclose(penalty.fisher["weight"] / penalty.fisher["weight"].max(), batch_w / batch_w.max(),
                              atol=1e-3)
    # The estimate leaves no gradients behind, and the reference is the current parameters.
    assert model.weight.grad is None and model.bias.grad is None
    torch.testing.assert_close(penalty.reference["weight"], model.weight.detach())


@pytest.mark.parametrize("examples", [1, 5])
def test_fisher_is_normalised_by_its_largest_entry(examples):
    """Documented: the Fisher is divided by its largest entry, whatever the number of examples."""
    model, xs, ys, losses = _fisher_setup()
    penalty = FisherPenalty(model.named_parameters())
    penalty.estimate(losses[:examples])
    expected = _hand_fisher(model, xs[:examples], ys[:examples])
    assert max(float(f.max()) for f in penalty.fisher.values()) == pytest.approx(1.0)
    for name in expected:
        torch.testing.assert_close(penalty.fisher[name], expected[name], rtol=1e-5, atol=1e-7)


def test_fisher_penalty_zero_before_estimate_and_at_reference():
    model, _, _, losses = _fisher_setup(1)
    penalty = FisherPenalty(model.named_parameters())
    assert float(penalty.penalty().detach()) == 0.0
    penalty.estimate(losses)
    assert float(penalty.penalty().detach()) == 0.0


def test_fisher_penalty_is_weighted_squared_distance():
    model, _, _, losses = _fisher_setup(2)
    penalty = FisherPenalty(model.named_parameters())
    penalty.estimate(losses)
    fisher = penalty.fisher["weight"].flatten()
    big, small = int(fisher.argmax()), int(fisher.argmin())
    assert float(fisher[big]) > float(fisher[small])
    original = model.weight.detach().clone()

    def penalty_with(index: int, amount: float) -> float:
        with torch.no_grad():
            model.weight.copy_(original)
            model.weight.view(-1)[index] += amount
        return float(penalty.penalty().detach())

    assert penalty_with(big, 0.3) > penalty_with(small, 0.3)
    assert penalty_with(big, 0.3) == pytest.approx(float(fisher[big]) * 0.09, rel=1e-5)

    # A general displacement of every parameter: sum F (theta - ref)^2, and 4x for twice the step.
    torch.manual_seed(3)
    directions = {name: torch.randn_like(p) * 0.1 for name, p in model.named_parameters()}
    references = penalty.reference
    torch.testing.assert_close(references["weight"], original)
    values = []
    for scale in (1.0, 2.0):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(references[name] + scale * directions[name])
        values.append(penalty.penalty())
        by_hand = sum((penalty.fisher[n] * (scale * directions[n]) ** 2).sum() for n in directions)
        torch.testing.assert_close(values[-1], by_hand, rtol=1e-5, atol=1e-8)
    assert float(values[0].detach()) > 0
    assert float(values[1].detach()) == pytest.approx(4 * float(values[0].detach()), rel=1e-5)

    # Its gradient is 2 F (theta - ref): it pulls every parameter back toward the reference.
    for p in model.parameters():
        p.grad = None
    penalty.penalty().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * penalty.fisher[name] * (2.0 * directions[name]), rtol=1e-5, atol=1e-8)


def test_fisher_state_dict_round_trip():
    model, _, _, losses = _fisher_setup(4)
    penalty = FisherPenalty(model.named_parameters())
    penalty.estimate(losses)
    with torch.no_grad():
        model.weight.add_(0.2)
        model.bias.sub_(0.1)
    expected = float(penalty.penalty().detach())
    assert expected > 0
    restored = FisherPenalty(model.named_parameters())
    assert float(restored.penalty().detach()) == 0.0
    restored.load_state_dict(penalty.state_dict())
    assert restored.ready
    assert float(restored.penalty().detach()) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- null space

IN, OUT, RANK, ROWS = 16, 8, 3, 40


def _protected_inputs(seed: int = 0) -> torch.Tensor:
    """ROWS inputs spanning RANK random directions of R^IN."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, RANK, generator=g) @ torch.randn(RANK, IN, generator=g)


def _projector_for(layer: nn.Linear, min_samples: int = ROWS, refresh_interval: int = 10) -> NullSpaceProjector:
    return NullSpaceProjector({"layer": layer}, rank=RANK, min_samples=min_samples, refresh_interval=refresh_interval)


def _optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_null_space_update_keeps_outputs_on_protected_inputs(kind):
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT, bias=False)
    plain = copy.deepcopy(layer)  # the same layer, updated without projection
    x = _protected_inputs()
    projector = _projector_for(layer)
    assert not projector.active and projector.snapshot() == {}
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(x)
    assert projector.maybe_refresh(1)
    assert projector.active and projector.bases["layer"].shape == (IN, RANK)

    with torch.no_grad():
        before_outputs = layer(x).clone()
    other = torch.randn(32, IN)
    target = torch.randn(32, OUT)
    optimizers = {}
    for name, module in (("projected", layer), ("plain", plain)):
        optimizer = _optimizer(kind, module.parameters())
        optimizer.zero_grad()
        F.mse_loss(module(other), target).backward()
        optimizers[name] = optimizer
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)  # same gradient for both

    original = layer.weight.detach().clone()
    before = projector.snapshot()
    optimizers["projected"].step()
    projector.project(before)
    optimizers["plain"].step()

    with torch.no_grad():
        projected_change = float((layer(x) - before_outputs).abs().max())
        plain_change = float((plain(x) - before_outputs).abs().max())
        learned = float((layer(other) - other @ original.T).abs().max())
        delta = layer.weight - original
        plain_delta = plain.weight - original
        basis = projector.bases["layer"]
        expected_delta = plain_delta - (plain_delta @ basis) @ basis.T
    assert projected_change < 1e-5
    assert plain_change > 1e-3
    assert float(delta.abs().max()) > 1e-3 and learned > 1e-3  # it still learns on other inputs
    # The projected update is the optimizer's own update with its protected part removed.
    torch.testing.assert_close(delta, expected_delta, rtol=1e-4, atol=1e-6)


def test_null_space_bases_span_the_protected_inputs():
    torch.manual_seed(1)
    layer = nn.Linear(IN, OUT, bias=False)
    x = _protected_inputs(1)
    projector = _projector_for(layer)
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(x)
    assert projector.maybe_refresh(0)
    basis = projector.bases["layer"].double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    residual = x.double() - (x.double() @ basis) @ basis.T  # x lies in span(U)
    assert float(residual.abs().max()) < 1e-4 * float(x.abs().max())
    # Products in float32, summed in float64: float32's rounding of the exact Gram matrix.
    exact = x.double().T @ x.double()
    assert projector.covariance["layer"].dtype == torch.float64
    torch.testing.assert_close(projector.covariance["layer"], exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


def test_null_space_refresh_schedule():
    torch.manual_seed(2)
    layer = nn.Linear(IN, OUT, bias=False)
    x = _protected_inputs(2)
    projector = _projector_for(layer, min_samples=60, refresh_interval=10)
    assert not projector.maybe_refresh(1)  # nothing seen
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(x)
    assert projector.samples == ROWS
    assert not projector.maybe_refresh(2)  # 40 < 60
    assert not projector.active
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(x)
    assert projector.samples == 2 * ROWS
    assert projector.maybe_refresh(5)  # first refresh as soon as min_samples is reached
    assert projector.refreshed_at == 5
    first = projector.bases["layer"].clone()
    # New inputs in another direction, then no refresh before refresh_interval steps passed...
    extra = torch.zeros(ROWS, IN)
    extra[:, 0] = 100.0
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(extra)
    for step in range(6, 15):
        assert not projector.maybe_refresh(step), step
    torch.testing.assert_close(projector.bases["layer"], first)
    # ...and a refresh (with the new data) once they did.
    assert projector.maybe_refresh(15)
    assert projector.refreshed_at == 15
    e0 = torch.zeros(IN)
    e0[0] = 1.0
    assert float((projector.bases["layer"].T @ e0).norm()) > 0.99  # the dominant new direction is in
    assert float((first.T @ e0).norm()) < 0.99


def test_null_space_collecting_only_inside_the_context():
    torch.manual_seed(3)
    layer = nn.Linear(IN, OUT, bias=False)
    projector = _projector_for(layer)
    with torch.no_grad():
        layer(torch.randn(4, IN))  # outside: not recorded
    assert float(projector.covariance["layer"].abs().max()) == 0.0 and projector.samples == 0
    x = torch.randn(4, IN)
    with torch.no_grad(), projector.collecting(examples=4):
        layer(x)
    recorded = projector.covariance["layer"].clone()
    with torch.no_grad():
        layer(torch.randn(4, IN))  # hooks were removed on exit
    torch.testing.assert_close(projector.covariance["layer"], recorded)
    torch.testing.assert_close(recorded, (x.T @ x).double())  # float32 products, float64 sum
    assert not layer._forward_pre_hooks


def test_null_space_token_mask_drops_padding():
    torch.manual_seed(4)
    layer = nn.Linear(IN, OUT, bias=False)
    projector = _projector_for(layer)
    x = torch.randn(2, 5, IN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x[0, 3:] = 1000.0  # padding junk that must not enter the covariance
    with torch.no_grad(), projector.collecting(examples=2, token_mask=mask):
        layer(x)
    kept = torch.cat([x[0, :3], x[1]])
    torch.testing.assert_close(projector.covariance["layer"], (kept.T @ kept).double())
    assert projector.samples == 2
    # Without a mask every position counts.
    unmasked = _projector_for(nn.Linear(IN, OUT, bias=False))
    unmasked.layers["layer"].weight.data.copy_(layer.weight.data)
    with torch.no_grad(), unmasked.collecting(examples=2):
        unmasked.layers["layer"](x)
    every = x.reshape(-1, IN)
    torch.testing.assert_close(unmasked.covariance["layer"], (every.T @ every).double())


def test_null_space_state_dict_round_trip():
    torch.manual_seed(5)
    layer = nn.Linear(IN, OUT, bias=False)
    x = _protected_inputs(5)
    projector = _projector_for(layer)
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(x)
    assert projector.maybe_refresh(7)
    state = projector.state_dict()

    restored = _projector_for(layer)
    assert restored.maybe_refresh(7) is False
    restored.load_state_dict(state)
    assert restored.active and restored.samples == ROWS and restored.refreshed_at == 7
    torch.testing.assert_close(restored.bases["layer"], projector.bases["layer"], rtol=0, atol=0)
    torch.testing.assert_close(restored.covariance["layer"], projector.covariance["layer"], rtol=0, atol=0)
    assert not restored.maybe_refresh(8)  # the schedule carries over too
    # The restored projector protects the same inputs.
    with torch.no_grad():
        before_outputs = layer(x).clone()
        before = restored.snapshot()
        layer.weight.add_(torch.randn_like(layer.weight))
        restored.project(before)
        assert float((layer(x) - before_outputs).abs().max()) < 1e-5

    # Not yet refreshed: refreshed_at None survives the round trip.
    fresh = _projector_for(nn.Linear(IN, OUT, bias=False))
    again = _projector_for(nn.Linear(IN, OUT, bias=False))
    again.load_state_dict(fresh.state_dict())
    assert again.refreshed_at is None and not again.active


def test_null_space_needs_layers():
    with pytest.raises(ValueError):
        NullSpaceProjector({}, rank=RANK, min_samples=1, refresh_interval=1)


# --------------------------------------------------------------------------- protected_linears

HIDDEN = 16


class _TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(HIDDEN, HIDDEN, bias=False))


def test_protected_linears_with_lora_are_the_query_lora_a():
    torch.manual_seed(6)
    fusion = FusionAdapter(layers=[0, 1], hidden_size=HIDDEN, num_attention_heads=2)
    fusion.init_from_base({0: _TinyAttention(), 1: _TinyAttention()}, rank=4, alpha=8, dropout=0.0)
    layers = protected_linears(fusion)
    assert len(layers) == 2
    expected = [next(iter(fusion.block(layer).q_proj.lora_A.values())) for layer in (0, 1)]
    assert [id(m) for m in layers.values()] == [id(m) for m in expected]
    for name, module in layers.items():
        assert "q_proj" in name
        assert not any(p in name for p in ("k_proj", "v_proj", "o_proj"))
        assert isinstance(module, nn.Linear)
        assert (module.in_features, module.out_features) == (HIDDEN, 4)
        assert module.weight.requires_grad
    others = {id(getattr(fusion.block(layer), p).lora_A[k]) for layer in (0, 1) for p in ("k_proj", "v_proj", "o_proj")
              for k in getattr(fusion.block(layer), p).lora_A}
    assert not others & {id(m) for m in layers.values()}


def test_protected_linears_include_the_feed_forwards_first_layer():
    # The feed-forward reads the LLM's own (fused) state, as the queries do: protected too, and
    # trainable after init_from_base (peft froze every non-LoRA weight first).
    fusion = FusionAdapter(layers=[0, 1], hidden_size=HIDDEN, num_attention_heads=2, ffn_width=24)
    fusion.init_from_base({0: _TinyAttention(), 1: _TinyAttention()}, rank=4, alpha=8, dropout=0.0)
    layers = protected_linears(fusion)
    expected = []
    for layer in (0, 1):
        block = fusion.block(layer)
        expected += [next(iter(block.q_proj.lora_A.values())), block.ffn[0]]
    assert [id(m) for m in layers.values()] == [id(m) for m in expected]
    assert all(p.requires_grad for layer in (0, 1) for p in fusion.block(layer).ffn.parameters())
    assert all(fusion.block(layer).ffn_gate.requires_grad for layer in (0, 1))


def test_protected_linears_without_lora_are_the_query_projections():
    fusion = FusionAdapter(layers=[0, 1], hidden_size=HIDDEN, num_attention_heads=2)
    layers = protected_linears(fusion)
    assert [id(m) for m in layers.values()] == [id(fusion.block(layer).q_proj) for layer in (0, 1)]
    assert all(name.endswith("q_proj") for name in layers)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_null_space_protects_a_layer_with_a_bias(kind):
    # W x + b on x is [W b] on [x, 1]: the bias update must be projected with the weight.
    torch.manual_seed(1)
    layer = nn.Linear(IN, OUT, bias=True)
    plain = copy.deepcopy(layer)
    x = _protected_inputs()
    # [x, 1] spans one direction more than x: the constant input of the bias.
    projector = NullSpaceProjector({"layer": layer}, rank=RANK + 1, min_samples=ROWS, refresh_interval=10)
    with torch.no_grad(), projector.collecting(examples=ROWS):
        layer(x)
    assert projector.maybe_refresh(1)
    assert projector.bases["layer"].shape == (IN + 1, RANK + 1)
    with torch.no_grad():
        before_outputs = layer(x).clone()
    other, target = torch.randn(32, IN), torch.randn(32, OUT)
    for module in (layer, plain):
        optimizer = _optimizer(kind, module.parameters())
        optimizer.zero_grad()
        F.mse_loss(module(other), target).backward()
        if module is layer:
            before = projector.snapshot()
            optimizer.step()
            projector.project(before)
        else:
            optimizer.step()
    with torch.no_grad():
        assert float((layer(x) - before_outputs).abs().max()) < 1e-5
        assert float((plain(x) - before_outputs).abs().max()) > 1e-3
        assert float((layer(other) - plain(other)).abs().max()) > 0  # projected, not identical


def test_the_kl_at_answer_positions_equals_the_kl_over_full_logits():
    """Stage A's KL on logits taken at the answer positions (logits_to_keep) is the full-logits KL."""
    from safe_cli.training.batches import answer_positions

    torch.manual_seed(6)
    student, teacher = torch.randn(3, 9, 17), torch.randn(3, 9, 17)
    labels = torch.full((3, 9), -100)
    labels[0, 5:8] = 1
    labels[1, 2] = 4
    labels[2, 6:9] = 2
    index, targets = answer_positions(labels)
    pick = index[..., None].expand(-1, -1, 17)
    for normalizer in (None, 3.0):
        full = distillation_kl(student, teacher, labels, 2.0, normalizer=normalizer)
        kept = distillation_kl_at(student.gather(1, pick), teacher.gather(1, pick), targets, 2.0, normalizer=normalizer)
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-7)
