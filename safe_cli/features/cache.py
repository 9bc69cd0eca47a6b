"""A crash-safe cache of frozen-encoder features, keyed by audio content and encoder.

Layout of a cache directory::

    CACHE/shards/<name>.safetensors   up to N clips each: one float32 tensor per clip, named by
                                      the clip's content hash, of the clip's own shape (frames,
                                      dim): (1500, D) for faithful whisper, (T_clip, D) for
                                      whisper trimmed to the clip; the safetensors metadata key
                                      "safe_features" holds JSON {"version", "encoder", "clips":
                                      {hash: {"path", "samples", "sample_rate"}}}
    CACHE/index.json                  {encoder fingerprint: {content hash: shard name}}
    CACHE/failures.jsonl              one {"path", "reason", ...} object per file that failed
    CACHE/.lock                       fcntl.flock'ed around every change

Key: (SHA-256 of the file's bytes, encoder fingerprint). New bytes are a miss, a renamed or
moved file with the same bytes is a hit, another encoder is a miss.

The shards are the truth; ``index.json`` is derived from them. Every file is written to a
``.<name>.<uuid>.tmp`` file in the same folder, fsync'ed and ``os.replace``'d into place, so a
reader sees a whole file or none. Shard names are ``<hash prefix>-<uuid4 hex>``: two processes
never write the same file. Writers hold the lock while a temp file exists, so a temp file seen
under the lock belongs to a killed process and is removed. Under the lock the index is merged
with the shards on disk (entries of shards no index mentions yet are added, entries of deleted
shards dropped) before it is rewritten: a process killed between writing a shard and updating
the index loses nothing, and concurrent writers keep each other's entries. Deleting
``index.json`` is always safe; the next open rebuilds it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

import torch

from ..atomic import atomic_write, atomic_write_text, is_temp

METADATA_KEY = "safe_features"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".safetensors"
_HASH_BLOCK = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]
Index = dict[str, dict[str, str]]


def content_hash(path: PathLike) -> str:
    """SHA-256 hex digest of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardError(Exception):
    """A shard file whose header cannot be read as a feature shard."""


