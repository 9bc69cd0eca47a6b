"""A second dataset unlike AV-digits: spoken digit *sequences*, synthesised with espeak-ng.

Each clip is espeak-ng saying two or three digit words ("four seven two") in one of a few
voices and speeds; the question "What is spoken?" has a multi-word answer ("4 7 2"), scored by
word error rate (jiwer). Retention data are the base's own VL/text questions (AV-digits images
and arithmetic, from an export) as plain records without audio, as a user's VQA file would be:
Stage A gives each a distractor clip from the training audio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from safe_cli.data.avdigits import NUMBER_WORDS
from safe_cli.data.espeak import synthesise

VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland")
SPEEDS = (150, 175, 200)


def sequence_records(out: Path, count: int, split: str, seed: int) -> list[dict]:
    """``count`` spoken sequences: WAV files under ``out/audio/<split>`` and their records."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    folder = out / "audio" / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        digits = [int(d) for d in rng.integers(0, 10, int(rng.integers(2, 4)))]
        voice, speed = VOICES[int(rng.integers(len(VOICES)))], SPEEDS[int(rng.integers(len(SPEEDS)))]
        path = folder / f"{i:05d}.wav"
        synthesise(" ".join(NUMBER_WORDS[d] for d in digits), path, voice, speed)
        records.append({"id": f"{split}-seq-{i}", "task": "audio/sequence", "audio": str(path.relative_to(out)),
                        "conversations": [{"from": "human", "value": "<audio>\nWhat is spoken?"},
                                          {"from": "gpt", "value": " ".join(str(d) for d in digits)}],
                        "meta": {"digits": digits, "voice": voice, "speed": speed}})
    return records


def retention_records(export: Path, split: str, per_task: int) -> list[dict]:
    """The base's VL/text questions from an AV-digits export, without their clips (plain VQA rows)."""
    source = export / ("train.jsonl" if split == "train" else "test.jsonl")
    taken: dict[str, int] = {}
    out = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        kind = row["task"].split("/")[0]
        if kind not in ("vl", "text") or taken.get(row["task"], 0) >= per_task:
            continue
        if split != "train" and "audio" in row:
            continue  # the evaluation asks each plain question twice itself (as written, with a clip)
        taken[row["task"]] = taken.get(row["task"], 0) + 1
        row.pop("audio", None)
        row["conversations"][0]["value"] = row["conversations"][0]["value"].replace("<audio>\n", "")
        if "image" in row:
            row["image"] = str((export / row["image"]).resolve())
        row["id"] = f"{split}-{row['id']}"
        out.append(row)
    return out


def write_dataset(out: Path, export: Path, train: int = 300, test: int = 60, retention: int = 60,
                  seed: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", train), ("test", test)):
        rows = sequence_records(out, count, split, seed) + retention_records(export, split, retention)
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
