"""`safe eval-retention`: statistics against hand computations, known-outcome runs, the bypass gate.

Known outcomes without a competent base: the evaluation data is a manifest of images and audio
the benchmark never generated, whose reference answers are *the base's own answers*. The base
then scores 100% by construction, an adapter left at identity (gates 0) must change nothing,
and an adapter deliberately made loud must lose accuracy exactly where a clip is present.
"""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy import stats
from typer.testing import CliRunner

from safe_cli.cli.main import app
from safe_cli.config import load_profile
from safe_cli.data.manifest import write_manifest, read_manifest
from safe_cli.data.scoring import normalize_answer
from safe_cli.errors import SafeError
from safe_cli.evaluation import retention
from safe_cli.evaluation.data import manifest_data
from safe_cli.evaluation.runs import load_trained_model, locate
from safe_cli.models.fusion_adapter import is_gate_parameter
from safe_cli.evaluation.stats import compare, is_regression, mcnemar_exact_p, paired_bootstrap_ci
from safe_cli.models.safe_model import SAFEModel
from safe_cli.training.batches import generate_safe_answers
from safe_cli.data.batches import PromptBatcher
from safe_cli.training.stage_a import train_stage_a

from conftest import FAST

REPORT_KEYS = {"schema", "variant", "tolerance", "verdict", "tasks", "bypass", "efficiency", "rule", "rule_text",
               "confidence", "correction", "regressions", "inconclusive"}
TASK_KEYS = {"task", "kind", "with_audio", "n", "base_accuracy", "safe_accuracy", "delta", "ci95", "p_value",
             "regressed", "lower_bound", "bound_method", "p_holm", "verdict_task"}


# --------------------------------------------------------------------------- statistics


def hand_mcnemar(base_only: int, safe_only: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial tail of the discordant pairs, capped at 1."""
    n = base_only + safe_only
    if n == 0:
        return 1.0
    k = min(base_only, safe_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(both: int, base_only: int, safe_only: int, neither: int):
    base = [1] * both + [1] * base_only + [0] * safe_only + [0] * neither
    safe = [1] * both + [0] * base_only + [1] * safe_only + [0] * neither
    return base, safe


@pytest.mark.parametrize("counts", [(40, 6, 0, 4), (30, 9, 3, 8), (10, 2, 2, 6), (5, 0, 0, 5), (12, 1, 7, 0)])
def test_mcnemar_matches_the_exact_binomial_by_hand_and_scipy(counts):
    base, safe = paired(*counts)
    p = mcnemar_exact_p(base, safe)
    assert p == pytest.approx(hand_mcnemar(counts[1], counts[2]), rel=1e-12)
    discordant = counts[1] + counts[2]
    if discordant:
        assert p == pytest.approx(stats.binomtest(counts[2], discordant, 0.5).pvalue, rel=1e-12)


def test_the_paired_bootstrap_interval_agrees_with_a_direct_resampling():
    base, safe = paired(120, 25, 10, 45)  # delta = -7.5 points over 200 pairs
    lo, hi = paired_bootstrap_ci(base, safe, samples=4000, seed=1)
    differences = np.asarray(safe, float) - np.asarray(base, float)
    rng = np.random.default_rng(123)
    means = differences[rng.integers(0, differences.size, size=(20000, differences.size))].mean(1)
    ref_lo, ref_hi = np.percentile(means, [2.5, 97.5])
    assert lo < differences.mean() < hi
    assert lo == pytest.approx(ref_lo, abs=0.01) and hi == pytest.approx(ref_hi, abs=0.01)
    # Paired: the interval is about the discordant pairs, far narrower than treating the two as independent.
    independent = 1.96 * math.sqrt(2 * 0.675 * 0.325 / 200)
    assert (hi - lo) / 2 < 0.8 * independent


def test_identical_answers_give_a_zero_interval_and_p_one():
    base, safe = paired(7, 0, 0, 3)
    result = compare(base, safe)
    assert result.ci95 == (0.0, 0.0) and result.p_value == 1.0 and result.delta == 0.0
    assert paired_bootstrap_ci([True], [False]) == (None, None)


def test_the_regression_rule_needs_both_size_and_significance():
    assert is_regression(-0.05, 0.01, tolerance=0.005, significance=0.05)
    assert not is_regression(-0.004, 1e-9, tolerance=0.005, significance=0.05)  # within tolerance
    assert not is_regression(-0.20, 0.125, tolerance=0.005, significance=0.05)  # could be chance
    assert not is_regression(+0.30, 1e-9, tolerance=0.005, significance=0.05)  # an improvement


# --------------------------------------------------------------------------- runs with known outcomes


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "run"
    # A fixed answer length: the few-step base rarely ends an answer, and base_answered_manifest
    # takes its (cut) answers as the references, which must then be reproduced at the same length.
    train_stage_a(load_profile("demo", FAST + ["evaluation.max_new_tokens=16"]), variant="no_retention", seed=0,
                  run_dir=root)
    return root


def write_foreign_media(folder):
    """Images and sounds unlike the benchmark's: RGB noise of odd sizes, tones at 44.1/22.05 kHz."""
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 30), (64, 64), (17, 50), (33, 33), (80, 20), (28, 28)] * 3):
        path = folder / f"img{i}.png" if i % 3 else folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        images.append(path)
    sounds = []
    for i, (rate, ext) in enumerate([(44100, "wav"), (22050, "flac"), (44100, "flac"), (8000, "wav")] * 2):
        t = np.arange(int(rate * (0.4 + 0.1 * i))) / rate
        wave = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)
        stereo = np.stack([wave, 0.5 * wave], axis=1) if i % 2 else wave
        path = folder / f"tone{i}.{ext}"
        sf.write(path, stereo, rate)
        sounds.append(path)
    broken = folder / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00not really a wave file")
    return images, sounds, broken


