"""A second dataset unlike AV-digits trains through all three stages and eval-retention.

Spoken digit sequences synthesised with espeak-ng (tests/spoken_sequences.py): multi-word
answers ("4 7 2") scored by word error rate through jiwer, graded scores compared with the
Wilcoxon signed-rank test; retention records are plain VL/text questions without audio, which
Stage A, Stage B and the evaluation each give a distractor clip. The tiny models here are the
FAST ones (a few pretraining steps), so the test checks the wiring end to end, not the scores;
the scores of a full run are in CHANGELOG.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safe_cli.cli.main import app

sys.path.insert(0, str(Path(__file__).parent))
from conftest import FAST  # noqa: E402
from spoken_sequences import write_dataset  # noqa: E402
from safe_cli.data.espeak import espeak_path as espeak  # noqa: E402

REQUIRED = bool(os.environ.get("CI") or os.environ.get("SAFE_REQUIRE_ESPEAK"))
needs_espeak = pytest.mark.skipif(espeak() is None and not REQUIRED,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")

STAGES = FAST + [
    "evaluation.metrics={audio/sequence: wer}", "evaluation.max_new_tokens=6",
    "training.stage_b.steps=3", "training.stage_b.batch_size=8", "training.stage_b.checkpoint_every=3",
    "training.stage_b.log_every=1", "training.stage_b.state_samples=8",
    "training.stage_c.steps=5", "training.stage_c.train_examples=16", "training.stage_c.validation_examples=16",
    "data.validation_fraction=0.3",
]


def sets(items):
    return sum((["--set", item] for item in items), [])


@needs_espeak
def test_spoken_sequences_train_through_every_stage(cache, tmp_path):
    assert espeak() is not None, "espeak-ng is required here (CI / SAFE_REQUIRE_ESPEAK): apt-get install espeak-ng"
    runner = CliRunner()
    export = tmp_path / "export"
    result = runner.invoke(app, ["data", "export", "avdigits", "--out", str(export), *sets(FAST)])
    assert result.exit_code == 0, result.output
    paths = write_dataset(tmp_path / "seq", export, train=24, test=8, retention=3)
    data = ["data.source=manifest", f"data.train_manifests=[{paths['train']}]",
            f"data.eval_manifests=[{paths['test']}]"]
    run = tmp_path / "run"

    result = runner.invoke(app, ["validate", "demo", "--data", "--json", *sets(STAGES + data)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert counts["train"]["by_kind"]["audio"] == 24 and counts["test"]["by_kind"]["audio"] == 8
    assert counts["validation"]["records"] > 0  # held out of the training records, never the evaluation's

    for stage in ("a", "b"):
        result = runner.invoke(app, ["train", "--stage", stage, "--variant", "soft_retention", "--run-dir", str(run),
                                     "--json", *sets(STAGES + data)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["distill-policy", str(run), "--json", *sets(STAGES + data)])
    assert result.exit_code == 0, result.output

    summary = json.loads((run / "stage-a" / "summary.json").read_text())
    tasks = {(t["task"], t["with_audio"]): t for t in summary["tasks"]}
    assert ("audio/sequence", True) in tasks
    # Each plain VL/text record is asked as written and with a distractor clip.
    assert ("vl/digit", False) in tasks and ("vl/digit", True) in tasks
    metrics = [json.loads(line) for line in (run / "stage-a" / "metrics.jsonl").open()]
    assert all("kl" in m for m in metrics), "retention rows (plain VL records + drawn clips) never ran"

    out = tmp_path / "report"
    result = runner.invoke(app, ["eval-retention", str(run), "--out", str(out), "--json", *sets(STAGES + data)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {(t["task"], t["with_audio"]): t for t in report["tasks"]}
    sequence = rows[("audio/sequence", True)]
    assert 0.0 <= sequence["safe_accuracy"] <= 1.0
    graded = [s for e in report["examples"] if e["task"] == "audio/sequence" for s in e["safe_correct"]]
    if any(0 < s < 1 for s in graded):  # WER gives partial credit: then the graded test is used
        assert sequence["test"] == "wilcoxon-signed-rank"
    assert rows[("vl/digit", True)]["test"] == "mcnemar-exact"
    assert report["bypass"]["bit_exact"] is True
