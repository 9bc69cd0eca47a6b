"""Fill a :class:`~safe_cli.features.cache.FeatureCache` with a frozen encoder's features.

Every input file is hashed first (cheap), clips already cached for this encoder are skipped
and identical files are encoded once. The rest is done in chunks of ``shard_size`` clips:
decode (``load_audio_many``, the next chunk decoding in the background while this one is
encoded), run the encoder in batches, write one shard. A killed run loses at most the chunk in
progress. Files that cannot be read or decoded are listed in ``failures.jsonl``; the good files
of the same chunk are still cached.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..data.audio_io import load_audio_many
from ..errors import RunFailed
from .cache import FeatureCache, content_hash


@dataclass
class EncodeReport:
    """What a run did. ``total`` and ``failed`` count input files; ``unique``, ``reused`` and
    ``encoded`` count distinct contents (a file present twice is one clip)."""

    total: int
    unique: int
    reused: int
    encoded: int
    failed: int
    shards_written: int
    seconds: float
    clips_per_second: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    encoder: str = ""


def encoder_fingerprint(encoder) -> str:
    """The cache key's encoder half: class, sample rate and a hash of every weight, plus the
    encoder's variant when it has one (whisper trimmed to the clip: ``...+trim50``)."""
    return f"{type(encoder).__name__}:{encoder.sample_rate}:{encoder.fingerprint()}"


def _read_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "not a regular file"
    return f"cannot read: {exc.strerror or exc}"


@contextlib.contextmanager
def _bar(description: str, total: int, show: bool) -> Iterator[Callable[..., None]]:
    if not show or total == 0:
        yield lambda **fields: None
        return
    from ..progress import progress_bar

    with progress_bar(description, total) as advance:
        yield advance


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def encode_audio(
    paths: Iterable,
    cache: FeatureCache,
    encoder,
    batch_size: int = 16,
    workers: int = 0,
    shard_size: int = 64,
    progress: bool = True,
) -> EncodeReport:
    """Encode every file not yet cached for ``encoder``; see the module docstring."""
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise ValueError(f"need batch_size >= 1, shard_size >= 1, workers >= 0; got {batch_size}, {shard_size}, {workers}")
    started = time.perf_counter()
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    fp = encoder_fingerprint(encoder)
    failures: dict[str, str] = {}

    # 1. hash: {content hash: every path with those bytes}, in input order
    by_hash: dict[str, list[str]] = {}
    with _bar("hashing", len(paths), progress and len(paths) > 200) as advance:
        for path in paths:
            try:
                by_hash.setdefault(content_hash(path), []).append(path)
            except OSError as exc:
                failures[path] = _read_error(exc)
            advance()

    todo = [h for h in by_hash if not cache.contains(h, fp)]
    reused = len(by_hash) - len(todo)
    encoded = shards_written = 0
    chunks = list(_chunks(todo, shard_size))

    def decode(chunk: Sequence[str]):
        return load_audio_many([by_hash[h][0] for h in chunk], encoder.sample_rate, workers)

    encode_started = time.perf_counter()
    done = 0
    try:
        with _bar("encoding", len(todo), progress) as advance, ThreadPoolExecutor(1) as prefetcher:
            pending: Optional[Future] = prefetcher.submit(decode, chunks[0]) if chunks else None
            for i, chunk in enumerate(chunks):
                waves, errors = pending.result()
                pending = prefetcher.submit(decode, chunks[i + 1]) if i + 1 < len(chunks) else None
                reasons = {e.path: e.reason for e in errors}

                cache.refresh()  # another process may have cached some of these meanwhile
                ready: list[tuple[str, np.ndarray]] = []
                for h, wave in zip(chunk, waves):
                    if cache.contains(h, fp):
                        reused += 1
                    elif wave is None:
                        for path in by_hash[h]:
                            failures[path] = reasons.get(by_hash[h][0], "could not be decoded")
                    else:
                        ready.append((h, wave))

                features, encoder_errors = _encode(encoder, ready, batch_size)
                for h, reason in encoder_errors.items():
                    for path in by_hash[h]:
                        failures[path] = reason
                if len(encoder_errors) >= 2 and not features:
                    first = next(iter(encoder_errors.values()))
                    raise RunFailed(
                        f"the encoder failed on every clip of a chunk ({len(encoder_errors)} clips; first: {first}); "
                        f"this looks like a problem with the encoder or device rather than the files. "
                        f"{shards_written} shard(s) written before it are kept in {cache.directory}"
                    )
                if features:
                    shard = cache.add_shard(fp, {
                        h: (tensor, {"path": by_hash[h][0], "samples": int(len(wave)), "sample_rate": encoder.sample_rate})
                        for h, (tensor, wave) in features.items()
                    })
                    shards_written += shard is not None
                    encoded += len(features)
                for _ in chunk:
                    done += 1
                    elapsed = time.perf_counter() - encode_started
                    advance(**{"clips/s": f"{done / elapsed:.1f}" if elapsed > 0 else "-"})
    finally:
        # Also when the run stops early: what failed so far is listed.
        cached_paths = [p for h, ps in by_hash.items() if cache.contains(h, fp) for p in ps]
        cache.record_failures(sorted(failures.items()), resolved=cached_paths, encoder_fp=fp)

    seconds = time.perf_counter() - started
    encode_seconds = time.perf_counter() - encode_started
    return EncodeReport(
        total=len(paths),
        unique=len(by_hash),
        reused=reused,
        encoded=encoded,
        failed=len(failures),
        shards_written=shards_written,
        seconds=round(seconds, 3),
        clips_per_second=round(encoded / encode_seconds, 2) if encoded and encode_seconds > 0 else 0.0,
        failures=sorted(failures.items()),
        encoder=fp,
    )


def _encode(encoder, ready: list[tuple[str, np.ndarray]], batch_size: int):
    """({hash: (features on CPU, float32; wave)}, {hash: reason}) for the decoded clips.

    A batch the encoder fails on is retried clip by clip, so one odd clip (or a batch too big
    for the device) costs only that clip. Each clip keeps the rows the encoder says are its own
    (``feature_lengths``): a whisper encoder trimmed to the clip pads a batch to its longest
    clip, and the cache stores every clip at its own length, as if it had been encoded alone.
    """
    features: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    errors: dict[str, str] = {}
    for batch in _chunks(ready, batch_size):
        if len(batch) > 1:
            try:
                out = _run(encoder, [wave for _, wave in batch])
            except Exception:  # noqa: BLE001 - retried clip by clip below
                out = None
            if out is not None:
                for (h, wave), tensor in zip(batch, out):
                    features[h] = (tensor, wave)
                continue
        for h, wave in batch:
            try:
                features[h] = (_run(encoder, [wave])[0], wave)
            except Exception as exc:  # noqa: BLE001 - the file is listed, the run goes on
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                errors[h] = f"encoder failed: {type(exc).__name__}" + (f": {message}" if message else "")
    return features, errors


def _run(encoder, waves: list[np.ndarray]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = encoder(waves).detach().to("cpu", torch.float32)
    lengths = getattr(encoder, "feature_lengths", lambda _: None)(waves)
    return list(out) if lengths is None else [tensor[:n] for tensor, n in zip(out, lengths)]
