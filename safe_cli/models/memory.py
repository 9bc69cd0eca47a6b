"""How much memory a profile needs, from architecture configs alone (no weights fetched or loaded).

Parameter counts are exact: the base, the audio encoder and SAFE's own projector and fusion
adapters are instantiated on torch's ``meta`` device (shapes without storage, so a 13B model
costs nothing) through the same constructors the loaders use, and their parameters counted.
The configs come from a local model directory when ``name_or_path`` is one (``config.json`` is
all it needs; for whisper the ``dims`` inside the ``.pt``, read memory-mapped), else from the
small table of published configs below (a hub id cannot be fetched offline).

Activations are a formula, checked against autograd's saved tensors in tests/test_memory.py.
The base is frozen, so autograd stores nothing in the layers before the first fused layer (no
input there requires grad), and in the layers after it only what backward needs to pass the
gradient *through* frozen weights: a linear layer with a frozen weight keeps nothing (dx needs
only W); norms, attention and the MLP's activation keep their inputs. Per decoder layer, with
p the base dtype's bytes, B·L the rows times tokens:

    Llama (LLaVA)  B·L·(8·H + p·(2·q + 2·kv) + 3·p·I)    both RMSNorms upcast x to fp32 (2·4·H);
                                                         SDPA keeps q, k, v, out; SiLU keeps the
                                                         gate, the product keeps silu(gate), up
    OPT (BLIP-2)   B·L·(2·p·H + 4·p·H + p·F)             two LayerNorm inputs; SDPA q, k, v, out;
                                                         ReLU keeps its output

(q = heads·head_dim, kv = kv_heads·head_dim, I / F the MLP width). For LLaVA-1.5-7B in bf16 that
is B·L·H·32.1 bytes per layer; Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", eq. 2) give 34·B·L·H (+ 5·a·L²·B without fused attention) for a layer
whose weights train, of which the frozen weights here drop the linear inputs and add the fp32
norm upcasts. Attention assumes fused SDPA (flash / memory-efficient: no L×L matrix kept), HF's
default; the "math" fallback would add B·heads·L²·2p per layer. Each fusion block runs in fp32
and keeps six B·L·H fp32 tensors (24·B·L·H bytes). The loss keeps log_softmax over the vocabulary
(B·L·V·4) and the base returns its logits (B·L·V·p).

Gradient checkpointing of the layers after the first fused one (not built yet: the fusion
hooks would have to stay installed through the recomputation in backward) would keep only
each layer's input (B·L·H·p) plus one layer's activations while it is recomputed; the
estimate shows it so the saving can be weighed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config.schema import AudioEncoderConfig, BaseModelConfig, Profile
from ..config.variants import resolve_variant
from ..errors import SafeError

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
# What the prompt adds to the image tokens when the caller does not say: an AV-digits question with
# LLaVA's "USER: <image>\n... ASSISTANT: answer</s>" template is ~20 tokens; 64 leaves room for
# longer questions. `safe validate --estimate --text-tokens N` overrides it.
DEFAULT_TEXT_TOKENS = 64
# Labelled (answer) tokens a training row: the LM head and the loss run on these positions only.
# AV-digits answers are 2-3 tokens and their end token; LLaVA-style conversations label more.
DEFAULT_ANSWER_TOKENS = 8
GENERATED_TOKENS = 16  # KV cache room for the answer at inference (SAFE generates 4-8 tokens)

# --------------------------------------------------------------------------- published configs


def _llava15(hidden: int, intermediate: int, layers: int, heads: int):
    """llava-hf/llava-1.5-{7b,13b}-hf config.json: Vicuna (Llama-2 architecture, vocab 32064 with
    <image> = 32000 and padding), CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336),
    features from its second-to-last layer, a 2-layer GELU MLP projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _blip2_opt27b():
    """Salesforce/blip2-opt-2.7b config.json (2024 revision with the <image> token): EVA ViT-g/14
    and Q-Former at transformers' Blip2 defaults, 32 query tokens, OPT-2.7B with vocab 50304."""
    from transformers import Blip2Config, OPTConfig

    text = OPTConfig(vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                     eos_token_id=50118)
    return Blip2Config(vision_config={}, qformer_config={}, text_config=text.to_dict(), num_query_tokens=32,
                       image_token_index=50265)


