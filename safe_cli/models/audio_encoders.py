"""Frozen audio encoders: openai-whisper's encoder, CLAP's audio tower, or both.

Every encoder takes a list of mono waveforms at its own ``sample_rate`` (1-D float arrays or
tensors, any lengths) and returns features of shape (B, T, D):

    whisper                 (B, 1500, d_model)             whisper's 30 s window, 20 ms frames
    tiny-whisper            (B, 50 * window, d_model)      the same frames over a shorter window
    clap                    (B, 32, 768)                    HTSAT's time steps over its 10 s window
    both                    (B, 1500, d_model + proj_dim)   the pooled CLAP embedding joined to every frame

Whisper encoders trimmed to the clip (``trim_to_clip``) return (B, T, ...) instead, T the
batch's longest clip rounded up to whole seconds (see :class:`WhisperEncoder`);
``feature_lengths`` says how many leading rows belong to each clip and ``frame_mask`` which of
them cover audio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import AudioEncoderConfig
from ..errors import SafeError
from .fingerprint import fingerprint_module
from .sources import pretrained_source

Waveform = Union[np.ndarray, torch.Tensor]
WHISPER_SAMPLE_RATE = 16_000


def _as_tensor(wave: Waveform) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not torch.is_tensor(wave) else wave)
    if tensor.dim() != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {tuple(tensor.shape)}")
    return tensor.float()


class AudioEncoder(nn.Module):
    """Base class: frozen, eval mode, no gradients."""

    sample_rate: int
    feature_dim: int

    def freeze(self) -> "AudioEncoder":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "AudioEncoder":
        return super().train(False)  # frozen: dropout and the like stay off, whatever the caller says

    variant: str = ""  # a setting that changes the features without changing a weight

    def fingerprint(self) -> str:
        """A hash of every weight, plus the :attr:`variant` when there is one."""
        weights = fingerprint_module(self)
        return f"{weights}+{self.variant}" if self.variant else weights

    def feature_lengths(self, waves: Sequence[Waveform]) -> Optional[list[int]]:
        """How many leading rows of ``self(waves)[i]`` are clip i's features; None: all of them."""
        return None

    def batch_mask(self, waves: Sequence[Waveform]) -> Optional[torch.Tensor]:
        """(B, T) bool, True on the rows of ``self(waves)`` that are each clip's own features
        (:meth:`feature_lengths`); None when every row is (all clips of the batch as long).

        This is the mask ``features.lookup.stack_features`` gives clips read from a cache, so
        features computed on the fly and read from the cache reach the projector alike.
        """
        lengths = self.feature_lengths(waves)
        if lengths is None or len(set(lengths)) <= 1:
            return None
        return torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def whisper_log_mel(
    waves: Sequence[Waveform], n_mels: int, device: torch.device, n_samples: int = 480_000
) -> torch.Tensor:
    """Whisper's log-mel of each clip padded or cut to ``n_samples`` (30 s), as one batch (B, n_mels, frames).

    Equal to ``whisper.log_mel_spectrogram(whisper.pad_or_trim(clip, n_samples))`` per clip
    (``n_samples // 160`` frames); whisper's own function clamps against the maximum of the
    whole batch, so batching it directly would make a clip's features depend on its neighbours.
    """
    import whisper

    audio = torch.stack([whisper.pad_or_trim(_as_tensor(w), n_samples) for w in waves]).to(device)
    window = torch.hann_window(whisper.audio.N_FFT, device=device)
    stft = torch.stft(audio, whisper.audio.N_FFT, whisper.audio.HOP_LENGTH, window=window, return_complex=True)
    mel = whisper.audio.mel_filters(device, n_mels) @ (stft[..., :-1].abs() ** 2)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def whisper_positions(window_seconds: float) -> int:
    """Encoder positions for a window: 100 mel frames a second, halved by the second conv."""
    return max(1, round(window_seconds * 50))


TRIM_STEP_POSITIONS = 50  # trim_to_clip rounds a clip's length up to whole seconds (50 positions)