def raw_records(folder):
    images, sounds, broken = write_foreign_media(folder)
    records = []
    for i, image in enumerate(images):
        records.append({"id": f"vl{i}", "task": "vl/scene", "image": image.name, "conversations": [
            {"from": "human", "value": "<image>\nWhich digit is shown?"}, {"from": "gpt", "value": "?"}]})
    for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (4, 3), (6, 2)]):
        records.append({"id": f"text{i}", "task": "text/sum", "conversations": [
            {"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": "?"}]})
    for i, sound in enumerate(sounds):
        records.append({"id": f"audio{i}", "task": "audio/tone", "audio": sound.name, "conversations": [
            {"from": "human", "value": "<audio>\nWhich digit is spoken?"}, {"from": "gpt", "value": "?"}]})
    records.append({"id": "broken", "task": "audio/tone", "audio": broken.name, "conversations": [
        {"from": "human", "value": "<audio>\nWhich digit is spoken?"}, {"from": "gpt", "value": "?"}]})
    return records


@pytest.fixture(scope="module")
def base_answered_manifest(run, tmp_path_factory):
    """The foreign manifest with every reference answer replaced by the base's own answer."""
    folder = tmp_path_factory.mktemp("foreign")
    draft = folder / "draft.jsonl"
    draft.write_text("".join(json.dumps(r) + "\n" for r in raw_records(folder)))
    trained = locate(run)
    profile = load_profile(str(trained.profile_path))
    model = load_trained_model(trained, profile, "cpu")
    data = manifest_data(profile, [str(draft)], model.audio_encoder.sample_rate)
    originals = [e for e in data.pool.examples if not e.meta.get("distractor")]
    answers = generate_safe_answers(model, PromptBatcher.for_evaluation(model.base, profile.evaluation), data.pool,
                                    originals, budget=0)
    by_id = {e.id: a for e, a in zip(originals, answers)}
    records = []
    for record in read_manifest(draft):
        answer = by_id.get(record.id, "unused")  # the broken clip's record keeps a placeholder
        if not normalize_answer(answer):
            continue  # an empty answer cannot be a reference
        records.append(type(record)(record.id, record.task, record.question, answer, (answer,), record.image,
                                    record.audio, record.meta))
    manifest = folder / "eval.jsonl"
    write_manifest(records, manifest)
    assert sum(r.task == "vl/scene" for r in records) >= 12, "too few usable base answers to test with"
    return manifest


