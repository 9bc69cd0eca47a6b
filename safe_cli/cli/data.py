"""`safe data export avdigits`: the built-in benchmark as manifests and files, to train from or read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import ProfileOption, SetOption, console, handle_errors, resolve_profile

data_app = typer.Typer(help="Data tools: export the built-in AV-digits benchmark as manifests.\n\n"
                            "Run `safe data export --help` for its options and more examples.\n\n"
                            "Example:\n\n    safe data export avdigits --out avdigits-export",
                       no_args_is_help=True)


@data_app.command("export")
@handle_errors
def export(
    dataset: str = typer.Argument(..., help="What to export: avdigits (the profile's AV-digits source)."),
    out: Path = typer.Option(..., "--out", help="Folder to write train.jsonl, validation.jsonl, test.jsonl and "
                             "their images/ and audio/ into."),
    profile: str = ProfileOption,
    set_: Optional[List[str]] = SetOption,
    json_output: bool = typer.Option(False, "--json", help="Print the written manifests as JSON."),
) -> None:
    """Write the profile's AV-digits benchmark as manifests, exactly the records the built-in path reads.

    train.jsonl holds the audio/AV questions and the VL/text questions with their distractor clip;
    validation.jsonl fresh pairings (seed + 1) for Stage C's calibration; test.jsonl every question
    family with and without a clip. Images are PNG; synthetic clips 32-bit float WAV (the samples
    exactly), FSDD clips are referenced where they lie. Training from the export with the same seed
    and steps gives the same metrics as the built-in source (tests/test_data_path.py).

    Examples:

        safe data export avdigits --out avdigits-export

        SAFE_DATA_ROOT=../shared/data safe data export avdigits --profile avdigits \\
            --out fsdd-export

        safe train --stage a --set data.source=manifest \\
            --set data.train_manifests=[avdigits-export/train.jsonl] \\
            --set data.validation_manifests=[avdigits-export/validation.jsonl] \\
            --set data.eval_manifests=[avdigits-export/test.jsonl]
    """
    from ..data import avdigits
    from ..data.manifest import read_manifest
    from ..errors import SafeError

    if dataset != "avdigits":
        raise SafeError(f"DATASET: unknown dataset {dataset!r}; the one built in is avdigits")
    resolved = resolve_profile(profile, set_)
    data = resolved.data
    if data.source not in ("synthetic", "fsdd-mnist"):
        raise SafeError(f"data.source: {data.source!r} is not an AV-digits source; export reads synthetic or "
                        "fsdd-mnist (--set data.source=synthetic)")
    if out.exists() and any(out.iterdir()):
        raise SafeError(f"--out: {out} is not empty; export writes into an empty or new folder")
    root = str(avdigits.check_data_root(data.root)) if data.source == "fsdd-mnist" else None
    with console.status(f"exporting AV-digits ({data.source}) to {out}"):
        paths = avdigits.export(out, data.source, root, data.split, tuple(data.held_out_speakers), resolved.seed,
                                data.num_train, data.num_eval)
    summary = {split: {"manifest": str(path), "records": len(read_manifest(path, check_files=False))}
               for split, path in paths.items()}
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    for split, entry in summary.items():
        console.print(f"{split:>10}: {entry['records']:>6} records  {entry['manifest']}", highlight=False)
    console.print(f"[green]ok[/]: AV-digits ({data.source}) exported to {out}", highlight=False)
