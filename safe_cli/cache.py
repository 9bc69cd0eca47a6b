"""A content-addressed cache for things the framework builds once (foundation models, exported data).

An entry's key is the SHA-256 of everything that decides its content (a JSON spec: config,
data fingerprint, recipe version), so a change to any of them builds a new entry and an
unchanged spec is found again. Entries are built in a temporary folder and renamed into place,
under a file lock: a crash leaves no half-built entry, and two processes asking for the same
entry build it once.

Root: ``$SAFE_CACHE_DIR``, else ``$XDG_CACHE_HOME/safe``, else ``~/.cache/safe``. As the XDG base
directory spec says, an empty or relative ``XDG_CACHE_HOME`` is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def cache_root() -> Path:
    """Where cached entries live: ``SAFE_CACHE_DIR``, else ``$XDG_CACHE_HOME/safe``, else ``~/.cache/safe``."""
    if os.environ.get("SAFE_CACHE_DIR"):
        return Path(os.environ["SAFE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the spec: a relative path is invalid and is ignored
        return Path(xdg) / "safe"
    return Path.home() / ".cache" / "safe"


def spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(entry: Path) -> bool:
    # spec.json is written last: its presence is what marks an entry complete.
    return (entry / "spec.json").is_file()


def is_cached(kind: str, spec: dict[str, Any]) -> bool:
    """Whether the entry for ``spec`` under ``kind/`` is complete."""
    return _complete(cache_root() / kind / spec_key(spec))


def cached_directory(kind: str, spec: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The entry for ``spec`` under ``kind/``; ``build(tmp_dir)`` fills it when it is missing.

    Returns (path, built_now).
    """
    final = cache_root() / kind / spec_key(spec)
    if _complete(final):
        return final, False
    with _locked(final.with_suffix(".lock")):
        if _complete(final):  # another process built it while we waited
            return final, False
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True, default=str) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True
