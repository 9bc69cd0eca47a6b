"""Evaluation examples: the profile's AV-digits test split, or any manifests a user brings.

Both become an :class:`ExamplePool` (questions indexing images and clips), so the same paired
evaluation runs on either. A manifest's VL and text questions are asked twice: as written, and
with a *distractor* clip drawn (seeded) from the manifest's own audio, because a regression that
only shows when audio is present is the one SAFE must rule out. Records whose image or audio
cannot be read are skipped and listed, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config.schema import Profile
from ..data.audio_io import load_audio_many
from ..data.avdigits import DigitImages, Example
from ..data.manifest import read_manifest
from ..training.batches import ExamplePool, avdigits_pool

RETENTION_KINDS = ("vl", "text")


@dataclass
class EvalData:
    pool: ExamplePool
    description: str
    skipped: list[dict] = field(default_factory=list)  # {"id", "file", "reason"} per unusable record


def profile_data(profile: Profile, sample_rate: int, encoder=None) -> EvalData:
    source = profile.data.source
    if source not in ("synthetic", "fsdd-mnist"):
        from ..errors import SafeError

        raise SafeError(f"data.source: {source!r} has no built-in test split; pass the evaluation data with --data")
    pool = avdigits_pool(profile, "test", sample_rate, encoder=encoder)
    return EvalData(pool, f"AV-digits ({source}) test split")


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def manifest_data(paths: Sequence[str], sample_rate: int, seed: int = 0, workers: int = 0) -> EvalData:
    """Every record of the manifests (validated as a whole first: all problems reported at once)."""
    records = [record for path in paths for record in read_manifest(path)]
    skipped: list[dict] = []

    image_files = sorted({r.image for r in records if r.image})
    images, image_index = [], {}
    for path in image_files:
        try:
            images.append(_load_image(path))  # any size: the base's processor resizes it
            image_index[path] = len(images) - 1
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            skipped.append({"file": path, "reason": f"cannot read image: {exc}"})

    audio_files = sorted({r.audio for r in records if r.audio})
    decoded, errors = load_audio_many(audio_files, sample_rate, workers=workers)
    waves, clip_index = [], {}
    for path, wave in zip(audio_files, decoded):
        if wave is not None:
            waves.append(wave)
            clip_index[path] = len(waves) - 1
    skipped += [{"file": error.path, "reason": error.reason} for error in errors]
    bad_files = {entry["file"] for entry in skipped}

    rng = np.random.default_rng([seed, 7])
    examples: list[Example] = []
    for record in records:
        broken = [f for f in (record.image, record.audio) if f and f in bad_files]
        if broken:
            for entry in skipped:
                if entry["file"] in broken:
                    entry.setdefault("ids", []).append(record.id)
            continue
        example = Example(record.task, record.question, record.answer, record.answers,
                          image_index.get(record.image) if record.image else None,
                          clip_index.get(record.audio) if record.audio else None, {"id": record.id, **record.meta})
        examples.append(example)
        if record.kind in RETENTION_KINDS and example.clip is None and waves:
            distractor = int(rng.integers(len(waves)))
            examples.append(Example(record.task, record.question, record.answer, record.answers, example.image,
                                    distractor, {**example.meta, "distractor": True}))
    loaded = DigitImages(images, np.zeros(len(images), dtype=int), list(image_index))  # labels unused here
    pool = ExamplePool(examples, loaded, waves)
    names = ", ".join(Path(p).name for p in paths)
    return EvalData(pool, f"manifest{'s' if len(paths) > 1 else ''} {names}: {len(records)} records", skipped)
