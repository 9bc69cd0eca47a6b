"""Stage A and its evaluation reading audio features from a `safe encode-audio` cache (real FSDD clips)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from safe_cli.config import load_profile
from safe_cli.errors import SafeError
from safe_cli.features.cache import FeatureCache
from safe_cli.features.encode import encode_audio
from safe_cli.data.sources import records_of
from safe_cli.foundation.prepare import load_prepared_audio_encoder
from safe_cli.training.stage_a import StageATrainer, train_stage_a

from conftest import FAST, shared_data_root

DATA = shared_data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="real data not found (../shared/data or SAFE_DATA_ROOT)")


def fsdd_profile(*extra):
    return load_profile("demo", FAST + ["data.source=fsdd-mnist", f"data.root={DATA}", *extra])


@pytest.fixture(scope="module")
def feature_cache(cache, tmp_path_factory):
    """Every FSDD clip the FAST examples could use, encoded by the profile's own (pretrained) encoder."""
    profile = fsdd_profile()
    encoder = load_prepared_audio_encoder(profile)
    # Every clip the exported records use (train, validation, test): FSDD's own files.
    paths = sorted({r.audio for split in ("train", "validation", "test") for r in records_of(profile, split)
                    if r.audio is not None})
    directory = tmp_path_factory.mktemp("features")
    report = encode_audio(paths, FeatureCache(directory), encoder, batch_size=32, progress=False)
    assert report.encoded == len(paths) and not report.failures
    return directory


@needs_data
def test_training_from_the_cache_matches_encoding_on_the_fly(feature_cache, tmp_path):
    on_the_fly = train_stage_a(fsdd_profile(), variant="soft_retention", seed=0, run_dir=tmp_path / "fly")
    cached = train_stage_a(fsdd_profile(f"data.audio_features={feature_cache}"), variant="soft_retention", seed=0,
                           run_dir=tmp_path / "cached")
    fly = load_file(tmp_path / "fly" / "stage-a" / "trainable.safetensors")
    hit = load_file(tmp_path / "cached" / "stage-a" / "trainable.safetensors")
    # The cache holds what the same encoder computes from the same decoded samples; only the
    # batch the encoder saw differs (CPU kernels may block a batch differently), hence a tolerance.
    assert fly.keys() == hit.keys()
    assert max(float((fly[k] - hit[k]).abs().max()) for k in fly) < 1e-5
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "stage-a" / "metrics.jsonl").open()]
              for run in ("fly", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert [t.safe_answers for t in on_the_fly.tasks] == [t.safe_answers for t in cached.tasks]


@needs_data
def test_the_cache_is_really_read(feature_cache, tmp_path, monkeypatch):
    trainer = StageATrainer(fsdd_profile(f"data.audio_features={feature_cache}"), variant="no_retention", seed=0,
                            run_dir=tmp_path / "run")
    trainer.build()
    assert trainer.alignment.features is not None and trainer.test_pool.features is not None

    def no_encoder(*args, **kwargs):
        raise AssertionError("the audio encoder ran although the features are cached")

    monkeypatch.setattr(trainer.model.audio_encoder, "forward", no_encoder)
    record = trainer._step(1, trainer.step_batches()[1])
    assert record["skipped"] == 0.0 and torch.isfinite(torch.tensor(record["loss"]))


@needs_data
def test_a_cache_without_the_clips_names_them_and_the_fix(cache, feature_cache, tmp_path):
    empty = tmp_path / "empty"
    FeatureCache(empty)
    (empty / "index.json").write_text("{}")
    with pytest.raises(SafeError, match=r"data.audio_features: \d+ of \d+ clips are not in .*safe encode-audio"):
        StageATrainer(fsdd_profile(f"data.audio_features={empty}"), variant="no_retention", seed=0,
                      run_dir=tmp_path / "run").build()
    # The same encoder's features made faithfully, asked for trimmed: the message says so.
    with pytest.raises(SafeError, match=r"has this encoder's features as faithful, and this profile asks for trim50"):
        StageATrainer(fsdd_profile(f"data.audio_features={feature_cache}", "audio_encoder.whisper.trim_to_clip=true"),
                      variant="no_retention", seed=0, run_dir=tmp_path / "run3").build()
    with pytest.raises(SafeError, match="data.audio_features: .* is not a feature cache"):
        StageATrainer(fsdd_profile(f"data.audio_features={tmp_path / 'nothing'}"), variant="no_retention", seed=0,
                      run_dir=tmp_path / "run2").build()


def test_the_synthetic_sources_clips_are_files_the_cache_holds(cache, tmp_path, monkeypatch):
    """The synthetic source is exported to files like any other data, so its clips can be cached too."""
    profile = load_profile("demo", FAST)
    encoder = load_prepared_audio_encoder(profile)
    paths = sorted({r.audio for split in ("train", "validation", "test") for r in records_of(profile, split)
                    if r.audio is not None})
    features = tmp_path / "features"
    report = encode_audio(paths, FeatureCache(features), encoder, batch_size=32, progress=False)
    assert report.encoded == len(paths) and not report.failures
    trainer = StageATrainer(load_profile("demo", FAST + [f"data.audio_features={features}"]), variant="no_retention",
                            seed=0, run_dir=tmp_path / "run")
    trainer.build()
    assert trainer.alignment.features is not None

    def no_encoder(*args, **kwargs):
        raise AssertionError("the audio encoder ran although the features are cached")

    monkeypatch.setattr(trainer.model.audio_encoder, "forward", no_encoder)
    assert trainer._step(1, trainer.step_batches()[1])["skipped"] == 0.0
