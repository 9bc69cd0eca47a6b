"""`safe train`: run one training stage of one variant and seed into a run directory."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer

from ..errors import SafeError
from ..tables import ReportTable
from .common import ProfileOption, SetOption, console, handle_errors, resolve_profile


@handle_errors
def train(
    stage: str = typer.Option(..., "--stage", help="a (alignment), b (policy: when audio pays) or c (distil the "
                              "policy into a deployable gate; same as `safe distill-policy`)."),
    variant: Optional[str] = typer.Option(
        None, "--variant", "-v",
        help="Retention variant: no_retention, soft_retention, fisher_retention, nullspace_retention, "
        "full_retention, or one defined in the profile (default: retention.default_variant).",
    ),
    profile: str = ProfileOption,
    run_dir: Optional[str] = typer.Option(
        None, "--run-dir", help="The run's folder (default: `<runs_dir>/<profile>/<variant>/seed-<seed>`)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the trainable parts and batch order "
                                       "(default: the profile's seed). The data stays the profile's."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint "
                                "(starts at step 0 if it has none)."),
    set_: Optional[List[str]] = SetOption,
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the profile's training.device)."),
    json_output: bool = typer.Option(False, "--json", help="Print the run's summary as one JSON object."),
) -> None:
    """Train a stage: A aligns audio while retention keeps the base unharmed; B learns when audio pays; C deploys.

    Stage A trains on the audio and AV questions with a random token budget per example; the
    variant's retention terms act on VL and text questions with a distractor clip. It writes
    the resolved profile, env.json, metrics.jsonl, checkpoints (every
    training.stage_a.checkpoint_every steps) and, at the end, the trainable weights and a
    summary with base vs SAFE accuracy per task. SIGTERM/SIGUSR1 save a checkpoint and stop;
    --resume continues exactly where the run stopped.

    Stage B reads the run's finished Stage A and learns the token-budget policy (budget 0 skips
    the audio encoder and adapters) by policy gradient on reward = task score - alpha x relative
    compute, with a retention multiplier; it writes policy.safetensors, checkpoints and a summary
    comparing always-k, the oracle and the policy. Stage C distils the policy into a light gate,
    calibrates its threshold and exports gate.safetensors + gate.json (see `safe distill-policy`).

    Exit codes: 0 done; 1 the run failed or was stopped (a checkpoint is saved); 2 bad input.

    Examples:

        safe train --stage a --variant soft_retention

        safe train --stage a --variant full_retention --profile avdigits --seed 2 \\
            --set training.stage_a.steps=600

        safe train --stage a --run-dir runs/demo/soft_retention/seed-0 --resume

        safe train --stage b --variant soft_retention

        safe train --stage c --variant soft_retention \\
            --set training.stage_c.target=audio_usage
    """
    try:
        _train(stage, variant, profile, run_dir, seed, resume, set_, device, json_output)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun
            dist.destroy_process_group()


def _train(stage, variant, profile, run_dir, seed, resume, set_, device, json_output) -> None:
    stage = stage.lower()
    if stage not in ("a", "b", "c"):
        raise SafeError(f"--stage: unknown stage {stage!r}; choose a, b or c")
    resolved = resolve_profile(profile, set_)
    if stage == "c":
        from .distill_policy import run_stage_c

        run_stage_c(resolved, variant=variant, seed=seed, run_dir=run_dir, device=device, json_output=json_output)
        return
    if stage == "b":
        from ..training.stage_b import train_stage_b

        result_b = train_stage_b(resolved, variant=variant, seed=seed, run_dir=run_dir, resume=resume, device=device)
        if is_main_process():
            print_stage_b(result_b, json_output)
        return
    from ..training.stage_a import train_stage_a

    result = train_stage_a(resolved, variant=variant, seed=seed, run_dir=run_dir, resume=resume, device=device)
    if not is_main_process():
        return  # under torchrun, rank 0 reports
    summary = result.summary()
    if json_output:
        print(json.dumps({"stage_dir": str(result.stage_dir), **summary}, indent=1, sort_keys=True))
        return

    console.print(stage_a_table(f"stage A, {result.variant}, seed {result.seed}: base vs SAFE on the evaluation "
                                "records", [task.summary() for task in result.tasks]))
    if result.audio_digit_by_budget:
        budgets = ", ".join(f"{k} tokens {v:.1%}" for k, v in result.audio_digit_by_budget.items())
        console.print(f"{result.audio_task} by budget: {budgets}")
    console.print(f"{result.steps} steps ({result.skipped_steps} skipped), {result.examples_per_second:.0f} examples/s, "
                  f"peak memory {result.peak_memory_mb:.0f} MB")
    console.print(f"base fingerprint {'unchanged' if result.base_unchanged else 'CHANGED'}: {result.base_fingerprint}")
    console.print(f"run directory: {result.stage_dir}")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def stage_a_table(title: str, rows: list[dict]) -> ReportTable:
    """Base vs SAFE per task, from the tasks' summary() rows."""
    table = ReportTable(title=title)
    table.add_text_column("task")
    table.add_text_column("audio clip")
    for column in ("n", "base", "SAFE", "Δ"):
        table.add_number_column(column)
    for row in rows:
        clip = "spoken" if row["kind"] in ("audio", "av") else ("distractor" if row["with_audio"] else "none")
        table.add_row(row["task"], clip, str(row["n"]), f"{row['base_accuracy']:.1%}", f"{row['safe_accuracy']:.1%}",
                      f"{100 * row['delta']:+.1f}")
    return table


def strategy_table(title: str, points: list[dict]) -> ReportTable:
    table = ReportTable(title=title)
    table.add_text_column("strategy")
    for column in ("accuracy", "audio q.", "distractor q.", "audio usage", "mean k", "audio compute",
                   "end to end", "vs base"):
        table.add_number_column(column)
    for point in points:
        # audio compute: encoder + fusion over always-max; end to end: every FLOP of an example
        # (base, decision, audio) over always-max, and over the base alone
        table.add_row(point["strategy"], f"{point['accuracy']:.1%}", f"{point['audio_accuracy']:.1%}",
                      f"{point['retention_accuracy']:.1%}", f"{point['audio_usage_rate']:.1%}",
                      f"{point['mean_token_budget']:.1f}", f"{point['relative_audio_compute']:.2f}",
                      f"{point.get('relative_end_to_end_compute', float('nan')):.3f}",
                      f"{point.get('end_to_end_vs_base', float('nan')):.3f}")
    return table


def print_stage_b(result, json_output: bool) -> None:
    summary = result.summary()
    if json_output:
        print(json.dumps({"stage_dir": str(result.stage_dir), **summary}, indent=1, sort_keys=True))
        return
    console.print(strategy_table(f"stage B, {result.variant}, seed {result.seed}: examples with a clip, test split",
                                 result.strategies))
    console.print(f"{result.steps} steps, {result.examples_per_second:.0f} examples/s, retention multiplier "
                  f"{result.retention_multiplier:.2f}, peak memory {result.peak_memory_mb:.0f} MB")
    console.print(f"base fingerprint {'unchanged' if result.base_unchanged else 'CHANGED'}: {result.base_fingerprint}")
    console.print(f"run directory: {result.stage_dir}")
