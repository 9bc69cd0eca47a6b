"""How the CLI prints: one console setup and one table class, so numbers are never cut.

Off a terminal (a CI log, a pipe) rich falls back to 80 columns, and a wide report table then
elides cells with "…", numbers included. Consoles made here render at 120 columns there
(COLUMNS still wins). In a ``ReportTable`` a number column's minimum width is its widest value,
so when the table is too wide rich wraps the text columns and folds the headers instead; if the
numbers alone do not fit, the table is printed wider than the console rather than cut.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions
from rich.table import Table
from rich.text import Text

OFF_TERMINAL_WIDTH = 120


class _Console(Console):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._width_given = kwargs.get("width") is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        # Checked on every print, not once at import: output may be redirected later (tests, CliRunner).
        if not (self._width_given or self.is_terminal or os.environ.get("COLUMNS")):
            return ConsoleDimensions(OFF_TERMINAL_WIDTH, size.height)
        return size


def make_console(**kwargs: Any) -> Console:
    """A rich Console (same arguments) that renders at OFF_TERMINAL_WIDTH columns off a terminal."""
    return _Console(**kwargs)


def _plain(cell: Any) -> str:
    """A cell's text; str cells are rich markup, as Table renders them. Other renderables: ""."""
    if isinstance(cell, str):
        cell = Text.from_markup(cell)
    return cell.plain if isinstance(cell, Text) else ""


class ReportTable(Table):
    """A rich Table with number columns, whose values are never cut, and text columns (wrap; fold, never "…").

    A number column's min_width follows its widest value as rows are added; the text columns and
    the headers give up the width when the table is too wide.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._number_columns: set[int] = set()

    def add_text_column(self, header: str = "", **kwargs: Any) -> None:
        self.add_column(header, overflow="fold", **kwargs)

    def add_number_column(self, header: str = "", **kwargs: Any) -> None:
        self.add_column(header, justify="right", overflow="fold", **kwargs)
        self._number_columns.add(len(self.columns) - 1)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*cells, **kwargs)
        for index in self._number_columns:
            if index < len(cells):
                value = max((cell_len(line) for line in _plain(cells[index]).splitlines()), default=0)
                column = self.columns[index]
                column.min_width = max(column.min_width or 0, value)


def key_value_table(title: str, rows: Iterable[tuple[str, str]], justify: str = "left") -> ReportTable:
    """A two-column table without header: label, then its value (values wrap at spaces, long ones fold)."""
    table = ReportTable(title=title, show_header=False)
    table.add_text_column()
    table.add_text_column(justify=justify)
    for label, value in rows:
        table.add_row(label, value)
    return table
