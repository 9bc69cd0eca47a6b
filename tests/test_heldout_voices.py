"""bench/heldout_voices.py: the held-out voices test set says what its records claim.

Every clip must be espeak-ng saying the record's digit in the voice its meta names, every image
the MNIST test image its meta names, every answer follow from those digits, and the manifest
must read through the project's own reader. espeak-ng is required in CI (SAFE_REQUIRE_ESPEAK).
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data_root
from safe_cli.data.avdigits import NUMBER_WORDS, load_mnist
from safe_cli.data.espeak import espeak_path, synthesise
from safe_cli.data.manifest import read_manifest

REQUIRED = bool(os.environ.get("CI") or os.environ.get("SAFE_REQUIRE_ESPEAK"))
ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("heldout_voices", ROOT / "bench" / "heldout_voices.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    if espeak_path() is None:
        if REQUIRED:
            raise AssertionError("espeak-ng is required here (CI / SAFE_REQUIRE_ESPEAK): apt-get install espeak-ng")
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    if shared_data_root() is None:
        if REQUIRED:
            raise AssertionError("CI has MNIST at ../shared/data")
        pytest.skip("needs MNIST (../shared/data or SAFE_DATA_ROOT)")
    out = tmp_path_factory.mktemp("heldout")
    manifest = _bench().build(out, shared_data_root(), clips=30, per_task=12, seed=3)
    return out, read_manifest(manifest)


def test_every_answer_follows_from_the_digits_in_its_meta(heldout):
    _, records = heldout
    assert Counter(r.task for r in records) == {"audio/digit": 12, "audio/even": 12, "av/same": 12, "av/sum": 12}
    for record in records:
        spoken = record.meta["audio_digit"]
        shown = record.meta.get("image_digit")
        expected = {"audio/digit": str(spoken), "audio/even": "yes" if spoken % 2 == 0 else "no",
                    "av/same": "yes" if shown == spoken else "no",
                    "av/sum": str(shown + spoken) if shown is not None else None}[record.task]
        assert record.answer == expected, record
        assert (record.image is not None) == record.task.startswith("av/")


def test_each_clip_is_espeak_saying_its_digit_in_the_named_voice(heldout, tmp_path):
    _, records = heldout
    clips = {r.audio: r.meta for r in records}
    voices = set()
    for number, (audio, meta) in enumerate(sorted(clips.items())):
        _, voice, speed, pitch = meta["audio_source"].split(":")
        voices.add(voice)
        fresh = synthesise(NUMBER_WORDS[meta["audio_digit"]], tmp_path / f"{number}.wav", voice, int(speed[1:]),
                           int(pitch[1:]))
        assert Path(audio).read_bytes() == fresh.read_bytes(), (audio, meta)
    assert len(voices) >= 5  # a spread of voices, not one


def test_each_image_is_the_mnist_test_image_its_meta_names(heldout):
    _, records = heldout
    test_images = load_mnist(shared_data_root(), "test")
    by_id = {name: i for i, name in enumerate(test_images.ids)}
    for record in (r for r in records if r.image is not None):
        index = by_id[record.meta["image_source"]]  # KeyError: not one of the base's test images
        assert np.array_equal(np.asarray(Image.open(record.image)), test_images.images[index])
        assert int(test_images.labels[index]) == record.meta["image_digit"]
