"""`safe distill-policy` (= `safe train --stage c`): the Stage B policy as a deployable, calibrated gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import SafeError
from .common import SetOption, console, handle_errors, resolve_profile


def run_stage_c(profile, variant: Optional[str], seed: Optional[int], run_dir: Optional[str], device: Optional[str],
                json_output: bool) -> None:
    from ..training.stage_c import distill_policy as distill
    from .train import strategy_table

    result = distill(profile, variant=variant, seed=seed, run_dir=run_dir, device=device)
    summary = result.summary()
    if json_output:
        print(json.dumps({"stage_dir": str(result.stage_dir), **summary}, indent=1, sort_keys=True))
        return
    calibration = result.calibration
    gate = result.gate
    console.print(strategy_table(f"stage C, {result.variant}, seed {result.seed}: examples with a clip, test split",
                                 [p for p in result.strategies if p["kind"] != "gate-curve"]))
    met = "met" if calibration["target_met"] else "NOT met (the most accurate threshold was kept)"
    console.print(f"gate: {gate['budget_on']} tokens when p(audio) >= {gate['threshold']:.3f}; calibrated for "
                  f"{calibration['target']} {calibration['target_value']:g} on {calibration['validation_examples']} "
                  f"validation examples: {met}; agrees with the policy on {calibration['distill_agreement']:.1%} "
                  "of training states")
    console.print(f"deployment artifact: {result.stage_dir}/gate.safetensors + gate.json (load with "
                  "safe_cli.deploy.AudioGate.load)")


def _run_folder(run: str) -> tuple[str, Optional[str], Optional[int], Optional[str]]:
    """RUN_DIR -> (run folder, variant, seed, profile path) from its Stage A."""
    from ..training import run_dir as layout

    path = Path(run).expanduser()
    if path.name in layout.STAGE_FOLDERS.values():  # a stage folder given: its run is the parent
        path = path.parent
    stage_a = layout.stage_dir(path, "a")
    if not (stage_a / layout.PROFILE_FILE).is_file():
        raise SafeError(f"RUN_DIR: {path} is not a SAFE run (no {stage_a / layout.PROFILE_FILE})")
    summary_path = stage_a / layout.SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return str(path), summary.get("variant"), summary.get("seed"), str(stage_a / layout.PROFILE_FILE)


@handle_errors
def distill_policy(
    run: str = typer.Argument(..., metavar="RUN_DIR", help="A run folder with finished stages A and B."),
    profile: Optional[str] = typer.Option(
        None, "--profile", "-p", help="Profile (default: the profile.yaml the run's Stage A saved)."),
    set_: Optional[List[str]] = SetOption,
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the profile's training.device)."),
    json_output: bool = typer.Option(False, "--json", help="Print the stage's summary as one JSON object."),
) -> None:
    """Distil the Stage B policy into a light gate, calibrate its threshold, export it for deployment.

    The gate (an MLP of training.stage_c.hidden_size over the policy's state: the base's hidden
    state and confidence, the clip's length and energy) learns the policy's probability of
    giving audio. Its threshold is calibrated on validation examples (fresh pairings of the
    training split) for training.stage_c.target: "accuracy" keeps target_value of the policy's
    accuracy with the least audio; "audio_usage" gives audio to about target_value of the
    examples with a clip. Writes `<run>/stage-c/gate.safetensors` + gate.json (load them with
    safe_cli.deploy.AudioGate.load) and a summary comparing always-k, the oracle, the policy and
    the gate on the test split. `safe eval-retention RUN_DIR` then evaluates with the gate.

    Exit codes: 0 done; 1 the run failed; 2 bad input (e.g. no finished Stage B).

    Examples:

        safe distill-policy runs/demo/soft_retention/seed-0

        safe distill-policy runs/avdigits/full_retention/seed-1 \\
            --set training.stage_c.target=audio_usage \\
            --set training.stage_c.target_value=0.5
    """
    folder, variant, seed, saved_profile = _run_folder(run)
    resolved = resolve_profile(profile or saved_profile, set_)
    run_stage_c(resolved, variant=variant, seed=seed, run_dir=folder, device=device, json_output=json_output)
