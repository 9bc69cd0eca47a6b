"""Unit tests of manifest reading, validation and writing."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from safe_cli.data.manifest import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    TASK_KINDS,
    ManifestError,
    Record,
    read_manifest,
    write_manifest,
)
from safe_cli.errors import SafeError


@pytest.fixture(autouse=True)
def _elsewhere(monkeypatch, tmp_path):
    """Run from a directory that is neither the manifest's nor the media's."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


@pytest.fixture
def data(tmp_path) -> Path:
    """A data directory with small real media files."""
    root = tmp_path / "data"
    for rel in ("img/1.png", "img/2.png", "wav/3.wav", "wav/5.wav"):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"\x89PNG fake" if f.suffix == ".png" else b"RIFF fake")
    return root


def human(value: str) -> dict:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def raw(rid="r1", task="vl/digit", image="img/1.png", audio=None, question="Which digit is shown?", answer="one",
        **extra):
    """A raw LLaVA-format record; placeholders follow the media it carries."""
    prefix = (f"{IMAGE_PLACEHOLDER}\n" if image else "") + (f"{AUDIO_PLACEHOLDER}\n" if audio else "")
    obj = {"id": rid, "task": task, "conversations": [human(prefix + question), gpt(answer)]}
    if image is not None:
        obj["image"] = image
    if audio is not None:
        obj["audio"] = audio
    obj.update(extra)
    return obj


def write_raw(path: Path, objects: list, fmt: str | None = None) -> Path:
    """Write raw objects (or raw text lines, for str items) as JSONL or a JSON list."""
    fmt = fmt or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(objects, indent=1))
    else:
        path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


def sample_records(data: Path) -> list[Record]:
    img1, img2 = str(data / "img/1.png"), str(data / "img/2.png")
    wav3, wav5 = str(data / "wav/3.wav"), str(data / "wav/5.wav")
    return [
        Record("vl-1", "vl/digit", "Which digit is shown?", "one", ("one",), image=img1),
        Record("audio-3", "audio/digit", "Which digit is spoken?", "three", ("three", "3"), audio=wav3,
               meta={"audio_digit": 3}),
        Record("av-8", "av/sum", "Add the shown and the spoken digit.", "eight", ("eight",), image=img2, audio=wav5,
               meta={"image_digit": 3, "audio_digit": 5, "nested": {"speaker": "jackson", "take": [1, 2]}}),
        Record("text-1", "text/arith", "What is 2 + 2?", "four", ("four", "4")),
        Record("vl-distractor", "vl/digit", "Which digit is shown?", "one", ("one",), image=img1, audio=wav3),
        Record("ünï", "text/echo", "Sag „hallo“\nzweimal.\u2028Danke", "hallo hallo", ("hallo hallo",)),
    ]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_round_trip(data, suffix):
    records = sample_records(data)
    path = data / "manifests" / f"train{suffix}"  # a subdirectory: media paths go through ..
    assert write_manifest(records, path) == path
    assert read_manifest(path) == records
    assert [r.kind for r in read_manifest(path)] == ["vl", "audio", "av", "text", "vl", "text"]

    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # not splitlines(): U+2028 inside a string is not a line break
    objects = json.loads(text) if suffix == ".json" else [json.loads(line) for line in lines]
    if suffix == ".json":
        assert text.startswith("[\n {")  # indent=1
    else:
        assert len(lines) == len(records)
    assert objects[0]["image"] == os.path.join("..", "img", "1.png")
    assert objects[2]["audio"] == os.path.join("..", "wav", "5.wav")
    assert "image" not in objects[3] and "audio" not in objects[3]
    assert "answers" not in objects[0]  # the default is not spelled out
    assert objects[1]["answers"] == ["three", "3"]
    assert objects[2]["conversations"][0]["value"] == "<image>\n<audio>\nAdd the shown and the spoken digit."
    assert objects[5]["id"] == "ünï"
    assert not [p.name for p in path.parent.iterdir() if p.name != path.name]  # no temp file left


def test_round_trip_survives_moving_the_data_directory(data, tmp_path):
    write_manifest(sample_records(data), data / "m.jsonl")
    moved = tmp_path / "moved"
    data.rename(moved)
    records = read_manifest(moved / "m.jsonl")
    assert records == sample_records(moved)


def test_write_overwrites_and_creates_parents(data, tmp_path):
    path = tmp_path / "out" / "deep" / "m.jsonl"
    write_manifest(sample_records(data), path)
    write_manifest(sample_records(data)[:2], path)
    assert read_manifest(path) == sample_records(data)[:2]


