"""A profile's data as records: which manifests, read how, split how.

Every stage and evaluation comes here, whatever the profile's ``data.source``:

* ``manifest``: the user's ``train_manifests``, ``validation_manifests`` and ``eval_manifests``.
* ``synthetic`` / ``fsdd-mnist`` (AV-digits): the benchmark is exported once to manifests and
  files in the cache (keyed by everything that decides them) and read back like a user's.

So no stage branches on where its records came from. Validation records are the validation
manifests, or else ``validation_fraction`` of the training records (by a hash of their id);
they never come from the evaluation manifests.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..cache import cached_directory
from . import avdigits
from .dataset import MediaLoader, RecordPool, Records, split_validation, with_distractors
from .manifest import FileChecker, ManifestError, ManifestFile, Record

AVDIGITS_SOURCES = ("synthetic", "fsdd-mnist")
SPLITS = ("train", "validation", "test")
RETENTION_KINDS = ("vl", "text")
NO_TRAINING_MANIFESTS = "data.train_manifests: no training manifests given (--set data.train_manifests=[path.jsonl])"


@lru_cache(maxsize=4)
def _content(source: str, root: Optional[str]) -> str:
    return avdigits.source_fingerprint(source, Path(root) if root else None)


def avdigits_manifests(profile) -> dict[str, Path]:
    """The profile's AV-digits benchmark as manifests in the cache (exported when missing)."""
    data = profile.data
    root = str(avdigits.check_data_root(data.root)) if data.source == "fsdd-mnist" else None
    spec = {"version": avdigits.EXPORT_VERSION, "source": data.source, "root": root,
            "content": _content(data.source, root), "split": data.split,
            "held_out_speakers": list(data.held_out_speakers), "seed": profile.seed,
            "num_train": data.num_train, "num_eval": data.num_eval}

    def build(directory: Path) -> None:
        avdigits.export(directory, data.source, root, data.split, tuple(data.held_out_speakers), profile.seed,
                        data.num_train, data.num_eval)

    directory, _ = cached_directory("avdigits", spec, build)
    return {split: directory / f"{split}.jsonl" for split in SPLITS}


def manifest_paths(profile, split: str) -> list[str]:
    """The manifests of one split ('train', 'validation', 'test')."""
    data = profile.data
    if data.source in AVDIGITS_SOURCES:
        return [str(avdigits_manifests(profile)[split])]
    return list({"train": data.train_manifests, "validation": data.validation_manifests,
                 "test": data.eval_manifests}[split])


def read_records(paths: Sequence[str], check_files: bool = True) -> Records:
    """Every record of the manifests; one ManifestError listing the problems of all of them."""
    files, issues = [], []
    checker = FileChecker(check_files)
    for path in paths:
        try:
            files.append(ManifestFile(path, checker))
        except ManifestError as exc:
            issues += exc.issues
    if issues:
        raise ManifestError(issues)
    return Records(files)


def records_of(profile, split: str, check_files: bool = True) -> Records:
    """One split's records; validation falls back to a slice of the training records."""
    from ..errors import SafeError

    paths = manifest_paths(profile, split)
    if paths:
        return read_records(paths, check_files)
    if split == "validation":
        return training_and_validation(profile, check_files)[1]
    if split == "train":
        raise SafeError(NO_TRAINING_MANIFESTS)
    raise SafeError("data.eval_manifests: no evaluation manifests given (--set data.eval_manifests=[path.jsonl]); "
                    "every stage ends by comparing SAFE with the base on them, the evidence that nothing regressed")


def training_and_validation(profile, check_files: bool = True) -> tuple[Records, Records]:
    """(training, validation) records; validation is carved out of training when not given."""
    from ..errors import SafeError

    train_paths = manifest_paths(profile, "train")
    if not train_paths:
        raise SafeError(NO_TRAINING_MANIFESTS)
    train = read_records(train_paths, check_files)
    validation_paths = manifest_paths(profile, "validation")
    if validation_paths:
        return train, read_records(validation_paths, check_files)
    return split_validation(train, profile.data.validation_fraction)


def make_pool(profile, records: Records | list[Record], sample_rate: int, encoder=None,
              distractors: Optional[Sequence[str]] = None) -> RecordPool:
    """Records with their media (and cached encoder features when ``data.audio_features`` is set)."""
    if not isinstance(records, Records):
        records = Records.of(records)
    media = MediaLoader(sample_rate, profile.data.media_cache_mb)
    own = records.audio_paths()
    clips = list(distractors) if distractors is not None else own
    features = None
    if profile.data.audio_features and encoder is not None:
        from ..features.lookup import cached_clip_features

        features = cached_clip_features(sorted(set(own) | set(clips)), profile.data.audio_features, encoder)
    return RecordPool(records, media, features, clips, dict(profile.evaluation.metrics))


def evaluation_records(records: Records, seed: int, clips: Optional[Sequence[str]] = None) -> list[Record]:
    """The records as evaluated: each VL/text record of a task whose records carry no audio is asked
    twice, as written and with a distractor clip (seeded), right after it.

    A task whose records already carry clips (AV-digits' test split, or a user's own distractor
    set) is asked as written. The distractors come from the records' own clips, else ``clips``.
    """
    tasks, has_audio, kinds = records.tasks, records.has_audio, records.kinds
    with_clip = {t for t, a in zip(tasks, has_audio) if a}
    twin = {t for t, k in zip(tasks, kinds) if k in RETENTION_KINDS and t not in with_clip}
    pool = records.audio_paths() or list(clips or ())
    rng = np.random.default_rng([seed, 7])
    out: list[Record] = []
    for i, record in enumerate(records):
        out.append(record)
        if tasks[i] in twin and pool:
            out += with_distractors([record], pool, rng)
    return out


def split_pool(profile, split: str, sample_rate: int, encoder=None) -> RecordPool:
    """One split's pool as the stages read it (the test split with its distractor twins)."""
    if split == "test":
        return make_pool(profile, evaluation_records(records_of(profile, "test"), profile.seed), sample_rate,
                         encoder=encoder)
    return make_pool(profile, records_of(profile, split), sample_rate, encoder=encoder)
