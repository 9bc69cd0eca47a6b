"""sweep.json: what a sweep is (profile, --set overrides, grid), so reruns, status and report agree.

A rerun into the same --out must train the same thing: a different profile or different
overrides would mix two experiments in one table (and `safe train --resume` would refuse the
half-finished runs anyway), so it is refused with the keys that differ. The grid may grow: a
rerun with new variants or seeds adds them, and the manifest keeps the union, so the report
covers every run the folder holds. ``sweep.*`` overrides (SLURM options, parallelism) may
change between reruns: they decide how runs are launched, not what they train.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..atomic import write_json
from ..config.schema import Profile
from ..errors import SafeError
from .grid import STAGE_ORDER

MANIFEST_FILE = "sweep.json"
SCHEMA = "safe.sweep/1"


def is_sweep_override(item: str) -> bool:
    return item.partition("=")[0].strip().startswith("sweep.")


def trained_settings(profile: Profile) -> dict[str, Any]:
    """The resolved profile minus its sweep section: what decides the runs' results."""
    data = profile.model_dump(mode="json")
    data.pop("sweep", None)
    return data


def digest(settings: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def differences(saved: Any, current: Any, prefix: str = "", labels: tuple[str, str] = ("in the sweep", "now")) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += differences(saved.get(key), current.get(key), f"{prefix}{key}.", labels)
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} {labels[0]}, {current!r} {labels[1]}"]


@dataclass
class Manifest:
    profile: str
    profile_name: str
    overrides: list[str]
    variants: list[str]
    seeds: list[int]
    stages: list[str]
    settings: dict[str, Any]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    submissions: list[dict[str, Any]] = field(default_factory=list)
    schema: str = SCHEMA

    @property
    def train_overrides(self) -> list[str]:
        """What each `safe train` gets: the user's --set minus the sweep's own keys."""
        return [item for item in self.overrides if not is_sweep_override(item)]

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MANIFEST_FILE, asdict(self))


def load(out: Path) -> Optional[Manifest]:
    path = Path(out) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SafeError(f"{path}: not a readable sweep manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SafeError(f"{path}: schema: expected {SCHEMA!r}, got {data.get('schema') if isinstance(data, dict) else data!r}")
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


def require(out: Path) -> Manifest:
    manifest = load(out)
    if manifest is None:
        raise SafeError(f"{Path(out) / MANIFEST_FILE}: no sweep here (safe sweep --out {out} makes one)")
    return manifest


def union(first: list, second: list) -> list:
    return list(dict.fromkeys([*first, *second]))


def reconcile(existing: Optional[Manifest], fresh: Manifest, out: Path) -> tuple[Manifest, list[str]]:
    """The manifest to keep and notes for the user; refuses a different training setup."""
    if existing is None:
        return fresh, []
    diff = differences(existing.settings, fresh.settings)
    if diff or existing.train_overrides != fresh.train_overrides:
        given = " ".join(f"--set {o}" for o in existing.train_overrides) or "no --set"
        lines = [f"{out / MANIFEST_FILE}: this sweep trains profile {existing.profile!r} with {given}; "
                 "this command would train something else in the same folder:"]
        lines += diff[:20] or [f"--set: {existing.train_overrides} in the sweep, {fresh.train_overrides} now"]
        lines.append(f"rerun with the sweep's --profile/--set (or none: `safe sweep --out {out}` reuses them), "
                     "or choose another --out")
        raise SafeError("\n".join(lines))
    merged = Manifest(
        profile=existing.profile, profile_name=existing.profile_name, overrides=fresh.overrides,
        variants=union(existing.variants, fresh.variants), seeds=union(existing.seeds, fresh.seeds),
        stages=sorted(union(existing.stages, fresh.stages), key=STAGE_ORDER.index),
        settings=existing.settings, created=existing.created, submissions=existing.submissions,
    )
    notes = []
    added = [(name, [x for x in getattr(merged, name) if x not in getattr(existing, name)])
             for name in ("variants", "seeds", "stages")]
    if any(values for _, values in added):
        grown = ", ".join(f"{name} {', '.join(map(str, values))}" for name, values in added if values)
        notes.append(f"the sweep's grid grows by {grown}; sweep.json now lists "
                     f"{len(merged.variants)} variants x {len(merged.seeds)} seeds, stages {','.join(merged.stages)}")
    return merged, notes
