import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    """Real data: $SAFE_DATA_ROOT, else ../shared/data beside the checkout (CI has it there)."""
    root = Path(os.environ.get("SAFE_DATA_ROOT") or REPO.parent / "shared" / "data")
    return root if (root / "fsdd" / "recordings").is_dir() else None


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "hf-llava": tiny_models.save_tiny_hf_llava(root / "llava"),
        "hf-blip2": tiny_models.save_tiny_hf_blip2(root / "blip2"),
        "whisper": tiny_models.save_tiny_whisper(root / "whisper-tiny-test.pt"),
        "clap": tiny_models.save_tiny_clap(root / "clap"),
    }


# Seconds, not minutes: a few pretraining steps and a few Stage A steps (the notes report accuracy).
FAST = [
    "base.vision_pretrain.steps=3", "base.pretrain.steps=3", "base.pretrain.batch_size=4",
    # What "vision_pretrain.steps=3" alone gave before a partial section kept its field's default
    # (1200 x 128 at 6e-3): the tiny models these tests and their tolerances were written on.
    "base.vision_pretrain.batch_size=32", "base.vision_pretrain.lr=2e-3",
    "audio_encoder.tiny_pretrain.steps=3", "audio_encoder.tiny_pretrain.batch_size=4",
    "data.num_train=8", "data.num_eval=2",
    "training.stage_a.steps=4", "training.stage_a.batch_size=4", "training.stage_a.checkpoint_every=2",
    "training.stage_a.log_every=2", "training.stage_a.retention_every=1", "retention.fisher_samples=4",
    # Null space active within the few steps, refreshed after the first.
    "retention.variants.nullspace_retention.null_space_min_samples=4",
    "retention.variants.nullspace_retention.null_space_refresh_interval=2",
    "retention.variants.full_retention.null_space_min_samples=4",
    "retention.variants.full_retention.null_space_refresh_interval=2",
]


def cache_environment(path: Path):
    """SAFE_CACHE_DIR=path and no progress bars while the generator runs; the old values after."""
    old = {k: os.environ.get(k) for k in ("SAFE_CACHE_DIR", "SAFE_NO_PROGRESS")}
    os.environ.update(SAFE_CACHE_DIR=str(path), SAFE_NO_PROGRESS="1")
    yield path
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One foundation cache for the module: the tiny pretraining runs once."""
    yield from cache_environment(tmp_path_factory.mktemp("cache"))
