"""`safe sweep --slurm` against a real one-node SLURM cluster (ci/slurm/up.sh; CI brings it up).

Skipped only on a machine with no cluster when neither CI nor SAFE_REQUIRE_SLURM is set; in CI
a missing cluster is brought up here, and if that fails the tests fail instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safe_cli.sweep import state
from safe_cli.sweep.grid import Cell, Run

from conftest import FAST

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "ci" / "slurm" / "up.sh"
DEFAULT_CONF = "/tmp/safe-slurm/etc/slurm.conf"  # ci/slurm/up.sh's default SLURM_ROOT
REQUIRED = bool(os.environ.get("CI") or os.environ.get("SAFE_REQUIRE_SLURM"))

JOB = ["sweep.slurm.cpus=1", "sweep.slurm.mem=2G", "sweep.slurm.time=00:20:00"]
STAGE_B = ["training.stage_b.steps=2", "training.stage_b.batch_size=4", "training.stage_b.state_samples=8",
           "training.stage_b.checkpoint_every=2"]


def _answers(conf: str) -> bool:
    if shutil.which("sinfo") is None or not Path(conf).is_file():
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], env=dict(os.environ, SLURM_CONF=conf), capture_output=True,
                            text=True, timeout=30)
    return result.returncode == 0 and bool(set(result.stdout.split()) & {"idle", "mix", "alloc"})


@pytest.fixture(scope="module")
def slurm(cache):
    conf = os.environ.get("SLURM_CONF") or DEFAULT_CONF
    if not _answers(conf):
        if not REQUIRED:
            pytest.skip("no SLURM cluster: run ci/slurm/up.sh and export SLURM_CONF (CI does)")
        if "SLURM_CONF" not in os.environ:
            up = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=600)
            assert up.returncode == 0, f"ci/slurm/up.sh failed:\n{up.stdout}\n{up.stderr}"
        if not _answers(conf):
            pytest.fail(f"CI needs a SLURM cluster and none answers with SLURM_CONF={conf}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = old


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("SAFE_DATA_ROOT", "FORCE_COLOR")}
    e.update(NO_COLOR="1", COLUMNS="200", SAFE_NO_PROGRESS="1")
    return e


def submit(out: Path, overrides: list[str], *args: str) -> dict:
    command = [sys.executable, "-m", "safe_cli", "sweep", "--slurm", "--out", str(out), *args]
    for item in overrides:
        command += ["--set", item]
    began = time.time()
    result = subprocess.run(command, env=env(), cwd=out.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    submission = json.loads((out / "sweep.json").read_text())["submissions"][-1]
    assert f"squeue -r -j {','.join(submission['jobs'].values())}" in result.stdout
    assert f"safe sweep status {out}" in result.stdout
    return {**submission, "began": began, "stdout": result.stdout}


def queued(ids: list[str]) -> list[str]:
    result = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=30)
    return [line for line in result.stdout.splitlines() if line.split("_")[0].split("|")[0] in ids]


def wait_gone(ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while queued(ids):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids])
            pytest.fail(f"jobs still queued after {timeout} s: {queued(ids)}")
        time.sleep(0.5)


def jobcomp(conf: str) -> list[dict[str, str]]:
    """The finished jobs from jobcomp/filetxt (this cluster has no slurmdbd for sacct)."""
    text = Path(conf).read_text()
    match = re.search(r"^JobCompLoc=(\S+)", text, re.M)
    if not match or not Path(match.group(1)).exists():
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in Path(match.group(1)).read_text().splitlines()]


def test_two_variants_two_seeds_stages_a_b_complete_in_dependency_order(slurm, tmp_path):
    out = tmp_path / "sweep"
    variants, seeds = ("no_retention", "soft_retention"), (1, 2)
    sub = submit(out, FAST + STAGE_B + JOB, "--variants", ",".join(variants), "--seeds", "1,2", "--stages", "a,b")
    jobs, report_job = sub["jobs"], sub["report"]
    assert set(jobs) == {"a", "b"}
    wait_gone([*jobs.values(), report_job])

    runs = [Run(Cell(v, s), st) for st in "ab" for v in variants for s in seeds]
    records = {run.name: state.read(out, run) for run in runs}
    for run in runs:
        record = records[run.name]
        assert record["state"] == "done", (run.name, record, state.log_path(out, run).read_text()[-2000:])
        assert len(record["attempts"]) == 1
        attempt = record["attempts"][0]
        assert attempt["mode"] == "slurm" and attempt["slurm_array_job"] == jobs[run.stage]
    for variant in variants:
        for seed in seeds:
            a = records[f"{variant}.seed-{seed}.stage-a"]["attempts"][0]
            b = records[f"{variant}.seed-{seed}.stage-b"]["attempts"][0]
            assert b["started_unix"] >= a["ended_unix"], (variant, seed)
            assert a["slurm_array_task"] == b["slurm_array_task"]  # aftercorr pairs task i with task i

    finished = {(j.get("ArrayJobId"), j.get("ArrayTaskId")): j for j in jobcomp(slurm)}
    if finished:  # SLURM's own record: every task COMPLETED, b's task i started after a's task i ended
        for i in range(4):
            a, b = finished[(jobs["a"], str(i))], finished[(jobs["b"], str(i))]
            assert a["JobState"] == b["JobState"] == "COMPLETED"
            assert b["StartTime"] >= a["EndTime"]

    # The report job ran after every task and aggregated the four runs per stage.
    assert (out / "slurm" / f"report-{report_job}.out").exists()
    report = json.loads((out / "report.json").read_text())
    rows = {(r["variant"], r["stage"]): r for r in report["rows"]}
    assert set(rows) == {(v, s) for v in variants for s in "ab"}
    for (variant, stage), row in rows.items():
        assert row["done"] == 2 and row["seeds_done"] == [1, 2] and not row["failures"]
        assert row["metrics"]["audio_accuracy"]["n"] == 2
        assert (row["metrics"]["relative_compute"]["mean"] is not None) == (stage == "b")

    first_start = min(r["attempts"][0]["started_unix"] for r in records.values())
    last_end = max(r["attempts"][0]["ended_unix"] for r in records.values())
    print(f"\nSLURM sweep 2x2 a,b: first task training {first_start - sub['began']:.1f} s after submission, "
          f"all {len(runs)} runs done {last_end - sub['began']:.1f} s after it")

    # Everything finished: a resubmission submits nothing and says so.
    again = subprocess.run([sys.executable, "-m", "safe_cli", "sweep", "--slurm", "--out", str(out)], env=env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to submit" in again.stdout


def test_a_failed_task_cancels_only_its_own_next_stage_and_the_report_marks_it(slurm, tmp_path):
    out = tmp_path / "sweep"
    stale = out / "fisher_retention" / "seed-1"  # started with other settings: --resume refuses (exit 2)
    train = [sys.executable, "-m", "safe_cli", "train", "--stage", "a", "--variant", "fisher_retention", "--seed", "1",
             "--run-dir", str(stale)]
    for item in FAST + ["training.stage_a.steps=2"]:
        train += ["--set", item]
    assert subprocess.run(train, env=env(), capture_output=True, timeout=600).returncode == 0
    (stale / "stage-a" / "summary.json").unlink()

    sub = submit(out, FAST + STAGE_B + JOB, "--variants", "fisher_retention,no_retention", "--seeds", "1",
                 "--stages", "a,b")
    wait_gone([*sub["jobs"].values(), sub["report"]])
    assert state.read(out, Run(Cell("fisher_retention", 1), "a"))["state"] == "failed"
    assert not (out / "sweep-state" / "fisher_retention.seed-1.stage-b.json").exists()  # never started
    for stage in "ab":
        assert state.read(out, Run(Cell("no_retention", 1), stage))["state"] == "done"
    finished = {(j.get("ArrayJobId"), j.get("ArrayTaskId")): j for j in jobcomp(slurm)}
    if finished:
        assert finished[(sub["jobs"]["b"], "0")]["JobState"] == "CANCELLED"  # --kill-on-invalid-dep, not pending
        assert finished[(sub["jobs"]["b"], "1")]["JobState"] == "COMPLETED"
    report = json.loads((out / "report.json").read_text())  # written by the report job
    rows = {(r["variant"], r["stage"]): r for r in report["rows"]}
    assert rows[("fisher_retention", "a")]["failures"][0]["state"] == "failed"
    assert rows[("fisher_retention", "b")]["failures"][0]["state"] == "blocked"
    assert rows[("no_retention", "b")]["done"] == 1 and not rows[("no_retention", "b")]["failures"]
    status = subprocess.run([sys.executable, "-m", "safe_cli", "sweep", "status", str(out)], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert "another profile" in status.stdout and "stage a failed" in status.stdout


def test_usr1_checkpoints_requeues_and_the_task_resumes(slurm, tmp_path):
    out = tmp_path / "sweep"
    long_run = ["training.stage_a.steps=60", "training.stage_a.checkpoint_every=5", "training.stage_a.log_every=5"]
    sub = submit(out, FAST + long_run + JOB, "--variants", "soft_retention", "--seeds", "3", "--stages", "a")
    task = f"{sub['jobs']['a']}_0"
    checkpoint = out / "soft_retention" / "seed-3" / "stage-a" / "checkpoints" / "step-000005"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert time.monotonic() < deadline, "the task never reached its first checkpoint"
        time.sleep(0.1)
    # What SLURM does signal_seconds before the time limit (--signal=B:USR1@N): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=30)
    deadline = time.monotonic() + 120
    while not any("|PENDING|" in line for line in queued([sub["jobs"]["a"]])):
        assert time.monotonic() < deadline, f"not requeued: {queued([sub['jobs']['a']])}"
        time.sleep(0.2)
    # SLURM holds a requeued job about 2 minutes (Reason=BeginTime) so that the old allocation's
    # credential, revoked at requeue, cannot be mistaken for the new one. Credential times are
    # whole seconds: a relaunch within the revocation's second is refused ("Job credential
    # revoked", the task then FAILS at once; seen in CI). Wait past it, then release the task.
    time.sleep(2.5)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True, timeout=30)
    wait_gone([sub["jobs"]["a"], sub["report"]])

    record = state.read(out, Run(Cell("soft_retention", 3), "a"))
    assert record["state"] == "done"
    first, second = record["attempts"]
    assert first["outcome"] == "interrupted" and first["exit_code"] == 1
    assert second["outcome"] == "done" and second["slurm_restarts"] == "1"
    summary = json.loads((out / "soft_retention" / "seed-3" / "stage-a" / "summary.json").read_text())
    assert summary["resumed_from"] >= 5 and summary["steps"] == 60
    output = next((out / "slurm").glob("slurm-a-*_0.out")).read_text()
    assert "requeueing" in output and "restart 1" in output
