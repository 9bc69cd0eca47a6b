"""``safe prepare``: build (or find in the cache) the built-in foundation models and measure them.

For a profile whose base is ``tiny-llava`` and/or whose encoder is ``tiny-whisper``, the model is
pretrained on the profile's AV-digits source and cached under a key made of everything that
decides its weights (dimensions, pretraining settings, data source and a content hash of the
raw data, seed, recipe version). The cached model is a normal checkpoint: the base a
``save_pretrained`` directory (model + processor + tokenizer) loaded with ``from_pretrained``,
the encoder a whisper ``.pt`` loaded with ``whisper.load_model``: the code paths a GPU user
runs with LLaVA-1.5 and Whisper-small.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..atomic import write_json
from ..config.schema import Profile
from ..data import avdigits
from ..data.batches import PromptBatcher, generate_answers
from ..data.scoring import is_correct
from ..errors import SafeError
from ..models.audio_encoders import AudioEncoder, WhisperEncoder, load_audio_encoder
from ..models.base import BaseVLModel, load_base, load_base_from_directory
from . import pretrain
from ..cache import cache_root, cached_directory, is_cached

BASE_EVAL_TASKS = avdigits.TASKS
Sources = avdigits.Sources


def load_sources(profile: Profile, split: str) -> Sources:
    """The AV-digits material the built-in tiny models pretrain on (``data.foundation_source``)."""
    data = profile.data
    return avdigits.load_source(foundation_source(profile), data.root, split, data.split,
                                tuple(data.held_out_speakers), profile.seed)


def foundation_source(profile: Profile) -> str:
    """data.foundation_source, else data.source when it is an AV-digits source, else synthetic."""
    data = profile.data
    if data.foundation_source:
        return data.foundation_source
    return data.source if data.source in ("synthetic", "fsdd-mnist") else "synthetic"


def _data_spec(profile: Profile) -> dict:
    data = profile.data
    source = foundation_source(profile)
    root = avdigits.check_data_root(data.root) if source == "fsdd-mnist" else None
    return {
        "source": source,
        "split": data.split if source == "fsdd-mnist" else None,
        "held_out_speakers": data.held_out_speakers if source == "fsdd-mnist" and data.split == "speakers" else None,
        "content": _fingerprint(source, str(root) if root else None),
        "num_train": data.num_train,
    }


@lru_cache(maxsize=4)
def _fingerprint(source: str, root: Optional[str]) -> str:
    return avdigits.source_fingerprint(source, Path(root) if root else None)


# --------------------------------------------------------------------------- base


def vision_spec(profile: Profile) -> dict:
    return {
        "recipe": pretrain.RECIPE_VERSION,
        "kind": "tiny-llava-vision",
        "tiny": profile.base.tiny.model_dump(),
        "vision_pretrain": profile.base.vision_pretrain.model_dump(),
        "seed": profile.base.seed,
        "data": _data_spec(profile),
    }


def base_spec(profile: Profile) -> dict:
    spec = {**vision_spec(profile), "kind": "tiny-llava", "pretrain": profile.base.pretrain.model_dump()}
    # The base is pretrained in its prompt format; only a non-default one changes the key.
    for key in ("prompt_template", "end_of_answer_ids"):
        if getattr(profile.base, key) is not None:
            spec[key] = getattr(profile.base, key)
    return spec


def prepare_vision_stage(profile: Profile) -> tuple[Path, bool]:
    """The tiny LLaVA after its first stage (vision tower and projector trained on digits).

    Its own cache entry, as CLIP is its own model: the base's second stage starts from it, a
    change to that stage's settings reuses it, and it can be built beside the audio encoder
    (see :class:`FoundationPretraining`).
    """

    def build(directory: Path) -> None:
        from .tokenizer import build_processor

        started = time.perf_counter()
        images = load_sources(profile, "train").images
        model = pretrain.build_tiny_llava(profile.base.tiny, profile.base.seed)
        processed = pretrain.ProcessedImages.build(build_processor(profile.base.tiny), images)
        model.requires_grad_(True)
        losses = pretrain.pretrain_vision_tower(model, processed, images.labels, profile.base.vision_pretrain,
                                                profile.base.seed)
        model.save_pretrained(directory)
        write_json(directory / "pretraining.json", {
            "wall_seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-50:])),
            "process": os.getpid(), "threads": torch.get_num_threads(),
        })

    return cached_directory("tiny-llava-vision", vision_spec(profile), build)


def prepare_base(profile: Profile) -> tuple[Path, bool]:
    """The cached, pretrained tiny LLaVA directory for this profile (built when missing)."""

    def build(directory: Path) -> None:
        from transformers import LlavaForConditionalGeneration

        from .tokenizer import build_processor

        vision_directory, _ = prepare_vision_stage(profile)
        started = time.perf_counter()
        sources = load_sources(profile, "train")
        model = LlavaForConditionalGeneration.from_pretrained(vision_directory, dtype=torch.float32)
        processor = build_processor(profile.base.tiny)
        base = _wrap_tiny(model, processor, profile)
        examples = avdigits.make_examples(
            sources.images, sources.clips, profile.data.num_train, profile.seed, "train",
            tasks=[t for t in avdigits.TASKS if t.split("/")[0] in ("vl", "text")], retention=False,
        )
        base.model.requires_grad_(True)
        # The processor and tokenizer once, before the loop: per batch they cost a fifth of a step.
        processed = pretrain.ProcessedImages.build(processor, sources.images)
        encoded = pretrain.EncodedExamples.build(PromptBatcher(base), examples, sources.images)
        losses = pretrain.pretrain_base(base.model, encoded, processed, profile.base.pretrain, profile.base.seed)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        vision = json.loads((vision_directory / "pretraining.json").read_text())
        seconds = time.perf_counter() - started
        write_json(directory / "pretraining.json", {
            "wall_seconds": seconds + vision["wall_seconds"], "llm_stage_seconds": seconds,
            "final_loss": float(np.mean(losses[-50:])), "examples": len(examples),
            "process": os.getpid(), "threads": torch.get_num_threads(), "vision_stage": vision,
        })

    return cached_directory("tiny-llava", base_spec(profile), build)


def _wrap_tiny(model, processor, profile: Profile) -> BaseVLModel:
    from ..models.base import _wrap

    return _wrap("tiny-llava", model, processor, profile.base.prompt_template, profile.base.end_of_answer_ids)


# --------------------------------------------------------------------------- audio encoder


def audio_spec(profile: Profile) -> dict:
    cfg = profile.audio_encoder
    return {
        "recipe": pretrain.RECIPE_VERSION,
        "kind": "tiny-whisper",
        "dims": {k: getattr(cfg, k) for k in ("tiny_state", "tiny_layers", "tiny_heads", "tiny_window_seconds")},
        "pretrain": cfg.tiny_pretrain.model_dump(),
        "seed": profile.seed,
        "data": _data_spec(profile),
    }


WHISPER_FILE = "tiny-whisper.pt"


def prepare_audio_encoder(profile: Profile) -> tuple[Path, bool]:
    def build(directory: Path) -> None:
        started = time.perf_counter()
        clips = load_sources(profile, "train").clips
        losses = pretrain.pretrain_audio_encoder(profile.audio_encoder, clips, profile.seed, directory / WHISPER_FILE)
        write_json(directory / "pretraining.json", {
            "wall_seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-50:])),
            "clips": len(clips.labels), "process": os.getpid(), "threads": torch.get_num_threads(),
        })

    directory, built = cached_directory("tiny-whisper", audio_spec(profile), build)
    return directory / WHISPER_FILE, built


# --------------------------------------------------------------------------- building both

# Seconds per example seen and per build (data, processing, mel), measured in the demo's cold
# main job on a 2-core AMD EPYC (Zen 4, AVX-512) on 2026-12-04 (bench/cold_main_job.py: vision
# stage 39.8 s, tiny Whisper 45.2 s beside it, LLM stage 58.6 s); only the one-line plan before
# a cold build uses them (vision and audio on one thread each, side by side; the LLM stage on two).
SECONDS_PER_EXAMPLE = {"vision": 0.00022, "base": 0.0011, "audio": 0.0017}
SECONDS_PER_BUILD = 6.0


def missing_models(profile: Profile) -> list[str]:
    """The built-in foundation models this profile uses that are not in the cache yet."""
    missing = []
    if profile.base.kind == "tiny-llava" and not is_cached("tiny-llava", base_spec(profile)):
        missing.append("tiny LLaVA")
    if profile.audio_encoder.kind == "tiny-whisper" and not is_cached("tiny-whisper", audio_spec(profile)):
        missing.append("tiny Whisper")
    return missing


# A child process pays for its own imports (torch, transformers, whisper): a few seconds.
SIDE_BY_SIDE_MIN_SECONDS = 10.0


def _training_seconds(profile: Profile) -> dict[str, float]:
    """Each pretraining loop's expected seconds: examples seen x SECONDS_PER_EXAMPLE."""
    configs = {"vision": profile.base.vision_pretrain, "base": profile.base.pretrain,
               "audio": profile.audio_encoder.tiny_pretrain}
    return {part: cfg.steps * cfg.batch_size * SECONDS_PER_EXAMPLE[part] for part, cfg in configs.items()}


