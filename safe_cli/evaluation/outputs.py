"""The retention report on disk: report.json, report.md and PNG plots.

Plots (matplotlib, Agg backend: no display needed on a cluster node):

    deltas.png    per task, SAFE minus base accuracy in points with its 95% paired bootstrap
                  interval and its one-sided lower bound (|); the tolerance band shaded;
                  regressed tasks in red, inconclusive ones in amber
    accuracy.png  base and SAFE accuracy side by side per task
    pareto.png    accuracy on the examples with a clip against relative audio compute, for
                  always-k, the oracle, the learned policy and the gate (its threshold curve)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import atomic_write, atomic_write_text, write_json
from .retention import capability_line, task_label

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
DELTAS_PNG = "deltas.png"
ACCURACY_PNG = "accuracy.png"
PARETO_PNG = "pareto.png"

KIND_COLOURS = {"vl": "#1f77b4", "text": "#2ca02c", "audio": "#9467bd", "av": "#8c564b"}  # amber is for inconclusive
REGRESSED = "#d62728"
INCONCLUSIVE = "#e6a700"
VERDICT_COLOURS = {"regressed": REGRESSED, "inconclusive": INCONCLUSIVE}


def _colour(row: dict[str, Any]) -> str:
    return VERDICT_COLOURS.get(row.get("verdict_task"), KIND_COLOURS.get(row["kind"], "grey"))


def _points(value) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def _ci(row: dict[str, Any]) -> str:
    lo, hi = row["ci95"]
    return "–" if lo is None else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _usage(row: dict[str, Any]) -> str:
    if not row["with_audio"] or "audio_usage_rate" not in row:
        return "–"
    return f"{100 * row['audio_usage_rate']:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    bypass = report["bypass"]
    lines = [
        f"# Retention report: {report.get('variant') or 'SAFE'} ({report.get('profile', '')})",
        "",
        f"**Verdict: {report['verdict']}**"
        + (f" (regressed: {', '.join(report['regressions'])})" if report["regressions"] else "")
        + (f" (inconclusive: {', '.join(report['inconclusive'])})" if report.get("inconclusive") else ""),
        "",
        f"- Weights: `{report.get('weights', '')}`" + (f" (step {report['step']})" if report.get("step") else ""),
        f"- Data: {report.get('data', '')}",
        f"- SAFE's budgets: {STRATEGY_TEXT.get(report['strategy'], report['strategy'])}; base answers never hear audio",
        f"- Rule: **{report['rule']}**: {report['rule_text']} (tolerance {100 * report['tolerance']:.1f} points, "
        f"one-sided confidence {100 * report['confidence']:.0f}%, significance {report['significance']}, "
        f"{report['correction']} correction across the report's tasks)",
        f"- Bypass: {'bit-exact' if bypass['bit_exact'] else '**NOT bit-exact**'}, max |Δ logit| "
        f"{bypass['max_abs_logit_diff']:.3g} over {bypass['n']} budget-0 rows ({bypass['source']})",
    ]
    if report.get("audio_capability"):
        lines.append(f"- {capability_line(report['audio_capability'])}")
    lines += [
        "",
        "| task | n | base | SAFE | Δ (points) | 95% CI | p (Holm) | lower bound | audio used | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for row in report["tasks"]:
        verdict = row["verdict_task"]
        if verdict == "regressed":
            verdict = "**regressed**"
        elif verdict == "inconclusive" and row.get("examples_needed"):
            verdict = f"*inconclusive* (needs ~{row['examples_needed']})"
        lines.append(
            f"| {task_label(row)} | {row['n']} | {100 * row['base_accuracy']:.1f}% | {100 * row['safe_accuracy']:.1f}% "
            f"| {_points(row['delta'])} | {_ci(row)} | {row['p_value']:.3g} ({row['p_holm']:.3g}) "
            f"| {_points(row['lower_bound'])} ({row['bound_method']}) | {_usage(row)} | {verdict} |"
        )
    efficiency = report["efficiency"]
    lines += [
        "",
        f"Efficiency ({efficiency['policy']}): audio encoder on {100 * efficiency['audio_usage_rate']:.0f}% of "
        f"examples with a clip, mean budget {efficiency['mean_token_budget']:.1f} tokens, relative audio compute "
        f"{efficiency['relative_audio_compute']:.2f} (FLOPs of encoder + fusion over always-max)"
        + (f"; end to end (the base's image, prefill and decoding, the decision and audio) "
           f"{efficiency['relative_end_to_end_compute']:.3f} of always-max and "
           f"{efficiency['end_to_end_vs_base']:.3f} of the base alone." if "end_to_end_vs_base" in efficiency else "."),
        "",
        "| strategy | accuracy (with a clip) | audio questions | distractor questions | audio usage | mean k "
        "| relative audio compute | end to end / always-max | end to end / base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in report.get("strategies", []):
        lines.append(
            f"| {point['strategy']} | {100 * point['accuracy']:.1f}% | {100 * point['audio_accuracy']:.1f}% "
            f"| {100 * point['retention_accuracy']:.1f}% | {100 * point['audio_usage_rate']:.1f}% "
            f"| {point['mean_token_budget']:.1f} | {point['relative_audio_compute']:.3f} "
            f"| {_ratio(point, 'relative_end_to_end_compute')} | {_ratio(point, 'end_to_end_vs_base')} |"
        )
    if report.get("skipped"):
        lines += ["", f"Skipped {len(report['skipped'])} unreadable file(s):", ""]
        lines += [f"- `{entry['file']}`: {entry['reason']}" for entry in report["skipped"][:50]]
    return "\n".join(lines) + "\n"


def _ratio(point: dict[str, Any], key: str) -> str:
    return f"{point[key]:.3f}" if key in point else "-"


STRATEGY_TEXT = {
    "gate": "the distilled gate's (Stage C) at its calibrated threshold",
    "policy": "the Stage B policy's most likely budget",
}


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(figure)


def plot_deltas(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["tasks"]
    labels = [task_label(r) for r in rows]
    figure, axes = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.4))
    tolerance = 100 * report["tolerance"]
    axes.axvspan(-tolerance, tolerance, color="#dddddd", zorder=0, label=f"±tolerance ({tolerance:.1f} pt)")
    axes.axvline(0, color="black", linewidth=0.8)
    for y, row in enumerate(rows):
        colour = _colour(row)
        delta = 100 * row["delta"]
        lo, hi = row["ci95"]
        error = None if lo is None else [[delta - 100 * lo], [100 * hi - delta]]
        axes.errorbar(delta, y, xerr=error, fmt="o", color=colour, capsize=3)
        axes.plot(100 * row["lower_bound"], y, marker="|", markersize=12, color=colour)
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()
    axes.set_xlabel("SAFE − base accuracy (points), 95% paired bootstrap interval; |: one-sided lower bound")
    axes.set_title(f"{report.get('variant') or 'SAFE'}: verdict {report['verdict']}")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=k) for k, c in KIND_COLOURS.items()]
    handles.append(plt.Line2D([], [], marker="o", linestyle="", color=REGRESSED, label="regressed"))
    handles.append(plt.Line2D([], [], marker="o", linestyle="", color=INCONCLUSIVE, label="inconclusive"))
    axes.legend(handles=handles, loc="lower right", fontsize=8)
    _save_figure(figure, path)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["tasks"]
    y = np.arange(len(rows))
    figure, axes = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.4))
    axes.barh(y - 0.2, [100 * r["base_accuracy"] for r in rows], height=0.4, color="#999999", label="base")
    axes.barh(y + 0.2, [100 * r["safe_accuracy"] for r in rows], height=0.4,
              color=[_colour(r) for r in rows], label="SAFE (colour: task kind; red: regressed; amber: inconclusive)")
    axes.set_yticks(y, [task_label(r) for r in rows])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy (%)")
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("base (grey) vs SAFE per task")
    _save_figure(figure, path)


STRATEGY_STYLE = {"fixed": ("s", "#555555"), "oracle": ("*", "#2ca02c"), "policy": ("D", "#9467bd"),
                  "gate": ("o", "#d62728")}


# One panel per compute measure: (the point's key, x label, title).
PARETO_PANELS = (
    ("relative_audio_compute", "relative audio compute (FLOPs of encoder + fusion / always-max)",
     "accuracy vs audio compute"),
    ("relative_end_to_end_compute", "relative end-to-end compute (all FLOPs of an example / always-max)",
     "accuracy vs end-to-end compute"),
)


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """Accuracy (examples with a clip) against relative audio compute and, beside it, against
    relative end-to-end compute (what the whole system costs), one point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report.get("strategies", [])
    # Reports written before end-to-end compute was counted have the first panel only.
    panels = [panel for panel in PARETO_PANELS if all(panel[0] in p for p in points)] or PARETO_PANELS[:1]
    figure, grid = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axes, (key, xlabel, title) in zip(grid[0], panels):
        _pareto_panel(figure, axes, points, key, xlabel, title)
    _save_figure(figure, path)


