"""Records of one or more manifests as a pool every stage draws from, and their media.

* :class:`Records` indexes the records of several :class:`~.manifest.ManifestFile`\\ s (or a
  list in memory) without holding them: a row is a (part, position) pair, and a record is
  parsed when it is asked for. Subsets (the audio questions, the VL/text questions, a
  validation slice) are index arrays over the same parts.
* :class:`MediaLoader` decodes an image with PIL and a clip with ``audio_io`` at the encoder's
  rate, and keeps what it decoded up to ``cache_mb`` (the working set of most corpora is a
  few hundred files, however many records point at them). A file that fails to decode is
  remembered with its reason and reported to the caller, never raised.
* :class:`RecordPool` is a pool of records plus their media: the questions as the base reads
  them (``queries``), the clips (``audio``), or cached encoder features (``audio_inputs``).

Nothing here knows which stage reads it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .audio_io import AudioDecodeError, load_audio
from .batches import Query
from .manifest import ManifestFile, Record, id_fraction

Part = Union[ManifestFile, Sequence[Record]]


class Records:
    """A sequence of records over several parts, by (part, row) index; parsed on access."""

    def __init__(self, parts: Sequence[Part], index: Optional[np.ndarray] = None):
        self.parts = list(parts)
        if index is None:
            index = np.concatenate([np.stack([np.full(len(p), i), np.arange(len(p))], 1)
                                    for i, p in enumerate(self.parts)] or [np.zeros((0, 2))]).astype(np.int64)
        self.index = index.reshape(-1, 2)
        self._tasks: Optional[np.ndarray] = None
        self._clips: Optional[np.ndarray] = None  # index into _clip_names per record, -1 without a clip
        self._fractions: Optional[np.ndarray] = None
        self._clip_names: list[str] = []

    @classmethod
    def of(cls, records: Sequence[Record]) -> "Records":
        return cls([list(records)])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Record:
        part, row = self.index[i]
        return self.parts[int(part)][int(row)]

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def _columns(self) -> None:
        """Per-record task, clip code and id hash from each part's scan, without parsing records."""
        tasks, audio, fractions, self._clip_names = [], [], [], []
        for part in self.parts:
            if isinstance(part, ManifestFile):
                tasks.append(np.asarray(part.task_names, dtype=object)[part.task_codes])
                offset = len(self._clip_names)
                audio.append(np.where(part.audio_codes >= 0, part.audio_codes + offset, -1))
                self._clip_names += part.audio_names
                fractions.append(part.id_fractions)
            else:
                tasks.append(np.asarray([r.task for r in part], dtype=object))
                codes = []
                for r in part:
                    if r.audio is None:
                        codes.append(-1)
                    else:
                        codes.append(len(self._clip_names))
                        self._clip_names.append(r.audio)
                audio.append(np.asarray(codes, dtype=np.int64))
                fractions.append(np.asarray([id_fraction(r.id) for r in part], dtype=np.float64))
        rows, parts = self.index[:, 1], self.index[:, 0]
        self._tasks = np.empty(len(self), dtype=object)
        self._clips = np.full(len(self), -1, dtype=np.int64)
        self._fractions = np.zeros(len(self), dtype=np.float64)
        for i in range(len(self.parts)):
            here = parts == i
            self._tasks[here] = tasks[i][rows[here]]
            self._clips[here] = audio[i][rows[here]]
            self._fractions[here] = fractions[i][rows[here]]

    @property
    def tasks(self) -> np.ndarray:
        """(N,) task name per record, without parsing any record."""
        if self._tasks is None:
            self._columns()
        return self._tasks

    @property
    def kinds(self) -> np.ndarray:
        return np.asarray([t.split("/", 1)[0] for t in self.tasks], dtype=object)

    @property
    def has_audio(self) -> np.ndarray:
        if self._clips is None:
            self._columns()
        return self._clips >= 0

    @property
    def id_fractions(self) -> np.ndarray:
        """(N,) each record's id hashed into [0, 1) (``manifest.id_fraction``)."""
        if self._fractions is None:
            self._columns()
        return self._fractions

    def subset(self, rows) -> "Records":
        """The records at ``rows`` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        out = Records(self.parts, self.index[rows])
        if self._tasks is not None:
            out._tasks, out._clips, out._fractions = self._tasks[rows], self._clips[rows], self._fractions[rows]
            out._clip_names = self._clip_names
        return out

    def of_kinds(self, kinds: Sequence[str]) -> "Records":
        return self.subset(np.isin(self.kinds, list(kinds)))

    def audio_paths(self) -> list[str]:
        """The distinct clips these records use, sorted (the distractor pool; a stable order)."""
        if self._clips is None:
            self._columns()
        return sorted({self._clip_names[int(c)] for c in np.unique(self._clips) if c >= 0})

    def counts(self) -> dict[str, int]:
        """Records per task kind."""
        kinds, numbers = np.unique(self.kinds.astype(str), return_counts=True) if len(self) else ([], [])
        return {str(k): int(n) for k, n in zip(kinds, numbers)}


def split_validation(records: Records, fraction: float) -> tuple[Records, Records]:
    """(training, validation): the records whose id hashes below ``fraction`` are held out."""
    held = records.id_fractions < fraction
    return records.subset(~held), records.subset(held)


# --------------------------------------------------------------------------- media


class MediaLoader:
    """Decodes images and clips (audio at ``sample_rate``), keeping up to ``cache_mb`` of them."""

    def __init__(self, sample_rate: int, cache_mb: float = 512.0):
        self.sample_rate = sample_rate
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._held = 0
        self.failed: dict[str, str] = {}  # path -> why it could not be decoded

    def _remember(self, key: tuple[str, str], value: np.ndarray) -> np.ndarray:
        if value.nbytes <= self.cache_bytes:
            self._cache[key] = value
            self._held += value.nbytes
            while self._held > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._held -= old.nbytes
        return value

    def _get(self, kind: str, path: str, decode) -> Optional[np.ndarray]:
        """The decoded file from the cache, else ``decode(path)`` (None and a reason on failure)."""
        key = (kind, path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if path in self.failed:
            return None
        try:
            value = decode(path)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            self.failed[path] = f"cannot read {kind}: {exc}"
            return None
        except AudioDecodeError as exc:
            self.failed[path] = exc.reason
            return None
        return self._remember(key, value)

    def image(self, path: str) -> Optional[np.ndarray]:
        return self._get("image", path, _decode_image)

    def audio(self, path: str) -> Optional[np.ndarray]:
        return self._get("audio", path, lambda p: load_audio(p, self.sample_rate))


def _decode_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        # Grey images stay grey (H, W): the processor makes RGB of them as it would of the array.
        return np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))


@dataclass
class RecordPool:
    """Records and the media they point at; the unit every stage and evaluation draws from."""

    examples: Union[Records, list[Record]]
    media: MediaLoader
    features: Optional[dict[str, torch.Tensor]] = None  # cached encoder features by clip path
    distractors: list[str] = field(default_factory=list)  # clips a VL/text record may be given
    metrics: dict[str, str] = field(default_factory=dict)  # task or kind -> metric (evaluation.metrics)

    def __len__(self) -> int:
        return len(self.examples)

    def scores(self, answers: Sequence[str], chosen: Sequence[Record]) -> list[float]:
        """Each answer's score in [0, 1] under its task's metric."""
        from .scoring import metric_for, score

        return [score(a, r.answers, metric_for(r.task, self.metrics)) for a, r in zip(answers, chosen)]

    def metric(self, task: str) -> str:
        from .scoring import metric_for

        return metric_for(task, self.metrics)

    def view(self, examples) -> "RecordPool":
        """The same media and features over other records."""
        return replace(self, examples=examples)

    def broken(self, record: Record) -> Optional[str]:
        """Why a record cannot be used (a file that does not decode), else None. Decodes and caches."""
        if record.image is not None and self.media.image(record.image) is None:
            return f"{record.image}: {self.media.failed[record.image]}"
        if record.audio is not None and self.features is None and self.media.audio(record.audio) is None:
            return f"{record.audio}: {self.media.failed[record.audio]}"
        return None

    def usable(self, chosen: Sequence[Record]) -> tuple[list[Record], list[tuple[Record, str]]]:
        """(records whose files decode, [(record, reason)] for the others)."""
        kept, bad = [], []
        for record in chosen:
            reason = self.broken(record)
            if reason is None:
                kept.append(record)
            else:
                bad.append((record, reason))
        return kept, bad

    def queries(self, chosen: Sequence[Record], with_answers: bool) -> list[Query]:
        """Records as the base sees them: the conversation and the image (the base has no ears)."""
        return [Query(r.question, None if r.image is None else self.media.image(r.image),
                      r.answer if with_answers else None, history=r.history, system=r.system) for r in chosen]

    def audio(self, chosen: Sequence[Record]) -> list[Optional[np.ndarray]]:
        return [None if r.audio is None else self.media.audio(r.audio) for r in chosen]

    def audio_inputs(self, chosen: Sequence[Record], device: Optional[torch.device] = None) -> dict:
        """SAFEModel's audio arguments: cached features when the pool has them, else the waveforms."""
        from ..features.lookup import stack_features

        if self.features is None:
            return {"audio": self.audio(chosen)}
        inputs = stack_features([None if r.audio is None else self.features[r.audio] for r in chosen])
        return {key: value.to(device) for key, value in inputs.items()} if device is not None else inputs


def with_distractors(records: Sequence[Record], clips: Sequence[str], rng: np.random.Generator) -> list[Record]:
    """VL/text records without a clip get one drawn from ``clips``; every other record is as it was.

    Retention must be measured with audio present: on audio-free input the bypass already
    guarantees the base's answer, so a retention term there would be vacuous.
    """
    out = []
    for record in records:
        if record.audio is None and not record.needs_audio and clips:
            record = record.with_audio(clips[int(rng.integers(len(clips)))], distractor=True)
        out.append(record)
    return out
