"""One rich progress bar style for every long loop (on stderr, so --json output stays clean)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .tables import make_console

_console = make_console(stderr=True)  # off a terminal (a batch job's log): 120 columns, as the tables


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yields ``advance(**fields)``: one step done, with fields (loss=...) shown beside the bar.

    ``completed`` starts the bar part-way (a resumed run). ``SAFE_NO_PROGRESS=1`` hides the bar (tests, logs of batch jobs).
    """
    disabled = os.environ.get("SAFE_NO_PROGRESS") == "1"
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console,
        disable=disabled,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        def advance(**fields: object) -> None:
            info = " ".join(f"{key} {value}" for key, value in fields.items())
            progress.update(task, advance=1, info=info)

        yield advance
