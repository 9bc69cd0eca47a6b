"""What a deployed answer costs: the base alone, always-max audio, and the gate before and after
issue 25, wall time per example side by side in one run, with the cost model's FLOPs beside it.

    python bench/deploy_cost.py [--usage 0.5] [--batch-size 8] [--batches 6] [--repeats 15] [--out FILE]

Two bases, each answering the same spoken-digit and VL questions, every one with a clip:

- ``demo``: the demo's pretrained tiny LLaVA (hidden 64, 4 layers) and tiny Whisper;
- ``hidden-512``: a LLaVA of the same vocabulary and vision tower, hidden 512 and 8 layers
  (random weights: time and FLOPs do not depend on what the weights learned), with the demo's
  encoder. Its audio path is a smaller share of the whole, as on real bases.

Rows, each answering ``--new-tokens`` tokens (min = max, so every strategy decodes the same
steps):

- base alone: the frozen base's own generate, no audio;
- always-max: every clip through the encoder and the fused layers at the largest budget;
- gate, before: what ``deploy.answer`` did before issue 25: a full forward of the base over the
  prompt to read the state (all layers and the logits), then generate with those budgets;
- gate, after: ``deploy.answer`` now: one prefill, the decision at the first fused layer;
- budgets known: the gate's budgets handed to generate, nothing decided: the floor for a mixed
  batch, so "after" minus this is what deciding costs.

Adapters are perturbed (non-zero gates and LoRA) so the audio rows do real work. The gate is an
untrained MLP whose threshold is set so that it gives audio to ``--usage`` of the examples
(default 0.5: the avdigits gate's 49.4%); what it costs depends on how often it says yes, not on
what it learned. Rows are timed in rotating order, ``--repeats`` rounds over the same batches;
medians of per-example time. The cost model's ratios are for the same examples and tokens;
"predicted" is 1 + usage x (always-max / base - 1), what the gate costs if deciding is free.
Writes JSON (default bench/results/deploy_cost.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from safe_cli.config import load_profile
from safe_cli.data.batches import PromptBatcher, generate_answers
from safe_cli.data.sources import split_pool
from safe_cli.deploy import answer, decide_budgets
from safe_cli.foundation.prepare import load_prepared_models
from safe_cli.models import build_safe_model
from safe_cli.models.base import load_base_from_directory, tiny_llava_config
from safe_cli.models.bypass import perturb_adapters
from safe_cli.rl.cost import AudioCostModel, EndToEndCost
from safe_cli.rl.gate import AudioGate
from safe_cli.rl.state import base_inputs, pool_policy_inputs, state_dim

ROWS = ("base alone", "always-max", "gate, before", "gate, after", "budgets known")


def larger_base(base, directory: Path, hidden: int, layers: int):
    """A random-weight LLaVA with the demo base's tokenizer, vision tower shape and vocabulary,
    saved and loaded through the same path a user's checkpoint takes."""
    from transformers import LlavaForConditionalGeneration

    profile = load_profile("demo", [f"base.tiny.hidden_size={hidden}", f"base.tiny.num_layers={layers}",
                                    f"base.tiny.intermediate_size={4 * hidden}",
                                    f"base.tiny.num_attention_heads={hidden // 64}",
                                    f"base.tiny.num_key_value_heads={hidden // 128}"])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(profile.base.tiny))
    model.save_pretrained(directory)
    base.processor.save_pretrained(directory)
    loaded = load_base_from_directory("tiny-llava", directory, prompt_template=profile.base.prompt_template,
                                      end_of_answer=profile.base.end_of_answer_ids)
    return profile, loaded


def gate_at_usage(model, features: torch.Tensor, has_clip: torch.Tensor, usage: float, budget: int) -> AudioGate:
    torch.manual_seed(0)
    gate = AudioGate(state_dim(model.base.hidden_size), hidden_size=16, budget_on=budget, token_budgets=[0, budget])
    gate.normalizer.fit(features)
    probabilities = gate.probability(features)[has_clip].sort(descending=True).values
    chosen = max(1, round(usage * len(probabilities)))
    gate.threshold = float(probabilities[chosen - 1])
    return gate.eval()


