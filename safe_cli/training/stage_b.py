"""Stage B, efficiency: learn when audio is worth its compute.

The recipe, top to bottom:

1. Load the run's Stage A model (projector + adapters on the frozen base and encoder) and
   check that the profile still describes the same model. Build the policy over the state of
   ``rl/state.py`` (base hidden state, base confidence, clip length and energy: nothing that
   needs the audio encoder) and the cost model of ``rl/cost.py``.
2. Reference figures, from their own random stream so they never shift the batches: the
   feature standardisation, and the base's accuracy on VL/text questions with a distractor
   clip (the retention constraint's reference).
3. Each step draws a batch, ``audio_fraction`` of it questions that need audio and the rest VL
   and text questions with a distractor clip. The policy samples a budget per example (rows
   without a clip can only take 0); SAFE answers every row at its budget in one teacher-forced
   forward (budget-0 rows are the base's own computation); the task score is exact match of
   the answer tokens.
4. reward = score - alpha * relative compute + lambda * score on distractor rows. REINFORCE
   with the value head as baseline and an entropy bonus. lambda, the retention multiplier,
   rises by ``lagrange_lr`` times the shortfall of SAFE's distractor-row accuracy (a running
   mean) below the base's minus ``evaluation.tolerance``, and never falls below 0.
5. Optionally (``tune_adapters``) the adapters take small steps too: the answer loss on audio
   rows given audio, KL to the base on distractor rows given audio.
6. Checkpoints as in Stage A (the step's batch and its action samples come from generators
   seeded by (seed, step), so a resumed run is the uninterrupted one). At the end: every test
   example answered at every budget; always-k, the oracle and the learned policy compared on
   accuracy and compute.

Under torchrun each rank computes the states and the SAFE forward of its slice of the global
batch (the expensive part); states and scores are gathered, and every rank makes the same
policy update on the whole batch (the policy is tiny), so the ranks never drift apart.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_json
from ..config.schema import Profile
from ..data.batches import PromptBatcher
from ..data.dataset import with_distractors
from ..data.sources import evaluation_records, make_pool, records_of, training_and_validation
from ..errors import RunFailed, SafeError
from ..evaluation.runs import POLICY_WEIGHTS, load_trained_model, locate
from ..evaluation.strategies import answer_at_every_budget, compare_strategies, strategy_tasks
from ..evaluation.tasks import TaskResult
from ..models.builder import resolve_device
from ..progress import progress_bar
from ..rl.cost import AudioCostModel, EndToEndCost
from ..rl.policy import AudioPolicyNetwork
from ..rl.state import STATE_VERSION, PolicyInputs, StateNormalizer, pool_policy_inputs, state_dim
from . import run_dir as layout
from .batches import generate_safe_answers, row_exact_match, training_batch
from .checkpoint import check_fingerprint, latest_checkpoint, save_checkpoint
from .distributed import from_environment, rank_device
from .lifecycle import StopSignals, open_stage_dir, peak_memory_mb, prepare_stage_dir, save_weights
from .retention import distillation_kl
from ..config.variants import resolve_variant
from .stage_a import AUDIO_INPUTS

# What must not change between Stage A and Stage B: it defines the model the policy drives.
MODEL_SECTIONS = ("base", "audio_encoder", "projector", "fusion", "data")
LOADER_KEYS = tuple(f"data.{key}:" for key in ("audio_features", "loader_workers", "media_cache_mb",
                                               "max_bad_fraction"))


@dataclass
class StageBResult:
    stage_dir: Path
    variant: str
    seed: int
    steps: int
    resumed_from: Optional[int]
    train_seconds: float
    examples_per_second: float
    peak_memory_mb: float
    base_fingerprint: str
    base_unchanged: bool
    retention_multiplier: float
    tasks: list[TaskResult] = field(default_factory=list)
    efficiency: dict[str, Any] = field(default_factory=dict)
    strategies: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "b", "variant": self.variant, "seed": self.seed, "steps": self.steps,
            "resumed_from": self.resumed_from, "train_seconds": self.train_seconds,
            "examples_per_second": self.examples_per_second, "peak_memory_mb": self.peak_memory_mb,
            "base_fingerprint": self.base_fingerprint, "base_unchanged": self.base_unchanged,
            "retention_multiplier": self.retention_multiplier,
            "tasks": [t.summary() for t in self.tasks], "efficiency": self.efficiency, "strategies": self.strategies,
        }


def check_same_model(stage_a_dir: Path, profile: Profile) -> None:
    """Refuse a profile whose model sections differ from the ones Stage A trained with."""
    from .lifecycle import profile_differences, saved_profile

    saved_path = stage_a_dir / layout.PROFILE_FILE
    saved = saved_profile(saved_path)
    current = profile.model_dump(mode="json")
    differences = []
    for section in MODEL_SECTIONS:
        differences += profile_differences({section: saved.get(section)}, {section: current.get(section)})
    # How records are fed (clip features from the encoder or its cache, loader processes, the media
    # cache, the bad-record limit) does not change the model.
    differences = [d for d in differences if not d.startswith(LOADER_KEYS)]
    if saved.get("policy", {}).get("token_budgets") != current["policy"]["token_budgets"]:
        differences.append(f"policy.token_budgets: {saved.get('policy', {}).get('token_budgets')!r} in the run, "
                           f"{current['policy']['token_budgets']!r} now")
    if differences:
        raise SafeError(f"{saved_path}: Stage A was trained with another model or data; Stage B must drive the same "
                        "model:\n" + "\n".join(differences[:20]))


def stage_a_weights_dir(root: Path) -> Path:
    stage_a = layout.stage_dir(root, "a")
    if not (stage_a / layout.FINAL_WEIGHTS).is_file():
        raise SafeError(f"--run-dir: {stage_a} has no finished Stage A ({layout.FINAL_WEIGHTS} missing); "
                        f"run `safe train --stage a` for this variant and seed first")
    return stage_a


def load_policy(path: Path, state_dim: int, profile: Profile) -> tuple[AudioPolicyNetwork, StateNormalizer]:
    """The policy and its feature standardisation from ``policy.safetensors`` (CPU)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        state = (handle.metadata() or {}).get("state")
    if state != STATE_VERSION:
        trained_on = "the last layer's state (before issue 25)" if state is None else f"state {state!r}"
        raise SafeError(f"{path}: the policy was trained on {trained_on}, not on this SAFE's state {STATE_VERSION!r} "
                        "(read at the first fused layer, one prefill per example); retrain it: "
                        "safe train --stage b, then safe distill-policy")
    policy = AudioPolicyNetwork(state_dim, profile.policy.token_budgets, profile.policy.hidden_size)
    normalizer = StateNormalizer(state_dim)
    weights = load_file(str(path))
    try:
        policy.load_state_dict({k[len("policy."):]: v for k, v in weights.items() if k.startswith("policy.")})
        normalizer.load_state_dict({k[len("normalizer."):]: v for k, v in weights.items()
                                    if k.startswith("normalizer.")})
    except RuntimeError as exc:
        raise SafeError(f"{path}: the policy does not match this profile's policy settings: {exc}") from None
    return policy.eval(), normalizer


