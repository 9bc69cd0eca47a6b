"""`safe prepare`: build or load the foundation models and print how good they are."""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional

import typer

from ..tables import ReportTable
from .common import ProfileOption, SetOption, console, handle_errors, resolve_profile


@handle_errors
def prepare(
    profile: str = ProfileOption,
    set_: Optional[List[str]] = SetOption,
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the profile's training.device)."),
) -> None:
    """Pretrain (or find in the cache) the built-in tiny LLaVA and tiny Whisper, then measure them.

    The tiny models are pretrained on the profile's AV-digits source: the LLaVA on the VL and
    text questions, the Whisper encoder on spoken-digit recognition (its head discarded). They
    are cached under $SAFE_CACHE_DIR (else $XDG_CACHE_HOME/safe, else ~/.cache/safe) by a hash
    of their config, their pretraining settings and the data's content, so a second run only
    loads them. Real-model profiles (hf-llava, whisper, ...) are loaded as they are.

    Reports the frozen base's accuracy per task on the test split (audio questions without
    audio: the base cannot hear, so these sit at chance) and a linear-probe digit accuracy of
    the frozen audio encoder.

    Examples:

        safe prepare

        SAFE_DATA_ROOT=../shared/data safe prepare --profile avdigits --json
    """
    from ..foundation.prepare import prepare as run_prepare
    from ..models import resolve_device

    resolved = resolve_profile(profile, set_)
    report = run_prepare(resolved, resolve_device(device or resolved.training.device))
    if json_output:
        print(json.dumps({"profile": resolved.name, **dataclasses.asdict(report)}, indent=1, sort_keys=True))
        return

    console.print(base_accuracy_table(f"frozen base on the {resolved.data.source} test split "
                                      f"({resolved.data.num_eval} per task)", report.base_accuracy))
    if report.audio_probe_accuracy is not None:
        console.print(f"audio encoder linear probe (spoken digit, test split): {report.audio_probe_accuracy:.1%}")
    for name, path, built in (("base", report.base_path, report.base_built),
                              ("audio encoder", report.audio_encoder_path, report.audio_encoder_built)):
        if path:
            seconds = report.pretraining.get("base" if name == "base" else "audio_encoder", {}).get("wall_seconds")
            how = f"pretrained now in {seconds:.0f} s" if built else f"from the cache (pretraining took {seconds:.0f} s)"
            console.print(f"{name}: {path} ({how})")


def base_accuracy_table(title: str, base_accuracy: dict[str, float]) -> ReportTable:
    table = ReportTable(title=title)
    table.add_text_column("task")
    table.add_number_column("accuracy")
    table.add_text_column("needs")
    needs = {"vl": "image", "text": "nothing", "audio": "audio (base cannot hear)", "av": "image + audio"}
    for task, accuracy in base_accuracy.items():
        table.add_row(task, f"{accuracy:.1%}", needs[task.split("/")[0]])
    return table
