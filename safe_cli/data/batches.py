"""Questions (+ images) -> the base model's inputs, through the base's own processor.

The base decides the prompt (``data/prompts.py``: LLaVA-1.5's "USER: <image>\\n{question}
ASSISTANT:", its short-answer variant, BLIP-2's "Question: {question} Answer:", the processor's
chat template or the profile's own) and the ids that end an answer (its generation config's).

A multi-turn record repeats the pattern, each earlier answer followed by the end-of-answer
token ("USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"); an optional system turn
comes first. Training batches label every answer and its terminator (everything else is
-100), as LLaVA trains on every assistant turn; generation batches are left-padded so every
row's next token sits at the end and end on the last question.

Labels come from the token counts of the conversation's prefixes at each answer's start and
end, encoded through the same processor. A tokenizer that merges across such a boundary would
shift them, so the prefixes are checked against the full sequence and a mismatch is an error
naming the row, never a silently wrong label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
DEFAULT_MAX_NEW_TOKENS = 16  # when neither the profile nor any reference says how long an answer is


@dataclass(frozen=True)
class Query:
    question: str
    image: Optional[Any] = None  # a PIL image or a (H, W) / (H, W, 3) uint8 array
    answer: Optional[str] = None
    history: tuple[tuple[str, str], ...] = ()  # earlier (question, answer) exchanges
    system: Optional[str] = None


def _pil(image: Any):
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.convert("RGB")


class PromptBatcher:
    """Builds model inputs for one base (its kind decides the prompt, its processor the tokens)."""

    def __init__(self, base, max_new_tokens: Optional[int] = 16, task_max_new_tokens: Optional[dict] = None):
        if base.processor is None:
            raise ValueError(f"the {base.kind} base has no processor; it cannot turn questions into inputs")
        self.kind = base.kind
        self.processor = base.processor
        self.tokenizer = base.processor.tokenizer
        self.format = base.prompt_format
        self.end_ids = list(base.end_ids)
        self.image_token_id = base.image_token_id
        self.device = next(base.model.parameters()).device
        self.dtype = next(base.model.parameters()).dtype
        self.image_size = base.model.config.vision_config.image_size
        # None: from each batch's references (answer_budget); a task's (or kind's) own entry wins.
        self.max_new_tokens = max_new_tokens
        self.task_max_new_tokens = dict(task_max_new_tokens or {})

    @classmethod
    def for_evaluation(cls, base, evaluation) -> "PromptBatcher":
        """With the profile's answer lengths (``evaluation.max_new_tokens`` / ``task_max_new_tokens``)."""
        return cls(base, evaluation.max_new_tokens, evaluation.task_max_new_tokens)

    def segments(self, query: Query, with_answer: bool) -> list[tuple[str, bool]]:
        """The conversation as (text, is an answer) pieces; joined, they are the model's input."""
        return self.format.segments(query.question, query.history, query.system, query.image is not None,
                                    query.answer if with_answer else None)

    def answer_budget(self, references: Sequence[str], spare: int = 4) -> Optional[int]:
        """New tokens enough for the longest of ``references``, its end token and ``spare`` more.

        An answer that runs on past its reference is cut a few tokens later and scored as it is,
        wrong; one that needs every token of a long reference gets them. None without references.
        """
        if not references:
            return None
        encoded = self.tokenizer([" " + ref for ref in references], add_special_tokens=False)["input_ids"]
        return max(len(ids) for ids in encoded) + 1 + spare

    def new_tokens(self, tasks: Sequence[str], references: Sequence[Sequence[str]]) -> int:
        """Generation's length for a batch of rows of these tasks with these reference answers."""
        fixed = [self.task_max_new_tokens.get(task, self.task_max_new_tokens.get(task.split("/", 1)[0]))
                 for task in tasks]
        free = [refs for refs, n in zip(references, fixed) if n is None]
        from_data = [] if not free else [
            self.max_new_tokens if self.max_new_tokens is not None
            else self.answer_budget([ref for refs in free for ref in refs]) or DEFAULT_MAX_NEW_TOKENS]
        return max([n for n in fixed if n is not None] + from_data)

    def prompt(self, query: Query) -> str:
        return "".join(text for text, _ in self.segments(query, with_answer=False))

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
        """Inputs plus ``labels`` that score only each row's answers and their end-of-sequence token."""
        if any(q.answer is None for q in queries):
            raise ValueError("training queries need answers")
        pieces = [self.segments(q, with_answer=True) for q in queries]
        texts = ["".join(t for t, _ in row) for row in pieces]
        batch = self._encode(texts, queries, "right")
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        # Prefix lengths come from the tokenizer alone (the images are processed once, above): what
        # the processor adds to a row (image tokens for <image>, BLIP-2's query tokens) sits in the
        # first turn, before every answer, so it shifts each boundary by the same row offset.
        full = self.tokenizer(texts)["input_ids"]
        offsets = [int(mask[r].sum()) - len(full[r]) for r in range(len(texts))]
        # Each answer's start and end as the token count of the conversation up to there, every
        # prefix of the batch in one tokenizer call (called per prefix, the tokenizer's Python
        # wrapper cost more than the encoding: a third of the demo's data path).
        spans = []  # (row, index of the prefix that starts the answer, of the one that ends it or None)
        prefixes: list[tuple[int, str]] = []
        for r, row in enumerate(pieces):
            for i, (_, is_answer) in enumerate(row):
                if not is_answer:
                    continue
                start = len(prefixes)
                prefixes.append((r, "".join(t for t, _ in row[:i])))
                end = None
                if i < len(row) - 1:
                    end = len(prefixes)
                    prefixes.append((r, "".join(t for t, _ in row[:i + 1])))
                spans.append((r, start, end))
        lengths = self._prefix_lengths(prefixes, full)
        answer = torch.zeros_like(mask)
        for r, start, end in spans:
            stop = lengths[end] + offsets[r] if end is not None else int(mask[r].sum())
            answer[r, lengths[start] + offsets[r]:stop] = True
        batch["labels"] = torch.where(answer & mask, ids, torch.full_like(ids, IGNORE_INDEX))
        return batch

    def _prefix_lengths(self, prefixes: list[tuple[int, str]], full: list[list[int]]) -> list[int]:
        """Token counts of conversation prefixes (row, text), each checked to start its row's conversation."""
        if not prefixes:
            return []
        encoded = self.tokenizer([text for _, text in prefixes])["input_ids"]
        for (row, text), ids in zip(prefixes, encoded):
            if full[row][:len(ids)] != ids:
                raise ValueError(f"the tokenizer encodes the conversation differently from its prefix {text[-60:]!r}; "
                                 "the answer's labels would be shifted")
        return [len(ids) for ids in encoded]

    def answer_ends(self, token_ids: torch.Tensor) -> list[Optional[int]]:
        """Each generated row's first end-of-answer position (None: cut at max_new_tokens)."""
        ends = set(self.end_ids)
        return [next((i for i, token in enumerate(row) if token in ends), None) for row in token_ids.tolist()]

    def greedy_settings(self, max_new_tokens: Optional[int] = None) -> dict[str, Any]:
        """``generate`` arguments for greedy answers: length, end-of-answer ids and padding."""
        pad = self.tokenizer.pad_token_id
        return {"max_new_tokens": max_new_tokens or self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                "do_sample": False, "eos_token_id": self.end_ids,
                "pad_token_id": self.end_ids[0] if pad is None else pad}

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Each row's text up to its first end-of-answer id (BLIP-2's newline is no special token)."""
        rows = [row[:len(row) if end is None else end] for row, end in zip(token_ids.tolist(), self.answer_ends(token_ids))]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [text.strip() for text in texts]


@torch.no_grad()
def generate_answers(model, batcher: PromptBatcher, queries: Sequence[Query], max_new_tokens: Optional[int] = None,
                     **extra: Any) -> list[str]:
    """Greedy answers of ``model`` (a Hugging Face model with ``generate``) to ``queries``."""
    batch = batcher.for_generation(queries)
    output = model.generate(**batch, **extra, **batcher.greedy_settings(max_new_tokens))
    return batcher.decode(output[:, batch["input_ids"].shape[1]:])
