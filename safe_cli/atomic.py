"""Whole-or-nothing file writes, shared by run directories, manifests and the feature cache.

The content goes to a hidden temporary file beside the target (``.<name>.<uuid>.tmp``), is
fsync'ed and renamed over the target; the folder is fsync'ed so the rename itself survives a
power cut. A reader, or a run killed at any moment, sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

TEMP_SUFFIX = ".tmp"


def fsync_directory(path: Path) -> None:
    # Not every platform/filesystem allows fsync on a folder; then the rename is as durable as it gets.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What open() would give. Some writers (safetensors) create 0600 files, too strict for a shared cache.
FILE_MODE = 0o666 & ~_umask()


def is_temp(name: str) -> bool:
    """A temporary file of ``atomic_write`` (left behind only by a killed process)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsync'ed and renamed over ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented, key-sorted JSON, written atomically."""
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")