def test_write_refuses_records_that_would_not_read_back(data, tmp_path):
    a = sample_records(data)[0]
    with pytest.raises(ManifestError, match=r"record 2 \(id vl-1\): id: duplicate"):
        write_manifest([a, a], tmp_path / "m.jsonl")
    bad_task = Record("x", "video/clip", "q", "a", ("a",))
    with pytest.raises(ManifestError, match="task"):
        write_manifest([bad_task], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_to_json(data):
    rec = sample_records(data)[2]
    assert rec.to_json()["image"] == str(data / "img/2.png")
    out = rec.to_json(relative_to=data)
    assert out == {
        "id": "av-8",
        "image": os.path.join("img", "2.png"),
        "audio": os.path.join("wav", "5.wav"),
        "task": "av/sum",
        "conversations": [human("<image>\n<audio>\nAdd the shown and the spoken digit."), gpt("eight")],
        "meta": rec.meta,
    }


# --------------------------------------------------------------------------- reading details


def test_relative_paths_resolve_against_the_manifest_directory(data, tmp_path):
    # The cwd holds a decoy img/1.png; the manifest's directory must win.
    (Path.cwd() / "img").mkdir()
    (Path.cwd() / "img" / "1.png").write_bytes(b"decoy")
    path = write_raw(data / "m.jsonl", [raw(audio="wav/3.wav")])
    [rec] = read_manifest(path)
    assert rec.image == str(data / "img" / "1.png")
    assert rec.audio == str(data / "wav" / "3.wav")
    assert Path(rec.image).is_absolute()

    # A relative manifest path works too.
    rel = Path(os.path.relpath(path, Path.cwd()))
    assert read_manifest(rel) == [rec]

    # And a file only the cwd has is not found.
    write_raw(data / "m2.jsonl", [raw()])
    (data / "img" / "1.png").unlink()
    with pytest.raises(ManifestError, match="image: file not found"):
        read_manifest(data / "m2.jsonl")


def test_absolute_paths_and_extras(data):
    obj = raw(rid=7, image=str(data / "img/2.png"), llava_extra={"source": "coco"}, audio=None)
    obj["audio"] = None  # explicit null is the same as absent
    path = write_raw(data / "m.jsonl", ["", obj, "   "])  # blank lines are skipped
    [rec] = read_manifest(path)
    assert rec == Record("7", "vl/digit", "Which digit is shown?", "one", ("one",), image=str(data / "img/2.png"))


@pytest.mark.parametrize(
    "value, question",
    [
        ("<image>\nWhich digit is shown?", "Which digit is shown?"),
        ("Which digit is shown?\n<image>", "Which digit is shown?"),
        ("  <image>  Which digit is shown?  ", "Which digit is shown?"),
        ("Which digit\n<image>\nis shown?", "Which digit is shown?"),
        ("Which digit is shown?", "Which digit is shown?"),  # the placeholder may be left out
    ],
)
def test_question_drops_placeholders(data, value, question):
    obj = raw()
    obj["conversations"][0]["value"] = value
    [rec] = read_manifest(write_raw(data / "m.jsonl", [obj]))
    assert rec.question == question


def test_multi_turn_records_keep_every_exchange(data):
    # The last exchange is the one scored; the earlier ones are history that training labels too.
    obj = raw()
    obj["conversations"] = [human("<image>\nWhich?"), gpt("one"), human("Sure?"), gpt("yes")]
    [rec] = read_manifest(write_raw(data / "m.jsonl", [obj]))
    assert (rec.question, rec.answer, rec.answers) == ("Sure?", "yes", ("yes",))
    assert rec.history == (("Which?", "one"),)
    path = write_manifest([rec], data / "again.jsonl")
    assert read_manifest(path) == [rec]


def test_distractor_clip_records_are_accepted(data):
    objects = [
        raw("vl", "vl/digit", image="img/1.png", audio="wav/3.wav"),
        raw("text", "text/arith", image=None, audio="wav/5.wav", question="2+2?", answer="4"),
    ]
    vl, text = read_manifest(write_raw(data / "m.json", objects))
    assert vl.kind == "vl" and vl.audio == str(data / "wav/3.wav")
    assert text.kind == "text" and text.audio == str(data / "wav/5.wav") and text.image is None


def test_check_files_false_skips_existence_but_still_resolves(data):
    path = write_raw(data / "m.jsonl", [raw(image="img/missing.png")])
    with pytest.raises(ManifestError):
        read_manifest(path)
    [rec] = read_manifest(path, check_files=False)
    assert rec.image == str(data / "img" / "missing.png")


@pytest.mark.parametrize("name, as_list", [("m.txt", True), ("m.manifest", False)])
def test_other_extensions_are_sniffed(data, name, as_list):
    good = raw()
    text = json.dumps([good], indent=1) if as_list else json.dumps(good) + "\n" + json.dumps(raw("r2")) + "\n"
    (data / name).write_text("\n  " + text)
    assert [r.id for r in read_manifest(data / name)] == (["r1"] if as_list else ["r1", "r2"])


def test_task_kinds():
    assert TASK_KINDS == ("vl", "text", "audio", "av")
    assert Record("x", "av/sum", "q", "a", ("a",)).kind == "av"


def test_records_are_frozen_and_comparable(data):
    a, b = sample_records(data)[2], sample_records(data)[2]
    assert a == b and a is not b
    assert hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.id = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- broken manifests


def _drop(key):
    def edit(obj):
        del obj[key]
    return edit


def _set(key, value):
    def edit(obj):
        obj[key] = value
    return edit


def _conv(index, key, value):
    def edit(obj):
        obj["conversations"][index][key] = value
    return edit


def _no_image(obj):
    obj["image"] = None
    obj["conversations"][0]["value"] = "Which digit is shown?"


def _two_images(obj):
    del obj["image"]
    obj["images"] = ["img/1.png", "img/2.png"]


def _turns(*turns):
    return _set("conversations", list(turns))


# (case id, edit applied to a good record, key the message must name, words it must contain)
BROKEN = [
    ("missing id", _drop("id"), "id", "missing"),
    ("empty id", _set("id", "  "), "id", "non-empty"),
    ("id of wrong type", _set("id", [1]), "id", "a list"),
    ("duplicate id", _set("id", "good"), "id", "duplicate"),
    ("bad task kind", _set("task", "video/clip"), "task", "'video/clip'"),
    ("unknown bare kind", _set("task", "video"), "task", "unknown task kind"),
    ("task of wrong type", _set("task", 3), "task", "a number"),
    ("missing conversations", _drop("conversations"), "conversations", "missing"),
    ("conversations not a list", _set("conversations", "hi"), "conversations", "a list of turns"),
    ("empty conversations", _turns(), "conversations", "at least 2 turns"),
    ("a single turn", _turns(human("<image>\nq?")), "conversations", "at least 2 turns"),
    ("no gpt turn", _turns(human("<image>\nq?"), human("again?")), "conversations", "no gpt turn"),
    ("no human turn", _turns(gpt("one"), gpt("two")), "conversations", "no human turn"),
    ("turns out of order", _turns(human("<image>\nq?"), human("again?"), gpt("one")), "conversations[1]",
     "alternate"),
    ("ends on a question", _turns(human("<image>\nq?"), gpt("one"), human("and?")), "conversations[2]",
     "no answer"),
    ("two images", _two_images, "images", "at most one"),
    ("image and images", _set("images", ["img/2.png"]), "images", "not both"),
    ("two placeholders", _conv(0, "value", "<image>\n<image>\nq?"), "conversations[0].value", "at most one"),
    ("turn not an object", _turns(human("<image>\nq?"), "one"), "conversations[1]", "an object"),
    ("bad speaker", _conv(1, "from", "robot"), "conversations[1].from", "'gpt'/'assistant'"),
    ("value of wrong type", _conv(1, "value", 3), "conversations[1].value", "a string"),
    ("empty answer", _conv(1, "value", " "), "conversations[1].value", "empty"),
    ("empty question", _conv(0, "value", "<image>\n"), "conversations[0].value", "empty"),
    ("placeholder without media", _conv(0, "value", "<image>\n<audio>\nq?"), "conversations[0].value", "no audio"),
    ("image of wrong type", _set("image", 5), "image", "a number"),
    ("missing image file", _set("image", "img/nope.png"), "image", "file not found"),
    ("image is a directory", _set("image", "img"), "image", "not a file"),
    ("missing audio file", _set("audio", "wav/nope.wav"), "audio", "file not found"),
    ("vl task without image", _no_image, "image", "needs an image"),
    ("audio task without audio", _set("task", "audio/digit"), "audio", "needs an audio"),
    ("av task without audio", _set("task", "av/sum"), "audio", "needs an audio"),
    ("text task with image", _set("task", "text/arith"), "image", "must have no image"),
    ("answers not a list", _set("answers", "one"), "answers", "a string"),
    ("answers empty", _set("answers", []), "answers", "an empty list"),
    ("answers with a number", _set("answers", ["one", 1]), "answers[1]", "non-empty string"),
    ("meta not an object", _set("meta", [1, 2]), "meta", "an object"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("edit, key, words", [pytest.param(*c[1:], id=c[0]) for c in BROKEN])
def test_broken_record(data, suffix, edit, key, words):
    bad = raw(rid="bad")
    edit(bad)
    path = write_raw(data / f"broken{suffix}", [raw(rid="good"), bad])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert len(info.value.issues) == 1, message
    locator = f"{path}:2" if suffix == ".jsonl" else f"{path}: record 2"
    assert message.startswith(locator), message
    if isinstance(bad.get("id"), str) and bad["id"].strip():
        assert f"(id {bad['id']})" in message
    assert f": {key}: " in message
    assert words in message
    assert "broken" + suffix in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_record_not_an_object(data, suffix):
    path = write_raw(data / f"m{suffix}", [raw(rid="good"), [1, 2]])
    with pytest.raises(ManifestError, match="expected a JSON object") as info:
        read_manifest(path)
    locator = f"{path}:2" if suffix == ".jsonl" else f"{path}: record 2"
    assert str(info.value).startswith(locator)


def test_bad_jsonl_syntax_names_the_line(data):
    good = json.dumps(raw(rid="good"))
    lines = [good, good.replace("good", "g2"), '{"id": "x", "task": }', good.replace("good", "g3")]
    path = write_raw(data / "m.jsonl", lines)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:3: invalid JSON")
    assert "column" in str(info.value)


def test_bad_json_syntax_names_the_line(data):
    path = data / "m.json"
    path.write_text('[\n {"id": "a",\n  "task": "vl/digit",\n  "image": img/1.png}\n]\n')
    with pytest.raises(ManifestError, match=rf"^{path}:4: invalid JSON"):
        read_manifest(path)


def test_jsonl_content_in_a_json_file_gets_a_hint(data):
    path = write_raw(data / "m.json", [raw(rid="a"), raw(rid="b")], fmt="jsonl")
    with pytest.raises(ManifestError, match=r"m\.json:2: invalid JSON: Extra data.*name the file \.jsonl"):
        read_manifest(path)


@pytest.mark.parametrize(
    "content, words",
    [("", "no records"), ("\n\n", "no records"), ("[]", "no records"), ('{"id": 1}', "expected a JSON list")],
)
def test_empty_or_wrong_top_level_json(data, content, words):
    path = data / ("m.jsonl" if content.strip() in ("",) else "m.json")
    path.write_text(content)
    with pytest.raises(ManifestError, match=words) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match=rf"^{tmp_path / 'nope.jsonl'}: manifest file not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="is a directory"):
        read_manifest(tmp_path)


def test_manifest_error_is_a_safe_error_with_exit_code_2():
    assert issubclass(ManifestError, SafeError)
    assert ManifestError("x").exit_code == 2


def test_every_problem_is_reported_at_once(data):
    objects = [
        raw(rid="ok"),
        raw(rid="t", task="video/x"),                      # line 2: task
        '{"id": "broken", ',                                # line 3: syntax
        raw(rid="i", image="img/none.png"),                 # line 4: image
        raw(rid="ok"),                                      # line 5: duplicate id
        raw(rid="many", task="audio/digit", answers=3),     # line 6: audio and answers
    ]
    path = write_raw(data / "m.jsonl", objects)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.issues) == 6, lines
    assert lines[1].startswith(f"{path}:3: invalid JSON")  # in file order
    expected = [
        f"{path}:2 (id t): task:",
        f"{path}:3: invalid JSON",
        f"{path}:4 (id i): image:",
        f"{path}:5 (id ok): id: duplicate",
        f"{path}:6 (id many): audio:",
        f"{path}:6 (id many): answers:",
    ]
    for prefix in expected:
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)


def test_long_problem_lists_are_cut(data):
    path = write_raw(data / "m.json", [raw(rid=f"r{i}", task="nope") for i in range(30)])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    lines = str(info.value).splitlines()
    assert len(info.value.issues) == 30
    assert len(lines) == 21
    assert lines[-1] == "... and 10 more"
    assert lines[0].startswith(f"{path}: record 1 (id r0): task:")


def test_one_bad_record_among_good_ones(data):
    # A problem in one record is reported even though the other records are fine.
    objects = [raw(rid=f"r{i}") for i in range(5)]
    objects[3] = copy.deepcopy(objects[3])
    objects[3]["meta"] = "label"
    with pytest.raises(ManifestError) as info:
        read_manifest(write_raw(data / "m.jsonl", objects))
    [issue] = info.value.issues
    assert issue.startswith(f"{data / 'm.jsonl'}:4 (id r3): meta:")
