"""Starting one run: the `safe train` command line, its log, its environment, its state record."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .grid import Run, run_root
from .manifest import Manifest
from .state import log_path, record_start


def launcher(python: Optional[str] = None, processes: int = 1, shutdown_seconds: int = 120) -> list[str]:
    """``python -m safe_cli``, or torchrun with one process per GPU when ``processes`` > 1.

    torchrun passes SIGUSR1 (SLURM's warning) on to every rank, which checkpoints and stops,
    and waits ``shutdown_seconds`` before it kills them.
    """
    python = python or sys.executable
    if processes <= 1:
        return [python, "-m", "safe_cli"]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout",
            str(max(1, shutdown_seconds)), "-m", "safe_cli"]


def train_command(out: Path, profile: str, overrides: list[str], run: Run, python: Optional[str] = None,
                  processes: int = 1, shutdown_seconds: int = 120) -> list[str]:
    """Always --resume: a run that never started begins at step 0, an interrupted one continues."""
    command = launcher(python, processes, shutdown_seconds) + ["train", "--stage", run.stage,
               "--variant", run.variant, "--seed", str(run.seed), "--run-dir", str(run_root(out, run.cell)),
               "--profile", profile, "--resume"]
    for item in overrides:
        command += ["--set", item]
    return command


def _die_with_parent() -> None:
    # Linux: SIGTERM to the child when the sweep process dies (even by SIGKILL), so an orphan
    # checkpoints and stops instead of training on unobserved. Elsewhere the run lock still
    # keeps a rerun from training the same folder while the orphan lives.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_env(threads: Optional[int]) -> dict[str, str]:
    env = dict(os.environ, SAFE_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start(out: Path, manifest: Manifest, run: Run, lock_fd: int, invocation: str, *,
          threads: Optional[int] = None, die_with_parent: bool = True,
          command: Optional[list[str]] = None, **extra) -> subprocess.Popen:
    """Launch the run with its output appended to its log; record it as running."""
    command = command or train_command(out, manifest.profile, manifest.train_overrides, run)
    log = log_path(out, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        header = f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {run.name}: {' '.join(command)}\n"
        handle.write(header.encode())
        handle.flush()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=child_env(threads),
            pass_fds=(lock_fd,), preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )
    record_start(out, run, invocation, process.pid, command=command, **extra)
    return process
