"""The README's Python quick start runs as written and gives the documented shapes."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_seed_quick_start_runs_as_written():
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README quick start", "exec"), namespace)
    assert tuple(namespace["audio_tokens"].shape) == (2, 8, 768)
    assert tuple(namespace["fused"].shape) == (2, 10, 768)
    assert set(namespace["decision"].budgets.tolist()) <= {0, 4, 8, 12}


def test_whole_model_example_runs_and_bypasses():
    namespace: dict = {}
    exec(compile(python_blocks()[1], "README model example", "exec"), namespace)
    model, inputs = namespace["model"], namespace["inputs"]
    base_logits = model.base(**inputs).logits
    logits = namespace["out"].logits
    assert logits.shape[0] == 4
    assert all(__import__("torch").equal(logits[i], base_logits[i]) for i in (0, 2))
