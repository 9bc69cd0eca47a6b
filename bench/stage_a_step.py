"""FLOPs of one Stage A optimizer step, before and after issue 27, and its peak memory estimate.

    python bench/stage_a_step.py [--layers 8] [--steps 8] [--out FILE]

Counted by torch's FlopCounterMode (matrix products and attention, forward and backward) on
the meta device: every tensor has its real shape and no arithmetic runs, so a base of
LLaVA-1.5-7B's width counts in seconds on a CPU. Two bases:

- ``7b-width``: LLaVA-1.5-7B's widths (hidden 4096, 32 heads, MLP 11008, vocabulary 32064, CLIP
  ViT-L/14 at 336 px: 576 image tokens) cut to ``--layers`` decoder layers, fusion at layers
  L/4 and L/2 (the 7B profile fuses at 8/16/24 of 32), Whisper-small-sized features (1500
  frames x 768, read from the encode-audio cache as at scale: no encoder runs), batch 8 x
  grad_accum 4 and the projector/fusion settings of ``llava15-7b-whisper-small``;
- ``demo``: the demo profile itself.

Both train on the demo's AV-digits records through the real data path (its prompts, processor,
grouping and answer positions). Three steps over the same rows, the ``soft_retention`` variant:

- ``before``: the step as of 11aeea3, restated here: micro-batches in draw order, every forward
  returns every position's full-vocabulary logits (and builds a KV cache), the loss and the KL
  upcast them all;
- ``+ answer positions``: today's ``StepLosses`` (logits only where an answer token is predicted,
  no KV cache) on the same ungrouped batches;
- ``+ grouping``: today's step on a row not seen before: ``StepLosses`` on batches grouped by
  image and text length;
- ``+ teacher cached``: today's step on rows seen before: their teacher logits come from the
  teacher cache, so no teacher forward runs (a run's share of such rows is 1 - distinct rows /
  retention rows drawn).

Every step sees the same examples, so FLOPs per step compare at equal examples seen. The
meta device cannot branch on values: the bench skips two checks transformers makes on them (that
the image tokens match the image features, and whether the padding mask is all ones); neither
changes a shape, so neither changes a count. The memory rows are ``estimate_memory``'s (the old
code also built a KV cache the estimate never counted: it is given beside). Writes JSON
(default bench/results/stage_a_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("SAFE_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "soft_retention"
SEVEN_B = ["base.dtype=bfloat16", "audio_encoder.kind=whisper", "audio_encoder.whisper.name_or_path=small","training.stage_a.batch_size=8", "training.stage_a.grad_accum=4", "projector.num_tokens=12",
           "projector.num_heads=8", "fusion.lora_rank=16", "fusion.lora_alpha=32",
           "base.tiny.hidden_size=4096", "base.tiny.num_attention_heads=32", "base.tiny.num_key_value_heads=32",
           "base.tiny.intermediate_size=11008", "base.tiny.vocab_size=32064", "base.tiny.max_position_embeddings=4096",
           "base.tiny.image_size=336", "base.tiny.patch_size=14", "base.tiny.vision_hidden_size=1024",
           "base.tiny.vision_layers=24", "base.tiny.vision_heads=16"]


def skip_value_checks() -> None:
    """Two checks transformers makes on tensor values, which the meta device has none of."""
    from transformers.models.llama import modeling_llama
    from transformers.models.llava import modeling_llava

    def placeholder_mask(self, input_ids, inputs_embeds, image_features):
        return (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)

    modeling_llava.LlavaModel.get_placeholder_mask = placeholder_mask
    modeling_llama.create_causal_mask = lambda **kwargs: None  # SDPA's is_causal: the same products


def profile_for(name: str, layers: int, grouped: bool):
    from safe_cli.config import load_profile

    overrides = [f"training.stage_a.group_by_modality_length={str(grouped).lower()}"]
    if name == "7b-width":
        overrides += SEVEN_B + [f"base.tiny.num_layers={layers}", f"fusion.layers=[{layers // 4},{layers // 2}]"]
    return load_profile("demo", overrides)


def meta_model(profile, feature_dim: int):
    """The profile's SAFE model with every weight on the meta device."""
    from transformers import LlavaForConditionalGeneration

    from safe_cli.foundation.tokenizer import build_processor
    from safe_cli.models.base import _wrap, tiny_llava_config
    from safe_cli.models.builder import build_trainable
    from safe_cli.models.safe_model import SAFEModel

    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(tiny_llava_config(profile.base.tiny))
    base = _wrap(profile.base.kind, llava, build_processor(profile.base.tiny))
    with torch.device("meta"):
        projector, fusion = build_trainable(profile, base, feature_dim, profile.seed)
    model = SAFEModel(base, projector, fusion, None)
    model.train()
    return model


