"""One data path: AV-digits is one dataset among others, and every stage trains on manifests.

* Parity: Stage A from `safe data export avdigits` manifests equals the built-in source bit for bit.
* Both formats: the same records as LLaVA conversations and as ShareGPT messages train identically.
* Retention wiring: the KL term, the null-space projection and a custom variant's weights each
  change what Stage A learns (multiplying the KL by 0, skipping the projection or ignoring a
  variant's weights makes these tests fail).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safe_cli.cli.main import app
from safe_cli.config import load_profile
from safe_cli.data.manifest import read_manifest
from safe_cli.training.stage_a import StageATrainer, train_stage_a

sys.path.insert(0, str(Path(__file__).parent))
from conftest import FAST  # noqa: E402


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "stage-a" / "trainable.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def export(cache, tmp_path_factory):
    """The FAST demo's AV-digits, exported with the CLI."""
    out = tmp_path_factory.mktemp("export") / "avd"
    result = CliRunner().invoke(app, ["data", "export", "avdigits", "--out", str(out), "--json",
                                      *sum((["--set", s] for s in FAST), [])])
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    assert set(written) == {"train", "validation", "test"}
    return out


def manifest_profile(export: Path, train: Path | None = None, *extra: str):
    return load_profile("demo", FAST + [
        "data.source=manifest", f"data.train_manifests=[{train or export / 'train.jsonl'}]",
        f"data.validation_manifests=[{export / 'validation.jsonl'}]", f"data.eval_manifests=[{export / 'test.jsonl'}]",
        *extra])


def test_export_writes_what_the_built_in_path_reads(export):
    train = read_manifest(export / "train.jsonl")
    kinds = {r.kind for r in train}
    assert kinds == {"vl", "text", "audio", "av"}
    assert all(r.audio is not None for r in train)  # VL/text training records carry their distractor clip
    test = read_manifest(export / "test.jsonl")
    assert any(r.kind == "vl" and r.audio is None for r in test) and any(r.is_retention for r in test)
    import soundfile as sf

    clip = next(r.audio for r in train if r.audio)
    assert sf.info(clip).subtype == "FLOAT"  # the synthetic samples exactly, not a 16-bit copy


def test_stage_a_from_the_export_equals_the_built_in_source(cache, export, tmp_path):
    built_in = train_stage_a(load_profile("demo", FAST), variant="soft_retention", seed=0, run_dir=tmp_path / "b")
    exported = train_stage_a(manifest_profile(export), variant="soft_retention", seed=0, run_dir=tmp_path / "e")
    # Identical records in identical order, the same decoded samples: identical training.
    assert same_weights(weights(tmp_path / "b"), weights(tmp_path / "e"))
    assert [t.summary() for t in built_in.tasks] == [t.summary() for t in exported.tasks]
    lines = [[json.loads(line)["loss"] for line in (tmp_path / r / "stage-a" / "metrics.jsonl").open()] for r in "be"]
    assert lines[0] == lines[1]


def sharegpt(record: dict) -> dict:
    """The same record in the ShareGPT / LlamaFactory convention."""
    roles = {"human": "user", "gpt": "assistant"}
    out = {"id": record["id"], "task": record["task"],
           "messages": [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]}
    if "image" in record:
        out["images"] = [record["image"]]
    if "audio" in record:
        out["audios"] = [record["audio"]]
    for key in ("answers", "meta"):
        if key in record:
            out[key] = record[key]
    return out


def test_llava_and_sharegpt_files_train_identically(cache, export, tmp_path):
    rows = [json.loads(line) for line in (export / "train.jsonl").read_text().splitlines()]
    converted = export / "train_sharegpt.jsonl"
    converted.write_text("".join(json.dumps(sharegpt(r)) + "\n" for r in rows))
    assert read_manifest(converted) == read_manifest(export / "train.jsonl")
    train_stage_a(manifest_profile(export), variant="soft_retention", seed=0, run_dir=tmp_path / "llava")
    train_stage_a(manifest_profile(export, converted), variant="soft_retention", seed=0, run_dir=tmp_path / "sharegpt")
    assert same_weights(weights(tmp_path / "llava"), weights(tmp_path / "sharegpt"))


def test_plain_vl_records_get_a_distractor_clip_drawn_per_step(cache, export, tmp_path):
    """A LLaVA VQA file as it is (no audio on the VL records) is retention data: every retention
    row still hears a clip, drawn from the training audio by (seed, step)."""
    rows = [json.loads(line) for line in (export / "train.jsonl").read_text().splitlines()]
    for row in rows:
        if row["task"].split("/")[0] in ("vl", "text"):
            row.pop("audio")
            turn = row["conversations"][0]
            turn["value"] = turn["value"].replace("<audio>\n", "")
    plain = export / "train_plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = StageATrainer(manifest_profile(export, plain), variant="soft_retention", seed=0, run_dir=tmp_path / "p")
    trainer.build()
    steps = trainer.step_batches()

    def clips(step: int) -> list:
        batches = steps[step]["retention"]
        assert batches and all(len(batch["audio"]) == batch["rows"] for batch in batches)
        return [wave for batch in batches for wave in batch["audio"]]

    first, again = clips(1), clips(1)
    assert all(wave is not None for wave in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, clips(2)))


