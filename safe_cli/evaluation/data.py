"""Evaluation examples: the profile's evaluation records, or any manifests a user brings.

Both are read by the one loader (``data/sources.py``) into a :class:`RecordPool`, so the same
paired evaluation runs on either. A VL/text task whose records carry no audio is asked twice:
as written, and with a *distractor* clip drawn (seeded) from the records' own audio, because a
regression that only shows when audio is present is the one SAFE must rule out. Records whose
image or audio cannot be read are skipped and listed, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config.schema import Profile
from ..data.dataset import RecordPool
from ..data.sources import evaluation_records, make_pool, manifest_paths, read_records


@dataclass
class EvalData:
    pool: RecordPool
    description: str
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason", "ids"} per unusable file


def _usable(pool: RecordPool) -> tuple[RecordPool, list[dict]]:
    """The pool without the records whose files do not decode, and those files listed."""
    kept, bad = pool.usable(list(pool.examples))
    skipped: dict[str, dict] = {}
    for record, _ in bad:
        for path in (record.image, record.audio):
            if path and path in pool.media.failed:
                entry = skipped.setdefault(path, {"file": path, "reason": pool.media.failed[path], "ids": []})
                entry["ids"].append(record.id)
    return pool.view(kept), list(skipped.values())


def _data(profile: Profile, paths: Sequence[str], sample_rate: int, encoder, description: str) -> EvalData:
    records = read_records(paths)
    pool = make_pool(profile, evaluation_records(records, profile.seed), sample_rate, encoder=encoder)
    pool, skipped = _usable(pool)
    return EvalData(pool, f"{description}: {len(records)} records", skipped)


def profile_data(profile: Profile, sample_rate: int, encoder=None) -> EvalData:
    """The profile's evaluation records (AV-digits' test split, or data.eval_manifests)."""
    paths = manifest_paths(profile, "test")
    if not paths:
        from ..errors import SafeError

        raise SafeError("data.eval_manifests: the profile names no evaluation manifests; pass them with --data")
    source = profile.data.source
    name = f"AV-digits ({source}) test split" if source != "manifest" else _names(paths)
    return _data(profile, paths, sample_rate, encoder, name)


def manifest_data(profile: Profile, paths: Sequence[str], sample_rate: int, encoder=None) -> EvalData:
    """Every record of the manifests (validated as a whole first: all problems reported at once)."""
    return _data(profile, paths, sample_rate, encoder, _names(paths))


def _names(paths: Sequence[str]) -> str:
    return f"manifest{'s' if len(paths) > 1 else ''} " + ", ".join(Path(p).name for p in paths)
