"""The three retention mechanisms of Stage A, each a small object with one job.

All three act on *retention batches*: VL and text questions with a distractor clip attached,
run with the adapter active. (On inputs without audio the bypass already returns the base
exactly, so a retention term there would be vacuous.)

* ``distillation_kl``: KL(teacher || student) on the answer tokens at temperature T, times T^2
  (Hinton et al.), the teacher being the frozen base on the same input without audio.
* ``FisherPenalty``: EWC's sum_i F_i (theta_i - theta_i^ref)^2 with a diagonal Fisher estimated
  on retention examples at the reference (the start of training, which equals the base).
* ``NullSpaceProjector``: GPM / Adam-NSCL. Inputs of protected linear layers are collected on
  retention batches; the top singular directions of those inputs are protected, and every
  update of the layer's weight is projected so that ``W x`` does not change for x in them.

The projection is applied to the *update* the optimizer made, not to the gradient: Adam
rescales each coordinate of the gradient, and weight decay shrinks every direction, so a
projected gradient would not give a projected update. Projecting the update is exact for any
optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- distillation


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) bool: positions whose next token is a labelled (answer) token."""
    return labels[:, 1:] != IGNORE_INDEX


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    normalizer: Optional[float] = None,
) -> torch.Tensor:
    """Mean over answer tokens of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    ``*_logits`` are (B, L, V) from the same inputs; ``labels`` (B, L) mark answer tokens as
    in causal-LM training (-100 elsewhere). Logit t predicts token t+1, hence the shift.
    ``normalizer``: divide the sum by this instead of this batch's answer-token count (data
    parallelism divides by the global count over the world size).
    """
    positions = answer_positions(labels)
    if not bool(positions.any()):
        return student_logits.sum() * 0.0  # keeps the graph; no answer tokens, nothing to match
    return _kl_mean(student_logits[:, :-1][positions], teacher_logits[:, :-1][positions], temperature, normalizer)


def distillation_kl_at(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                       temperature: float, normalizer: Optional[float] = None) -> torch.Tensor:
    """``distillation_kl`` on logits taken at the answer positions only: (B, P, V) each, as the
    base returns them with ``logits_to_keep=answer_index``; ``targets`` (B, P) is -100 where a row
    has fewer than P answer tokens (those positions are left out).

    The padding positions are multiplied out rather than indexed away: a boolean index needs
    the mask's values on the host (a device sync on a GPU), a product does not.
    """
    scored = (targets != IGNORE_INDEX).to(torch.float32)
    student = F.log_softmax(student_logits.float() / temperature, -1)
    teacher = F.log_softmax(teacher_logits.float().detach() / temperature, -1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)  # KL(teacher || student) at each position
    total = (per_position * scored).sum()
    count = scored.sum() if normalizer is None else max(normalizer, 1.0)
    return total / count * temperature**2


def _kl_mean(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
             normalizer: Optional[float]) -> torch.Tensor:
    """T^2 x the summed KL(teacher || student) over rows (N, V), divided by N or ``normalizer``."""
    student = student.float() / temperature
    teacher = teacher.float().detach() / temperature
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="sum", log_target=True)
    return kl / (max(student.shape[0], 1) if normalizer is None else max(normalizer, 1.0)) * temperature**2


# --------------------------------------------------------------------------- Fisher


