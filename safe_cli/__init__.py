"""SAFE: audio understanding around a frozen vision-language model, with a bit-exact bypass."""

__version__ = "0.1.0"
