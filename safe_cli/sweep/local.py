"""Local mode: the grid's runs as subprocesses, one at a time or N at once.

Finished runs (summary.json present) are skipped, the others start with --resume, a failed run
is recorded and the rest go on; a stage waits for its previous stage of the same variant and
seed, and is marked blocked when that one failed. SIGINT/SIGTERM reach the running trainings
(each checkpoints and exits), and the sweep records them as interrupted: rerunning the same
command continues exactly where everything stopped.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import runner, state
from .grid import Run, finished, foreign, prerequisite
from .manifest import Manifest

POLL_SECONDS = 0.2


@dataclass
class Outcome:
    """What this invocation did: runs it trained (by final state) and runs it found finished."""

    invocation: str
    executed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    interrupted: bool = False
    wall_seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        return [name for name, s in self.executed.items() if s != state.DONE]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.interrupted


@dataclass
class _Active:
    run: Run
    process: object
    lock_fd: int
    started: float
    told_to_stop: bool = False


def run_local(out: Path, manifest: Manifest, runs: list[Run], parallel: int = 1,
              say: Callable[[str], None] = print, command: Optional[Callable[[Run], list[str]]] = None) -> Outcome:
    out = Path(out)
    outcome = Outcome(invocation=uuid.uuid4().hex[:12])
    began = time.monotonic()
    pending = list(runs)
    active: dict[str, _Active] = {}
    stopping: list[str] = []
    waiting_said: set[str] = set()
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    total = len(runs)

    def on_signal(signum, frame):
        if not stopping:
            stopping.append(signal.Signals(signum).name)
            say(f"{stopping[0]}: stopping {len(active)} running run(s); each saves a checkpoint "
                "(rerun the same command to continue)")
        _tell_to_stop(active, again=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending and not stopping) or active:
            if not stopping:
                _start_ready(out, manifest, pending, active, outcome, parallel, threads, say, total,
                             waiting_said, command)
            if stopping:
                # The signal may have come while a run was starting, before it was in `active`:
                # every loop forwards it to any run that has not had it yet.
                _tell_to_stop(active)
            for name, item in list(active.items()):
                code = item.process.poll()
                if code is None:
                    continue
                interrupted = bool(stopping) or _stopped_by_signal(out, item.run)
                record = state.record_end(out, item.run, code, interrupted)
                os.close(item.lock_fd)
                del active[name]
                outcome.executed[name] = record["state"]
                seconds = time.monotonic() - item.started
                detail = f" ({record['message']})" if record.get("message") else ""
                say(f"[{_count(outcome, total)}/{total}] {record['state']}: {item.run.name} after {seconds:.1f} s, "
                    f"exit {code}{detail}")
            time.sleep(POLL_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    outcome.interrupted = bool(stopping)
    outcome.wall_seconds = time.monotonic() - began
    return outcome


def _tell_to_stop(active: dict[str, _Active], again: bool = False) -> None:
    """SIGTERM to each running training not told yet (to all of them on a repeated signal)."""
    for item in active.values():
        if (again or not item.told_to_stop) and item.process.poll() is None:
            item.process.send_signal(signal.SIGTERM)
            item.told_to_stop = True


def _count(outcome: Outcome, total: int) -> int:
    return len(outcome.executed) + len(outcome.skipped) + len(outcome.blocked)


def _stopped_by_signal(out: Path, run: Run) -> bool:
    message = state.last_error(state.log_path(out, run)) or ""
    return message.startswith("error: stopped by SIG")


def _start_ready(out, manifest, pending, active, outcome, parallel, threads, say, total, waiting_said, command):
    busy_cells = {item.run.cell for item in active.values()}
    for run in list(pending):
        if len(active) >= parallel:
            return
        if finished(out, run.cell, run.stage):
            pending.remove(run)
            reason = foreign(out, run.cell, run.stage, manifest.settings)
            if reason:
                state.record_foreign(out, run, reason)
                outcome.executed[run.name] = state.FAILED
                say(f"[{_count(outcome, total)}/{total}] failed: {run.name} ({reason})")
                continue
            outcome.skipped.append(run.name)
            if state.read(out, run)["state"] != state.DONE:
                state.write(out, run, {**state.read(out, run), "state": state.DONE, "exit_code": 0, "message": None})
            say(f"[{_count(outcome, total)}/{total}] already finished: {run.name}")
            continue
        if run.cell in busy_cells:
            continue
        before = prerequisite(run.stage)
        if before is not None and (not finished(out, run.cell, before)
                                   or foreign(out, run.cell, before, manifest.settings)):
            if any(r.cell == run.cell and r.stage == before for r in pending):
                continue  # its previous stage is still to run in this sweep
            pending.remove(run)
            reason = f"stage {before} of {run.cell.name} has not finished (in this sweep's settings)"
            state.record_blocked(out, run, reason)
            outcome.blocked.append(run.name)
            say(f"[{_count(outcome, total)}/{total}] blocked: {run.name} ({reason})")
            continue
        fd = state.try_lock(out, run.cell)
        if fd is None:
            if run.name not in waiting_said:
                waiting_said.add(run.name)
                say(f"waiting: {run.cell.name} is being trained by another process (an earlier sweep's run "
                    "still stopping, or a second sweep); it starts when that one exits")
            continue
        process = runner.start(out, manifest, run, fd, outcome.invocation, threads=threads,
                               command=command(run) if command else None, mode="local")
        active[run.name] = _Active(run, process, fd, time.monotonic())
        busy_cells.add(run.cell)
        pending.remove(run)
        say(f"started: {run.name} (pid {process.pid}, log {state.log_path(out, run)})")
