"""Use a trained run from Python in one call:

    from safe_cli import SAFE

    m = SAFE.from_run("runs/demo/soft_retention/seed-0")   # latest stage, as deployed
    m.answer("Which digit is spoken?", audio="clip.wav")     # Answer(text, budget, audio_used, ...)
    m.answer("What digit is shown?", image="digit.png", budget=0)   # 0 = the base alone

Budgets come from what the run deploys: its Stage C gate, else its Stage B policy, else the
largest budget for every clip; ``budget=`` overrides it per question. Every batch runs through
``safe_cli.deploy.generate_gated``: one prefill, the decision at the first fused layer, audio only
for the rows that take it; rows at budget 0 are the base's own generation bit for bit. Images
may be paths, PIL images or uint8 arrays; audio paths (any format ``safe_cli.data.audio_io``
decodes), float arrays at the encoder's rate, or ``(array, sample_rate)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .errors import SafeError

DEFAULT_ANSWER_TOKENS = 16


@dataclass
class Request:
    """One question, with what it comes with."""

    question: str
    image: Any = None
    audio: Any = None
    budget: Optional[int] = None  # None: the run's gate/policy decides
    history: tuple[tuple[str, str], ...] = ()
    system: Optional[str] = None


@dataclass
class Answer:
    text: str
    budget: int  # audio tokens used; 0 = the base's own answer
    audio_used: bool  # the audio encoder ran for this question
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # ended with an end-of-answer token (False: cut at max_new_tokens)
    seconds: float  # wall time of the batch it was answered in
    batch_size: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_image(image: Any):
    """A PIL RGB image from a path, a PIL image or an array; SafeError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    if image is None or isinstance(image, Image.Image):
        return image.convert("RGB") if image is not None else None
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    path = Path(image).expanduser()
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise SafeError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SafeError(f"{path}: cannot read the image: {exc}") from None


def load_clip(audio: Any, sample_rate: int) -> Optional[np.ndarray]:
    """A float32 mono waveform at ``sample_rate``; SafeError naming the file otherwise."""
    from .data.audio_io import AudioDecodeError, load_audio, resample

    if audio is None:
        return None
    if isinstance(audio, tuple):
        wave, rate = audio
        return resample(np.asarray(wave, dtype=np.float32), int(rate), sample_rate).astype(np.float32)
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return np.asarray(audio, dtype=np.float32).reshape(-1)
    try:
        return load_audio(Path(audio).expanduser(), sample_rate)
    except AudioDecodeError as exc:
        raise SafeError(str(exc)) from None


