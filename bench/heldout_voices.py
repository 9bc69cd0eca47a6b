"""Held-out voices: spoken digits in espeak-ng voices no FSDD speaker resembles, with MNIST images.

FSDD has six human speakers; a model trained on five of them and tested on their other takes
(or on the sixth) may have learnt those voices rather than the words. This builds a test set in
the manifest format whose every clip is a synthetic voice: espeak-ng accents x voice variants x
speaking rates x pitches, one digit word each, paired with the base's MNIST test images (the
last 2,000 of t10k, which no AV-digits training record uses) in the four audio tasks of
AV-digits (audio/digit, audio/even, av/same, av/sum).

    python bench/heldout_voices.py --out heldout/                  # writes heldout/heldout.jsonl
    python bench/heldout_voices.py --out heldout/ \\
        --run self=runs/avdigits/soft_retention/seed-1 \\
        --run tiny.en=runs/avdigits-whisper-tiny/soft_retention/seed-1

With ``--run LABEL=RUN`` it runs ``safe eval-retention RUN --data heldout/heldout.jsonl`` for
each run (a run trained from a feature cache needs the new clips in it first: ``safe
encode-audio --input heldout/heldout.jsonl --output CACHE --profile P``) and prints SAFE's
accuracy per task side by side, each with its 95% interval; the figures go to
bench/results/heldout_voices.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safe_cli.data.avdigits import NUMBER_WORDS, DigitClips, load_mnist, make_examples, write_split  # noqa: E402
from safe_cli.data.espeak import synthesise  # noqa: E402

ACCENTS = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan")
VARIANTS = ("m1", "m3", "m7", "f2", "f4", "croak")  # espeak-ng's voice variants: pitch, breath, formants
SPEEDS = (130, 170, 210)  # words a minute (espeak-ng's default is 175)
PITCHES = (25, 50, 75)  # 0-99, default 50
TASKS = ("audio/digit", "audio/even", "av/same", "av/sum")
SPLIT = "heldout"


def voice_clips(out: Path, count: int, seed: int) -> DigitClips:
    """``count`` clips, each digit equally often, each in a voice drawn from the grid above."""
    rng = np.random.default_rng([seed, 21])
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    folder = out / "audio" / SPLIT
    folder.mkdir(parents=True, exist_ok=True)
    paths, ids, speakers = [], [], []
    for index, label in enumerate(labels):
        voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
        speed, pitch = int(rng.choice(SPEEDS)), int(rng.choice(PITCHES))
        path = synthesise(NUMBER_WORDS[label], folder / f"{index:04d}.wav", voice, speed, pitch)
        paths.append(str(path.resolve()))
        ids.append(f"espeak-ng:{voice}:s{speed}:p{pitch}")
        speakers.append(voice)
    return DigitClips(waves=[], labels=labels.astype(np.int64), ids=ids, sample_rate=22050, paths=paths,
                      speakers=speakers)


def build(out: Path, data_root: Path, clips: int = 200, per_task: int = 200, seed: int = 0) -> Path:
    """Write ``out/heldout.jsonl`` (``per_task`` questions of each of TASKS), its WAVs and PNGs."""
    out = out.resolve()
    sounds = voice_clips(out, clips, seed)
    images = load_mnist(data_root, "test")
    examples = make_examples(images, sounds, per_task, seed, SPLIT, tasks=TASKS, retention=False)
    return write_split(out, SPLIT, examples, images, sounds)


def evaluate(label: str, run: str, manifest: Path, out: Path) -> dict:
    """``safe eval-retention RUN --data MANIFEST``; SAFE's accuracy per task with its interval."""
    report_dir = out / f"eval-{label}"
    command = [sys.executable, "-m", "safe_cli", "eval-retention", run, "--data", str(manifest),
               "--out", str(report_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode not in (0, 1):  # 1: a verdict or capability check, still a report
        raise SystemExit(f"eval-retention failed for {label} ({run}):\n{result.stderr[-3000:]}")
    report = json.loads((report_dir / "report.json").read_text())
    rows = {}
    for row in report["tasks"]:
        if row["task"] in TASKS:
            correct = round(row["safe_accuracy"] * row["n"])
            rows[row["task"]] = {"n": row["n"], "accuracy": row["safe_accuracy"],
                                 "ci95": wilson(correct, row["n"]), "base_accuracy": row["base_accuracy"]}
    return {"run": run, "tasks": rows}


def wilson(correct: int, n: int) -> list[float]:
    """Wilson's 95% score interval for one accuracy (the report's intervals are for paired deltas)."""
    from scipy.stats import binomtest

    interval = binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for heldout.jsonl, its audio and images")
    parser.add_argument("--data-root", type=Path, default=None, help="holds mnist/ (default: ../shared/data "
                        "beside the checkout or $SAFE_DATA_ROOT)")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=RUN",
                        help="evaluate this run on the set (repeatable)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "heldout_voices.json")
    args = parser.parse_args()
    root = args.data_root or Path(os.environ.get("SAFE_DATA_ROOT") or ROOT.parent / "shared" / "data")
    manifest = args.out.resolve() / f"{SPLIT}.jsonl"
    if not manifest.is_file():
        build(args.out, root, args.clips, args.per_task, args.seed)
        print(f"wrote {manifest}: {args.clips} clips, {args.per_task} questions a task")
    if not args.run:
        return
    results = {}
    for item in args.run:
        label, _, run = item.partition("=")
        results[label] = evaluate(label, run, manifest, args.out.resolve())
    labels = list(results)
    print(f"{'task':<12}" + "".join(f"{label:>26}" for label in labels))
    for task in TASKS:
        cells = []
        for label in labels:
            row = results[label]["tasks"][task]
            cells.append(f"{100 * row['accuracy']:5.1f}% [{100 * row['ci95'][0]:4.1f}, {100 * row['ci95'][1]:4.1f}]")
        print(f"{task:<12}" + "".join(f"{cell:>26}" for cell in cells))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"manifest": str(manifest), "clips": args.clips, "per_task": args.per_task,
                                     "seed": args.seed, "runs": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
