"""Stage A, alignment: teach the projector and fusion adapters to hear, keep the base unharmed.

The recipe, top to bottom:

1. Load the frozen base and audio encoder (the built-in tiny ones come pretrained from the
   cache), build projector + fusion for the run's seed, fingerprint the base.
2. Records: the profile's training manifests (AV-digits is exported to manifests too), checked
   whole before anything trains. Alignment rows are the audio and AV records; every row gets
   a random positive token budget, so the first k projector tokens are useful for every k.
3. Retention rows: the VL and text records, each with a distractor clip (its own, or one drawn
   from the training audio per step). Each step (every ``retention_every`` steps) adds the
   variant's retention terms on one such batch: KL to the base without audio on the answer
   positions, the Fisher penalty; null-space projection constrains the update itself.
4. AdamW with separate learning rates for projector and adapters, warm-up then cosine decay,
   gradient clipping; a non-finite loss or gradient skips the step (counted, never applied).
5. A checkpoint every ``checkpoint_every`` steps and at the end. Each step's batch is drawn
   from a generator seeded by (seed, step) and prepared ahead in DataLoader workers
   (step_data.py), so "data position" is the step number and a resumed run sees exactly the
   batches the uninterrupted one would have. A record whose file fails to decode is skipped
   and counted (``bad_records`` in metrics.jsonl); past ``data.max_bad_fraction`` the run
   stops with a checkpoint.
6. At the end: base vs SAFE score per task on the evaluation records, with and without a
   distractor clip, and the base fingerprint checked again.

Under torchrun every rank draws the step's global batch (``batch_size`` x world) and trains on
its own slice; losses are normalised by the global answer-token count and gradients averaged
over ranks, so the update is the single-process update on the global batch (distributed.py).
Rank 0 writes and evaluates.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_json
from ..config.schema import Profile
from ..config.variants import resolve_variant
from ..data.batches import PromptBatcher
from ..data.dataset import with_distractors
from ..data.sources import AVDIGITS_SOURCES, evaluation_records, make_pool, records_of, training_and_validation
from ..errors import RunFailed, SafeError
from ..evaluation.tasks import TaskResult, audio_accuracy_by_budget, audio_task, evaluate
from ..features.memo import memo_for
from ..foundation.prepare import FoundationPretraining, load_prepared_models
from ..models.builder import apply_precision, build_trainable, resolve_device
from ..models.safe_model import SAFEModel
from ..progress import progress_bar
from . import run_dir as layout
from .batches import answer_positions, rows_exact, sampling_weights, training_batch
from .step_data import StepBatches, StepPlan, drop, step_loader, to_device
from .checkpoint import check_fingerprint, latest_checkpoint, load_weights_into, prune_checkpoints, save_checkpoint
from .distributed import from_environment, rank_device
from .lifecycle import StopSignals, open_stage_dir, peak_memory_mb, prepare_stage_dir, save_weights
from .retention import FisherPenalty, NullSpaceProjector, distillation_kl_at, protected_linears
from .schedule import warmup_cosine
from .teacher_cache import KEYS as TEACHER_KEYS
from .teacher_cache import TeacherCache

ALIGNMENT_KINDS = ("audio", "av")
AUDIO_INPUTS = ("audio", "audio_features", "audio_frame_mask")
RETENTION_KINDS = ("vl", "text")


@dataclass
class StageAResult:
    stage_dir: Path
    variant: str
    seed: int
    steps: int
    resumed_from: Optional[int]
    skipped_steps: int
    train_seconds: float
    examples_per_second: float
    peak_memory_mb: float
    base_fingerprint: str
    base_unchanged: bool
    tasks: list[TaskResult] = field(default_factory=list)
    audio_digit_by_budget: dict[int, float] = field(default_factory=dict)  # the audio task's score by budget
    audio_task: Optional[str] = None  # which task that is (audio/digit on AV-digits)

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "a", "variant": self.variant, "seed": self.seed, "steps": self.steps,
            "resumed_from": self.resumed_from, "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds, "examples_per_second": self.examples_per_second,
            "peak_memory_mb": self.peak_memory_mb, "base_fingerprint": self.base_fingerprint,
            "base_unchanged": self.base_unchanged, "tasks": [t.summary() for t in self.tasks],
            "audio_digit_by_budget": {str(k): v for k, v in self.audio_digit_by_budget.items()},
            "audio_task": self.audio_task,
        }


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Cross-entropy summed over the answer tokens, divided by ``normalizer``.

    ``logits`` (B, P, V) are the base's at ``answer_positions`` only (``logits_to_keep``), so the
    float32 upcast is of P positions, not of every position's full-vocabulary logits. The step
    passes its global answer-token count over the world size: summed over micro-batches and
    averaged over ranks, the gradient is the step's token mean on its global batch.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum") / max(normalizer, 1e-9)


# Keys of a prepared batch that are not the model's inputs.
BATCH_EXTRAS = ("rows", "labels", "answer_index", "answer_targets", "answer_tokens", TEACHER_KEYS)
# Every training forward: no KV cache (transformers builds one by default and concatenates into
# it at every layer; training never decodes from it).
TRAINING_FORWARD = {"use_cache": False}


@dataclass
class StepLosses:
    """The device work of one Stage A step: forwards and backwards, no host sync.

    ``backward`` accumulates the gradients of the step's micro-batches and retention batches
    and returns per-rank sums as 0-d tensors (the trainer reads them back in one transfer).
    Nothing here reads a tensor on the host, so it also runs on the meta device
    (``bench/stage_a_step.py`` counts its FLOPs at LLaVA-7B's width that way).
    """

    model: SAFEModel
    device: torch.device
    kl_weight: float
    temperature: float
    null_space: Optional[NullSpaceProjector] = None
    teacher_cache: Optional[TeacherCache] = None  # None: the teacher runs on every retention batch

    def backward(self, micro: list[dict], retention: list[dict], alignment_normalizer: float,
                 retention_normalizer: float) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=self.device)
        sums = {"audio_loss": zero.clone(), "correct": zero.clone(), "scored": zero.clone()}
        # One backward per micro-batch: its graph (the base's activations after the first fused
        # layer) is freed before the next forward, so grad_accum saves memory.
        for batch in micro:
            batch = to_device(batch, self.device)
            targets = batch["answer_targets"]
            logits = self.model(**drop(batch, BATCH_EXTRAS), **TRAINING_FORWARD,
                                logits_to_keep=batch["answer_index"]).logits
            loss = answer_loss(logits, targets, alignment_normalizer)
            loss.backward()
            sums["audio_loss"] += loss.detach()
            sums["correct"] += rows_exact(logits.detach(), targets).sum()
            sums["scored"] += (targets != -100).any(1).sum()
            del logits, loss
        for batch in retention:
            kl = self.retention_kl(batch, retention_normalizer)
            if kl is not None:
                (self.kl_weight * kl).backward()
                sums["kl"] = sums.get("kl", zero) + kl.detach()
        return sums

    def retention_kl(self, batch: dict, normalizer: float) -> Optional[torch.Tensor]:
        """KL to the base on one retention batch (None without a KL term); the student's forward
        shows the null space its protected inputs."""
        counts = (batch["answer_targets"] != -100).sum(1).tolist()  # on the host, before the copy
        batch = to_device(batch, self.device)
        rows, index, targets = batch["rows"], batch["answer_index"], batch["answer_targets"]
        inputs = drop(batch, BATCH_EXTRAS + AUDIO_INPUTS + ("token_budget",))
        audio = {key: batch[key] for key in AUDIO_INPUTS if key in batch}
        teacher = None
        if self.kl_weight > 0 and self.teacher_cache is not None and TEACHER_KEYS in batch:
            teacher = self.teacher_cache.logits(self.model.base, inputs, index, counts, batch[TEACHER_KEYS],
                                                TRAINING_FORWARD)
        elif self.kl_weight > 0:
            with torch.no_grad():  # the base itself: same tokens, no audio
                teacher = self.model.base(**inputs, **TRAINING_FORWARD, logits_to_keep=index).logits
        collect = (self.null_space.collecting(rows, inputs["attention_mask"]) if self.null_space is not None
                   else contextlib.nullcontext())
        # Without a KL term the student's forward only shows the null space its inputs: no graph.
        with collect, (contextlib.nullcontext() if teacher is not None else torch.no_grad()):
            student = self.model(**inputs, token_budget=batch["token_budget"], **audio, **TRAINING_FORWARD,
                                 logits_to_keep=index).logits
        if teacher is None:
            return None
        return distillation_kl_at(student, teacher, targets, self.temperature, normalizer)


# --------------------------------------------------------------------------- the recipe


class StageATrainer:
    """Holds one Stage A run's state; ``run()`` trains, checkpoints and evaluates."""

    def __init__(self, profile: Profile, variant: Optional[str] = None, seed: Optional[int] = None,
                 run_dir: Optional[Union[str, Path]] = None, resume: bool = False,
                 device: Optional[str] = None):
        self.profile = profile
        self.cfg = profile.training.stage_a
        self.variant_name, self.variant = resolve_variant(profile, variant)
        self.seed = profile.seed if seed is None else seed
        self.dist = from_environment(device or profile.training.device)
        self.device = rank_device(self.dist, resolve_device(device or profile.training.device))
        root = layout.run_root(profile.runs_dir, profile.name, self.variant_name, self.seed,
                               str(run_dir) if run_dir else None)
        self.stage_dir = layout.stage_dir(root, "a")
        self.resume = resume
        prepare_stage_dir(self.stage_dir, profile, resume)

    # ------------------------------------------------------------------ building

    def build(self) -> None:
        profile = self.profile
        # The data first: a broken manifest is reported before any model is loaded or built. An
        # AV-digits source is ours, exported to manifests (10 s on the demo's first run), so there
        # a built-in tiny Whisper that must be pretrained starts first, in a child process beside
        # the export (an error meanwhile stops it); a user's manifests are read and checked first.
        ours = profile.data.source in AVDIGITS_SOURCES
        with FoundationPretraining(profile) if ours else contextlib.nullcontext():
            train_records, _ = training_and_validation(profile)
            self.alignment_records = train_records.of_kinds(ALIGNMENT_KINDS)
            self.retention_records = train_records.of_kinds(RETENTION_KINDS)
            self.train_size = len(train_records)
            check_training_records(train_records, self.alignment_records, self.retention_records, self.variant,
                                   self.variant_name)
            test_records = records_of(profile, "test")
        base, encoder = load_prepared_models(profile, self.device)  # built above when missing
        projector, fusion = build_trainable(profile, base, encoder.feature_dim, self.seed)
        self.model = apply_precision(SAFEModel(base, projector, fusion, encoder).to(self.device), profile)
        self.batcher = PromptBatcher.for_evaluation(base, profile.evaluation)
        self.base_fingerprint = self.dist.from_main(self.model.base_fingerprint)  # one rank hashes the base
        self.positive_budgets = [b for b in profile.policy.token_budgets if b > 0]
        self.max_budget = max(self.positive_budgets)
        if self.max_budget > profile.projector.num_tokens:
            raise SafeError(f"policy.token_budgets: {self.max_budget} exceeds projector.num_tokens "
                            f"({profile.projector.num_tokens})")

        rate = encoder.sample_rate
        # Two views of one split: they share its media cache, cached features and distractor clips.
        train = make_pool(profile, train_records, rate, encoder=encoder)
        self.alignment = train.view(self.alignment_records)
        self.retention_pool = train.view(self.retention_records)
        self.test_pool = make_pool(profile, evaluation_records(test_records, profile.seed, train.distractors), rate,
                                   encoder=encoder)
        if not profile.data.audio_features:  # features from a cache never reach the encoder
            clips = {r.audio for r in list(train_records) + list(test_records) if r.audio}
            self.model.feature_memo = memo_for(encoder, len(clips), profile.audio_encoder.memory_cache_mb * 2**20)

        trainable = dict(self.model.trainable_named_parameters())
        self.trainable = trainable
        projector_params = [p for n, p in trainable.items() if n.startswith("projector.")]
        adapter_params = [p for n, p in trainable.items() if not n.startswith("projector.")]
        self.optimizer = torch.optim.AdamW(
            [{"params": projector_params, "lr": self.cfg.lr_projector, "name": "projector"},
             {"params": adapter_params, "lr": self.cfg.lr_adapter, "name": "adapter"}],
            weight_decay=self.cfg.weight_decay,
        )
        self.scheduler = warmup_cosine(self.optimizer, self.cfg.warmup_steps, self.cfg.steps)

        variant = self.variant
        weight = variant.retention_loss_weight
        self.kl_weight = weight * variant.distillation_weight
        self.fisher_weight = weight * variant.fisher_weight
        self.fisher = FisherPenalty(trainable.items()) if self.fisher_weight > 0 else None
        self.null_space = None
        if variant.enable_null_space:
            self.null_space = NullSpaceProjector(
                protected_linears(self.model.fusion), variant.null_space_rank,
                variant.null_space_min_samples, variant.null_space_refresh_interval,
                reduce=self.dist.sum_tensor if self.dist.enabled else None,
                gather=self.dist.gather_to_main if self.dist.enabled else None, world_rank=self.dist.rank,
            )
        self.uses_retention_batches = self.kl_weight > 0 or self.null_space is not None
        # The teacher's logits are cached per row on the main process's disk: every rank reads
        # and writes its own rows there (a multi-node run shares the cache only on a shared disk).
        teacher_cache = TeacherCache(self.base_fingerprint) if self.cfg.cache_teacher and self.kl_weight > 0 else None
        self.losses = StepLosses(self.model, self.device, self.kl_weight, profile.retention.temperature,
                                 self.null_space, teacher_cache)

    # ------------------------------------------------------------------ state

    def state_dict(self, step: int, skipped: int) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": step, "skipped_steps": skipped,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.fisher is not None:
            state["fisher"] = self.fisher.state_dict()
        if self.null_space is not None:
            state["null_space"] = self.null_space.state_dict()  # a collective call under torchrun
        return state

    def save(self, step: int, skipped: int) -> Optional[Path]:
        """Every rank takes part (the null space's sums are collective); rank 0 writes."""
        state = self.state_dict(step, skipped)
        path = None
        if self.dist.is_main:
            weights = {name: p.detach() for name, p in self.trainable.items()}
            meta = {"base_fingerprint": self.base_fingerprint, "variant": self.variant_name, "seed": self.seed,
                    "profile": self.profile.name, "stage": "a", "world_size": self.dist.world}
            path = save_checkpoint(self.stage_dir, step, weights, state, meta)
            prune_checkpoints(self.stage_dir, self.cfg.keep_last)
        self.dist.barrier()
        return path

    def restore(self) -> tuple[int, int]:
        """Load the latest checkpoint (if any); returns (step, skipped steps)."""
        checkpoint = latest_checkpoint(self.stage_dir)
        if checkpoint is None:
            return 0, 0
        check_fingerprint(checkpoint, self.base_fingerprint)
        load_weights_into(self.trainable, checkpoint.weights(self.device), checkpoint.path)
        state = checkpoint.state()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.fisher is not None and "fisher" in state:
            self.fisher.load_state_dict(state["fisher"])
        if self.null_space is not None and "null_space" in state:
            self.null_space.load_state_dict(state["null_space"], world=self.dist.world)
        return int(state["step"]), int(state["skipped_steps"])

    # ------------------------------------------------------------------ one step

    def step_batches(self) -> StepBatches:
        cfg, weights = self.cfg, self.profile.data.task_weights
        plan = StepPlan(self.seed, cfg.batch_size, self.dist.world, self.dist.rank, cfg.grad_accum,
                        cfg.retention_every, self.uses_retention_batches, tuple(self.positive_budgets),
                        cfg.group_by_modality_length)
        return StepBatches(self.batcher, self.alignment, self.retention_pool if len(self.retention_pool) else None,
                           plan, sampling_weights(self.alignment_records, weights),
                           sampling_weights(self.retention_records, weights),
                           teacher_keys=self.losses.teacher_cache is not None)

    def _estimate_fisher(self) -> int:
        """EWC's Fisher on retention examples, at the starting point (which equals the base)."""
        rng = np.random.default_rng([self.seed, 2**31 - 1])  # its own stream: never shifts the batches
        picks = rng.integers(len(self.retention_pool), size=self.profile.retention.fisher_samples)

        def example_loss(index: int):
            def loss():
                chosen = with_distractors([self.retention_pool.examples[index]], self.retention_pool.distractors,
                                          np.random.default_rng([self.seed, 2**31 - 1, index]))
                batch = training_batch(self.batcher, self.retention_pool, chosen, [self.max_budget])
                positions, targets = answer_positions(batch.pop("labels"))
                logits = self.model(**to_device(batch, self.device), **TRAINING_FORWARD,
                                    logits_to_keep=positions.to(self.device)).logits
                targets = targets.to(self.device)
                return answer_loss(logits, targets, float((targets != -100).sum()))  # the token mean

            return loss

        return self.fisher.estimate(example_loss(int(i)) for i in picks)

    def _step(self, step: int, inputs: dict) -> dict[str, float]:
        """One optimizer step: a backward per micro-batch, then the retention batches', then the update.

        Device syncs: one all-reduce of the step's two answer-token counts (host numbers from the
        loader), then one transfer of every metric and the gradient norm together, which decides
        whether the step is applied. Gradients are averaged before the norm, so a non-finite
        value on any rank gives every rank the same non-finite norm and the same decision.
        """
        self.optimizer.zero_grad(set_to_none=True)
        micro = [batch for batch in inputs["micro"] if batch is not None]  # None: every row failed to decode
        retention = [batch for batch in (inputs["retention"] or []) if batch is not None]
        world = self.dist.world
        counts = torch.tensor([sum(b["answer_tokens"] for b in micro), sum(b["answer_tokens"] for b in retention)],
                              dtype=torch.float64)
        alignment_tokens, retention_tokens = (self.dist.sum_tensor(counts) if self.dist.enabled else counts).tolist()
        sums = self.losses.backward(micro, retention, alignment_tokens / world, retention_tokens / world)
        if inputs["retention"] is not None and self.kl_weight > 0:
            # Every rank sends the same metrics, also one whose retention rows all failed to decode.
            sums.setdefault("kl", torch.zeros((), device=self.device))
        if self.fisher is not None:
            penalty = self.fisher.penalty()
            (self.fisher_weight * penalty).backward()
            sums["fisher"] = penalty.detach()

        self.dist.average_gradients(self.trainable.values())
        norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.cfg.grad_clip)
        # Per-rank values, summed over ranks in one all-reduce, read back in one transfer.
        names = list(sums) + ["grad_norm"]
        values = torch.stack([sums[name].float() for name in sums] + [norm.float()])
        if self.dist.enabled:  # the norm is the same on every rank (averaged gradients): summed, / world
            values = self.dist.sum_tensor(values) / self.dist.world
        read = dict(zip(names, values.tolist()))
        mean = {name: read[name] for name in ("audio_loss", "kl", "fisher") if name in read}
        total = mean["audio_loss"] + self.kl_weight * mean.get("kl", 0.0) + self.fisher_weight * mean.get("fisher", 0.0)
        finite = math.isfinite(total) and math.isfinite(read["grad_norm"])
        record = {**mean, "audio_acc": read["correct"] / max(read["scored"], 1e-9), "loss": total,
                  "grad_norm": read["grad_norm"]}
        if finite:
            before = self.null_space.snapshot() if self.null_space is not None else {}
            self.optimizer.step()
            if before:
                self.null_space.project(before)
        else:
            self.optimizer.zero_grad(set_to_none=True)  # never let a NaN/Inf reach the weights
        with warnings.catch_warnings():
            # A skipped first step makes torch warn that the scheduler stepped before the optimizer;
            # that is intended: the schedule follows steps taken, skipped or not.
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if self.null_space is not None and self.null_space.maybe_refresh(step):
            record["null_space_refreshed"] = 1.0
        record["skipped"] = 0.0 if finite else 1.0
        return record

    # ------------------------------------------------------------------ the run

    def run(self) -> StageAResult:
        self.build()
        directory = self.stage_dir
        main = self.dist.is_main
        if main:
            open_stage_dir(directory, self.profile, self.device, self.base_fingerprint)
        self.dist.barrier()

        start, skipped = self.restore() if self.resume else (0, 0)
        resumed_from = start if self.resume and start > 0 else None
        metrics_path = directory / layout.METRICS_FILE
        if main and self.resume:
            layout.truncate_metrics(metrics_path, start)
        elif main and metrics_path.exists():
            metrics_path.unlink()
        if self.fisher is not None and not self.fisher.ready:
            self._estimate_fisher()  # the same examples on every rank: the same estimate everywhere
        self.model.train()

        examples_per_step = self.cfg.batch_size * self.cfg.grad_accum * self.dist.world
        window: list[dict[str, float]] = []
        train_seconds = 0.0
        steps_timed = 0
        bar = progress_bar("stage A", self.cfg.steps, completed=start) if main else contextlib.nullcontext(
            lambda **fields: None)
        workers = self.profile.data.loader_workers
        if workers is None:
            workers = 2 if self.device.type == "cuda" else 0
        loader = step_loader(self.step_batches(), start + 1, self.cfg.steps, workers,
                             pin_memory=self.device.type == "cuda")
        bad_records: dict[str, str] = {}
        with StopSignals() as interrupt, bar as advance:
            began = time.perf_counter()
            for step, inputs in zip(range(start + 1, self.cfg.steps + 1), loader):
                record = self._step(step, inputs)
                elapsed = time.perf_counter() - began  # includes waiting for the data, if it ever lags
                train_seconds += elapsed
                steps_timed += 1
                skipped += int(record["skipped"])
                bad_records.update(inputs["bad"])
                record["bad_records"] = float(len(bad_records))
                window.append(record)
                speed = examples_per_step * steps_timed / max(train_seconds, 1e-9)
                mean = {key: float(np.mean([r[key] for r in window if key in r]))
                        for key in ("loss", "audio_acc", "kl", "fisher") if any(key in r for r in window)}
                advance(**{k: f"{v:.3f}" for k, v in mean.items()}, ex_s=f"{speed:.0f}")
                if main and (step % self.cfg.log_every == 0 or step == self.cfg.steps):
                    layout.append_metrics(metrics_path, {
                        "step": step, **mean, "skipped_steps": skipped, "examples_per_second": speed,
                        "bad_records": len(bad_records),
                        "lr_projector": self.optimizer.param_groups[0]["lr"],
                        "lr_adapter": self.optimizer.param_groups[1]["lr"],
                        "gates": {str(k): v for k, v in self.model.fusion.gates().items()},
                    })
                    window = []
                if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps:
                    self.save(step, skipped)
                # One all-reduce for both: every rank stops after the same step.
                stopped, too_many_bad = self.dist.any_each([
                    interrupt.received is not None, len(bad_records) > self.profile.data.max_bad_fraction * self.train_size])
                if stopped:
                    self.save(step, skipped)
                    raise RunFailed(f"stopped by {interrupt.received or 'a signal to another rank'} after step "
                                    f"{step}; checkpoint saved in {directory}; continue with --resume")
                if too_many_bad:
                    self.save(step, skipped)
                    shown = "; ".join(f"{rid}: {why}" for rid, why in list(bad_records.items())[:5])
                    raise RunFailed(f"{len(bad_records)} of {self.train_size} training records failed to decode, "
                                    f"more than data.max_bad_fraction ({self.profile.data.max_bad_fraction:g}); "
                                    f"checkpoint saved in {directory} after step {step}; first: {shown}")
                began = time.perf_counter()
        if not main:  # rank 0 writes the weights and evaluates (no barrier: it may take longer than a timeout)
            return StageAResult(directory, self.variant_name, self.seed, self.cfg.steps, resumed_from, skipped,
                                train_seconds, examples_per_step * steps_timed / max(train_seconds, 1e-9),
                                peak_memory_mb(self.device), self.base_fingerprint, True)
        save_weights(directory / layout.FINAL_WEIGHTS, self.trainable)

        self.model.eval()
        eval_cfg = self.profile.evaluation
        tasks = evaluate(self.model, self.batcher, self.test_pool, self.max_budget, eval_cfg.batch_size,
                         eval_cfg.max_examples, description="evaluate base vs SAFE")
        # The audio task (audio/digit on AV-digits) at the largest budget is already in ``tasks``; only
        # the smaller budgets are run again.
        followed = audio_task(self.test_pool)
        by_budget: dict[int, float] = {}
        if followed is not None:
            smaller = [b for b in self.positive_budgets if b != self.max_budget]
            by_budget = audio_accuracy_by_budget(self.model, self.batcher, self.test_pool, smaller, task=followed,
                                                 batch_size=eval_cfg.batch_size, max_examples=eval_cfg.max_examples)
            by_budget.update({self.max_budget: t.safe_accuracy for t in tasks if t.task == followed})
        unchanged = self.model.base_fingerprint() == self.base_fingerprint
        result = StageAResult(
            stage_dir=directory, variant=self.variant_name, seed=self.seed, steps=self.cfg.steps,
            resumed_from=resumed_from, skipped_steps=skipped, train_seconds=train_seconds,
            examples_per_second=examples_per_step * steps_timed / train_seconds if train_seconds else float("nan"),
            peak_memory_mb=peak_memory_mb(self.device), base_fingerprint=self.base_fingerprint,
            base_unchanged=unchanged, tasks=tasks, audio_digit_by_budget=by_budget, audio_task=followed,
        )
        write_json(directory / layout.SUMMARY_FILE, result.summary())
        write_json(directory / layout.EVAL_EXAMPLES_FILE, [t.to_dict() for t in tasks])
        if not unchanged:
            raise RunFailed(f"the base's fingerprint changed during training ({self.base_fingerprint} -> "
                            f"{self.model.base_fingerprint()}): a frozen weight was modified")
        return result


def check_training_records(records, alignment, retention, variant, variant_name: str) -> None:
    """Refuse a training set Stage A cannot learn from, before any model is built."""
    if not len(alignment):
        raise SafeError(f"data.train_manifests: no audio or av records among the {len(records)} training records "
                        f"(kinds: {records.counts()}); Stage A learns from questions that need the audio")
    needs_retention = variant.retention_loss_weight * variant.distillation_weight > 0 or variant.enable_null_space \
        or variant.retention_loss_weight * variant.fisher_weight > 0
    if needs_retention and not len(retention):
        raise SafeError(f"data.train_manifests: variant {variant_name!r} needs retention data (vl or text records, "
                        f"which get a distractor clip) and the training records have none (kinds: {records.counts()}); "
                        "add VL/text records or use --variant no_retention")


def train_stage_a(profile: Profile, **kwargs: Any) -> StageAResult:
    return StageATrainer(profile, **kwargs).run()