def step_inputs(profile, model, steps: int, features: tuple[int, int]) -> list[dict]:
    """The data path's real batches for steps 1..steps, the clips replaced by cached-feature shapes."""
    from safe_cli.data.batches import PromptBatcher
    from safe_cli.data.sources import make_pool, training_and_validation
    from safe_cli.training.batches import sampling_weights
    from safe_cli.training.stage_a import ALIGNMENT_KINDS, RETENTION_KINDS
    from safe_cli.training.step_data import StepBatches, StepPlan

    records, _ = training_and_validation(profile)
    pool = make_pool(profile, records, 16000)
    alignment, retention = records.of_kinds(ALIGNMENT_KINDS), records.of_kinds(RETENTION_KINDS)
    cfg = profile.training.stage_a
    budgets = tuple(b for b in profile.policy.token_budgets if b > 0)
    plan = StepPlan(profile.seed, cfg.batch_size, 1, 0, cfg.grad_accum, 1, True, budgets,
                    cfg.group_by_modality_length)
    data = StepBatches(PromptBatcher.for_evaluation(model.base, profile.evaluation), pool.view(alignment),
                       pool.view(retention), plan, sampling_weights(alignment, profile.data.task_weights),
                       sampling_weights(retention, profile.data.task_weights))
    frames, width = features
    out = []
    for step in range(1, steps + 1):
        inputs = data[step]
        for batch in inputs["micro"] + inputs["retention"]:
            batch.pop("audio", None)
            batch.pop("audio_frame_mask", None)
            batch["audio_features"] = torch.empty(batch["rows"], frames, width, device="meta")
        out.append(inputs)
    return out


def before_step(model, inputs: dict, kl_weight: float, temperature: float) -> None:
    """Stage A's step as of 11aeea3 (stage_a._step and _retention_loss), restated on meta tensors."""
    from safe_cli.training.retention import distillation_kl_at
    from safe_cli.training.step_data import to_device

    skip = ("rows", "labels", "answer_index", "answer_targets", "answer_tokens")
    for batch in inputs["micro"]:
        batch = to_device(batch, torch.device("meta"))
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k not in skip}).logits  # every position, a KV cache
        shifted = logits[:, :-1].float()
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                               reduction="sum")
        loss.backward()
    for batch in inputs["retention"]:  # one batch of batch_size rows when ungrouped
        batch = to_device(batch, torch.device("meta"))
        audio = {k: batch[k] for k in ("audio_features",)}
        plain = {k: v for k, v in batch.items() if k not in skip + ("audio_features", "token_budget")}
        with torch.no_grad():
            teacher = model.base(**plain).logits
        student = model(**plain, token_budget=batch["token_budget"], **audio).logits
        # distillation_kl picked the answer positions out of the full logits by a boolean mask,
        # which the meta device cannot evaluate; taking them by index is the same products (the
        # gradient still reaches the LM head as a full (B, L, V) tensor).
        index = batch["answer_index"][..., None].expand(-1, -1, student.shape[-1])
        kl = distillation_kl_at(student.gather(1, index), teacher.gather(1, index), batch["answer_targets"],
                                temperature, normalizer=1.0)
        (kl_weight * kl).backward()


class WarmTeacherCache:
    """A teacher cache that holds every row (the steady state: each retention row seen before):
    its logits come from disk, so the step runs no teacher forward."""

    def logits(self, base, inputs, index, counts, keys, forward):
        return torch.zeros(*index.shape, base.model.get_output_embeddings().out_features, device=index.device)


def after_step(model, inputs: dict, kl_weight: float, temperature: float, warm: bool = False) -> None:
    from safe_cli.training.stage_a import TEACHER_KEYS, StepLosses

    retention = inputs["retention"]
    if warm:
        retention = [dict(batch, **{TEACHER_KEYS: ["cached"] * batch["rows"]}) for batch in retention]
    StepLosses(model, torch.device("meta"), kl_weight, temperature,
               teacher_cache=WarmTeacherCache() if warm else None).backward(inputs["micro"], retention, 1.0, 1.0)


