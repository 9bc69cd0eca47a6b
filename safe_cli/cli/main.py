"""The `safe` command: one small module per subcommand, registered here."""

from __future__ import annotations

import typer

from .. import __version__
from .common import State
from .check import check
from .data import data_app
from .distill_policy import distill_policy
from .encode_audio import encode_audio
from .eval_retention import eval_retention
from .prepare import prepare
from .sweep import sweep_app
from .train import train
from .use import ask, predict, serve
from .validate import validate

app = typer.Typer(
    name="safe",
    help="SAFE: add audio understanding to a frozen vision-language model without regressing it.\n\n"
    # A prose paragraph before the examples: typer dedents what follows the first paragraph, so examples
    # alone there would lose their indentation and not be shown as a (verbatim) code block.
    "Run `safe COMMAND --help` for a command's options and more examples.\n\n"
    "Examples:\n\n    safe validate demo\n\n    safe data export avdigits --out avdigits-export\n\n    safe prepare\n\n    safe train --stage a --variant soft_retention\n\n    safe train --stage b --variant soft_retention\n\n    safe distill-policy runs/demo/soft_retention/seed-0\n\n    safe eval-retention runs/demo/soft_retention/seed-0\n\n    safe serve runs/demo/soft_retention/seed-0\n\n    safe sweep --variants no_retention,soft_retention --seeds 1,2 --stages a,b\n\n    torchrun --standalone --nproc_per_node 2 -m safe_cli train --stage a\n\n    safe validate llava15-7b-whisper-small --estimate\n\n    safe check --profile demo",
    no_args_is_help=True,
    # Markdown: docstring paragraphs are reflowed to the terminal's width (rich mode keeps their hard line
    # breaks, cutting sentences short at 80 columns) and the indented example commands are code blocks, shown
    # verbatim. Paths like <run>/... must be in backticks there, or markdown takes <run> for an HTML tag.
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"safe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    State.debug = debug


app.command("validate")(validate)
app.command("check")(check)
app.command("prepare")(prepare)
app.command("train")(train)
app.command("encode-audio")(encode_audio)
app.command("eval-retention")(eval_retention)
app.add_typer(sweep_app, name="sweep")
app.add_typer(data_app, name="data")
app.command("distill-policy")(distill_policy)
app.command("ask")(ask)
app.command("predict")(predict)
app.command("serve")(serve)


def main() -> None:
    app()
