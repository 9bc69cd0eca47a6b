"""AV-digits: an image of a digit, a recording of a spoken digit, and questions about them.

Two sources give the raw material, a set of digit images and a set of digit clips per split:

* ``synthetic`` (needs nothing): digits drawn with PIL at a random size, position and rotation
  over noise, and "spoken" digits synthesised as the digit's DTMF tone pair with frequency
  jitter, random length and noise. The ``demo`` profile's data.
* ``fsdd-mnist`` (real): FSDD recordings and MNIST test images from ``data.root``. FSDD's own
  convention puts takes 0-4 of every speaker and digit in the test split (``split: takes``);
  ``split: speakers`` holds whole speakers out instead, the harder test. MNIST's test set is the
  only MNIST here, so its first 8,000 images train the base and the last 2,000 test it.

The question families (task names as they appear in manifests):

    vl/digit  vl/even  vl/gt5     need the image
    text/arith                    needs nothing (small arithmetic)
    audio/digit  audio/even       need the audio
    av/same  av/sum               need both

Every answer is computed from the source labels (MNIST's label file, the digit in an FSDD file
name, the digit a synthetic sample was drawn for). ``retention`` examples are VL and text
questions with a *distractor* clip attached: the audio is irrelevant to the answer, and the
model with audio must answer as the base does without it.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..errors import SafeError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
MNIST_TRAIN_IMAGES = 8000  # of the 10,000 t10k images; the rest are the base's test images
SYNTHETIC_SAMPLE_RATE = 8000  # like FSDD, so both sources go through the same resampling

# DTMF keypad: each digit is one low (row) and one high (column) tone.
DTMF = {1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336),
        6: (770, 1477), 7: (852, 1209), 8: (852, 1336), 9: (852, 1477), 0: (941, 1336)}

QUESTIONS = {
    "vl/digit": "Which digit is shown?",
    "vl/even": "Is the digit shown even?",
    "vl/gt5": "Is the digit shown greater than five?",
    "text/arith": "What is {a} {op} {b}?",
    "audio/digit": "Which digit is spoken?",
    "audio/even": "Is the spoken digit even?",
    "av/same": "Are the shown and spoken digits the same?",
    "av/sum": "What is the sum of the shown and spoken digits?",
}
TASKS = tuple(QUESTIONS)


def task_needs(task: str) -> tuple[bool, bool]:
    """(needs an image, needs audio) for a task name."""
    kind = task.split("/")[0]
    return kind in ("vl", "av"), kind in ("audio", "av")


# --------------------------------------------------------------------------- raw material


@dataclass
class DigitImages:
    images: np.ndarray  # (N, 28, 28) uint8, white digit on black like MNIST
    labels: np.ndarray  # (N,) int
    ids: list[str]  # where each came from, e.g. "mnist:9123" or "synthetic:test:41"


@dataclass
class DigitClips:
    waves: list[np.ndarray]  # float32 mono at sample_rate
    labels: np.ndarray
    ids: list[str]
    sample_rate: int
    paths: Optional[list[str]] = None  # the original files, when there are any
    speakers: list[str] = field(default_factory=list)


def _rng(seed: int, *names: str) -> np.random.Generator:
    """Independent, reproducible streams per purpose (adding a family never shifts another's draws)."""
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def synthetic_images(count: int, seed: int, split: str) -> DigitImages:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = _rng(seed, "images", split)
    labels = rng.integers(0, 10, count)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        size = int(rng.integers(16, 25))
        font = ImageFont.load_default(size=size)
        canvas = Image.new("L", (40, 40), 0)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), str(label), font=font)
        x = (40 - (right - left)) / 2 - left + rng.uniform(-3, 3)
        y = (40 - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
        draw.text((x, y), str(label), fill=int(rng.integers(180, 256)), font=font)
        canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
        canvas = canvas.crop((6, 6, 34, 34)).filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.7))))
        pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 12, (28, 28))
        images[i] = np.clip(pixels, 0, 255).astype(np.uint8)
    return DigitImages(images, labels.astype(np.int64), [f"synthetic:{split}:{i}" for i in range(count)])


