"""The profile schema: every setting SAFE reads, with its meaning as its description.

Each field's ``description`` is also its help text (``safe validate --explain``) and the
comment written beside it when a resolved profile is saved. Models forbid unknown keys so a
typo (``fusion.lyers``) is an error with its key path, never a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.prompts import template_problem

# YAML 1.1 reads an unquoted off/no/false as False and on/yes/true as True.
FALSE_WORDS, TRUE_WORDS = ("off", "no", "false"), ("on", "yes", "true")


def _boolean_as_choice(choices: tuple, value: bool) -> Any:
    """The choice an unquoted YAML word meant: ``autocast: off`` arrives as False and means "off"."""
    named = [c for c in choices if c in (TRUE_WORDS if value else FALSE_WORDS)]
    if named:
        return named[0]
    falsy = [c for c in choices if c in FALSE_WORDS]
    if value and len(choices) == 2 and falsy:  # a switch: true means the choice that is not "off"
        return next(c for c in choices if c not in FALSE_WORDS)
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, bool) and get_origin(field.annotation) is Literal:
                data = {**data, name: _boolean_as_choice(get_args(field.annotation), value)}
        return data

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_their_defaults(cls, data: Any) -> Any:
        """A section given in part keeps the rest of *its field's* default, not its class's.

        ``base.vision_pretrain`` defaults to 1200 x 128 at 6e-3 while a bare PretrainConfig is
        2500 x 32 at 2e-3: without this, ``--set base.vision_pretrain.steps=800`` would also
        turn the batch into 32 and the rate into 2e-3, silently.
        """
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, dict) and field.default_factory is not None:
                default = field.default_factory()
                if isinstance(default, BaseModel):
                    data = {**data, name: {**default.model_dump(exclude_unset=True), **value}}
        return data


# --------------------------------------------------------------------------- base model


class TinyLlavaConfig(Section):
    """Dimensions of the built-in LLaVA-architecture model (CLIP-style vision tower + Llama)."""

    vocab_size: int = Field(320, ge=16, description="Tokenizer vocabulary size.")
    hidden_size: int = Field(64, ge=8, description="LLM hidden size.")
    num_layers: int = Field(4, ge=1, description="Number of LLM decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="LLM attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="LLM key/value heads (grouped-query attention).")
    intermediate_size: int = Field(128, ge=8, description="LLM MLP width.")
    max_position_embeddings: int = Field(256, ge=16, description="Longest sequence the LLM accepts.")
    image_size: int = Field(28, ge=8, description="Side of the square input image in pixels.")
    patch_size: int = Field(7, ge=1, description="Vision-tower patch side; image_size must be a multiple.")
    vision_hidden_size: int = Field(64, ge=8, description="Vision-tower hidden size.")
    vision_layers: int = Field(2, ge=1, description="Vision-tower transformer layers.")
    vision_heads: int = Field(4, ge=1, description="Vision-tower attention heads.")

    @model_validator(mode="after")
    def _shapes_agree(self) -> "TinyLlavaConfig":
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.image_size % self.patch_size:
            problems.append("image_size must be a multiple of patch_size")
        if self.vision_hidden_size % self.vision_heads:
            problems.append("vision_hidden_size must be a multiple of vision_heads")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PretrainConfig(Section):
    """How the framework pretrains one of its built-in tiny foundation models (cached by content hash)."""

    steps: int = Field(2500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay).")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")


BaseKind = Literal["tiny-llava", "hf-llava", "hf-blip2"]
DType = Literal["float32", "bfloat16", "float16"]


class BaseModelConfig(Section):
    """The frozen vision-language model SAFE wraps."""

    kind: BaseKind = Field(
        "tiny-llava",
        description="tiny-llava (built-in, CPU), hf-llava (LlavaForConditionalGeneration) or "
        "hf-blip2 (Blip2ForConditionalGeneration).",
    )
    name_or_path: Optional[str] = Field(
        None,
        description="Hugging Face hub id or local directory for hf-* kinds (loaded with "
        "from_pretrained, processor with AutoProcessor). Unused for tiny-llava.",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) for hf-* kinds.")
    dtype: DType = Field(
        "float32",
        description="Dtype of the frozen base weights. bfloat16/float16 are for GPUs; the trainable "
        "parts always stay float32.",
    )
    prompt_template: Optional[str] = Field(
        None,
        description="How a question is put to the base: llava-1.5 (\"USER: <image>\\n{question} ASSISTANT:\"), "
        "llava-1.5-short (the same with LLaVA-1.5's \"Answer the question using a single word or phrase.\"), "
        "blip2 (\"Question: {question} Answer:\"), chat (the processor's chat template), or a format string with "
        "{question} and optionally {image}. Default: llava-1.5 for tiny-llava, llava-1.5-short for hf-llava, "
        "blip2 for hf-blip2.",
    )
    end_of_answer_ids: Optional[list[int]] = Field(
        None, description="Token ids that end an answer (the first one ends training answers). Default: the "
        "checkpoint's generation_config eos_token_id, else its text config's, else the tokenizer's.",
    )
    tiny: TinyLlavaConfig = Field(default_factory=TinyLlavaConfig, description="Dimensions for tiny-llava.")
    seed: int = Field(0, description="Initialisation seed of the tiny-llava weights (before its pretraining).")
    vision_pretrain: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(steps=1200, batch_size=128, lr=6e-3),
        description="tiny-llava stage 1: the vision tower learns digits with a temporary classifier, as "
        "CLIP is pretrained before LLaVA (safe prepare). Measured on demo: 1200 x 128 at 6e-3 gives the "
        "base the VL accuracy of 4500 x 32 at 3e-3 (98-99.5%) in 52 s on one core where that took 74 s on two.",
    )
    pretrain: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(steps=1500),
        description="tiny-llava stage 2: the whole model on the AV-digits VL and text questions (safe prepare).",
    )

    @model_validator(mode="after")
    def _path_for_hf(self) -> "BaseModelConfig":
        if self.kind != "tiny-llava" and not self.name_or_path:
            raise ValueError(f"name_or_path is required when kind is {self.kind!r}")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _usable_template(cls, value: Optional[str]) -> Optional[str]:
        problem = None if value is None else template_problem(value)
        if problem:
            raise ValueError(problem)
        return value


# --------------------------------------------------------------------------- audio


class WhisperConfig(Section):
    name_or_path: str = Field(
        "small",
        description="openai-whisper model name (tiny, base, small, ...), a path to a .pt checkpoint "
        "(loaded with whisper.load_model), or a CTranslate2 Whisper folder as faster-whisper and WhisperX keep them "
        "(model.bin, config.json, vocabulary; converted to whisper's own model once and cached). Only the encoder "
        "is kept.",
    )
    trim_to_clip: bool = Field(
        False,
        description="Encode each clip over its own length, rounded up to whole seconds (at most the window), "
        "adding only the first rows of whisper's positional embedding, instead of whisper's faithful "
        "padding of every clip to the 30 s window. Faster on short clips, but the features differ from "
        "whisper's own (whisper attends over the padding too), so the cache keeps them apart; the default "
        "false is whisper's exact computation. Applies to whisper, both and tiny-whisper; safe "
        "encode-audio --trim/--no-trim overrides it.",
    )
    backend: Literal["openai-whisper", "ctranslate2"] = Field(
        "openai-whisper",
        description="What runs the encoder's forward: openai-whisper (PyTorch, the reference) or ctranslate2 "
        "(CTranslate2's Whisper.encode in compute_type; needs a CTranslate2 folder as name_or_path and kind "
        "whisper). bench/ctranslate2_encoder.py, tiny.en, one CPU thread: int8 3.2x openai-whisper's clips/s on "
        "trimmed clips, 1.1x on the 30 s window, the same probe accuracy; its features differ, so caches keep "
        "them apart and training must name the same backend.",
    )
    compute_type: Literal["int8", "int8_float32", "float32", "int8_float16", "int8_bfloat16", "float16",
                          "bfloat16"] = Field(
        "int8", description="CTranslate2's compute type for backend ctranslate2 (int8: int8 weights).",
    )


class ClapConfig(Section):
    name_or_path: str = Field(
        "laion/clap-htsat-unfused",
        description="Hugging Face hub id or local directory of a ClapModel and its feature extractor.",
    )


class AudioEncoderConfig(Section):
    """The frozen audio encoder whose features the projector turns into audio tokens."""

    kind: Literal["tiny-whisper", "whisper", "clap", "both"] = Field(
        "tiny-whisper",
        description="tiny-whisper (built-in whisper-architecture encoder), whisper, clap, or both "
        "(whisper frames with the CLAP embedding concatenated to each).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights of the frozen encoder (bfloat16 halves its memory on a GPU; its features "
        "then differ from float32's, so a feature cache made with another dtype does not match)."
    )
    memory_cache_mb: int = Field(
        256, ge=0, description="Stage A keeps each clip's features in memory after its first encoding, up to "
        "this many MiB on the encoder's device (the encoder is frozen: a clip's features depend on its samples "
        "alone); 0 encodes every clip every time. Not used with data.audio_features.",
    )
    whisper: WhisperConfig = Field(default_factory=WhisperConfig, description="Settings for whisper and both.")
    clap: ClapConfig = Field(default_factory=ClapConfig, description="Settings for clap and both.")
    tiny_state: int = Field(64, ge=8, description="tiny-whisper: encoder width.")
    tiny_layers: int = Field(2, ge=1, description="tiny-whisper: encoder layers.")
    tiny_heads: int = Field(2, ge=1, description="tiny-whisper: encoder attention heads.")
    tiny_window_seconds: float = Field(
        2.4, gt=0, le=30, description="tiny-whisper: the input window (whisper's own is 30 s); clips are "
        "padded or cut to it. 2.4 s holds every FSDD recording."
    )
    tiny_pretrain: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(steps=600, lr=2e-3),
        description="tiny-whisper: pretraining on audio digit recognition, head discarded (safe prepare).",
    )


# --------------------------------------------------------------------------- trainable parts


class ProjectorConfig(Section):
    num_tokens: int = Field(
        12, ge=1, le=256, description="K_max: audio tokens the projector makes; a budget k uses the first k."
    )
    mlp_ratio: float = Field(2.0, gt=0, description="Width of the projector's MLP relative to the LLM hidden size.")
    num_heads: int = Field(4, ge=1, description="Heads of the projector's pooling attention.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the projector during training.")
    frame_pool: int = Field(
        5, ge=1, description="Average this many encoder frames before pooling (whisper: 5 frames = 100 ms)."
    )


class FusionConfig(Section):
    layers: list[int] = Field(
        default_factory=lambda: [1, 3],
        description="LLM decoder layers (0-based) after which gated audio cross-attention is inserted.",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank of the cross-attention projections (peft).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    init_from_base: bool = Field(
        True,
        description="Initialise the cross-attention q/k/v/o from the base layer's own self-attention "
        "(frozen) and learn LoRA deltas; false trains fresh projections fully.",
    )
    gate_init: float = Field(
        0.0, description="Initial value of each layer's tanh gate; 0 makes the untrained model equal the base."
    )
    null_slot: bool = Field(
        True, description="Give each cross-attention a learned key with a zero value, so a text position can "
        "attend to no audio at all (what a VL question with an unrelated clip needs)."
    )
    ffn_width: int = Field(
        0, ge=0, description="Width of a gated feed-forward after each cross-attention (Flamingo's gated "
        "xattn-dense block; its gate starts at zero too); 0 = none. Attention only adds a weighted mean of audio "
        "values; the feed-forward can combine what a text position holds (the shown digit) with what it read "
        "(the spoken one). On avdigits (soft retention, 4,500 steps) 'same digit?' went from 55% without it (1,500 "
        "steps) to 89.5% at width 256 and 90.5% at 512, the sum from 0.5% to 72.5% and 81.5%. "
        "Trainable parameters per fused layer: 2 x hidden x width."
    )

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, layers: list[int]) -> list[int]:
        if not layers:
            raise ValueError("at least one fusion layer is needed")
        if any(layer < 0 for layer in layers):
            raise ValueError("layer indices must be >= 0")
        if len(set(layers)) != len(layers):
            raise ValueError("layer indices must be unique")
        return sorted(layers)


class PolicyConfig(Section):
    token_budgets: list[int] = Field(
        default_factory=lambda: [0, 4, 8, 12],
        description="Budget set the policy chooses from; must contain 0 (skip audio entirely).",
    )
    hidden_size: int = Field(64, ge=4, description="Hidden width of the policy network.")

    @field_validator("token_budgets")
    @classmethod
    def _budgets(cls, budgets: list[int]) -> list[int]:
        if 0 not in budgets:
            raise ValueError("must contain 0 (the budget that skips audio and keeps the base bit-exact)")
        if any(b < 0 for b in budgets):
            raise ValueError("budgets must be >= 0")
        if len(set(budgets)) != len(budgets):
            raise ValueError("budgets must be unique")
        if len(budgets) < 2:
            raise ValueError("needs at least one positive budget besides 0")
        return sorted(budgets)


# --------------------------------------------------------------------------- data


class DataConfig(Section):
    source: Literal["synthetic", "fsdd-mnist", "manifest"] = Field(
        "synthetic",
        description="synthetic (embedded AV-digits, needs nothing), fsdd-mnist (real FSDD + MNIST under root) or "
        "manifest (your own records: train_manifests / validation_manifests / eval_manifests). The AV-digits "
        "sources are exported to manifests in the cache and read like yours.",
    )
    root: Optional[str] = Field(
        None, description="Directory of FSDD + MNIST for fsdd-mnist; the SAFE_DATA_ROOT environment variable "
        "overrides it, --set data.root=DIR overrides both."
    )
    split: Literal["takes", "speakers"] = Field(
        "takes", description="fsdd-mnist test split: FSDD takes 0-4 (convention) or held-out speakers."
    )
    held_out_speakers: list[str] = Field(
        default_factory=lambda: ["theo"], description="Speakers held out when split is speakers."
    )
    train_manifests: list[str] = Field(
        default_factory=list, description="Training manifests (JSON/JSONL, this project's format or ShareGPT's) for "
        "source manifest: audio/av records teach the adapters, vl/text records are retention data."
    )
    validation_manifests: list[str] = Field(
        default_factory=list, description="Validation manifests (Stage C's calibration); without them "
        "validation_fraction of the training records is held out instead."
    )
    eval_manifests: list[str] = Field(
        default_factory=list, description="Evaluation manifests for source manifest (end of each stage, "
        "eval-retention). Never used to train or calibrate."
    )
    validation_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the training records (chosen by a hash of their id, so stable "
        "under reordering) held out for Stage C's calibration when no validation_manifests are given."
    )
    task_weights: dict[str, float] = Field(
        default_factory=dict, description="Sampling shares of the training batches by task or kind, e.g. "
        "{audio/caption: 2, av: 1}: a task's share is its weight over the sum of the weights of the tasks present "
        "(unlisted tasks weigh 1). Empty: every record is equally likely."
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="A record whose image or clip fails to decode during training is skipped and "
        "counted; past this share of the training records the run stops (exit 1) with a checkpoint."
    )
    loader_workers: Optional[int] = Field(
        None, ge=0, description="DataLoader worker processes that read records, decode media and run the base's "
        "processor for the next steps while the current one trains (0: in the training process). Default: 2 when "
        "training on CUDA, 0 on the CPU, where a worker takes cores from the training step itself (bench/"
        "data_loader.py measures both)."
    )
    media_cache_mb: float = Field(
        512.0, ge=0, description="Decoded images and clips kept in memory per process (least recently used go first)."
    )
    foundation_source: Optional[Literal["synthetic", "fsdd-mnist"]] = Field(
        None, description="The AV-digits source the built-in tiny models (tiny-llava, tiny-whisper) pretrain on; "
        "default: data.source when that is an AV-digits source, else synthetic. Unused with real checkpoints."
    )
    num_train: int = Field(2000, ge=1, description="AV-digits: training examples generated per question family.")
    num_eval: int = Field(200, ge=1, description="AV-digits: evaluation examples generated per question family.")
    sample_rate: int = Field(16000, ge=1000, description="Audio is resampled to this rate before encoding.")
    max_audio_seconds: float = Field(30.0, gt=0, description="Longer clips are cut to this length.")
    audio_features: Optional[str] = Field(
        None, description="A feature cache made by `safe encode-audio` with this profile's encoder: training and "
        "evaluation read each clip's features from it (found by the file's content hash) instead of running the "
        "encoder. Every clip the records use must be in it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_train_manifest(cls, values):
        if isinstance(values, dict) and "train_manifest" in values:
            import warnings

            values = dict(values)
            old = values.pop("train_manifest")
            if old:  # a profile saved before the key was renamed holds null here: nothing to say
                values["train_manifests"] = list(values.get("train_manifests") or []) + [old]
                warnings.warn("data.train_manifest is deprecated; use data.train_manifests: [path, ...]",
                              FutureWarning, stacklevel=2)
        return values


# --------------------------------------------------------------------------- training


class StageAConfig(Section):
    steps: int = Field(400, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per step (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr_projector: float = Field(3e-3, gt=0, description="Learning rate of the projector.")
    lr_adapter: float = Field(
        3e-3, gt=0, description="Learning rate of the fusion adapters (LoRA, norms, gates, null keys). Adam moves a "
        "tanh gate by about lr per step, so a short run needs a larger rate than a long one."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before cosine decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    retention_every: int = Field(
        1, ge=1, description="A retention batch every N steps (measured on demo: every step keeps VL with a "
        "distractor 2-5 points closer to the base than every second step)."
    )
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint interval in steps (and at the end).")
    keep_last: Optional[int] = Field(
        3, ge=1, description="Checkpoints kept: older ones are deleted once a newer one is complete (null keeps "
        "all)."
    )
    log_every: int = Field(10, ge=1, description="Metrics interval in steps.")
    cache_teacher: bool = Field(
        True, description="Keep the frozen base's logits on each retention row on disk (SAFE's cache, teacher/) "
        "and run the teacher only on rows not seen before (~1.5 GB for 8,000 rows at LLaVA-7B's vocabulary)."
    )
    group_by_modality_length: bool = Field(
        True, description="Batch each step's rows by image / no image and text length (the same rows, less "
        "padding: LLaVA's group_by_modality_length). false: micro-batches in draw order."
    )


class StageBConfig(Section):
    steps: int = Field(400, ge=1, description="Policy-gradient steps (avdigits: the policy settled after ~200).")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    audio_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of each batch drawn from questions that need the audio (audio, AV); "
        "the rest are VL and text questions with a distractor clip, where audio only costs."
    )
    lr: float = Field(3e-3, gt=0, description="Policy learning rate (Adam).")
    alpha: float = Field(
        0.05, ge=0, description="Price of audio in the reward: reward = task score - alpha * cost / cost of the "
        "largest budget, so 0.05 means a full audio pass must buy 5 accuracy points (measured on demo: 0.5 also "
        "skipped audio questions whose gain was 6-35 points, 0.05 kept audio accuracy within 1 point)."
    )
    entropy_weight: float = Field(0.01, ge=0, description="Entropy bonus.")
    value_weight: float = Field(0.5, ge=0, description="Weight of the value baseline's squared error.")
    estimator: Literal["all_budgets", "sampled"] = Field(
        "all_budgets", description="all_budgets: every example is answered at every budget of the set (one "
        "forward per budget) and the policy gradient is the exact expectation over budgets, with the value as "
        "baseline; nothing depends on which budgets happen to be sampled, so no question type is abandoned "
        "early. sampled: REINFORCE on one sampled budget per example (one forward; measured on the demo, it "
        "once stopped giving audio to a question type worth +35 points). tune_adapters always samples."
    )
    normalize_advantages: bool = Field(
        True, description="sampled estimator: standardise each batch's advantages (reward - value) before the "
        "policy gradient, so the small reward differences of a cheap price (alpha) still move the policy."
    )
    lagrange_lr: float = Field(
        0.05, ge=0, description="Step size of the retention multiplier: it rises while SAFE's accuracy on VL/text "
        "questions with a distractor clip is below the base's minus evaluation.tolerance, and falls back to 0 after."
    )
    state_samples: int = Field(
        256, ge=2, description="Training examples whose states fit the feature standardisation and whose base "
        "accuracy (with a distractor clip) is the retention constraint's reference."
    )
    tune_adapters: bool = Field(False, description="Lightly tune the fusion adapters during Stage B (audio loss on "
                                "the rows the policy gives audio, KL to the base on distractor rows given audio).")
    adapter_lr: float = Field(1e-4, gt=0, description="Learning rate of the adapters when tune_adapters is on.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint interval in steps (and at the end).")
    log_every: int = Field(10, ge=1, description="Metrics interval in steps.")


class StageCConfig(Section):
    target: Literal["accuracy", "audio_usage"] = Field(
        "accuracy", description="What the gate's threshold is calibrated for on the validation examples."
    )
    target_value: float = Field(
        1.0, gt=0, le=1, description="accuracy: keep at least this fraction of the policy's accuracy with the "
        "fewest examples given audio; audio_usage: give audio to about this fraction of examples with a clip."
    )
    steps: int = Field(200, ge=1, description="Distillation steps.")
    batch_size: int = Field(64, ge=1, description="States per distillation step.")
    lr: float = Field(3e-3, gt=0, description="Learning rate of the gate.")
    hidden_size: int = Field(16, ge=1, description="Hidden width of the light gate.")
    train_examples: int = Field(1024, ge=8, description="Training examples whose policy decisions are distilled.")
    validation_examples: int = Field(
        512, ge=8, description="Examples the threshold is calibrated on: fresh question/image/clip pairings of the "
        "training split (never the test split), answered at every budget."
    )


class TrainingConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when available.")
    autocast: Literal["off", "bf16"] = Field(
        "off", description="Run the trainable parts (projector, fusion adapters) under torch.autocast in bfloat16: "
        "their weights, gradients and optimizer state stay float32. The frozen base runs in base.dtype and is never "
        "autocast, so budget-0 rows stay bit-identical to it."
    )
    stage_a: StageAConfig = Field(default_factory=StageAConfig, description="Stage A: alignment.")
    stage_b: StageBConfig = Field(default_factory=StageBConfig, description="Stage B: policy learning.")
    stage_c: StageCConfig = Field(default_factory=StageCConfig, description="Stage C: policy distillation.")


# --------------------------------------------------------------------------- retention


class RetentionVariant(Section):
    """Weights of the retention terms; the seed's five variants are built in (variants.py)."""

    extends: Optional[str] = Field(
        None, description="Start from this variant (built-in or defined earlier) and override the given fields."
    )
    description: str = Field("", description="What this variant is for.")
    retention_loss_weight: float = Field(1.0, ge=0, description="Scale of the whole retention loss.")
    distillation_weight: float = Field(0.0, ge=0, description="Weight of KL(teacher || student) on answer tokens.")
    fisher_weight: float = Field(0.0, ge=0, description="Weight of the diagonal-Fisher (EWC) penalty.")
    enable_null_space: bool = Field(False, description="Project gradients off protected input directions.")
    null_space_rank: int = Field(8, ge=1, description="Protected singular directions per layer.")
    null_space_min_samples: int = Field(128, ge=1, description="Inputs collected before projecting.")
    null_space_refresh_interval: int = Field(4000, ge=1, description="Steps between recomputing the bases.")