KNOWN_BASES: dict[str, Callable[[], Any]] = {
    "llava-hf/llava-1.5-7b-hf": lambda: _llava15(4096, 11008, 32, 32),
    "llava-hf/llava-1.5-13b-hf": lambda: _llava15(5120, 13824, 40, 40),
    "Salesforce/blip2-opt-2.7b": _blip2_opt27b,
}

# openai-whisper ModelDimensions of the published checkpoints (the Whisper paper, Table 1; n_mels
# 128 from large-v3 on). Only the encoder matters: (n_mels, n_audio_state, n_audio_head,
# n_audio_layer); every one has n_audio_ctx 1500. The .en models share their encoder's shape;
# turbo is large-v3 with a 4-layer decoder.
WHISPER_DIMS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (80, 384, 6, 4), "base": (80, 512, 8, 6), "small": (80, 768, 12, 12),
    "medium": (80, 1024, 16, 24), "large-v1": (80, 1280, 20, 32), "large-v2": (80, 1280, 20, 32),
    "large-v3": (128, 1280, 20, 32), "large": (128, 1280, 20, 32), "large-v3-turbo": (128, 1280, 20, 32),
    "turbo": (128, 1280, 20, 32),
}
for _name in ("tiny", "base", "small", "medium"):
    WHISPER_DIMS[f"{_name}.en"] = WHISPER_DIMS[_name]


def _clap(fused: bool):
    """transformers' ClapConfig defaults are the laion CLAP HTSAT architecture (RoBERTa-base text
    tower, HTSAT-base audio tower, 512-d projections); the unfused checkpoint differs only by
    enable_fusion."""
    from transformers import ClapConfig

    return ClapConfig(audio_config={"enable_fusion": fused})


KNOWN_CLAP: dict[str, Callable[[], Any]] = {
    "laion/clap-htsat-unfused": lambda: _clap(False),
    "laion/clap-htsat-fused": lambda: _clap(True),
}


# --------------------------------------------------------------------------- architectures on meta


@dataclass
class BaseShape:
    kind: str
    family: str  # "llama" or "opt": picks the activation formula
    params: int
    num_layers: int
    hidden_size: int
    q_width: int  # heads * head_dim
    kv_width: int  # kv_heads * head_dim
    mlp_width: int
    vocab_size: int
    num_image_tokens: int
    num_heads: int = 1


def _count(module: torch.nn.Module, trainable: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _local_dir(name_or_path: str) -> Optional[Path]:
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def _known(table: dict[str, Callable[[], Any]], name: str, key: str) -> Any:
    for known, make in table.items():
        if known.lower() == name.lower():
            return make()
    raise SafeError(
        f"{key}: cannot estimate {name!r} offline: not a local directory and not one of the known configs "
        f"({', '.join(sorted(table))}); point it at a directory holding the model's config.json"
    )


def _from_pretrained_config(directory: Path, key: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise SafeError(f"{key}: cannot read a config from {directory}: {exc}") from exc


def base_config(cfg: BaseModelConfig) -> Any:
    """The base's transformers config: tiny, a local directory's config.json, or the known table."""
    from .base import tiny_llava_config

    if cfg.kind == "tiny-llava":
        return tiny_llava_config(cfg.tiny)
    name = cfg.name_or_path or ""
    directory = _local_dir(name)
    if directory is not None:
        return _from_pretrained_config(directory, "base.name_or_path")
    if name.startswith(("/", ".", "~")):
        raise SafeError(f"base.name_or_path: local model directory not found: {name}")
    return _known(KNOWN_BASES, name, "base.name_or_path")


def meta_base(cfg: BaseModelConfig):
    """The frozen base as a :class:`BaseVLModel` whose weights live on the meta device."""
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    from .base import _wrap

    config = base_config(cfg)
    model_class = Blip2ForConditionalGeneration if cfg.kind == "hf-blip2" else LlavaForConditionalGeneration
    try:
        with torch.device("meta"):
            model = model_class(config)
    except (TypeError, ValueError, AttributeError) as exc:
        raise SafeError(f"base.name_or_path: the config is not a {model_class.__name__}: {exc}") from exc
    return _wrap(cfg.kind, model, None)


def base_shape(base) -> BaseShape:
    text = base.model.config.text_config
    opt = base.kind == "hf-blip2"
    return BaseShape(
        kind=base.kind, family="opt" if opt else "llama", params=_count(base.model), num_layers=base.num_layers,
        hidden_size=base.hidden_size, q_width=base.num_attention_heads * base.head_dim,
        kv_width=base.num_key_value_heads * base.head_dim,
        mlp_width=text.ffn_dim if opt else text.intermediate_size, vocab_size=text.vocab_size,
        num_image_tokens=base.num_image_tokens, num_heads=base.num_attention_heads,
    )


@dataclass
class EncoderShape:
    kind: str
    params: int
    dtype: str
    feature_dim: int
    frames: int  # feature rows per clip reaching the projector
    width: int  # whisper's d_model (0 for clap): its working set
    positions: int  # whisper's encoder positions per clip (0 for clap)


def _whisper_dims(name: str) -> tuple[int, int, int, int, int]:
    """(n_mels, n_ctx, state, heads, layers) of a whisper name or local .pt checkpoint."""
    key = "audio_encoder.whisper.name_or_path"
    if name in WHISPER_DIMS:
        return (WHISPER_DIMS[name][0], 1500, *WHISPER_DIMS[name][1:])
    from .ctranslate2_whisper import ctranslate2_whisper_dims, is_ctranslate2_folder
    from .package_paths import resolve_package_path

    name = resolve_package_path(name, key)
    if is_ctranslate2_folder(name):
        dims = ctranslate2_whisper_dims(name)
        return dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], dims["n_audio_head"], dims["n_audio_layer"]
    path = Path(name).expanduser()
    if not path.is_file():
        raise SafeError(f"{key}: whisper checkpoint not found and not a known model name "
                        f"({', '.join(sorted(WHISPER_DIMS))}): {name}")
    try:  # memory-mapped: only the small dims dict is read, not the weights
        dims = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)["dims"]
        return dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], dims["n_audio_head"], dims["n_audio_layer"]
    except (RuntimeError, OSError, KeyError, TypeError, ValueError) as exc:
        raise SafeError(f"{key}: cannot read whisper's dims from {name}: {exc}") from exc


