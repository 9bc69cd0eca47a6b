"""Questions (+ images) -> the base model's inputs, through the base's own processor.

One place knows each base kind's prompt format:

    LLaVA (1.5 and the built-in tiny one)  "USER: <image>\\n{question} ASSISTANT:"
    BLIP-2                                 "Question: {question} Answer:"

Training batches append the answer and ``</s>`` and label only those tokens (everything else
is -100); generation batches are left-padded so every row's next token sits at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Query:
    question: str
    image: Optional[Any] = None  # a PIL image or a (H, W) / (H, W, 3) uint8 array
    answer: Optional[str] = None


def _pil(image: Any):
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.convert("RGB")


class PromptBatcher:
    """Builds model inputs for one base (its kind decides the prompt, its processor the tokens)."""

    def __init__(self, base):
        if base.processor is None:
            raise ValueError(f"the {base.kind} base has no processor; it cannot turn questions into inputs")
        self.kind = base.kind
        self.processor = base.processor
        self.tokenizer = base.processor.tokenizer
        self.device = next(base.model.parameters()).device
        self.dtype = next(base.model.parameters()).dtype
        self.image_size = base.model.config.vision_config.image_size

    def prompt(self, query: Query) -> str:
        if self.kind == "hf-blip2":
            return f"Question: {query.question} Answer:"
        image = "<image>\n" if query.image is not None else ""
        return f"USER: {image}{query.question} ASSISTANT:"

    def _encode(self, texts: list[str], queries: Sequence[Query], padding_side: str) -> dict[str, torch.Tensor]:
        images = [_pil(q.image) for q in queries if q.image is not None]
        if self.kind == "hf-blip2" and len(images) < len(queries):
            # BLIP-2 always conditions on an image; a text-only question gets a black one.
            images = [_pil(q.image) if q.image is not None else _pil(np.zeros((self.image_size,) * 2, np.uint8))
                      for q in queries]
        self.tokenizer.padding_side = padding_side
        encoded = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        batch = {key: value.to(self.device) for key, value in encoded.items() if torch.is_tensor(value)}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def for_generation(self, queries: Sequence[Query]) -> dict[str, torch.Tensor]:
        return self._encode([self.prompt(q) for q in queries], queries, "left")

    def for_training(self, queries: Sequence[Query]) -> dict[str, torch.Tensor]:
        """Inputs plus ``labels`` that score only each row's answer and end-of-sequence token."""
        if any(q.answer is None for q in queries):
            raise ValueError("training queries need answers")
        prompts = [self.prompt(q) for q in queries]
        eos = self.tokenizer.eos_token
        full = [f"{p} {q.answer}{eos}" for p, q in zip(prompts, queries)]
        batch = self._encode(full, queries, "right")
        prompt_lengths = self._encode(prompts, queries, "right")["attention_mask"].sum(1)
        positions = torch.arange(batch["input_ids"].shape[1], device=self.device)[None, :]
        answer = (positions >= prompt_lengths[:, None]) & batch["attention_mask"].bool()
        batch["labels"] = torch.where(answer, batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE_INDEX))
        return batch

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]


@torch.no_grad()
def generate_answers(model, batcher: PromptBatcher, queries: Sequence[Query], max_new_tokens: int = 4,
                     **extra: Any) -> list[str]:
    """Greedy answers of ``model`` (a Hugging Face model with ``generate``) to ``queries``."""
    batch = batcher.for_generation(queries)
    eos = batcher.tokenizer.eos_token_id
    output = model.generate(**batch, **extra, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos, pad_token_id=batcher.tokenizer.pad_token_id)
    return batcher.decode(output[:, batch["input_ids"].shape[1]:])
