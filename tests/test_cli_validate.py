"""`safe validate` end to end: real subprocesses, exit codes, key paths on stderr, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import safe_cli

PROFILES_DIR = Path(safe_cli.__file__).parent / "profiles"
BUILTIN_NAMES = sorted(p.stem for p in PROFILES_DIR.rglob("*.yaml"))

HEAD = "extends: demo\nname: broken\n"


def safe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SAFE_DATA_ROOT", "FORCE_COLOR")}
    env.update(NO_COLOR="1", COLUMNS="200", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "safe_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, code: int = 2) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_validate_builtin_profile(name, tmp_path):
    result = safe("validate", name, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"ok: profile {name}" in result.stdout


def test_validate_prints_the_resolved_profile_with_set(tmp_path):
    result = safe("validate", "demo", "--set", "training.stage_a.steps=50", "--set", "fusion.layers=[0,2]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "steps: 50" in result.stdout
    assert "layers: [0, 2]" in result.stdout
    assert "# Optimizer steps." in result.stdout
    assert "ok: profile demo" in result.stdout


# --------------------------------------------------------------------------- broken profiles
#
# (id, profile text or None for "no file", command-line target, fragments that must all be on stderr)
# A key path is asserted as ": KEY: " so that a parent or a longer sibling path cannot match.

BROKEN = [
    ("yaml-syntax", HEAD + "base:\n  kind: tiny-llava\n   dtype: float32\n", ["invalid YAML", "line 5"]),
    ("yaml-unclosed-list", HEAD + "fusion:\n  layers: [1, 3\n", ["broken.yaml: invalid YAML", "line "]),
    ("top-level-list", "- name: broken\n- extends: demo\n", ["expected a mapping at the top, got list"]),
    ("string-for-int", HEAD + "training:\n  stage_a:\n    steps: lots\n", [": training.stage_a.steps: ", "'lots'"]),
    ("list-for-section", HEAD + "fusion: [1, 3]\n", ["broken.yaml: fusion: "]),
    ("bad-dtype", HEAD + "base:\n  dtype: float64\n", [": base.dtype: ", "float64"]),
    ("unknown-key-depth1", HEAD + "bogus: 1\n", ["broken.yaml: bogus: unknown key"]),
    ("unknown-key-depth2", HEAD + "fusion:\n  lyers: [1, 3]\n", [": fusion.lyers: unknown key"]),
    ("unknown-key-depth3", HEAD + "training:\n  stage_a:\n    stepz: 5\n", [": training.stage_a.stepz: unknown key"]),
    ("unknown-key-depth3-tiny", HEAD + "base:\n  tiny:\n    hiden_size: 64\n", [": base.tiny.hiden_size: unknown key"]),
    (
        "unknown-key-depth4",
        HEAD + "retention:\n  variants:\n    soft_retention:\n      fisher_wieght: 0.1\n",
        [": retention.variants.soft_retention.fisher_wieght: unknown key"],
    ),
    ("negative-steps", HEAD + "training:\n  stage_a:\n    steps: -5\n", [": training.stage_a.steps: ", "-5"]),
    ("lora-dropout-1.5", HEAD + "fusion:\n  lora_dropout: 1.5\n", [": fusion.lora_dropout: ", "1.5"]),
    ("tolerance-2", HEAD + "evaluation:\n  tolerance: 2\n", [": evaluation.tolerance: "]),
    ("budgets-without-0", HEAD + "policy:\n  token_budgets: [4, 8]\n", [": policy.token_budgets: ", "must contain 0"]),
    (
        "budget-over-num-tokens",
        HEAD + "policy:\n  token_budgets: [0, 4, 16]\n",
        [": policy.token_budgets: ", "exceeds projector.num_tokens 12"],
    ),
    ("fusion-layer-outside-depth", HEAD + "fusion:\n  layers: [1, 9]\n", [": fusion.layers: ", "[9]", "4 decoder layers"]),
    ("unknown-base-kind", HEAD + "base:\n  kind: gpt-vision\n", [": base.kind: ", "gpt-vision"]),
    ("hf-llava-without-path", HEAD + "base:\n  kind: hf-llava\n", ["broken.yaml: base: ", "name_or_path is required"]),
    (
        "missing-local-model-dir",
        HEAD + "base:\n  kind: hf-llava\n  name_or_path: ./no/such/model\n",
        [": base.name_or_path: ", "./no/such/model"],
    ),
    (
        "missing-whisper-checkpoint",
        HEAD + "audio_encoder:\n  kind: whisper\n  whisper:\n    name_or_path: ./no/such/whisper.pt\n",
        [": audio_encoder.whisper.name_or_path: ", "whisper.pt"],
    ),
    (
        "unknown-default-variant",
        HEAD + "retention:\n  default_variant: hard_retention\n",
        [": retention.default_variant: ", "hard_retention"],
    ),
    (
        "unknown-sweep-variant",
        HEAD + "sweep:\n  variants: [soft_retention, nope_retention]\n",
        [": sweep.variants.1: ", "nope_retention"],
    ),
    (
        "unknown-variant-extends",
        HEAD + "retention:\n  variants:\n    mine:\n      extends: nope_retention\n",
        [": retention.variants.mine.extends: ", "nope_retention"],
    ),
    (
        "missing-manifest",
        HEAD + "data:\n  source: manifest\n  train_manifests: [missing.jsonl]\n",
        [": data.train_manifests.0: ", "manifest not found: missing.jsonl"],
    ),
    ("bad-slurm-time", HEAD + "sweep:\n  slurm:\n    time: 4 hours\n", [": sweep.slurm.time: ", "HH:MM:SS"]),
    ("extends-missing-profile", "extends: no-such-profile\nname: broken\n", ["broken.yaml: extends: "]),
    ("missing-profile-file", None, ["nope.yaml: file not found"]),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_profile_exits_2_with_its_key_path(text, expected, tmp_path):
    if text is None:
        target = "nope.yaml"
    else:
        target = "broken.yaml"
        (tmp_path / target).write_text(text)
    result = safe("validate", target, cwd=tmp_path)
    assert_clean_failure(result)
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} not in stderr:\n{result.stderr}"
    # Each broken profile holds exactly the one intended problem.
    assert "profile has 1 problem(s)" in result.stderr, result.stderr
    assert "ok: profile" not in result.stdout


def test_extends_cycle_between_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    result = safe("validate", "a.yaml", cwd=tmp_path)
    assert_clean_failure(result)
    assert ": extends: cycle" in result.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    (tmp_path / "many.yaml").write_text(
        HEAD + "bogus: 1\nfusion:\n  lyers: [1]\ntraining:\n  stage_a:\n    steps: -1\nevaluation:\n  tolerance: 2\n"
    )
    result = safe("validate", "many.yaml", cwd=tmp_path)
    assert_clean_failure(result)
    assert "profile has 4 problem(s)" in result.stderr
    for key in ["bogus", "fusion.lyers", "training.stage_a.steps", "evaluation.tolerance"]:
        assert f"many.yaml: {key}: " in result.stderr


# --------------------------------------------------------------------------- options


def test_set_without_equals_is_a_clean_error(tmp_path):
    result = safe("validate", "demo", "--set", "training.stage_a.steps", cwd=tmp_path)
    assert_clean_failure(result)
    assert "--set: training.stage_a.steps: " in result.stderr
    assert "key.path=value" in result.stderr


def test_bad_set_value_is_blamed_on_set(tmp_path):
    result = safe("validate", "demo", "--set", "fusion.lora_dropout=1.5", cwd=tmp_path)
    assert_clean_failure(result)
    assert "--set (over " in result.stderr
    assert ": fusion.lora_dropout: " in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "broken.yaml").write_text(HEAD + "bogus: 1\n")
    result = safe("--debug", "validate", "broken.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ProfileError" in result.stderr
    assert "bogus" in result.stderr


def test_validate_help_has_an_example(tmp_path):
    result = safe("validate", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert "--set" in result.stdout


def test_validate_json(tmp_path):
    result = safe("validate", "demo", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["name"] == "demo"
    assert data["base"]["kind"] == "tiny-llava"
    assert "extends" in data and data["extends"] is None