def _side_by_side(profile: Profile, missing: list[str]) -> bool:
    # The vision tower is too small for a second intra-op thread to help (a step takes the same
    # time on 1 thread as on 2), so on 2+ cores the encoder pretrains on the other core meanwhile,
    # when that outlasts a child's start. The LLM stage, which 2 threads speed up 1.6x, comes after.
    if len(missing) < 2 or (os.cpu_count() or 1) < 2 or is_cached("tiny-llava-vision", vision_spec(profile)):
        return False
    seconds = _training_seconds(profile)
    return min(seconds["vision"], seconds["audio"]) >= SIDE_BY_SIDE_MIN_SECONDS


def planned_seconds(profile: Profile, missing: list[str]) -> float:
    seconds = _training_seconds(profile)
    vision = llm = encoder = 0.0
    if "tiny LLaVA" in missing:
        if not is_cached("tiny-llava-vision", vision_spec(profile)):
            vision = seconds["vision"] + SECONDS_PER_BUILD
        llm = seconds["base"] + SECONDS_PER_BUILD
    if "tiny Whisper" in missing:
        encoder = seconds["audio"] + 2 * SECONDS_PER_BUILD
    first = max(vision, encoder) if _side_by_side(profile, missing) else vision + encoder
    return first + llm


def _quiet_hugging_face() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what happens; HF's per-shard bars are noise


