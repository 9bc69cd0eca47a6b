"""Every `safe ... --help` at 80 columns: paragraphs wrap cleanly and the examples stay verbatim."""

import inspect

import pytest
import typer.main
from typer.testing import CliRunner

from safe_cli.cli.main import app

WIDTH = 80


def _commands(command=None, argv=()):
    """(argv, click command) for the app, its groups and every visible subcommand."""
    command = command or typer.main.get_command(app)
    yield list(argv), command
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from _commands(sub, (*argv, name))


COMMANDS = list(_commands())


def _source(help_text: str) -> tuple[list[str], list[str]]:
    """The help text's prose paragraphs (whitespace joined, `code` marks dropped) and its example lines."""
    prose, examples = [], []
    for paragraph in inspect.cleandoc(help_text).split("\n\n"):
        if paragraph.startswith("    "):  # an indented block: example commands
            examples += [line.strip() for line in paragraph.splitlines()]
        else:
            prose.append(" ".join(paragraph.replace("`", "").split()))
    return prose, examples


@pytest.mark.parametrize("argv, command", COMMANDS, ids=[" ".join(argv) or "safe" for argv, _ in COMMANDS])
def test_help_paragraphs_wrap_cleanly_and_examples_stay_verbatim(argv, command):
    result = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": str(WIDTH), "NO_COLOR": "1",
                                                             "FORCE_COLOR": None}, terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    description = result.output.split("╭")[0]  # the text above the options panels
    lines = description.splitlines()
    prose, examples = _source(command.help)

    # Each paragraph of the source is shown whole, in order of its words (nothing eaten as markup).
    flowing = " ".join(description.split())
    for paragraph in prose:
        assert paragraph in flowing, f"{paragraph!r} not shown whole in:\n{description}"

    # Every example is shown, each line of it verbatim on one line of the help (copyable as it is).
    assert examples, f"`safe {' '.join(argv)} --help` shows no example"
    shown = {line.strip() for line in lines}
    for example in examples:
        assert example in shown, f"{example!r} not shown verbatim in:\n{description}"

    # A prose line (one space of padding, then text) may end only where the console's width forced it:
    # the next line's first word must not have fit on it. A hard line break of the docstring kept in
    # the help fails this: "...per example; the" followed by "variant's retention terms ...".
    # (The last column is rich's right padding, hence WIDTH - 1.)
    for line, following in zip(lines, lines[1:]):
        if line.startswith(" ") and not line.startswith("  ") and following.startswith(" ") \
                and not following.startswith("  ") and following.strip():
            next_word = following.split()[0]
            assert len(line.rstrip()) + 1 + len(next_word) > WIDTH - 1, \
                f"line broken early:\n{line.rstrip()}\n{following.rstrip()}"
