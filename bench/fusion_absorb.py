"""One fused layer at inference: q and o absorbed into the clip's keys and values, against q and
o applied at every text position, side by side in one process.

    python bench/fusion_absorb.py [--shapes 64x4x49 512x8x49 512x8x600 1024x16x600] [--out FILE]

Each shape is HIDDENxHEADSxPOSITIONS (batch 8, 8 audio tokens + the null slot, LoRA rank 8
folded in both). "per_position" is the fold without absorption: q = W_q x at every position,
attention over the keys, o at every position (what the blocks ran before AudioReadout).
"absorbed" is ``read_audio`` + ``fuse``. "decode_step" is one position with the readout
already made, which is what ``generate`` pays per token, against the per-position form at one
position. Prints medians and ratios and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from safe_cli.models.fusion_adapter import FusionAdapter, attend_few_keys


def lora_block(hidden: int, heads: int):
    adapter = FusionAdapter([0], hidden, heads)
    attention = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attention, name, nn.Linear(hidden, hidden, bias=False))
    adapter.init_from_base({0: attention}, rank=8, alpha=16, dropout=0.0)
    block = adapter.block(0)
    with torch.no_grad():
        block.gate.fill_(0.5)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(block, name).lora_B["default"].weight.normal_(0, 0.02)
    return block


def per_position(block, states: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
    """The folded block without absorption: q and o at every text position."""
    folded = block._folded_weights()
    batch, length, _ = states.shape
    kv = F.linear(block.norm_audio(audio_tokens), folded["kv"])
    kv = torch.cat([folded["null_kv"].expand(batch, 1, -1), kv], 1)
    k, v = kv.split(block.num_kv_heads * block.head_dim, -1)
    q = F.linear(block.norm_query(states), folded["q"])
    attended = attend_few_keys(
        q.view(batch, length, block.num_heads, block.head_dim),
        k.view(batch, -1, block.num_kv_heads, block.head_dim),
        v.view(batch, -1, block.num_kv_heads, block.head_dim),
        None, 1.0,
    )
    return states + F.linear(attended, folded["o"])


def interleaved_medians_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each function, timed in rotating order every round so drift hits all alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    warmup = max(3, repeats // 10)
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["64x4x49", "512x8x49", "512x8x600", "1024x16x600"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--audio-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fusion_absorb.json"))
    args = parser.parse_args()

    cases = []
    # no_grad, not inference_mode: the fold skips weights made under inference_mode.
    with torch.no_grad():
        for shape in args.shapes:
            hidden, heads, length = (int(part) for part in shape.split("x"))
            torch.manual_seed(0)
            block = lora_block(hidden, heads)
            states = torch.randn(args.batch_size, length, hidden)
            audio = torch.randn(args.batch_size, args.audio_tokens, hidden)
            difference = (block.fuse(states, block.read_audio(audio)) - per_position(block, states, audio)).abs().max()
            row = {"hidden": hidden, "heads": heads, "positions": length, "max_abs_difference": difference.item()}
            cases.append((row, block, states, audio))
        # Two passes over every shape, the first only to warm up: a fresh process runs its first
        # few hundred milliseconds of small kernels up to 2x slower on these machines.
        for _ in range(2):
            for row, block, states, audio in cases:
                readout, step = block.read_audio(audio), states[:, -1:]
                row.update(interleaved_medians_ms({
                    "per_position_ms": lambda: per_position(block, states, audio),
                    "absorbed_ms": lambda: block.fuse(states, block.read_audio(audio)),
                }, args.repeats))
                row.update(interleaved_medians_ms({
                    "decode_step_per_position_ms": lambda: per_position(block, step, audio),
                    "decode_step_absorbed_ms": lambda: block.fuse(step, readout),
                }, args.repeats))
    rows = []
    for row, *_ in cases:
        row["speedup"] = row["per_position_ms"] / row["absorbed_ms"]
        row["decode_step_speedup"] = row["decode_step_per_position_ms"] / row["decode_step_absorbed_ms"]
        rows.append(row)
        print(f"H {row['hidden']:5d}, {row['heads']:2d} heads, L {row['positions']:4d}: per position "
              f"{row['per_position_ms']:8.3f} ms, absorbed {row['absorbed_ms']:8.3f} ms ({row['speedup']:.2f}x); "
              f"decode step {row['decode_step_per_position_ms']:.3f} -> {row['decode_step_absorbed_ms']:.3f} ms "
              f"({row['decode_step_speedup']:.2f}x); max |diff| {row['max_abs_difference']:.1e}")
    result = {
        "benchmark": "fusion_absorb", "batch_size": args.batch_size, "audio_tokens": args.audio_tokens,
        "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
