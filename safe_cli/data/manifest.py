"""Read, validate and write data manifests.

A manifest is JSON (a list of records) or JSONL (one record per line) in LLaVA's conversation
format plus ``audio`` and ``task``::

    {"id": "7", "image": "img/1.png", "audio": "wav/3.wav", "task": "audio/digit",
     "conversations": [{"from": "human", "value": "<image>\\n<audio>\\nWhich digit is spoken?"},
                       {"from": "gpt", "value": "three"}],
     "answers": ["three", "3"], "meta": {"audio_digit": 3}}

Paths are relative to the manifest's directory (absolute paths are allowed); ``image`` and
``audio`` are optional. ``answers`` (acceptable references for scoring) defaults to the gpt
turn's value; ``meta`` is a free-form object of labels. Unknown top-level keys are ignored.

Every problem in a file is collected and reported at once, each located as
``FILE:LINE (id X): key: message`` (JSONL) or ``FILE: record N (id X): key: message`` (JSON
list; records count from 1), so a manifest is fixed in one pass.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..atomic import atomic_write_text
from ..errors import SafeError

IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
TASK_KINDS = ("vl", "text", "audio", "av")

MAX_LISTED_ISSUES = 20

_TASK_RE = re.compile(r"^([^/]*)/([A-Za-z0-9_.\-]+)$")
_PLACEHOLDER_RE = re.compile(rf"\s*(?:{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})\s*")
_NEEDS_AUDIO = ("audio", "av")
_NEEDS_IMAGE = ("vl", "av")
_NO_IMAGE = ("text",)

PathLike = Union[str, "os.PathLike[str]"]


class ManifestError(SafeError):
    """One or more problems in a manifest; str() lists them one per line (the first 20)."""

    def __init__(self, issues: Union[str, Iterable[str]]):
        self.issues = [issues] if isinstance(issues, str) else list(issues)
        shown = self.issues[:MAX_LISTED_ISSUES]
        lines = list(shown)
        if len(self.issues) > len(shown):
            lines.append(f"... and {len(self.issues) - len(shown)} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Record:
    """One validated example. ``image``/``audio`` are absolute path strings after read_manifest."""

    id: str
    task: str
    question: str
    answer: str
    answers: tuple[str, ...]
    image: Optional[str] = None
    audio: Optional[str] = None
    meta: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def kind(self) -> str:
        return self.task.split("/", 1)[0]

    def to_json(self, relative_to: Optional[PathLike] = None) -> dict:
        """Back to LLaVA format; paths relative to ``relative_to`` when given.

        A relative path held by the record is taken relative to the current directory (plain
        os.path semantics) when it is re-expressed against ``relative_to``.
        """
        human = ""
        if self.image is not None:
            human += IMAGE_PLACEHOLDER + "\n"
        if self.audio is not None:
            human += AUDIO_PLACEHOLDER + "\n"
        human += self.question
        out: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            out["image"] = _relative(self.image, relative_to)
        if self.audio is not None:
            out["audio"] = _relative(self.audio, relative_to)
        out["task"] = self.task
        out["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": self.answer}]
        if tuple(self.answers) != (self.answer,):
            out["answers"] = list(self.answers)
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


def _relative(path: str, relative_to: Optional[PathLike]) -> str:
    if relative_to is None:
        return str(path)
    try:
        return os.path.relpath(path, os.fspath(relative_to))
    except ValueError:  # e.g. another drive on Windows: keep it absolute
        return os.path.abspath(path)


# --------------------------------------------------------------------------- reading


def read_manifest(path: PathLike, check_files: bool = True) -> list[Record]:
    """Read and validate a .json / .jsonl manifest; raise ManifestError listing every problem.

    Other extensions: a file whose first non-space character is ``[`` is a JSON list, anything
    else JSONL. Blank JSONL lines are skipped. A manifest with no records is an error.
    """
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{name}: manifest file not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{name}: is a directory, expected a .json or .jsonl manifest file") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ManifestError(f"{name}: cannot read: {exc.strerror or exc}") from None

    suffix = path.suffix.lower()
    as_json = suffix == ".json" or (suffix != ".jsonl" and text.lstrip().startswith("["))
    issues: list[str] = []
    entries = _parse_json_list(text, name, suffix, issues) if as_json else _parse_jsonl(text, name)
    if issues:  # a syntax error in a JSON list leaves nothing to validate
        raise ManifestError(issues)
    if not entries:
        raise ManifestError(f"{name}: no records")

    base = Path(os.path.abspath(path)).parent
    records: list[Record] = []
    first_seen: dict[str, str] = {}
    for where, obj in entries:
        if isinstance(obj, _Unparsable):  # a bad JSONL line: reported in its place, the rest still checked
            issues.append(obj.message)
            continue
        record = _validate(obj, where, base, check_files, issues, first_seen)
        if record is not None:
            records.append(record)
    if issues:
        raise ManifestError(issues)
    return records


@dataclass(frozen=True)
class _Unparsable:
    message: str


def _parse_jsonl(text: str, name: str) -> list[tuple[str, Any]]:
    entries = []
    # split on \n only: str.splitlines() would also split inside strings at U+2028 and friends
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = _Unparsable(f"{name}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})")
        entries.append((f"{name}:{lineno}", obj))
    return entries


def _parse_json_list(text: str, name: str, suffix: str, issues: list[str]) -> list[tuple[str, Any]]:
    if not text.strip():
        issues.append(f"{name}: empty file, expected a JSON list of records")
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and suffix == ".json":
            hint = " (one record per line? name the file .jsonl)"
        issues.append(f"{name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){hint}")
        return []
    if not isinstance(data, list):
        issues.append(f"{name}: expected a JSON list of records at the top, got {_type_name(data)}")
        return []
    return [(f"{name}: record {i}", obj) for i, obj in enumerate(data, start=1)]


def _type_name(value: Any) -> str:
    """How a JSON value reads in a message: 'null', 'a number', 'an empty string', ..."""
    if value is None:
        return "null"
    if isinstance(value, (str, list, dict)) and not (value.strip() if isinstance(value, str) else value):
        return {str: "an empty string", list: "an empty list", dict: "an empty object"}[type(value)]
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"
    }.get(type(value), type(value).__name__)


def _validate(
    obj: Any,
    where: str,
    base: Optional[Path],
    check_files: bool,
    issues: list[str],
    first_seen: dict[str, str],
) -> Optional[Record]:
    """Validate one raw record; append problems to ``issues``; return a Record when it is clean.

    ``base`` is the directory relative paths resolve against; None keeps paths as given.
    """
    if not isinstance(obj, dict):
        issues.append(f"{where}: expected a JSON object (a record), got {_type_name(obj)}")
        return None

    # id first: every later message carries it
    raw_id = obj.get("id")
    rid: Optional[str] = None
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        rid = str(raw_id)
    elif isinstance(raw_id, str) and raw_id.strip():
        rid = raw_id
    loc = f"{where} (id {rid})" if rid is not None else where
    problems: list[str] = []

    def bad(key: str, message: str) -> None:
        problems.append(f"{loc}: {key}: {message}")

    if "id" not in obj:
        bad("id", "missing; expected a non-empty string or an integer")
    elif rid is None:
        bad("id", f"expected a non-empty string or an integer, got {_type_name(raw_id)}")
    elif rid in first_seen:
        bad("id", f"duplicate id {rid!r} (first at {first_seen[rid]})")
    else:
        first_seen[rid] = where

    # task
    task = obj.get("task")
    kind: Optional[str] = None
    expected_task = f"'<kind>/<name>' with kind one of {', '.join(TASK_KINDS)} (e.g. 'vl/digit')"
    if "task" not in obj:
        bad("task", f"missing; expected {expected_task}")
    elif not isinstance(task, str):
        bad("task", f"expected {expected_task}, got {_type_name(task)}")
    else:
        m = _TASK_RE.match(task)
        if not m or m.group(1) not in TASK_KINDS:
            bad("task", f"expected {expected_task}, got {task!r}")
        else:
            kind = m.group(1)

    # image / audio
    paths: dict[str, Optional[str]] = {}
    for key in ("image", "audio"):
        value = obj.get(key)
        paths[key] = None
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            bad(key, f"expected a file path (string) or null, got {_type_name(value)}")
            continue
        resolved = os.path.normpath(os.path.join(base, value)) if base is not None else value
        paths[key] = resolved
        if check_files and not os.path.isfile(resolved):
            reason = "is not a file" if os.path.exists(resolved) else "file not found"
            bad(key, f"{reason}: {resolved}")
    has = {key: obj.get(key) is not None for key in ("image", "audio")}

    # conversations
    question: Optional[str] = None
    answer: Optional[str] = None
    convs = obj.get("conversations")
    if "conversations" not in obj:
        bad("conversations", "missing; expected a list of turns [{'from': 'human', ...}, {'from': 'gpt', ...}]")
    elif not isinstance(convs, list):
        bad("conversations", f"expected a list of turns, got {_type_name(convs)}")
    elif len(convs) < 2:
        bad("conversations", f"expected at least 2 turns (a human question and a gpt answer), got {len(convs)}")
    else:
        turns_ok = True
        human_value: Optional[str] = None
        human_index = answer_index = -1
        for i, turn in enumerate(convs):
            key = f"conversations[{i}]"
            if not isinstance(turn, dict):
                bad(key, f"expected an object with 'from' and 'value', got {_type_name(turn)}")
                turns_ok = False
                continue
            speaker = turn.get("from")
            value = turn.get("value")
            if speaker not in ("human", "gpt"):
                got = f"got {speaker!r}" if "from" in turn else "missing"
                bad(f"{key}.from", f"expected 'human' or 'gpt', {got}")
                turns_ok = False
            if not isinstance(value, str):
                got = f"got {_type_name(value)}" if "value" in turn else "missing"
                bad(f"{key}.value", f"expected a string, {got}")
                turns_ok = False
                continue
            if speaker == "human" and human_value is None:
                human_value, human_index = value, i
            elif speaker == "gpt" and answer is None:
                answer = value
                answer_index = i
        if turns_ok:
            if human_value is None:
                bad("conversations", "no human turn (the question)")
            if answer is None:
                bad("conversations", "no gpt turn (the answer)")
        if human_value is not None:
            key = f"conversations[{human_index}].value"
            for placeholder, media in ((IMAGE_PLACEHOLDER, "image"), (AUDIO_PLACEHOLDER, "audio")):
                count = human_value.count(placeholder)
                if count and not has[media]:
                    bad(key, f"contains {placeholder} but the record has no {media}")
                elif count > 1:
                    bad(key, f"contains {placeholder} {count} times; expected at most once")
            question = _PLACEHOLDER_RE.sub(" ", human_value).strip()
            if not question:
                bad(key, "the question is empty once the <image>/<audio> placeholders are removed")
        if answer is not None and not answer.strip():
            bad(f"conversations[{answer_index}].value", "the answer (first gpt turn) is empty")
        if not turns_ok:
            question = answer = None

    # answers / meta
    answers_value = obj.get("answers")
    answers: Optional[tuple[str, ...]] = None
    if answers_value is not None:
        if not isinstance(answers_value, list) or not answers_value:
            bad("answers", f"expected a non-empty list of strings, got {_type_name(answers_value)}")
        else:
            wrong = [i for i, a in enumerate(answers_value) if not isinstance(a, str) or not a.strip()]
            for i in wrong:
                bad(f"answers[{i}]", f"expected a non-empty string, got {_type_name(answers_value[i])}")
            if not wrong:
                answers = tuple(answers_value)
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        bad("meta", f"expected an object of labels, got {_type_name(meta)}")

    # consistency between the task kind and the media it carries
    if kind in _NEEDS_AUDIO and not has["audio"]:
        bad("audio", f"task {task!r} needs an audio file ({kind} tasks always have one)")
    if kind in _NEEDS_IMAGE and not has["image"]:
        bad("image", f"task {task!r} needs an image file ({kind} tasks always have one)")
    if kind in _NO_IMAGE and has["image"]:
        bad("image", f"task {task!r} must have no image (text tasks are text-only, an audio clip aside)")

    if problems:
        issues.extend(problems)
        return None
    assert rid is not None and task is not None and question is not None and answer is not None
    return Record(
        id=rid,
        task=task,
        question=question,
        answer=answer,
        answers=answers if answers is not None else (answer,),
        image=paths["image"],
        audio=paths["audio"],
        meta=dict(meta) if meta else {},
    )


# --------------------------------------------------------------------------- writing


def write_manifest(records: Iterable[Record], path: PathLike) -> Path:
    """Write records as .jsonl (one object per line) or .json (a list); any other suffix is JSONL.

    Paths are written relative to the manifest's directory. The records are validated first
    (everything read_manifest checks except that the files exist), so what is written reads
    back; the file is written to a temporary file beside it and moved into place, so a reader
    never sees it half-written. Returns the path.
    """
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    objects = []
    issues: list[str] = []
    seen: dict[str, str] = {}
    for i, record in enumerate(records, start=1):
        where = f"{path}: record {i}"
        if not isinstance(record, Record):
            issues.append(f"{where}: expected a Record, got {type(record).__name__}")
            continue
        obj = record.to_json(relative_to=base)
        _validate(obj, where, None, False, issues, seen)
        objects.append(obj)
    if issues:
        raise ManifestError(issues)

    if path.suffix.lower() == ".json":
        text = json.dumps(objects, indent=1, ensure_ascii=False) + "\n"
    else:
        text = "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects)

    try:
        base.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path
