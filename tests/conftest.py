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
