"""`safe sweep` without training: grid, manifest, the local scheduler on stand-in runs, the batch
scripts executed by bash with stand-in python/scontrol, and the report on known summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from safe_cli.errors import SafeError
from safe_cli.sweep import grid, manifest as manifest_mod, report as report_mod, state
from safe_cli.sweep.grid import Cell, Run
from safe_cli.sweep.local import run_local
from safe_cli.sweep.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


def safe(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SAFE_DATA_ROOT", "FORCE_COLOR")}
    env.update(NO_COLOR="1", COLUMNS="200", PYTHONIOENCODING="utf-8", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "safe_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------- grid


def test_seeds_accept_lists_and_ranges():
    assert grid.parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert grid.parse_seeds("2, 2,1") == [2, 1]
    for bad in ("3-1", "x", "1-", ""):
        with pytest.raises(SafeError, match="--seeds"):
            grid.parse_seeds(bad)


def test_stages_are_ordered_and_checked():
    assert grid.normalise_stages(["c", "A", "b", "a"]) == ["a", "b", "c"]
    with pytest.raises(SafeError, match="unknown stage 'd'"):
        grid.normalise_stages(["a", "d"])
    assert [grid.prerequisite(s) for s in "abc"] == [None, "a", "b"]


def test_expand_is_stage_major_and_runs_live_under_out(tmp_path):
    runs = grid.expand(["v1", "v2"], [1, 2, 3], ["a", "b"])
    assert len(runs) == 12
    assert [r.stage for r in runs] == ["a"] * 6 + ["b"] * 6
    assert [(r.variant, r.seed) for r in runs[:6]] == [("v1", 1), ("v1", 2), ("v1", 3), ("v2", 1), ("v2", 2), ("v2", 3)]
    assert grid.stage_path(tmp_path, runs[-1]) == tmp_path / "v2" / "seed-3" / "stage-b"
    assert grid.cells(["v1", "v2"], [1, 2]) == [Cell("v1", 1), Cell("v1", 2), Cell("v2", 1), Cell("v2", 2)]


def test_variant_names_must_be_plain():
    grid.check_variant_names(["soft_retention", "my-variant.2"])
    with pytest.raises(SafeError, match="'two words'"):
        grid.check_variant_names(["two words"])


# --------------------------------------------------------------------------- manifest


def _manifest(**kw) -> Manifest:
    base = dict(profile="demo", profile_name="demo", overrides=[], variants=["v1"], seeds=[1], stages=["a"],
                settings={"training": {"stage_a": {"steps": 4}}})
    base.update(kw)
    return Manifest(**base)


def test_rerun_with_other_settings_is_refused_naming_the_key(tmp_path):
    old = _manifest()
    new = _manifest(settings={"training": {"stage_a": {"steps": 5}}})
    with pytest.raises(SafeError) as error:
        manifest_mod.reconcile(old, new, tmp_path)
    assert "training.stage_a.steps: 4 in the sweep, 5 now" in str(error.value)


def test_grid_grows_as_a_union_and_sweep_overrides_may_change(tmp_path):
    old = _manifest(overrides=["sweep.slurm.time=01:00:00"])
    new = _manifest(variants=["v2"], seeds=[1, 2], stages=["b"], overrides=["sweep.slurm.time=02:00:00"])
    kept, notes = manifest_mod.reconcile(old, new, tmp_path)
    assert (kept.variants, kept.seeds, kept.stages) == (["v1", "v2"], [1, 2], ["a", "b"])
    assert kept.overrides == ["sweep.slurm.time=02:00:00"] and kept.train_overrides == []
    assert "grows by variants v2, seeds 2, stages b" in notes[0]
    kept.save(tmp_path)
    assert manifest_mod.load(tmp_path) == kept


# --------------------------------------------------------------------------- local scheduler (stand-in runs)

FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    stage_dir, variant, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    time.sleep(seconds)
    if variant.startswith("bad"):
        print("error: --variant: this variant always fails", flush=True)
        sys.exit(3)
    os.makedirs(stage_dir, exist_ok=True)
    json.dump({"tasks": []}, open(os.path.join(stage_dir, "summary.json"), "w"))
""")


def _fake(tmp_path, seconds=0.5):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    out = tmp_path / "sweep"
    return out, lambda run: [sys.executable, str(script), str(grid.stage_path(out, run)), run.variant, str(seconds)]


