"""Stage A end to end on the demo profile with tiny settings: files, retention variants, resume, refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from safe_cli.config import load_profile
from safe_cli.config.variants import BUILTIN_VARIANTS
from safe_cli.errors import SafeError
from safe_cli.foundation.prepare import load_prepared_models
from safe_cli.training.stage_a import StageATrainer, train_stage_a

from conftest import FAST

STAGE_FILES = {
    "profile.yaml", "env.json", "base_fingerprint", "metrics.jsonl", "trainable.safetensors", "summary.json",
    "eval_examples.json",
    "checkpoints/step-000002/trainable.safetensors", "checkpoints/step-000002/state.pt",
    "checkpoints/step-000002/meta.json",
    "checkpoints/step-000004/trainable.safetensors", "checkpoints/step-000004/state.pt",
    "checkpoints/step-000004/meta.json",
}


def files_under(directory):
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("variant", sorted(BUILTIN_VARIANTS))
def test_each_variant_writes_the_run_layout_and_leaves_the_base_alone(cache, tmp_path, variant):
    profile = load_profile("demo", FAST)
    base, _ = load_prepared_models(profile)
    before = base.fingerprint()
    result = train_stage_a(profile, variant=variant, seed=0, run_dir=tmp_path / "run")
    stage = tmp_path / "run" / "stage-a"
    assert result.stage_dir == stage
    assert files_under(stage) == STAGE_FILES
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["variant"] == variant and summary["steps"] == 4 and summary["base_unchanged"] is True
    assert summary["base_fingerprint"] == before == (stage / "base_fingerprint").read_text().strip()
    assert {t["task"] for t in summary["tasks"]} >= {"vl/digit", "text/arith", "audio/digit", "av/sum"}
    assert any(t["with_audio"] and t["kind"] == "vl" for t in summary["tasks"])  # distractor rows evaluated
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    metrics = json.loads((stage / "metrics.jsonl").read_text().splitlines()[-1])
    uses_kl = BUILTIN_VARIANTS[variant].distillation_weight > 0
    assert ("kl" in metrics) == uses_kl
    assert ("fisher" in metrics) == (BUILTIN_VARIANTS[variant].fisher_weight > 0)
    state = torch.load(stage / "checkpoints/step-000004/state.pt", weights_only=True)
    assert ("null_space" in state) == BUILTIN_VARIANTS[variant].enable_null_space
    if BUILTIN_VARIANTS[variant].enable_null_space:
        assert state["null_space"]["bases"], "null space never became active"
    # The final weights are the last checkpoint's, and they moved away from the initial ones.
    final = load_file(stage / "trainable.safetensors")
    last = load_file(stage / "checkpoints/step-000004/trainable.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert any(k.endswith(".gate") for k in final)
    again, _ = load_prepared_models(profile)
    assert again.fingerprint() == before


def _trainer(tmp_path, name="run", variant="soft_retention", extra=()):
    return StageATrainer(load_profile("demo", FAST + list(extra)), variant=variant, seed=0,
                         run_dir=tmp_path / name)


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights(cache, tmp_path):
    trainer = _trainer(tmp_path)
    trainer.build()
    before = {k: v.detach().clone() for k, v in trainer.trainable.items()}
    inputs = trainer.step_batches()[1]
    for batch in inputs["micro"]:
        batch["audio"] = [wave * float("nan") for wave in batch["audio"]]
    record = trainer._step(1, inputs)
    assert record["skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in trainer.trainable.items())


def test_existing_checkpoints_need_resume(cache, tmp_path):
    train_stage_a(load_profile("demo", FAST), variant="no_retention", seed=0, run_dir=tmp_path / "run")
    with pytest.raises(SafeError, match="already holds a run's checkpoints; pass --resume"):
        _trainer(tmp_path, variant="no_retention")


def test_resume_refuses_a_changed_profile(cache, tmp_path):
    train_stage_a(load_profile("demo", FAST), variant="no_retention", seed=0, run_dir=tmp_path / "run")
    profile = load_profile("demo", FAST + ["training.stage_a.lr_adapter=0.01"])
    with pytest.raises(SafeError, match=r"training.stage_a.lr_adapter: 0.003 in the run, 0.01 now"):
        StageATrainer(profile, variant="no_retention", seed=0, run_dir=tmp_path / "run", resume=True)


def test_resume_refuses_a_checkpoint_of_another_base(cache, tmp_path):
    train_stage_a(load_profile("demo", FAST), variant="no_retention", seed=0, run_dir=tmp_path / "run")
    meta_path = tmp_path / "run/stage-a/checkpoints/step-000004/meta.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "sha256:" + "0" * 64
    meta_path.write_text(json.dumps(meta))
    trainer = StageATrainer(load_profile("demo", FAST), variant="no_retention", seed=0, run_dir=tmp_path / "run",
                            resume=True)
    trainer.build()
    with pytest.raises(SafeError, match="trained on base sha256:0000.*but the profile's base is sha256:"):
        trainer.restore()


def test_unknown_variant_names_the_known_ones(cache, tmp_path):
    with pytest.raises(SafeError, match="unknown variant 'softer'; known: fisher_retention, full_retention, no_retention, "):
        _trainer(tmp_path, variant="softer")


def test_a_custom_variant_from_the_profile_trains(cache, tmp_path):
    extra = ["retention.variants.kl_only_strong.extends=soft_retention",
             "retention.variants.kl_only_strong.distillation_weight=6.0"]
    result = train_stage_a(load_profile("demo", FAST + extra), variant="kl_only_strong", seed=0,
                           run_dir=tmp_path / "run")
    assert result.variant == "kl_only_strong" and result.base_unchanged


# --------------------------------------------------------------------------- exact resume after SIGKILL


def _cli(tmp_path, run_dir, *extra):
    args = [sys.executable, "-m", "safe_cli", "train", "--stage", "a", "--variant", "full_retention",
            "--run-dir", str(run_dir), "--seed", "3"]
    for item in FAST + ["training.stage_a.steps=40", "training.stage_a.checkpoint_every=5",
                        "training.stage_a.log_every=5"]:
        args += ["--set", item]
    return args + list(extra)


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(cache, tmp_path):
    env = dict(os.environ, SAFE_CACHE_DIR=str(cache), SAFE_NO_PROGRESS="1")
    # Warm the cache (and check the CLI end to end) with the uninterrupted run.
    straight = subprocess.run(_cli(tmp_path, tmp_path / "straight"), env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert "base fingerprint unchanged" in straight.stdout

    process = subprocess.Popen(_cli(tmp_path, tmp_path / "killed"), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "killed/stage-a/checkpoints/step-000005/meta.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed/stage-a/trainable.safetensors").exists()

    resumed = subprocess.run(_cli(tmp_path, tmp_path / "killed", "--resume", "--json"), env=env,
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] >= 5
    a = load_file(tmp_path / "straight/stage-a/trainable.safetensors")
    b = load_file(tmp_path / "killed/stage-a/trainable.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ: {different[:5]}"

    def logged(run):
        lines = (tmp_path / run / "stage-a/metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "examples_per_second"} for line in lines]

    assert logged("straight") == logged("killed")  # no step logged twice, none missing


def test_cli_errors_are_clean(cache, tmp_path):
    env = dict(os.environ, SAFE_CACHE_DIR=str(cache), SAFE_NO_PROGRESS="1")
    result = subprocess.run([sys.executable, "-m", "safe_cli", "train", "--stage", "d"], env=env,
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "unknown stage 'd'; choose a, b or c" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "safe_cli", "train", "--stage", "b", "--run-dir", "nowhere"],
                            env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "has no finished Stage A" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "safe_cli", "train", "--help"], env=env,
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "safe train --stage a --variant soft_retention" in result.stdout
