"""Stage C, deployment: distil the Stage B policy into a light gate and calibrate its threshold.

The recipe, top to bottom:

1. Load the run's model (Stage A's weights, or Stage B's when it tuned the adapters) and the
   Stage B policy.
2. Distillation data: ``train_examples`` training questions with a clip, half needing audio.
   The target of each is the policy's probability of giving audio at all (1 - P(budget 0));
   the gate's "on" budget is the positive budget the policy puts the most probability on.
3. Train the gate (an MLP of ``hidden_size`` over the policy's standardised state) with binary
   cross-entropy against those soft targets.
4. Calibrate on validation examples: fresh pairings of the training split (a different seed;
   never the test split), answered at every budget. ``target: accuracy`` picks the highest
   threshold (the least audio) whose accuracy keeps ``target_value`` of the policy's;
   ``target: audio_usage`` the threshold whose usage rate is closest to ``target_value``.
5. Export the gate (``rl/gate.py``: gate.safetensors + gate.json) into the stage folder and
   evaluate every strategy on the test split, as Stage B does.
"""

from __future__ import annotations

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
from ..evaluation.runs import load_trained_model, locate
from ..evaluation.strategies import (answer_at_every_budget, compare_strategies, policy_budgets, strategy_point,
                                     strategy_tasks)
from ..evaluation.tasks import TaskResult
from ..models.builder import resolve_device
from ..progress import progress_bar
from ..rl.cost import AudioCostModel, EndToEndCost
from ..rl.gate import AudioGate
from ..rl.state import PolicyInputs, pool_policy_inputs, state_dim
from . import run_dir as layout
from .lifecycle import open_stage_dir, peak_memory_mb
from ..config.variants import resolve_variant
from .stage_b import POLICY_WEIGHTS, check_same_model, load_policy, stage_a_weights_dir


@dataclass
class StageCResult:
    stage_dir: Path
    variant: str
    seed: int
    gate: dict[str, Any]
    calibration: dict[str, Any]
    seconds: float
    peak_memory_mb: float
    base_fingerprint: str
    tasks: list[TaskResult] = field(default_factory=list)
    efficiency: dict[str, Any] = field(default_factory=dict)
    strategies: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "c", "variant": self.variant, "seed": self.seed, "gate": self.gate,
            "calibration": self.calibration, "seconds": self.seconds, "peak_memory_mb": self.peak_memory_mb,
            "base_fingerprint": self.base_fingerprint, "tasks": [t.summary() for t in self.tasks],
            "efficiency": self.efficiency, "strategies": self.strategies,
        }


def mixed_examples(pool, count: int, audio_fraction: float, rng: np.random.Generator) -> list:
    """``count`` examples with a clip: ``audio_fraction`` of them questions that need it; VL/text
    records without a clip get one from the pool's audio (their own stream: ``rng`` is not touched
    again), and records whose files do not decode are left out."""
    needs = pool.examples.of_kinds(("audio", "av"))
    distractors = pool.examples.of_kinds(("vl", "text"))  # each given a clip when it has none
    n_audio = round(count * audio_fraction)
    chosen = ([needs[int(i)] for i in rng.choice(len(needs), size=min(n_audio, len(needs)), replace=False)]
              + [distractors[int(i)] for i in rng.choice(len(distractors), size=min(count - n_audio, len(distractors)),
                                                         replace=False)])
    chosen = with_distractors(chosen, pool.distractors, np.random.default_rng([count, 5]))
    kept, _ = pool.usable(chosen)
    return kept


def choose_threshold(candidates: list[dict[str, Any]], policy_point: dict[str, Any], target: str,
                     target_value: float) -> tuple[dict[str, Any], bool]:
    """The calibrated point among the gate's (threshold, usage, accuracy) candidates; and whether
    the target was met (else the most accurate candidate, so the gate never silently gets worse)."""
    if target == "audio_usage":
        best = min(candidates, key=lambda c: (abs(c["audio_usage_rate"] - target_value), -c["threshold"]))
        return best, abs(best["audio_usage_rate"] - target_value) <= 0.05
    floor = target_value * policy_point["accuracy"]
    meeting = [c for c in candidates if c["accuracy"] >= floor - 1e-12]
    if meeting:
        return min(meeting, key=lambda c: (c["audio_usage_rate"], -c["threshold"])), True
    return max(candidates, key=lambda c: (c["accuracy"], -c["audio_usage_rate"])), False


