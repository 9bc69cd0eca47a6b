"""`safe validate`: print the resolved profile, or every problem in it at once (exit 2).

With ``--estimate`` it prints the profile's memory estimate instead (safe_cli/models/memory.py):
weights, one Stage A step and inference, from the architectures' configs alone; and what one
answer costs end to end (safe_cli/rl/cost.py: the base alone, always-max audio, the gate).
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.syntax import Syntax

from ..config import dump_profile, resolve_variants
from ..tables import ReportTable
from .common import SetOption, console, handle_errors, resolve_profile


@handle_errors
def validate(
    profile: str = typer.Argument(..., help="Built-in profile name (e.g. demo) or path to a YAML file."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print the resolved profile (or the estimate) as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the one-line verdict."),
    estimate: bool = typer.Option(
        False, "--estimate", help="Print the memory estimate (weights, a Stage A step, inference) instead of the "
        "profile. Needs no weights and no network: hub ids must be known models or local directories."
    ),
    variant: Optional[str] = typer.Option(
        None, "--variant", help="Retention variant of the estimated Stage A step (default: the profile's)."
    ),
    text_tokens: int = typer.Option(
        64, "--text-tokens", min=1, help="Text tokens per example on top of the image tokens, for the estimate."
    ),
    answer_tokens: int = typer.Option(
        8, "--answer-tokens", min=1, help="Labelled (answer) tokens per training row, for the memory estimate: Stage "
        "A's LM head and loss run on these positions only."
    ),
    audio_usage: float = typer.Option(
        0.494, "--audio-usage", min=0.0, max=1.0, help="Fraction of clips the gate sends to the encoder, for the "
        "compute estimate (default: the avdigits gate's measured 49.4%, 2026-12-03)."
    ),
    new_tokens: int = typer.Option(8, "--new-tokens", min=1, help="Answer tokens per example, for the compute estimate."),
    clip_seconds: float = typer.Option(5.0, "--clip-seconds", min=0.1, help="Clip length, for the compute estimate "
                                       "(whisper without trim_to_clip always encodes 30 s)."),
    data: bool = typer.Option(
        False, "--data", help="Also read every record of the profile's data (training, validation and evaluation "
        "manifests; AV-digits is exported first) and check that every file exists; print the records per task kind."
    ),
) -> None:
    """Validate a profile and print it resolved (extends and --set applied, defaults filled in).

    Every problem is reported at once as FILE: KEY.PATH: what was expected, with exit code 2.

    Example:

        safe validate demo --set fusion.layers=[0,2] --set training.stage_a.steps=50

        safe validate llava15-7b-whisper-small --estimate

        safe validate demo --data --set data.source=manifest \\
            --set data.train_manifests=[export/train.jsonl]
    """
    resolved = resolve_profile(profile, set_)
    if data:
        _validate_data(resolved, as_json)
        return
    if estimate:
        _print_estimate(resolved, variant, text_tokens, as_json, (audio_usage, new_tokens, clip_seconds), answer_tokens)
        return
    if as_json:
        print(json.dumps(resolved.model_dump(mode="json"), indent=2))
        return
    if not quiet:
        console.print(Syntax(dump_profile(resolved), "yaml", theme="ansi_dark", background_color="default"))
    variants = ", ".join(resolve_variants(resolved.retention.variants))
    console.print(
        f"[green]ok[/]: profile [bold]{resolved.name}[/] ({resolved.base.kind} + "
        f"{resolved.audio_encoder.kind}); variants: {variants}",
        highlight=False,
    )


def _print_estimate(resolved, variant: Optional[str], text_tokens: int, as_json: bool,
                    compute_settings: tuple[float, int, float], answer_tokens: int) -> None:
    from ..models.memory import GIB, estimate_memory
    from ..rl.cost import estimate_compute

    est = estimate_memory(resolved, variant, text_tokens, answer_tokens)
    usage, new_tokens, clip_seconds = compute_settings
    compute = estimate_compute(resolved, usage, text_tokens, new_tokens, clip_seconds)
    if as_json:
        print(json.dumps({**est.to_json(), "compute": compute.to_json()}, indent=2))
        return
    console.print(estimate_table(est))
    for line in est.assumptions:
        console.print(f"- {line}", highlight=False)
    console.print(
        f"[green]ok[/]: estimate for [bold]{est.profile}[/]: training {est.totals['training'] / GIB:.1f} GiB "
        f"({est.totals['training_checkpointed'] / GIB:.1f} GiB if gradient checkpointing of the base's layers were built), inference "
        f"{est.totals['inference'] / GIB:.1f} GiB",
        highlight=False,
    )
    console.print(compute_table(compute))
    relative = compute.relative()["gate"]
    console.print(
        f"[green]ok[/]: end to end, the gate at {100 * usage:.1f}% audio usage costs {relative['vs_always_max']:.3f} "
        f"of always-max and {relative['vs_base']:.3f} of the base alone", highlight=False)


def compute_table(compute) -> ReportTable:
    """FLOPs per example of each way of answering, and their ratios."""
    a = compute.assumptions
    table = ReportTable(title=f"compute per example: {compute.profile} ({a['image_tokens']} image + {a['text_tokens']} "
                        f"text tokens, {a['new_tokens']} answer tokens, {a['clip_seconds']:g} s clip, gate on "
                        f"{100 * a['audio_usage']:.1f}% of clips)", title_justify="left")
    table.add_text_column("answered by")
    for column in ("TFLOPs", "vs always-max", "vs base"):
        table.add_number_column(column)
    for name, value in compute.flops.items():
        ratios = compute.relative()[name]
        table.add_row(name, f"{value / 1e12:.4g}", f"{ratios['vs_always_max']:.3f}", f"{ratios['vs_base']:.3f}")
    table.add_row(f"(audio encoder, one clip: {a['audio_encoder_flops'] / 1e12:.4g}; deciding: "
                  f"{a['decision_flops'] / 1e12:.2g})", "", "", "")
    return table


def estimate_table(est) -> ReportTable:
    """The memory estimate's rows: weights, a Stage A step, inference, each with its total."""
    from ..models.memory import GIB

    seq = est.sequence
    table = ReportTable(title=f"memory estimate: {est.profile} (Stage A variant {est.variant})", title_justify="left")
    table.add_text_column("component")
    table.add_number_column("parameters")
    table.add_text_column("dtype")
    table.add_number_column("GiB")
    table.add_text_column("note")

    def rows(items) -> None:
        for row in items:
            params = f"{row.params:,}" if row.params else ""
            table.add_row(row.component, params, row.dtype or "", f"{row.gib:.3f}", row.note)

    def total(label: str, key: str) -> None:
        table.add_row(f"[bold]{label}[/]", "", "", f"[bold]{est.totals[key] / GIB:.2f}[/]", "")

    table.add_row("[bold]weights[/]")
    rows(est.weights)
    table.add_section()
    table.add_row(f"[bold]Stage A step[/] (micro-batch {seq['micro_batch']} x grad_accum {seq['grad_accum']}, "
                  f"{seq['tokens']} tokens)")
    rows(est.training)
    total("total, training", "training")
    total("total, training if the base's layers were checkpointed (not built yet)", "training_checkpointed")
    table.add_section()
    table.add_row(f"[bold]inference[/] (batch {seq['eval_batch']})")
    rows(est.inference)
    total("total, inference", "inference")
    return table


