"""--slurm: one sbatch array script per stage (one array task per variant x seed), chained per task.

Dependencies: stage b's array depends on stage a's with ``aftercorr`` (task i starts when task i
of stage a completed successfully), not ``afterok`` (which waits for *every* task of the array:
one failed variant would hold back all of stage b, pending forever with DependencyNeverSatisfied).
``--kill-on-invalid-dep=yes`` removes a task whose own stage-a task failed instead of leaving it
pending. Tested on SLURM 22.05 (tests/test_sweep_slurm.py).

Preemption and time limits: ``--signal=B:USR1@<signal_seconds>`` signals the batch shell, which
forwards USR1 to the run (`safe train` checkpoints and exits 1) and calls ``scontrol requeue``;
``--requeue`` lets SLURM requeue it after a node failure or preemption too. A requeued task
starts again (SLURM holds it about two minutes first, Reason=BeginTime) and resumes from its
checkpoint: every run is started with --resume. Output is appended (--open-mode=append), so a
task's .out file holds all its attempts.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..config.schema import SlurmConfig
from ..errors import RunFailed, SafeError
from .grid import Cell, cells, finished, prerequisite
from .manifest import Manifest

SLURM_DIR = "slurm"


def script_path(out: Path, stage: str) -> Path:
    return Path(out) / SLURM_DIR / f"stage-{stage}.sbatch"


def _header(config: SlurmConfig, job_name: str, output: Path, time_limit: str) -> list[str]:
    lines = [f"#SBATCH --job-name={job_name}", f"#SBATCH --output={output}", "#SBATCH --open-mode=append",
             f"#SBATCH --chdir={Path.cwd()}", f"#SBATCH --time={time_limit}", "#SBATCH --nodes=1",
             "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={config.cpus}", f"#SBATCH --mem={config.mem}"]
    if config.gpus:
        lines.append(f"#SBATCH --gres=gpu:{config.gpus}")
    if config.partition:
        lines.append(f"#SBATCH --partition={config.partition}")
    if config.account:
        lines.append(f"#SBATCH --account={config.account}")
    return lines


def _extra(config: SlurmConfig) -> list[str]:
    return [f"#SBATCH {arg}" for arg in config.extra_args]


def _setup(config: SlurmConfig) -> list[str]:
    if not config.setup:
        return []
    return ["", "# Setup lines from the profile (sweep.slurm.setup)."] + list(config.setup)


def python_command(config: SlurmConfig) -> str:
    return config.python or sys.executable


def _command(head: list[str], options: list[tuple[str, str]], tail: str) -> str:
    """A shell command, every word quoted, one option per line."""
    lines = [" ".join(shlex.quote(w) for w in head)]
    lines += [f"{option} {shlex.quote(value)}" for option, value in options]
    return " \\\n    ".join(lines + [tail])


def stage_script(out: Path, manifest: Manifest, config: SlurmConfig, stage: str, grid: list[Cell],
                 depends: bool) -> str:
    """The array script of one stage; array task i trains grid[i]."""
    out = Path(out).resolve()
    logs = out / SLURM_DIR / f"slurm-{stage}-%A_%a.out"
    lines = ["#!/bin/bash",
             f"# Written by `safe sweep --slurm`: stage {stage} of the sweep in {out},",
             f"# one array task per variant x seed ({len(grid)} tasks); `safe sweep run-task` runs `safe train`",
             "# with the options it is given and records the run's state in the sweep folder."]
    if depends:
        lines.append(f"# Submitted with --dependency=aftercorr:<stage {prerequisite(stage)} job>: task i starts "
                     f"when task i of stage {prerequisite(stage)} succeeded.")
    lines += _header(config, f"safe-{manifest.profile_name}-{stage}", logs, config.time)
    lines.append(f"#SBATCH --array=0-{len(grid) - 1}")
    lines.append("#SBATCH --requeue")
    if config.signal_seconds > 0:
        lines.append(f"#SBATCH --signal=B:USR1@{config.signal_seconds}")
    if depends:
        lines.append("#SBATCH --kill-on-invalid-dep=yes")
    lines += _extra(config)
    lines += ["", "set -uo pipefail", "", "cells=("]
    lines += [f"  {shlex.quote(f'{cell.variant} {cell.seed}')}  # task {i}" for i, cell in enumerate(grid)]
    lines += [")", 'read -r VARIANT SEED <<< "${cells[$SLURM_ARRAY_TASK_ID]}"']
    lines += _setup(config)
    head = [python_command(config), "-m", "safe_cli", "sweep", "run-task", str(out)]
    options = [("--stage", stage), ("--profile", manifest.profile)]
    if config.gpus > 1:  # one rank per GPU through torchrun; it has until the time limit to checkpoint
        options += [("--processes", str(config.gpus)), ("--shutdown-seconds", str(max(30, config.signal_seconds)))]
    options += [("--set", item) for item in manifest.train_overrides]
    lines += [
        "",
        'echo "== $(date -Is) $SLURM_JOB_ID (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}, '
        'restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $VARIANT seed $SEED stage ' + stage + '"',
        "",
        "# USR1 comes before the time limit (or from `scancel --signal=USR1 --batch`): pass it on to the",
        "# run, which saves a checkpoint and exits, then put the task back in the queue; it resumes.",
        "requeue=0",
        "trap 'requeue=1; kill -USR1 \"$pid\" 2>/dev/null' USR1",
        _command(head, options, '--variant "$VARIANT" --seed "$SEED" &'),
        "pid=$!",
        'wait "$pid"; rc=$?',
        "# wait returns early when the trap ran: wait again for the run's own exit code.",
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done',
        'if [ "$requeue" = 1 ] && [ "$rc" -ne 0 ]; then',
        '  echo "== $(date -Is) checkpoint saved (exit $rc); requeueing $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '  echo "== scontrol requeue failed: resubmit with safe sweep --slurm (runs resume)"',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def report_script(out: Path, config: SlurmConfig, profile_name: str) -> str:
    out = Path(out).resolve()
    lines = ["#!/bin/bash", "# Written by `safe sweep --slurm`: the sweep's report once every stage's tasks ended."]
    lines += _header(config.model_copy(update={"gpus": 0, "cpus": 1, "mem": "2G"}), f"safe-{profile_name}-report",
                     out / SLURM_DIR / "report-%j.out", "00:15:00")
    lines += _extra(config) + _setup(config)
    lines += ["", " ".join(shlex.quote(p) for p in [python_command(config), "-m", "safe_cli", "sweep", "report", str(out)])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- submission


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SafeError(f"--slurm: {name} not found on PATH (is this a SLURM login node? `safe sweep --slurm "
                        "--dry-run` writes the scripts without submitting)")
    return path


def sbatch(script: Path, dependency: Optional[str] = None) -> str:
    command = [_tool("sbatch"), "--parsable"]
    if dependency:
        command.append(f"--dependency={dependency}")
    command.append(str(script))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RunFailed(f"sbatch {script}: exit {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def queue(job_ids: list[str]) -> Optional[dict[str, tuple[str, str]]]:
    """``{"<array job>_<task>": (state, reason)}`` for the jobs still queued or running; None without squeue."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    result = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        # squeue refuses ids it no longer knows (all finished and purged): nothing is queued.
        return {} if "Invalid job id" in result.stderr else None
    jobs = {}
    for line in result.stdout.splitlines():
        job, _, rest = line.partition("|")
        status, _, reason = rest.partition("|")
        jobs[job.strip()] = (status, reason)
    return jobs


