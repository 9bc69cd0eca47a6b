"""How a base is asked a question, and how its answer ends: one place per base kind.

A real checkpoint answers well only in the format it was trained on, and stops only at the
token it learned to stop at. Both come from the checkpoint or from its published recipe, never
from a guess, because a wrong one makes the base and SAFE answer wrong alike and a retention
report then passes on nothing.

Formats (``base.prompt_template``):

    llava-1.5         "USER: <image>\\n{question} ASSISTANT:"  (LLaVA-1.5's conv_vicuna_v1; the
                      built-in tiny LLaVA's default)
    llava-1.5-short   the same with LLaVA-1.5's short-answer instruction,
                      "\\nAnswer the question using a single word or phrase.", after the question:
                      its published format for VQA-style answers (hf-llava's default)
    blip2             "Question: {question} Answer:"  (BLIP-2's VQA prompt; the processor puts
                      the query tokens in front; hf-blip2's default)
    chat              the processor's own chat template (``apply_chat_template``)
    any other string  a template with ``{question}`` and optionally ``{image}`` (the image
                      placeholder and a newline on the first turn that has an image)

End of answer: the checkpoint's ``generation_config.eos_token_id`` (an int or a list), then its
text config's ``eos_token_id``, then the tokenizer's; ``base.end_of_answer_ids`` overrides them.
BLIP-2 OPT-2.7B ends an answer with a newline (id 50118), not with ``</s>``: generating to
``</s>`` runs past the answer ("7\\nQuestion: ..."), and exact match scores it wrong.
Training answers end with the first of these ids, so SAFE learns to stop where the base stops.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Optional, Sequence

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."

PRESETS = {
    "llava-1.5": "USER: {image}{question} ASSISTANT:",
    "llava-1.5-short": "USER: {image}{question}" + SHORT_ANSWER + " ASSISTANT:",
    "blip2": "Question: {question} Answer:",
}
DEFAULT_FOR_KIND = {"tiny-llava": "llava-1.5", "hf-llava": "llava-1.5-short", "hf-blip2": "blip2"}
FIELDS = {"question", "image"}


def template_problem(template: str) -> Optional[str]:
    """Why ``template`` (a preset name, ``chat`` or a format string) cannot be used; None if it can."""
    if template in PRESETS or template == "chat":
        return None
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"not a format string ({exc})"
    if "question" not in names:
        return (f"needs a {{question}} field, or one of the names {sorted(PRESETS) + ['chat']}")
    unknown = names - FIELDS
    if unknown:
        return f"unknown fields {sorted(unknown)}; a template may use {{question}} and {{image}}"
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def end_of_answer_ids(model: Any, tokenizer: Any, override: Optional[Sequence[int]] = None) -> list[int]:
    """The ids that end an answer for this checkpoint, first the one training appends."""
    if override:
        return [int(i) for i in override]
    ids: list[int] = []
    generation = getattr(model, "generation_config", None)
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) if config is not None else None
    for value in (getattr(generation, "eos_token_id", None), getattr(text, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        ids += [i for i in _ids(value) if i not in ids]
        if ids:  # the first source that names any wins; later ones are fallbacks, not additions
            break
    if not ids:
        raise ValueError("the checkpoint names no end-of-sequence token (generation_config, text_config and "
                         "tokenizer all lack eos_token_id); set base.end_of_answer_ids")
    return ids


@dataclass(frozen=True)
class PromptFormat:
    """Renders conversations for one base: ``segments`` gives (text, is an answer) pieces."""

    name: str
    template: Optional[str]  # None for the chat template
    image_text: str  # what {image} becomes on the first turn with an image
    terminator: str  # the text of the first end-of-answer id, appended to training answers
    processor: Any = None  # for the chat template

    @classmethod
    def for_base(cls, kind: str, processor: Any, end_ids: Sequence[int], template: Optional[str] = None) -> "PromptFormat":
        name = template or DEFAULT_FOR_KIND[kind]
        problem = template_problem(name)
        if problem:
            raise ValueError(f"base.prompt_template {name!r}: {problem}")
        tokenizer = processor.tokenizer
        if name == "chat" and not getattr(processor, "chat_template", None):
            raise ValueError("base.prompt_template is 'chat' but the processor has no chat template")
        # BLIP-2's processor puts the image (its query tokens) in front of the text itself.
        image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) or "<image>"
        image_text = "" if kind == "hf-blip2" else f"{image_token}\n"
        terminator = tokenizer.decode([int(end_ids[0])], skip_special_tokens=False)
        return cls(name, None if name == "chat" else PRESETS.get(name, name), image_text, terminator, processor)

    def one_turn(self, question: str, has_image: bool = True) -> str:
        """The prompt of a one-turn question (with an image by default)."""
        return "".join(text for text, _ in self.segments(question, (), None, has_image, None))

    def describe(self) -> str:
        """The one-turn prompt with an image, as ``safe check`` shows it."""
        return self.one_turn("{question}")

    def segments(self, question: str, history: Sequence[tuple[str, str]], system: Optional[str], has_image: bool,
                 answer: Optional[str]) -> list[tuple[str, bool]]:
        exchanges = list(history) + [(question, answer)]
        if self.template is None:
            return self._chat_segments(exchanges, system, has_image)
        pieces: list[tuple[str, bool]] = []
        if system:
            pieces.append((system + " ", False))
        for i, (q, a) in enumerate(exchanges):
            image = self.image_text if i == 0 and has_image else ""
            pieces.append((self.template.format(question=q, image=image), False))
            if a is not None:
                pieces.append((f" {a}{self.terminator}", True))
        return pieces

    def _chat_segments(self, exchanges, system, has_image) -> list[tuple[str, bool]]:
        """Pieces cut from the chat template's renderings of each growing prefix of the conversation.

        The template decides how an assistant turn is written; SAFE appends the end-of-answer
        token when the rendering lacks it (Hugging Face's LLaVA templates end a turn with a space).
        """
        messages: list[dict] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        pieces: list[tuple[str, bool]] = []
        rendered = ""  # the template's own text so far (without the terminators SAFE adds)
        for i, (q, a) in enumerate(exchanges):
            content = ([{"type": "image"}] if i == 0 and has_image else []) + [{"type": "text", "text": q}]
            messages.append({"role": "user", "content": content})
            prompt = self._render(messages, generation_prompt=True)
            pieces.append((self._after(rendered, prompt), False))
            if a is None:
                break
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
            full = self._render(messages, generation_prompt=False)
            reply = self._after(prompt, full)
            if not reply.rstrip().endswith(self.terminator):
                reply = reply.rstrip() + self.terminator
            pieces.append((reply, True))
            rendered = full
        return pieces

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    @staticmethod
    def _after(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise ValueError("the chat template renders a conversation differently from its beginning; "
                             "use a base.prompt_template string instead")
        return text[len(prefix):]
