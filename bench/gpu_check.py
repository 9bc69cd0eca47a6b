"""One prepared GPU check: the CUDA paths measured in one short run, figures back as JSON.

    bash bench/gpu_check.sh [--out gpu_check.json]       # on a bare GPU machine (wheels from .whl/)
    python bench/gpu_check.py --tiny --out /tmp/g.json    # the same parts at tiny shapes, on the CPU
    python bench/gpu_check.py --plan                      # parts, budgets, wheels, the command line

Parts, each with its own time budget (a part that would start past the whole run's budget is
recorded as "skipped: out of time"; one that fails is recorded with its error and the run goes
on; the JSON is rewritten after every part, so a killed run keeps what it measured):

    env               torch, CUDA, the GPU's name, Python
    stage_a_demo      the demo profile's Stage A, 200 steps, bf16 autocast: examples/s, peak CUDA
                      memory, base fingerprint unchanged (the tiny models' pretraining is cut to a
                      few hundred steps: this part measures speed and memory, not accuracy)
    llava7b_layers    a random LLaVA-architecture base at LLaVA-1.5-7B's layer shape (hidden 4096,
                      32 heads, MLP 11008), 8 layers, fusion at 2 and 5, bf16 weights: budget-0 rows
                      bit-exact in a mixed batch (forward and greedy generate); forward time of the
                      base, budget 0 and budget 8 at batch 8 x 641 tokens (576 image tokens); one
                      Stage A-shaped step (alignment CE + retention KL, one backward each) as it ran
                      before issue 27 (every position's logits, a KV cache) and as it runs now
                      (logits at the answer positions, no cache), time and peak memory of each, the
                      latter against ``estimate_memory``'s figure for the same shape. The vision tower is CLIP-L/336's
                      token count at a small width: the LLM's cost is what is measured.
    batched_encoding  ``encode_audio`` (the code behind ``safe encode-audio``), faithful 30 s windows,
                      256 FSDD-length clips through a whisper-small-shaped encoder (random weights),
                      against whisper's own per-file loop: clips/s of each, their ratio, the largest
                      feature difference
    nccl              torchrun, one rank: the process group on NCCL (gloo on the CPU) and one
                      all_reduce of a flat gradient, as ``Distributed.average_gradients`` does it,
                      then ``safe train --stage a`` for two steps under the same launcher

``--tiny`` runs every part at tiny shapes and a few steps on whatever device there is (a CI test
runs it on the CPU, so the check cannot rot before a GPU comes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain checkout (the GPU machine has no install of it)
    sys.path.insert(0, str(ROOT))

# Seconds per part on one GPU; the whole run must stay under TOTAL_BUDGET (8 minutes).
BUDGETS = {"env": 5, "stage_a_demo": 150, "llava7b_layers": 150, "batched_encoding": 90, "nccl": 60}
TOTAL_BUDGET = 480
# What the GPU machine's image lacks (bench/gpu_check.sh installs them from .whl/ first).
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "openai-whisper", "more-itertools",
          "soundfile", "cffi", "pycparser", "jiwer", "rapidfuzz")
COMMAND = "bash bench/gpu_check.sh --out $OUT/gpu_check.json"
# The tiny models' pretraining, cut: parts 1 and 5 share it through one cache (the same key).
QUICK_PRETRAINING = [
    "base.vision_pretrain.steps=150", "base.pretrain.steps=150", "audio_encoder.tiny_pretrain.steps=150",
]
TINY_PRETRAINING = [
    "base.vision_pretrain.steps=3", "base.pretrain.steps=3", "base.pretrain.batch_size=4",
    "audio_encoder.tiny_pretrain.steps=3", "audio_encoder.tiny_pretrain.batch_size=4",
]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device) -> float:
    sync(device)
    started = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - started


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# --------------------------------------------------------------------------- parts


def part_env(ctx: dict) -> dict:
    import torch

    device = ctx["device"]
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "tiny": ctx["tiny"]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    import transformers

    out["transformers"] = transformers.__version__
    return out


def stage_a_overrides(ctx: dict, steps: int) -> list[str]:
    pretraining = TINY_PRETRAINING if ctx["tiny"] else QUICK_PRETRAINING
    batch = ["training.stage_a.batch_size=4", "data.num_train=16", "data.num_eval=2"] if ctx["tiny"] else [
        "data.num_eval=20"]
    return pretraining + batch + [
        f"training.device={ctx['device'].type}", "training.autocast=bf16", f"training.stage_a.steps={steps}",
        f"training.stage_a.checkpoint_every={max(steps, 1)}", "training.stage_a.log_every=50",
    ]


def part_stage_a_demo(ctx: dict) -> dict:
    from safe_cli.config import load_profile
    from safe_cli.training.stage_a import train_stage_a

    device = ctx["device"]
    steps = 4 if ctx["tiny"] else 200
    profile = load_profile("demo", stage_a_overrides(ctx, steps))
    reset_peak(device)
    started = time.perf_counter()
    result = train_stage_a(profile, variant="soft_retention", seed=0, run_dir=ctx["work"] / "stage-a-demo")
    return {"steps": result.steps, "examples_per_second": round(result.examples_per_second, 1),
            "train_seconds": round(result.train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
            "peak_cuda_mib": peak_mib(device), "peak_memory_mb": round(result.peak_memory_mb, 1),
            "base_fingerprint_unchanged": bool(result.base_unchanged), "autocast": "bf16",
            "pretraining": "cut: " + " ".join(TINY_PRETRAINING if ctx["tiny"] else QUICK_PRETRAINING)}


def llava_shape(tiny: bool) -> dict:
    if tiny:
        return dict(hidden=64, heads=4, intermediate=128, layers=4, vocab=320, image=28, patch=7, fusion=[1, 3],
                    vision_hidden=32, batch=4, text=16)
    return dict(hidden=4096, heads=32, intermediate=11008, layers=8, vocab=32064, image=336, patch=14,
                fusion=[2, 5], vision_hidden=256, batch=8, text=64)


def save_llava_config(shape: dict, directory: Path) -> Path:
    """A LLaVA config at ``shape`` (no weights): the memory estimate reads it, the part builds it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=shape["image"], patch_size=shape["patch"], hidden_size=shape["vision_hidden"],
                              intermediate_size=4 * shape["vision_hidden"], num_hidden_layers=1,
                              num_attention_heads=max(1, shape["vision_hidden"] // 64), projection_dim=256)
    text = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=shape["vocab"] - 1,
                         image_seq_length=(shape["image"] // shape["patch"]) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    config.save_pretrained(directory)
    return directory


def part_llava7b_layers(ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from safe_cli.config import load_profile
    from safe_cli.models import build_safe_model
    from safe_cli.models.base import _wrap
    from safe_cli.models.bypass import perturb_adapters
    from safe_cli.models.memory import estimate_memory
    from safe_cli.models.probe import probe_audio, probe_batch

    device, tiny, deadline = ctx["device"], ctx["tiny"], ctx["part_deadline"]
    shape = llava_shape(tiny)
    directory = save_llava_config(shape, ctx["work"] / "llava-shape")
    dtype = torch.bfloat16
    overrides = ["base.kind=hf-llava", f"base.name_or_path={directory}", "base.dtype=bfloat16",
                 f"fusion.layers=[{shape['fusion'][0]},{shape['fusion'][1]}]", f"training.device={device.type}",
                 "training.autocast=bf16", f"training.stage_a.batch_size={shape['batch']}"]
    profile = load_profile("demo", overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(directory)).to(dtype)
    base = _wrap("hf-llava", model, None)
    safe = build_safe_model(profile, device, base=base)
    perturb_adapters(safe)
    generator = torch.Generator().manual_seed(0)
    inputs = probe_batch(base, shape["batch"], shape["text"], generator)
    tokens = inputs["input_ids"].shape[1]
    with torch.no_grad():
        features = safe.encode_audio(probe_audio(safe.audio_encoder.sample_rate, shape["batch"], generator=generator))
    mixed = torch.tensor([0, 8] * (shape["batch"] // 2), device=device)
    zeros, eights = torch.zeros_like(mixed), torch.full_like(mixed, 8)
    out: dict[str, Any] = {"shape": dict(shape), "tokens": tokens, "weights": "bfloat16",
                           "base_parameters": sum(p.numel() for p in base.model.parameters())}

    with torch.no_grad():
        reference = base(**inputs).logits
        fused = safe(token_budget=mixed, audio_features=features, **inputs).logits
        zero_rows = [i for i, k in enumerate(mixed.tolist()) if k == 0]
        out["bypass_forward_bit_exact"] = all(torch.equal(fused[i], reference[i]) for i in zero_rows)
        out["audio_rows_max_abs_diff"] = float((fused[1::2].float() - reference[1::2].float()).abs().max())
        del reference, fused
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = base.model.generate(**inputs, **kwargs)
        generated = safe.generate(token_budget=mixed, audio_features=features, **inputs, **kwargs)
        out["bypass_generate_bit_exact"] = all(torch.equal(generated[i], expected[i]) for i in zero_rows)

        runs = {"base": lambda: base(**inputs),
                "budget_0": lambda: safe(token_budget=zeros, audio_features=features, **inputs),
                "budget_8": lambda: safe(token_budget=eights, audio_features=features, **inputs)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        repeats = 3 if tiny else 20
        for name in runs:  # warm-up
            timed(runs[name], device)
        for i in range(repeats):
            if time.monotonic() > deadline - 40:
                out["forward_note"] = f"stopped after {i} rounds: the part's time budget"
                break
            order = list(runs)[i % 3:] + list(runs)[:i % 3]  # rotate: drift hits all three alike
            for name in order:
                times[name].append(timed(runs[name], device))
    medians = {name: statistics.median(v) for name, v in times.items() if v}
    out["forward_ms"] = {name: round(1000 * m, 3) for name, m in medians.items()}
    if "base" in medians:
        out["forward_ratio_to_base"] = {name: round(m / medians["base"], 4) for name, m in medians.items()}

    # One Stage A-shaped step, two ways: the alignment micro-batch (CE on the answer positions, all
    # rows with audio) and the retention batch (KL to the teacher, the base without audio), a
    # backward each. "before": as Stage A ran before issue 27 (every position's logits, a KV cache
    # built); "after": as it runs now (logits_to_keep at the answer positions, use_cache=False).
    from safe_cli.training.batches import answer_positions
    from safe_cli.training.retention import distillation_kl_at
    from safe_cli.training.stage_a import TRAINING_FORWARD, answer_loss

    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -8:] = inputs["input_ids"][:, -8:]
    index, targets = answer_positions(labels)
    trainable = [p for _, p in safe.trainable_named_parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    safe.train()

    def step_before() -> None:
        loss = safe(token_budget=eights, audio_features=features, labels=labels, **inputs).loss
        loss.backward()
        with torch.no_grad():
            teacher = base(**inputs).logits[:, -8:].float().log_softmax(-1)
        student = safe(token_budget=mixed, audio_features=features, **inputs).logits[:, -8:].float().log_softmax(-1)
        F.kl_div(student, teacher, log_target=True, reduction="batchmean").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_after() -> None:
        kept = dict(TRAINING_FORWARD, logits_to_keep=index)
        logits = safe(token_budget=eights, audio_features=features, **inputs, **kept).logits
        answer_loss(logits, targets, float((targets != -100).sum())).backward()
        with torch.no_grad():
            teacher = base(**inputs, **kept).logits
        student = safe(token_budget=mixed, audio_features=features, **inputs, **kept).logits
        distillation_kl_at(student, teacher, targets, 2.0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name, step in (("before", step_before), ("after", step_after)):
        timed(step, device)  # warm-up: allocator, optimizer state
        reset_peak(device)
        step_times = [timed(step, device) for _ in range(1 if tiny else 3)]
        out[f"stage_a_step_{name}_seconds"] = round(statistics.median(step_times), 4)
        out[f"stage_a_step_{name}_peak_mib"] = peak_mib(device)
    out["stage_a_step_seconds"] = out["stage_a_step_after_seconds"]
    out["stage_a_step_peak_mib"] = out["stage_a_step_after_peak_mib"]
    estimate = estimate_memory(profile, text_tokens=tokens - base.num_image_tokens, answer_tokens=8)
    out["estimate_training_mib"] = round(estimate.totals["training"] / 2**20, 1)
    if out["stage_a_step_peak_mib"]:
        out["measured_over_estimate"] = round(out["stage_a_step_peak_mib"] / out["estimate_training_mib"], 3)
    return out


def part_batched_encoding(ctx: dict) -> dict:
    import dataclasses

    import numpy as np
    import soundfile as sf
    import torch
    import whisper
    from whisper.model import ModelDimensions, Whisper

    from safe_cli.features.cache import FeatureCache, content_hash
    from safe_cli.features.encode import encode_audio, encoder_fingerprint
    from safe_cli.models.audio_encoders import WhisperEncoder

    device, tiny = ctx["device"], ctx["tiny"]
    if tiny:
        dims = ModelDimensions(80, 1500, 64, 2, 2, 51865, 16, 64, 2, 1)
        clips = 8
    else:  # whisper-small: 768 wide, 12 heads, 12 encoder layers
        dims = ModelDimensions(80, 1500, 768, 12, 12, 51865, 448, 768, 12, 12)
        clips = 256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checkpoint = ctx["work"] / "whisper-shape.pt"
        torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    folder = ctx["work"] / "clips"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(clips):  # FSDD-length: 0.3-0.8 s of 8 kHz-band noisy tone at 16 kHz
        seconds = rng.uniform(0.3, 0.8)
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 1000) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, wave.astype(np.float32), 16000, subtype="FLOAT")
        paths.append(path)

    encoder = WhisperEncoder.load(str(checkpoint), device, False)  # faithful: the 30 s window
    cache = FeatureCache(ctx["work"] / "feature-cache")
    report = encode_audio(paths, cache, encoder, batch_size=32, progress=False)
    fp = encoder_fingerprint(encoder)

    own = whisper.load_model(str(checkpoint), device=device)
    own_seconds = 0.0
    worst = 0.0
    with torch.no_grad():
        for path in paths:
            started = time.perf_counter()  # reading the file is part of either path's work
            wave, _ = sf.read(path, dtype="float32")
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(wave)).to(device))
            features = own.encoder(mel[None])
            sync(device)
            own_seconds += time.perf_counter() - started
            cached = cache.lookup(content_hash(path), fp)
            worst = max(worst, float((cached.float() - features[0].float().cpu()).abs().max()))
    own_rate = clips / own_seconds
    return {"clips": clips, "encoder_dims": dataclasses.asdict(dims), "batched_clips_per_second": report.clips_per_second,
            "per_file_clips_per_second": round(own_rate, 2),
            "batched_over_per_file": round(report.clips_per_second / own_rate, 2) if own_rate else None,
            "max_abs_feature_diff": worst, "batched_failed": report.failed}


NCCL_CHILD = """
import os, sys, torch, torch.distributed as dist
cuda = torch.cuda.is_available() and sys.argv[1] == "cuda"
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda") if cuda else torch.device("cpu")
layer = torch.nn.Linear(64, 64).to(device)
layer(torch.randn(8, 64, device=device)).square().mean().backward()
flat = torch.cat([p.grad.reshape(-1) for p in layer.parameters()]).float()
before = flat.clone()
dist.all_reduce(flat)
flat /= dist.get_world_size()
print("BACKEND", dist.get_backend(), "WORLD", dist.get_world_size(), "ALLREDUCE_OK", bool(torch.equal(flat, before)))
dist.destroy_process_group()
"""


def part_nccl(ctx: dict) -> dict:
    device = ctx["device"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    child = ctx["work"] / "nccl_child.py"
    child.write_text(NCCL_CHILD)
    probe = subprocess.run(torchrun + [str(child), device.type], capture_output=True, text=True, env=env,
                           timeout=120)
    line = next((l for l in probe.stdout.splitlines() if l.startswith("BACKEND")), "")
    words = line.split()
    out: dict[str, Any] = {"process_group_rc": probe.returncode,
                           "backend": words[1] if len(words) > 1 else None,
                           "all_reduce_ok": words[-1] == "True" if words else False}
    if probe.returncode:
        out["process_group_error"] = probe.stderr.strip().splitlines()[-3:]
    train = subprocess.run(
        torchrun + ["-m", "safe_cli", "train", "--stage", "a", "--variant", "no_retention", "--run-dir",
                    str(ctx["work"] / "nccl-run"), "--json"]
        + [arg for o in stage_a_overrides(ctx, 2) for arg in ("--set", o)],
        capture_output=True, text=True, env=env, timeout=max(30, int(ctx["part_deadline"] - time.monotonic())))
    out["train_rc"] = train.returncode
    if train.returncode:
        out["train_error"] = train.stderr.strip().splitlines()[-3:]
    # One rank: the project's own code keeps to one process (Distributed.enabled needs world > 1);
    # the probe above is what shows the backend initialises and all-reduces.
    out["note"] = "world 1: safe train's gradient all_reduce runs only at world > 1; the probe runs NCCL's"
    return out


PARTS: dict[str, Callable[[dict], dict]] = {
    "env": part_env, "stage_a_demo": part_stage_a_demo, "llava7b_layers": part_llava7b_layers,
    "batched_encoding": part_batched_encoding, "nccl": part_nccl,
}


# --------------------------------------------------------------------------- driver


def plan_text() -> str:
    from importlib import metadata

    lines = ["parts (budget, seconds on one GPU):"]
    lines += [f"  {name:<18} {BUDGETS[name]:>4}" for name in PARTS]
    lines += [f"  {'total':<18} {TOTAL_BUDGET:>4}", "", "wheels to carry in .whl/ (the GPU image lacks them):"]
    pinned = []
    for name in WHEELS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    lines.append("  " + " ".join(pinned))
    lines += ["", "make them here (binary wheels for the GPU's Python 3.12; openai-whisper is an sdist, built):",
              "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
              "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
              "-d .whl " + " ".join(p for p in pinned if not p.startswith("openai-whisper")),
              "  python3 -m pip wheel --no-deps -w .whl " + next(p for p in pinned if p.startswith("openai-whisper")),
              "", "the command (carry: .whl):", f"  {COMMAND}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes and a few steps (the CPU test).")
    parser.add_argument("--plan", action="store_true", help="Print the parts, budgets, wheels and command line.")
    parser.add_argument("--parts", default=",".join(PARTS), help="Comma-separated subset of the parts.")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="Seconds for the whole run.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one).")
    args = parser.parse_args()
    if args.plan:
        print(plan_text())
        return 0

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    deadline = started + args.budget
    work = Path(tempfile.mkdtemp(prefix="safe-gpu-check-"))
    os.environ.setdefault("SAFE_CACHE_DIR", str(work / "cache"))  # the tiny models' pretraining, made once
    results: dict[str, Any] = {"schema": "safe.gpu-check/1", "tiny": args.tiny, "device": str(device),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        budget = BUDGETS[name]
        left = deadline - time.monotonic()
        if left < budget and not args.tiny:
            results["parts"][name] = {"skipped": f"out of time ({left:.0f} s left, part needs {budget} s)"}
        else:
            ctx = {"device": device, "tiny": args.tiny, "work": work,
                   "part_deadline": time.monotonic() + (budget if not args.tiny else max(budget, 300))}
            part_started = time.monotonic()
            try:
                figures = PARTS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one part's failure must not cost the others
                figures = {"error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc().splitlines()[-8:]}
            figures["wall_seconds"] = round(time.monotonic() - part_started, 2)
            if figures["wall_seconds"] > budget and not args.tiny:
                figures["over_budget"] = True
            results["parts"][name] = figures
        results["wall_seconds"] = round(time.monotonic() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {json.dumps(results['parts'][name], sort_keys=True)[:400]}", flush=True)
    print(f"wrote {args.out} ({results['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
