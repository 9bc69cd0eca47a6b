"""`safe train`: run one training stage of one variant and seed into a run directory."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import SafeError
from .common import ProfileOption, SetOption, console, handle_errors, resolve_profile


@handle_errors
def train(
    stage: str = typer.Option(..., "--stage", help="Training stage: a (alignment). b and c are not built yet."),
    variant: Optional[str] = typer.Option(
        None, "--variant", "-v",
        help="Retention variant: no_retention, soft_retention, fisher_retention, nullspace_retention, "
        "full_retention, or one defined in the profile (default: retention.default_variant).",
    ),
    profile: str = ProfileOption,
    run_dir: Optional[str] = typer.Option(
        None, "--run-dir", help="The run's folder (default: <runs_dir>/<profile>/<variant>/seed-<seed>)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the trainable parts and batch order "
                                       "(default: the profile's seed). The data stays the profile's."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint "
                                "(starts at step 0 if it has none)."),
    set_: Optional[List[str]] = SetOption,
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the profile's training.device)."),
    json_output: bool = typer.Option(False, "--json", help="Print the run's summary as one JSON object."),
) -> None:
    """Train a stage: A aligns audio (projector + fusion adapters) while retention keeps the base unharmed.

    Stage A trains on the audio and AV questions with a random token budget per example; the
    variant's retention terms act on VL and text questions with a distractor clip. It writes
    the resolved profile, env.json, metrics.jsonl, checkpoints (every
    training.stage_a.checkpoint_every steps) and, at the end, the trainable weights and a
    summary with base vs SAFE accuracy per task. SIGTERM/SIGUSR1 save a checkpoint and stop;
    --resume continues exactly where the run stopped.

    Exit codes: 0 done; 1 the run failed or was stopped (a checkpoint is saved); 2 bad input.

    Examples:

        safe train --stage a --variant soft_retention

        safe train --stage a --variant full_retention --profile avdigits --seed 2 --set training.stage_a.steps=600

        safe train --stage a --run-dir runs/demo/soft_retention/seed-0 --resume
    """
    from ..training.stage_a import train_stage_a

    if stage.lower() != "a":
        raise SafeError(f"--stage: stage {stage!r} is not available yet; only stage a (alignment) is built")
    resolved = resolve_profile(profile, set_)
    result = train_stage_a(resolved, variant=variant, seed=seed, run_dir=run_dir, resume=resume, device=device)
    summary = result.summary()
    if json_output:
        print(json.dumps({"stage_dir": str(result.stage_dir), **summary}, indent=1, sort_keys=True))
        return

    table = Table(title=f"stage A, {result.variant}, seed {result.seed}: base vs SAFE on the test split")
    for column in ("task", "audio clip", "n", "base", "SAFE", "Δ"):
        table.add_column(column, justify="left" if column in ("task", "audio clip") else "right")
    for task in result.tasks:
        row = task.summary()
        clip = "spoken" if row["kind"] in ("audio", "av") else ("distractor" if row["with_audio"] else "none")
        table.add_row(row["task"], clip, str(row["n"]), f"{row['base_accuracy']:.1%}", f"{row['safe_accuracy']:.1%}",
                      f"{100 * row['delta']:+.1f}")
    console.print(table)
    budgets = ", ".join(f"{k} tokens {v:.1%}" for k, v in result.audio_digit_by_budget.items())
    console.print(f"audio/digit by budget: {budgets}")
    console.print(f"{result.steps} steps ({result.skipped_steps} skipped), {result.examples_per_second:.0f} examples/s, "
                  f"peak memory {result.peak_memory_mb:.0f} MB")
    console.print(f"base fingerprint {'unchanged' if result.base_unchanged else 'CHANGED'}: {result.base_fingerprint}")
    console.print(f"run directory: {result.stage_dir}")
