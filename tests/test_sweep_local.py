"""Local sweeps with real (tiny) training: a SIGKILLed sweep finishes only what was missing on
rerun; a failing run lets the others finish, blocks its own next stage, and the report marks it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safe_cli.sweep import state
from safe_cli.sweep.grid import Cell, Run

from conftest import FAST

# Long enough to be killed mid-run with checkpoints on disk (a run is a few seconds).
KILLABLE = FAST + ["training.stage_a.steps=40", "training.stage_a.checkpoint_every=5", "training.stage_a.log_every=5"]


def sweep_command(out: Path, overrides: list[str], *args: str) -> list[str]:
    command = [sys.executable, "-m", "safe_cli", "sweep", "--out", str(out), *args]
    for item in overrides:
        command += ["--set", item]
    return command


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("SAFE_DATA_ROOT", "FORCE_COLOR")}
    e.update(NO_COLOR="1", COLUMNS="200", SAFE_NO_PROGRESS="1")
    return e


def headers(log: Path) -> int:
    """Training processes a run's log saw (the sweep writes one header per start)."""
    return log.read_text().count("\n===== ") if log.exists() else 0


def test_a_killed_sweep_reruns_only_what_was_missing(cache, tmp_path):
    out = tmp_path / "sweep"
    grid = ["--variants", "no_retention,soft_retention", "--seeds", "1,2", "--stages", "a"]
    runs = [Run(Cell(v, s), "a") for v in ("no_retention", "soft_retention") for s in (1, 2)]
    second = runs[1]
    process = subprocess.Popen(sweep_command(out, KILLABLE, *grid), env=env(), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = out / "no_retention" / "seed-2" / "stage-a" / "checkpoints" / "step-000005"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the second run never reached its first checkpoint"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    assert state.read(out, runs[0])["state"] == "done"
    assert state.read(out, second)["state"] == "running"  # the sweep died before recording anything else
    assert not (out / "sweep-state" / f"{runs[2].name}.json").exists()
    # The orphaned training got SIGTERM (parent death), saved a checkpoint and exited: the lock frees.
    deadline = time.monotonic() + 120
    while state.is_locked(out, second.cell):
        assert time.monotonic() < deadline, "the orphaned run kept the run folder"
        time.sleep(0.1)
    assert "error: stopped by SIGTERM" in state.log_path(out, second).read_text()
    status = subprocess.run([sys.executable, "-m", "safe_cli", "sweep", "status", str(out)], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "interrupted (its sweep process is gone)" in status.stdout, status.stdout

    # Rerun with no --profile/--set: the sweep's own are reused from sweep.json.
    rerun = subprocess.run([sys.executable, "-m", "safe_cli", "sweep", "--out", str(out)], env=env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "already finished: no_retention.seed-1.stage-a" in rerun.stdout
    assert "this run: 3 trained, 1 already finished, 0 failed" in rerun.stdout

    records = {run.name: state.read(out, run) for run in runs}
    assert all(r["state"] == "done" for r in records.values())
    assert [len(records[r.name]["attempts"]) for r in runs] == [1, 2, 1, 1]
    assert [headers(state.log_path(out, r)) for r in runs] == [1, 2, 1, 1]
    rerun_id = records[runs[2].name]["attempts"][0]["invocation"]
    assert records[second.name]["attempts"][1]["invocation"] == rerun_id == records[runs[3].name]["attempts"][0]["invocation"]
    assert records[runs[0].name]["attempts"][0]["invocation"] != rerun_id
    summary = json.loads((out / "no_retention" / "seed-2" / "stage-a" / "summary.json").read_text())
    assert summary["resumed_from"] >= 5 and summary["steps"] == 40
    report = json.loads((out / "report.json").read_text())
    assert [(r["variant"], r["done"], r["failures"]) for r in report["rows"]] == [
        ("no_retention", 2, []), ("soft_retention", 2, [])]


def test_a_failing_run_lets_the_others_finish_and_the_report_marks_it(cache, tmp_path):
    out = tmp_path / "sweep"
    # A stale run folder: fisher_retention seed 1 was started with other settings and stopped
    # (no summary). `safe train --resume` refuses to mix two trainings: that run fails with exit 2.
    stale = out / "fisher_retention" / "seed-1"
    train = [sys.executable, "-m", "safe_cli", "train", "--stage", "a", "--variant", "fisher_retention", "--seed", "1",
             "--run-dir", str(stale)]
    for item in FAST + ["training.stage_a.steps=2"]:
        train += ["--set", item]
    assert subprocess.run(train, env=env(), capture_output=True, timeout=600).returncode == 0
    (stale / "stage-a" / "summary.json").unlink()

    grid = ["--variants", "no_retention,fisher_retention", "--seeds", "1", "--stages", "a,b", "--parallel", "2"]
    stage_b = ["training.stage_b.steps=2", "training.stage_b.batch_size=4", "training.stage_b.state_samples=8",
               "training.stage_b.checkpoint_every=2"]
    result = subprocess.run(sweep_command(out, FAST + stage_b, *grid), env=env(), cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 run(s) failed and 1 blocked" in result.stderr
    failed = state.read(out, Run(Cell("fisher_retention", 1), "a"))
    assert failed["state"] == "failed" and failed["exit_code"] == 2
    assert "the run was started with another profile" in failed["message"]
    assert state.read(out, Run(Cell("fisher_retention", 1), "b"))["state"] == "blocked"
    for stage in "ab":
        assert state.read(out, Run(Cell("no_retention", 1), stage))["state"] == "done"
        assert (out / "no_retention" / "seed-1" / f"stage-{stage}" / "summary.json").exists()

    report = json.loads((out / "report.json").read_text())
    rows = {(r["variant"], r["stage"]): r for r in report["rows"]}
    assert rows[("no_retention", "a")]["done"] == 1 and not rows[("no_retention", "a")]["failures"]
    assert rows[("no_retention", "b")]["metrics"]["relative_compute"]["mean"] is not None  # stage b's efficiency
    assert rows[("fisher_retention", "a")]["failures"][0]["state"] == "failed"
    assert rows[("fisher_retention", "b")]["failures"][0]["state"] == "blocked"
    md = (out / "report.md").read_text()
    assert "**1 (seed 1)**" in md and "another profile" in md
    assert (out / "report.png").stat().st_size > 1000
