"""`safe sweep`: the grid runner (local or --slurm), and `safe sweep status|report DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from ..errors import RunFailed, SafeError
from ..tables import ReportTable
from .common import console, err_console, handle_errors, resolve_profile

sweep_app = typer.Typer(
    name="sweep", add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

OutArgument = typer.Argument(..., metavar="DIR", help="The sweep's folder (its --out; holds sweep.json).")


@sweep_app.callback(invoke_without_command=True)
@handle_errors
def sweep(
    ctx: typer.Context,
    profile: Optional[str] = typer.Option(
        None, "--profile", "-p", help="Built-in profile name or YAML path (default: the sweep's own when --out "
        "holds one, else demo)."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated variants (default: "
                                           "profile sweep.variants)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds: 1,2,3 or 1-3 (default: sweep.seeds)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages a,b,c; b runs after a of the same variant "
                                         "and seed, c after b (default: sweep.stages)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Sweep folder; runs go to "
                                      "`<out>/<variant>/seed-<N>` (default: `<runs_dir>/<profile name>`, where safe train puts "
                                      "them too)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE", help="Override a profile key for every run (repeatable; default: "
        "the sweep's own). sweep.* keys (SLURM options) may change between reruns, others may not."),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-j", min=1, help="Local mode: runs at once "
                                           "(default: sweep.parallel, 1)."),
    slurm: bool = typer.Option(False, "--slurm", help="Submit one sbatch array per stage instead of running here."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --slurm: write and print the scripts, submit nothing."),
) -> None:
    """Train variants x seeds x stages, skip what finished, resume what stopped, compare them.

    Local mode runs every (variant, seed, stage) as `safe train ... --resume` in a subprocess,
    one at a time or --parallel N at once. Runs whose summary.json exists are skipped, others
    resume from their checkpoint; a failed run is recorded and the sweep goes on (a later stage
    of the same variant and seed is then marked blocked). Rerunning the same command finishes
    only what is missing. At the end it writes report.json/.md/.png in the sweep folder.

    --slurm writes `<out>/slurm/stage-<x>.sbatch`, one array task per variant x seed, stage b's
    task i depending on stage a's task i (aftercorr), options from the profile's sweep.slurm
    section; submits them with sbatch --parsable, then a small job that writes the report.
    Before the time limit a task gets USR1, checkpoints and requeues itself; it resumes.

    Subcommands: `safe sweep status DIR` (every run's state, SLURM queue included, and the
    table so far) and `safe sweep report DIR` (writes report.json, report.md, report.png).

    Exit codes: 0 every run finished (or jobs submitted); 1 some run failed, was blocked or
    stopped; 2 bad usage, profile or grid (e.g. a rerun with another profile in the same --out).

    Examples:

        safe sweep --variants no_retention,soft_retention --seeds 1,2 \\
            --out runs/sweep1

        safe sweep --profile avdigits --parallel 2

        safe sweep --slurm --stages a,b --set sweep.slurm.partition=gpu \\
            --set sweep.slurm.gpus=1

        safe sweep --slurm --dry-run --out runs/sweep1

        safe sweep status runs/sweep1

        safe sweep report runs/sweep1
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..config.variants import resolve_variants
    from ..sweep import grid, manifest as manifest_mod
    from ..sweep.local import run_local

    if dry_run and not slurm:
        raise SafeError("--dry-run: only with --slurm (a local sweep has nothing to write ahead)")
    if out is None:
        defaults = resolve_profile(profile or "demo", set_)
        out_dir = Path(defaults.runs_dir).expanduser() / defaults.name
    else:
        out_dir = Path(out).expanduser()
    existing = manifest_mod.load(out_dir)
    profile_ref = profile or (existing.profile if existing else "demo")
    if Path(profile_ref).expanduser().is_file():
        profile_ref = str(Path(profile_ref).expanduser().resolve())  # jobs and reruns may start elsewhere
    overrides = list(set_) if set_ is not None else (list(existing.overrides) if existing else [])
    resolved = resolve_profile(profile_ref, overrides)

    known = resolve_variants(resolved.retention.variants)
    chosen_variants = grid.parse_names(variants, "--variants") if variants else \
        (existing.variants if existing else list(resolved.sweep.variants))
    grid.check_variant_names(chosen_variants)
    unknown = [v for v in chosen_variants if v not in known]
    if unknown:
        raise SafeError(f"--variants: unknown variant(s) {', '.join(map(repr, unknown))} "
                        f"(known: {', '.join(sorted(known))})")
    chosen_seeds = grid.parse_seeds(seeds) if seeds else (existing.seeds if existing else list(resolved.sweep.seeds))
    chosen_stages = grid.normalise_stages(grid.parse_names(stages, "--stages")) if stages else \
        (existing.stages if existing else grid.normalise_stages(resolved.sweep.stages))

    fresh = manifest_mod.Manifest(
        profile=profile_ref, profile_name=resolved.name, overrides=overrides, variants=chosen_variants,
        seeds=chosen_seeds, stages=chosen_stages, settings=manifest_mod.trained_settings(resolved))
    kept, notes = manifest_mod.reconcile(existing, fresh, out_dir)
    for note in notes:
        err_console.print(Text(f"note: {note}"), highlight=False)
    kept.save(out_dir)
    runs = grid.expand(chosen_variants, chosen_seeds, chosen_stages)
    console.print(f"sweep {out_dir}: {len(chosen_variants)} variant(s) x {len(chosen_seeds)} seed(s) x stage(s) "
                  f"{','.join(chosen_stages)} = {len(runs)} run(s), profile {profile_ref}", highlight=False)

    if slurm:
        _submit(out_dir, kept, resolved.sweep.slurm, chosen_stages, dry_run)
        return
    outcome = run_local(out_dir, kept, runs, parallel or resolved.sweep.parallel,
                        say=lambda line: console.print(Text(line), highlight=False))
    console.print(f"this run: {len(outcome.executed)} trained, {len(outcome.skipped)} already finished, "
                  f"{len(outcome.failed)} failed or stopped, {len(outcome.blocked)} blocked; "
                  f"{outcome.wall_seconds:.1f} s wall", highlight=False)
    _report(out_dir, write=True)
    if outcome.interrupted:
        raise RunFailed(f"stopped; rerun `safe sweep --out {out_dir}` to continue (finished runs are kept)")
    if not outcome.ok:
        raise RunFailed(f"{len(outcome.failed)} run(s) failed and {len(outcome.blocked)} blocked: "
                        f"safe sweep status {out_dir} shows why (logs in {out_dir / 'logs'})")


