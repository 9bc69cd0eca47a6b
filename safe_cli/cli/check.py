"""`safe check`: load a profile's models and prove the bypass on a mixed-budget batch."""

from __future__ import annotations

import time
from typing import List, Optional

import typer

from ..errors import RunFailed
from ..tables import key_value_table
from .common import ProfileOption, SetOption, console, handle_errors, resolve_profile


def _count(params) -> int:
    return sum(p.numel() for p in params)


@handle_errors
def check(
    profile: str = ProfileOption,
    set_: Optional[List[str]] = SetOption,
    batch_size: int = typer.Option(8, min=2, help="Rows in the probe batch (half of them budget 0)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the profile's training.device)."),
) -> None:
    """Load the base, audio encoder, projector and fusion of a profile; check the bit-exact bypass.

    Adapters are given non-zero gates and LoRA weights first, so rows with audio really change
    and budget-0 rows must still equal the base's own forward bit for bit. Exit 1 if not.

    Example:

        safe check --profile demo
    """

    from ..models import build_safe_model, resolve_device
    from ..models.bypass import check_bypass, perturb_adapters

    resolved = resolve_profile(profile, set_)
    target = resolve_device(device or resolved.training.device)
    started = time.perf_counter()
    with console.status(f"loading {resolved.base.kind} + {resolved.audio_encoder.kind} ..."):
        model = build_safe_model(resolved, target)
    load_seconds = time.perf_counter() - started
    perturb_adapters(model)
    positive = [b for b in resolved.policy.token_budgets if b > 0]
    budgets = [0 if i % 2 == 0 else positive[(i // 2) % len(positive)] for i in range(batch_size)]
    result = check_bypass(model, budgets, seed=resolved.seed)

    rows = [("base", f"{resolved.base.kind}: {model.base.num_layers} LLM layers, hidden {model.base.hidden_size}"),
            ("base parameters (frozen)", f"{_count(model.base_model.parameters()):,}")]
    encoder = model.audio_encoder
    rows.append(("audio encoder (frozen)", f"{resolved.audio_encoder.kind}: {_count(encoder.parameters()):,} params, "
                 f"features {encoder.feature_dim}-d at {encoder.sample_rate} Hz"))
    rows.append(("trainable: projector", f"{_count(p for p in model.projector.parameters() if p.requires_grad):,}"))
    rows.append(("trainable: fusion", f"{_count(p for p in model.fusion.parameters() if p.requires_grad):,} "
                 f"(layers {model.fusion.layers}, LoRA: {model.fusion.uses_lora})"))
    prompt = model.base.prompt_format
    if prompt is not None:  # what a real checkpoint is asked, and where its answers end: check them by eye
        rows.append(("prompt", f"{prompt.name}: {prompt.describe()!r}"))
        tokens = model.base.processor.tokenizer.convert_ids_to_tokens(model.base.end_ids)
        rows.append(("end of answer ids", ", ".join(f"{i} ({t!r})" for i, t in zip(model.base.end_ids, tokens))))
    # Fingerprints are compared by eye: the table folds a long value onto the next line, never cuts it short.
    rows.append(("base fingerprint", model.base_fingerprint()))
    rows.append(("load time", f"{load_seconds:.1f} s on {target}"))
    rows.append(("probe budgets", str(budgets)))
    verdict = "[green]bit-exact[/]" if result.bit_exact else "[bold red]NOT exact[/]"
    rows.append(("bypass (budget 0 rows)", f"{verdict}, max |Δlogit| = {result.max_abs_logit_diff:g} "
                 f"over {result.n_bypass_rows} rows"))
    rows.append(("audio rows", f"max |Δlogit| = {result.audio_rows_max_diff:.4g} over {result.n_audio_rows} rows"))
    console.print(key_value_table(f"safe check: {resolved.name}", rows))
    if not result.bit_exact:
        raise RunFailed("bypass is not bit-exact: budget-0 rows differ from the base's own forward")
    if result.audio_rows_max_diff == 0.0:
        raise RunFailed("rows with audio equal the base although the adapters were perturbed: fusion is not applied")