class FisherPenalty:
    """Diagonal-Fisher (EWC) penalty around reference parameters.

    ``estimate`` takes a function returning the negative log-likelihood of one example (the
    frozen base's answer, under the model with the distractor clip); per example gradients are
    squared and averaged, as the Fisher information's definition asks (squaring a batch's
    gradient would cancel terms between examples). The Fisher is divided by its largest entry
    so that ``fisher_weight`` means the same whatever the model's scale.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]]):
        self.parameters = dict(named_parameters)
        self.fisher: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}

    @property
    def ready(self) -> bool:
        return bool(self.fisher)

    def estimate(self, example_losses: Iterable[Callable[[], torch.Tensor]]) -> int:
        """Fisher at the current parameters, which become the reference. Returns examples used."""
        sums = {name: torch.zeros_like(p) for name, p in self.parameters.items()}
        count = 0
        for loss_fn in example_losses:
            for p in self.parameters.values():
                p.grad = None
            loss_fn().backward()
            for name, p in self.parameters.items():
                if p.grad is not None:
                    sums[name] += p.grad.detach() ** 2
            count += 1
        for p in self.parameters.values():
            p.grad = None
        if count == 0:
            raise ValueError("the Fisher needs at least one retention example")
        mean = {name: s / count for name, s in sums.items()}
        largest = max(float(m.max()) for m in mean.values())
        self.fisher = {name: m / largest if largest > 0 else m for name, m in mean.items()}
        self.reference = {name: p.detach().clone() for name, p in self.parameters.items()}
        return count

    def penalty(self) -> torch.Tensor:
        """sum_i F_i (theta_i - theta_i^ref)^2 (0 before ``estimate``)."""
        first = next(iter(self.parameters.values()))
        total = first.new_zeros(())
        for name, fisher in self.fisher.items():
            total = total + (fisher * (self.parameters[name] - self.reference[name]) ** 2).sum()
        return total

    def state_dict(self) -> dict:
        return {"fisher": dict(self.fisher), "reference": dict(self.reference)}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = {k: v.clone() for k, v in state["fisher"].items()}
        self.reference = {k: v.clone() for k, v in state["reference"].items()}


# --------------------------------------------------------------------------- null space


class NullSpaceProjector:
    """Keeps protected linear layers' outputs on retention inputs unchanged by every update.

    Use: ``with projector.collecting(): <forward of a retention batch>`` accumulates the
    uncentred covariance of each protected layer's inputs; ``maybe_refresh(step)`` recomputes
    the protected bases (top ``rank`` eigenvectors) once ``min_samples`` examples were seen and
    then every ``refresh_interval`` steps; around ``optimizer.step()`` call ``snapshot()`` then
    ``project(snapshot)``.
    """

    def __init__(self, layers: dict[str, nn.Linear], rank: int, min_samples: int, refresh_interval: int,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 gather: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None, world_rank: int = 0):
        if not layers:
            raise ValueError("null-space projection needs at least one protected linear layer")
        self.layers = layers
        self.rank = rank
        self.min_samples = min_samples
        self.refresh_interval = refresh_interval
        # A bias is a weight column whose input is always 1: protecting W x + b on x means
        # protecting [W b] on [x, 1], so layers with a bias collect the augmented inputs.
        self.covariance = {name: torch.zeros(l.in_features + (l.bias is not None), l.in_features + (l.bias is not None),
                                             dtype=torch.float64, device=l.weight.device) for name, l in layers.items()}
        self.samples = 0
        self.bases: dict[str, torch.Tensor] = {}
        self.refreshed_at: Optional[int] = None
        # Data parallelism: each rank collects its own rows; ``reduce`` sums a tensor over ranks,
        # so the bases come from every rank's inputs and are the same everywhere.
        self.reduce = reduce or (lambda tensor: tensor)
        # Every rank's copy of a tensor on the writing rank (None elsewhere), so a checkpoint
        # resumes each rank's own sums exactly.
        self.gather = gather
        self.world_rank = world_rank

    def _global_samples(self) -> int:
        return int(self.reduce(torch.tensor([float(self.samples)], dtype=torch.float64)).item())

    @property
    def active(self) -> bool:
        return bool(self.bases)

    @contextlib.contextmanager
    def collecting(self, examples: int, token_mask: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Record the inputs of the protected layers during one forward; ``examples`` count once it ends.

        ``token_mask`` (rows, L), when given, keeps only real tokens (padding is not an input
        the base will ever be judged on).
        """
        handles = [layer.register_forward_pre_hook(self._hook(name, token_mask)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.samples += examples  # not reached when the forward raised

    def _hook(self, name: str, token_mask: Optional[torch.Tensor]):
        def hook(module, args):
            x = args[0].detach()
            if token_mask is not None and x.dim() == 3 and token_mask.shape == x.shape[:2]:
                x = x[token_mask.to(x.device).bool()]
            # The products in float32 (fast on every GPU), their running sum in float64 (a sum over
            # thousands of batches would lose the small eigenvalues in float32). Computing the
            # products in float64 costs 30-64x on GPUs with weak fp64 throughput.
            x = x.reshape(-1, x.shape[-1]).float()
            if module.bias is not None:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
            self.covariance[name] += (x.T @ x).double()

        return hook

    def maybe_refresh(self, step: int) -> bool:
        """Recompute the bases when due; True if it did."""
        due = self.refreshed_at is None or step - self.refreshed_at >= self.refresh_interval
        if not due or self._global_samples() < self.min_samples:  # the all-reduce only when due
            return False
        for name, covariance in self.covariance.items():
            eigenvalues, eigenvectors = torch.linalg.eigh(self.reduce(covariance))  # ascending
            rank = min(self.rank, int((eigenvalues > eigenvalues[-1] * 1e-10).sum()))
            weight = self.layers[name].weight
            self.bases[name] = eigenvectors[:, -rank:].flip(-1).to(weight.dtype) if rank else \
                torch.zeros(covariance.shape[0], 0, dtype=weight.dtype, device=weight.device)
        self.refreshed_at = step
        return True

    @staticmethod
    def _augmented(layer: nn.Linear) -> torch.Tensor:
        """[W b] (out, in + 1) for a layer with a bias, W otherwise."""
        if layer.bias is None:
            return layer.weight.detach()
        return torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: self._augmented(layer).clone() for name, layer in self.layers.items()} if self.active else {}

    @torch.no_grad()
    def project(self, before: dict[str, torch.Tensor]) -> None:
        """Replace each protected weight's update dW by dW (I - U U^T) (the bias with it)."""
        for name, old in before.items():
            layer = self.layers[name]
            basis = self.bases[name]
            delta = self._augmented(layer) - old
            new = old + delta - (delta @ basis) @ basis.T
            layer.weight.copy_(new[:, : layer.in_features])
            if layer.bias is not None:
                layer.bias.copy_(new[:, layer.in_features])

    def state_dict(self) -> dict:
        """Under data parallelism a collective call: the sums over ranks, and each rank's own sums."""
        # Copies: the live covariance keeps growing in place after a state is taken.
        state = {"covariance": {k: self.reduce(v.clone()) for k, v in self.covariance.items()},
                 "samples": self._global_samples(),
                 "bases": {k: v.clone() for k, v in self.bases.items()},
                 "refreshed_at": -1 if self.refreshed_at is None else self.refreshed_at}
        if self.gather is not None:
            by_rank = {k: self.gather(v) for k, v in self.covariance.items()}
            samples = self.gather(torch.tensor([float(self.samples)], dtype=torch.float64))
            if samples is not None:  # the writing rank
                state["covariance_by_rank"] = {k: torch.stack(v) for k, v in by_rank.items()}
                state["samples_by_rank"] = torch.stack(samples)
        return state

    def load_state_dict(self, state: dict, world: int = 1) -> None:
        """Each rank takes back its own sums when the world size is the same (an exact resume);
        otherwise rank 0 carries the global sums and the others start at zero (they count once)."""
        by_rank = state.get("covariance_by_rank")
        if by_rank and all(v.shape[0] == world for v in by_rank.values()) and world > 1:
            self.covariance = {k: v[self.world_rank].clone() for k, v in by_rank.items()}
            self.samples = int(state["samples_by_rank"][self.world_rank].item())
        else:
            owner = self.world_rank == 0
            self.covariance = {k: v.clone() if owner else torch.zeros_like(v) for k, v in state["covariance"].items()}
            self.samples = int(state["samples"]) if owner else 0
        self.bases = {k: v.clone() for k, v in state["bases"].items()}
        refreshed = int(state["refreshed_at"])
        self.refreshed_at = None if refreshed < 0 else refreshed


def protected_linears(fusion: nn.Module) -> dict[str, nn.Linear]:
    """The fusion adapter's trainable linears that read the LLM's own hidden states.

    Those are the query projections (their LoRA ``A`` when LoRA is used, else the whole
    ``q_proj``) and the first layer of each feed-forward (``fusion.ffn_width``): on a retention
    batch their input is the base's state for a VL or text question (plus, for the
    feed-forward, what the null slot lets through of the clip). The key/value/output
    projections and the projector read the (distractor) audio; protecting their inputs would
    forbid the adapter to learn to read audio at all.
    """
    layers: dict[str, nn.Linear] = {}
    for name, module in fusion.named_modules():
        if name.endswith("ffn.0") and isinstance(module, nn.Linear):
            layers[name] = module
            continue
        if not name.endswith("q_proj"):
            continue
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and len(lora_a):
            layers[f"{name}.lora_A"] = next(iter(lora_a.values()))
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            layers[name] = module
    return layers
