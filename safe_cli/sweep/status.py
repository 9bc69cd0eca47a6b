"""Where a sweep stands: every run's recorded state, checked against what is alive now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import state
from .grid import expand, prerequisite
from .manifest import Manifest
from .slurm import latest_jobs, queue


def run_states(out: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """One row per run of the grid: its record plus ``shown`` (what is true now) and ``queue``."""
    out = Path(out)
    runs = expand(manifest.variants, manifest.seeds, manifest.stages)
    jobs = latest_jobs(manifest)
    cells = [tuple(c) for c in manifest.submissions[-1]["cells"]] if manifest.submissions else []
    live = queue(list(jobs.values())) if jobs else None
    rows = []
    for run in runs:
        record = state.read(out, run)
        shown = record["state"]
        queued = None
        if live is not None and run.stage in jobs and (run.variant, run.seed) in cells:
            task = f"{jobs[run.stage]}_{cells.index((run.variant, run.seed))}"
            if task in live:
                queued = f"{task} {live[task][0].lower()}" + (f" ({live[task][1]})" if live[task][1] not in ("None", "") else "")
                if shown in (state.NOT_STARTED, state.INTERRUPTED, state.FAILED, state.BLOCKED) \
                        and live[task][0] == "PENDING":
                    shown = "queued"
        attempts = record.get("attempts") or []
        last = attempts[-1] if attempts else {}
        if shown == state.RUNNING:
            if last.get("mode") == "local" and not state.is_locked(out, run.cell):
                shown = f"{state.INTERRUPTED} (its sweep process is gone)"
            elif last.get("mode") == "slurm" and live is not None and queued is None:
                shown = "lost (its job ended without a record: see the slurm .out file)"
        if shown == state.NOT_STARTED and queued is None:
            before = prerequisite(run.stage)
            earlier = next((r for r in rows if r["run"].cell == run.cell and r["run"].stage == before), None)
            if earlier is not None and earlier["shown"].split(" ")[0] in (state.FAILED, state.BLOCKED):
                shown = state.BLOCKED  # never ran (SLURM cancels it: --kill-on-invalid-dep) and never will
                record = {**record, "message": f"stage {before} {earlier['shown'].split(' ')[0]}"}
        seconds = None
        if last.get("ended_unix") and last.get("started_unix"):
            seconds = last["ended_unix"] - last["started_unix"]
        rows.append({**record, "shown": shown, "queue": queued, "attempt_count": len(attempts),
                     "last_seconds": seconds, "run": run})
    return rows