def _meta_whisper(mels: int, ctx: int, state: int, heads: int, layers: int) -> int:
    from whisper.model import AudioEncoder as WhisperAudioEncoder

    with torch.device("meta"):
        return _count(WhisperAudioEncoder(n_mels=mels, n_ctx=ctx, n_state=state, n_head=heads, n_layer=layers))


def _clap_shape(name: str) -> tuple[int, int, int, int]:
    """(parameters of the whole ClapModel, its time steps, their width, projection_dim):
    ClapEncoder keeps the whole model and returns the tower's time steps (``clap_frame_shape``)."""
    from .audio_encoders import clap_frame_shape

    from transformers import ClapModel

    directory = _local_dir(name)
    key = "audio_encoder.clap.name_or_path"
    if directory is not None:
        config = _from_pretrained_config(directory, key)
    elif name.startswith(("/", ".", "~")):
        raise SafeError(f"{key}: local model directory not found: {name}")
    else:
        config = _known(KNOWN_CLAP, name, key)
    with torch.device("meta"):
        model = ClapModel(config)
    frames, width = clap_frame_shape(config.audio_config)
    return _count(model), frames, width, config.projection_dim


def encoder_shape(cfg: AudioEncoderConfig, max_audio_seconds: float) -> EncoderShape:
    from .audio_encoders import whisper_positions

    # The loaders keep the encoders in float32 (whisper.load_model and ClapModel.from_pretrained
    # without a dtype); a profile setting for it, when there is one, decides instead.
    dtype = getattr(cfg, "dtype", None) or "float32"

    def whisper_part(mels, ctx, state, heads, layers):
        params = _meta_whisper(mels, ctx, state, heads, layers)
        frames = ctx
        if cfg.whisper.trim_to_clip:  # whole seconds of the longest clip, at most the window
            frames = min(ctx, max(1, math.ceil(max_audio_seconds)) * 50)
        return params, state, frames

    if cfg.kind == "tiny-whisper":
        ctx = whisper_positions(cfg.tiny_window_seconds)
        params, width, frames = whisper_part(80, ctx, cfg.tiny_state, cfg.tiny_heads, cfg.tiny_layers)
        return EncoderShape(cfg.kind, params, dtype, width, frames, width, frames)
    if cfg.kind == "whisper":
        params, width, frames = whisper_part(*_whisper_dims(cfg.whisper.name_or_path))
        return EncoderShape(cfg.kind, params, dtype, width, frames, width, frames)
    clap_params, clap_frames, clap_width, clap_dim = _clap_shape(cfg.clap.name_or_path)
    if cfg.kind == "clap":
        return EncoderShape(cfg.kind, clap_params, dtype, clap_width, clap_frames, 0, 0)
    params, width, frames = whisper_part(*_whisper_dims(cfg.whisper.name_or_path))
    return EncoderShape(cfg.kind, params + clap_params, dtype, width + clap_dim, frames, width, frames)