class _Decider:
    """The run's budget rule: its gate, else its policy, else the largest budget for every clip."""

    def __init__(self, gate=None, policy=None, normalizer=None, max_budget: int = 0):
        self.gate, self.policy, self.normalizer, self.max_budget = gate, policy, normalizer, max_budget

    @property
    def name(self) -> str:
        return "gate" if self.gate is not None else "policy" if self.policy is not None else f"always-{self.max_budget}"

    @torch.no_grad()
    def decide(self, features: torch.Tensor, has_clip: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        if self.gate is not None:
            return self.gate.decide(features, has_clip, threshold)
        if self.policy is not None:
            actions = self.policy.get_actions(self.normalizer(features), deterministic=True, has_audio=has_clip)
            return actions.budgets.cpu()
        return torch.where(has_clip, self.max_budget, 0)

    def with_overrides(self, overrides: Sequence[Optional[int]]) -> "_Overridden":
        return _Overridden(self, list(overrides))


@dataclass
class _Overridden:
    """One batch's decisions, as deploy.generate_gated asks for them: the rule's, except where a
    question names its own budget (a row without a clip stays at 0)."""

    rule: _Decider
    overrides: list[Optional[int]]

    def decide(self, features: torch.Tensor, has_clip: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        budgets = self.rule.decide(features, has_clip, threshold).clone().long()
        for row, override in enumerate(self.overrides):
            if override is not None:
                budgets[row] = override if bool(has_clip[row]) else 0
        return budgets


class SAFE:
    """A trained run, loaded once, answering questions as it is deployed."""

    def __init__(self, model, batcher, decider: _Decider, trained, profile):
        self.model, self.batcher, self.decider = model, batcher, decider
        self.trained, self.profile = trained, profile
        self.sample_rate = model.audio_encoder.sample_rate
        self.token_budgets = sorted(int(b) for b in profile.policy.token_budgets)
        self.fingerprint = model.base_fingerprint()

    @classmethod
    def from_run(cls, run_dir: Union[str, Path], device: str = "cpu", dtype: Optional[str] = None) -> "SAFE":
        """The run's latest stage (or a stage or checkpoint folder), with the base its profile names
        (its fingerprint must be the one the run trained on). ``dtype`` overrides ``base.dtype``."""
        from .config import load_profile
        from .data.batches import PromptBatcher
        from .evaluation.runs import load_decider, load_trained_model, locate
        from .rl.state import state_dim

        trained = locate(run_dir)
        if not trained.weights_path.is_file():
            raise SafeError(f"{trained.stage_dir}: stage {trained.stage} has no trained weights "
                            f"({trained.weights_path.name}); it did not finish")
        profile = load_profile(str(trained.profile_path), [f"base.dtype={dtype}"] if dtype else [])
        model = load_trained_model(trained, profile, device)
        decider = load_decider(trained, state_dim(model.base.hidden_size), profile)
        budgets = list(profile.policy.token_budgets)
        return cls(model, PromptBatcher.for_evaluation(model.base, profile.evaluation),
                   _Decider(decider.get("gate"), decider.get("policy"), decider.get("normalizer"), max(budgets)),
                   trained, profile)

    @property
    def name(self) -> str:
        """The run's folder name and stage, e.g. ``seed-0/stage-c``: the served model id."""
        stage = self.trained.stage_dir
        return f"{stage.parent.name}/{stage.name}"

    def answer(self, question: str, image: Any = None, audio: Any = None, budget: Optional[int] = None,
               max_new_tokens: Optional[int] = None) -> Answer:
        return self.answer_batch([Request(question, image, audio, budget)], max_new_tokens)[0]

    def prepare(self, request: Request) -> tuple[Any, Optional[np.ndarray]]:
        """The request's image and clip decoded (SafeError naming a file that cannot be read)."""
        if request.budget is not None and request.budget not in self.token_budgets:
            raise SafeError(f"budget {request.budget}: this run's budgets are {self.token_budgets}")
        return load_image(request.image), load_clip(request.audio, self.sample_rate)

    @torch.no_grad()
    def answer_batch(self, requests: Sequence[Request], max_new_tokens: Optional[int] = None,
                     prepared: Optional[Sequence[tuple[Any, Optional[np.ndarray]]]] = None,
                     **generate_kwargs) -> list[Answer]:
        """Answers to ``requests`` in one batch (greedy); ``prepared`` are their decoded (image, clip)."""
        from .data.batches import Query
        from .deploy import generate_gated

        if not requests:
            return []
        started = time.perf_counter()
        prepared = list(prepared) if prepared is not None else [self.prepare(r) for r in requests]
        queries = [Query(r.question, image, history=tuple(r.history), system=r.system)
                   for r, (image, _) in zip(requests, prepared)]
        waves = [clip for _, clip in prepared]
        limit = max_new_tokens or self.batcher.max_new_tokens or DEFAULT_ANSWER_TOKENS
        decider = self.decider.with_overrides([r.budget for r in requests])
        new_ids, budgets, state = generate_gated(self.model, decider, self.batcher, queries, waves, limit,
                                                 **generate_kwargs)
        texts = self.batcher.decode(new_ids)
        seconds = time.perf_counter() - started
        answers = []
        for row, (text, end) in enumerate(zip(texts, self.batcher.answer_ends(new_ids))):
            budget = int(budgets[row])
            answers.append(Answer(text=text, budget=budget, audio_used=budget > 0,
                                  prompt_tokens=int(state.text_length[row]),
                                  completion_tokens=new_ids.shape[1] if end is None else end + 1,
                                  finished=end is not None, seconds=seconds, batch_size=len(requests)))
        return answers
