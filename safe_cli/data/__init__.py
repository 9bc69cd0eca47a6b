"""Data: manifests, audio decoding, answer scoring and the built-in AV-digits benchmark."""