def count(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def padding_share(steps: list[dict]) -> dict[str, float]:
    def share(key: str) -> float:
        batches = [b for s in steps for b in (s[key] or [])]
        total = sum(b["attention_mask"].numel() for b in batches)
        return float(sum(int((b["attention_mask"] == 0).sum()) for b in batches) / total)

    return {"alignment": share("micro"), "retention": share("retention")}


def measure(name: str, layers: int, steps: int) -> dict:
    from safe_cli.config.variants import resolve_variant
    from safe_cli.models.memory import encoder_shape, estimate_memory

    grouped_profile, plain_profile = profile_for(name, layers, True), profile_for(name, layers, False)
    _, variant = resolve_variant(grouped_profile, VARIANT)
    kl_weight = variant.retention_loss_weight * variant.distillation_weight
    temperature = grouped_profile.retention.temperature
    encoder = encoder_shape(grouped_profile.audio_encoder, grouped_profile.data.max_audio_seconds)
    features = (encoder.frames, encoder.feature_dim)
    model = meta_model(grouped_profile, features[1])
    grouped = step_inputs(grouped_profile, model, steps, features)
    plain = step_inputs(plain_profile, model, steps, features)
    per_step = {"before": [], "+ answer positions": [], "+ grouping": [], "+ teacher cached": []}
    for g, p in zip(grouped, plain):
        per_step["before"].append(count(lambda: before_step(model, p, kl_weight, temperature)))
        per_step["+ answer positions"].append(count(lambda: after_step(model, p, kl_weight, temperature)))
        per_step["+ grouping"].append(count(lambda: after_step(model, g, kl_weight, temperature)))
        per_step["+ teacher cached"].append(count(lambda: after_step(model, g, kl_weight, temperature, warm=True)))
        model.zero_grad(set_to_none=True)
    totals = {k: sum(v) for k, v in per_step.items()}
    before = totals["before"]
    est = estimate_memory(grouped_profile, VARIANT, text_tokens=64)
    shape = grouped_profile.base.tiny
    cfg = grouped_profile.training.stage_a
    tokens = est.sequence["tokens"]
    kv_cache = 2 * shape.num_layers * cfg.batch_size * tokens * shape.hidden_size // shape.num_attention_heads \
        * shape.num_key_value_heads * 4  # float32 on meta; bf16 halves it
    return {
        "base": name, "layers": shape.num_layers, "fusion_layers": grouped_profile.fusion.layers,
        "hidden": shape.hidden_size, "vocab": shape.vocab_size, "batch": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "steps_counted": steps, "examples_per_step": cfg.batch_size * (cfg.grad_accum + 1),
        "tflops_per_step": {k: v / steps / 1e12 for k, v in totals.items()},
        "ratio_to_before": {k: v / before for k, v in totals.items()},
        "share_removed": {"answer positions": (before - totals["+ answer positions"]) / before,
                          "grouping": (totals["+ answer positions"] - totals["+ grouping"]) / before,
                          "teacher cached": (totals["+ grouping"] - totals["+ teacher cached"]) / before},
        "padding_share": {"ungrouped": padding_share(plain), "grouped": padding_share(grouped)},
        "answer_tokens_per_micro_batch_ungrouped": sorted(b["answer_tokens"] for s in plain for b in s["micro"]),
        "tokens_per_micro_batch_ungrouped": sorted(b["attention_mask"].numel() for s in plain for b in s["micro"]),
        "memory_estimate_gib": est.to_json()["totals_gib"],
        "kv_cache_the_old_step_built_gib": kv_cache / 2**30,
        "memory_rows_gib": {r.component: round(r.gib, 3) for r in est.training},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B-width base")
    parser.add_argument("--steps", type=int, default=8, help="steps counted (each its own draw)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/stage_a_step.json")
    args = parser.parse_args()
    skip_value_checks()
    torch.manual_seed(0)
    np.random.seed(0)
    results = [measure("demo", 0, args.steps), measure("7b-width", args.layers, args.steps)]
    print(f"{'base':<10} {'step':<20} {'TFLOPs/step':>12} {'vs before':>10}")
    for r in results:
        for key, value in r["tflops_per_step"].items():
            print(f"{r['base']:<10} {key:<20} {value:>12.4f} {r['ratio_to_before'][key]:>10.3f}")
        print(f"{'':<10} share removed: answer positions {r['share_removed']['answer positions']:.1%}, grouping "
              f"{r['share_removed']['grouping']:.1%}, teacher cached {r['share_removed']['teacher cached']:.1%}; "
              "padding (alignment / retention rows) "
              f"{r['padding_share']['ungrouped']['alignment']:.1%} / {r['padding_share']['ungrouped']['retention']:.1%} "
              f"ungrouped, {r['padding_share']['grouped']['alignment']:.1%} / "
              f"{r['padding_share']['grouped']['retention']:.1%} grouped")
        answers, tokens = r["answer_tokens_per_micro_batch_ungrouped"], r["tokens_per_micro_batch_ungrouped"]
        print(f"{'':<10} ungrouped micro-batches: {answers[0]}-{answers[-1]} answer tokens, "
              f"{tokens[0]}-{tokens[-1]} positions (padded)")
        print(f"{'':<10} memory estimate: training {r['memory_estimate_gib']['training']:.2f} GiB; the old step "
              f"also built a {r['kv_cache_the_old_step_built_gib']:.2f} GiB KV cache (float32 here)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