class WhisperEncoder(AudioEncoder):
    """The encoder half of an openai-whisper model (the text decoder is dropped).

    Faithful (the default): every clip is padded or cut to the model's window (whisper's 30 s,
    1500 positions) exactly as whisper does, and the features are (B, 1500, D) whatever the
    clip's length.

    ``trim_to_clip=True``: each clip is padded only to its own length rounded up to
    ``trim_step`` positions (50 = 1 s; at most the window), its log-mel computed over that
    length, and whisper's encoder run with the first T rows of its positional embedding. The
    features differ from the faithful ones: whisper attends over all 1500 positions, padding
    included, and was trained that way. Clips of a batch that round to different lengths are
    encoded in separate forwards, so a clip's features never depend on its neighbours; the
    batch's output is (B, T_max, D) with the rows past a clip's own length set to zero
    (:meth:`feature_lengths` gives each clip's length, :meth:`frame_mask` its audio frames).
    """

    sample_rate = WHISPER_SAMPLE_RATE

    def __init__(self, encoder: nn.Module, n_mels: int, trim_to_clip: bool = False,
                 trim_step: int = TRIM_STEP_POSITIONS):
        super().__init__()
        if trim_step < 1:
            raise ValueError(f"trim_step must be >= 1, got {trim_step}")
        self.encoder = encoder
        self.n_mels = n_mels
        self.feature_dim = encoder.ln_post.normalized_shape[0]
        # The window follows the model: 1500 positions = whisper's 30 s; a built-in tiny encoder
        # may have a shorter one. Two mel frames (hop 160) per position.
        self.num_frames = encoder.positional_embedding.shape[0]
        self.window_samples = self.num_frames * 2 * 160
        self.trim_to_clip = bool(trim_to_clip)
        self.trim_step = int(trim_step)
        self.freeze()

    @property
    def variant(self) -> str:
        return f"trim{self.trim_step}" if self.trim_to_clip else ""

    @classmethod
    def load(cls, name_or_path: str, device: Union[str, torch.device] = "cpu",
             trim_to_clip: bool = False) -> "WhisperEncoder":
        """``whisper.load_model`` by name (downloads to whisper's cache), from a local ``.pt`` file, or
        from a CTranslate2 Whisper folder (faster-whisper's format: converted once, cached)."""
        import whisper

        from .ctranslate2_whisper import is_ctranslate2_folder, load_ctranslate2_whisper
        from .package_paths import resolve_package_path

        name_or_path = resolve_package_path(name_or_path, "audio_encoder.whisper.name_or_path")
        if is_ctranslate2_folder(name_or_path):
            model = load_ctranslate2_whisper(name_or_path, device)
            return cls(model.encoder, model.dims.n_mels, trim_to_clip)
        is_name = name_or_path in whisper.available_models()
        if not is_name and not Path(name_or_path).expanduser().is_file():
            raise SafeError(f"audio_encoder.whisper.name_or_path: whisper checkpoint not found: {name_or_path} (a "
                            "whisper model name, a .pt file or a CTranslate2 folder with model.bin)")
        try:
            model = whisper.load_model(
                name_or_path if is_name else str(Path(name_or_path).expanduser()), device=str(device)
            )
        except (RuntimeError, OSError, KeyError, ValueError) as exc:
            raise SafeError(f"audio_encoder.whisper.name_or_path: cannot load {name_or_path!r}: {exc}") from exc
        return cls(model.encoder, model.dims.n_mels, trim_to_clip)

    @classmethod
    def tiny(cls, state: int, layers: int, heads: int, seed: int = 0, window_seconds: float = 30.0,
             trim_to_clip: bool = False) -> "WhisperEncoder":
        """A whisper-architecture encoder of the given size (random init; ``safe prepare`` pretrains one)."""
        from whisper.model import AudioEncoder as WhisperAudioEncoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = WhisperAudioEncoder(
                n_mels=80, n_ctx=whisper_positions(window_seconds), n_state=state, n_head=heads, n_layer=layers
            )
        return cls(encoder, 80, trim_to_clip)

    def log_mel(self, waves: Sequence[Waveform]) -> torch.Tensor:
        """The faithful log-mel: every clip padded or cut to the window."""
        return whisper_log_mel(waves, self.n_mels, self.device, self.window_samples)

    def _clip_positions(self, waves: Sequence[Waveform]) -> torch.Tensor:
        """Encoder positions covering each clip (cut to the window): ceil(samples / 320), at least 1."""
        lengths = torch.tensor([min(len(w), self.window_samples) for w in waves])
        return torch.clamp(torch.div(lengths + 319, 320, rounding_mode="floor"), min=1)

    def feature_lengths(self, waves: Sequence[Waveform]) -> list[int]:
        """Rows of the output that belong to each clip: the window, or (trimmed) the clip's
        positions rounded up to ``trim_step``, at most the window."""
        if not self.trim_to_clip:
            return [self.num_frames] * len(waves)
        step = self.trim_step
        return [min(self.num_frames, -(-int(n) // step) * step) for n in self._clip_positions(waves)]

    def frame_mask(self, waves: Sequence[Waveform]) -> torch.Tensor:
        """(B, T) bool, True on the frames that cover the clip rather than padding; T is the
        output's length (the window, or trimmed the longest clip's :meth:`feature_lengths`)."""
        width = max(self.feature_lengths(waves)) if self.trim_to_clip else self.num_frames
        return torch.arange(width)[None, :] < self._clip_positions(waves)[:, None]

    def _encode_window(self, mel: torch.Tensor) -> torch.Tensor:
        """whisper's own ``AudioEncoder.forward`` over the full window's log-mel."""
        return self.encoder(mel)

    def _encode_positions(self, mel: torch.Tensor) -> torch.Tensor:
        """whisper's ``AudioEncoder.forward`` over 2T mel frames, with the first T positional rows.

        whisper's own forward asserts the full window; this is the same computation otherwise.
        """
        enc = self.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x))
        x = x.permute(0, 2, 1)
        x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in enc.blocks:
            x = block(x)
        return enc.ln_post(x)

    def forward(self, waves: Sequence[Waveform]) -> torch.Tensor:
        dtype = next(self.encoder.parameters()).dtype
        if not self.trim_to_clip:
            return self._encode_window(self.log_mel(waves).to(dtype))
        lengths = self.feature_lengths(waves)
        out: Optional[torch.Tensor] = None
        for length in sorted(set(lengths)):  # one forward per rounded length: no clip sees another's padding
            rows = [i for i, n in enumerate(lengths) if n == length]
            mel = whisper_log_mel([waves[i] for i in rows], self.n_mels, self.device, length * 320)
            features = self._encode_positions(mel.to(dtype))
            if out is None:
                out = features.new_zeros(len(waves), max(lengths), features.shape[-1])
            out[rows, :length] = features
        return out


def clap_frame_shape(audio_config) -> tuple[int, int]:
    """(time steps, width) of the HTSAT audio tower's last feature map, before it is pooled.

    HTSAT folds the 1,024 x 64 mel window into a 256 x 256 image (``freq_ratio`` = 4 time
    chunks stacked on the frequency axis), patches it at ``patch_stride`` and halves it at each
    stage after the first. Its last map, (width, 2, 32) for laion's CLAP, is unfolded back into
    time by ``ClapAudioEncoder``: 32 steps of about 0.31 s, 768 wide.
    """
    stages = len(audio_config.depths)
    side = audio_config.spec_size // 2 ** (stages - 1) // audio_config.patch_stride[0]
    freq_ratio = audio_config.spec_size // audio_config.num_mel_bins
    bins = side // freq_ratio  # frequency bins left per time chunk
    width = int(audio_config.patch_embeds_hidden_size * 2 ** (stages - 1))
    return (side // bins) * side, width


class ClapEncoder(AudioEncoder):
    """The audio tower of a transformers ``ClapModel``, time-resolved: (B, time steps, width).

    CLAP's own embedding is one pooled, L2-normalised vector per clip; k projector tokens read
    from one vector would all be functions of it, and budgets 4, 8 and 12 would cost more for no
    more information. So the encoder returns the tower's last feature map before pooling,
    averaged over its frequency bins: one vector per ~0.31 s of the 10 s window (the
    ``embedding`` method still gives the pooled vector).
    """

    sample_rate = 48_000
    variant = "frames"  # the features are the tower's time steps, not the pooled embedding

    def __init__(self, model: nn.Module, feature_extractor):
        super().__init__()
        self.model = model
        self.feature_extractor = feature_extractor
        self.frames, self.feature_dim = clap_frame_shape(model.config.audio_config)
        self.projection_dim = model.config.projection_dim
        # Unfused checkpoints take one mel channel; "fusion" truncation makes four.
        self.truncation = "fusion" if model.config.audio_config.enable_fusion else "rand_trunc"
        self.max_samples = int(feature_extractor.nb_max_samples)
        self.freeze()

    @classmethod
    def load(cls, name_or_path: str, device: Union[str, torch.device] = "cpu") -> "ClapEncoder":
        from transformers import AutoFeatureExtractor, ClapModel

        source = pretrained_source(name_or_path, "audio_encoder.clap.name_or_path")
        try:
            model = ClapModel.from_pretrained(source)
            extractor = AutoFeatureExtractor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise SafeError(f"audio_encoder.clap.name_or_path: cannot load {name_or_path!r}: {exc}") from exc
        return cls(model.to(device), extractor)

    def _inputs(self, waves: Sequence[Waveform]) -> dict:
        # Cut to the extractor's window ourselves: "rand_trunc" would otherwise crop at random.
        clips = [_as_tensor(w)[: self.max_samples].numpy() for w in waves]
        inputs = self.feature_extractor(
            clips, sampling_rate=self.sample_rate, return_tensors="pt", truncation=self.truncation
        )
        features = inputs["input_features"].to(self.device, dtype=next(self.model.parameters()).dtype)
        kwargs = {"is_longer": inputs["is_longer"].to(self.device)} if self.truncation == "fusion" else {}
        return {"input_features": features, **kwargs}

    def forward(self, waves: Sequence[Waveform]) -> torch.Tensor:
        feature_map = self.model.audio_model(**self._inputs(waves)).last_hidden_state  # (B, width, freq, time)
        return feature_map.mean(2).transpose(1, 2)

    def embedding(self, waves: Sequence[Waveform]) -> torch.Tensor:
        """CLAP's own clip embedding: pooled, projected, L2-normalised, (B, projection_dim)."""
        output = self.model.get_audio_features(**self._inputs(waves))
        return output if torch.is_tensor(output) else output.pooler_output  # a tensor before transformers 5


class WhisperClapEncoder(AudioEncoder):
    """Whisper frames with the clip's CLAP embedding concatenated to each frame."""

    sample_rate = WHISPER_SAMPLE_RATE

    def __init__(self, whisper_encoder: WhisperEncoder, clap_encoder: ClapEncoder):
        super().__init__()
        self.whisper = whisper_encoder
        self.clap = clap_encoder
        self.feature_dim = whisper_encoder.feature_dim + clap_encoder.projection_dim
        self.freeze()

    @property
    def variant(self) -> str:
        return self.whisper.variant

    def feature_lengths(self, waves: Sequence[Waveform]) -> list[int]:
        return self.whisper.feature_lengths(waves)

    def forward(self, waves: Sequence[Waveform]) -> torch.Tensor:
        from scipy.signal import resample_poly

        frames = self.whisper(waves)
        ratio = ClapEncoder.sample_rate // WHISPER_SAMPLE_RATE
        upsampled = [resample_poly(_as_tensor(w).numpy(), ratio, 1).astype(np.float32) for w in waves]
        pooled = self.clap.embedding(upsampled).to(frames.dtype)[:, None]
        return torch.cat([frames, pooled.expand(-1, frames.shape[1], -1)], dim=-1)


def load_audio_encoder(
    cfg: AudioEncoderConfig, device: Union[str, torch.device] = "cpu", seed: Optional[int] = 0
) -> AudioEncoder:
    """Build the profile's audio encoder, frozen (``whisper.trim_to_clip`` applies to every whisper kind)."""
    trim = cfg.whisper.trim_to_clip
    if cfg.kind == "tiny-whisper":
        encoder = WhisperEncoder.tiny(
            cfg.tiny_state, cfg.tiny_layers, cfg.tiny_heads, seed or 0, cfg.tiny_window_seconds, trim
        ).to(device)
    elif cfg.kind == "whisper" and cfg.whisper.backend == "ctranslate2":
        from .ctranslate2_encoder import CTranslate2WhisperEncoder

        encoder = CTranslate2WhisperEncoder.load(cfg.whisper.name_or_path, cfg.whisper.compute_type, device, trim)
    elif cfg.kind == "whisper":
        encoder = WhisperEncoder.load(cfg.whisper.name_or_path, device, trim)
    elif cfg.kind == "clap":
        encoder = ClapEncoder.load(cfg.clap.name_or_path, device)
    else:
        encoder = WhisperClapEncoder(WhisperEncoder.load(cfg.whisper.name_or_path, device, trim),
                                     ClapEncoder.load(cfg.clap.name_or_path, device))
    return cast_frozen_encoder(encoder, getattr(torch, cfg.dtype)) if cfg.dtype != "float32" else encoder


def cast_frozen_encoder(encoder: AudioEncoder, dtype: torch.dtype) -> AudioEncoder:
    """The encoder's weights in ``dtype``; each encoder casts its log-mel / CLAP features to them.

    whisper's LayerNorm normalises in float32 (``x.float()``) and casts back; its weights stay
    float32 here, which CUDA and CPU kernels both accept (a bfloat16 weight with a float32 input
    is refused on the CPU).
    """
    from whisper.model import LayerNorm as WhisperLayerNorm

    encoder.to(dtype)
    for module in encoder.modules():
        if isinstance(module, WhisperLayerNorm):
            module.float()
    return encoder
