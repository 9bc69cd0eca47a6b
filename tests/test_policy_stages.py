"""Stages B and C end to end on the demo profile with tiny settings: the policy trains without
touching the base or Stage A's weights, resumes exactly, skips the encoder at budget 0, and the
distilled gate is what eval-retention deploys."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safe_cli.cli.main import app
from safe_cli.config import load_profile
from safe_cli.errors import SafeError
from safe_cli.evaluation.runs import load_trained_model, locate
from safe_cli.rl.gate import AudioGate
from safe_cli.rl.state import PolicyInputs, pool_policy_inputs
from safe_cli.data.sources import split_pool
from safe_cli.training.stage_a import train_stage_a
from safe_cli.training.stage_b import StageBTrainer, train_stage_b
from safe_cli.training.stage_c import distill_policy

from conftest import FAST

STAGES_BC = FAST + [
    "training.stage_b.steps=4", "training.stage_b.batch_size=8", "training.stage_b.checkpoint_every=2",
    "training.stage_b.log_every=2", "training.stage_b.state_samples=8",
    "training.stage_c.steps=5", "training.stage_c.train_examples=16", "training.stage_c.validation_examples=16",
]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stage_a_run(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy-run")
    train_stage_a(load_profile("demo", STAGES_BC), variant="soft_retention", seed=0, run_dir=root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def full_run(stage_a_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(stage_a_run, run)
    profile = load_profile("demo", STAGES_BC)
    stage_a_weights = digest(run / "stage-a/trainable.safetensors")
    result_b = train_stage_b(profile, variant="soft_retention", seed=0, run_dir=run)
    result_c = distill_policy(profile, variant="soft_retention", seed=0, run_dir=run)
    return run, result_b, result_c, stage_a_weights


def test_stage_b_writes_the_policy_and_leaves_the_base_and_stage_a_alone(full_run):
    run, result, _, stage_a_weights = full_run
    stage = run / "stage-b"
    for name in ("profile.yaml", "env.json", "base_fingerprint", "metrics.jsonl", "policy.safetensors",
                 "summary.json", "checkpoints/step-000002/meta.json", "checkpoints/step-000004/state.pt"):
        assert (stage / name).is_file(), name
    assert not (stage / "trainable.safetensors").exists()  # adapters frozen: Stage A's weights are the model's
    assert digest(run / "stage-a/trainable.safetensors") == stage_a_weights
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["base_unchanged"] is True
    assert summary["base_fingerprint"] == (run / "stage-a/base_fingerprint").read_text().strip()
    names = [p["strategy"] for p in summary["strategies"]]
    assert names == ["always-0", "always-4", "always-8", "always-12", "oracle", "policy"]
    points = {p["strategy"]: p for p in summary["strategies"]}
    assert points["always-0"]["relative_audio_compute"] == 0.0 and points["always-0"]["audio_usage_rate"] == 0.0
    assert points["always-12"]["relative_audio_compute"] == pytest.approx(1.0)
    assert points["oracle"]["audio_usage_rate"] == pytest.approx(0.5)  # half the clips come with audio questions
    assert summary["efficiency"] == points["policy"]
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]
    assert {"reward", "audio_usage", "usage_on_distractors", "multiplier", "relative_compute"} <= set(logged[-1])
    weights = load_file(stage / "policy.safetensors")
    assert {k.split(".")[0] for k in weights} == {"policy", "normalizer"}


def test_stage_b_refuses_a_run_without_stage_a_and_a_changed_model(stage_a_run, tmp_path):
    with pytest.raises(SafeError, match="has no finished Stage A"):
        StageBTrainer(load_profile("demo", STAGES_BC), run_dir=tmp_path / "empty")
    with pytest.raises(SafeError, match="projector.num_tokens: 12 in the run, 16 now"):
        StageBTrainer(load_profile("demo", STAGES_BC + ["projector.num_tokens=16"]), run_dir=stage_a_run)


def test_budget_zero_never_runs_the_audio_encoder(stage_a_run):
    profile = load_profile("demo", STAGES_BC)
    model = load_trained_model(locate(stage_a_run / "stage-a"), profile, "cpu")
    calls = []
    model.audio_encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    from safe_cli.data.batches import PromptBatcher

    batcher = PromptBatcher(model.base)
    pool = split_pool(profile, "test", model.audio_encoder.sample_rate)
    chosen = [e for e in pool.examples if e.audio is not None][:3]
    batch = batcher.for_generation(pool.queries(chosen, with_answers=False))
    with torch.no_grad():
        model(**batch, token_budget=torch.tensor([0, 0, 0]), audio=pool.audio(chosen))
        assert calls == []
        model(**batch, token_budget=torch.tensor([0, 4, 0]), audio=pool.audio(chosen))
        assert calls == [1]  # one clip: only the row with a budget
        pool_policy_inputs(model, batcher, pool, chosen)
        assert calls == [1]  # the policy's state never needs the encoder


def _cli(run_dir, *extra):
    args = [sys.executable, "-m", "safe_cli", "train", "--stage", "b", "--variant", "soft_retention",
            "--run-dir", str(run_dir), "--seed", "0"]
    for item in STAGES_BC + ["training.stage_b.steps=30", "training.stage_b.checkpoint_every=3",
                             "training.stage_b.log_every=3"]:
        args += ["--set", item]
    return args + list(extra)


def test_killed_stage_b_resumes_to_the_same_policy(stage_a_run, cache, tmp_path):
    env = dict(os.environ, SAFE_CACHE_DIR=str(cache), SAFE_NO_PROGRESS="1")
    for name in ("straight", "killed"):
        shutil.copytree(stage_a_run / "stage-a", tmp_path / name / "stage-a")
    straight = subprocess.run(_cli(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    assert "base fingerprint unchanged" in straight.stdout

    process = subprocess.Popen(_cli(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    first = tmp_path / "killed/stage-b/checkpoints/step-000003/meta.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed/stage-b/policy.safetensors").exists()

    resumed = subprocess.run(_cli(tmp_path / "killed", "--resume", "--json"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] >= 3
    a = load_file(tmp_path / "straight/stage-b/policy.safetensors")
    b = load_file(tmp_path / "killed/stage-b/policy.safetensors")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "resumed policy differs"

    def logged(run):
        lines = (tmp_path / run / "stage-b/metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "examples_per_second"} for line in lines]

    assert logged("straight") == logged("killed")


def test_tuned_adapters_move_and_are_what_the_stage_b_folder_evaluates(stage_a_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stage_a_run / "stage-a", run / "stage-a")
    profile = load_profile("demo", STAGES_BC + ["training.stage_b.tune_adapters=true",
                                                "training.stage_b.adapter_lr=0.01"])
    result = train_stage_b(profile, variant="soft_retention", seed=0, run_dir=run)
    assert result.base_unchanged
    tuned = load_file(run / "stage-b/trainable.safetensors")
    original = load_file(run / "stage-a/trainable.safetensors")
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)
    trained = locate(run / "stage-b")
    assert trained.weights_path == run / "stage-b/trainable.safetensors" and trained.policy_path is not None


def test_stage_c_exports_a_calibrated_gate(full_run):
    run, _, result, _ = full_run
    stage = run / "stage-c"
    gate = AudioGate.load(stage)
    config = json.loads((stage / "gate.json").read_text())
    assert config["schema"] == "safe.audio-gate/2"
    assert config["base_fingerprint"] == (run / "stage-a/base_fingerprint").read_text().strip()
    assert gate.budget_on in (4, 8, 12) and 0.0 <= gate.threshold <= 1.0 + 1e-6
    calibration = result.calibration
    assert calibration["target"] == "accuracy" and calibration["validation_examples"] == 16
    assert calibration["gate"]["threshold"] == gate.threshold
    kinds = [p["kind"] for p in result.strategies]
    assert kinds.count("gate") == 1 and kinds.count("gate-curve") == 11 and "policy" in kinds
    assert result.efficiency["strategy"] == "gate"


def test_eval_retention_deploys_the_gate_and_plots_every_strategy(full_run, tmp_path):
    run, _, _, _ = full_run
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval-retention", str(run), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "gate" and report["stage"] == "c"
    strategies = {p["strategy"] for p in report["strategies"]}
    assert {"always-0", "always-12", "oracle", "policy", "gate", "gate@0.5"} <= strategies
    gate_point = next(p for p in report["strategies"] if p["strategy"] == "gate")
    assert report["efficiency"]["audio_usage_rate"] == gate_point["audio_usage_rate"]
    assert report["bypass"]["bit_exact"] is True
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The reported SAFE answers are the gate's: rows it gave no audio are the base's answers.
    examples = [e for e in report["examples"] if e["with_audio"]]
    assert examples and all(len(e["safe_answers"]) == len(e["base_answers"]) for e in examples)


def test_distill_policy_cli_needs_stage_b(stage_a_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stage_a_run / "stage-a", run / "stage-a")
    result = CliRunner().invoke(app, ["distill-policy", str(run)])
    assert result.exit_code == 2 and "has no finished Stage B" in result.output
    result = CliRunner().invoke(app, ["distill-policy", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a SAFE run" in result.output
    result = CliRunner().invoke(app, ["distill-policy", "--help"])
    assert result.exit_code == 0 and "safe distill-policy runs/demo/soft_retention/seed-0" in result.output


def test_deploy_answer_gives_the_base_answer_where_the_gate_says_no_audio(full_run):
    from safe_cli.data.batches import PromptBatcher
    from safe_cli.deploy import answer

    run, _, _, _ = full_run
    profile = load_profile("demo", STAGES_BC)
    model = load_trained_model(locate(run / "stage-a"), profile, "cpu")
    gate = AudioGate.load(run / "stage-c")
    batcher = PromptBatcher(model.base)
    pool = split_pool(profile, "test", model.audio_encoder.sample_rate)
    chosen = [e for e in pool.examples if e.audio is not None][:6]
    queries = pool.queries(chosen, with_answers=False)
    never = answer(model, gate, batcher, queries, pool.audio(chosen), threshold=1.01)
    always = answer(model, gate, batcher, queries, pool.audio(chosen), threshold=0.0)
    assert never[1].tolist() == [0] * 6 and always[1].tolist() == [gate.budget_on] * 6
    from safe_cli.data.batches import generate_answers

    base_answers = generate_answers(model.base_model, batcher, queries, 8)
    assert never[0] == base_answers
    assert np.all(always[1].numpy() > 0)


def test_readme_deployment_example_runs_as_written(full_run, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    run = full_run[0]
    (tmp_path / "runs/demo/soft_retention").mkdir(parents=True)
    (tmp_path / "runs/demo/soft_retention/seed-0").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "safe_cli.deploy" in b)
    namespace = {"clip": np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)}
    exec(compile(block, "README deployment example", "exec"), namespace)
    assert len(namespace["texts"]) == 2 and namespace["budgets"].shape == (2,)
    assert set(namespace["budgets"].tolist()) <= {0, namespace["gate"].budget_on}


# --------------------------------------------------------------------------- one prefill per example


def _deployed(full_run):
    from safe_cli.data.batches import PromptBatcher

    run = full_run[0]
    profile = load_profile("demo", STAGES_BC)
    model = load_trained_model(locate(run / "stage-a"), profile, "cpu")
    pool = split_pool(profile, "test", model.audio_encoder.sample_rate)
    chosen = [e for e in pool.examples if e.audio is not None][:6]
    return model, AudioGate.load(run / "stage-c"), PromptBatcher(model.base), pool, chosen


class LayerCalls:
    """Counts the forward calls of each of the base's decoder layers while in use."""

    def __init__(self, model):
        self.calls = [0] * model.base.num_layers
        self.handles = [layer.register_forward_hook(lambda *_, i=i: self.calls.__setitem__(i, self.calls[i] + 1))
                        for i, layer in enumerate(model.base.decoder_layers)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_the_deployed_gate_decides_inside_the_answers_own_prefill(full_run):
    """The state is the same whether or not a row then takes audio, it is the state Stage B/C
    trained on (policy_inputs), and the layers up to the first fused one run once per decoding
    step: one prefill, no second forward to decide (the old path ran the whole base first)."""
    from safe_cli.deploy import answer, generate_gated
    from safe_cli.rl.state import policy_inputs

    model, gate, batcher, pool, chosen = _deployed(full_run)
    queries, waves = pool.queries(chosen, with_answers=False), pool.audio(chosen)
    trained_on = policy_inputs(model, batcher, queries, waves)
    branch = model.branch_layer
    assert branch > 0  # the demo fuses layers 1 and 3: layer 0 is below the branch point
    states = {}
    for threshold in (1.01, 0.0):
        with LayerCalls(model) as counted:
            new_ids, budgets, states[threshold] = generate_gated(model, gate, batcher, queries, waves, 6, threshold)
        steps = new_ids.shape[1]  # the prefill gives the first token, each later step one more
        assert counted.calls == [steps] * model.base.num_layers
        assert budgets.tolist() == ([0] * 6 if threshold > 1 else [gate.budget_on] * 6)
    for field in PolicyInputs.FIELDS:
        assert torch.equal(getattr(states[1.01], field), getattr(states[0.0], field)), field
        assert torch.equal(getattr(states[0.0], field), getattr(trained_on, field)), field
    # answer(), what a deployment calls, is that one prefill too.
    with LayerCalls(model) as counted:
        texts, _ = answer(model, gate, batcher, queries, waves, 6, threshold=0.0)
    steps = max(len(batcher.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) + 1
    assert counted.calls == [min(steps, 6)] * model.base.num_layers
    # Deciding alone runs the base only up to the branch point.
    with LayerCalls(model) as counted:
        policy_inputs(model, batcher, queries, waves)
    assert counted.calls == [1] * (branch + 1) + [0] * (model.base.num_layers - branch - 1)


def test_budget_zero_rows_of_the_deployed_path_are_the_bases_own_generation_bit_for_bit(full_run):
    """A mixed batch through the deployed path: the rows the gate gives no audio decode exactly
    the base's logits at every step, and the rows with audio do not."""
    model, gate, batcher, pool, chosen = _deployed(full_run)
    queries, waves = pool.queries(chosen, with_answers=False), pool.audio(chosen)
    batch = batcher.for_generation(queries)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=0)
    mixed = torch.tensor([0, 12, 0, 12, 0, 12])
    gated, budgets = model.generate_gated(**batch, decide=lambda hidden: mixed, audio=waves, **settings)
    base = model.base_model.generate(**batch, **settings)
    assert budgets.tolist() == mixed.tolist()
    off, on = mixed == 0, mixed > 0
    assert torch.equal(gated.sequences[off], base.sequences[off])
    for gated_step, base_step in zip(gated.scores, base.scores):
        assert torch.equal(gated_step[off], base_step[off])
    assert not torch.equal(torch.stack(gated.scores)[:, on], torch.stack(base.scores)[:, on])
    # What generate_gated does for audio rows is what generate does at that budget.
    reference = model.generate(**batch, token_budget=mixed, audio=waves, **settings)
    for gated_step, reference_step in zip(gated.scores, reference.scores):
        assert torch.equal(gated_step, reference_step)


def test_end_to_end_cost_is_what_torchs_flop_counter_counts_for_each_kind_of_example(full_run):
    """The cost model's FLOPs for one example of each kind (text, VL, VL with a distractor clip at
    budget 0, a spoken question at the largest budget), prefill and decoding steps included,
    against torch's FLOP counter over the same generate call."""
    from torch.utils.flop_counter import FlopCounterMode

    from safe_cli.rl.cost import AudioCostModel, EndToEndCost, count_cpu_attention

    model, _, batcher, pool, _ = _deployed(full_run)
    cost = EndToEndCost.for_model(model, AudioCostModel.for_model(model, 12))
    count_cpu_attention()
    kinds = {}
    for example in pool.examples:
        kinds.setdefault((example.task.split("/")[0], example.audio is not None), example)
    cases = [(kinds[("text", False)], 0), (kinds[("vl", False)], 0), (kinds[("vl", True)], 0), (kinds[("audio", True)], 12)]
    new_tokens = 3

    def counted(example, budget):
        batch = batcher.for_generation(pool.queries([example], with_answers=False))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.generate(**batch, token_budget=torch.tensor([budget]), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           **pool.audio_inputs([example], "cpu"))
        return counter.get_total_flops()

    counted(cases[-1][0], 12)  # the first audio call folds LoRA into the fused weights once: not per example
    for example, budget in cases:
        state = pool_policy_inputs(model, batcher, pool, [example])
        predicted = cost.flops(budget, int(state.text_length[0]), float(state.clip_seconds[0]), new_tokens,
                               bool(state.has_image[0]))
        assert predicted == counted(example, budget), (example.task, budget)


def test_a_gate_or_policy_trained_on_the_previous_state_is_refused_with_what_to_do(full_run, tmp_path):
    from safetensors.torch import save_file

    from safe_cli.rl.gate import GateError
    from safe_cli.training.stage_b import load_policy

    run = tmp_path / "run"
    shutil.copytree(full_run[0], run)
    config_path = run / "stage-c/gate.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "schema": "safe.audio-gate/1"}))
    with pytest.raises(GateError, match="retrain Stage B and C"):
        AudioGate.load(run / "stage-c")
    result = CliRunner().invoke(app, ["eval-retention", str(run)])
    assert result.exit_code == 2 and "retrain Stage B and C" in result.output and "Traceback" not in result.output

    policy_path = run / "stage-b/policy.safetensors"
    save_file(load_file(str(policy_path)), str(policy_path))  # the weights as before issue 25: no state version
    profile = load_profile("demo", STAGES_BC)
    with pytest.raises(SafeError, match="retrain it: safe train --stage b"):
        load_policy(policy_path, AudioGate.load(full_run[0] / "stage-c").state_dim, profile)