def test_a_failed_run_lets_the_others_finish_and_blocks_its_next_stage(tmp_path):
    out, command = _fake(tmp_path)
    m = _manifest(variants=["good", "bad"], seeds=[1, 2], stages=["a", "b"])
    runs = grid.expand(m.variants, m.seeds, m.stages)
    outcome = run_local(out, m, runs, parallel=2, say=lambda line: None, command=command)
    assert sorted(outcome.failed) == ["bad.seed-1.stage-a", "bad.seed-2.stage-a"]
    assert sorted(outcome.blocked) == ["bad.seed-1.stage-b", "bad.seed-2.stage-b"]
    assert sorted(n for n, s in outcome.executed.items() if s == "done") == [
        "good.seed-1.stage-a", "good.seed-1.stage-b", "good.seed-2.stage-a", "good.seed-2.stage-b"]
    failed = state.read(out, Run(Cell("bad", 1), "a"))
    assert failed["state"] == "failed" and failed["exit_code"] == 3
    assert failed["message"] == "error: --variant: this variant always fails"
    blocked = state.read(out, Run(Cell("bad", 1), "b"))
    assert blocked["state"] == "blocked" and "stage a of bad.seed-1 has not finished" in blocked["message"]
    # b of a cell started only after its a ended; two runs overlapped (--parallel 2).
    spans = {}
    for run in runs:
        attempts = state.read(out, run)["attempts"]
        if attempts:
            spans[run.name] = (attempts[0]["started_unix"], attempts[0]["ended_unix"])
    for seed in (1, 2):
        assert spans[f"good.seed-{seed}.stage-b"][0] >= spans[f"good.seed-{seed}.stage-a"][1]
    intervals = sorted(spans.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))

    # A rerun skips what finished and retries only the failed runs (which fail again).
    again = run_local(out, m, runs, parallel=2, say=lambda line: None, command=command)
    assert sorted(again.executed) == ["bad.seed-1.stage-a", "bad.seed-2.stage-a"]
    assert len(again.skipped) == 4
    assert len(state.read(out, Run(Cell("bad", 1), "a"))["attempts"]) == 2
    assert len(state.read(out, Run(Cell("good", 1), "a"))["attempts"]) == 1


def test_a_run_locked_by_another_process_is_not_started_twice(tmp_path):
    out, command = _fake(tmp_path, seconds=0.1)
    m = _manifest(variants=["good"], seeds=[1])
    fd = state.try_lock(out, Cell("good", 1))
    assert fd is not None
    said = []
    result = {}

    import threading

    def release():
        time.sleep(1.0)
        result["still_pending"] = not grid.finished(out, Cell("good", 1), "a")
        os.close(fd)

    thread = threading.Thread(target=release)
    thread.start()
    outcome = run_local(out, m, grid.expand(["good"], [1], ["a"]), say=said.append, command=command)
    thread.join()
    assert result["still_pending"], "the sweep trained a run another process held"
    assert outcome.executed == {"good.seed-1.stage-a": "done"}
    assert any(line.startswith("waiting: good.seed-1") for line in said)


# --------------------------------------------------------------------------- the batch scripts, run by bash

FAKE_PYTHON = textwrap.dedent("""\
    #!/bin/bash
    # Stand-in for python: records its arguments; with SLOW=1 waits for USR1, then exits 1 like safe train.
    printf '%s\\n' "$@" > "$RECORD"
    if [ "${SLOW:-0}" = 1 ]; then
      trap 'echo usr1 >> "$RECORD.signal"; sleep 1; echo saved >> "$RECORD.signal"; exit 1' USR1
      for _ in $(seq 100); do sleep 0.1; done
      exit 0
    fi
    exit "${EXIT:-0}"
""")