class RetentionConfig(Section):
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (the loss is scaled by T^2).")
    fisher_samples: int = Field(64, ge=1, description="Retention examples used to estimate the diagonal Fisher.")
    default_variant: str = Field("soft_retention", description="Variant used when --variant is not given.")
    variants: dict[str, RetentionVariant] = Field(
        default_factory=dict,
        description="Extra variants (or overrides of built-ins), merged over the built-in five.",
    )


# --------------------------------------------------------------------------- evaluation, sweep


class EvaluationConfig(Section):
    tolerance: float = Field(0.005, ge=0, lt=1, description="Allowed accuracy drop (0.005 = 0.5 points).")
    significance: float = Field(0.05, gt=0, lt=1, description="Significance level of McNemar's exact test (and "
                                "1 - the confidence of the non-inferiority bound).")
    rule: Literal["non-inferiority", "significant-harm"] = Field(
        "non-inferiority", description="eval-retention's gate: non-inferiority (every VL/text task shown to drop "
        "less than tolerance: one-sided lower bound >= -tolerance; a task the data cannot decide fails) or "
        "significant-harm (only a drop beyond tolerance with Holm-adjusted p < significance fails).",
    )
    bootstrap_samples: int = Field(2000, ge=100, description="Paired bootstrap resamples for the 95% interval.")
    max_examples: Optional[int] = Field(None, ge=1, description="Cap on examples per task (None = all).")
    batch_size: int = Field(32, ge=1, description="Evaluation batch size.")
    max_new_tokens: Optional[int] = Field(
        None, ge=1, description="Longest generated answer in tokens (greedy decoding stops earlier at the end of "
        "the answer). None: per batch, its longest reference answer in tokens plus 5 (16 without references).",
    )
    task_max_new_tokens: dict[str, int] = Field(
        default_factory=dict, description="Longest generated answer per task or kind (a task's own entry wins), "
        "over max_new_tokens.",
    )
    metrics: dict[str, Literal["exact", "contains", "token_f1", "bleu", "chrf", "wer"]] = Field(
        default_factory=dict, description="Score per task or kind (a task's own entry wins), default exact: exact "
        "(normalised exact match, several references allowed), contains (a reference appears in the answer), "
        "token_f1 (SQuAD-style), bleu / chrf (sacrebleu, sentence level, /100), wer (jiwer; score 1 - WER, at "
        "least 0)."
    )