class StageBTrainer:
    """Holds one Stage B run's state; ``run()`` trains the policy, checkpoints and evaluates."""

    def __init__(self, profile: Profile, variant: Optional[str] = None, seed: Optional[int] = None,
                 run_dir: Optional[Union[str, Path]] = None, resume: bool = False,
                 device: Optional[str] = None):
        self.profile = profile
        self.cfg = profile.training.stage_b
        self.variant_name, _ = resolve_variant(profile, variant)
        self.seed = profile.seed if seed is None else seed
        self.dist = from_environment(device or profile.training.device)
        self.device = rank_device(self.dist, resolve_device(device or profile.training.device))
        root = layout.run_root(profile.runs_dir, profile.name, self.variant_name, self.seed,
                               str(run_dir) if run_dir else None)
        self.stage_a_dir = stage_a_weights_dir(root)
        check_same_model(self.stage_a_dir, profile)
        self.stage_dir = layout.stage_dir(root, "b")
        self.resume = resume
        prepare_stage_dir(self.stage_dir, profile, resume)

    # ------------------------------------------------------------------ building

    def build(self) -> None:
        profile = self.profile
        train_records, _ = training_and_validation(profile)
        test_records = records_of(profile, "test")
        needs_audio, retention = train_records.of_kinds(("audio", "av")), train_records.of_kinds(("vl", "text"))
        if not len(needs_audio) or not len(retention):
            raise SafeError(f"data.train_manifests: Stage B needs questions that need audio (audio/av records) and "
                            f"VL/text questions to give a distractor clip; the training records have "
                            f"{train_records.counts()}")
        trained = locate(self.stage_a_dir)
        self.model = load_trained_model(trained, profile, self.device)
        self.batcher = PromptBatcher.for_evaluation(self.model.base, profile.evaluation)
        self.base_fingerprint = self.model.base_fingerprint()
        self.budgets = list(profile.policy.token_budgets)
        self.max_budget = max(self.budgets)
        self.cost_model = AudioCostModel.for_model(self.model, self.max_budget)  # the reward's cost term
        self.end_to_end = EndToEndCost.for_model(self.model, self.cost_model)  # reported, not rewarded
        self.rate = self.model.audio_encoder.sample_rate

        self.train_pool = make_pool(profile, train_records, self.rate, encoder=self.model.audio_encoder)
        self.needs_audio, self.distractors = needs_audio, retention
        self.test_pool = make_pool(profile, evaluation_records(test_records, profile.seed, self.train_pool.distractors),
                                   self.rate, encoder=self.model.audio_encoder)

        # The policy is tiny: it lives on the CPU, where the states are gathered.
        self.state_dim = state_dim(self.model.base.hidden_size)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            self.policy = AudioPolicyNetwork(self.state_dim, self.budgets, profile.policy.hidden_size)
        self.normalizer = StateNormalizer(self.state_dim)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.cfg.lr)

        self.model.eval()
        self.adapters: dict[str, torch.nn.Parameter] = {}
        self.adapter_optimizer = None
        if self.cfg.tune_adapters:
            self.adapters = dict(self.model.trainable_named_parameters())
            self.adapter_optimizer = torch.optim.AdamW(list(self.adapters.values()), lr=self.cfg.adapter_lr,
                                                       weight_decay=0.0)
        else:
            self.model.requires_grad_(False)
        self.multiplier = 0.0
        self.base_retention_accuracy = float("nan")
        self.retention_running = float("nan")

    # ------------------------------------------------------------------ references

    def _draw(self, rng: np.random.Generator, size: int, distractor_rng: np.random.Generator):
        """``size`` rows, ``audio_fraction`` of them needing audio, the rest VL/text with a clip;
        rows whose files fail to decode are left out (the same on every rank)."""
        n_audio = min(size - 1, max(1, round(size * self.cfg.audio_fraction))) if size > 1 else 1
        audio = [self.needs_audio[int(i)] for i in rng.integers(len(self.needs_audio), size=n_audio)]
        retention = [self.distractors[int(i)] for i in rng.integers(len(self.distractors), size=size - n_audio)]
        chosen = audio + with_distractors(retention, self.train_pool.distractors, distractor_rng)
        flags = [False] * n_audio + [True] * (size - n_audio)
        kept, _ = self.train_pool.usable(chosen)
        if len(kept) < len(chosen):
            keep = {id(r) for r in kept}
            chosen, flags = zip(*[(r, f) for r, f in zip(chosen, flags) if id(r) in keep]) if kept else ((), ())
            chosen, flags = list(chosen), list(flags)
        return chosen, torch.tensor(flags, dtype=torch.bool)

    @torch.no_grad()
    def _scores(self, chosen, budgets) -> torch.Tensor:
        """Each row's task score at its budget: teacher-forced exact match (one forward, what greedy
        decoding would give) under exact match, else the greedy answer scored by the task's metric."""
        if all(self.train_pool.metric(r.task) == "exact" for r in chosen):
            batch = training_batch(self.batcher, self.train_pool, chosen, budgets)
            labels = batch.pop("labels")
            return row_exact_match(self.model(**batch).logits, labels).float().cpu()
        answers = generate_safe_answers(self.model, self.batcher, self.train_pool, chosen, budgets)
        return torch.tensor(self.train_pool.scores(answers, chosen), dtype=torch.float32)

    def _references(self) -> None:
        """Standardisation of the state, and the base's accuracy on distractor rows (teacher-forced)."""
        rng = np.random.default_rng([self.seed, 2**31 - 2])  # its own stream: never shifts the batches
        chosen, is_retention = self._draw(rng, self.cfg.state_samples, np.random.default_rng([self.seed, 2**31 - 3]))
        size = len(chosen)
        features, scores = [], []
        chunk = self.profile.evaluation.batch_size
        for i in range(0, size, chunk):
            part = chosen[i: i + chunk]
            features.append(pool_policy_inputs(self.model, self.batcher, self.train_pool, part).features)
            scores.append(self._scores(part, [0] * len(part)))
        self.normalizer.fit(torch.cat(features))
        self.base_retention_accuracy = float(torch.cat(scores)[is_retention].mean())
        self.retention_running = self.base_retention_accuracy

    # ------------------------------------------------------------------ state

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"policy.{k}": v for k, v in self.policy.state_dict().items()}
        out.update({f"normalizer.{k}": v for k, v in self.normalizer.state_dict().items()})
        out.update({f"model.{k}": v.detach() for k, v in self.adapters.items()})
        return out

    def save(self, step: int) -> Optional[Path]:
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        state: dict[str, Any] = {
            "step": step, "optimizer": self.optimizer.state_dict(), "multiplier": self.multiplier,
            "base_retention_accuracy": self.base_retention_accuracy, "retention_running": self.retention_running,
        }
        if self.adapter_optimizer is not None:
            state["adapter_optimizer"] = self.adapter_optimizer.state_dict()
        meta = {"base_fingerprint": self.base_fingerprint, "variant": self.variant_name, "seed": self.seed,
                "profile": self.profile.name, "stage": "b", "world_size": self.dist.world}
        path = save_checkpoint(self.stage_dir, step, self.weights(), state, meta,
                               weights_metadata={"state": STATE_VERSION})
        self.dist.barrier()
        return path

    def restore(self) -> int:
        checkpoint = latest_checkpoint(self.stage_dir)
        if checkpoint is None:
            return 0
        check_fingerprint(checkpoint, self.base_fingerprint)
        weights = checkpoint.weights()
        self.policy.load_state_dict({k[7:]: v for k, v in weights.items() if k.startswith("policy.")})
        self.normalizer.load_state_dict({k[11:]: v for k, v in weights.items() if k.startswith("normalizer.")})
        with torch.no_grad():
            for name, param in self.adapters.items():
                param.copy_(weights[f"model.{name}"].to(param.device))
        state = checkpoint.state()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.adapter_optimizer is not None:
            self.adapter_optimizer.load_state_dict(state["adapter_optimizer"])
        self.multiplier = float(state["multiplier"])
        self.base_retention_accuracy = float(state["base_retention_accuracy"])
        self.retention_running = float(state["retention_running"])
        return int(state["step"])

    # ------------------------------------------------------------------ one step

    def _gather_inputs(self, local: PolicyInputs) -> PolicyInputs:
        """The global batch's policy inputs from every rank's slice (in rank order: the draw's order)."""
        if not self.dist.enabled:
            return local
        parts = [torch.cat(self.dist.gather(getattr(local, name).double())) for name in PolicyInputs.FIELDS]
        return PolicyInputs(parts[0].float(), parts[1].bool(), parts[2].long(), parts[3].float(), parts[4].bool())

    def _adapter_loss(self, logits, labels, teacher, budgets, is_retention) -> torch.Tensor:
        audio_rows = (~is_retention & (budgets > 0)).to(logits.device)
        retention_rows = (is_retention & (budgets > 0)).to(logits.device)
        loss = logits.sum() * 0.0
        if bool(audio_rows.any()):
            shifted = logits[audio_rows][:, :-1]
            loss = loss + F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[audio_rows][:, 1:].reshape(-1),
                                          ignore_index=-100)
        if bool(retention_rows.any()):
            loss = loss + distillation_kl(logits[retention_rows], teacher[retention_rows], labels[retention_rows],
                                          self.profile.retention.temperature)
        return loss

    def _step(self, step: int) -> dict[str, float]:
        if self.cfg.estimator == "all_budgets" and self.adapter_optimizer is None:
            record = self._step_all_budgets(step)
        else:
            record = self._step_sampled(step)
        # The retention constraint: a running mean of the distractor rows' accuracy against the base's.
        self.retention_running = 0.9 * self.retention_running + 0.1 * record["retention_score"]
        shortfall = (self.base_retention_accuracy - self.profile.evaluation.tolerance) - self.retention_running
        self.multiplier = max(0.0, self.multiplier + self.cfg.lagrange_lr * shortfall)
        record["multiplier"] = self.multiplier
        return record

    def _step_batch(self, step: int):
        """The step's global batch (from the (seed, step) generator, which is returned to draw on),
        this rank's slice of it, the slice's policy inputs and the whole batch's."""
        rng = np.random.default_rng([self.seed, step])
        chosen, is_retention = self._draw(rng, self.cfg.batch_size * self.dist.world,
                                          np.random.default_rng([self.seed, step, 1]))
        mine = self.dist.rows(len(chosen))
        local = pool_policy_inputs(self.model, self.batcher, self.train_pool, chosen[mine])
        return rng, chosen, is_retention, mine, local, self._gather_inputs(local)

    def _step_all_budgets(self, step: int) -> dict[str, float]:
        """The exact policy gradient over the budget set: sum_a grad pi(a|s) (R(s, a) - V(s)).

        Every row is answered at every budget (budget-0 rows are the base's own forward), so the
        gradient does not depend on sampling: a budget that pays is seen paying for every state.
        """
        cfg = self.cfg
        _, chosen, is_retention, mine, local, inputs = self._step_batch(step)
        budgets = self.policy.token_budgets
        scores = torch.stack([
            torch.cat(self.dist.gather(self._scores(chosen[mine], [int(b) if has else 0 for has in local.has_clip])))
            for b in budgets.tolist()], dim=1)  # (B, n_budgets)
        cost = torch.tensor([[self.cost_model.relative(int(b), int(n), float(sec)) if has else 0.0
                              for b in budgets.tolist()]
                             for n, sec, has in zip(inputs.text_length, inputs.clip_seconds, inputs.has_clip)])
        reward = scores - cfg.alpha * cost + self.multiplier * is_retention.float()[:, None] * scores
        logits, values = self.policy(self.normalizer(inputs.features))
        unavailable = ~inputs.has_clip[:, None] & (budgets > 0)[None, :]
        logits = logits.masked_fill(unavailable, torch.finfo(logits.dtype).min)
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        expected = (probs.detach() * reward).sum(1)  # the value's target: this policy's mean reward
        policy_loss = -(probs * (reward - values.detach()[:, None])).sum(1).mean()
        value_loss = F.mse_loss(values, expected)
        entropy = -(probs * log_probs.masked_fill(unavailable, 0.0)).sum(1).mean()
        loss = policy_loss + cfg.value_weight * value_loss - cfg.entropy_weight * entropy
        p = probs.detach()
        usage = p[:, budgets > 0].sum(1)
        score = (p * scores).sum(1)
        record = {"reward": float(expected.mean()), "score": float(score.mean()),
                  "audio_score": float(score[~is_retention].mean()),
                  "retention_score": float(score[is_retention].mean()),
                  "audio_usage": float(usage.mean()),
                  "usage_on_audio_questions": float(usage[~is_retention].mean()),
                  "usage_on_distractors": float(usage[is_retention].mean()),
                  "mean_budget": float((p * budgets.float()).sum(1).mean()),
                  "relative_compute": float((p * cost).sum(1).mean()),
                  "entropy": float(entropy.detach()), "value_loss": float(value_loss.detach())}
        self.optimizer.zero_grad(set_to_none=True)
        finite = math.isfinite(float(loss.detach()))
        if finite:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), 1.0)
            self.optimizer.step()
        record["skipped"] = 0.0 if finite else 1.0
        return record

    def _step_sampled(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        rng, chosen, is_retention, mine, local, inputs = self._step_batch(step)
        states = self.normalizer(inputs.features)
        with torch.no_grad():
            logits, _ = self.policy(states)
            logits = logits.masked_fill(~inputs.has_clip[:, None] & (self.policy.token_budgets > 0)[None, :],
                                        torch.finfo(logits.dtype).min)
            sampler = torch.Generator().manual_seed(int(rng.integers(2**62)))
            sampled = torch.multinomial(logits.softmax(-1), 1, generator=sampler).squeeze(1)
        actions = self.policy.get_actions(states, actions=sampled, has_audio=inputs.has_clip)
        budgets = actions.budgets

        batch = training_batch(self.batcher, self.train_pool, chosen[mine], budgets[mine].tolist())
        labels = batch.pop("labels")
        teacher = None
        if self.adapter_optimizer is not None:
            with torch.no_grad():
                teacher = self.model.base(**{k: v for k, v in batch.items()
                                             if k not in AUDIO_INPUTS + ("token_budget",)}).logits
            output = self.model(**batch)
        else:
            with torch.no_grad():
                output = self.model(**batch)
        score = torch.cat(self.dist.gather(row_exact_match(output.logits.detach(), labels).float().cpu()))
        cost = torch.tensor([self.cost_model.relative(int(k), int(n), float(s)) if has else 0.0
                             for k, n, s, has in zip(budgets, inputs.text_length, inputs.clip_seconds,
                                                     inputs.has_clip)])
        reward = score - cfg.alpha * cost + self.multiplier * is_retention.float() * score
        advantage = reward - actions.values.detach()
        if cfg.normalize_advantages and advantage.numel() > 1:
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-6)
        policy_loss = -(advantage * actions.log_probs).mean()
        value_loss = F.mse_loss(actions.values, reward)
        entropy = actions.entropy.mean()
        loss = policy_loss + cfg.value_weight * value_loss - cfg.entropy_weight * entropy
        record = {"reward": float(reward.mean()), "score": float(score.mean()),
                  "audio_score": float(score[~is_retention].mean()),
                  "retention_score": float(score[is_retention].mean()),
                  "audio_usage": float((budgets > 0).float().mean()),
                  "usage_on_audio_questions": float((budgets[~is_retention] > 0).float().mean()),
                  "usage_on_distractors": float((budgets[is_retention] > 0).float().mean()),
                  "mean_budget": float(budgets.float().mean()), "relative_compute": float(cost.mean()),
                  "entropy": float(entropy.detach()), "value_loss": float(value_loss.detach())}

        self.optimizer.zero_grad(set_to_none=True)
        finite = math.isfinite(float(loss.detach()))
        if self.adapter_optimizer is not None:
            adapter_loss = self._adapter_loss(output.logits, labels, teacher, budgets[mine], is_retention[mine])
            record["adapter_loss"] = float(adapter_loss.detach())
            self.adapter_optimizer.zero_grad(set_to_none=True)
            finite = finite and math.isfinite(record["adapter_loss"])
            finite = not self.dist.any(not finite)
            if finite:
                adapter_loss.backward()
                self.dist.average_gradients(self.adapters.values())
                torch.nn.utils.clip_grad_norm_(list(self.adapters.values()), 1.0)
        if finite:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), 1.0)
            self.optimizer.step()
            if self.adapter_optimizer is not None:
                self.adapter_optimizer.step()
        record["skipped"] = 0.0 if finite else 1.0
        return record

    # ------------------------------------------------------------------ the run

    def evaluate(self) -> tuple[list[TaskResult], dict[str, Any], list[dict[str, Any]]]:
        """Every test example at every budget; the policy's choices read from those answers."""
        eval_cfg = self.profile.evaluation
        answers = answer_at_every_budget(self.model, self.batcher, self.test_pool, self.budgets, self.end_to_end,
                                         eval_cfg.batch_size, eval_cfg.max_examples,
                                         description="evaluate budgets and policy")
        points, _, chosen = compare_strategies(answers, self.policy, self.normalizer)
        return strategy_tasks(answers, chosen), points[-1], points

    def run(self) -> StageBResult:
        self.build()
        directory = self.stage_dir
        main = self.dist.is_main
        if main:
            open_stage_dir(directory, self.profile, self.device, self.base_fingerprint)
        self.dist.barrier()
        start = self.restore() if self.resume else 0
        resumed_from = start if self.resume and start > 0 else None
        metrics_path = directory / layout.METRICS_FILE
        if main and self.resume:
            layout.truncate_metrics(metrics_path, start)
        elif main and metrics_path.exists():
            metrics_path.unlink()
        if start == 0:
            self._references()  # the same examples on every rank: the same references everywhere

        window: list[dict[str, float]] = []
        train_seconds, steps_timed = 0.0, 0
        examples_per_step = self.cfg.batch_size * self.dist.world
        bar = progress_bar("stage B", self.cfg.steps, completed=start) if main else contextlib.nullcontext(
            lambda **fields: None)
        with StopSignals() as interrupt, bar as advance:
            for step in range(start + 1, self.cfg.steps + 1):
                began = time.perf_counter()
                record = self._step(step)
                train_seconds += time.perf_counter() - began
                steps_timed += 1
                window.append(record)
                speed = examples_per_step * steps_timed / max(train_seconds, 1e-9)
                mean = {key: float(np.mean([r[key] for r in window])) for key in record}
                advance(reward=f"{mean['reward']:.3f}", usage=f"{mean['audio_usage']:.2f}",
                        distractor_usage=f"{mean['usage_on_distractors']:.2f}", lam=f"{self.multiplier:.2f}",
                        ex_s=f"{speed:.0f}")
                if main and (step % self.cfg.log_every == 0 or step == self.cfg.steps):
                    layout.append_metrics(metrics_path, {"step": step, **mean, "examples_per_second": speed})
                    window = []
                if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps:
                    self.save(step)
                if self.dist.any(interrupt.received is not None):  # every rank stops after the same step
                    self.save(step)
                    raise RunFailed(f"stopped by {interrupt.received or 'a signal to another rank'} after step "
                                    f"{step}; checkpoint saved in {directory}; continue with --resume")
        speed = examples_per_step * steps_timed / train_seconds if train_seconds else float("nan")
        if not main:  # rank 0 writes the policy and evaluates
            return StageBResult(directory, self.variant_name, self.seed, self.cfg.steps, resumed_from, train_seconds,
                                speed, peak_memory_mb(self.device), self.base_fingerprint, True, self.multiplier)
        save_weights(directory / POLICY_WEIGHTS, {k: v for k, v in self.weights().items() if not k.startswith("model.")},
                     metadata={"state": STATE_VERSION})
        if self.adapters:
            save_weights(directory / layout.FINAL_WEIGHTS, self.adapters)

        tasks, efficiency, strategies = self.evaluate()
        unchanged = self.model.base_fingerprint() == self.base_fingerprint
        result = StageBResult(
            stage_dir=directory, variant=self.variant_name, seed=self.seed, steps=self.cfg.steps,
            resumed_from=resumed_from, train_seconds=train_seconds,
            examples_per_second=speed,
            peak_memory_mb=peak_memory_mb(self.device), base_fingerprint=self.base_fingerprint,
            base_unchanged=unchanged, retention_multiplier=self.multiplier, tasks=tasks, efficiency=efficiency,
            strategies=strategies,
        )
        write_json(directory / layout.SUMMARY_FILE, result.summary())
        write_json(directory / layout.EVAL_EXAMPLES_FILE, [t.to_dict() for t in tasks])
        if not unchanged:
            raise RunFailed(f"the base's fingerprint changed during Stage B ({self.base_fingerprint} -> "
                            f"{self.model.base_fingerprint()}): a frozen weight was modified")
        return result


def train_stage_b(profile: Profile, **kwargs: Any) -> StageBResult:
    return StageBTrainer(profile, **kwargs).run()
