"""Each run's state in its own small JSON file (one writer per file, atomic rename: no locking,
safe on a shared file system where many array tasks report at once)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..atomic import write_json
from .grid import Cell, Run, finished

STATE_DIR = "sweep-state"
LOG_DIR = "logs"

# A run's state: running (a process trains it now), done (summary.json written), failed (exited
# non-zero), interrupted (stopped by a signal: checkpoint saved, a rerun resumes it), blocked (its
# previous stage did not finish), not started.
DONE, RUNNING, FAILED, INTERRUPTED, BLOCKED, NOT_STARTED = "done", "running", "failed", "interrupted", "blocked", "not started"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def state_path(out: Path, run: Run) -> Path:
    return Path(out) / STATE_DIR / f"{run.name}.json"


def log_path(out: Path, run: Run) -> Path:
    return Path(out) / LOG_DIR / f"{run.name}.log"


def read(out: Path, run: Run) -> dict[str, Any]:
    """The recorded state, or one derived from the run folder (a run trained outside the sweep)."""
    path = state_path(out, run)
    record: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            record = json.loads(path.read_text())
    if not record:
        record = {"variant": run.variant, "seed": run.seed, "stage": run.stage, "attempts": [],
                  "state": DONE if finished(out, run.cell, run.stage) else NOT_STARTED}
    return record


def write(out: Path, run: Run, record: dict[str, Any]) -> None:
    path = state_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**record, "updated": now()})


def record_start(out: Path, run: Run, invocation: str, pid: int, **extra: Any) -> dict[str, Any]:
    record = read(out, run)
    record.pop("foreign", None)
    attempt = {"started": now(), "started_unix": time.time(), "pid": pid, "host": socket.gethostname(),
               "invocation": invocation, **extra}
    record.update(variant=run.variant, seed=run.seed, stage=run.stage, state=RUNNING, exit_code=None,
                  message=None, log=str(log_path(out, run)))
    record["attempts"] = [*record.get("attempts", []), attempt]
    write(out, run, record)
    return record


def record_end(out: Path, run: Run, exit_code: int, interrupted: bool) -> dict[str, Any]:
    record = read(out, run)
    done = exit_code == 0 and finished(out, run.cell, run.stage)
    state = DONE if done else INTERRUPTED if interrupted else FAILED
    message = None
    if not done:
        message = last_error(log_path(out, run)) or f"exit code {exit_code}"
        if exit_code == 0:
            message = "exited 0 but wrote no summary.json"
    if record.get("attempts"):
        record["attempts"][-1].update(ended=now(), ended_unix=time.time(), exit_code=exit_code, outcome=state)
    record.update(state=state, exit_code=exit_code, message=message)
    write(out, run, record)
    return record


def record_blocked(out: Path, run: Run, reason: str) -> dict[str, Any]:
    record = read(out, run)
    record.update(variant=run.variant, seed=run.seed, stage=run.stage, state=BLOCKED, exit_code=None, message=reason)
    write(out, run, record)
    return record


def record_foreign(out: Path, run: Run, reason: str) -> dict[str, Any]:
    """A finished run of another experiment in this sweep's folder: failed, and left untouched."""
    record = read(out, run)
    record.update(variant=run.variant, seed=run.seed, stage=run.stage, state=FAILED, exit_code=None,
                  message=reason, foreign=True)
    write(out, run, record)
    return record


def last_error(log: Path) -> Optional[str]:
    """The line that says why a run failed: `safe`'s own "error: ..." line, else the log's last line."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, os.path.getsize(log) - 20_000))
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error:")]
    line = errors[-1] if errors else (lines[-1] if lines else None)
    return line[:300] if line else None


# --------------------------------------------------------------------------- one process per run folder


def lock_path(out: Path, cell: Cell) -> Path:
    return Path(out) / STATE_DIR / f"{cell.name}.lock"


def try_lock(out: Path, cell: Cell) -> Optional[int]:
    """An open fd holding an exclusive flock on the cell, or None when another process holds it.

    The training child inherits the fd, so the lock outlives a killed sweep process for as long
    as its orphaned child still writes the run folder: a rerun never trains the same folder twice.
    """
    path = lock_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def is_locked(out: Path, cell: Cell) -> bool:
    fd = try_lock(out, cell)
    if fd is None:
        return True
    os.close(fd)
    return False


@contextlib.contextmanager
def held(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
