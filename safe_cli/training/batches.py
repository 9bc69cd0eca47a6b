"""AV-digits examples -> SAFEModel inputs: the base's prompt tokens, the clips, the budgets.

The prompt is the base's own (``PromptBatcher``): audio reaches the LLM only through the
fusion adapters' cross-attention, never as text, so a retention example with a distractor clip
has exactly the base's input tokens, and the teacher (the base without audio) and the student
(SAFE with the clip) are compared position by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..config.schema import Profile
from ..data import avdigits
from ..data.avdigits import DigitImages, Example
from ..data.batches import PromptBatcher, Query, generate_answers
from ..features.lookup import cached_clip_features, stack_features
from ..foundation.prepare import load_sources
from ..foundation.pretrain import clips_at, queries


@dataclass
class ExamplePool:
    """One split's examples and the raw material they index (clips at the encoder's rate)."""

    examples: list[Example]
    images: DigitImages
    waves: list[np.ndarray]
    features: Optional[dict[int, torch.Tensor]] = None  # cached encoder features by clip index


    def __len__(self) -> int:
        return len(self.examples)

    def queries(self, chosen: Sequence[Example], with_answers: bool) -> list[Query]:
        return queries(chosen, self.images, with_answers=with_answers)

    def audio(self, chosen: Sequence[Example]) -> list[Optional[np.ndarray]]:
        return [None if e.clip is None else self.waves[e.clip] for e in chosen]

    def audio_inputs(self, chosen: Sequence[Example], device: Optional[torch.device] = None) -> dict:
        """SAFEModel's audio arguments: cached features when the pool has them, else the waveforms."""
        if self.features is None:
            return {"audio": self.audio(chosen)}
        inputs = stack_features([None if e.clip is None else self.features[e.clip] for e in chosen])
        return {key: value.to(device) for key, value in inputs.items()} if device is not None else inputs


def require_avdigits(profile: Profile, stage: str) -> None:
    """Training reads AV-digits (synthetic or FSDD + MNIST); manifests are evaluation-only so far."""
    from ..errors import SafeError

    if profile.data.source not in ("synthetic", "fsdd-mnist"):
        raise SafeError(f"data.source: Stage {stage} trains on AV-digits (synthetic or fsdd-mnist) for now; "
                        f"training from a {profile.data.source!r} source is not built yet")


def avdigits_pool(profile: Profile, split: str, sample_rate: int, retention: bool = True,
                  encoder=None) -> ExamplePool:
    """The profile's AV-digits split: every task, plus VL/text questions with a distractor clip.

    With ``data.audio_features`` set (and the encoder given) the used clips' features come from
    that cache, so training and evaluation never run the encoder.
    """
    sources = load_sources(profile, split)
    per_task = profile.data.num_eval if split == "test" else profile.data.num_train
    examples = avdigits.make_examples(sources.images, sources.clips, per_task, profile.seed, split,
                                      retention=retention)
    features = None
    if profile.data.audio_features and encoder is not None:
        used = {e.clip for e in examples if e.clip is not None}
        features = cached_clip_features(sources.clips.paths, used, profile.data.audio_features, encoder)
    return ExamplePool(examples, sources.images, clips_at(sources.clips, sample_rate), features)


def training_batch(batcher: PromptBatcher, pool: ExamplePool, chosen: Sequence[Example],
                   budgets: Sequence[int]) -> dict:
    """Inputs with ``labels`` on the answer tokens, the clips and a budget per row."""
    batch = batcher.for_training(pool.queries(chosen, with_answers=True))
    batch.update(pool.audio_inputs(chosen, batch["input_ids"].device))
    batch["token_budget"] = torch.as_tensor(list(budgets), dtype=torch.long, device=batch["input_ids"].device)
    return batch


def draw_budgets(rng: np.random.Generator, positive_budgets: Sequence[int], chosen: Sequence[Example]) -> list[int]:
    """A random positive budget for each row with a clip (nested tokens: every k must work); 0 otherwise."""
    return [int(rng.choice(positive_budgets)) if e.clip is not None else 0 for e in chosen]


def generate_safe_answers(model, batcher: PromptBatcher, pool: ExamplePool, chosen: Sequence[Example],
                          budget: int, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of the SAFE model, each row with ``budget`` audio tokens if it has a clip."""
    budgets = torch.as_tensor([budget if e.clip is not None else 0 for e in chosen], device=batcher.device)
    return generate_answers(model, batcher, pool.queries(chosen, with_answers=False), max_new_tokens,
                            token_budget=budgets, **pool.audio_inputs(chosen, batcher.device))


def row_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every answer token of the row is the argmax (teacher-forced exact match).

    Greedy decoding of a row gives its answer exactly when this holds, so it scores a row in
    one forward instead of a generation loop. Rows without answer tokens are False.
    """
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return ((predicted == target) | ~scored).all(1) & scored.any(1)