def _dry_run(tmp_path, *extra):
    out = tmp_path / "sweep"
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    result = safe("sweep", "--slurm", "--dry-run", "--out", str(out), "--variants", "no_retention,full_retention",
                  "--seeds", "1,2", "--stages", "a,b",
                  "--set", "training.stage_a.steps=4",
                  "--set", "data.held_out_speakers=[theo, \"it's a name\"]",
                  "--set", f"sweep.slurm.python={fake}",
                  "--set", "sweep.slurm.signal_seconds=90", "--set", "sweep.slurm.partition=gpu",
                  "--set", "sweep.slurm.account=lab", "--set", "sweep.slurm.gpus=1", "--set", "sweep.slurm.time=02:00:00",
                  "--set", 'sweep.slurm.setup=["module load cuda/12", "export FOO=bar"]',
                  "--set", 'sweep.slurm.extra_args=["--qos=high"]', *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return out, fake, result


def test_dry_run_writes_array_scripts_chained_with_signal_requeue_and_setup(tmp_path):
    out, fake, result = _dry_run(tmp_path)
    a = (out / "slurm" / "stage-a.sbatch").read_text()
    b = (out / "slurm" / "stage-b.sbatch").read_text()
    for script in (a, b):
        for line in ("#SBATCH --array=0-3", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --gres=gpu:1",
                     "#SBATCH --time=02:00:00", "#SBATCH --qos=high", "#SBATCH --open-mode=append",
                     "module load cuda/12", "export FOO=bar", "scontrol requeue", "trap "):
            assert line in script, (line, script)
        assert script.index("module load cuda/12") < script.index(str(fake))
        assert "--set sweep." not in script, "SLURM options are not training overrides"
    assert "#SBATCH --kill-on-invalid-dep=yes" in b and "--kill-on-invalid-dep" not in a
    assert f"sbatch --parsable --dependency=aftercorr:<stage a job> {out / 'slurm' / 'stage-b.sbatch'}" in result.stdout
    assert "nothing submitted" in result.stdout
    assert not any((out / "sweep-state").glob("*.json")) if (out / "sweep-state").exists() else True
    assert json.loads((out / "sweep.json").read_text())["submissions"] == []


@pytest.mark.parametrize("task, variant, seed", [(0, "no_retention", "1"), (3, "full_retention", "2")])
def test_batch_script_runs_its_cell_with_every_set_quoted(tmp_path, task, variant, seed):
    out, fake, _ = _dry_run(tmp_path)
    record = tmp_path / "args"
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="70",
               RECORD=str(record), EXIT="0")
    done = subprocess.run(["bash", str(out / "slurm" / "stage-b.sbatch")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    assert args[:5] == ["-m", "safe_cli", "sweep", "run-task", str(out.resolve())]
    pairs = dict(zip(args[5::2], args[6::2]))
    assert pairs["--stage"] == "b" and pairs["--variant"] == variant and pairs["--seed"] == seed
    assert pairs["--profile"] == "demo"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert sets == ["training.stage_a.steps=4", "data.held_out_speakers=[theo, \"it's a name\"]"]
    env["EXIT"] = "3"
    failed = subprocess.run(["bash", str(out / "slurm" / "stage-a.sbatch")], env=env, capture_output=True, timeout=30)
    assert failed.returncode == 3


def test_usr1_is_forwarded_and_the_task_requeued(tmp_path):
    out, fake, _ = _dry_run(tmp_path)
    record = tmp_path / "args"
    calls = tmp_path / "scontrol.calls"
    scontrol = tmp_path / "bin" / "scontrol"
    # Records its arguments and whether the run had finished saving when the requeue came.
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" $(tail -1 {record}.signal) >> {calls}\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="70", RECORD=str(record),
               SLOW="1", PATH=f"{scontrol.parent}:{os.environ['PATH']}")
    process = subprocess.Popen(["bash", str(out / "slurm" / "stage-a.sbatch")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for _ in range(100):
        if record.exists():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1 does: the batch shell only
    output, _ = process.communicate(timeout=30)
    assert (tmp_path / "args.signal").read_text() == "usr1\nsaved\n", output
    assert calls.read_text().split() == ["requeue", "77", "saved"], output  # requeued after the run exited
    assert process.returncode == 0 and "requeueing 77" in output


# --------------------------------------------------------------------------- report on known summaries


def _summary(audio: float, vl_with: float, efficiency=None) -> dict:
    tasks = [
        {"task": "audio/digit", "kind": "audio", "with_audio": True, "n": 10, "base_accuracy": 0.1,
         "safe_accuracy": audio, "delta": audio - 0.1},
        {"task": "av/sum", "kind": "av", "with_audio": True, "n": 30, "base_accuracy": 0.1,
         "safe_accuracy": audio, "delta": audio - 0.1},
        {"task": "vl/digit", "kind": "vl", "with_audio": False, "n": 10, "base_accuracy": 0.9,
         "safe_accuracy": 0.9, "delta": 0.0},
        {"task": "vl/digit", "kind": "vl", "with_audio": True, "n": 10, "base_accuracy": 0.9,
         "safe_accuracy": 0.9 + vl_with, "delta": vl_with},
        {"task": "text/arith", "kind": "text", "with_audio": True, "n": 30, "base_accuracy": 0.5,
         "safe_accuracy": 0.5 + 2 * vl_with, "delta": 2 * vl_with},
    ]
    return {"tasks": tasks, **({"efficiency": efficiency} if efficiency else {})}


def test_report_aggregates_seeds_reads_efficiency_and_marks_failures(tmp_path):
    out = tmp_path / "sweep"
    m = _manifest(variants=["v1", "v2"], seeds=[1, 2], stages=["a", "b"])
    m.save(out)
    values = {("v1", 1): 0.6, ("v1", 2): 0.8, ("v2", 1): 0.5}
    for (variant, seed), audio in values.items():
        for stage in ("a", "b"):
            path = grid.stage_path(out, Run(Cell(variant, seed), stage))
            path.mkdir(parents=True)
            efficiency = {"relative_audio_compute": 0.5 + 0.1 * seed} if stage == "b" else None
            (path / "summary.json").write_text(json.dumps(_summary(audio, -0.01 * seed, efficiency)))
            if (variant, stage) == ("v1", "a"):  # the stage's own evaluation, as stages write it
                n = 200 if seed == 1 else 20  # 200 identical answers decide 2.5 points; 20 cannot
                examples = [{"task": "vl/digit", "with_audio": True, "base_correct": [1] * n,
                             "safe_correct": [1] * n}]
                (path / "eval_examples.json").write_text(json.dumps(examples))
                (path / "profile.yaml").write_text("extends: demo\nname: mine\n")
    state.write(out, Run(Cell("v2", 2), "a"), {"variant": "v2", "seed": 2, "stage": "a", "state": "failed",
                                                "exit_code": 1, "message": "error: out of memory", "attempts": [{}]})
    state.write(out, Run(Cell("v2", 2), "b"), {"variant": "v2", "seed": 2, "stage": "b", "state": "blocked",
                                                "message": "stage a of v2.seed-2 has not finished", "attempts": []})
    report = report_mod.build(out, m)
    rows = {(r["variant"], r["stage"]): r for r in report["rows"]}
    v1a = rows[("v1", "a")]["metrics"]
    assert v1a["audio_accuracy"]["mean"] == pytest.approx(0.7)
    assert v1a["audio_accuracy"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    # n-weighted over VL (n 10, delta d) and text (n 30, delta 2d): 1.75 d; d = -0.01 and -0.02.
    assert v1a["vl_delta_with_audio"]["mean"] == pytest.approx(-0.02625)
    assert v1a["vl_delta_without_audio"]["mean"] == 0.0
    assert v1a["relative_compute"]["mean"] is None
    assert rows[("v1", "b")]["metrics"]["relative_compute"]["mean"] == pytest.approx(0.65)
    assert rows[("v2", "a")]["done"] == 1 and rows[("v2", "a")]["metrics"]["audio_accuracy"]["std"] is None
    assert rows[("v2", "a")]["failures"] == [{"seed": 2, "state": "failed", "exit_code": 1,
                                              "message": "error: out of memory"}]
    assert rows[("v2", "b")]["failures"][0]["state"] == "blocked"
    assert not rows[("v1", "a")]["failures"]

    paths = report_mod.write(out, report)
    assert json.loads(paths["json"].read_text())["schema"] == "safe.sweep-report/1"
    md = paths["md"].read_text()
    assert rows[("v1", "a")]["verdicts"] == {"pass": 1, "inconclusive": 1} and rows[("v1", "b")]["verdicts"] == {}
    assert "| v1 | a | 2/2 | 70.0% ± 14.1 | +0.0 ± 0.0 | -2.6 ± 1.2 | – | pass 1, inconclusive 1 | 0 |" in md
    assert "| v2 | a | 1/2 | 50.0% |" in md and "**1 (seed 2)**" in md
    assert "- v2 seed 2 stage a: failed (exit 1): `error: out of memory`" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_compares_each_variant_with_no_retention_paired_by_seed(tmp_path):
    """Per-task accuracy, speed, and variant - no_retention per seed with a Student-t interval:
    differences 0.1, 0.2, 0.3 over seeds 1-3 give 0.2 +- t(0.975, 2) x 0.1 / sqrt(3) = 0.2 +- 0.2484."""
    out = tmp_path / "sweep"
    m = _manifest(variants=["no_retention", "soft_retention"], seeds=[1, 2, 3], stages=["a"])
    m.save(out)
    for seed in (1, 2, 3):
        for variant, audio, vl_with, speed in (("no_retention", 0.5, -0.6, 400.0),
                                               ("soft_retention", 0.5 + 0.1 * seed, -0.6 + 0.1 * seed, 200.0)):
            path = grid.stage_path(out, Run(Cell(variant, seed), "a"))
            path.mkdir(parents=True)
            (path / "summary.json").write_text(json.dumps({**_summary(audio, vl_with), "examples_per_second": speed}))
    report = report_mod.build(out, m)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["soft_retention"]["tasks"]["av/sum"]["mean"] == pytest.approx(0.7)
    assert rows["no_retention"]["examples_per_second"]["mean"] == 400.0
    (compared,) = report["comparisons"]
    assert compared["variant"] == "soft_retention" and compared["baseline"] == "no_retention"
    audio_gain = compared["differences"]["task:audio/digit"]
    assert audio_gain["mean"] == pytest.approx(0.2) and audio_gain["n"] == 3
    assert audio_gain["ci95"] == pytest.approx([0.2 - 0.248414, 0.2 + 0.248414], abs=1e-5)
    # VL with a clip: n-weighted 1.75 x the per-seed difference (see _summary).
    assert compared["differences"]["vl_delta_with_audio"]["mean"] == pytest.approx(0.35)
    md = report_mod.to_markdown(report)
    assert "| soft_retention | a | 50.0% ± 0.0 | 50.0% ± 0.0 | 200 |" not in md  # per-task values are its own
    assert "| no_retention | a | 50.0% ± 0.0 | 50.0% ± 0.0 | 400 |" in md
    assert "## Against no_retention" in md and "| +20.0 [-4.8, +44.8] |" in md


# --------------------------------------------------------------------------- CLI refusals


def test_cli_refuses_bad_grids_and_a_changed_profile(tmp_path):
    out = tmp_path / "s"
    first = safe("sweep", "--slurm", "--dry-run", "--out", str(out), "--variants", "no_retention", "--seeds", "1",
                 "--set", "data.num_train=8", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    changed = safe("sweep", "--slurm", "--dry-run", "--out", str(out), "--set", "data.num_train=9", cwd=tmp_path)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "data.num_train: 8 in the sweep, 9 now" in changed.stderr
    # No --profile/--set: the sweep's own are reused; a new seed grows the grid.
    grown = safe("sweep", "--slurm", "--dry-run", "--out", str(out), "--seeds", "2", cwd=tmp_path)
    assert grown.returncode == 0, grown.stderr
    assert "grows by seeds 2" in grown.stderr
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [1, 2]

    unknown = safe("sweep", "--out", str(tmp_path / "u"), "--variants", "no_retention,nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "error: --variants: unknown variant(s) 'nope'" in unknown.stderr
    dry = safe("sweep", "--dry-run", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert dry.returncode == 2 and "--dry-run: only with --slurm" in dry.stderr
    missing = safe("sweep", "status", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 2 and "no sweep here" in missing.stderr


def test_help_names_the_subcommands_and_examples(tmp_path):
    result = safe("sweep", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("status", "report", "--slurm", "--parallel", "Examples", "safe sweep status runs/sweep1"):
        assert text in result.stdout
    assert "run-task" not in result.stdout


def _local_sweep_script(out, tmp_path, before=""):
    """A Python program that runs a two-run local sweep of 30 s fake trainings and prints its outcome;
    ``before`` is code run first (it may patch the sweep's modules)."""
    return textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from safe_cli.sweep import grid, runner
        from safe_cli.sweep.local import run_local
        from safe_cli.sweep.manifest import Manifest
    """) + textwrap.dedent(before) + textwrap.dedent(f"""
        out = Path({str(out)!r})
        m = Manifest(profile="demo", profile_name="demo", overrides=[], variants=["v1", "v2"], seeds=[1],
                     stages=["a"], settings={{}})
        command = lambda run: [sys.executable, {str(tmp_path / 'fake_train.py')!r}, str(grid.stage_path(out, run)),
                               run.variant, "30"]
        outcome = run_local(out, m, grid.expand(m.variants, m.seeds, m.stages), parallel=1, say=print,
                            command=command)
        print("interrupted" if outcome.interrupted else "finished", sorted(outcome.executed.items()), flush=True)
    """)


def test_sigterm_stops_the_sweep_and_records_runs_as_interrupted(tmp_path):
    out, _ = _fake(tmp_path, seconds=30)
    process = subprocess.Popen([sys.executable, "-c", _local_sweep_script(out, tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    path = out / "sweep-state" / "v1.seed-1.stage-a.json"
    for _ in range(200):
        if path.exists():
            break
        time.sleep(0.05)
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert time.monotonic() - began < 10, "the sweep waited for the run instead of stopping it"
    assert "interrupted [('v1.seed-1.stage-a', 'interrupted')]" in output, output
    assert state.read(out, Run(Cell("v1", 1), "a"))["state"] == "interrupted"
    assert not (out / "sweep-state" / "v2.seed-1.stage-a.json").exists()  # nothing new started


def test_a_signal_that_comes_while_a_run_is_starting_still_stops_it(tmp_path):
    # The race CI hit: SIGTERM lands after the training process exists but before the sweep has
    # it among its running runs. Here the signal is sent from inside runner.start, every time.
    out, _ = _fake(tmp_path, seconds=30)
    code = _local_sweep_script(out, tmp_path, before="""
        real_start = runner.start
        def start_then_signal(*args, **kwargs):
            process = real_start(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            return process
        runner.start = start_then_signal
    """)
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - began < 20, "the run started during the signal was left running"
    assert "interrupted [('v1.seed-1.stage-a', 'interrupted')]" in result.stdout, result.stdout + result.stderr
    assert not (out / "sweep-state" / "v2.seed-1.stage-a.json").exists()


def test_a_finished_run_of_other_settings_is_not_counted_nor_built_upon(tmp_path):
    out, command = _fake(tmp_path, seconds=0.1)
    m = _manifest(variants=["v1", "v2"], seeds=[1], stages=["a", "b"])
    for variant, steps in (("v1", 9), ("v2", 4)):  # v1's stage a was trained elsewhere with 9 steps
        stage = grid.stage_path(out, Run(Cell(variant, 1), "a"))
        stage.mkdir(parents=True)
        (stage / "summary.json").write_text(json.dumps(_summary(0.5, 0.0)))
        (stage / "profile.yaml").write_text(f"training:\n  stage_a:\n    steps: {steps}\nsweep:\n  parallel: 3\n")
    outcome = run_local(out, m, grid.expand(m.variants, m.seeds, m.stages), say=lambda line: None, command=command)
    assert outcome.skipped == ["v2.seed-1.stage-a"]  # same settings (its sweep section does not matter)
    assert outcome.executed == {"v1.seed-1.stage-a": "failed", "v2.seed-1.stage-b": "done"}
    assert outcome.blocked == ["v1.seed-1.stage-b"]
    record = state.read(out, Run(Cell("v1", 1), "a"))
    assert "training.stage_a.steps: 4 in the sweep, 9 in the run" in record["message"]
    m.save(out)
    rows = {(r["variant"], r["stage"]): r for r in report_mod.build(out, m)["rows"]}
    assert rows[("v1", "a")]["done"] == 0 and rows[("v1", "a")]["failures"][0]["state"] == "failed"
    assert rows[("v2", "a")]["done"] == 1


def test_several_gpus_per_task_launch_the_run_through_torchrun(tmp_path):
    """sweep.slurm.gpus > 1: the array task runs one rank per GPU with torchrun, which passes
    SLURM's USR1 on to the ranks and gives them the warning time to checkpoint."""
    from safe_cli.sweep.grid import Cell, Run
    from safe_cli.sweep.runner import train_command

    out, fake, _ = _dry_run(tmp_path, "--set", "sweep.slurm.gpus=4")
    script = (out / "slurm" / "stage-a.sbatch").read_text()
    assert "#SBATCH --gres=gpu:4" in script
    assert "--processes 4 \\\n    --shutdown-seconds 90 \\\n" in script
    command = train_command(out, "demo", [], Run(Cell("soft_retention", 1), "a"), python="py", processes=4,
                            shutdown_seconds=90)
    assert command[:12] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "90",
                            "-m", "safe_cli"]
    assert command[12:15] == ["train", "--stage", "a"]
    single = train_command(out, "demo", [], Run(Cell("soft_retention", 1), "a"), python="py")
    assert single[:3] == ["py", "-m", "safe_cli"]
