"""One array task of a --slurm sweep (`safe sweep run-task`): train one run, record what happened.

The batch script runs this in the background and forwards SIGUSR1 to it; it forwards the signal
to `safe train` (which checkpoints and exits 1) and records the run as interrupted, so status
shows a requeued task as such, not as a failure.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Callable

from . import runner, state
from .grid import Cell, Run, finished, foreign, prerequisite
from .manifest import require


def run_task(out: Path, stage: str, variant: str, seed: int, profile: str, overrides: list[str],
             say: Callable[[str], None] = print, processes: int = 1, shutdown_seconds: int = 120) -> int:
    """Train one run with the profile and overrides the batch script names (it shows them in full)."""
    out = Path(out)
    manifest = require(out)
    run = Run(Cell(variant, seed), stage)
    fd = state.try_lock(out, run.cell)
    if fd is None:
        say(f"error: {run.cell.name} is being trained by another process (a second submission of this sweep?)")
        return 1
    with state.held(fd):
        if finished(out, run.cell, stage):
            reason = foreign(out, run.cell, stage, manifest.settings)
            if reason:
                state.record_foreign(out, run, reason)
                say(f"error: {run.name}: {reason}")
                return 1
            if state.read(out, run)["state"] != state.DONE:
                state.write(out, run, {**state.read(out, run), "state": state.DONE, "exit_code": 0, "message": None})
            say(f"{run.name}: already finished")
            return 0
        before = prerequisite(stage)
        if before is not None and (not finished(out, run.cell, before)
                                   or foreign(out, run.cell, before, manifest.settings)):
            reason = f"stage {before} of {run.cell.name} has not finished"
            state.record_blocked(out, run, reason)
            say(f"error: {run.name}: {reason}")
            return 1
        slurm = {key: os.environ.get(env) for key, env in (
            ("slurm_job", "SLURM_JOB_ID"), ("slurm_array_job", "SLURM_ARRAY_JOB_ID"),
            ("slurm_array_task", "SLURM_ARRAY_TASK_ID"), ("slurm_restarts", "SLURM_RESTART_COUNT"))}
        command = runner.train_command(out, profile, overrides, run, processes=processes,
                                       shutdown_seconds=shutdown_seconds)
        process = runner.start(out, manifest, run, fd, uuid.uuid4().hex[:12], command=command, mode="slurm", **slurm)
        say(f"{run.name}: training (pid {process.pid}), log {state.log_path(out, run)}")
        received: list[str] = []

        def forward(signum, frame):
            received.append(signal.Signals(signum).name)
            if process.poll() is None:
                process.send_signal(signum if signum != signal.SIGINT else signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        try:
            code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        record = state.record_end(out, run, code, interrupted=bool(received))
        detail = f": {record['message']}" if record.get("message") else ""
        say(f"{run.name}: {record['state']} (exit {code}){detail}")
        return code
