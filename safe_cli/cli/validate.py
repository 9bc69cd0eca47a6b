"""`safe validate`: print the resolved profile, or every problem in it at once (exit 2)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.syntax import Syntax

from ..config import dump_profile, resolve_variants
from .common import SetOption, console, handle_errors, resolve_profile


@handle_errors
def validate(
    profile: str = typer.Argument(..., help="Built-in profile name (e.g. demo) or path to a YAML file."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print the resolved profile as JSON instead of YAML."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the one-line verdict."),
) -> None:
    """Validate a profile and print it resolved (extends and --set applied, defaults filled in).

    Every problem is reported at once as FILE: KEY.PATH: what was expected, with exit code 2.

    Example:

        safe validate demo --set fusion.layers=[0,2] --set training.stage_a.steps=50
    """
    resolved = resolve_profile(profile, set_)
    if as_json:
        print(json.dumps(resolved.model_dump(mode="json"), indent=2))
        return
    if not quiet:
        console.print(Syntax(dump_profile(resolved), "yaml", theme="ansi_dark", background_color="default"))
    variants = ", ".join(resolve_variants(resolved.retention.variants))
    console.print(
        f"[green]ok[/]: profile [bold]{resolved.name}[/] ({resolved.base.kind} + "
        f"{resolved.audio_encoder.kind}); variants: {variants}",
        highlight=False,
    )