# --------------------------------------------------------------------------- retention wiring


def run_variant(tmp_path, name: str, *extra: str) -> dict:
    profile = load_profile("demo", FAST + ["training.stage_a.steps=6", *extra])
    train_stage_a(profile, variant=name, seed=0, run_dir=tmp_path / name)
    return weights(tmp_path / name)


def test_the_kl_term_and_a_custom_variants_weights_change_what_stage_a_learns(cache, tmp_path):
    none = run_variant(tmp_path, "no_retention")
    soft = run_variant(tmp_path, "soft_retention")
    assert not same_weights(none, soft), "the KL term had no effect on the update"
    custom = ["retention.variants.strong_kl.retention_loss_weight=1.0",
              "retention.variants.strong_kl.distillation_weight=30.0",
              "retention.variants.same_as_soft.retention_loss_weight=1.0",
              "retention.variants.same_as_soft.distillation_weight=3.0"]
    strong = run_variant(tmp_path, "strong_kl", *custom)
    same = run_variant(tmp_path, "same_as_soft", *custom)
    assert same_weights(same, soft), "a custom variant with soft's weights must train exactly as soft"
    assert not same_weights(strong, soft), "the custom variant's distillation_weight was ignored"


def test_stage_a_projects_every_update_of_the_protected_layers(cache, tmp_path):
    profile = load_profile("demo", FAST + ["training.stage_a.steps=8"])
    trainer = StageATrainer(profile, variant="nullspace_retention", seed=0, run_dir=tmp_path / "ns")
    trainer.build()
    trainer.model.train()
    steps = trainer.step_batches()
    projected = 0
    for step in range(1, trainer.cfg.steps + 1):
        space = trainer.null_space
        before = {name: space._augmented(layer).clone() for name, layer in space.layers.items()}
        bases = {name: basis.clone() for name, basis in space.bases.items()}
        trainer._step(step, steps[step])
        for name, basis in bases.items():
            if basis.shape[1] == 0:
                continue
            delta = space._augmented(space.layers[name]) - before[name]
            if float(delta.abs().max()) == 0:  # shut gates: no gradient reaches the block yet
                continue
            # Projected, what is left along the protected directions is the float32 rounding of
            # old + delta (measured <= 7e-9 on weights of ~0.125, an ulp); unprojected, Adam's update
            # has a component of its own order there (measured 2.1 x the update, >= 8e-7 here).
            leak = float((delta.double() @ basis.double()).abs().max())
            ulp = torch.finfo(torch.float32).eps * float(before[name].abs().max())
            assert leak <= 8 * ulp, f"{name}: an update left the null space ({leak:.2g} along it, ulp {ulp:.2g})"
            projected += 1
    assert projected > 0, "the null space was never active while a protected layer moved"


def test_the_old_train_manifest_key_still_works_with_a_deprecation_message(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    with pytest.warns(FutureWarning, match="data.train_manifest is deprecated; use data.train_manifests"):
        profile = load_profile("demo", ["data.source=manifest", f"data.train_manifest={tmp_path / 't.jsonl'}"])
    assert profile.data.train_manifests == [str(tmp_path / "t.jsonl")]


# --------------------------------------------------------------------------- streaming, bad files


def test_a_large_manifest_is_indexed_not_held(tmp_path):
    """100,000 records keep byte offsets and task codes (a few MB), and parse when asked for."""
    import tracemalloc

    from PIL import Image
    import soundfile as sf

    from safe_cli.data.sources import read_records

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "i.png")
    sf.write(tmp_path / "a.wav", np.zeros(800, np.float32), 8000)
    with (tmp_path / "big.jsonl").open("w") as handle:
        for i in range(100_000):
            audio = i % 2 == 0
            record = {"id": i, "image": "i.png", "conversations": [
                {"from": "human", "value": ("<audio>\n" if audio else "") + "<image>\nWhich digit is shown?"},
                {"from": "gpt", "value": str(i % 10)}]}
            if audio:
                record["audio"] = "a.wav"
            handle.write(json.dumps(record) + "\n")
    tracemalloc.start()
    records = read_records([str(tmp_path / "big.jsonl")])
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(records) == 100_000
    assert kept < 8 * 2**20, f"the index keeps {kept / 2**20:.1f} MB"  # the records as objects: ~150 MB
    assert records.counts() == {"av": 50_000, "vl": 50_000}  # kinds from the media, no record parsed
    assert records.parts[0]._records is None
    assert records[99_999].id == "99999" and records[99_999].answer == "9"
    assert records.audio_paths() == [str(tmp_path / "a.wav")]


