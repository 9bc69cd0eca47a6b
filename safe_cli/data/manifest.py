"""Read, validate and write data manifests: the one record type every stage reads.

Two input formats, both one JSON object per record (a ``.jsonl`` file, one per line, or a
``.json`` list):

* this project's (LLaVA's conversations plus ``audio`` and ``task``)::

    {"id": "7", "image": "img/1.png", "audio": "wav/3.wav", "task": "audio/digit",
     "conversations": [{"from": "human", "value": "<image>\\n<audio>\\nWhich digit is spoken?"},
                       {"from": "gpt", "value": "three"}],
     "answers": ["three", "3"], "meta": {"audio_digit": 3}}

* the ShareGPT / LlamaFactory convention::

    {"id": "7", "messages": [{"role": "user", "content": "<audio>Which digit is spoken?"},
                             {"role": "assistant", "content": "three"}],
     "images": ["img/1.png"], "audios": ["wav/3.wav"]}

Either way a record may hold several exchanges (multi-turn; an optional leading system turn),
at most one image and one clip, and ``<image>`` / ``<audio>`` placeholders in the user turns,
counted against the media once here (a placeholder inside an answer stays text). ``task`` is
``kind/name`` or a bare kind; without it the kind comes from the media the record carries
(image and audio: ``av``, audio: ``audio``, image: ``vl``, neither: ``text``) and the name
from the manifest's file name, so a plain LLaVA VQA file is retention data as it is. Paths are
relative to the manifest's directory (absolute paths are allowed). ``answers`` (references for
scoring) defaults to the last assistant turn; ``meta`` is a free-form object of labels.

Every problem in a file is collected and reported at once, each located as
``FILE:LINE (id X): key: message`` (JSONL) or ``FILE: record N (id X): key: message`` (JSON
list; records count from 1), so a manifest is fixed in one pass.

:class:`ManifestFile` scans a file once (validating every record and checking each distinct
file once) and keeps only byte offsets and a task code per record: records are parsed again
when asked for, so a corpus much larger than memory streams. JSON lists are parsed whole; use
JSONL for large corpora.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from ..atomic import atomic_write_text
from ..errors import SafeError

IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
TASK_KINDS = ("vl", "text", "audio", "av")

MAX_LISTED_ISSUES = 20

_TASK_RE = re.compile(r"^([^/]*)/([A-Za-z0-9_.\-]+)$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")
_PLACEHOLDER_RE = re.compile(rf"\s*(?:{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})\s*")
_NEEDS_AUDIO = ("audio", "av")
_NEEDS_IMAGE = ("vl", "av")
_NO_IMAGE = ("text",)
# Speaker names of both conventions, mapped to one vocabulary.
_EXPECTED_TASK = f"'<kind>/<name>' or '<kind>' with kind one of {', '.join(TASK_KINDS)} (e.g. 'vl/digit')"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

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
    """One validated example. ``image``/``audio`` are absolute path strings after reading.

    ``question`` and ``answer`` are the last exchange (the one evaluation scores); ``history``
    holds the earlier (user, assistant) exchanges of a multi-turn record, which training
    labels too; ``system`` is an optional system turn.
    """

    id: str
    task: str
    question: str
    answer: str
    answers: tuple[str, ...]
    image: Optional[str] = None
    audio: Optional[str] = None
    meta: dict = field(default_factory=dict, hash=False, compare=True)
    history: tuple[tuple[str, str], ...] = ()
    system: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.task.split("/", 1)[0]

    @property
    def needs_audio(self) -> bool:
        return self.kind in _NEEDS_AUDIO

    @property
    def is_retention(self) -> bool:
        """A VL or text question with a (distractor) clip: the audio must not change the answer."""
        return self.audio is not None and not self.needs_audio

    def with_audio(self, audio: Optional[str], **meta: Any) -> "Record":
        """The same question with another clip (a distractor), labelled in ``meta``."""
        from dataclasses import replace

        return replace(self, audio=audio, meta={**self.meta, **meta})

    def to_json(self, relative_to: Optional[PathLike] = None) -> dict:
        """Back to this project's format; paths relative to ``relative_to`` when given.

        A relative path held by the record is taken relative to the current directory (plain
        os.path semantics) when it is re-expressed against ``relative_to``.
        """
        head = ""
        if self.image is not None:
            head += IMAGE_PLACEHOLDER + "\n"
        if self.audio is not None:
            head += AUDIO_PLACEHOLDER + "\n"
        exchanges = list(self.history) + [(self.question, self.answer)]
        out: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            out["image"] = _relative(self.image, relative_to)
        if self.audio is not None:
            out["audio"] = _relative(self.audio, relative_to)
        out["task"] = self.task
        turns = [{"from": "system", "value": self.system}] if self.system is not None else []
        for i, (question, answer) in enumerate(exchanges):
            turns += [{"from": "human", "value": (head if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
        out["conversations"] = turns
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


def id_fraction(record_id: str) -> float:
    """A stable number in [0, 1) from a record's id (CRC-32): a split by it survives reordering and
    appends, and costs nothing next to parsing the record."""
    return zlib.crc32(record_id.encode("utf-8")) / 2.0 ** 32


def default_task_name(path: PathLike) -> str:
    """The task name a record without ``task`` gets: its manifest's file name, e.g. ``vqa``."""
    name = _NAME_CHARS.sub("_", Path(path).stem).strip("_")
    return name or "data"