def _validate_data(resolved, as_json: bool) -> None:
    """Every record of every split, checked in one pass; ManifestError (exit 2) lists all problems."""
    from ..data.manifest import ManifestError
    from ..data.sources import SPLITS, manifest_paths, read_records, training_and_validation

    counts, issues = {}, []
    for split in SPLITS:
        try:
            if split == "validation" and not manifest_paths(resolved, split) and manifest_paths(resolved, "train"):
                if "train" not in counts:  # carved out of the training records, whose problems are listed
                    continue
                records = training_and_validation(resolved)[1]
            elif manifest_paths(resolved, split):
                records = read_records(manifest_paths(resolved, split))
            else:
                continue
        except ManifestError as exc:
            issues += exc.issues
            continue
        counts[split] = {"records": len(records), "by_kind": records.counts(),
                         "manifests": manifest_paths(resolved, split) or ["(held out of train)"]}
    if issues:
        raise ManifestError(issues)
    if as_json:
        print(json.dumps(counts, indent=2))
        return
    console.print(data_table(resolved.name, counts))
    console.print(f"[green]ok[/]: data of profile [bold]{resolved.name}[/]: every record and file checked",
                  highlight=False)


def data_table(profile_name: str, counts: dict) -> ReportTable:
    """Records per split and task kind, from _validate_data's counts."""
    table = ReportTable(title=f"data of profile {profile_name}", title_justify="left")
    table.add_text_column("split")
    for column in ("records", "vl", "text", "audio", "av"):
        table.add_number_column(column)
    table.add_text_column("manifests")
    for split, entry in counts.items():
        kinds = entry["by_kind"]
        table.add_row(split, str(entry["records"]), *(str(kinds.get(k, 0)) for k in ("vl", "text", "audio", "av")),
                      ", ".join(entry["manifests"]))
    return table