def _build_audio_encoder_alone(profile: Profile, results) -> None:
    """The encoder's build in its own process, one thread, no progress bar (the base's is shown).

    Sends ``None`` or the error through ``results`` (one end of a pipe), for the parent to raise.
    """
    import signal

    os.environ["SAFE_NO_PROGRESS"] = "1"
    # Stopped by the parent (it met an error meanwhile): leave by an exception, so the cache
    # removes the half-built entry's temporary folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    torch.set_num_threads(1)
    try:
        prepare_audio_encoder(profile)
    except Exception as error:  # noqa: BLE001 - every error goes to the parent, which raises it
        results.send(error)
        return
    results.send(None)


class FoundationPretraining:
    """Pretraining of the profile's built-in models that are not cached, begun before other work.

    Entered, it says in one line what it will build and, when both models are missing on 2+
    cores, starts the tiny Whisper's pretraining in a child process on one thread. The caller's
    own work (Stage A reads its data: on the demo's first run, a 10 s export) then runs beside
    that child instead of before it. Left normally, it builds the base: the vision stage on one
    thread beside the child, then, with the encoder done, the LLM stage on every thread. Left by
    an error, it stops the child, so a bad manifest is reported at once. The cache's lock and
    atomic rename keep this safe against other processes too.
    """

    def __init__(self, profile: Profile):
        self.profile = profile
        self.missing = missing_models(profile)
        self._child = None
        self._results = None

    def __enter__(self) -> "FoundationPretraining":
        if not self.missing:
            return self
        _quiet_hugging_face()
        print(f"pretraining the {self.profile.name} profile's built-in {' and '.join(self.missing)}, about "
              f"{planned_seconds(self.profile, self.missing):.0f} s on a 2-core CPU, once; cached in {cache_root()}",
              file=sys.stderr, flush=True)
        if _side_by_side(self.profile, self.missing):
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
            self._results, sender = context.Pipe(duplex=False)
            self._child = context.Process(target=_build_audio_encoder_alone, args=(self.profile, sender),
                                          name="safe-pretrain-tiny-whisper", daemon=True)
            self._child.start()
            sender.close()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self._stop()
            return
        try:
            self._finish()
        finally:
            self._stop()

    def _finish(self) -> None:
        profile = self.profile
        if self._child is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                prepare_vision_stage(profile)
            finally:
                torch.set_num_threads(threads)
            self._wait_for_encoder()
        if "tiny LLaVA" in self.missing:
            prepare_base(profile)
        if "tiny Whisper" in self.missing:
            prepare_audio_encoder(profile)  # found in the cache when the child built it

    def _wait_for_encoder(self) -> None:
        """The child's end; its error raised here, or one saying how it died."""
        try:
            error = self._results.recv()
        except EOFError:  # it died before sending anything (killed, out of memory)
            self._child.join()
            raise SafeError(f"pretraining the tiny Whisper: its process ended with exit code {self._child.exitcode} "
                            "before it finished") from None
        self._child.join()
        if error is not None:
            raise error

    def _stop(self) -> None:
        if self._child is not None:
            if self._child.is_alive():
                self._child.terminate()
            self._child.join()
            self._results.close()
            self._child = None