def latest_jobs(manifest: Manifest) -> dict[str, str]:
    return dict(manifest.submissions[-1]["jobs"]) if manifest.submissions else {}


def submit(out: Path, manifest: Manifest, config: SlurmConfig, stages: list[str], dry_run: bool) -> dict:
    """Write the scripts; unless dry_run, submit them chained and record the jobs in the manifest."""
    out = Path(out)
    grid = cells(manifest.variants, manifest.seeds)
    # A stage whose every run finished is not submitted; the others get the whole grid (tasks
    # that finished exit at once), so task i is the same variant and seed in every stage's array.
    todo = [s for s in stages if not all(finished(out, cell, s) for cell in grid)]
    if not dry_run and manifest.submissions:
        ids = [j for j in latest_jobs(manifest).values()] + [manifest.submissions[-1].get("report") or ""]
        live = queue([j for j in ids if j])
        if live:
            raise SafeError(f"--slurm: this sweep's jobs {', '.join(sorted(live))} are still queued or running; "
                            f"wait for them (safe sweep status {out}) or scancel them first")
    (out / SLURM_DIR).mkdir(parents=True, exist_ok=True)
    scripts: dict[str, Path] = {}
    for stage in todo:
        depends = prerequisite(stage) in todo
        path = script_path(out, stage)
        path.write_text(stage_script(out, manifest, config, stage, grid, depends))
        scripts[stage] = path
    report = out / SLURM_DIR / "report.sbatch"
    report.write_text(report_script(out, config, manifest.profile_name))
    plan = {"stages": todo, "scripts": {s: str(p) for s, p in scripts.items()}, "report_script": str(report),
            "cells": [[c.variant, c.seed] for c in grid], "jobs": {}, "report": None}
    if dry_run or not todo:
        return plan
    jobs: dict[str, str] = {}
    try:
        for stage in todo:
            before = prerequisite(stage)
            jobs[stage] = sbatch(scripts[stage], f"aftercorr:{jobs[before]}" if before in jobs else None)
        plan["report"] = sbatch(report, "afterany:" + ":".join(jobs.values()))
    finally:
        if jobs:
            plan["jobs"] = jobs
            manifest.submissions.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": jobs,
                                         "report": plan["report"], "cells": plan["cells"]})
            manifest.save(out)
    return plan
