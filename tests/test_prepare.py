"""safe prepare: the built-in foundation models are built once, cached by content, loaded by real loaders."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safe_cli.cli.main import app
from safe_cli.config import load_profile
from safe_cli.data.avdigits import TASKS
from safe_cli.foundation import prepare as prep
from safe_cli.cache import cached_directory

# A few steps each: these tests check the plumbing, not the accuracy (the note reports that).
FAST = [
    "base.vision_pretrain.steps=3", "base.vision_pretrain.batch_size=32", "base.pretrain.steps=3",
    "base.pretrain.batch_size=4",
    "audio_encoder.tiny_pretrain.steps=3", "audio_encoder.tiny_pretrain.batch_size=4",
    "data.num_train=8", "data.num_eval=3",
]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFE_NO_PROGRESS", "1")
    return tmp_path / "cache"


def test_prepare_builds_once_then_loads_the_same_weights(cache):
    profile = load_profile("demo", FAST)
    first = prep.prepare(profile)
    assert first.base_built and first.audio_encoder_built
    assert set(first.base_accuracy) == set(TASKS)
    assert all(0.0 <= acc <= 1.0 for acc in first.base_accuracy.values())
    assert 0.0 <= first.audio_probe_accuracy <= 1.0
    second = prep.prepare(profile)
    assert not second.base_built and not second.audio_encoder_built
    assert (second.base_path, second.audio_encoder_path) == (first.base_path, first.audio_encoder_path)
    base_a, encoder_a = prep.load_prepared_models(profile)
    base_b, encoder_b = prep.load_prepared_models(profile)
    assert base_a.fingerprint() == base_b.fingerprint()
    assert encoder_a.fingerprint() == encoder_b.fingerprint()
    # A normal Hugging Face directory (model + processor + tokenizer) and a whisper checkpoint.
    assert base_a.processor is not None and base_a.processor.tokenizer.decode([4]) == "user"
    assert encoder_a.num_frames == round(profile.audio_encoder.tiny_window_seconds * 50)


def test_a_cold_build_says_so_and_builds_both_models_side_by_side(cache, monkeypatch, capfd):
    # Both missing on a 2+ core machine: the encoder pretrains in a child process on one
    # thread while the base's vision stage runs here on one; the LLM stage gets every thread.
    import os

    import torch

    monkeypatch.setattr(prep, "SIDE_BY_SIDE_MIN_SECONDS", 0.0)  # FAST builds are too short to pay otherwise
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    profile = load_profile("demo", FAST)
    threads = torch.get_num_threads()
    assert prep.missing_models(profile) == ["tiny LLaVA", "tiny Whisper"]
    report = prep.prepare(profile)
    assert report.base_built and report.audio_encoder_built and prep.missing_models(profile) == []
    assert report.pretraining["audio_encoder"]["process"] != os.getpid()
    assert report.pretraining["audio_encoder"]["threads"] == 1
    vision = report.pretraining["base"]["vision_stage"]
    assert vision["process"] == os.getpid() and vision["threads"] == 1
    assert report.pretraining["base"]["threads"] == threads
    assert torch.get_num_threads() == threads
    plan = capfd.readouterr().err
    assert "pretraining the demo profile's built-in tiny LLaVA and tiny Whisper, about" in plan
    assert str(cache) in plan
    capfd.readouterr()
    prep.prepare(profile)  # warm: nothing to say
    assert "pretraining" not in capfd.readouterr().err


def test_changed_settings_build_a_new_entry(cache):
    a, _ = prep.prepare_base(load_profile("demo", FAST))
    b, built = prep.prepare_base(load_profile("demo", FAST + ["base.pretrain.lr=0.001"]))
    assert built and a != b
    c, built = prep.prepare_base(load_profile("demo", FAST + ["base.pretrain.lr=0.001"]))
    assert not built and c == b


def test_a_crashed_build_leaves_nothing_behind(cache):
    def fails(directory):
        (directory / "half-written").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_directory("thing", {"a": 1}, fails)
    assert [p.name for p in (cache / "thing").iterdir() if not p.name.endswith(".lock")] == []
    path, built = cached_directory("thing", {"a": 1}, lambda d: (d / "ok").write_text("y"))
    assert built and (path / "ok").read_text() == "y"


def test_prepare_json_cli(cache):
    result = CliRunner().invoke(app, ["prepare", "--json", *[x for s in FAST for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["base_accuracy"]) == set(TASKS)
    assert isinstance(report["audio_probe_accuracy"], float)


def test_fsdd_mnist_without_a_root_is_a_clear_error(cache, monkeypatch):
    monkeypatch.delenv("SAFE_DATA_ROOT", raising=False)
    result = CliRunner().invoke(app, ["prepare", "--profile", "avdigits"])
    assert result.exit_code == 2
    assert "data.root" in result.output and "SAFE_DATA_ROOT" in result.output
    assert "Traceback" not in result.output


def test_shifting_processed_pixels_equals_processing_shifted_images():
    # The vision stage shifts processed pixels (the processor runs once for all images); that
    # must be the same augmentation as shifting the raw image and processing it.
    import numpy as np
    import torch
    from PIL import Image

    from safe_cli.foundation.pretrain import _shift, _shift_pixels
    from safe_cli.foundation.tokenizer import build_processor

    processor = build_processor(load_profile("demo").base.tiny)

    def process(arrays):
        return processor.image_processor([Image.fromarray(a).convert("RGB") for a in arrays],
                                         return_tensors="pt")["pixel_values"]

    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    background = process(np.zeros((1, 28, 28), np.uint8))[0, :, 0, 0]
    shifted = _shift_pixels(process(images), background, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    expected = process(np.stack([_shift(image, rng) for image in images]))
    torch.testing.assert_close(shifted, expected)
    assert not torch.equal(shifted, process(images))  # it did move something


def test_examples_encoded_once_batch_as_the_batcher_encodes_them():
    # pretrain_base tokenizes every example once and gathers rows per step; each step's batch
    # must be what the batcher gives for those rows (labels on the answers only, images in row
    # order), or the base would pretrain on shifted labels or on another row's image.
    import numpy as np
    import torch

    from safe_cli.data import avdigits
    from safe_cli.data.batches import PromptBatcher
    from safe_cli.foundation import pretrain
    from safe_cli.foundation.tokenizer import build_processor

    profile = load_profile("demo", ["data.num_train=6"])
    sources = prep.load_sources(profile, "train")
    processor = build_processor(profile.base.tiny)
    base = prep._wrap_tiny(pretrain.build_tiny_llava(profile.base.tiny, 0), processor, profile)
    examples = avdigits.make_examples(sources.images, sources.clips, 6, 0, "train",
                                      tasks=["vl/digit", "text/arith", "vl/even"], retention=False)
    batcher = PromptBatcher(base)
    encoded = pretrain.EncodedExamples.build(batcher, examples, sources.images, chunk=5)  # chunks pad differently
    processed = pretrain.ProcessedImages.build(processor, sources.images)
    rows = np.array([7, 0, 13, 7, 2])
    assert {examples[r].image is None for r in rows} == {True, False}
    got = encoded.batch(rows, processed, np.random.default_rng(3))
    expected = batcher.for_training(pretrain.queries([examples[r] for r in rows], sources.images))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(got[key], expected[key]), key
    with_image = [examples[r].image for r in rows if examples[r].image is not None]
    torch.testing.assert_close(got["pixel_values"], processed.shifted(with_image, np.random.default_rng(3)))
    unshifted = torch.stack([processed.pixels[i] for i in with_image])
    assert (got["pixel_values"] - unshifted).abs().flatten(1).sum(1).gt(0).any()  # shifted, not the raw pixels


@pytest.mark.parametrize("safe_dir, xdg, expected", [
    ("/data/safe-cache", "/xdg", "/data/safe-cache"),      # SAFE_CACHE_DIR wins
    (None, "/xdg", "/xdg/safe"),                             # then XDG_CACHE_HOME
    (None, "", "~/.cache/safe"),                             # empty: unset, per the XDG spec
    (None, "relative/dir", "~/.cache/safe"),                 # relative: invalid, per the XDG spec
    (None, None, "~/.cache/safe"),
])
def test_the_cache_honours_safe_cache_dir_then_xdg_cache_home(monkeypatch, tmp_path, safe_dir, xdg, expected):
    from safe_cli.cache import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in (("SAFE_CACHE_DIR", safe_dir), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert cache_root() == Path(expected.replace("~", str(tmp_path)))


def _side_by_side(monkeypatch):
    import os

    monkeypatch.setattr(prep, "SIDE_BY_SIDE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def _wait_for(condition, seconds: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _building(kind_dir: Path) -> bool:
    return kind_dir.is_dir() and any(p.name.startswith(".") and p.is_dir() for p in kind_dir.iterdir())


def test_work_meanwhile_runs_beside_the_encoder_child_and_its_error_stops_the_child(cache, monkeypatch):
    # Stage A reads its data inside FoundationPretraining: the tiny Whisper pretrains meanwhile
    # in a child; an error there (a bad manifest) must stop the child at once and leave no entry.
    from safe_cli.errors import SafeError

    _side_by_side(monkeypatch)
    profile = load_profile("demo", FAST + ["audio_encoder.tiny_pretrain.steps=100000"])
    with pytest.raises(SafeError, match="bad manifest"):
        with prep.FoundationPretraining(profile) as pretraining:
            child = pretraining._child
            assert child is not None and child.is_alive()
            _wait_for(lambda: _building(cache / "tiny-whisper"))  # the child is building its entry
            raise SafeError("bad manifest")
    assert not child.is_alive()
    assert [p.name for p in (cache / "tiny-whisper").iterdir() if not p.name.endswith(".lock")] == []
    assert prep.missing_models(profile) == ["tiny LLaVA", "tiny Whisper"]


def test_an_encoder_child_that_dies_is_an_error_not_a_hang(cache, monkeypatch):
    import os
    import signal

    from safe_cli.errors import SafeError

    _side_by_side(monkeypatch)
    profile = load_profile("demo", FAST + ["audio_encoder.tiny_pretrain.steps=100000"])
    with pytest.raises(SafeError, match="tiny Whisper: its process ended with exit code -9"):
        with prep.FoundationPretraining(profile) as pretraining:
            _wait_for(lambda: _building(cache / "tiny-whisper"))
            os.kill(pretraining._child.pid, signal.SIGKILL)  # as the kernel's OOM killer would


def test_the_encoder_childs_own_error_is_raised_in_the_parent(cache, monkeypatch):
    import multiprocessing
    import signal

    from safe_cli.errors import SafeError

    def fails(profile):
        raise SafeError("audio_encoder.tiny_pretrain: cannot build")

    monkeypatch.setattr(prep, "prepare_audio_encoder", fails)
    monkeypatch.setattr(prep.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the child's SIGTERM handler, not pytest's
    receiver, sender = multiprocessing.Pipe(duplex=False)
    prep._build_audio_encoder_alone(load_profile("demo", FAST), sender)  # what the child runs
    pretraining = prep.FoundationPretraining(load_profile("demo", FAST))
    pretraining._results, pretraining._child = receiver, type("Done", (), {"join": lambda self: None})()
    with pytest.raises(SafeError, match="cannot build"):
        pretraining._wait_for_encoder()


def test_a_cold_build_before_stage_a_shows_our_line_not_hugging_faces_bars(cache, monkeypatch, capfd):
    from transformers.utils import logging as hf_logging

    _side_by_side(monkeypatch)
    hf_logging.enable_progress_bar()  # as in a fresh process
    with prep.FoundationPretraining(load_profile("demo", FAST)):
        pass
    err = capfd.readouterr().err
    assert "pretraining the demo profile's built-in" in err
    assert "Loading weights" not in err and "Writing model shards" not in err
