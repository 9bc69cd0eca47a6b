"""SAFE: audio understanding around a frozen vision-language model, with a bit-exact bypass.

``from safe_cli import SAFE`` loads a trained run for inference (``safe_cli/api.py``).
"""

__version__ = "0.1.0"

__all__ = ["SAFE", "__version__"]


def __getattr__(name: str):
    # Lazy: `import safe_cli` (the CLI's entry point) stays free of torch until SAFE is asked for.
    if name == "SAFE":
        from .api import SAFE

        return SAFE
    raise AttributeError(f"module 'safe_cli' has no attribute {name!r}")