class StageCDistiller:
    def __init__(self, profile: Profile, variant: Optional[str] = None, seed: Optional[int] = None,
                 run_dir: Optional[Union[str, Path]] = None, device: Optional[str] = None):
        self.profile = profile
        self.cfg = profile.training.stage_c
        self.variant_name, _ = resolve_variant(profile, variant)
        self.seed = profile.seed if seed is None else seed
        self.device = resolve_device(device or profile.training.device)
        root = layout.run_root(profile.runs_dir, profile.name, self.variant_name, self.seed,
                               str(run_dir) if run_dir else None)
        self.stage_a_dir = stage_a_weights_dir(root)
        check_same_model(self.stage_a_dir, profile)
        self.stage_b_dir = layout.stage_dir(root, "b")
        if not (self.stage_b_dir / POLICY_WEIGHTS).is_file():
            raise SafeError(f"--run-dir: {self.stage_b_dir} has no finished Stage B ({POLICY_WEIGHTS} missing); "
                            f"run `safe train --stage b` for this variant and seed first")
        self.stage_dir = layout.stage_dir(root, "c")
        # No checkpoints (it takes a minute): a rerun, e.g. with another calibration target, replaces the gate.
        self.stage_dir.mkdir(parents=True, exist_ok=True)

    def build(self) -> None:
        profile = self.profile
        trained = locate(self.stage_b_dir)  # Stage B's tuned adapters if it wrote them, else Stage A's
        self.model = load_trained_model(trained, profile, self.device)
        self.batcher = PromptBatcher.for_evaluation(self.model.base, profile.evaluation)
        self.base_fingerprint = self.model.base_fingerprint()
        self.rate = self.model.audio_encoder.sample_rate
        self.budgets = list(profile.policy.token_budgets)
        self.cost = EndToEndCost.for_model(self.model, AudioCostModel.for_model(self.model, max(self.budgets)))
        self.state_dim = state_dim(self.model.base.hidden_size)
        self.policy, self.normalizer = load_policy(self.stage_b_dir / POLICY_WEIGHTS, self.state_dim, profile)

    def _inputs(self, pool, examples, description: str) -> PolicyInputs:
        size = self.profile.evaluation.batch_size
        parts = []
        with progress_bar(description, -(-len(examples) // size)) as advance:
            for i in range(0, len(examples), size):
                parts.append(pool_policy_inputs(self.model, self.batcher, pool, examples[i: i + size]))
                advance()
        return PolicyInputs.concat(parts)

    def distill(self) -> AudioGate:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, 3])
        train, self.validation_records = training_and_validation(self.profile)
        pool = make_pool(self.profile, train, self.rate, encoder=self.model.audio_encoder)
        examples = mixed_examples(pool, cfg.train_examples, self.profile.training.stage_b.audio_fraction, rng)
        inputs = self._inputs(pool, examples, "policy states")
        with torch.no_grad():
            logits, _ = self.policy(self.normalizer(inputs.features))
            probs = logits.softmax(-1)
        positive = self.policy.token_budgets > 0
        target = probs[:, positive].sum(1)  # P(audio at any budget)
        preferred = probs[inputs.has_clip][:, positive].sum(0)
        budget_on = int(self.policy.token_budgets[positive][int(preferred.argmax())])

        torch.manual_seed(self.seed)
        gate = AudioGate(self.state_dim, cfg.hidden_size, budget_on, self.budgets)
        gate.normalizer.load_state_dict(self.normalizer.state_dict())
        optimizer = torch.optim.Adam(gate.net.parameters(), lr=cfg.lr)
        with progress_bar("distil gate", cfg.steps) as advance:
            for _ in range(cfg.steps):
                rows = torch.from_numpy(rng.integers(len(inputs), size=min(cfg.batch_size, len(inputs))))
                loss = F.binary_cross_entropy_with_logits(gate.logits(inputs.features[rows]), target[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                advance(bce=f"{float(loss.detach()):.3f}")
        self.distill_agreement = float(((gate.probability(inputs.features) >= 0.5) == (target >= 0.5)).float().mean())
        return gate.eval()

    def calibrate(self, gate: AudioGate) -> dict[str, Any]:
        cfg = self.cfg
        # The validation records (data.validation_manifests, or a slice held out of the training
        # records; AV-digits: fresh pairings made with seed + 1), never the evaluation records.
        pool = make_pool(self.profile, self.validation_records, self.rate, encoder=self.model.audio_encoder)
        examples = mixed_examples(pool, cfg.validation_examples, self.profile.training.stage_b.audio_fraction,
                                  np.random.default_rng([self.seed, 4]))
        view = pool.view(examples)
        answers = answer_at_every_budget(self.model, self.batcher, view, self.budgets, self.cost,
                                         self.profile.evaluation.batch_size, description="calibrate on validation")
        policy_point = strategy_point(answers, "policy", policy_budgets(self.policy, self.normalizer, answers.inputs),
                                      decider=self.policy)
        probabilities = gate.probability(answers.inputs.features).numpy()
        thresholds = sorted(set(float(p) for p in probabilities[answers.has_clip])) + [1.0 + 1e-6]
        candidates = [strategy_point(answers, "gate", gate.decide(answers.inputs.features, answers.inputs.has_clip,
                                                                  t).numpy(), decider=gate.net, threshold=t) for t in thresholds]
        chosen, met = choose_threshold(candidates, policy_point, cfg.target, cfg.target_value)
        gate.threshold = float(chosen["threshold"])
        step = max(1, len(candidates) // 50)
        return {"target": cfg.target, "target_value": cfg.target_value, "target_met": met,
                "validation_examples": len(examples), "policy": policy_point, "gate": chosen,
                "distill_agreement": self.distill_agreement,
                "curve": [{k: c[k] for k in ("threshold", "accuracy", "audio_usage_rate", "relative_audio_compute",
                                             "relative_end_to_end_compute")}
                          for c in candidates[::step]]}

    def run(self) -> StageCResult:
        began = time.perf_counter()
        self.build()
        open_stage_dir(self.stage_dir, self.profile, self.device, self.base_fingerprint)
        gate = self.distill()
        calibration = self.calibrate(gate)
        gate.metadata = {"base_fingerprint": self.base_fingerprint, "profile": self.profile.name,
                         "variant": self.variant_name, "seed": self.seed,
                         "calibration": {k: v for k, v in calibration.items() if k != "curve"}}
        gate.save(self.stage_dir)

        eval_cfg = self.profile.evaluation
        test_pool = make_pool(self.profile, evaluation_records(records_of(self.profile, "test"), self.profile.seed),
                              self.rate, encoder=self.model.audio_encoder)
        answers = answer_at_every_budget(self.model, self.batcher, test_pool, self.budgets, self.cost,
                                         eval_cfg.batch_size, eval_cfg.max_examples, description="evaluate strategies")
        points, _, chosen = compare_strategies(answers, self.policy, self.normalizer, gate)
        result = StageCResult(
            stage_dir=self.stage_dir, variant=self.variant_name, seed=self.seed,
            gate={k: v for k, v in gate.config().items() if k != "calibration"}, calibration=calibration,
            seconds=time.perf_counter() - began, peak_memory_mb=peak_memory_mb(self.device),
            base_fingerprint=self.base_fingerprint, tasks=strategy_tasks(answers, chosen), efficiency=points[-1],
            strategies=points,
        )
        write_json(self.stage_dir / layout.SUMMARY_FILE, result.summary())
        write_json(self.stage_dir / layout.EVAL_EXAMPLES_FILE, [t.to_dict() for t in result.tasks])
        if self.model.base_fingerprint() != self.base_fingerprint:
            raise RunFailed("the base's fingerprint changed during Stage C: a frozen weight was modified")
        return result


def distill_policy(profile: Profile, **kwargs: Any) -> StageCResult:
    return StageCDistiller(profile, **kwargs).run()
