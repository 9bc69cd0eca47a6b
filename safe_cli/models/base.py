"""The frozen base vision-language model behind one small interface.

Three kinds: Hugging Face LLaVA, Hugging Face BLIP-2 (both ``from_pretrained`` from a hub id or
a local directory, with their ``AutoProcessor``), and ``tiny-llava``, the same
``LlavaForConditionalGeneration`` class built from a tiny config so CPU work runs the code path
that a GPU user runs with LLaVA-1.5.

Whatever the kind, the base is frozen (``requires_grad=False``, eval mode) the moment it is
loaded; SAFE only reads its hidden states and adds to them through forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config.schema import BaseModelConfig, TinyLlavaConfig
from ..data.prompts import PromptFormat, end_of_answer_ids
from ..errors import SafeError
from .fingerprint import fingerprint_module
from .sources import pretrained_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseVLModel:
    """A loaded, frozen base model and what SAFE needs to know about its LLM."""

    kind: str
    model: nn.Module
    processor: Optional[Any]
    decoder_layers: nn.ModuleList
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    image_token_id: int
    num_image_tokens: int
    # How questions are put to it and which ids end its answers (data/prompts.py); None without a processor.
    prompt_format: Optional[PromptFormat] = None
    end_ids: Optional[list[int]] = None

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def attention(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].self_attn

    def fingerprint(self) -> str:
        return fingerprint_module(self.model)

    def read_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the base's own output head gives ``hidden`` (N, H) from any decoder layer.

        The LLM's final norm (OPT: ``final_layer_norm`` and ``project_out`` where it has them), then
        its ``lm_head``: the "logit lens" read of an intermediate layer (2 x H x vocab FLOPs a position,
        0.26 GFLOPs on LLaVA-1.5-7B).
        """
        for module in _output_norms(self.kind, self.model):
            hidden = module(hidden)
        return self.model.get_output_embeddings()(hidden)

    def __call__(self, **inputs: Any) -> Any:
        """The base's own forward; returns the Hugging Face output (``.logits``)."""
        return self.model(**inputs)


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def tiny_llava_config(cfg: TinyLlavaConfig):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_hidden_size * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        projection_dim=cfg.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # The last id is the <image> placeholder; the processor expands it to one token per patch.
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=cfg.vocab_size - 1,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _llava_layers(model: nn.Module) -> nn.ModuleList:
    # transformers >= 4.52 nests the LLM under model.model.language_model; older under language_model.model.
    for path in ("model.language_model.layers", "language_model.model.layers"):
        module: Any = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
            return module
        except AttributeError:
            continue
    raise SafeError(f"cannot find the LLM decoder layers of {type(model).__name__}")


def _output_norms(kind: str, model: nn.Module) -> list[nn.Module]:
    """What the LLM applies after its last decoder layer and before ``lm_head``."""
    if kind == "hf-blip2":
        inner = getattr(model.language_model, "model", model.language_model)
        decoder = getattr(inner, "decoder", inner)
        return [m for m in (getattr(decoder, "final_layer_norm", None), getattr(decoder, "project_out", None))
                if m is not None]
    for path in ("model.language_model.norm", "language_model.model.norm"):
        module: Any = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
            return [module]
        except AttributeError:
            continue
    raise SafeError(f"cannot find the LLM's final norm of {type(model).__name__}")


def _blip2_layers(model: nn.Module) -> nn.ModuleList:
    language_model = model.language_model
    inner = getattr(language_model, "model", language_model)
    decoder = getattr(inner, "decoder", inner)
    if not hasattr(decoder, "layers"):
        raise SafeError(
            f"BLIP-2 language model {type(language_model).__name__} has no decoder layers SAFE knows; "
            "OPT-based BLIP-2 checkpoints are supported"
        )
    return decoder.layers


def _wrap(kind: str, model: nn.Module, processor: Optional[Any], prompt_template: Optional[str] = None,
          end_of_answer: Optional[list[int]] = None) -> BaseVLModel:
    config = model.config
    text = config.text_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    if kind == "hf-blip2":
        layers = _blip2_layers(model)
        num_image_tokens = config.num_query_tokens
        image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_id", None)
        kv_heads, bias = heads, True  # OPT: full multi-head attention with biases
    else:
        layers = _llava_layers(model)
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        full = config.vision_feature_select_strategy == "full"
        num_image_tokens = patches + (1 if full else 0)
        image_token_id = config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        bias = bool(getattr(text, "attention_bias", False))
    prompt_format = end_ids = None
    if processor is not None:
        end_ids = end_of_answer_ids(model, processor.tokenizer, end_of_answer)
        try:
            prompt_format = PromptFormat.for_base(kind, processor, end_ids, prompt_template)
        except ValueError as exc:
            raise SafeError(str(exc)) from exc
        check_processor(kind, processor, prompt_format, image_token_id, num_image_tokens, config)
    return BaseVLModel(
        kind=kind,
        model=freeze(model),
        processor=processor,
        prompt_format=prompt_format,
        end_ids=end_ids,
        decoder_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=bias,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )


def check_processor(kind: str, processor: Any, prompt_format: PromptFormat, image_token_id: int,
                    num_image_tokens: int, config: Any) -> None:
    """The processor must turn one image into the image tokens the model's config expects.

    A BLIP-2 processor saved without ``num_query_tokens`` (an old snapshot, a pinned revision)
    silently drops the image under transformers 5, and a LLaVA processor whose patch size or
    crop differs from the vision config gives a count the model refuses mid-forward.
    """
    from PIL import Image

    side = int(getattr(config.vision_config, "image_size", 32))
    prompt = prompt_format.one_turn("?")
    try:
        ids = processor(text=[prompt], images=[Image.new("RGB", (side, side))], return_tensors="pt")["input_ids"]
        found = int((ids == image_token_id).sum())
    except Exception as exc:  # noqa: BLE001 - any failure here is a processor/model mismatch to name
        raise SafeError(f"the {kind} processor cannot encode a question with an image for this model: {exc}") from exc
    if found != num_image_tokens:
        details = ""
        if kind == "hf-blip2":
            details = (f" (processor num_query_tokens = {getattr(processor, 'num_query_tokens', None)}, "
                       f"config num_query_tokens = {config.num_query_tokens})")
        else:
            details = (f" (processor patch_size = {getattr(processor, 'patch_size', None)}, config vision "
                       f"image_size = {side}, patch_size = {getattr(config.vision_config, 'patch_size', None)})")
        raise SafeError(f"the {kind} processor turns one image into {found} image tokens (id {image_token_id}) "
                        f"but the model's config expects {num_image_tokens}{details}; the processor and the "
                        "checkpoint do not belong together: save the processor that matches the model")


def _load_processor(name_or_path: Any, revision: Optional[str]) -> Optional[Any]:
    """The checkpoint's processor; None only when the checkpoint has none at all (ids-only use)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if _has_processor_files(name_or_path):
            # The files are there but do not load: that cause is what the user needs to see.
            raise SafeError(f"base.name_or_path: the processor of {str(name_or_path)!r} does not load: "
                            f"{type(exc).__name__}: {exc}") from exc
        return None


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def _has_processor_files(name_or_path: Any) -> bool:
    from pathlib import Path

    directory = Path(str(name_or_path))
    if not directory.is_dir():
        return True  # a hub id whose model loaded: its processor's failure is the news
    return any((directory / name).exists() for name in PROCESSOR_FILES)


def load_base(cfg: BaseModelConfig, device: str | torch.device = "cpu") -> BaseVLModel:
    """Load and freeze the base named by the profile's ``base`` section."""
    dtype = DTYPES[cfg.dtype]
    if cfg.kind == "tiny-llava":
        from transformers import LlavaForConditionalGeneration

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = LlavaForConditionalGeneration(tiny_llava_config(cfg.tiny))
        return _wrap("tiny-llava", model.to(device=device, dtype=dtype), None)

    source = pretrained_source(cfg.name_or_path or "", "base.name_or_path")
    return load_base_from_directory(cfg.kind, source, cfg.dtype, device, cfg.revision, cfg.name_or_path,
                                    cfg.prompt_template, cfg.end_of_answer_ids)


def load_base_from_directory(
    kind: str,
    source: Any,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    revision: Optional[str] = None,
    name: Optional[str] = None,
    prompt_template: Optional[str] = None,
    end_of_answer: Optional[list[int]] = None,
) -> BaseVLModel:
    """``from_pretrained`` of a LLaVA (also the built-in tiny one, once pretrained) or BLIP-2, frozen.

    The weights are read straight onto ``device`` (``device_map``), one shard at a time, so a 13B
    base in bfloat16 needs its 26 GB on the GPU, not first in host memory as well.
    """
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    model_class = Blip2ForConditionalGeneration if kind == "hf-blip2" else LlavaForConditionalGeneration
    target = torch.device(device)
    try:
        model = model_class.from_pretrained(source, revision=revision, dtype=DTYPES[dtype], device_map=target)
    except (OSError, ValueError) as exc:
        raise SafeError(f"base.name_or_path: cannot load {kind} model from {name or source!r}: {exc}") from exc
    return _wrap(kind, model, _load_processor(source, revision), prompt_template, end_of_answer)