def dtmf_clip(digit: int, rng: np.random.Generator, sample_rate: int = SYNTHETIC_SAMPLE_RATE) -> np.ndarray:
    """The digit's two DTMF tones, jittered, between random silences, over noise."""
    low, high = DTMF[int(digit)]
    tone_seconds = rng.uniform(0.25, 0.6)
    t = np.arange(int(tone_seconds * sample_rate)) / sample_rate
    jitter = rng.uniform(0.985, 1.015, 2)
    tone = np.sin(2 * np.pi * low * jitter[0] * t + rng.uniform(0, 2 * np.pi))
    tone += rng.uniform(0.6, 1.0) * np.sin(2 * np.pi * high * jitter[1] * t + rng.uniform(0, 2 * np.pi))
    ramp = min(len(t) // 10, int(0.01 * sample_rate))
    envelope = np.ones_like(t)
    envelope[:ramp] = np.linspace(0, 1, ramp)
    envelope[len(t) - ramp:] = np.linspace(1, 0, ramp)
    before, after = (int(rng.uniform(0.02, 0.2) * sample_rate) for _ in range(2))
    clip = np.concatenate([np.zeros(before), rng.uniform(0.2, 0.5) * tone * envelope, np.zeros(after)])
    clip += rng.normal(0, rng.uniform(0.005, 0.03), clip.shape)
    return clip.astype(np.float32)


def synthetic_clips(count: int, seed: int, split: str) -> DigitClips:
    rng = _rng(seed, "clips", split)
    labels = rng.integers(0, 10, count)
    waves = [dtmf_clip(label, rng) for label in labels]
    return DigitClips(waves, labels.astype(np.int64), [f"synthetic:{split}:{i}" for i in range(count)],
                      SYNTHETIC_SAMPLE_RATE)


def check_data_root(root: Optional[str]) -> Path:
    """The fsdd-mnist directory, or a SafeError naming exactly what is missing."""
    if not root:
        raise SafeError(
            "data.root: source fsdd-mnist needs the directory holding fsdd/recordings/ and mnist/; "
            "set data.root in the profile, SAFE_DATA_ROOT in the environment, or --set data.root=DIR"
        )
    path = Path(root).expanduser()
    missing = []
    if not path.is_dir():
        raise SafeError(f"data.root: {path} is not a directory")
    recordings = path / "fsdd" / "recordings"
    if not recordings.is_dir() or not any(recordings.glob("*.wav")):
        missing.append(f"{recordings}/*.wav (FSDD recordings)")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        if not (path / "mnist" / name).is_file():
            missing.append(str(path / "mnist" / name))
    if missing:
        raise SafeError(f"data.root: {path} is incomplete; missing: " + ", ".join(missing))
    return path


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(root: Path, split: str) -> DigitImages:
    images = _read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    index = np.arange(len(labels))
    chosen = index[:MNIST_TRAIN_IMAGES] if split == "train" else index[MNIST_TRAIN_IMAGES:]
    return DigitImages(images[chosen], labels[chosen], [f"mnist:{i}" for i in chosen])


FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def fsdd_files(root: Path, split: str, rule: str, held_out: Iterable[str]) -> list[tuple[Path, int, str, int]]:
    """(path, digit, speaker, take) of the FSDD files in ``split`` under ``rule`` (takes|speakers)."""
    held_out = set(held_out)
    chosen = []
    for path in sorted((root / "fsdd" / "recordings").glob("*.wav")):
        match = FSDD_NAME.match(path.name)
        if not match:
            continue
        digit, speaker, take = int(match[1]), match[2], int(match[3])
        in_test = take <= 4 if rule == "takes" else speaker in held_out
        if in_test == (split == "test"):
            chosen.append((path, digit, speaker, take))
    return chosen


def load_fsdd(root: Path, split: str, rule: str = "takes", held_out: Iterable[str] = ("theo",)) -> DigitClips:
    from .audio_io import load_audio_many

    files = fsdd_files(root, split, rule, held_out)
    if not files:
        raise SafeError(f"data: no FSDD recordings in the {split} split under {root / 'fsdd' / 'recordings'}")
    waves, errors = load_audio_many([f[0] for f in files], SYNTHETIC_SAMPLE_RATE)
    if errors:  # the real data must be whole: a broken recording would silently shift the benchmark
        raise SafeError("data.root: unreadable FSDD recordings: " + "; ".join(str(e) for e in errors[:5]))
    return DigitClips(
        waves=waves,
        labels=np.array([f[1] for f in files], dtype=np.int64),
        ids=[f"fsdd:{f[0].name}" for f in files],
        sample_rate=SYNTHETIC_SAMPLE_RATE,
        paths=[str(f[0]) for f in files],
        speakers=[f[2] for f in files],
    )


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Example:
    """One question before it is written out: indices into the split's images and clips."""

    task: str
    question: str
    answer: str
    answers: tuple[str, ...]
    image: Optional[int]
    clip: Optional[int]
    meta: dict = field(default_factory=dict, hash=False)

    @property
    def is_retention(self) -> bool:
        return self.clip is not None and not task_needs(self.task)[1]


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _number(value: int) -> tuple[str, tuple[str, ...]]:
    words = (NUMBER_WORDS[value],) if 0 <= value < 10 else ()
    return str(value), (str(value),) + words


def make_examples(
    images: DigitImages,
    clips: DigitClips,
    per_task: int,
    seed: int,
    split: str,
    tasks: Iterable[str] = TASKS,
    retention: bool = True,
) -> list[Example]:
    """``per_task`` examples of each task (and as many retention examples per VL/text task).

    Answers come from the labels: the image's label, the clip's label, or the operands.
    """
    examples: list[Example] = []
    for task in tasks:
        rng = _rng(seed, "questions", split, task)
        for _ in range(per_task):
            examples.append(_example(task, images, clips, rng, distractor=False))
        needs_image, needs_audio = task_needs(task)
        if retention and not needs_audio:
            rng = _rng(seed, "retention", split, task)
            examples += [_example(task, images, clips, rng, distractor=True) for _ in range(per_task)]
    return examples


def _example(task: str, images: DigitImages, clips: DigitClips, rng: np.random.Generator, distractor: bool) -> Example:
    image = int(rng.integers(len(images.labels))) if task.split("/")[0] in ("vl", "av") else None
    if task == "av/same" and rng.random() < 0.5:
        # Half the pairs match; drawing both independently would make "no" right 90% of the time.
        same = np.flatnonzero(clips.labels == images.labels[image])
        clip = int(rng.choice(same))
    elif task.split("/")[0] in ("audio", "av") or distractor:
        clip = int(rng.integers(len(clips.labels)))
    else:
        clip = None
    shown = int(images.labels[image]) if image is not None else None
    spoken = int(clips.labels[clip]) if clip is not None else None
    meta: dict = {}
    if image is not None:
        meta.update(image_digit=shown, image_source=images.ids[image])
    if clip is not None:
        meta.update(audio_digit=spoken, audio_source=clips.ids[clip])
    if distractor:
        meta["distractor"] = True
    question = QUESTIONS[task]
    if task == "vl/digit":
        answer, answers = _number(shown)
    elif task == "vl/even":
        answer = _yes_no(shown % 2 == 0)
        answers = (answer,)
    elif task == "vl/gt5":
        answer = _yes_no(shown > 5)
        answers = (answer,)
    elif task == "text/arith":
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        op = "plus" if rng.random() < 0.5 else "minus"
        if op == "minus" and b > a:
            a, b = b, a
        question = question.format(a=a, op=op, b=b)
        answer, answers = _number(a + b if op == "plus" else a - b)
        meta.update(a=a, b=b, op=op)
    elif task == "audio/digit":
        answer, answers = _number(spoken)
    elif task == "audio/even":
        answer = _yes_no(spoken % 2 == 0)
        answers = (answer,)
    elif task == "av/same":
        answer = _yes_no(shown == spoken)
        answers = (answer,)
    elif task == "av/sum":
        answer, answers = _number(shown + spoken)
    else:
        raise ValueError(f"unknown AV-digits task {task!r}")
    return Example(task, question, answer, answers, image, clip, meta)


# --------------------------------------------------------------------------- writing out


def write_split(
    out_dir: Path,
    name: str,
    examples: list[Example],
    images: DigitImages,
    clips: DigitClips,
) -> Path:
    """Write images (PNG), clips (WAV, unless they are files already) and ``{name}.jsonl``.

    Synthetic clips are written as 32-bit float WAV, so reading them back gives the very
    samples that were made: training from the files equals training from memory.
    """
    import soundfile as sf
    from PIL import Image

    from .manifest import Record, write_manifest

    image_dir, audio_dir = out_dir / "images" / name, out_dir / "audio" / name
    image_paths: dict[int, str] = {}
    clip_paths: dict[int, str] = {}
    records = []
    for number, example in enumerate(examples):
        if example.image is not None and example.image not in image_paths:
            image_dir.mkdir(parents=True, exist_ok=True)
            path = image_dir / f"{example.image:05d}.png"
            Image.fromarray(images.images[example.image]).save(path)
            image_paths[example.image] = str(path)
        if example.clip is not None and example.clip not in clip_paths:
            if clips.paths is not None:
                clip_paths[example.clip] = clips.paths[example.clip]
            else:
                audio_dir.mkdir(parents=True, exist_ok=True)
                path = audio_dir / f"{example.clip:05d}.wav"
                sf.write(path, clips.waves[example.clip], clips.sample_rate, subtype="FLOAT")
                clip_paths[example.clip] = str(path)
        records.append(
            Record(
                id=f"{name}-{number:06d}",
                task=example.task,
                question=example.question,
                answer=example.answer,
                answers=example.answers,
                image=image_paths.get(example.image) if example.image is not None else None,
                audio=clip_paths.get(example.clip) if example.clip is not None else None,
                meta=dict(example.meta),
            )
        )
    return write_manifest(records, out_dir / f"{name}.jsonl")


# --------------------------------------------------------------------------- the benchmark as manifests

SYNTHETIC_SIZES = {"train": (4000, 2000), "test": (1000, 500)}  # (images, clips) per split
EXPORT_VERSION = 1  # bump when export writes other records or files: the cache keys include it


@dataclass
class Sources:
    images: DigitImages
    clips: DigitClips


@lru_cache(maxsize=8)
def load_source(source: str, root: Optional[str], split: str, rule: str, held_out: tuple[str, ...],
                seed: int) -> Sources:
    """One split's raw material: digit images and digit clips."""
    if source == "synthetic":
        n_images, n_clips = SYNTHETIC_SIZES[split]
        return Sources(synthetic_images(n_images, seed, split), synthetic_clips(n_clips, seed, split))
    if source == "fsdd-mnist":
        path = check_data_root(root)
        return Sources(load_mnist(path, split), load_fsdd(path, split, rule, held_out))
    raise SafeError(f"data.source: {source!r} is not an AV-digits source (synthetic or fsdd-mnist)")


def training_examples(sources: Sources, per_task: int, seed: int) -> list[Example]:
    """What the stages train on: the audio and AV questions, and the VL/text questions each with its
    distractor clip (the questions without one are the base's concern, not SAFE's)."""
    examples = make_examples(sources.images, sources.clips, per_task, seed, "train")
    return [e for e in examples if e.clip is not None]


def export(out_dir: Path, source: str, root: Optional[str], rule: str, held_out: tuple[str, ...], seed: int,
           num_train: int, num_eval: int) -> dict[str, Path]:
    """AV-digits as manifests: ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` with their files.

    validation holds fresh pairings (and, for the synthetic source, fresh material) made with
    ``seed + 1`` from the training split, for Stage C's calibration; test is every question
    family, with and without a distractor clip.
    """
    out_dir = Path(out_dir)
    train = load_source(source, root, "train", rule, held_out, seed)
    validation = load_source(source, root, "train", rule, held_out, seed + 1)
    test = load_source(source, root, "test", rule, held_out, seed)
    return {
        "train": write_split(out_dir, "train", training_examples(train, num_train, seed), train.images, train.clips),
        "validation": write_split(out_dir, "validation", training_examples(validation, num_train, seed + 1),
                                  validation.images, validation.clips),
        "test": write_split(out_dir, "test", make_examples(test.images, test.clips, num_eval, seed, "test"),
                            test.images, test.clips),
    }


def source_fingerprint(source: str, root: Optional[Path]) -> str:
    """A content hash of the raw data a source reads (for caches keyed by their inputs)."""
    digest = hashlib.sha256(source.encode())
    if source == "fsdd-mnist" and root is not None:
        for path in sorted((root / "mnist").glob("t10k-*.gz")) + sorted((root / "fsdd" / "recordings").glob("*.wav")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