def measure(name: str, profile, model, args) -> dict:
    perturb_adapters(model)
    budget = max(profile.policy.token_budgets)
    batcher = PromptBatcher(model.base)
    pool = split_pool(load_profile("demo"), "test", model.audio_encoder.sample_rate)
    with_clip = [e for e in pool.examples if e.audio is not None]
    rng = np.random.default_rng(0)
    picked = [with_clip[i] for i in rng.permutation(len(with_clip))[: args.batch_size * args.batches]]
    batches = [picked[i: i + args.batch_size] for i in range(0, len(picked), args.batch_size)]
    states = [pool_policy_inputs(model, batcher, pool, chosen) for chosen in batches]
    features = torch.cat([s.features for s in states])
    has_clip = torch.cat([s.has_clip for s in states])
    gate = gate_at_usage(model, features, has_clip, args.usage, budget)
    n = args.new_tokens
    fixed = dict(min_new_tokens=n)

    def queries(chosen):
        return pool.queries(chosen, with_answers=False)

    def base_alone(chosen):
        generate_answers(model.base_model, batcher, queries(chosen), n, **fixed)

    def always_max(chosen):
        generate_answers(model, batcher, queries(chosen), n, token_budget=torch.full((len(chosen),), budget),
                         audio=pool.audio(chosen), **fixed)

    def gate_before(chosen):
        batch = batcher.for_generation(queries(chosen))
        model.base(**base_inputs(model.base, batch))  # the old state: the whole base and its logits
        budgets = decide_budgets(model, gate, batcher, queries(chosen), pool.audio(chosen))
        generate_answers(model, batcher, queries(chosen), n, token_budget=budgets, audio=pool.audio(chosen), **fixed)

    def gate_after(chosen):
        answer(model, gate, batcher, queries(chosen), pool.audio(chosen), n, **fixed)

    known = {id(chosen): decide_budgets(model, gate, batcher, queries(chosen), pool.audio(chosen)) for chosen in batches}

    def budgets_known(chosen):
        generate_answers(model, batcher, queries(chosen), n, token_budget=known[id(chosen)], audio=pool.audio(chosen),
                         **fixed)

    runs = dict(zip(ROWS, (base_alone, always_max, gate_before, gate_after, budgets_known)))
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            for j, chosen in enumerate(batches):
                order = ROWS[(round_ + j) % len(ROWS):] + ROWS[: (round_ + j) % len(ROWS)]
                for row in order:
                    start = time.perf_counter()
                    runs[row](chosen)
                    if round_ >= args.warmup:
                        times[row].append((time.perf_counter() - start) / len(chosen))
    medians = {row: statistics.median(values) for row, values in times.items()}

    # The cost model over the same examples and tokens.
    cost = EndToEndCost.for_model(model, AudioCostModel.for_model(model, budget))
    decision = cost.decision_flops(gate.net)
    state = torch.cat([s.text_length for s in states]), torch.cat([s.clip_seconds for s in states])
    has_image = torch.cat([s.has_image for s in states])
    chosen_budgets = gate.decide(features, has_clip)
    flops = {row: 0.0 for row in ROWS}
    for i in range(len(features)):
        length, seconds, image = int(state[0][i]), float(state[1][i]), bool(has_image[i])
        base_cost = cost.flops(0, length, seconds, n, image)
        gated = cost.flops(int(chosen_budgets[i]), length, seconds, n, image, decision)
        flops["base alone"] += base_cost
        flops["always-max"] += cost.flops(budget, length, seconds, n, image)
        flops["gate, after"] += gated
        flops["budgets known"] += gated - decision
        # before: the same answer plus a full prefill (image included) to read the state
        flops["gate, before"] += gated + cost.llm.prefill_flops(length) + (cost.image if image else 0.0)
    usage = float((chosen_budgets[has_clip] > 0).float().mean())
    base_time, base_flops = medians["base alone"], flops["base alone"]
    predicted_time = 1 + usage * (medians["always-max"] / base_time - 1)
    predicted_flops = 1 + usage * (flops["always-max"] / base_flops - 1)
    return {
        "model": name, "hidden": model.base.hidden_size, "layers": model.base.num_layers,
        "examples": len(picked), "audio_usage": usage, "new_tokens": n,
        "ms_per_example": {row: 1000 * medians[row] for row in ROWS},
        "time_vs_base": {row: medians[row] / base_time for row in ROWS},
        "time_vs_always_max": {row: medians[row] / medians["always-max"] for row in ROWS},
        "flops_vs_base": {row: flops[row] / base_flops for row in ROWS},
        "flops_vs_always_max": {row: flops[row] / flops["always-max"] for row in ROWS},
        "predicted_gate_vs_base": {"time": predicted_time, "flops": predicted_flops},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--usage", type=float, default=0.5, help="fraction of clips the gate sends to the encoder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/deploy_cost.json"))
    args = parser.parse_args()

    profile = load_profile("demo")
    base, encoder = load_prepared_models(profile)
    results = [measure("demo", profile, build_safe_model(profile, base=base, audio_encoder=encoder), args)]
    with tempfile.TemporaryDirectory() as directory:
        large_profile, large = larger_base(base, Path(directory), hidden=512, layers=8)
        results.append(measure("hidden-512", large_profile,
                               build_safe_model(large_profile, base=large, audio_encoder=encoder), args))

    for result in results:
        print(f"\n{result['model']} (hidden {result['hidden']}, {result['layers']} layers), {result['examples']} "
              f"examples with a clip, {result['new_tokens']} new tokens, gate on {100 * result['audio_usage']:.1f}%")
        print(f"  {'':14s} {'ms/example':>10s} {'vs base':>8s} {'vs max':>7s} | {'FLOPs vs base':>13s} {'vs max':>7s}")
        for row in ROWS:
            print(f"  {row:14s} {result['ms_per_example'][row]:10.2f} {result['time_vs_base'][row]:8.3f} "
                  f"{result['time_vs_always_max'][row]:7.3f} | {result['flops_vs_base'][row]:13.3f} "
                  f"{result['flops_vs_always_max'][row]:7.3f}")
        predicted = result["predicted_gate_vs_base"]
        print(f"  gate if deciding were free: {predicted['time']:.3f} x base (time), {predicted['flops']:.3f} (FLOPs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "deploy_cost", "usage_target": args.usage, "batch_size": args.batch_size,
        "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(), "results": results,
    }, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
