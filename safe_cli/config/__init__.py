"""Profiles: schema, built-in retention variants, loading and validation."""

from .loader import Issue, ProfileError, builtin_profiles, dump_profile, load_profile
from .schema import Profile, RetentionVariant
from .variants import BUILTIN_VARIANTS, resolve_variants

__all__ = [
    "BUILTIN_VARIANTS",
    "Issue",
    "Profile",
    "ProfileError",
    "RetentionVariant",
    "builtin_profiles",
    "dump_profile",
    "load_profile",
    "resolve_variants",
]
