"""`safe eval-retention`: did anything the base model already did get worse? A report and a CI gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.text import Text

from ..config import load_profile
from ..errors import SafeError
from ..tables import ReportTable
from .common import SetOption, console, err_console, handle_errors


VERDICT_STYLE = {"regressed": "bold red", "inconclusive": "yellow"}


@handle_errors
def eval_retention(
    run: str = typer.Argument(..., metavar="RUN_OR_CKPT_DIR",
                              help="A run folder (its latest stage), a stage folder (e.g. run/stage-a) or one "
                              "checkpoint folder (run/stage-a/checkpoints/step-000200)."),
    profile: Optional[str] = typer.Option(
        None, "--profile", "-p", help="Profile to build the model and data from (default: the profile.yaml the "
        "run saved). Its base must be the one the run was trained on."),
    set_: Optional[List[str]] = SetOption,
    data: Optional[List[str]] = typer.Option(
        None, "--data", metavar="MANIFEST", help="Evaluate on this JSON/JSONL manifest instead of the profile's "
        "test split (repeatable). VL and text questions are also asked with a distractor clip from the manifest."),
    tolerance: Optional[float] = typer.Option(
        None, "--tolerance", min=0.0, max=1.0,
        help="Allowed accuracy drop as a fraction (0.005 = 0.5 points; default: evaluation.tolerance)."),
    fail_on_regression: bool = typer.Option(
        False, "--fail-on-regression", help="Exit 1 unless the verdict is pass: a task regressed, the bypass is not "
        "bit-exact, or (rule non-inferiority) a VL/text task is not shown non-inferior."),
    rule: Optional[str] = typer.Option(
        None, "--rule", metavar="RULE", help="non-inferiority or significant-harm (default: evaluation.rule, "
        "non-inferiority)."),
    min_accuracy: Optional[List[str]] = typer.Option(
        None, "--min-accuracy", metavar="TASK=ACC", help="Audio capability: exit 1 if SAFE answers audio or AV "
        "task TASK below ACC (a fraction; repeatable), e.g. audio/digit=0.9. Checked with or without "
        "--fail-on-regression."),
    require_audio_gain: bool = typer.Option(
        False, "--require-audio-gain", help="Audio capability: exit 1 unless every audio task gains over the base "
        "beyond chance (one-sided 95% lower bound of SAFE - base above 0)."),
    out: Optional[str] = typer.Option(
        None, "--out", help="Folder for report.json, report.md and the PNG plots (default: "
        "`<stage folder>/eval-retention`, or `.../eval-retention/step-N` for a checkpoint)."),
    max_examples: Optional[int] = typer.Option(
        None, "--max-examples", min=1, help="At most N examples per task and audio condition "
        "(default: evaluation.max_examples, else all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: evaluation.batch_size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples and of the distractor clips "
                             "drawn for --data manifests."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the profile's training.device)."),
    json_output: bool = typer.Option(False, "--json", help="Print report.json's summary (no per-example answers)."),
) -> None:
    """Compare the frozen base and SAFE on the same examples, task by task, with paired statistics.

    Every task of the profile's test split (or of the --data manifests) is answered by the base
    (never hearing audio) and by SAFE as deployed: budgets from the run's distilled gate (Stage
    C) if it has one, else its policy (Stage B), else the largest budget for every clip. VL and
    text questions are asked without audio and with a distractor clip. Per task: n, both
    accuracies, the delta, a 95% paired bootstrap interval, McNemar's exact p-value and a
    verdict.

    Verdicts: non-inferior when the one-sided 95% lower bound of SAFE - base (Tango's score
    bound for 0/1 scores) is >= -tolerance, or when the task has no clip and the bypass is
    bit-exact; regressed when delta < -tolerance and the Holm-adjusted p < significance;
    inconclusive otherwise, with the examples that would decide it. Rule non-inferiority (the
    default) passes only when every VL/text task is non-inferior and no task regressed;
    significant-harm only looks for regressions.

    Bypass check: every audio-free example is batched with a copy of itself that carries a clip;
    the audio-free rows' logits must equal the base's own forward bit for bit (max |Δ logit| = 0).

    Efficiency: every example is answered at every budget once, so always-k, the oracle (audio
    only where the question needs it), the policy and the gate (at its threshold and at 0.05-0.95)
    are compared on accuracy and relative audio compute (FLOPs of encoder + fusion, from the
    model's dimensions, over always-max); report.json "efficiency" is SAFE's as deployed.

    Writes report.json (schema safe.retention-report/2), report.md, deltas.png, accuracy.png and
    pareto.png.

    Audio capability (promise 2): --min-accuracy floors and --require-audio-gain check that the
    run learned to hear; its VL answers being the base's says nothing about that. The check is
    written to report.json under "audio_capability".

    Exit codes: 0 done (with --fail-on-regression: verdict pass; with a capability check: met);
    1 verdict regression or inconclusive with --fail-on-regression, or a capability check not
    met; 2 bad input.

    Examples:

        safe eval-retention runs/demo/soft_retention/seed-0

        safe eval-retention runs/avdigits/full_retention/seed-0/stage-a \\
            --fail-on-regression --out reports/full

        safe eval-retention runs/demo/soft_retention/seed-0/stage-b

        safe eval-retention run/stage-a/checkpoints/step-000250 \\
            --data my_eval.jsonl --max-examples 200

        safe eval-retention runs/demo/soft_retention/seed-0/stage-a \\
            --min-accuracy audio/digit=0.9 --require-audio-gain
    """
    from ..data.batches import PromptBatcher
    from ..evaluation import data as eval_data
    from ..evaluation.outputs import write_report
    from ..evaluation.retention import audio_capability, build_report, capability_line, summary_line
    from ..evaluation.stats import RULE_TEXT
    from ..evaluation.runs import load_decider, load_trained_model, locate
    from ..models.builder import resolve_device
    from ..rl.cost import AudioCostModel, EndToEndCost
    from ..rl.state import state_dim
    from .train import strategy_table

    floors = parse_floors(min_accuracy or [])
    trained = locate(run)
    resolved = load_profile(profile or str(trained.profile_path), set_ or [])
    evaluation = resolved.evaluation
    tolerance = evaluation.tolerance if tolerance is None else tolerance
    rule = rule or evaluation.rule
    if rule not in RULE_TEXT:
        raise SafeError(f"--rule: expected one of {', '.join(RULE_TEXT)}, got {rule!r}")
    torch_device = resolve_device(device or resolved.training.device)
    model = load_trained_model(trained, resolved, torch_device)
    rate = model.audio_encoder.sample_rate
    if data:
        dataset = eval_data.manifest_data(resolved.model_copy(update={"seed": seed}), data, rate, model.audio_encoder)
    else:
        dataset = eval_data.profile_data(resolved, rate, model.audio_encoder)
    if not dataset.pool.examples:
        raise SafeError(f"--data: no usable examples ({len(dataset.skipped)} unreadable file(s))")
    budgets = list(resolved.policy.token_budgets)
    decider = load_decider(trained, state_dim(model.base.hidden_size), resolved)
    cost = EndToEndCost.for_model(model, AudioCostModel.for_model(model, max(budgets)))
    context = {
        "profile": resolved.name, "variant": trained.variant, "seed": trained.seed, "stage": trained.stage,
        "weights": str(trained.weights_path), "step": trained.step, "base_fingerprint": model.base_fingerprint(),
        "data": dataset.description, "skipped": dataset.skipped,
    }
    report = build_report(
        model, PromptBatcher.for_evaluation(model.base, evaluation), dataset.pool, budgets=budgets,
        cost=cost, tolerance=tolerance, significance=evaluation.significance,
        bootstrap_samples=evaluation.bootstrap_samples, batch_size=batch_size or evaluation.batch_size,
        max_examples=max_examples or evaluation.max_examples, seed=seed, context=context, rule=rule, **decider,
    )
    capability = None
    if floors or require_audio_gain:
        try:
            capability = audio_capability(report["tasks"], floors, require_audio_gain)
        except ValueError as error:
            raise SafeError(f"--min-accuracy: {error}") from None
        report["audio_capability"] = capability
    default_out = trained.stage_dir / "eval-retention"
    if trained.step is not None:
        default_out = default_out / f"step-{trained.step:06d}"
    paths = write_report(report, Path(out) if out else default_out)

    if json_output:
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1, sort_keys=True))
    else:
        console.print(retention_table(report["tasks"], trained.variant))
        console.print(strategy_table("accuracy and audio compute on the examples with a clip",
                                     [p for p in report["strategies"] if p["kind"] != "gate-curve"]))
        console.print(dataset.description)
        console.print(Text(summary_line(report), style={"pass": "green", "inconclusive": "yellow"}.get(
            report["verdict"], "bold red")))
        console.print(f"SAFE's budgets: {report['strategy']}; report: {paths['report.md']} "
                      "(+ report.json, deltas.png, accuracy.png, pareto.png)")
        if capability is not None:
            console.print(Text(capability_line(capability), style="green" if capability["ok"] else "bold red"))
    if dataset.skipped:
        err_console.print(f"skipped {len(dataset.skipped)} unreadable file(s); listed in report.json under 'skipped'")
    failed = False
    if fail_on_regression and report["verdict"] != "pass":
        err_console.print(Text(f"error: {summary_line(report)}", style="bold red"), highlight=False)
        failed = True
    if capability is not None and not capability["ok"]:
        err_console.print(Text(f"error: {capability_line(capability)}", style="bold red"), highlight=False)
        failed = True
    if failed:
        raise typer.Exit(1)


def retention_table(tasks: list[dict], variant: Optional[str]) -> ReportTable:
    """One row per task of report.json: both accuracies, the delta with its interval and bound, the verdict."""
    from ..evaluation.retention import task_label

    table = ReportTable(title=f"retention: {variant or 'SAFE'} vs base; +clip = with a distractor clip",
                        box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_text_column("task")
    for column in ("n", "base", "SAFE", "Δ pt", "95% CI", "p", "low pt", "audio"):
        table.add_number_column(column)
    table.add_text_column("verdict")
    for row in tasks:
        lo, hi = row["ci95"]
        table.add_row(
            task_label(row, " +clip"), str(row["n"]), f"{row['base_accuracy']:.1%}", f"{row['safe_accuracy']:.1%}",
            f"{100 * row['delta']:+.1f}", "–" if lo is None else f"{100 * lo:+.1f},{100 * hi:+.1f}",
            f"{row['p_value']:.2g}", f"{100 * row['lower_bound']:+.1f}",
            f"{row['audio_usage_rate']:.0%}" if row["with_audio"] and "audio_usage_rate" in row else "",
            row["verdict_task"], style=VERDICT_STYLE.get(row["verdict_task"]),
        )
    return table


def parse_floors(items: list[str]) -> dict[str, float]:
    """--min-accuracy TASK=ACC items as {task: fraction}; a malformed one is a SafeError (exit 2)."""
    floors = {}
    for item in items:
        task, sep, value = item.partition("=")
        try:
            floor = float(value)
        except ValueError:
            floor = None
        if not sep or not task.strip() or floor is None or not 0.0 <= floor <= 1.0:
            raise SafeError(f"--min-accuracy: expected TASK=ACC with ACC a fraction in [0, 1] "
                            f"(e.g. audio/digit=0.9), got {item!r}")
        floors[task.strip()] = floor
    return floors