class SlurmConfig(Section):
    partition: Optional[str] = Field(None, description="sbatch --partition.")
    account: Optional[str] = Field(None, description="sbatch --account.")
    time: str = Field("04:00:00", description="sbatch --time (HH:MM:SS or D-HH:MM:SS).")
    gpus: int = Field(0, ge=0, description="GPUs per array task.")
    cpus: int = Field(2, ge=1, description="CPUs per array task.")
    mem: str = Field("8G", description="sbatch --mem.")
    signal_seconds: int = Field(
        120, ge=0, description="Seconds before the time limit at which the job is signalled to checkpoint."
    )
    setup: list[str] = Field(
        default_factory=list, description="Shell lines run before safe (module load, venv activation)."
    )
    extra_args: list[str] = Field(default_factory=list, description="Further #SBATCH lines, e.g. --qos=high.")
    python: Optional[str] = Field(
        None, description="Python that runs `-m safe_cli` in the jobs (default: the one running safe sweep; "
        "set `python` when the setup lines activate an environment)."
    )

    @field_validator("time")
    @classmethod
    def _time_format(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}(:\d{2})?", value):
            raise ValueError("expected HH:MM:SS or D-HH:MM:SS")
        return value


class SweepConfig(Section):
    variants: list[str] = Field(
        default_factory=lambda: ["no_retention", "soft_retention", "fisher_retention",
                                 "nullspace_retention", "full_retention"],
        description="Variants in the sweep grid.",
    )
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], description="Seeds in the sweep grid.")
    stages: list[Literal["a", "b", "c"]] = Field(default_factory=lambda: ["a"], description="Stages to run.")
    parallel: int = Field(
        1, ge=1, description="Local mode: runs trained at once (subprocesses; each gets cores/parallel torch "
        "threads unless OMP_NUM_THREADS is set). --parallel overrides it."
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Options for --slurm.")


# --------------------------------------------------------------------------- the profile


class Profile(Section):
    """A whole SAFE profile: what to wrap, what to train, how to judge it."""

    name: str = Field(..., min_length=1, description="Profile name; part of every run directory.")
    description: str = Field("", description="One line on what this profile is for.")
    extends: Optional[str] = Field(
        None, description="Built-in profile name or path whose settings this file overrides (resolved on load)."
    )
    seed: int = Field(0, description="Default seed of runs (overridden by --seed).")
    runs_dir: str = Field("runs", description="Where run directories are created.")
    base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="The frozen VL model.")
    audio_encoder: AudioEncoderConfig = Field(default_factory=AudioEncoderConfig, description="The frozen audio encoder.")
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig, description="Audio projector.")
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="Gated LoRA cross-attention fusion.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Token-budget policy.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and evaluation data.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Per-stage training settings.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="Retention variants.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Retention evaluation.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Sweeps, local and SLURM.")
