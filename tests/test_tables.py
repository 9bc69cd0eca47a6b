"""Report tables never cut a number: every command's table rendered at 80 columns off a terminal."""

import io
import re

import pytest
from rich.console import Console
from rich.text import Text

WIDTH = 80
# A numeric cell: 1,234 / 95.0% / +1.2 / -3.4,+5.6 (an interval) / 1.2e-05 / 120 s / 85.2% ± 1.3 / 2/3.
NUMBER = re.compile(r"[-+]?[\d.,]+(e[-+]\d+)?(%| s)?(( ± |,|/)[-+]?[\d.,]+%?)?")


def _render(table) -> str:
    # Like the CLI's console (soft_wrap) writing to a pipe or a CI log at 80 columns.
    out = io.StringIO()
    Console(width=WIDTH, file=out, force_terminal=False, soft_wrap=True).print(table)
    return out.getvalue()


def _plain(cell) -> str:
    return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain


def assert_numbers_whole(table) -> str:
    """No "…" anywhere, and every numeric cell shows up whole on one line of the rendering."""
    rendered = _render(table)
    assert "…" not in rendered, rendered
    lines = rendered.splitlines()
    numbers = [_plain(c) for column in table.columns for c in column.cells if NUMBER.fullmatch(_plain(c))]
    assert numbers  # the table under test has numbers to cut
    for number in numbers:
        assert any(number in line for line in lines), f"{number!r} is cut:\n{rendered}"
    return rendered


TASKS = ["vl/digit", "vl/even", "vl/gt5", "text/arith", "audio/digit", "audio/even", "av/same", "av/sum"]


def _task_rows():
    rows = []
    for i, task in enumerate(TASKS):
        kind = task.split("/")[0]
        for with_audio in ((False, True) if kind in ("vl", "text") else (True,)):
            rows.append({
                "task": task, "kind": kind, "with_audio": with_audio, "n": 1000 + i, "base_accuracy": 0.9875,
                "safe_accuracy": 0.1234 + i / 100, "delta": -0.1234, "ci95": (-0.1543, 0.0123), "p_value": 1.2e-05,
                "p_holm": 3.4e-05, "lower_bound": -0.1456, "audio_usage_rate": 0.875, "verdict_task": "non-inferior",
            })
    return rows


def _strategies():
    names = ["always-0", "always-4", "always-8", "always-12", "oracle", "policy", "gate"]
    return [{"strategy": name, "kind": "fixed", "accuracy": 0.8765, "audio_accuracy": 0.9123,
             "retention_accuracy": 0.9988, "audio_usage_rate": 0.5, "mean_token_budget": 10.25,
             "relative_audio_compute": 0.875} for name in names]


def table_retention():
    from safe_cli.cli.eval_retention import retention_table

    return retention_table(_task_rows(), "nullspace_retention")


def table_strategies():
    from safe_cli.cli.train import strategy_table

    return strategy_table("stage B, nullspace_retention, seed 12: examples with a clip, test split", _strategies())


def table_stage_a():
    from safe_cli.cli.train import stage_a_table

    return stage_a_table("stage A, nullspace_retention, seed 12: base vs SAFE on the evaluation records",
                         _task_rows())


def table_prepare():
    from safe_cli.cli.prepare import base_accuracy_table

    return base_accuracy_table("frozen base on the fsdd-mnist test split (1000 per task)",
                               {task: 0.1234 for task in TASKS})


def table_validate_data():
    from safe_cli.cli.validate import data_table

    entry = {"records": 123456, "by_kind": {"vl": 34567, "text": 12345, "audio": 45678, "av": 30866},
             "manifests": ["/data/avdigits-export/train.jsonl", "/data/more/train-extra.jsonl"]}
    return data_table("llava15-7b-whisper-small", {split: entry for split in ("train", "validation", "test")})


def table_validate_estimate():
    from safe_cli.cli.validate import estimate_table
    from safe_cli.config import load_profile
    from safe_cli.models.memory import estimate_memory

    return estimate_table(estimate_memory(load_profile("llava15-7b-whisper-small", []), None, 64))


def table_sweep_status():
    from safe_cli.cli.sweep import _status_table

    rows = [{"variant": variant, "seed": seed, "stage": "b", "shown": "failed", "attempt_count": 12, "exit_code": 137,
             "last_seconds": 12345.6, "message": "RuntimeError: CUDA out of memory while training stage b"}
            for variant in ("nullspace_retention", "fisher_retention") for seed in (1, 2)]
    return _status_table(rows)


def table_sweep_report():
    from safe_cli.cli.sweep import _comparison_table
    from safe_cli.sweep.report import METRICS

    metrics = {key: {"mean": 0.8765, "std": 0.0123} for key in METRICS}
    metrics["vl_delta_with_audio"] = {"mean": -0.0123, "std": 0.0045}
    rows = [{"variant": variant, "stage": stage, "done": 3, "runs": 3, "metrics": metrics,
             "verdicts": {"pass": 2, "inconclusive": 1}, "failures": [{"seed": 3}]}
            for variant in ("nullspace_retention", "fisher_retention") for stage in ("a", "b", "c")]
    return _comparison_table({"profile": "llava15-7b-whisper-small", "rows": rows})


def table_check():
    from safe_cli.tables import key_value_table

    return key_value_table("safe check: llava15-7b-whisper-small", [
        ("base parameters (frozen)", "7,063,427,072"), ("trainable: projector", "70,289,920"),
        ("base fingerprint", "9f2c" * 16), ("load time", "123.4 s on cuda"),
        ("audio rows", "max |Δlogit| = 12.34 over 4 rows")])


def table_encode_audio():
    from safe_cli.tables import key_value_table

    return key_value_table("safe encode-audio: whisper features, trimmed to the clip", [
        ("clips (input files)", "123456"), ("clips/s", "141.5"),
        ("cache", "/scratch/a/very/long/path/to/the/feature/cache/of/this/project/features")], justify="right")


@pytest.mark.parametrize("build", [table_retention, table_strategies, table_stage_a, table_prepare,
                                   table_validate_data, table_validate_estimate, table_sweep_status,
                                   table_sweep_report, table_check, table_encode_audio],
                         ids=lambda build: build.__name__[len("table_"):])
def test_no_table_cuts_a_number_at_80_columns(build):
    assert_numbers_whole(build())


def test_off_a_terminal_the_cli_renders_at_120_columns_unless_columns_says(monkeypatch):
    from safe_cli.cli.common import console, err_console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert not console.is_terminal  # pytest captures the output
    assert console.width == err_console.width == 120
    monkeypatch.setenv("COLUMNS", "100")
    assert console.width == 100