@dataclass
class TrainableShape:
    projector: int
    fusion_trainable: int
    fusion_frozen: int  # the q/k/v/o copies of init_from_base, frozen, float32


def trainable_shape(profile: Profile, base, feature_dim: int) -> TrainableShape:
    from .builder import build_trainable

    with torch.device("meta"):
        projector, fusion = build_trainable(profile, base, feature_dim)
    return TrainableShape(_count(projector), _count(fusion, True), _count(fusion, False))


# --------------------------------------------------------------------------- activations


def layer_activation_bytes(base: BaseShape, dtype: str, rows: int, tokens: int) -> int:
    """Bytes one decoder layer after the first fused layer keeps for backward (module docstring)."""
    p, n, h = DTYPE_BYTES[dtype], rows * tokens, base.hidden_size
    if base.family == "opt":
        return n * (2 * p * h + p * (2 * base.q_width + 2 * base.kv_width) + p * base.mlp_width)
    return n * (2 * FP32 * h + p * (2 * base.q_width + 2 * base.kv_width) + 3 * p * base.mlp_width)


FUSION_BLOCK_TENSORS = 6  # fp32 (B, L, H): norm input, norm output, q, SDPA out, o_proj in, o_proj out
# The feed-forward (fusion.ffn_width F) keeps, per row-token, fp32: its norm's input and output and
# its gated output (3 H), the first linear's output and the GELU's (2 F).


