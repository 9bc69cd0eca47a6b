"""The built-in tiny LLaVA's tokenizer and processor, made with the libraries a real LLaVA uses.

A word-level ``tokenizers`` model over the AV-digits vocabulary (every number 0-99 is one token,
so an answer such as "12" is one token), wrapped as a ``PreTrainedTokenizerFast`` and joined
to a CLIP image processor in a ``LlavaProcessor``. Saved with ``save_pretrained``, the result
loads back with ``AutoProcessor.from_pretrained`` exactly like ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import re

from ..config.schema import TinyLlavaConfig
from ..data.avdigits import QUESTIONS

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3; the tiny config's pad/bos/eos ids
IMAGE_TOKEN = "<image>"  # the last id of the vocabulary (tiny_llava_config's image_token_id)
PROMPT_WORDS = ("user", "assistant", ":", "?", "yes", "no", "plus", "minus")


def vocabulary() -> list[str]:
    """Every word the AV-digits prompts and answers use, lower case, in a fixed order."""
    words: list[str] = list(PROMPT_WORDS) + [str(n) for n in range(100)]
    for template in QUESTIONS.values():
        for word in re.findall(r"\w+|[^\w\s]", template.lower()):
            if not word.startswith("{") and word not in words and word not in "{}":
                words.append(word)
    return words


def build_tokenizer(cfg: TinyLlavaConfig):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    needed = len(SPECIAL_TOKENS) + len(words) + 1
    if cfg.vocab_size < needed:
        raise ValueError(f"base.tiny.vocab_size must be at least {needed} for the AV-digits vocabulary")
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + words)}
    for i in range(len(vocab), cfg.vocab_size - 1):
        vocab[f"<unused{i}>"] = i  # ids stay contiguous up to the image token
    vocab[IMAGE_TOKEN] = cfg.vocab_size - 1
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    model.add_special_tokens([IMAGE_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor(cfg: TinyLlavaConfig):
    from transformers import LlavaProcessor

    try:  # transformers 5 names the PIL backend; older versions only have the one class
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import CLIPImageProcessor as ImageProcessor

    images = ImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        # MNIST's pixel statistics: with 0.5/0.5 the black background dominates every patch
        # and the tower learns far more slowly (measured).
        image_mean=[0.13, 0.13, 0.13],
        image_std=[0.31, 0.31, 0.31],
    )
    # "default" strategy drops CLIP's CLS token: one <image> becomes (image/patch)^2 tokens.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=build_tokenizer(cfg),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