# --------------------------------------------------------------------------- reading


class FileChecker:
    """``reason(path)``: None for a readable file, else why not; each path is checked once.

    Also resolves a record's relative path against its manifest's folder once per distinct
    (folder, path): a large corpus names the same few hundred files again and again.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._seen: dict[str, Optional[str]] = {}
        self._resolved: dict[tuple, str] = {}

    def resolve(self, base: Optional[Path], value: str) -> str:
        key = (base, value)
        found = self._resolved.get(key)
        if found is None:
            found = os.path.normpath(os.path.join(base, value)) if base is not None else value
            self._resolved[key] = found
        return found

    def reason(self, path: str) -> Optional[str]:
        if not self.enabled:
            return None
        if path not in self._seen:
            if os.path.isfile(path):
                self._seen[path] = None
            else:
                self._seen[path] = "is not a file" if os.path.exists(path) else "file not found"
        return self._seen[path]


class ManifestFile:
    """One manifest, validated in one pass; records are read back on demand by index.

    Keeps per record only its byte range (JSONL) and task code, plus the distinct image and
    audio paths, so a 100,000-record file costs a few MB. Raises ManifestError listing every
    problem of the file.
    """

    def __init__(self, path: PathLike, check_files: Union[bool, FileChecker] = True):
        self.path = Path(path)
        self.name = str(self.path)
        self.base = Path(os.path.abspath(self.path)).parent
        self.default_task = default_task_name(self.path)
        checker = check_files if isinstance(check_files, FileChecker) else FileChecker(bool(check_files))
        self.task_names: list[str] = []
        codes: dict[str, int] = {}
        task_codes: list[int] = []
        audio_codes: list[int] = []  # index into self.audio_names, -1 without a clip
        audio_index: dict[str, int] = {}
        self.audio_names: list[str] = []
        id_hashes: list[float] = []
        self.image_paths: set[str] = set()
        self._records: Optional[list[Record]] = None
        spans: list[tuple[int, int]] = []
        issues: list[str] = []
        first_seen: dict[str, str] = {}

        def keep(record: Record) -> None:
            if record.task not in codes:
                codes[record.task] = len(self.task_names)
                self.task_names.append(record.task)
            task_codes.append(codes[record.task])
            if record.audio is not None and record.audio not in audio_index:
                audio_index[record.audio] = len(self.audio_names)
                self.audio_names.append(record.audio)
            audio_codes.append(-1 if record.audio is None else audio_index[record.audio])
            id_hashes.append(id_fraction(record.id))
            if record.image is not None:
                self.image_paths.add(record.image)

        suffix = self.path.suffix.lower()
        data = _read_bytes(self.path)
        as_json = suffix == ".json" or (suffix != ".jsonl" and data.lstrip()[:1] == b"[")
        if as_json:
            self._records = []
            for where, obj in _parse_json_list(data, self.name, suffix, issues):
                record = convert(obj, where, self.base, checker, issues, first_seen, self.default_task)
                if record is not None:
                    self._records.append(record)
                    keep(record)
        else:
            for lineno, start, end, obj in _scan_jsonl(data, self.name):
                if isinstance(obj, _Unparsable):  # reported in its place; the rest is still checked
                    issues.append(obj.message)
                    continue
                record = convert(obj, _Line(self.name, lineno), self.base, checker, issues, first_seen,
                                 self.default_task)
                if record is not None:
                    spans.append((start, end))
                    keep(record)
        del data
        if issues:
            raise ManifestError(issues)
        if not task_codes:
            raise ManifestError(f"{self.name}: no records")
        self.task_codes = np.asarray(task_codes, dtype=np.int32)
        self.audio_codes = np.asarray(audio_codes, dtype=np.int32)
        self.has_audio = self.audio_codes >= 0
        self.id_fractions = np.asarray(id_hashes, dtype=np.float64)
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.task_codes)

    @property
    def audio_paths(self) -> set[str]:
        return set(self.audio_names)

    @property
    def kinds(self) -> np.ndarray:
        """(N,) str: each record's task kind."""
        names = np.asarray([t.split("/", 1)[0] for t in self.task_names] or [""])
        return names[self.task_codes]

    def task(self, index: int) -> str:
        return self.task_names[int(self.task_codes[index])]

    def __getitem__(self, index: int) -> Record:
        if self._records is not None:
            return self._records[index]
        start, end = (int(x) for x in self._spans[index])
        # pread: no shared file position, so forked DataLoader workers can read side by side.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        line = os.pread(self._fd, end - start, start).decode("utf-8")
        issues: list[str] = []
        record = convert(json.loads(line), self.name, self.base, FileChecker(False), issues, None, self.default_task)
        if record is None:  # the file changed since it was validated
            raise ManifestError([f"{self.name}: changed since it was read: {issue}" for issue in issues])
        return record

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self):  # file descriptors do not travel to spawned processes
        state = dict(self.__dict__)
        state["_fd"] = state["_fd_pid"] = None
        return state