def _submit(out_dir: Path, kept, config, stages: list[str], dry_run: bool) -> None:
    from ..sweep import slurm as slurm_mod

    plan = slurm_mod.submit(out_dir, kept, config, stages, dry_run)
    if not plan["stages"]:
        console.print("every run of these stages has finished: nothing to submit", highlight=False)
        _report(out_dir, write=True)
        return
    for stage in plan["stages"]:
        path = Path(plan["scripts"][stage])
        console.print(Text(f"----- {path}", style="bold"))
        console.print(Text(path.read_text()), highlight=False)
    if dry_run:
        chain = []
        for stage in plan["stages"]:
            before = {"b": "a", "c": "b"}.get(stage)
            dep = f"--dependency=aftercorr:<stage {before} job> " if before in plan["stages"] else ""
            chain.append(f"sbatch --parsable {dep}{plan['scripts'][stage]}")
        chain.append(f"sbatch --parsable --dependency=afterany:<all stage jobs> {plan['report_script']}")
        console.print("dry run, nothing submitted; these commands would:\n  " + "\n  ".join(chain), highlight=False)
        return
    jobs = plan["jobs"]
    ids = ",".join(jobs.values())
    for stage, job in jobs.items():
        console.print(f"stage {stage}: job {job} ({len(plan['cells'])} array tasks)", highlight=False)
    console.print(f"report: job {plan['report']} (after every stage's tasks ended)", highlight=False)
    slurm_dir = out_dir / slurm_mod.SLURM_DIR
    console.print(
        "follow them:\n"
        f"  safe sweep status {out_dir}\n"
        f"  squeue -r -j {ids},{plan['report']}\n"
        f"  tail -f {slurm_dir}/slurm-{plan['stages'][0]}-{jobs[plan['stages'][0]]}_0.out\n"
        f"  sacct -X -j {ids} -o JobID,State,ExitCode,Start,End   (clusters with accounting)\n"
        f"  cancel: scancel {ids}; resubmit later with the same command: finished runs are skipped, "
        "the others resume", highlight=False)


