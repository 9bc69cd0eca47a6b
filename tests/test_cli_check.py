"""`safe check` end to end: loads real-architecture checkpoints by path and proves the bypass."""

import subprocess
import sys


def safe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "safe_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_check_demo_reports_a_bit_exact_bypass(tmp_path):
    result = safe("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bit-exact, max |Δlogit| = 0 over 4 rows" in result.stdout
    assert "sha256:" in result.stdout


def test_check_hf_blip2_by_path(tiny_checkpoints, tmp_path):
    result = safe("check", "--set", "base.kind=hf-blip2", "--set", f"base.name_or_path={tiny_checkpoints['hf-blip2']}",
                  "--batch-size", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hf-blip2: 4 LLM layers, hidden 64" in result.stdout
    assert "bit-exact" in result.stdout


def test_check_refuses_fusion_layers_outside_a_local_models_depth(tiny_checkpoints, tmp_path):
    result = safe("check", "--set", "base.kind=hf-llava", "--set", f"base.name_or_path={tiny_checkpoints['hf-llava']}",
                  "--set", "fusion.layers=[1,4]", cwd=tmp_path)
    assert result.returncode == 2
    assert "fusion.layers: layers [4] are outside the base LLM's 4 decoder layers (0..3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_help_has_an_example(tmp_path):
    result = safe("check", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "safe check --profile demo" in result.stdout
