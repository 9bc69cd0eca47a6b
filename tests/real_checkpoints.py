"""Tiny checkpoints laid out like the real ones a user downloads, processors included.

``tiny_models.py`` saves bare models; these save what ``llava-hf/llava-1.5-7b-hf`` and
``Salesforce/blip2-opt-2.7b`` ship: the real processor classes at the real image sizes
(CLIP at 336 px / patch 14 -> 576 image tokens; BLIP-2 at 224 px with 32 query tokens), the
configs' special-token ids (LLaVA: <image> 32000, <pad> 32001, vocabulary 32064; OPT: <pad> 1,
</s> 2, newline 50118 as the end of an answer, <image> 50265, vocabulary 50272) and their
generation configs. Only the widths and depths are tiny. The tokenizers are character-level
(LLaVA: sentencepiece-style with byte fallback, "\\n" is <0x0A> = 13 as in Llama; OPT: GPT-2
byte-level, "\\n" is "Ċ"), so token ids match the real ones where a test depends on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PRINTABLE = [chr(c) for c in range(32, 127)]

# A chat template written to behave as the llava-hf processors' do: "USER: <image>\n{text} "
# per user turn, "ASSISTANT: {text} " per answer (no </s>), "ASSISTANT:" as the generation prompt.
LLAVA_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llama_style_tokenizer():
    """<unk> 0, <s> 1, </s> 2, bytes <0x00>..<0xFF> at 3..258 (as Llama's), characters, <image> 32000, <pad> 32001."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁"] + [c for c in PRINTABLE if c != " "]:
        vocab[piece] = len(vocab)
    while len(vocab) < 32000:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    model = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                       decoders.ByteFallback(), decoders.Fuse()])
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    tokenizer.image_token = "<image>"
    return tokenizer


def save_llava15_like(directory: Path, seed: int = 5, chat_template: bool = True) -> Path:
    """A LLaVA-1.5-layout checkpoint: 336 px CLIP tower, patch 14, 576 image tokens, Vicuna's ids."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       pad_token_id=32001, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    model.save_pretrained(directory)
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=images, tokenizer=llama_style_tokenizer(), patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>",
                               chat_template=LLAVA_STYLE_CHAT_TEMPLATE if chat_template else None)
    processor.save_pretrained(directory)
    return directory


def opt_style_tokenizer():
    """GPT-2 byte-level tokens with OPT's ids: <s> 0, <pad> 1, </s> 2, <unk> 3, "Ċ" (newline) 50118, <image> 50265."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    symbols = ByteLevel.alphabet()
    for symbol in sorted(symbols):
        if symbol != "Ċ":
            vocab[symbol] = len(vocab)
    while len(vocab) < 50118:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["Ċ"] = 50118
    while len(vocab) < 50265:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    model = Tokenizer(models.BPE(vocab, []))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="</s>", eos_token="</s>",
                                        unk_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == 50265
    tokenizer.image_token = "<image>"
    return tokenizer


def save_blip2_opt_like(directory: Path, seed: int = 6, num_query_tokens_in_processor: int | None = 32) -> Path:
    """A BLIP-2 OPT-2.7B-layout checkpoint: 224 px tower, 32 query tokens, answers end at the newline."""
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, GenerationConfig, OPTConfig)

    torch.manual_seed(seed)
    vision = Blip2VisionConfig(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100, cross_attention_frequency=1, encoder_hidden_size=32)
    text = OPTConfig(vocab_size=50272, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=512, pad_token_id=1, bos_token_id=2,
                     eos_token_id=50118)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                         image_token_index=50265)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    model.save_pretrained(directory)
    images = BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    Blip2Processor(image_processor=images, tokenizer=opt_style_tokenizer(),
                   num_query_tokens=num_query_tokens_in_processor).save_pretrained(directory)
    return directory