def _status_table(rows) -> ReportTable:
    table = ReportTable(title="runs")
    for column in ("variant", "seed", "stage", "state", "tries", "exit", "time", "detail"):
        if column in ("seed", "tries", "exit", "time"):
            table.add_number_column(column)
        else:
            table.add_text_column(column)
    styles = {"done": "green", "failed": "red", "blocked": "red", "running": "cyan", "queued": "yellow"}
    for row in rows:
        shown = row["shown"]
        detail = row.get("queue") or (row.get("message") if shown != "done" else "") or ""
        seconds = f"{row['last_seconds']:.0f} s" if row.get("last_seconds") is not None else ""
        table.add_row(row["variant"], str(row["seed"]), row["stage"],
                      Text(shown, style=styles.get(shown.split(" ")[0], "")), str(row["attempt_count"]),
                      "" if row.get("exit_code") is None else str(row["exit_code"]), seconds, Text(detail))
    return table


def _comparison_table(report) -> ReportTable:
    from ..sweep.report import METRICS, failure_text, fmt, verdict_text

    table = ReportTable(title=f"sweep {report['profile']}: mean ± std over seeds")
    table.add_text_column("variant")
    table.add_text_column("stage")
    for column in ("done", *METRICS.values()):
        table.add_number_column(column)
    table.add_text_column("verdicts", justify="right")
    table.add_text_column("failed", justify="right")
    for row in report["rows"]:
        table.add_row(row["variant"], row["stage"], f"{row['done']}/{row['runs']}",
                      *[fmt(key, row["metrics"][key]) for key in METRICS], verdict_text(row.get("verdicts") or {}),
                      Text(failure_text(row), style="bold red" if row["failures"] else ""))
    return table


def _report(out_dir: Path, write: bool) -> dict:
    from ..sweep import manifest as manifest_mod, report as report_mod

    kept = manifest_mod.require(out_dir)
    report = report_mod.build(out_dir, kept)
    console.print(_comparison_table(report))
    if write:
        paths = report_mod.write(out_dir, report)
        console.print(f"report: {paths['json']}, {paths['md'].name}, {paths['png'].name}", highlight=False)
    return report


@sweep_app.command("status")
@handle_errors
def status(out: str = OutArgument) -> None:
    """Every run's state (done, running, queued, failed with its error line, blocked, interrupted) and the table so far.

    For a --slurm sweep it asks squeue about the latest submission's array tasks. Writes nothing.

    Examples:

        safe sweep status runs/demo
    """
    from ..sweep import manifest as manifest_mod
    from ..sweep.status import run_states

    out_dir = Path(out).expanduser()
    kept = manifest_mod.require(out_dir)
    rows = run_states(out_dir, kept)
    console.print(_status_table(rows))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["shown"].split(" (")[0]] = counts.get(row["shown"].split(" (")[0], 0) + 1
    console.print(", ".join(f"{n} {name}" for name, n in counts.items()), highlight=False)
    if kept.submissions:
        jobs = kept.submissions[-1]["jobs"]
        console.print("SLURM jobs: " + ", ".join(f"stage {s} {j}" for s, j in jobs.items())
                      + f", report {kept.submissions[-1].get('report')}", highlight=False)
    _report(out_dir, write=False)


@sweep_app.command("report")
@handle_errors
def report(out: str = OutArgument) -> None:
    """Write the sweep's comparison table as report.json, report.md and report.png in DIR, and print it.

    Per variant and stage: mean ± std over seeds of audio accuracy (audio and AV questions),
    the VL/text delta without and with a distractor clip, relative audio compute (stages b, c),
    and failed runs with their error line.

    Examples:

        safe sweep report runs/demo
    """
    _report(Path(out).expanduser(), write=True)


@sweep_app.command("run-task", hidden=True)
@handle_errors
def run_task(
    out: str = OutArgument,
    stage: str = typer.Option(..., "--stage"),
    variant: str = typer.Option(..., "--variant"),
    seed: int = typer.Option(..., "--seed"),
    profile: str = typer.Option(..., "--profile"),
    set_: Optional[List[str]] = typer.Option(None, "--set"),
    processes: int = typer.Option(1, "--processes", min=1, help="Processes (GPUs) for the run: > 1 launches it "
                                  "with torchrun, one rank per GPU."),
    shutdown_seconds: int = typer.Option(120, "--shutdown-seconds", min=1, help="With --processes > 1: how long "
                                         "torchrun waits for the ranks to checkpoint after a signal."),
) -> None:
    """One array task of a --slurm sweep (the batch scripts call it)."""
    import sys

    from ..sweep.task import run_task as run_one

    sys.exit(run_one(Path(out), stage, variant, seed, profile, list(set_ or []),
                     say=lambda line: print(line, flush=True), processes=processes,
                     shutdown_seconds=shutdown_seconds))
