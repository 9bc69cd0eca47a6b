"""The comparison table: per variant and stage, mean and std over seeds, failures marked.

Metrics from each finished stage's summary.json, n-weighted over its tasks:
- audio accuracy: SAFE's accuracy on the questions that need the clip (audio and AV families);
- VL delta without audio: SAFE - base on VL and text questions asked without a clip (the bypass
  makes it exactly 0; anything else is a bug);
- VL delta with audio: the same questions with a distractor clip attached (retention's target);
- relative compute: efficiency.relative_audio_compute, written by stages b and c;
- verdicts: how many seeds' stage evaluations pass, are inconclusive or regress under the run's
  ``evaluation.rule`` (``evaluation.retention.verdict_from_examples`` on eval_examples.json).

Also per row: SAFE's accuracy on each audio and AV task and the training examples/s, mean and
std over seeds; and "comparisons": each variant minus the baseline variant (no_retention when the
grid has it) on every metric and task, paired by seed, with a 95% Student-t interval over the
seeds both finished (wide with 3 seeds: t = 4.30). That interval is for the training seed's
spread only; each evaluation's own sampling error is in its run's eval-retention report.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write, atomic_write_text, write_json
from ..training import run_dir as layout
from . import state
from .grid import Run, stage_path
from .manifest import Manifest
from .status import run_states

SCHEMA = "safe.sweep-report/1"
METRICS = {
    "audio_accuracy": "audio acc",
    "vl_delta_without_audio": "VL Δ no audio",
    "vl_delta_with_audio": "VL Δ with audio",
    "relative_compute": "rel. compute",
}
# Interrupted runs are not failures: a rerun (or SLURM's requeue) resumes them; "done k/n" shows them.
FAILED_STATES = (state.FAILED, state.BLOCKED)


def _weighted(tasks: list[dict], key: str, keep) -> Optional[float]:
    chosen = [t for t in tasks if keep(t) and t.get(key) is not None]
    n = sum(t.get("n", 1) for t in chosen)
    return sum(t[key] * t.get("n", 1) for t in chosen) / n if n else None


def run_metrics(summary: dict[str, Any]) -> dict[str, Optional[float]]:
    tasks = summary.get("tasks") or []
    base_tasks = ("vl", "text")
    efficiency = summary.get("efficiency") or {}
    return {
        "audio_accuracy": _weighted(tasks, "safe_accuracy", lambda t: t.get("kind") in ("audio", "av")),
        "vl_delta_without_audio": _weighted(tasks, "delta", lambda t: t.get("kind") in base_tasks and not t.get("with_audio")),
        "vl_delta_with_audio": _weighted(tasks, "delta", lambda t: t.get("kind") in base_tasks and t.get("with_audio")),
        "relative_compute": efficiency.get("relative_audio_compute"),
    }


def task_accuracies(summary: dict[str, Any]) -> dict[str, float]:
    """SAFE's accuracy on each task that needs the clip (audio and AV families)."""
    return {t["task"]: t["safe_accuracy"] for t in summary.get("tasks") or []
            if t.get("kind") in ("audio", "av") and t.get("safe_accuracy") is not None}