def ensure_foundation(profile: Profile) -> None:
    """Pretrain the profile's built-in models that are not cached, saying so first in one line."""
    with FoundationPretraining(profile):
        pass


# --------------------------------------------------------------------------- loading


def load_prepared_audio_encoder(profile: Profile, device: Union[str, torch.device] = "cpu") -> AudioEncoder:
    """The profile's frozen audio encoder; the built-in tiny-whisper pretrained (cached) first."""
    if profile.audio_encoder.kind == "tiny-whisper":
        path, _ = prepare_audio_encoder(profile)
        return WhisperEncoder.load(str(path), device, profile.audio_encoder.whisper.trim_to_clip)
    return load_audio_encoder(profile.audio_encoder, device, profile.seed)


def load_prepared_models(profile: Profile, device: Union[str, torch.device] = "cpu") -> tuple[BaseVLModel, AudioEncoder]:
    """The profile's frozen base and audio encoder, with the built-in tiny ones pretrained (cached)."""
    _quiet_hugging_face()
    ensure_foundation(profile)
    if profile.base.kind == "tiny-llava":
        directory, _ = prepare_base(profile)
        base = load_base_from_directory("tiny-llava", directory, profile.base.dtype, device,
                                        prompt_template=profile.base.prompt_template,
                                        end_of_answer=profile.base.end_of_answer_ids)
    else:
        base = load_base(profile.base, device)
    return base, load_prepared_audio_encoder(profile, device)


# --------------------------------------------------------------------------- measuring


def base_accuracy(base: BaseVLModel, profile: Profile, batch_size: int = 64) -> dict[str, float]:
    """Per-task accuracy of the frozen base on the test split, given what it can see (no audio)."""
    sources = load_sources(profile, "test")
    examples = avdigits.make_examples(sources.images, sources.clips, profile.data.num_eval, profile.seed, "test",
                                      tasks=BASE_EVAL_TASKS, retention=False)
    batcher = PromptBatcher(base)
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        answers = generate_answers(base.model, batcher, pretrain.queries(chunk, sources.images, with_answers=False))
        for example, answer in zip(chunk, answers):
            correct.setdefault(example.task, []).append(is_correct(answer, example.answers))
    return {task: float(np.mean(values)) for task, values in correct.items()}


def audio_probe_accuracy(encoder: AudioEncoder, profile: Profile) -> float:
    """Linear-probe digit accuracy of the frozen encoder: fit on train clips, score on test clips."""
    train, test = load_sources(profile, "train").clips, load_sources(profile, "test").clips
    rate = encoder.sample_rate
    train_x = pretrain.clip_embeddings(encoder, pretrain.clips_at(train, rate))
    test_x = pretrain.clip_embeddings(encoder, pretrain.clips_at(test, rate))
    return pretrain.linear_probe_accuracy(train_x, torch.as_tensor(train.labels), test_x, torch.as_tensor(test.labels))


@dataclass
class PrepareReport:
    base_path: Optional[str]
    audio_encoder_path: Optional[str]
    base_built: bool
    audio_encoder_built: bool
    base_accuracy: dict[str, float]
    audio_probe_accuracy: Optional[float]
    pretraining: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(profile: Profile, device: Union[str, torch.device] = "cpu") -> PrepareReport:
    """Build or load the foundation models and measure them on the test split."""
    _quiet_hugging_face()
    timings: dict[str, float] = {}
    pretraining: dict[str, dict] = {}
    base_path = audio_path = None
    base_built = audio_built = False
    started = time.perf_counter()
    missing = missing_models(profile)
    ensure_foundation(profile)
    if profile.base.kind == "tiny-llava":
        directory, _ = prepare_base(profile)
        base_built = "tiny LLaVA" in missing
        base_path = str(directory)
        pretraining["base"] = json.loads((directory / "pretraining.json").read_text())
    if profile.audio_encoder.kind == "tiny-whisper":
        path, _ = prepare_audio_encoder(profile)
        audio_built = "tiny Whisper" in missing
        audio_path = str(path)
        pretraining["audio_encoder"] = json.loads((path.parent / "pretraining.json").read_text())
    base, encoder = load_prepared_models(profile, device)  # from the cache now: no second build
    timings["build_or_load"] = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = base_accuracy(base, profile)
    timings["base_eval"] = time.perf_counter() - started
    started = time.perf_counter()
    probe = audio_probe_accuracy(encoder, profile)
    timings["audio_probe"] = time.perf_counter() - started
    return PrepareReport(base_path, audio_path, base_built, audio_built, accuracy, probe, pretraining, timings)