def _pareto_panel(figure, axes, points: list[dict[str, Any]], key: str, xlabel: str, title: str) -> None:
    curve = sorted((p for p in points if p["kind"] == "gate-curve"), key=lambda p: p[key])
    if curve:
        axes.plot([p[key] for p in curve], [100 * p["accuracy"] for p in curve], "-",
                  color="#d62728", alpha=0.4, marker=".", label="gate, thresholds 0.05-0.95")
    labels = []
    for point in points:
        if point["kind"] == "gate-curve":
            continue
        marker, colour = STRATEGY_STYLE.get(point["kind"], ("o", "grey"))
        axes.plot(point[key], 100 * point["accuracy"], marker, color=colour, markersize=8)
        labels.append((point["strategy"], point[key], 100 * point["accuracy"]))
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel("accuracy on examples with a clip (%)")
    axes.set_xlim(-0.05, 1.1)
    axes.grid(alpha=0.3)
    if curve:
        axes.legend(loc="lower right", fontsize=8)
    axes.set_title(title)
    _place_labels(figure, axes, labels)


LABEL_OFFSET = (5, 4)  # points right of and above the marker
LEADER_AFTER = 10  # points: a label moved further than this from its marker gets a leader line


def _place_labels(figure, axes, labels: list[tuple[str, float, float]]) -> None:
    """Annotate each (text, x, y); a label that would overlap one placed before it is moved until clear.

    Strategies often sit almost on the same spot (always-4/8/12 at one accuracy and nearly one
    compute), and labels at a fixed offset would be drawn over each other. Each label moves
    vertically, toward the middle of the plot where there is room (up in the lower half, down in
    the upper half, away from the title), just past the boxes it overlaps; they are placed from the
    edge inward in a fixed order, so the figure is the same for the same report.
    """
    figure.canvas.draw()  # final view limits: the boxes measured below are where the labels are drawn
    renderer = figure.canvas.get_renderer()
    to_points = 72 / figure.dpi
    middle = sum(axes.get_ylim()) / 2
    placed = []
    # Up-movers bottom first, then down-movers top first: each moves away from those placed before it.
    for text, x, y in sorted(labels, key=lambda label: (label[2] > middle, -abs(label[2] - middle), label[1])):
        up = y <= middle
        label = axes.annotate(text, (x, y), textcoords="offset points", xytext=LABEL_OFFSET, fontsize=8)
        box = label.get_window_extent(renderer)
        while blocking := [other for other in placed if box.overlaps(other)]:
            pixels = max(o.y1 for o in blocking) - box.y0 + 1 if up else min(o.y0 for o in blocking) - box.y1 - 1
            label.xyann = (label.xyann[0], label.xyann[1] + pixels * to_points)
            box = label.get_window_extent(renderer)
        placed.append(box)
        if abs(label.xyann[1] - LABEL_OFFSET[1]) > LEADER_AFTER:  # a thin line back to its marker
            axes.annotate("", (x, y), textcoords="offset points", xytext=label.xyann,
                          arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0})


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (REPORT_JSON, REPORT_MD, DELTAS_PNG, ACCURACY_PNG, PARETO_PNG)}
    plot_deltas(report, paths[DELTAS_PNG])
    plot_accuracy(report, paths[ACCURACY_PNG])
    plot_pareto(report, paths[PARETO_PNG])
    atomic_write_text(paths[REPORT_MD], markdown(report))
    write_json(paths[REPORT_JSON], report)  # last: its presence means the report is complete
    return paths
