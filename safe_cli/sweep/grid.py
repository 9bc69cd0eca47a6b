"""The sweep grid: which (variant, seed, stage) runs exist, where they live, and what each waits for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..errors import SafeError
from ..training import run_dir as layout

STAGE_ORDER = ("a", "b", "c")


@dataclass(frozen=True, order=True)
class Cell:
    """One variant and seed: one run folder, trained stage after stage."""

    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}.seed-{self.seed}"


@dataclass(frozen=True)
class Run:
    """One stage of one cell: one `safe train --stage X` invocation."""

    cell: Cell
    stage: str

    @property
    def variant(self) -> str:
        return self.cell.variant

    @property
    def seed(self) -> int:
        return self.cell.seed

    @property
    def name(self) -> str:
        return f"{self.cell.name}.stage-{self.stage}"


def prerequisite(stage: str) -> Optional[str]:
    """The stage whose output this one reads (b reads a's weights, c distils b's policy)."""
    index = STAGE_ORDER.index(stage)
    return STAGE_ORDER[index - 1] if index else None


def parse_names(text: str, option: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise SafeError(f"{option}: expected a comma-separated list, got {text!r}")
    return list(dict.fromkeys(names))


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def check_variant_names(variants: list[str]) -> None:
    """Variant names become folder names and words in batch scripts: keep them plain."""
    bad = [v for v in variants if not _SAFE_NAME.match(v)]
    if bad:
        raise SafeError(f"--variants: {', '.join(map(repr, bad))}: a sweep needs variant names of letters, digits "
                        "and _ . + - (they name folders and appear in batch scripts)")


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``1,2,3`` or ``1-3`` (or a mix: ``1-3,7``)."""
    seeds: list[int] = []
    for part in parse_names(text, option):
        low, dash, high = part.partition("-")
        try:
            if dash and low:
                first, last = int(low), int(high)
                if last < first:
                    raise ValueError
                seeds += range(first, last + 1)
            else:
                seeds.append(int(part))
        except ValueError:
            raise SafeError(f"{option}: {part!r} is not a seed or a range like 1-3") from None
    return list(dict.fromkeys(seeds))


def normalise_stages(stages: Iterable[str], option: str = "--stages") -> list[str]:
    out = []
    for stage in stages:
        stage = stage.strip().lower()
        if stage not in STAGE_ORDER:
            raise SafeError(f"{option}: unknown stage {stage!r} (stages: {', '.join(STAGE_ORDER)})")
        out.append(stage)
    return sorted(set(out), key=STAGE_ORDER.index)


def cells(variants: list[str], seeds: list[int]) -> list[Cell]:
    """Variant-major: the order of SLURM array indices and of the report's rows."""
    return [Cell(v, s) for v in variants for s in seeds]


def expand(variants: list[str], seeds: list[int], stages: list[str]) -> list[Run]:
    """Stage-major: every stage-a run comes before any stage-b run (a sequential sweep shows all
    variants' stage A before spending time on later stages)."""
    return [Run(cell, stage) for stage in stages for cell in cells(variants, seeds)]


def run_root(out: Path, cell: Cell) -> Path:
    """``<out>/<variant>/seed-<N>``: with the default --out (<runs_dir>/<profile>) the very folder
    `safe train --variant V --seed N` uses, so a sweep and a single run share their runs."""
    return Path(out) / cell.variant / f"seed-{cell.seed}"


def stage_path(out: Path, run: Run) -> Path:
    return layout.stage_dir(run_root(out, run.cell), run.stage)


def finished(out: Path, cell: Cell, stage: str) -> bool:
    """A stage finished when it wrote its summary (training writes it last, atomically)."""
    return (layout.stage_dir(run_root(out, cell), stage) / layout.SUMMARY_FILE).is_file()


def foreign(out: Path, cell: Cell, stage: str, settings: dict) -> Optional[str]:
    """Why a finished stage is not this sweep's (trained with other settings), or None.

    A run folder may hold a run made by `safe train` or an older sweep; skipping it as finished
    would put another experiment's numbers in this sweep's table.
    """
    import yaml

    from .manifest import differences

    saved = layout.stage_dir(run_root(out, cell), stage) / layout.PROFILE_FILE
    if not settings or not saved.is_file():
        return None
    try:
        profile = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        return f"{saved}: unreadable ({exc})"
    profile.pop("sweep", None)
    diff = differences(settings, profile, labels=("in the sweep", "in the run"))
    if not diff:
        return None
    return (f"{saved}: finished with other settings than this sweep's ({'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}); move the folder away to retrain it here")

