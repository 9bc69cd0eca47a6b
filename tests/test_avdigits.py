"""AV-digits: determinism, answers checked against the source labels, splits, manifests, data-root errors."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data_root
from safe_cli.data import avdigits
from safe_cli.data.manifest import read_manifest
from safe_cli.errors import SafeError

DATA = shared_data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="real data not found (../shared/data or SAFE_DATA_ROOT)")


def dtmf_digit(wave: np.ndarray, rate: int) -> int:
    """Decode a DTMF clip independently of the generator: the strongest row and column tones."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / rate)

    def power(f):
        band = (freqs > f * 0.97) & (freqs < f * 1.03)
        return spectrum[band].max()

    low = max((697, 770, 852, 941), key=power)
    high = max((1209, 1336, 1477), key=power)
    keypad = {(697, 1209): 1, (697, 1336): 2, (697, 1477): 3, (770, 1209): 4, (770, 1336): 5,
              (770, 1477): 6, (852, 1209): 7, (852, 1336): 8, (852, 1477): 9, (941, 1336): 0}
    return keypad[(low, high)]


def expected_answer(example, shown, spoken) -> str:
    """The answer of each family, written again from the labels (not from the generator)."""
    task = example.task
    if task == "text/arith":
        a, op, b = re.match(r"What is (\d+) (plus|minus) (\d+)\?", example.question).groups()
        return str(int(a) + int(b) if op == "plus" else int(a) - int(b))
    return {
        "vl/digit": lambda: str(shown),
        "vl/even": lambda: "yes" if shown in (0, 2, 4, 6, 8) else "no",
        "vl/gt5": lambda: "yes" if shown in (6, 7, 8, 9) else "no",
        "audio/digit": lambda: str(spoken),
        "audio/even": lambda: "yes" if spoken in (0, 2, 4, 6, 8) else "no",
        "av/same": lambda: "yes" if shown == spoken else "no",
        "av/sum": lambda: str(shown + spoken),
    }[task]()


def test_synthetic_is_deterministic_given_a_seed():
    a = avdigits.synthetic_images(20, 7, "train"), avdigits.synthetic_clips(20, 7, "train")
    b = avdigits.synthetic_images(20, 7, "train"), avdigits.synthetic_clips(20, 7, "train")
    c = avdigits.synthetic_images(20, 8, "train")
    assert np.array_equal(a[0].images, b[0].images) and np.array_equal(a[0].labels, b[0].labels)
    assert all(np.array_equal(x, y) for x, y in zip(a[1].waves, b[1].waves))
    assert not np.array_equal(a[0].images, c.images)
    ex_a = avdigits.make_examples(*a, per_task=5, seed=7, split="train")
    ex_b = avdigits.make_examples(*b, per_task=5, seed=7, split="train")
    assert ex_a == ex_b
    assert ex_a != avdigits.make_examples(*a, per_task=5, seed=8, split="train")


def test_synthetic_train_and_test_differ():
    train, test = avdigits.synthetic_images(20, 0, "train"), avdigits.synthetic_images(20, 0, "test")
    assert not np.array_equal(train.images, test.images)


def test_synthetic_clips_carry_their_digit_as_dtmf():
    clips = avdigits.synthetic_clips(60, 3, "test")
    decoded = [dtmf_digit(w, clips.sample_rate) for w in clips.waves]
    assert decoded == clips.labels.tolist()
    assert set(clips.labels.tolist()) == set(range(10))


def test_synthetic_images_look_like_digits():
    images = avdigits.synthetic_images(50, 0, "train")
    assert images.images.shape == (50, 28, 28) and images.images.dtype == np.uint8
    # A bright glyph in the middle over a dark, noisy background, like MNIST.
    centre = images.images[:, 8:20, 8:20].astype(float).max(axis=(1, 2))
    border = images.images[:, :3, :].astype(float).mean(axis=(1, 2))
    assert (centre > 150).all() and border.mean() < 60