def read_shard_header(path: PathLike) -> tuple[str, dict[str, dict]]:
    """(encoder fingerprint, {content hash: clip metadata}) of one shard; ShardError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            keys = set(handle.keys())
    except (OSError, SafetensorError) as exc:
        raise ShardError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("encoder"), str) or not isinstance(meta.get("clips"), dict):
        raise ShardError(f"{path}: no {METADATA_KEY!r} metadata (not written by safe encode-audio)")
    clips = meta["clips"]
    if set(clips) != keys:
        raise ShardError(f"{path}: metadata lists {len(clips)} clips but the file holds {len(keys)} tensors")
    return meta["encoder"], clips


class FeatureCache:
    """Features of clips by (content hash, encoder fingerprint), stored in safetensors shards.

    Opening a cache creates its folders, removes temp files left by killed processes and brings
    ``index.json`` up to date with the shards. The in-memory view is refreshed by :meth:`refresh`
    and by every :meth:`add_shard`.
    """

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.shards_dir = self.directory / "shards"
        self.index_path = self.directory / "index.json"
        self.failures_path = self.directory / "failures.jsonl"
        self.lock_path = self.directory / ".lock"
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.unreadable_shards: list[str] = []
        self._index: Index = {}
        self._index_bytes: Optional[bytes] = None  # the index.json last read or written, and its parse
        self._index_on_disk: Optional[Index] = None
        with self._locked():
            self._remove_temp_files()
            self._index = self._merged()
            self._save_index(self._index)

    # ------------------------------------------------------------------ paths and locking

    def shard_path(self, name: str) -> Path:
        return self.shards_dir / f"{name}{SHARD_SUFFIX}"

    def shard_names(self) -> list[str]:
        """Names of the complete shards on disk (temp files excluded), sorted."""
        try:
            entries = list(os.scandir(self.shards_dir))
        except FileNotFoundError:
            return []
        return sorted(
            e.name[: -len(SHARD_SUFFIX)] for e in entries
            if e.name.endswith(SHARD_SUFFIX) and not e.name.startswith(".") and e.is_file()
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_temp_files(self) -> None:
        # Only under the lock: writers hold it while their temp file exists, so these are orphans.
        for folder in (self.directory, self.shards_dir):
            for entry in os.scandir(folder):
                if is_temp(entry.name) and entry.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    # ------------------------------------------------------------------ the index

    def _read_index_file(self) -> Index:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            self._index_bytes, self._index_on_disk = None, None
            return {}
        except OSError:
            raw = b""
        if raw != self._index_bytes:  # parsed only when it changed since we last read or wrote it
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                data = None
            index: Optional[Index] = None  # None: not an index, rewritten at the next save
            if isinstance(data, dict):  # malformed entries are dropped: the shards bring them back
                index = {fp: {h: s for h, s in entries.items() if isinstance(h, str) and isinstance(s, str)}
                         for fp, entries in data.items() if isinstance(entries, dict)}
            self._index_bytes, self._index_on_disk = raw, index
        return {fp: dict(entries) for fp, entries in (self._index_on_disk or {}).items()}

    def _merged(self) -> Index:
        """index.json merged with the shards on disk (no lock needed to read; hold it to then write)."""
        index = self._read_index_file()
        present = set(self.shard_names())
        index = {fp: {h: s for h, s in entries.items() if s in present} for fp, entries in index.items()}
        referenced = {s for entries in index.values() for s in entries.values()}
        unreadable = []
        for name in sorted(present - referenced):
            try:
                fp, clips = read_shard_header(self.shard_path(name))
            except ShardError:
                unreadable.append(name)
                continue
            entries = index.setdefault(fp, {})
            for h in clips:
                entries.setdefault(h, name)
        self.unreadable_shards = unreadable
        return {fp: entries for fp, entries in index.items() if entries}

    def _save_index(self, index: Index) -> None:
        """Rewrite index.json when it differs from what is on disk (caller holds the lock)."""
        if index == self._index_on_disk:
            return
        text = json.dumps(index, sort_keys=True, indent=0) + "\n"
        atomic_write_text(self.index_path, text)
        self._index_bytes = text.encode("utf-8")
        self._index_on_disk = {fp: dict(entries) for fp, entries in index.items()}

    def refresh(self) -> None:
        """Pick up shards written by other processes since this cache was opened."""
        self._index = self._merged()

    def entries(self, encoder_fp: Optional[str] = None) -> Index:
        """A copy of the in-memory index, for one encoder or all."""
        if encoder_fp is not None:
            return {encoder_fp: dict(self._index.get(encoder_fp, {}))}
        return {fp: dict(entries) for fp, entries in self._index.items()}

    # ------------------------------------------------------------------ reading and writing

    def contains(self, content_hash: str, encoder_fp: str) -> bool:
        return content_hash in self._index.get(encoder_fp, {})

    def lookup(self, content_hash: str, encoder_fp: str) -> Optional[torch.Tensor]:
        """The cached features of a clip, or None (also when its shard has gone missing)."""
        from safetensors import SafetensorError, safe_open

        name = self._index.get(encoder_fp, {}).get(content_hash)
        if name is None:
            return None
        try:
            with safe_open(str(self.shard_path(name)), framework="pt") as handle:
                return handle.get_tensor(content_hash)
        except (OSError, SafetensorError, KeyError):
            return None

    def add_shard(self, encoder_fp: str, clips: Mapping[str, tuple[torch.Tensor, Mapping]]) -> Optional[str]:
        """Write one shard of ``{content hash: (features, metadata)}`` and index it; its name.

        Clips another process cached meanwhile are left out; None when none is left to write.
        The metadata of a clip (JSON-able: source path, number of samples, ...) goes into the
        shard's header.
        """
        if not encoder_fp:
            raise ValueError("encoder_fp must be a non-empty string")
        with self._locked():
            index = self._merged()
            known = index.get(encoder_fp, {})
            fresh = {h: value for h, value in clips.items() if h not in known}
            if not fresh:
                self._index = index
                self._save_index(index)
                return None
            tensors = {h: t.detach().to("cpu", torch.float32).contiguous().clone() for h, (t, _) in fresh.items()}
            header = {"version": FORMAT_VERSION, "encoder": encoder_fp,
                      "clips": {h: dict(meta) for h, (_, meta) in fresh.items()}}
            metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
            name = f"{next(iter(fresh))[:16]}-{uuid.uuid4().hex}"

            def write(tmp: Path) -> None:
                from safetensors.torch import save_file

                save_file(tensors, str(tmp), metadata=metadata)

            atomic_write(self.shard_path(name), write)
            index.setdefault(encoder_fp, {}).update({h: name for h in fresh})
            self._save_index(index)
            self._index = index
        return name

    # ------------------------------------------------------------------ failures

    def failures(self) -> list[dict]:
        """The records of failures.jsonl (the latest one per path)."""
        records = []
        try:
            text = self.failures_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("path"), str):
                    records.append(record)
        return records

    def record_failures(self, failures: Iterable[tuple[str, str]], resolved: Iterable[str] = (),
                        encoder_fp: Optional[str] = None) -> None:
        """Record ``(path, reason)`` pairs in failures.jsonl, replacing earlier records of the same
        paths; paths in ``resolved`` (now cached) are removed from it."""
        failures = list(failures)
        resolved = set(resolved)
        if not failures and not resolved:
            return
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with self._locked():
            records = {r["path"]: r for r in self.failures()}
            if not failures and not (resolved & set(records)):
                return
            for path in resolved:
                records.pop(path, None)
            for path, reason in failures:
                record = {"path": str(path), "reason": str(reason), "time": now}
                if encoder_fp:
                    record["encoder"] = encoder_fp
                records.pop(str(path), None)  # re-inserted last: the file stays in time order
                records[str(path)] = record
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records.values())
            if text or self.failures_path.exists():
                atomic_write_text(self.failures_path, text)

    # ------------------------------------------------------------------ summary

    def stats(self) -> dict:
        names = self.shard_names()
        size = 0
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                size += self.shard_path(name).stat().st_size
        return {
            "directory": str(self.directory),
            "shards": len(names),
            "clips": sum(len(entries) for entries in self._index.values()),
            "encoders": {fp: len(entries) for fp, entries in sorted(self._index.items())},
            "bytes": size,
            "failures": len(self.failures()),
            "unreadable_shards": list(self.unreadable_shards),
        }
