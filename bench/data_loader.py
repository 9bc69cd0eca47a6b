"""Stage A fed from files vs from preloaded tensors, and a large manifest's start-up and memory.

Three measurements in one run, on the demo profile (its tiny models come from the cache:
``safe prepare`` first, or the first run pretrains them):

1. throughput: Stage A steps fed by the data path (records read by offset, PNG/WAV decoded,
   the processor run; in the training process and with 1 DataLoader worker) against the same
   steps' inputs built beforehand and held in memory. Median of --repeats.
2. start-up: a 100,000-record manifest over the export's few thousand files (records drawn
   from the AV-digits export) against a 1,000-record one: seconds from a fresh process to
   the end of the first training step, and that process's peak RSS.
3. the scan alone: seconds to validate and index the 100,000 records.

    python bench/data_loader.py --out bench/data_loader.json

Prints the ratios side by side and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SAFE_NO_PROGRESS", "1")


def profile_for(manifests: dict[str, str] | None, *extra: str):
    from safe_cli.config import load_profile

    sets = list(extra)
    if manifests:
        sets += ["data.source=manifest", f"data.train_manifests=[{manifests['train']}]",
                 f"data.validation_manifests=[{manifests['validation']}]", f"data.eval_manifests=[{manifests['test']}]"]
    return load_profile("demo", sets)


def trainer_for(profile, run_dir: Path):
    from safe_cli.training.stage_a import StageATrainer

    trainer = StageATrainer(profile, variant="soft_retention", seed=0, run_dir=run_dir)
    trainer.build()
    trainer.model.train()
    return trainer


def throughput(steps: int, workers: int, run_dir: Path) -> dict[str, float]:
    """Examples/s of the same steps fed from files and from inputs made beforehand."""
    from safe_cli.training.step_data import step_loader

    trainer = trainer_for(profile_for(None, f"data.loader_workers={workers}"), run_dir)
    examples = trainer.cfg.batch_size * (trainer.cfg.grad_accum + 1)  # alignment rows + a retention batch
    dataset = trainer.step_batches()
    preloaded = [dataset[step] for step in range(1, steps + 1)]
    began = time.perf_counter()
    for step, inputs in zip(range(1, steps + 1), preloaded):
        trainer._step(step, inputs)
    memory = time.perf_counter() - began

    trainer = trainer_for(profile_for(None, f"data.loader_workers={workers}"), run_dir.with_name(run_dir.name + "f"))
    fresh = trainer.step_batches()  # a new dataset: nothing decoded yet in this process
    began = time.perf_counter()
    for step, inputs in zip(range(1, steps + 1), step_loader(fresh, 1, steps, workers)):
        trainer._step(step, inputs)
    files = time.perf_counter() - began
    return {"files_examples_per_second": steps * examples / files,
            "preloaded_examples_per_second": steps * examples / memory, "ratio": memory / files}


def child_start(manifests: dict[str, str], run_dir: str) -> None:
    """In a fresh process: build the trainer from ``manifests`` and run one step; print timings and RSS."""
    began = time.perf_counter()
    trainer = trainer_for(profile_for(manifests), Path(run_dir))
    built = time.perf_counter() - began
    dataset = trainer.step_batches()
    trainer._step(1, dataset[1])
    first = time.perf_counter() - began
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"build_seconds": built, "first_step_seconds": first, "peak_rss_mb": rss,
                      "records": len(trainer.alignment_records) + len(trainer.retention_records)}))


def big_manifest(source: Path, out: Path, records: int) -> Path:
    """``records`` lines drawn from ``source``'s records with fresh ids (same files); a prime stride
    through the file, whose records are grouped by task, so every task is in even a small one."""
    lines = source.read_text().splitlines()
    base = source.parent
    with out.open("w") as handle:
        for i in range(records):
            row = json.loads(lines[(i * 7919) % len(lines)])
            row["id"] = f"r{i}"
            for key in ("image", "audio"):
                if key in row:
                    row[key] = str((base / row[key]).resolve())
            handle.write(json.dumps(row) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--out", default="data_loader.json")
    parser.add_argument("--child", nargs=2, metavar=("MANIFESTS_JSON", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_start(json.loads(args.child[0]), args.child[1])
        return

    from safe_cli.data.avdigits import export
    from safe_cli.data.manifest import ManifestFile

    results: dict = {"steps": args.steps, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in (0, 1):
            runs = [throughput(args.steps, workers, tmp / f"t{workers}-{r}") for r in range(args.repeats)]
            results[f"workers_{workers}"] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(f"workers={workers}: files {results[f'workers_{workers}']['files_examples_per_second']:.0f} ex/s, "
                  f"preloaded {results[f'workers_{workers}']['preloaded_examples_per_second']:.0f} ex/s, "
                  f"files/preloaded {results[f'workers_{workers}']['ratio']:.2f}x", flush=True)

        profile = profile_for(None)
        data = profile.data
        paths = export(tmp / "export", data.source, None, data.split, tuple(data.held_out_speakers), profile.seed,
                       data.num_train, data.num_eval)
        files = len({p for p in (tmp / "export").rglob("*") if p.suffix in (".png", ".wav")})
        started = {}
        for count in (1_000, args.records):
            train = big_manifest(paths["train"], tmp / f"train-{count}.jsonl", count)
            began = time.perf_counter()
            ManifestFile(train)
            scan = time.perf_counter() - began
            manifests = {"train": str(train), "validation": str(paths["validation"]), "test": str(paths["test"])}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(manifests), str(tmp / f"s{count}")],
                                 capture_output=True, text=True, check=True)
            started[count] = {**json.loads(out.stdout.strip().splitlines()[-1]), "scan_seconds": scan}
            print(f"{count:>7} records over {files} files: scan {scan:.2f} s, first step after "
                  f"{started[count]['first_step_seconds']:.1f} s, peak RSS {started[count]['peak_rss_mb']:.0f} MB",
                  flush=True)
        small, big = started[1_000], started[args.records]
        results["start"] = {"files": files, "small": small, "big": big,
                            "rss_difference_mb": big["peak_rss_mb"] - small["peak_rss_mb"]}
        print(f"peak RSS {args.records:,} vs 1,000 records: {results['start']['rss_difference_mb']:+.0f} MB")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