def variant_of(run, tmp_path, edit):
    """A copy of the run whose final trainable weights went through ``edit``."""
    copy = tmp_path / f"edited-{edit.__name__}"
    shutil.copytree(run, copy)
    path = copy / "stage-a" / "trainable.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)
    return copy


def silence_adapters(weights):
    for name in weights:
        if is_gate_parameter(name):
            weights[name] = torch.zeros_like(weights[name])


def make_adapters_loud(weights):
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if is_gate_parameter(name):
            weights[name] = torch.full_like(tensor, 5.0)
        elif "lora_B" in name or "projector" in name:
            weights[name] = torch.randn(tensor.shape, generator=generator) * 2.0


def invoke(*args):
    return CliRunner().invoke(app, ["eval-retention", *map(str, args)])


def rows(report):
    return {(t["task"], t["with_audio"]): t for t in report["tasks"]}


def test_an_identity_adapter_passes_the_gate(run, base_answered_manifest, tmp_path):
    healthy = variant_of(run, tmp_path, silence_adapters)
    # A dozen identical answers per task cannot show that nothing dropped by more than the tolerance:
    # non-inferiority (the default) calls the distractor tasks inconclusive and says what they need.
    result = invoke(healthy, "--data", base_answered_manifest, "--fail-on-regression", "--out", tmp_path / "ni")
    assert result.exit_code == 1, result.output
    assert "verdict: inconclusive (non-inferiority)" in " ".join(result.output.split())
    assert "would decide it with 80% power" in " ".join(result.output.split())
    report = json.loads((tmp_path / "ni" / "report.json").read_text())
    assert report["verdict"] == "inconclusive" and "vl/scene + distractor" in report["inconclusive"]
    tolerance = report["tolerance"]  # the demo's 2.5 points
    needed = rows(report)[("vl/scene", True)]["examples_needed"]
    assert needed == math.ceil(stats.norm.ppf(0.95) ** 2 * (1 - tolerance) / tolerance) == 106
    # Without a clip SAFE is the base by the bit-exact bypass: non-inferior with a dozen examples.
    assert rows(report)[("vl/scene", False)]["verdict_task"] == "non-inferior"
    # The old rule only asks whether harm was shown: none was.
    result = invoke(healthy, "--data", base_answered_manifest, "--fail-on-regression", "--rule", "significant-harm",
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["schema"] == "safe.retention-report/2"
    assert report["rule"] == "significant-harm" and report["correction"] == "holm"
    assert all(TASK_KEYS <= set(t) for t in report["tasks"])
    assert report["verdict"] == "pass" and report["bypass"]["bit_exact"] is True
    assert report["bypass"]["max_abs_logit_diff"] == 0.0 and report["bypass"]["n"] >= 18
    table = rows(report)
    # Base answers are the references, so the base scores 100%; silent adapters change nothing.
    for key in [("vl/scene", False), ("vl/scene", True), ("text/sum", False), ("text/sum", True)]:
        assert table[key]["base_accuracy"] == 1.0 and table[key]["delta"] == 0.0, key
    # The broken clip is listed, not fatal; every decodable foreign clip was used.
    assert [s["file"].endswith("broken.wav") for s in report["skipped"]] == [True]
    assert table[("audio/tone", True)]["n"] == 8
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.json", "report.md", "deltas.png",
                                                               "accuracy.png", "pareto.png"}
    # Stage A has no policy: SAFE is always-max, and the always-k / oracle points come with it.
    assert report["strategy"] == "always-12" and report["efficiency"]["relative_audio_compute"] == 1.0
    assert {p["strategy"] for p in report["strategies"]} == {"always-0", "always-4", "always-8", "always-12", "oracle"}
    assert (tmp_path / "out" / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**Verdict: pass**" in (tmp_path / "out" / "report.md").read_text()
    assert "*inconclusive* (needs ~106)" in (tmp_path / "ni" / "report.md").read_text()


def test_an_adapter_that_hurts_answers_with_audio_is_a_regression(run, base_answered_manifest, tmp_path):
    loud = variant_of(run, tmp_path, make_adapters_loud)
    result = invoke(loud, "--data", base_answered_manifest, "--fail-on-regression", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "verdict: regression" in result.output and "regressed: vl/scene + distractor" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    table = rows(report)
    assert table[("vl/scene", True)]["regressed"] and table[("vl/scene", True)]["delta"] < -0.5
    assert table[("vl/scene", True)]["p_value"] < 0.05
    # Without a clip SAFE is the base: nothing regressed there, and the bypass stays exact.
    assert not table[("vl/scene", False)]["regressed"] and table[("vl/scene", False)]["delta"] == 0.0
    assert not table[("text/sum", False)]["regressed"]
    assert report["bypass"]["bit_exact"] is True
    # Without --fail-on-regression the same report is written and the command succeeds.
    assert invoke(loud, "--data", base_answered_manifest, "--out", tmp_path / "again").exit_code == 0


def test_a_budget_zero_row_off_by_one_ulp_fails_the_bypass_check(run, base_answered_manifest, tmp_path, monkeypatch):
    healthy = variant_of(run, tmp_path, silence_adapters)
    forward = SAFEModel.forward

    def leaky(self, input_ids, token_budget=None, **kwargs):
        output = forward(self, input_ids, token_budget=token_budget, **kwargs)
        if token_budget is not None and bool((token_budget == 0).any()) and bool((token_budget > 0).any()):
            row = int(torch.nonzero(token_budget == 0)[0])
            value = output.logits[row, -1, 0]
            output.logits[row, -1, 0] = torch.nextafter(value, value + 1)
        return output

    monkeypatch.setattr(SAFEModel, "forward", leaky)
    result = invoke(healthy, "--data", base_answered_manifest, "--fail-on-regression", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "bypass NOT bit-exact" in result.output
    bypass = json.loads((tmp_path / "out" / "report.json").read_text())["bypass"]
    assert bypass["bit_exact"] is False and 0 < bypass["max_abs_logit_diff"] < 1e-5


def test_a_run_that_never_learned_to_hear_fails_the_audio_capability_check(run, base_answered_manifest, tmp_path):
    # Silent adapters: every answer is the base's, so retention passes, and nothing was heard.
    deaf = variant_of(run, tmp_path, silence_adapters)
    result = invoke(deaf, "--data", base_answered_manifest, "--rule", "significant-harm", "--fail-on-regression",
                    "--require-audio-gain", "--out", tmp_path / "deaf")
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "verdict: pass" in output and "audio capability: FAILED" in output
    assert "audio/tone gains +0.0 pt over the base" in output and "no gain shown" in output
    report = json.loads((tmp_path / "deaf" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["audio_capability"]["ok"] is False
    assert "audio capability: FAILED" in (tmp_path / "deaf" / "report.md").read_text()
    # The manifest's references are the base's own answers: SAFE = base = 100% on the tones here.
    assert rows(report)[("audio/tone", True)]["safe_accuracy"] == 1.0
    met = invoke(deaf, "--data", base_answered_manifest, "--min-accuracy", "audio/tone=1.0", "--out", tmp_path / "met")
    assert met.exit_code == 0 and "audio capability: ok (audio/tone >= 100.0%)" in " ".join(met.output.split()), \
        met.output
    # Loud adapters change the answers: the same floor is missed, and the figure is named.
    loud = variant_of(run, tmp_path, make_adapters_loud)
    missed = invoke(loud, "--data", base_answered_manifest, "--min-accuracy", "audio/tone=1.0", "--out",
                    tmp_path / "missed")
    assert missed.exit_code == 1, missed.output
    tone = rows(json.loads((tmp_path / "missed" / "report.json").read_text()))[("audio/tone", True)]["safe_accuracy"]
    assert f"audio/tone at {tone:.1%}, below its floor 100.0%" in " ".join(missed.output.split())


def test_audio_capability_reads_floors_and_the_gain_bound():
    def row(task, kind, base, safe, bound):
        return {"task": task, "kind": kind, "with_audio": True, "base_accuracy": base, "safe_accuracy": safe,
                "delta": safe - base, "lower_bound": bound}

    tasks = [row("vl/digit", "vl", 0.9, 0.9, -0.01), row("audio/digit", "audio", 0.1, 0.97, 0.82),
             row("audio/even", "audio", 0.5, 0.58, -0.02), row("av/sum", "av", 0.0, 0.3, 0.2)]
    hears = retention.audio_capability(tasks, {"audio/digit": 0.95, "av/sum": 0.3}, require_gain=False)
    assert hears["ok"] and hears["failures"] == []
    weak = retention.audio_capability(tasks, {"audio/digit": 0.98}, require_gain=True)
    assert not weak["ok"] and weak["gain_tasks"] == ["audio/digit", "audio/even"]
    assert weak["failures"] == ["audio/digit at 97.0%, below its floor 98.0%",
                                "audio/even gains +8.0 pt over the base, lower bound -2.0 pt: no gain shown"]
    with pytest.raises(ValueError, match="no audio or AV task vl/digit in this evaluation"):
        retention.audio_capability(tasks, {"vl/digit": 0.5}, require_gain=False)
    assert not retention.audio_capability(tasks[:1], {}, require_gain=True)["ok"]  # nothing to show a gain on


def test_a_malformed_accuracy_floor_exits_2_before_any_work(run):
    for bad in ("audio/digit", "audio/digit=90%", "audio/digit=1.5", "=0.9"):
        result = subprocess.run([sys.executable, "-m", "safe_cli", "eval-retention", str(run), "--min-accuracy", bad],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "--min-accuracy: expected TASK=ACC" in result.stderr, (bad, result.stderr)
        assert "Traceback" not in result.stderr


def test_the_profile_test_split_on_a_run_stage_and_checkpoint(run, tmp_path):
    stage = run / "stage-a"
    assert locate(run).weights_path == locate(stage).weights_path == stage / "trainable.safetensors"
    checkpoint = stage / "checkpoints" / "step-000002"
    found = locate(checkpoint)
    assert found.step == 2 and found.weights_path == checkpoint / "trainable.safetensors"
    assert found.variant == "no_retention" and found.stage == "a"
    result = invoke(checkpoint, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["step"] == 2 and report["variant"] == "no_retention" and "examples" not in report
    tasks = {(t["task"], t["with_audio"]) for t in report["tasks"]}
    assert {("vl/digit", False), ("vl/digit", True), ("text/arith", True), ("audio/digit", True),
            ("av/sum", True)} <= tasks
    assert (stage / "eval-retention" / "step-000002" / "report.json").is_file()


def test_bad_inputs_exit_2_with_the_file_named(run, tmp_path):
    cli = [sys.executable, "-m", "safe_cli", "eval-retention"]
    missing = subprocess.run(cli + [str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "RUN_OR_CKPT_DIR" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SafeError, match="is not a SAFE run"):
        locate(empty)
    other_base = tmp_path / "other"
    shutil.copytree(run, other_base)
    (other_base / "stage-a" / "base_fingerprint").write_text("sha256:" + "0" * 64 + "\n")
    result = subprocess.run(cli + [str(other_base)], capture_output=True, text=True)
    assert result.returncode == 2 and "were trained on base sha256:000" in result.stderr
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text('{"id": 1, "task": "vl/x"}\n')
    result = subprocess.run(cli + [str(run), "--data", str(bad_manifest)], capture_output=True, text=True)
    assert result.returncode == 2 and "bad.jsonl:1 (id 1): conversations" in result.stderr


def test_help_states_the_rule_and_has_examples():
    result = CliRunner().invoke(app, ["eval-retention", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "inconclusive otherwise, with the examples that would decide it" in text
    assert "Rule non-inferiority (the default)" in text
    assert "safe eval-retention runs/demo/soft_retention/seed-0" in text