def paired_difference(ours: dict[int, float], theirs: dict[int, float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ours - theirs over the seeds both have, with a Student-t interval (None below 2 seeds)."""
    from scipy import stats

    seeds = sorted(set(ours) & set(theirs))
    differences = [ours[s] - theirs[s] for s in seeds
                   if ours[s] is not None and theirs[s] is not None and math.isfinite(ours[s] - theirs[s])]
    if not differences:
        return {"mean": None, "ci95": None, "n": 0}
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * statistics.stdev(differences) \
        / math.sqrt(len(differences))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(differences)}


def baseline_variant(variants: list[str]) -> Optional[str]:
    return "no_retention" if "no_retention" in variants and len(variants) > 1 else None


def comparisons(runs: list[dict[str, Any]], variants: list[str], stages: list[str]) -> list[dict[str, Any]]:
    """Each variant minus the baseline, per stage, on every metric and audio/AV task, paired by seed."""
    baseline = baseline_variant(variants)
    if baseline is None:
        return []

    def by_seed(variant: str, stage: str, value) -> dict[int, float]:
        return {r["seed"]: value(r) for r in runs
                if r["variant"] == variant and r["stage"] == stage and r["metrics"]}

    out = []
    for stage in stages:
        for variant in (v for v in variants if v != baseline):
            differences = {key: paired_difference(by_seed(variant, stage, lambda r: r["metrics"][key]),
                                                  by_seed(baseline, stage, lambda r: r["metrics"][key]))
                           for key in METRICS}
            tasks = sorted({t for r in runs if r["stage"] == stage and r["tasks"] for t in r["tasks"]})
            differences.update({f"task:{task}": paired_difference(
                by_seed(variant, stage, lambda r: (r["tasks"] or {}).get(task)),
                by_seed(baseline, stage, lambda r: (r["tasks"] or {}).get(task))) for task in tasks})
            out.append({"variant": variant, "baseline": baseline, "stage": stage, "differences": differences})
    return out


def stage_verdict(stage_dir: Path) -> Optional[str]:
    """The stage's verdict under its own profile's evaluation settings; None without its examples."""
    from ..config import load_profile
    from ..evaluation.retention import verdict_from_examples

    examples_file = stage_dir / layout.EVAL_EXAMPLES_FILE
    profile_file = stage_dir / layout.PROFILE_FILE
    if not examples_file.is_file() or not profile_file.is_file():
        return None
    try:
        examples = json.loads(examples_file.read_text())
        evaluation = load_profile(str(profile_file)).evaluation
    except (OSError, ValueError):
        return None
    return verdict_from_examples(examples, evaluation)


def verdict_text(verdicts: dict[str, int]) -> str:
    """"pass 2, inconclusive 1": the stage's verdicts over the seeds that finished."""
    order = ("pass", "inconclusive", "regression")
    return ", ".join(f"{name} {verdicts[name]}" for name in order if verdicts.get(name)) or "–"


def _aggregate(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def build(out: Path, manifest: Manifest) -> dict[str, Any]:
    out = Path(out)
    runs = []
    for row in run_states(out, manifest):
        run: Run = row["run"]
        summary_file = stage_path(out, run) / layout.SUMMARY_FILE
        summary = None
        if summary_file.is_file():
            try:
                summary = json.loads(summary_file.read_text())
            except (OSError, json.JSONDecodeError):
                summary = None
        if row.get("foreign"):
            summary = None  # another experiment's numbers: not in this table
        shown = row["shown"] if summary is None else state.DONE
        runs.append({
            "variant": run.variant, "seed": run.seed, "stage": run.stage, "state": shown,
            "verdict": stage_verdict(stage_path(out, run)) if summary else None,
            "exit_code": row.get("exit_code"), "message": row.get("message") if summary is None else None,
            "attempts": row["attempt_count"], "seconds": row["last_seconds"], "log": row.get("log"),
            "metrics": run_metrics(summary) if summary else None,
            "tasks": task_accuracies(summary) if summary else None,
            "examples_per_second": (summary or {}).get("examples_per_second"),
        })
    rows = []
    for stage in manifest.stages:
        for variant in manifest.variants:
            mine = [r for r in runs if r["variant"] == variant and r["stage"] == stage]
            done = [r for r in mine if r["metrics"]]
            failures = [{"seed": r["seed"], "state": r["state"], "exit_code": r["exit_code"], "message": r["message"]}
                        for r in mine if r["state"].split(" ")[0] in FAILED_STATES or r["state"].startswith("lost")]
            verdicts = dict(Counter(r["verdict"] for r in done if r["verdict"]))
            rows.append({
                "variant": variant, "stage": stage, "runs": len(mine), "done": len(done), "verdicts": verdicts,
                "seeds_done": [r["seed"] for r in done], "failures": failures,
                "metrics": {key: _aggregate([r["metrics"][key] for r in done]) for key in METRICS},
                "tasks": {task: _aggregate([r["tasks"].get(task) for r in done])
                          for task in sorted({t for r in done for t in r["tasks"]})},
                "examples_per_second": _aggregate([r["examples_per_second"] for r in done]),
            })
    return {"schema": SCHEMA, "profile": manifest.profile, "overrides": manifest.overrides,
            "grid": {"variants": manifest.variants, "seeds": manifest.seeds, "stages": manifest.stages},
            "rows": rows, "comparisons": comparisons(runs, manifest.variants, manifest.stages), "runs": runs}


# --------------------------------------------------------------------------- rendering


def fmt(metric: str, aggregate: dict[str, Any], sep: str = " ± ") -> str:
    """Accuracy in %, deltas in signed points, compute as a ratio; ``sep`` before the std."""
    mean, std = aggregate["mean"], aggregate["std"]
    if mean is None:
        return "–"
    if metric == "relative_compute":
        return f"{mean:.2f}" + (f"{sep}{std:.2f}" if std is not None else "")
    delta = metric.startswith("vl_delta")
    text = f"{100 * mean:+.1f}" if delta else f"{100 * mean:.1f}%"
    return text + (f"{sep}{100 * std:.1f}" if std is not None else "")


def difference_text(metric: str, difference: Optional[dict[str, Any]]) -> str:
    """"+12.5 [+3.1, +21.9]": a paired difference in points (a ratio for compute), with its interval."""
    if not difference or difference["mean"] is None:
        return "–"
    scale, form = (1, "{:+.2f}") if metric == "relative_compute" else (100, "{:+.1f}")
    text = form.format(scale * difference["mean"])
    if difference["ci95"]:
        low, high = difference["ci95"]
        text += f" [{form.format(scale * low)}, {form.format(scale * high)}]"
    return text


def failure_text(row: dict[str, Any]) -> str:
    if not row["failures"]:
        return "0"
    return f"{len(row['failures'])} (seed {', '.join(str(f['seed']) for f in row['failures'])})"


def to_markdown(report: dict[str, Any]) -> str:
    grid = report["grid"]
    lines = [f"# Sweep report: {report['profile']}", "",
             f"Grid: {len(grid['variants'])} variants x seeds {', '.join(map(str, grid['seeds']))}, "
             f"stages {', '.join(grid['stages'])}"
             + (f"; overrides: `{' '.join(report['overrides'])}`" if report["overrides"] else "") + ".",
             "Mean ± std over the seeds that finished (accuracy and deltas in points; VL covers VL and text "
             "questions).", "",
             "| variant | stage | done | " + " | ".join(METRICS.values()) + " | verdicts | failures |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for row in report["rows"]:
        cells = [fmt(key, row["metrics"][key]) for key in METRICS]
        lines.append(f"| {row['variant']} | {row['stage']} | {row['done']}/{row['runs']} | " + " | ".join(cells)
                     + f" | {verdict_text(row.get('verdicts') or {})}"
                     + f" | {'**' + failure_text(row) + '**' if row['failures'] else '0'} |")
    tasks = sorted({t for row in report["rows"] for t in row.get("tasks") or {}})
    if tasks:
        lines += ["", "## Audio and AV tasks", "",
                  "SAFE's accuracy per task, and training speed; mean ± std over seeds.", "",
                  "| variant | stage | " + " | ".join(tasks) + " | examples/s |",
                  "|---|---|" + "---|" * (len(tasks) + 1)]
        for row in report["rows"]:
            speed = row.get("examples_per_second") or {"mean": None}
            lines.append(f"| {row['variant']} | {row['stage']} | "
                         + " | ".join(fmt("accuracy", row["tasks"].get(t, {"mean": None, "std": None})) for t in tasks)
                         + " | " + (f"{speed['mean']:.0f}" + (f" ± {speed['std']:.0f}" if speed.get("std") else "")
                                    if speed["mean"] is not None else "–") + " |")
    compared = report.get("comparisons") or []
    if compared:
        keys = list(METRICS) + [f"task:{t}" for t in tasks]
        lines += ["", f"## Against {compared[0]['baseline']}", "",
                  "Variant minus baseline in points, paired by seed: mean [95% t-interval over seeds].", "",
                  "| variant | stage | " + " | ".join(METRICS.get(k, k[5:]) for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for row in compared:
            lines.append(f"| {row['variant']} | {row['stage']} | "
                         + " | ".join(difference_text(k, row["differences"].get(k)) for k in keys) + " |")
    failed = [r for r in report["runs"] if r["state"] != state.DONE]
    if failed:
        lines += ["", "## Runs not finished", ""]
        lines += [f"- {r['variant']} seed {r['seed']} stage {r['stage']}: {r['state']}"
                  + (f" (exit {r['exit_code']})" if r["exit_code"] not in (None, 0) else "")
                  + (f": `{r['message']}`" if r["message"] else "") for r in failed]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [key for key in METRICS if any(r["metrics"][key]["mean"] is not None for r in report["rows"])]
    metrics = metrics or ["audio_accuracy"]
    variants = report["grid"]["variants"]
    stages = report["grid"]["stages"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.35 * len(variants) + 2.4),
                                squeeze=False)
    width = 0.8 / len(stages)
    for axis, metric in zip(axes[0], metrics):
        scale = 1 if metric == "relative_compute" else 100
        for k, stage in enumerate(stages):
            rows = {r["variant"]: r for r in report["rows"] if r["stage"] == stage}
            means = [rows[v]["metrics"][metric]["mean"] for v in variants]
            stds = [rows[v]["metrics"][metric]["std"] or 0 for v in variants]
            y = np.arange(len(variants)) + (k - (len(stages) - 1) / 2) * width
            axis.barh(y, [scale * (m if m is not None else np.nan) for m in means], height=width,
                      xerr=[scale * s for s in stds], capsize=2, label=f"stage {stage}")
        if metric.startswith("vl_delta"):
            axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(METRICS[metric] + ("" if metric == "relative_compute" else " (points)" if "delta" in metric else " (%)"))
        failed = {v: any(r["failures"] for r in report["rows"] if r["variant"] == v) for v in variants}
        first = axis is axes[0][0]
        axis.set_yticks(range(len(variants)), [v + (" ✗" if failed[v] else "") if first else "" for v in variants])
        for label, variant in zip(axis.get_yticklabels(), variants):
            if failed[variant]:
                label.set_color("#c0392b")
        axis.invert_yaxis()
    figure.suptitle(f"sweep {report['profile']}: mean ± std over seeds (red ✗: a run failed)", fontsize=10)
    figure.tight_layout()
    if len(stages) > 1:
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="upper left", ncol=len(stages), fontsize=8, frameon=False)
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(figure)


def write(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    write_json(paths["json"], report)
    atomic_write_text(paths["md"], to_markdown(report))
    plot(report, paths["png"])
    return paths
