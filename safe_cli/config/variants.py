"""The seed's five retention variants, and how a profile adds or overrides its own.

The KL weight is 3.0, not the seed's 0.2. With 0.2 the answer loss outweighed retention: on
avdigits (1,500 steps, 3 seeds) every retention variant regressed VL/text questions with a
distractor clip by 4-6 points on average (soft_retention seed 1: -2.5, -1.0, -10.5, -10.0).
At 3.0 (seeds 1-3) soft and full retention keep every such task within 0.5 points of the
base on average, fisher and nullspace are at -0.7 on one task each (200 examples a task, so
0.5 points is one example), with spoken digits at 94.5-98.5%.
Scaling the whole retention loss instead (retention_loss_weight 15) also scaled the Fisher
penalty and cost fisher_retention 16 points of spoken-digit accuracy, so only the KL moved.
"""

from __future__ import annotations

from typing import Optional

from .schema import RetentionVariant

BUILTIN_VARIANTS: dict[str, RetentionVariant] = {
    "no_retention": RetentionVariant(
        description="No retention terms: the adapter is trained on audio tasks only.",
        retention_loss_weight=0.0,
    ),
    "soft_retention": RetentionVariant(
        description="KL distillation (weight 3.0) to the frozen base on retention batches.",
        distillation_weight=3.0,
    ),
    "fisher_retention": RetentionVariant(
        description="KL distillation plus a diagonal-Fisher (EWC) penalty.",
        distillation_weight=3.0,
        fisher_weight=0.1,
    ),
    "nullspace_retention": RetentionVariant(
        description="KL distillation plus null-space gradient projection.",
        distillation_weight=3.0,
        enable_null_space=True,
        null_space_rank=8,
        null_space_min_samples=128,
        null_space_refresh_interval=4000,
    ),
    "full_retention": RetentionVariant(
        description="KL distillation, Fisher penalty and null-space projection together.",
        distillation_weight=3.0,
        fisher_weight=0.1,
        enable_null_space=True,
        null_space_rank=8,
        null_space_min_samples=128,
        null_space_refresh_interval=4000,
    ),
}


class VariantError(ValueError):
    """A variant that cannot be resolved; ``key`` is the profile key path at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def resolve_variants(custom: dict[str, RetentionVariant]) -> dict[str, RetentionVariant]:
    """Built-ins merged with a profile's own variants, each ``extends`` chain followed.

    A custom variant only states what differs: fields it sets explicitly override the variant
    it extends (or the built-in of the same name); the rest are inherited.
    """
    resolved = dict(BUILTIN_VARIANTS)

    def resolve(name: str, chain: tuple[str, ...]) -> RetentionVariant:
        if name in chain:
            raise VariantError(
                f"retention.variants.{name}.extends", f"cycle in extends: {' -> '.join(chain + (name,))}"
            )
        if name not in custom:
            return resolved[name]
        spec = custom[name]
        parent_name = spec.extends or (name if name in BUILTIN_VARIANTS else None)
        if parent_name is None:
            parent = RetentionVariant()
        elif parent_name == name and name in BUILTIN_VARIANTS:
            parent = BUILTIN_VARIANTS[name]
        elif parent_name in custom or parent_name in BUILTIN_VARIANTS:
            parent = resolve(parent_name, chain + (name,))
        else:
            raise VariantError(
                f"retention.variants.{name}.extends",
                f"unknown variant {parent_name!r} (known: {', '.join(sorted(set(resolved) | set(custom)))})",
            )
        overrides = spec.model_dump(include=spec.model_fields_set - {"extends"})
        return parent.model_copy(update=overrides | {"extends": None})

    for name in custom:
        resolved[name] = resolve(name, ())
    return resolved


def resolve_variant(profile, name: Optional[str]) -> tuple[str, RetentionVariant]:
    """The variant a command runs: ``name`` (--variant) or the profile's default, resolved.

    Errors are SafeErrors naming the key (exit 2): a broken ``extends`` chain, an unknown name.
    """
    from ..errors import SafeError

    try:
        variants = resolve_variants(profile.retention.variants)
    except VariantError as exc:
        raise SafeError(f"{exc.key}: {exc}") from None
    name = name or profile.retention.default_variant
    if name not in variants:
        raise SafeError(f"--variant: unknown variant {name!r}; known: {', '.join(sorted(variants))}")
    return name, variants[name]

