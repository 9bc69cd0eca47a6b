"""bench/gpu_check.py runs every part at tiny shapes on the CPU, so it cannot rot before a GPU comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"env", "stage_a_demo", "llava7b_layers", "batched_encoding", "nccl"}


def test_every_part_reports_figures_at_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "SAFE_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert set(parts) == PARTS
    for name, figures in parts.items():
        assert "error" not in figures, (name, figures)
        assert "skipped" not in figures, (name, figures)  # --tiny never runs out of time
    assert parts["env"]["device"] == "cpu" and parts["env"]["torch"]
    demo = parts["stage_a_demo"]
    assert demo["steps"] == 4 and demo["examples_per_second"] > 0 and demo["base_fingerprint_unchanged"] is True
    llava = parts["llava7b_layers"]
    assert llava["bypass_forward_bit_exact"] is True and llava["bypass_generate_bit_exact"] is True
    assert llava["audio_rows_max_abs_diff"] > 0  # the adapters were perturbed: audio rows really change
    assert set(llava["forward_ratio_to_base"]) == {"base", "budget_0", "budget_8"}
    assert llava["stage_a_step_seconds"] > 0 and llava["estimate_training_mib"] > 0
    encoding = parts["batched_encoding"]
    assert encoding["batched_failed"] == 0 and encoding["batched_over_per_file"] > 0
    assert encoding["max_abs_feature_diff"] < 1e-3  # the batched features are whisper's own
    nccl = parts["nccl"]
    assert nccl["backend"] == "gloo" and nccl["all_reduce_ok"] is True and nccl["train_rc"] == 0


def test_plan_names_the_parts_the_wheels_and_one_short_command():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--plan"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in PARTS | {"pydantic==", "openai-whisper==", "soundfile==", "jiwer=="}:
        assert name in text
    command = text.strip().splitlines()[-1].strip()
    assert command.startswith("bash bench/gpu_check.sh") and len(command) <= 2000