def forward_activation_bytes(base: BaseShape, dtype: str, fusion_layers: list[int], rows: int, tokens: int,
                             encoder: EncoderShape, projector_cfg, num_tokens: int,
                             checkpointing: bool = False, ffn_width: int = 0,
                             answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> dict[str, int]:
    """What one forward with gradients keeps until its backward, by part.

    The LM head runs on the answer positions only (``logits_to_keep``, ``answer_tokens`` a row),
    so logits and their log-softmax are (rows x answer_tokens x vocab), not every position's.
    """
    p, n, h = DTYPE_BYTES[dtype], rows * tokens, base.hidden_size
    after = base.num_layers - 1 - min(fusion_layers)  # the fused layer's own hook runs after it
    layer = layer_activation_bytes(base, dtype, rows, tokens)
    if checkpointing:  # each checkpointed layer keeps its input; one is recomputed at a time
        layers = after * n * h * p + (layer if after else 0)
    else:
        layers = after * layer
    pooled = -(-encoder.frames // max(1, min(projector_cfg.frame_pool, encoder.frames)))
    mlp = max(1, int(h * projector_cfg.mlp_ratio))
    projector = FP32 * rows * (2 * pooled * encoder.feature_dim + num_tokens * (4 * h + 2 * mlp))
    return {
        "decoder_layers": layers,
        # + the cross-attention's softmax over the clip's tokens and the null slot, per head (fp32).
        "fusion_blocks": len(fusion_layers) * FP32 * n * (FUSION_BLOCK_TENSORS * h + (3 * h + 2 * ffn_width if ffn_width else 0)
                                                          + base.num_heads * (num_tokens + 1)),
        "final_norm": (FP32 if base.family == "llama" else p) * n * h,
        "log_softmax": rows * answer_tokens * base.vocab_size * FP32,  # the loss keeps it for backward
        # returned by the base (not a saved tensor, alive all the same)
        "logits": rows * answer_tokens * base.vocab_size * p,
        "projector": projector,
    }


def encoder_working_bytes(encoder: EncoderShape, rows: int) -> int:
    """Whisper's no-grad forward at its widest: x, residual, q, k, v and the 4x MLP hidden (9 x B·T·D).
    CLAP's HTSAT working set is not modelled (its input is one 1024 x 64 mel image per clip)."""
    if not encoder.width:
        return 0
    return 9 * rows * encoder.positions * encoder.width * DTYPE_BYTES[encoder.dtype]


# --------------------------------------------------------------------------- the estimate


@dataclass
class Row:
    component: str
    bytes: int
    params: Optional[int] = None
    dtype: Optional[str] = None
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class MemoryEstimate:
    profile: str
    variant: str
    sequence: dict[str, int]
    weights: list[Row] = field(default_factory=list)
    training: list[Row] = field(default_factory=list)
    inference: list[Row] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def rows(items):
            return [{**asdict(r), "gib": round(r.gib, 4)} for r in items]

        return {
            "schema": "safe.memory-estimate/1", "profile": self.profile, "variant": self.variant,
            "sequence": self.sequence, "params": self.params,
            "weights": rows(self.weights), "training": rows(self.training), "inference": rows(self.inference),
            "totals_bytes": self.totals, "totals_gib": {k: round(v / GIB, 3) for k, v in self.totals.items()},
            "assumptions": self.assumptions,
        }


def estimate_memory(profile: Profile, variant: Optional[str] = None,
                    text_tokens: int = DEFAULT_TEXT_TOKENS, answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> MemoryEstimate:
    """The whole estimate for one Stage A step and for inference; raises SafeError naming the key
    that cannot be estimated."""
    base_model = meta_base(profile.base)
    base = base_shape(base_model)
    encoder = encoder_shape(profile.audio_encoder, profile.data.max_audio_seconds)
    trainable = trainable_shape(profile, base_model, encoder.feature_dim)
    variant_name, retention = resolve_variant(profile, variant)
    dtype, p = profile.base.dtype, DTYPE_BYTES[profile.base.dtype]
    cfg = profile.training.stage_a
    tokens = base.num_image_tokens + text_tokens
    k = profile.projector.num_tokens
    n_train = trainable.projector + trainable.fusion_trainable

    est = MemoryEstimate(profile.name, variant_name, {
        "image_tokens": base.num_image_tokens, "text_tokens": text_tokens, "tokens": tokens,
        "answer_tokens": answer_tokens,
        "audio_frames": encoder.frames, "audio_tokens": k, "micro_batch": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "eval_batch": profile.evaluation.batch_size,
    })
    est.params = {"base": base.params, "audio_encoder": encoder.params, "projector": trainable.projector,
                  "fusion_trainable": trainable.fusion_trainable, "fusion_frozen": trainable.fusion_frozen,
                  "trainable": n_train}
    enc_dtype = encoder.dtype
    est.weights = [
        Row("base VL model (frozen)", base.params * p, base.params, dtype),
        Row("audio encoder (frozen)", encoder.params * DTYPE_BYTES[enc_dtype], encoder.params, enc_dtype,
            "ClapModel is kept whole (text tower too)" if encoder.kind in ("clap", "both") else ""),
        Row("fusion: base attention copies (frozen)", trainable.fusion_frozen * FP32, trainable.fusion_frozen,
            "float32", "init_from_base: q/k/v/o of each fused layer"),
        Row("projector (trainable)", trainable.projector * FP32, trainable.projector, "float32"),
        Row("fusion adapters: LoRA, norms, gates, null keys, feed-forwards (trainable)", trainable.fusion_trainable * FP32,
            trainable.fusion_trainable, "float32"),
    ]
    weights = sum(r.bytes for r in est.weights)

    # Stage A keeps every micro-batch's graph until one backward (stage_a._step sums the losses
    # first), plus the student forward on the retention batch when the variant uses one.
    uses_retention_batch = (retention.retention_loss_weight * retention.distillation_weight > 0
                            or retention.enable_null_space)
    # Stage A runs one backward per micro-batch, then the retention batch's: one batch at a time.
    held_rows = cfg.batch_size
    est.sequence["held_rows"] = held_rows
    fusion_layers = profile.fusion.layers

    def stored(checkpointing: bool) -> dict[str, int]:
        return forward_activation_bytes(base, dtype, fusion_layers, held_rows, tokens, encoder, profile.projector,
                                        k, checkpointing, profile.fusion.ffn_width, answer_tokens)

    plain, ckpt = stored(False), stored(True)
    fisher = 2 * n_train * FP32 if retention.retention_loss_weight * retention.fisher_weight > 0 else 0
    # Backward starts with d(log_softmax) and d(logits) of one forward alive at once.
    backward_logits = cfg.batch_size * answer_tokens * base.vocab_size * (FP32 + p)
    teacher = (cfg.batch_size * answer_tokens * base.vocab_size * p) if retention.retention_loss_weight * \
        retention.distillation_weight > 0 else 0
    encoder_work = encoder_working_bytes(encoder, cfg.batch_size)
    rows_note = f"{held_rows} rows x {tokens} tokens held until backward"
    est.training = [
        Row("gradients", n_train * FP32, n_train, "float32"),
        Row("AdamW state (exp_avg, exp_avg_sq)", 2 * n_train * FP32, 2 * n_train, "float32"),
        Row("Fisher + reference parameters", fisher, 2 * n_train if fisher else 0, "float32",
            "fisher variants only"),
        Row("activations kept for backward", sum(plain.values()), None, None, rows_note),
        Row("  of which decoder layers after the first fused one", plain["decoder_layers"], None, None,
            f"{base.num_layers - 1 - min(fusion_layers)} layers"),
        Row("  of which logits + log_softmax", plain["logits"] + plain["log_softmax"], None, None,
            f"{answer_tokens} answer positions a row x vocab {base.vocab_size}"),
        Row("activations with gradient checkpointing (not built yet)", sum(ckpt.values()), None, None,
            "layer inputs + one layer recomputed"),
        Row("backward: logit gradients of one micro-batch", backward_logits, None, None),
        Row("teacher logits (retention batch, no grad)", teacher, None, dtype),
        Row("audio encoder working set (no grad)", encoder_work, None, enc_dtype, "one micro-batch"),
    ]
    static = weights + n_train * FP32 * 3 + fisher
    transient = backward_logits + teacher + encoder_work
    est.totals["training"] = static + sum(plain.values()) + transient
    est.totals["training_checkpointed"] = static + sum(ckpt.values()) + transient

    b_eval = profile.evaluation.batch_size
    context = tokens + GENERATED_TOKENS
    kv = 2 * base.num_layers * b_eval * context * base.kv_width * p
    # A scoring forward (teacher-forced accuracy) returns every position's logits; one layer's
    # working set (its input, residual, q/k/v/out, the MLP's two hidden tensors) is alive at a time.
    working = b_eval * tokens * (base.vocab_size * (p + FP32) + p * (2 * base.hidden_size + 2 * base.q_width
                                                                      + 2 * base.kv_width + 2 * base.mlp_width))
    est.inference = [
        Row("all weights (above)", weights, sum(r.params or 0 for r in est.weights), None),
        Row("KV cache", kv, None, dtype, f"batch {b_eval} x {context} positions"),
        Row("forward working set (logits + one layer)", working, None, None, f"batch {b_eval}"),
        Row("audio encoder working set (no grad)", encoder_working_bytes(encoder, b_eval), None, enc_dtype),
    ]
    est.totals["inference"] = sum(r.bytes for r in est.inference)
    est.assumptions = [
        f"sequence = {base.num_image_tokens} image tokens + {text_tokens} text tokens (every row has an image)",
        "fused SDPA attention (no L x L matrix kept); the math fallback adds B*heads*L^2*2p per layer",
        f"the LM head and the loss run on {answer_tokens} answer positions a row (logits_to_keep); training "
        "forwards build no KV cache (use_cache=False)",
        "the frozen base keeps nothing for backward before the first fused layer "
        f"(layer {min(fusion_layers)}); {base.num_layers - 1 - min(fusion_layers)} layers after it do",
        f"Stage A holds one batch of {cfg.batch_size} at a time (a backward per micro-batch"
        + (", then one for the retention batch)" if uses_retention_batch else ")"),
        "not counted: CUDA context and allocator slack (add ~1 GiB), DDP gradient buckets (one more "
        "copy of the gradients), the image processor's inputs, CLAP's working set",
    ]
    return est


# --------------------------------------------------------------------------- measuring


def saved_tensor_bytes(run: Callable[[], Any], module: Optional[torch.nn.Module] = None) -> tuple[Any, int]:
    """Run ``run()`` and return (its result, bytes autograd saved for backward meanwhile).

    Counts each storage once while it is saved (views of one storage share it) and leaves out
    ``module``'s parameters and buffers (weights saved for backward cost nothing new). A storage
    freed at a backward and a later one at the same address count apart: keying by address
    alone made the figure depend on how the allocator reused memory between micro-batches.
    The check of the activation formula uses it.
    """
    import weakref

    owned = set()
    if module is not None:
        owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    live: dict[int, int] = {}  # address -> saved tensors using that storage now
    total = 0

    def release(address: int) -> None:
        live[address] -= 1
        if not live[address]:
            del live[address]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in owned:
            if address not in live:
                total += storage.nbytes()
            live[address] = live.get(address, 0) + 1
            weakref.finalize(tensor, release, address)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, total
