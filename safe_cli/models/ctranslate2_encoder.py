"""Whisper's encoder run by CTranslate2 (``audio_encoder.whisper.backend: ctranslate2``).

The same model as :class:`~safe_cli.models.audio_encoders.WhisperEncoder` loaded from a
CTranslate2 folder (faster-whisper's format): the log-mel, the 30 s window or ``trim_to_clip``
lengths, the masks and the weight fingerprint are that class's; only the encoder's forward is
CTranslate2's ``Whisper.encode``, in ``compute_type`` (int8 quantises the weights when the model
is loaded). Measured by ``bench/ctranslate2_encoder.py`` (one CPU thread, tiny.en, 2026-12-04,
2-core AMD EPYC): int8 encodes trimmed clips at 3.23x openai-whisper's clips/s and the faithful
30 s window at 1.14x, with the same linear-probe accuracy; it pays mostly with ``--trim``. int8
features are not float32's (up to 11 apart), so the cache keys them apart (``ct2-int8`` in the
encoder's fingerprint) and a profile must name the same backend to read them back.

The converted openai-whisper encoder is kept too: its weights give the fingerprint and its
dimensions the memory and compute estimates.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from ..errors import SafeError
from .audio_encoders import WhisperEncoder

KEY = "audio_encoder.whisper.backend"


class CTranslate2WhisperEncoder(WhisperEncoder):
    def __init__(self, folder: str, encoder: torch.nn.Module, n_mels: int, compute_type: str,
                 device: Union[str, torch.device] = "cpu", trim_to_clip: bool = False):
        super().__init__(encoder, n_mels, trim_to_clip)
        try:
            import ctranslate2
        except ImportError as exc:
            raise SafeError(f"{KEY}: ctranslate2 is not installed (pip install ctranslate2)") from exc
        self._views = ctranslate2.StorageView
        self.compute_type = compute_type
        device = torch.device(device)
        try:
            self._model = ctranslate2.models.Whisper(
                folder, device=device.type, device_index=device.index or 0, compute_type=compute_type,
                intra_threads=torch.get_num_threads())
        except (RuntimeError, ValueError) as exc:  # e.g. a compute type this CPU or build lacks
            raise SafeError(f"{KEY}: CTranslate2 cannot load {folder} with compute_type {compute_type}: {exc}") \
                from exc

    @classmethod
    def load(cls, name_or_path: str, compute_type: str, device: Union[str, torch.device] = "cpu",
             trim_to_clip: bool = False) -> "CTranslate2WhisperEncoder":
        from .ctranslate2_whisper import is_ctranslate2_folder, load_ctranslate2_whisper
        from .package_paths import resolve_package_path

        folder = resolve_package_path(name_or_path, "audio_encoder.whisper.name_or_path")
        if not is_ctranslate2_folder(folder):
            raise SafeError(f"{KEY}: ctranslate2 needs audio_encoder.whisper.name_or_path to be a CTranslate2 "
                            f"Whisper folder (model.bin), not {name_or_path!r}")
        model = load_ctranslate2_whisper(folder, "cpu")
        return cls(folder, model.encoder, model.dims.n_mels, compute_type, device, trim_to_clip)

    @property
    def variant(self) -> str:
        trim = super().variant
        return f"ct2-{self.compute_type}" + (f"+{trim}" if trim else "")

    def _run(self, mel: torch.Tensor) -> torch.Tensor:
        view = self._views.from_array(np.ascontiguousarray(mel.detach().float().cpu().numpy()))
        return torch.from_numpy(np.array(self._model.encode(view, to_cpu=True))).to(mel.device)

    def _encode_window(self, mel: torch.Tensor) -> torch.Tensor:
        return self._run(mel)

    def _encode_positions(self, mel: torch.Tensor) -> torch.Tensor:
        # CTranslate2 adds the first T rows of the position encodings for a T-position input itself.
        return self._run(mel)