def write_with_a_corrupt_clip(export: Path, out: Path, bad_share: int) -> Path:
    """The export's training records with every ``bad_share``-th audio record's clip made unreadable."""
    corrupt = out.parent / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wave file" * 4)
    rows = [json.loads(line) for line in (export / "train.jsonl").read_text().splitlines()]
    count = 0
    for row in rows:
        if row["task"].startswith(("audio/", "av/")):
            count += 1
            row["audio"] = str(corrupt) if count % bad_share == 0 else str((export / row["audio"]).resolve())
        elif "audio" in row:
            row["audio"] = str((export / row["audio"]).resolve())
        if "image" in row:
            row["image"] = str((export / row["image"]).resolve())
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_clips_that_fail_mid_run_are_skipped_and_counted(cache, export, tmp_path):
    train = write_with_a_corrupt_clip(export, tmp_path / "train.jsonl", bad_share=4)
    profile = manifest_profile(export, train, "data.max_bad_fraction=0.5")
    train_stage_a(profile, variant="soft_retention", seed=0, run_dir=tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "stage-a" / "metrics.jsonl").open()]
    assert metrics[-1]["bad_records"] > 0
    assert (tmp_path / "run" / "stage-a" / "trainable.safetensors").is_file()


def test_too_many_bad_records_stop_the_run_with_a_checkpoint(cache, export, tmp_path):
    from safe_cli.errors import RunFailed

    train = write_with_a_corrupt_clip(export, tmp_path / "train.jsonl", bad_share=2)
    profile = manifest_profile(export, train, "data.max_bad_fraction=0.01")
    with pytest.raises(RunFailed, match="failed to decode, more than data.max_bad_fraction") as info:
        train_stage_a(profile, variant="soft_retention", seed=0, run_dir=tmp_path / "run")
    assert info.value.exit_code == 1
    assert list((tmp_path / "run" / "stage-a" / "checkpoints").iterdir()), "no checkpoint was saved"
    assert "corrupt.wav" in str(info.value)


def test_dataloader_workers_prepare_the_same_steps(cache, tmp_path):
    """Batches made in a worker process train exactly as batches made in the training process."""
    for workers in (0, 1):
        train_stage_a(load_profile("demo", FAST + [f"data.loader_workers={workers}"]), variant="soft_retention",
                      seed=0, run_dir=tmp_path / f"w{workers}")
    assert same_weights(weights(tmp_path / "w0"), weights(tmp_path / "w1"))


def test_a_multi_turn_record_labels_every_answer_and_nothing_else(cache):
    from safe_cli.data.batches import PromptBatcher, Query
    from safe_cli.foundation.prepare import load_prepared_models

    base, _ = load_prepared_models(load_profile("demo", FAST))
    batcher = PromptBatcher(base)
    image = np.zeros((28, 28), np.uint8)
    batch = batcher.for_training([Query("What is 3 plus 4?", image, "7", history=(("Which digit is shown?", "3"),)),
                                  Query("What is 1 plus 1?", None, "2")])
    tokens = batcher.tokenizer.convert_ids_to_tokens
    labelled = [tokens(batch["input_ids"][r][batch["labels"][r] != -100].tolist()) for r in range(2)]
    assert labelled == [["3", "</s>", "7", "</s>"], ["2", "</s>"]]
    prompt = batcher.prompt(Query("What is 3 plus 4?", image, history=(("Which digit is shown?", "3"),)))
    assert prompt == "USER: <image>\nWhich digit is shown? ASSISTANT: 3</s>USER: What is 3 plus 4? ASSISTANT:"


def test_a_tokenizer_that_encodes_a_prefix_otherwise_than_the_whole_is_an_error_naming_it(cache):
    # Labels come from the token counts of the conversation's prefixes; a tokenizer merging across
    # an answer's boundary would shift them silently, so a prefix that does not start the whole
    # conversation's tokens must stop the batch.
    from safe_cli.data.batches import PromptBatcher, Query
    from safe_cli.foundation.prepare import load_prepared_models

    base, _ = load_prepared_models(load_profile("demo", FAST))
    batcher = PromptBatcher(base)
    real = batcher.tokenizer
    merging_before = "USER: What is 1 plus 1? ASSISTANT:"

    class MergesAtTheAnswer:
        def __call__(self, texts, **kwargs):
            out = real(texts, **kwargs)
            if isinstance(texts, list):
                out["input_ids"] = [ids[:-1] + [ids[-1] + 1] if text == merging_before else ids
                                    for text, ids in zip(texts, out["input_ids"])]
            return out

        def __getattr__(self, name):
            return getattr(real, name)

    batcher.tokenizer = MergesAtTheAnswer()
    queries = [Query("What is 3 plus 4?", None, "7"), Query("What is 1 plus 1?", None, "2")]
    with pytest.raises(ValueError, match="differently from its prefix.*1 plus 1\\? ASSISTANT:"):
        batcher.for_training(queries)
    batcher.tokenizer = real
    assert batcher.for_training(queries)["labels"].ne(-100).sum() == 4