def read_manifest(path: PathLike, check_files: bool = True) -> list[Record]:
    """Read and validate a .json / .jsonl manifest; raise ManifestError listing every problem.

    Other extensions: a file whose first non-space character is ``[`` is a JSON list, anything
    else JSONL. Blank JSONL lines are skipped. A manifest with no records is an error.
    """
    return list(ManifestFile(path, check_files))


def _read_bytes(path: Path) -> bytes:
    name = str(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{name}: manifest file not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{name}: is a directory, expected a .json or .jsonl manifest file") from None
    except OSError as exc:
        raise ManifestError(f"{name}: cannot read: {exc.strerror or exc}") from None


class _Line:
    """``FILE:LINE``, formatted only when a message or the duplicate check needs it."""

    __slots__ = ("name", "lineno")

    def __init__(self, name: str, lineno: int):
        self.name, self.lineno = name, lineno

    def __str__(self) -> str:
        return f"{self.name}:{self.lineno}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@dataclass(frozen=True)
class _Unparsable:
    message: str


def _scan_jsonl(data: bytes, name: str) -> Iterator[tuple[int, int, int, Any]]:
    """(line number, start byte, end byte, object or _Unparsable) per non-blank line."""
    position = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark
    lineno = 0
    size = len(data)
    # split on \n only: str.splitlines() would also split inside strings at U+2028 and friends
    while position < size:
        lineno += 1
        end = data.find(b"\n", position)
        end = size if end < 0 else end
        raw = data[position:end]
        start = position
        position = end + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, start, end, _Unparsable(f"{name}:{lineno}: not UTF-8 text (byte {exc.start} of the line)")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            obj = _Unparsable(f"{name}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})")
        yield lineno, start, end, obj


def _parse_json_list(data: bytes, name: str, suffix: str, issues: list[str]) -> list[tuple[str, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        issues.append(f"{name}: not UTF-8 text (byte {exc.start})")
        return []
    if not text.strip():
        issues.append(f"{name}: empty file, expected a JSON list of records")
        return []
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and suffix == ".json":
            hint = " (one record per line? name the file .jsonl)"
        issues.append(f"{name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){hint}")
        return []
    if not isinstance(parsed, list):
        issues.append(f"{name}: expected a JSON list of records at the top, got {_type_name(parsed)}")
        return []
    return [(f"{name}: record {i}", obj) for i, obj in enumerate(parsed, start=1)]


def _type_name(value: Any) -> str:
    """How a JSON value reads in a message: 'null', 'a number', 'an empty string', ..."""
    if value is None:
        return "null"
    if isinstance(value, (str, list, dict)) and not (value.strip() if isinstance(value, str) else value):
        return {str: "an empty string", list: "an empty list", dict: "an empty object"}[type(value)]
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- one record


def _media(obj: dict, single: str, plural: str, bad: Callable[[str, str], None]) -> tuple[Optional[str], str]:
    """The record's one file of a medium, from ``image`` or ``images`` (a list of at most one)."""
    if obj.get(single) is not None and obj.get(plural) is not None:
        bad(plural, f"give {single!r} or {plural!r}, not both")
        return None, plural
    if obj.get(plural) is not None:
        value = obj[plural]
        if not isinstance(value, list):
            bad(plural, f"expected a list of file paths, got {_type_name(value)}")
            return None, plural
        if len(value) > 1:
            bad(plural, f"{len(value)} files; a record holds at most one {single} for now")
            return None, plural
        if not value:
            return None, plural
        value, key = value[0], f"{plural}[0]"
    else:
        value, key = obj.get(single), single
        if value is None:
            return None, key
    if not isinstance(value, str) or not value.strip():
        bad(key, f"expected a file path (string) or null, got {_type_name(value)}")
        return None, key
    return value, key


def _turns(obj: dict, bad: Callable[[str, str], None]) -> Optional[tuple[str, list[tuple[str, str, str]]]]:
    """(list key, [(role, text, key of the text)]) from ``messages`` or ``conversations``."""
    if "messages" in obj and "conversations" in obj:
        bad("messages", "give 'messages' or 'conversations', not both")
        return None
    list_key = "messages" if "messages" in obj else "conversations"
    speaker_key, text_key = ("role", "content") if list_key == "messages" else ("from", "value")
    turns_value = obj.get(list_key)
    if list_key not in obj:
        bad("conversations", "missing; expected a list of turns [{'from': 'human', ...}, {'from': 'gpt', ...}] "
                             "(or 'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}])")
        return None
    if not isinstance(turns_value, list):
        bad(list_key, f"expected a list of turns, got {_type_name(turns_value)}")
        return None
    if len(turns_value) < 2:
        bad(list_key, f"expected at least 2 turns (a user question and an assistant answer), got {len(turns_value)}")
        return None
    out, ok = [], True
    for i, turn in enumerate(turns_value):
        key = _TurnKey(list_key, i)
        if not isinstance(turn, dict):
            bad(key, f"expected an object with {speaker_key!r} and {text_key!r}, got {_type_name(turn)}")
            ok = False
            continue
        # Either convention's key names inside either list: LlamaFactory files mix them.
        speaker = turn.get(speaker_key, turn.get("role" if speaker_key == "from" else "from"))
        text = turn.get(text_key, turn.get("content" if text_key == "value" else "value"))
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            got = f"got {speaker!r}" if speaker is not None else "missing"
            bad(f"{key}.{speaker_key}", f"expected 'human'/'user', 'gpt'/'assistant' or 'system', {got}")
            ok = False
        if not isinstance(text, str):
            got = f"got {_type_name(text)}" if text is not None else "missing"
            bad(f"{key}.{text_key}", f"expected a string, {got}")
            ok = False
            continue
        out.append((role, text, _TurnKey(list_key, i, text_key)))
    return (list_key, out) if ok else None


class _TurnKey:
    """``conversations[3].value``, formatted only when a message needs it (most records have none)."""

    __slots__ = ("list_key", "index", "field")

    def __init__(self, list_key: str, index: int, field: Optional[str] = None):
        self.list_key, self.index, self.field = list_key, index, field

    def turn(self) -> str:
        return f"{self.list_key}[{self.index}]"

    def __str__(self) -> str:
        return self.turn() + (f".{self.field}" if self.field else "")

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def convert(
    obj: Any,
    where: str,
    base: Optional[Path],
    files: FileChecker,
    issues: list[str],
    first_seen: Optional[dict[str, str]],
    default_task: str = "data",
) -> Optional[Record]:
    """Validate one raw record of either format; append problems to ``issues``; return a Record when clean.

    ``base`` is the directory relative paths resolve against (None keeps paths as given);
    ``first_seen`` tracks ids for the duplicate check (None skips it). Never tokenises: text
    stays text until the base's own template encodes it.
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
    problems: list[str] = []

    def bad(key: str, message: str) -> None:  # the location is formatted only for a record with a problem
        loc = f"{where} (id {rid})" if rid is not None else str(where)
        problems.append(f"{loc}: {key}: {message}")

    if "id" not in obj:
        bad("id", "missing; expected a non-empty string or an integer")
    elif rid is None:
        bad("id", f"expected a non-empty string or an integer, got {_type_name(raw_id)}")
    elif first_seen is not None and rid in first_seen:
        bad("id", f"duplicate id {rid!r} (first at {first_seen[rid]})")
    elif first_seen is not None:
        first_seen[rid] = where

    # image / audio
    paths: dict[str, Optional[str]] = {}
    has: dict[str, bool] = {}
    for single, plural in (("image", "images"), ("audio", "audios")):
        value, key = _media(obj, single, plural, bad)
        has[single] = obj.get(single) is not None or bool(obj.get(plural))  # given, even if malformed
        paths[single] = None
        if value is None:
            continue
        resolved = files.resolve(base, value)
        paths[single] = resolved
        reason = files.reason(resolved)
        if reason:
            bad(key, f"{reason}: {resolved}")

    # task: given, or from the media the record carries
    task = obj.get("task")
    kind: Optional[str] = None
    expected_task = _EXPECTED_TASK
    if task is None:
        kind = "av" if has["image"] and has["audio"] else "audio" if has["audio"] else "vl" if has["image"] else "text"
        task = f"{kind}/{default_task}"
    elif not isinstance(task, str):
        bad("task", f"expected {expected_task}, got {_type_name(task)}")
    elif task in TASK_KINDS:
        kind, task = task, f"{task}/{default_task}"
    else:
        m = _TASK_RE.match(task)
        if not m or m.group(1) not in TASK_KINDS:
            bad("task", f"unknown task kind; expected {expected_task}, got {task!r}")
        else:
            kind = m.group(1)

    # turns: [system] user assistant [user assistant ...]
    exchanges: list[tuple[str, str]] = []
    system: Optional[str] = None
    parsed = _turns(obj, bad)
    structure_ok = False
    if parsed is not None:
        list_key, turns = parsed
        if turns and turns[0][0] == "system":
            system = turns[0][1].strip() or None
            turns = turns[1:]
        roles = [t[0] for t in turns]
        if "user" not in roles:
            bad(list_key, "no human turn (the question)")
        elif "assistant" not in roles:
            bad(list_key, "no gpt turn (the answer); every record needs an assistant turn to learn or score")
        else:
            structure_ok = True
            for i, (role, text, key) in enumerate(turns):
                expected = "user" if i % 2 == 0 else "assistant"
                if role != expected:
                    bad(key.turn(), f"expected a {expected} turn here (turns alternate user, assistant), got {role}")
                    structure_ok = False
                    break
            if structure_ok and len(turns) % 2:
                bad(turns[-1][2].turn(), "the last turn is a user turn with no answer")
                structure_ok = False
        if structure_ok:
            counts = {IMAGE_PLACEHOLDER: 0, AUDIO_PLACEHOLDER: 0}
            for role, text, key in turns:
                if role != "user":
                    continue
                for placeholder, media in ((IMAGE_PLACEHOLDER, "image"), (AUDIO_PLACEHOLDER, "audio")):
                    count = text.count(placeholder)
                    counts[placeholder] += count
                    if count and not has[media]:
                        bad(key, f"contains {placeholder} but the record has no {media}")
                    elif count and counts[placeholder] > 1:
                        bad(key, f"{placeholder} appears {counts[placeholder]} times in the user turns; "
                                 "a record holds at most one")
            for i in range(0, len(turns) - 1, 2):
                (_, q_text, q_key), (_, a_text, a_key) = turns[i], turns[i + 1]
                question = _PLACEHOLDER_RE.sub(" ", q_text).strip()
                if not question:
                    bad(q_key, "the question is empty once the <image>/<audio> placeholders are removed")
                if not a_text.strip():
                    bad(a_key, "the answer is empty")
                exchanges.append((question, a_text))

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

    if problems or not exchanges:
        issues.extend(problems)
        return None
    assert rid is not None and isinstance(task, str)
    question, answer = exchanges[-1]
    return Record(
        id=rid,
        task=task,
        question=question,
        answer=answer,
        answers=answers if answers is not None else (answer,),
        image=paths["image"],
        audio=paths["audio"],
        meta=dict(meta) if meta else {},
        history=tuple(exchanges[:-1]),
        system=system,
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
        convert(obj, where, None, FileChecker(False), issues, seen)
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
