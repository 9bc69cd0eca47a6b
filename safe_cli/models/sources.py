"""Where a ``from_pretrained`` model comes from: a local directory or a hub id."""

from __future__ import annotations

from pathlib import Path

from ..errors import SafeError


def pretrained_source(name_or_path: str, key: str) -> str:
    """The string to hand to ``from_pretrained``; a path-like value that is not a directory is an error.

    ``key`` is the profile key the value came from, so the message names it.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if name_or_path.startswith(("/", ".", "~")):
        raise SafeError(f"{key}: local model directory not found: {name_or_path}")
    return name_or_path
