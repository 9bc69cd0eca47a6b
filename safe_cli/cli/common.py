"""What every command shares: options declared once, and domain errors turned into exit codes."""

from __future__ import annotations

import functools
import sys
from typing import Callable, List, Optional

import typer
from rich.text import Text

from ..config import ProfileError, load_profile
from ..config.schema import Profile
from ..errors import SafeError
from ..tables import make_console

console = make_console(soft_wrap=True)
err_console = make_console(stderr=True, soft_wrap=True)


class State:
    debug = False


ProfileOption = typer.Option(
    "demo", "--profile", "-p", help="Built-in profile name or path to a YAML profile.", show_default=True
)
SetOption = typer.Option(
    None,
    "--set",
    "-s",
    help="Override a profile key, typed by the schema: --set training.stage_a.steps=50 (repeatable).",
    metavar="KEY=VALUE",
)


def resolve_profile(profile: str, overrides: Optional[List[str]]) -> Profile:
    return load_profile(profile, overrides or [])


def handle_errors(command: Callable) -> Callable:
    """Turn SafeError/ProfileError into a clear stderr message and exit code; --debug re-raises."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (SafeError, ProfileError) as exc:
            if State.debug:
                raise
            code = getattr(exc, "exit_code", 2)
            lines = str(exc).splitlines() or [type(exc).__name__]
            if isinstance(exc, ProfileError):
                head, rest = f"profile has {len(exc.issues)} problem(s):", lines
            else:
                head, rest = lines[0], lines[1:]
            # Messages hold user text such as "[5]": print them literally, never as rich markup.
            err_console.print(Text("error: ", style="bold red") + Text(head), highlight=False)
            for line in rest:
                err_console.print(Text(f"  {line}"), highlight=False)
            sys.exit(code)

    return wrapper
