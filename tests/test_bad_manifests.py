"""Broken manifests through the CLI: `safe validate --data` and `safe train --stage a`.

Every case is one small manifest (a good record on line 1, the broken one after it) with a
real PNG and WAV beside it, used as the training manifest next to a good evaluation manifest.
Both commands must exit 2 with every problem located as ``FILE:LINE (id X): key: message``
(each reported once), print no traceback, and `safe train` must stop before it loads a model
or writes anything into the run folder.

The whole table runs in-process through typer's CliRunner for both commands (one Python,
torch imported once: a subprocess `safe train` costs ~10 s of imports); a few cases also run
as real `python -m safe_cli` processes, so the process's own exit code and stderr are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import pytest
from typer.testing import CliRunner

from safe_cli.cli.main import app

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cache_environment  # noqa: E402

Line = Union[str, bytes, dict, list]

IMAGE, AUDIO, AUDIO_2 = "img.png", "a.wav", "b.wav"


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def audio_record(rid: str = "a1") -> dict:
    return {"id": rid, "audio": AUDIO, "task": "audio/digit", "conversations": turns("<audio>\nWhich digit?", "three")}


def vl_record(rid: str = "v1") -> dict:
    return {"id": rid, "image": IMAGE, "task": "vl/color", "conversations": turns("<image>\nWhat color?", "red")}


def text_record(rid: str = "t1") -> dict:
    return {"id": rid, "task": "text/arith", "conversations": turns("What is 1 + 2?", "3")}


def av_record(rid: str = "av1") -> dict:
    return {"id": rid, "image": IMAGE, "audio": AUDIO, "task": "av/sum",
            "conversations": turns("<image>\n<audio>\nShown plus spoken?", "5")}


def sharegpt_record(rid: str = "s1") -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": "<audio>Which digit?"},
                                    {"role": "assistant", "content": "seven"}], "audios": [AUDIO]}


def edited(record: dict, **changes) -> dict:
    return {**record, **changes}


@dataclass
class Case:
    """``lines`` of the manifest; ``problems``: each a located issue head that must be on stderr
    exactly once ("{m}" stands for the manifest's path, "{d}" for its folder); ``words``: more
    text that must be there."""

    id: str
    lines: list[Line]
    problems: list[str]
    words: list[str] = field(default_factory=list)
    name: str = "bad.jsonl"


CASES = [
    Case("bad-json-line", [audio_record(), '{"id": "b", "audio": "a.wav", "task": }'],
         ["{m}:2: invalid JSON: "], ["column"]),
    Case("missing-image", [audio_record(), edited(vl_record("b"), image="img/nope.png")],
         ["{m}:2 (id b): image: file not found: {d}/img/nope.png"]),
    Case("missing-audio", [audio_record(), edited(audio_record("b"), audio="wav/nope.wav")],
         ["{m}:2 (id b): audio: file not found: {d}/wav/nope.wav"]),
    Case("unknown-task-kind", [audio_record(), edited(audio_record("b"), task="video/digit")],
         ["{m}:2 (id b): task: unknown task kind"], ["'video/digit'"]),
    Case("no-assistant-turn", [audio_record(), edited(audio_record("b"), conversations=[
        {"from": "human", "value": "<audio>\nWhich digit?"}, {"from": "human", "value": "Well?"}])],
         ["{m}:2 (id b): conversations: no gpt turn"]),
    Case("two-audios", [audio_record(), {"id": "b", "audios": [AUDIO, AUDIO_2], "task": "audio/digit",
                                         "conversations": turns("<audio>\nWhich digit?", "three")}],
         ["{m}:2 (id b): audios: 2 files"], ["at most one audio"]),
    Case("audio-placeholder-without-audio", [audio_record(), edited(text_record("b"), conversations=turns(
        "<audio>\nWhat is 1 + 2?", "3"))],
         ["{m}:2 (id b): conversations[0].value: contains <audio> but the record has no audio"]),
    Case("image-on-text-task", [audio_record(), edited(text_record("b"), image=IMAGE)],
         ["{m}:2 (id b): image: task 'text/arith' must have no image"]),
    Case("empty-file", [], ["{m}: no records"]),
    Case("id-is-a-list", [audio_record(), edited(audio_record(), id=[1])],
         ["{m}:2: id: expected a non-empty string or an integer, got a list"]),
    Case("answers-is-a-number", [audio_record(), edited(audio_record("b"), answers=3)],
         ["{m}:2 (id b): answers: expected a non-empty list of strings, got a number"]),
    Case("not-utf8", [audio_record(), b'{"id": "b", "task": "text/x", "note": "\xff\xfe"}'],
         ["{m}:2: not UTF-8 text"]),
    Case("sharegpt-bad-role", [audio_record(), {"id": "b", "audios": [AUDIO], "messages": [
        {"role": "user", "content": "<audio>Which digit?"}, {"role": "bot", "content": "three"}]}],
         ["{m}:2 (id b): messages[1].role: expected "], ["got 'bot'"]),
    Case("turns-do-not-alternate", [audio_record(), edited(audio_record("b"), conversations=[
        *turns("<audio>\nWhich digit?", "three"), {"from": "gpt", "value": "or four"},
        {"from": "human", "value": "Sure?"}])],
         ["{m}:2 (id b): conversations[2]: expected a user turn here"]),
    Case("record-not-an-object", [audio_record(), ["a.wav", "Which digit?"]],
         ["{m}:2: expected a JSON object (a record), got a list"]),
    Case("image-and-images", [audio_record(), edited(vl_record("b"), images=[IMAGE])],
         ["{m}:2 (id b): images: give 'image' or 'images', not both"]),
    Case("duplicate-id", [audio_record(), audio_record()],
         ["{m}:2 (id a1): id: duplicate id 'a1' (first at {m}:1)"]),
    Case("meta-not-an-object", [audio_record(), edited(audio_record("b"), meta="digit")],
         ["{m}:2 (id b): meta: expected an object of labels, got a string"]),
    Case("json-list-record", [audio_record(), edited(audio_record("b"), audio=None, audios=["nope.wav"])],
         ["{m}: record 2 (id b): audios[0]: file not found: {d}/nope.wav"], name="bad.json"),
    Case("several-problems-at-once", [
        audio_record(),
        '{"id": "syntax", ',                                        # line 2
        "",                                                         # line 3: blank, skipped but counted
        edited(audio_record("lost"), audio="nope.wav"),             # line 4
        vl_record(),                                                # line 5: fine
        edited(vl_record("kind"), task="video/x", answers=3),       # line 6: two problems
        "[1, 2]",                                                   # line 7
    ], [
        "{m}:2: invalid JSON: ",
        "{m}:4 (id lost): audio: file not found: {d}/nope.wav",
        "{m}:6 (id kind): task: unknown task kind",
        "{m}:6 (id kind): answers: expected a non-empty list of strings",
        "{m}:7: expected a JSON object (a record), got a list",
    ]),
]
CASE_IDS = [case.id for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)

# Also run as real processes (each `safe train` process costs ~10 s of imports, so a few only).
SUBPROCESS_CASES = ["bad-json-line", "missing-audio", "several-problems-at-once"]


# --------------------------------------------------------------------------- files and runners


def write_media(folder: Path) -> None:
    import soundfile as sf
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(folder / IMAGE)
    wave = (0.1 * np.sin(np.linspace(0, 200, 1600))).astype(np.float32)
    for name in (AUDIO, AUDIO_2):
        sf.write(folder / name, wave, 16000)


def write_manifest(path: Path, lines: list[Line]) -> Path:
    def encode(line: Line) -> bytes:
        if isinstance(line, bytes):
            return line
        return (line if isinstance(line, str) else json.dumps(line)).encode("utf-8")

    if path.suffix == ".json":
        path.write_text(json.dumps(lines, indent=1))
    else:
        path.write_bytes(b"".join(encode(line) + b"\n" for line in lines))
    return path


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    crashed: str = ""  # an exception other than SystemExit (in-process), i.e. a traceback

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def safe_in_process(args: list[str], cwd: Path, monkeypatch) -> Outcome:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, env={"SAFE_DATA_ROOT": None, "FORCE_COLOR": None, "NO_COLOR": "1",
                                                "COLUMNS": "200"})
    crashed = "" if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
    return Outcome(result.exit_code, result.stdout, result.stderr, crashed)


def safe_process(args: list[str], cwd: Path) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k not in ("SAFE_DATA_ROOT", "FORCE_COLOR")}
    env.update(NO_COLOR="1", COLUMNS="200", PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "safe_cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=180)
    return Outcome(result.returncode, result.stdout, result.stderr)


def data_args(train: Path, evaluation: Path) -> list[str]:
    return ["--set", "data.source=manifest", "--set", f"data.train_manifests=[{train}]",
            "--set", f"data.eval_manifests=[{evaluation}]"]


def command(which: str, train: Path, evaluation: Path) -> list[str]:
    if which == "validate":
        return ["validate", "demo", "--data", *data_args(train, evaluation)]
    return ["train", "--stage", "a", "--variant", "soft_retention", "--run-dir", "RUN",
            *data_args(train, evaluation)]


@pytest.fixture(scope="module")
def no_cache(tmp_path_factory):
    """SAFE_CACHE_DIR for the module: nothing may land there (no model is prepared or loaded)."""
    yield from cache_environment(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def data(tmp_path, no_cache) -> Path:
    folder = tmp_path / "data"
    write_media(folder)
    write_manifest(folder / "eval.jsonl", [audio_record("e1"), vl_record("e2")])
    return folder


def assert_located_failure(outcome: Outcome, case: Case, manifest: Path) -> None:
    assert outcome.code == 2, (outcome.code, outcome.text, outcome.crashed)
    assert not outcome.crashed, outcome.crashed
    assert "Traceback" not in outcome.text, outcome.text
    err = outcome.stderr
    assert err.startswith("error: "), err
    assert str(manifest) in err, err
    for problem in case.problems:
        head = problem.replace("{m}", str(manifest)).replace("{d}", str(manifest.parent))
        assert err.count(head) == 1, (head, err)  # named, and once: not once per split that reads it
    for word in case.words:
        assert word in err, (word, err)
    # one line per problem (the first after "error: ", the others indented), nothing else
    assert len(err.strip().splitlines()) == len(case.problems), err


def assert_run_dir_untouched(cwd: Path, cache: Path) -> None:
    run = cwd / "RUN"
    assert not run.exists() or not any(run.iterdir()), sorted(str(p.relative_to(cwd)) for p in run.rglob("*"))
    assert not any(cache.iterdir()), list(cache.iterdir())  # no model was prepared or loaded


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("which", ["validate", "train"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_manifest(case, which, data, tmp_path, no_cache, monkeypatch):
    manifest = write_manifest(data / case.name, case.lines)
    outcome = safe_in_process(command(which, manifest, data / "eval.jsonl"), tmp_path, monkeypatch)
    assert_located_failure(outcome, case, manifest)
    if which == "train":
        assert_run_dir_untouched(tmp_path, no_cache)


@pytest.mark.parametrize("which", ["validate", "train"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_CASES], ids=SUBPROCESS_CASES)
def test_bad_manifest_in_a_real_process(case, which, data, tmp_path, no_cache):
    manifest = write_manifest(data / case.name, case.lines)
    outcome = safe_process(command(which, manifest, data / "eval.jsonl"), tmp_path)
    assert_located_failure(outcome, case, manifest)
    if which == "train":
        assert_run_dir_untouched(tmp_path, no_cache)


def test_problems_of_several_manifests_are_reported_together(data, tmp_path, monkeypatch):
    train = write_manifest(data / "train.jsonl", [audio_record(), edited(vl_record("b"), image="nope.png")])
    evaluation = write_manifest(data / "eval_bad.jsonl", [edited(audio_record("e"), task="speech/x")])
    outcome = safe_in_process(command("validate", train, evaluation), tmp_path, monkeypatch)
    assert outcome.code == 2 and not outcome.crashed, outcome.text
    assert outcome.stderr.count(f"{train}:2 (id b): image: file not found") == 1, outcome.stderr
    assert outcome.stderr.count(f"{evaluation}:1 (id e): task: unknown task kind") == 1, outcome.stderr


# --------------------------------------------------------------------------- valid data


def test_stage_a_refuses_training_data_without_audio(data, tmp_path, no_cache, monkeypatch):
    train = write_manifest(data / "vl_only.jsonl", [vl_record("v1"), vl_record("v2"), text_record("t1")])
    evaluation = data / "eval.jsonl"
    # Valid data as such...
    assert safe_in_process(command("validate", train, evaluation), tmp_path, monkeypatch).code == 0
    # ...but Stage A has nothing to align on.
    outcome = safe_in_process(command("train", train, evaluation), tmp_path, monkeypatch)
    assert outcome.code == 2 and not outcome.crashed, (outcome.code, outcome.text, outcome.crashed)
    assert "Traceback" not in outcome.text
    assert "data.train_manifests: no audio or av records among the 3 training records" in outcome.stderr
    assert "'vl': 2" in outcome.stderr and "'text': 1" in outcome.stderr
    assert "need the audio" in outcome.stderr
    assert_run_dir_untouched(tmp_path, no_cache)


GOOD = [audio_record("a1"), audio_record("a2"), sharegpt_record("s1"), vl_record("v1"), vl_record("v2"),
        vl_record("v3"), text_record("t1"), av_record("av1")]


def test_validate_data_counts_a_good_manifest_per_kind(data, tmp_path, monkeypatch):
    train = write_manifest(data / "train.jsonl", GOOD)
    evaluation = data / "eval.jsonl"
    args = command("validate", train, evaluation)

    outcome = safe_in_process([*args, "--json"], tmp_path, monkeypatch)
    assert outcome.code == 0, outcome.text
    counts = json.loads(outcome.stdout)
    assert counts["train"]["records"] == 8
    assert counts["train"]["by_kind"] == {"audio": 3, "vl": 3, "text": 1, "av": 1}
    assert counts["train"]["manifests"] == [str(train)]
    assert counts["test"] == {"records": 2, "by_kind": {"audio": 1, "vl": 1}, "manifests": [str(evaluation)]}
    assert counts["validation"]["manifests"] == ["(held out of train)"]

    outcome = safe_in_process(args, tmp_path, monkeypatch)
    assert outcome.code == 0, outcome.text
    assert "ok: data of profile demo: every record and file checked" in outcome.stdout
    rows = {}
    for line in outcome.stdout.splitlines():
        cells = line.translate(str.maketrans("│┃|", "   ")).split()
        if cells[:1] in (["split"], ["train"], ["test"]):
            rows[cells[0]] = cells[1:6]
    assert rows["split"] == ["records", "vl", "text", "audio", "av"]
    assert rows["train"] == ["8", "3", "1", "3", "1"]
    assert rows["test"] == ["2", "1", "0", "1", "0"]