def test_every_family_present_with_answers_matching_labels():
    images, clips = avdigits.synthetic_images(200, 1, "test"), avdigits.synthetic_clips(200, 1, "test")
    examples = avdigits.make_examples(images, clips, per_task=30, seed=1, split="test")
    tasks = {e.task for e in examples}
    assert tasks == set(avdigits.TASKS)
    spoken_by_dtmf = {}
    for example in examples:
        shown = int(images.labels[example.image]) if example.image is not None else None
        spoken = None
        if example.clip is not None:
            if example.clip not in spoken_by_dtmf:
                spoken_by_dtmf[example.clip] = dtmf_digit(clips.waves[example.clip], clips.sample_rate)
            spoken = spoken_by_dtmf[example.clip]
        needs_image, needs_audio = avdigits.task_needs(example.task)
        assert (example.image is not None) == needs_image, example
        if needs_audio:
            assert example.clip is not None
        assert example.answer == expected_answer(example, shown, spoken), example
        assert example.answer in example.answers
    retention = [e for e in examples if e.is_retention]
    assert {e.task for e in retention} == {"vl/digit", "vl/even", "vl/gt5", "text/arith"}
    assert len(retention) == 4 * 30
    same = [e.answer for e in examples if e.task == "av/same"]
    assert 0.3 < same.count("yes") / len(same) < 0.7  # balanced, not 90% "no"


def test_split_written_as_manifest_and_files(tmp_path):
    images, clips = avdigits.synthetic_images(30, 2, "test"), avdigits.synthetic_clips(30, 2, "test")
    examples = avdigits.make_examples(images, clips, per_task=4, seed=2, split="test")
    path = avdigits.write_split(tmp_path / "avd", "test", examples, images, clips)
    records = read_manifest(path)
    assert len(records) == len(examples)
    for record, example in zip(records, examples):
        assert record.task == example.task and record.answer == example.answer
        assert (record.image is not None) == (example.image is not None)
        assert (record.audio is not None) == (example.clip is not None)
        if record.image:
            from PIL import Image

            assert np.array_equal(np.asarray(Image.open(record.image)), images.images[example.image])
        if record.audio:
            from safe_cli.data.audio_io import load_audio

            wave = load_audio(record.audio, clips.sample_rate)
            assert dtmf_digit(wave, clips.sample_rate) == int(clips.labels[example.clip])


@pytest.mark.parametrize("layout, missing", [
    (None, "needs the directory"),
    ("nothing", "is not a directory"),
    ("empty", "fsdd/recordings/*.wav"),
    ("no-labels", "t10k-labels-idx1-ubyte.gz"),
])
def test_incomplete_data_root_names_what_is_missing(tmp_path, layout, missing):
    root = None
    if layout == "nothing":
        root = str(tmp_path / "absent")
    elif layout is not None:
        root = str(tmp_path)
        if layout == "no-labels":
            (tmp_path / "fsdd" / "recordings").mkdir(parents=True)
            (tmp_path / "fsdd" / "recordings" / "0_theo_0.wav").write_bytes(b"x")
            (tmp_path / "mnist").mkdir()
            (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(SafeError, match=re.escape(missing)) as info:
        avdigits.check_data_root(root)
    assert "data.root" in str(info.value)


def _mnist_labels(root: Path) -> np.ndarray:
    with gzip.open(root / "mnist" / "t10k-labels-idx1-ubyte.gz") as handle:
        raw = handle.read()
    assert int.from_bytes(raw[:4], "big") == 2049
    return np.frombuffer(raw[8:], dtype=np.uint8)


@needs_data
def test_fsdd_splits_follow_the_conventions():
    test = avdigits.fsdd_files(DATA, "test", "takes", [])
    train = avdigits.fsdd_files(DATA, "train", "takes", [])
    assert len(test) == 300 and len(train) == 2700
    assert all(take <= 4 for _, _, _, take in test)
    held = avdigits.fsdd_files(DATA, "test", "speakers", ["theo"])
    assert len(held) == 500 and {s for _, _, s, _ in held} == {"theo"}
    assert "theo" not in {s for _, _, s, _ in avdigits.fsdd_files(DATA, "train", "speakers", ["theo"])}


@needs_data
def test_real_answers_match_mnist_labels_and_fsdd_file_names():
    labels = _mnist_labels(DATA)
    images = avdigits.load_mnist(DATA, "test")
    assert len(images.labels) == 2000
    clips = avdigits.load_fsdd(DATA, "test")
    examples = avdigits.make_examples(images, clips, per_task=40, seed=0, split="test")
    for example in examples:
        shown = spoken = None
        if example.image is not None:
            shown = int(labels[int(images.ids[example.image].split(":")[1])])  # MNIST's own label file
        if example.clip is not None:
            spoken = int(Path(clips.paths[example.clip]).name.split("_")[0])  # FSDD's file name
        assert example.answer == expected_answer(example, shown, spoken), example
