"""Recipes that pretrain the built-in tiny foundation models on AV-digits' unimodal parts.

* ``pretrain_base``: the tiny LLaVA (CLIP-style vision tower + Llama, all weights trained) on
  the VL and text questions, answer tokens only in the loss. It never sees audio questions, so
  like a real VLM it cannot answer them: that is the gap SAFE closes.
* ``pretrain_audio_encoder``: a whisper-architecture encoder with a temporary digit classifier
  on top (mean over the clip's frames, then a linear layer); the classifier is discarded and
  the encoder saved in whisper's own checkpoint format, for ``whisper.load_model``.

Both are plain loops (AdamW, linear warm-up then cosine decay, gradient clipping) with a rich
progress bar; ``safe prepare`` runs them through the content-addressed cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import AudioEncoderConfig, PretrainConfig, TinyLlavaConfig
from ..data.avdigits import DigitClips, DigitImages, Example
from ..data.batches import IGNORE_INDEX, PromptBatcher, Query
from ..progress import progress_bar
from ..training.schedule import warmup_cosine

RECIPE_VERSION = 3  # bump when a recipe changes what it produces: the cache keys include it


def _shift(image: np.ndarray, rng: np.random.Generator, pixels: int = 2) -> np.ndarray:
    """A random translation of up to ``pixels`` (MNIST's 8,000 training images are few for a ViT)."""
    dy, dx = rng.integers(-pixels, pixels + 1, 2)
    padded = np.pad(image, pixels)
    return padded[pixels + dy: pixels + dy + image.shape[0], pixels + dx: pixels + dx + image.shape[1]]


def _shift_pixels(pixels: torch.Tensor, background: torch.Tensor, rng: np.random.Generator, shift: int = 2) -> torch.Tensor:
    """``_shift`` for processed (N, C, H, W) pixel values: pad with the processed black pixel, crop."""
    n, c, h, w = pixels.shape
    padded = background.view(1, c, 1, 1).expand(n, c, h + 2 * shift, w + 2 * shift).clone()
    padded[:, :, shift: shift + h, shift: shift + w] = pixels
    out = torch.empty_like(pixels)
    for i, (dy, dx) in enumerate(rng.integers(-shift, shift + 1, (n, 2))):
        out[i] = padded[i, :, shift + dy: shift + dy + h, shift + dx: shift + dx + w]
    return out


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, parameters, losses: list[float]) -> None:
    """One update of every pretraining loop: backward, clip at 1.0, step, schedule, record."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()
    losses.append(loss.detach().item())


def queries(examples: Sequence[Example], images: DigitImages, rng: Optional[np.random.Generator] = None,
            with_answers: bool = True) -> list[Query]:
    """Examples as the base sees them: question and image only (the base has no ears)."""
    out = []
    for example in examples:
        image = None
        if example.image is not None:
            image = images.images[example.image]
            if rng is not None:
                image = _shift(image, rng)
        out.append(Query(example.question, image, example.answer if with_answers else None))
    return out


@dataclass
class ProcessedImages:
    """Every image through the processor once, and the processed black pixel that pads a shift.

    The processor costs a third of a step when run per batch; the random shift is applied to the
    processed pixels instead. (The image size equals the tower's, so the processor does not
    resize and the two commute: tests/test_prepare.py checks it.)
    """

    pixels: torch.Tensor  # (N, C, H, W)
    background: torch.Tensor  # (C,)

    @classmethod
    def build(cls, processor, images: DigitImages, chunk: int = 1024) -> "ProcessedImages":
        from PIL import Image

        def process(arrays):
            return processor.image_processor([Image.fromarray(a).convert("RGB") for a in arrays],
                                             return_tensors="pt")["pixel_values"]

        pixels = torch.cat([process(images.images[i: i + chunk]) for i in range(0, len(images.labels), chunk)])
        background = process(np.zeros((1,) + images.images.shape[1:], np.uint8))[0, :, 0, 0]
        return cls(pixels, background)

    def shifted(self, indices, rng: np.random.Generator) -> torch.Tensor:
        return _shift_pixels(self.pixels[torch.as_tensor(indices, dtype=torch.long)], self.background, rng)


def pretrain_vision_tower(model: nn.Module, processed: ProcessedImages, labels: np.ndarray, cfg: PretrainConfig,
                          seed: int) -> list[float]:
    """Stage 1, as CLIP is pretrained before LLaVA: the vision tower and projector learn digits.

    A temporary linear classifier reads the *mean* of the image tokens the LLM will receive
    (vision tower, then LLaVA's multi-modal projector) and is discarded afterwards. Reading the
    mean makes every image token carry the digit, so the LLM's freshly initialised, near-uniform
    attention already finds it. Without this stage, the LLM's loss alone trains the tower from
    scratch very slowly (measured: 13% digit accuracy after 600 steps).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = nn.Linear(model.config.text_config.hidden_size, 10)
    parameters = (
        list(model.model.vision_tower.parameters())
        + list(model.model.multi_modal_projector.parameters())
        + list(head.parameters())
    )
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    losses = []
    model.train()
    with progress_bar("pretrain vision tower", cfg.steps) as advance:
        for _ in range(cfg.steps):
            picked = rng.integers(len(labels), size=cfg.batch_size)
            features = model.model.get_image_features(pixel_values=processed.shifted(picked, rng))
            features = getattr(features, "pooler_output", features)  # transformers 5 wraps the list
            pooled = torch.stack([tokens.mean(0) for tokens in features])
            loss = F.cross_entropy(head(pooled), torch.as_tensor(labels[picked]))
            _step(loss, optimizer, scheduler, parameters, losses)
            advance(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


@dataclass
class EncodedExamples:
    """Training examples through the tokenizer once: right-padded ids, mask, answer labels, image index.

    ``image[i]`` is the row's index into the images (-1: a text question). A step gathers its
    rows and cuts the common padding; with right padding that equals encoding the rows alone.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image: torch.Tensor

    @classmethod
    def build(cls, batcher: PromptBatcher, examples: Sequence[Example], images: DigitImages,
              chunk: int = 512) -> "EncodedExamples":
        pad = batcher.tokenizer.pad_token_id
        parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for start in range(0, len(examples), chunk):
            batch = batcher.for_training(queries(examples[start: start + chunk], images))
            for key in parts:
                parts[key].append(batch[key])
        width = max(t.shape[1] for t in parts["input_ids"])
        fill = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE_INDEX}
        padded = {key: torch.cat([F.pad(t, (0, width - t.shape[1]), value=fill[key]) for t in tensors])
                  for key, tensors in parts.items()}
        image = torch.as_tensor([-1 if e.image is None else e.image for e in examples], dtype=torch.long)
        return cls(padded["input_ids"], padded["attention_mask"], padded["labels"], image)

    def __len__(self) -> int:
        return len(self.image)

    def batch(self, rows: np.ndarray, processed: ProcessedImages, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        length = int(self.attention_mask[rows].sum(1).max())
        batch = {key: getattr(self, key)[rows, :length] for key in ("input_ids", "attention_mask", "labels")}
        images = self.image[rows]
        images = images[images >= 0]
        if len(images):  # in row order: LLaVA fills the image tokens of the rows with an image in order
            batch["pixel_values"] = processed.shifted(images, rng)
        return batch


def pretrain_base(
    model: nn.Module,
    encoded: EncodedExamples,
    processed: ProcessedImages,
    cfg: PretrainConfig,
    seed: int,
) -> list[float]:
    """Train every weight of ``model`` on the encoded examples; returns the loss per step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    losses = []
    with progress_bar("pretrain tiny LLaVA", cfg.steps) as advance:
        for _ in range(cfg.steps):
            batch = encoded.batch(rng.integers(len(encoded), size=cfg.batch_size), processed, rng)
            loss = model(**batch).loss
            _step(loss, optimizer, scheduler, model.parameters(), losses)
            advance(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------- audio


class _DigitClassifier(nn.Module):
    def __init__(self, encoder, classes: int = 10):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.ln_post.normalized_shape[0], classes)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(masked_mean(self.encoder(mel), mask))


def masked_mean(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(frames.dtype)[..., None]
    return (frames * weights).sum(1) / weights.sum(1).clamp(min=1)


def whisper_dims(cfg: AudioEncoderConfig):
    """Whisper ``ModelDimensions`` for the built-in tiny encoder (a one-layer stub decoder: unused)."""
    from whisper.model import ModelDimensions

    from ..models.audio_encoders import whisper_positions

    return ModelDimensions(
        n_mels=80, n_audio_ctx=whisper_positions(cfg.tiny_window_seconds), n_audio_state=cfg.tiny_state,
        n_audio_head=cfg.tiny_heads, n_audio_layer=cfg.tiny_layers, n_vocab=16, n_text_ctx=8,
        n_text_state=cfg.tiny_state, n_text_head=cfg.tiny_heads, n_text_layer=1,
    )


def clips_at(clips: DigitClips, sample_rate: int) -> list[np.ndarray]:
    from ..data.audio_io import resample

    return [resample(wave, clips.sample_rate, sample_rate) for wave in clips.waves]


def pretrain_audio_encoder(cfg: AudioEncoderConfig, clips: DigitClips, seed: int, out_path: Path) -> list[float]:
    """Train a tiny whisper on digit recognition and save it as a whisper ``.pt`` checkpoint."""
    from whisper.model import Whisper

    from ..models.audio_encoders import WhisperEncoder

    dims = whisper_dims(cfg)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    whisper_model = Whisper(dims)
    encoder = WhisperEncoder(whisper_model.encoder, dims.n_mels)
    waves = clips_at(clips, encoder.sample_rate)
    # In chunks: the STFT of every clip at once holds ~0.4 MB per clip of complex spectra (GBs).
    mel = torch.cat([encoder.log_mel(waves[i: i + 256]) for i in range(0, len(waves), 256)])
    mask = encoder.frame_mask(waves)
    labels = torch.as_tensor(clips.labels)
    classifier = _DigitClassifier(whisper_model.encoder)
    classifier.requires_grad_(True).train()
    train = cfg.tiny_pretrain
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = warmup_cosine(optimizer, train.warmup_steps, train.steps)
    losses = []
    with progress_bar("pretrain tiny Whisper", train.steps) as advance:
        for _ in range(train.steps):
            picked = torch.as_tensor(rng.integers(len(labels), size=train.batch_size))
            loss = F.cross_entropy(classifier(mel[picked], mask[picked]), labels[picked])
            _step(loss, optimizer, scheduler, classifier.parameters(), losses)
            advance(loss=f"{np.mean(losses[-20:]):.3f}")
    # whisper.load_model reads {"dims", "model_state_dict"}; the head is not part of it.
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": whisper_model.state_dict()}, out_path)
    return losses


@torch.no_grad()
def clip_embeddings(encoder, waves: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """Mean of the encoder's frames over each clip (padding frames left out), (N, D)."""
    out = []
    for start in range(0, len(waves), batch_size):
        chunk = waves[start: start + batch_size]
        frames = encoder(chunk)
        out.append(masked_mean(frames.float(), encoder.frame_mask(chunk).to(frames.device)).cpu())
    return torch.cat(out)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, l2: float = 1e-3) -> float:
    """Multinomial logistic regression (L-BFGS) on frozen features; accuracy on the test set."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def build_tiny_llava(cfg: TinyLlavaConfig, seed: int):
    """A freshly initialised tiny LLaVA (the architecture ``base.kind: tiny-llava`` names)."""
    from transformers import LlavaForConditionalGeneration

    from ..models.base import tiny_llava_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(tiny_llava_config(cfg))
