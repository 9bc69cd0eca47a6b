"""Whisper models in CTranslate2's format (faster-whisper, WhisperX), as openai-whisper models.

A CTranslate2 model folder holds ``model.bin``, ``config.json`` and a vocabulary. ``model.bin``
is CTranslate2's binary model format (version 6, written by ``ctranslate2.specs.ModelSpec``):

    uint32 binary version, string spec name, uint32 spec revision, uint32 variable count,
    per variable: string name, uint8 rank, uint32 x rank shape, uint8 dtype id
    (float32, int8, int16, int32, float16, bfloat16), uint32 byte count, the bytes;
    uint32 alias count, per alias: string alias, string variable name.
    A string is a uint16 length (its bytes and a NUL), the UTF-8 bytes, the NUL. Little endian.

This module reads it without CTranslate2 and turns a ``WhisperSpec`` into openai-whisper's own
``Whisper(ModelDimensions)`` state dict, so the project's encoder (and whisper's own decoding)
run through openai-whisper's code as for any ``.pt``:

- self-attention's fused q/k/v (``linear_0``, 3H x H) is split into query, key and value;
  whisper's key projection has no bias (CTranslate2 stores zeros there; a non-zero one is an
  error), cross-attention's fused k/v (``linear_1``) likewise;
- ``gamma``/``beta`` are the layer norms' weight and bias, ``ffn/linear_0|1`` the MLP;
- the encoder's position encodings must equal whisper's ``sinusoids`` to float16 rounding (a
  model with other positions is refused, not silently run); the stored values are used, as
  OpenAI's float16 checkpoints carry them;
- the decoder's positions are learned and taken as they are; its output projection is an
  alias of the token embedding, as in whisper.

The conversion is cached in SAFE's cache, keyed by the SHA-256 of ``model.bin``
(``whisper-ct2/<hash>/model.safetensors`` and ``dims.json``), and loaded without pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..cache import cache_root
from ..errors import SafeError

DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
SUPPORTED_BINARY_VERSIONS = (5, 6)
KEY = "audio_encoder.whisper.name_or_path"


def is_ctranslate2_folder(path: Union[str, Path]) -> bool:
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / "model.bin").is_file()


class _Reader:
    """Bounds-checked little-endian reads from a model.bin held in memory."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.offset = data, path, 0

    def take(self, count: int, what: str) -> bytes:
        end = self.offset + count
        if end > len(self.data):
            raise SafeError(f"{self.path}: truncated: {what} needs {count} bytes at offset {self.offset}, the file "
                            f"has {len(self.data)} bytes; expected a whole CTranslate2 model.bin")
        out = self.data[self.offset:end]
        self.offset = end
        return out

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", what)
        raw = self.take(length, what)
        if not length or raw[-1] != 0:
            raise SafeError(f"{self.path}: {what} at offset {self.offset - length} is not a NUL-terminated string; "
                            "not a CTranslate2 model.bin")
        return raw[:-1].decode("utf-8", errors="replace")


def read_model_bin(path: Union[str, Path]) -> tuple[str, int, dict[str, np.ndarray]]:
    """(spec name, spec revision, variables by name; aliases resolved) of a CTranslate2 model.bin."""
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    version = reader.unpack("I", "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise SafeError(f"{path}: CTranslate2 binary version {version}; expected one of "
                        f"{', '.join(map(str, SUPPORTED_BINARY_VERSIONS))} (is this a CTranslate2 model.bin?)")
    spec = reader.string("the spec name")
    revision = reader.unpack("I", "the spec revision")
    count = reader.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = reader.string("a variable name")
        rank = reader.unpack("B", f"{name}'s rank")
        shape = tuple(reader.unpack("I", f"{name}'s shape") for _ in range(rank))
        dtype_id = reader.unpack("B", f"{name}'s dtype")
        size = reader.unpack("I", f"{name}'s byte count")
        raw = reader.take(size, f"{name}'s data")
        if dtype_id >= len(DTYPES):
            raise SafeError(f"{path}: {name} has dtype id {dtype_id}; expected 0-{len(DTYPES) - 1}")
        dtype = DTYPES[dtype_id]
        if dtype == "bfloat16":  # numpy has no bfloat16: the bytes, widened to float32 through torch
            values = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().numpy()
        else:
            values = np.frombuffer(raw, dtype=dtype)
        if values.size != int(np.prod(shape)):
            raise SafeError(f"{path}: {name} holds {values.size} values for shape {shape}")
        variables[name] = values.reshape(shape)
    for _ in range(reader.unpack("I", "the alias count")):
        alias, target = reader.string("an alias"), reader.string("an alias target")
        if target not in variables:
            raise SafeError(f"{path}: alias {alias} names {target}, which the file does not hold")
        variables[alias] = variables[target]
    if reader.offset != len(reader.data):
        raise SafeError(f"{path}: {len(reader.data) - reader.offset} bytes after the last alias; "
                        "expected the end of a CTranslate2 model.bin")
    return spec, revision, variables


# --------------------------------------------------------------------------- WhisperSpec -> whisper


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    layers = 0
    while f"{prefix}/layer_{layers}/ffn/linear_0/weight" in variables:
        layers += 1
    return layers


def whisper_state_dict(variables: dict[str, np.ndarray], path: Path,
                       vocabulary_size: int | None = None) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """openai-whisper's ``ModelDimensions`` fields and state dict from a WhisperSpec's variables."""
    from whisper.model import sinusoids

    def get(name: str) -> torch.Tensor:
        if name not in variables:
            raise SafeError(f"{path}: {name} is missing; expected a CTranslate2 WhisperSpec")
        return torch.from_numpy(np.array(variables[name]))

    state: dict[str, torch.Tensor] = {}

    def norm(target: str, source: str) -> None:
        state[f"{target}.weight"], state[f"{target}.bias"] = get(f"{source}/gamma"), get(f"{source}/beta")

    def linear(target: str, source: str, bias: bool = True) -> None:
        state[f"{target}.weight"] = get(f"{source}/weight")
        if bias:
            state[f"{target}.bias"] = get(f"{source}/bias")

    def split(weight: torch.Tensor, bias: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(weight.chunk(parts, 0), bias.chunk(parts, 0)))

    def key_value(target: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], source: str) -> None:
        (k, k_bias), (v, v_bias) = pairs
        if float(k_bias.abs().max()) != 0.0:
            raise SafeError(f"{path}: {source} has a non-zero key bias; whisper's key projection has none")
        state[f"{target}.key.weight"] = k
        state[f"{target}.value.weight"], state[f"{target}.value.bias"] = v, v_bias

    audio_layers, text_layers = _count_layers(variables, "encoder"), _count_layers(variables, "decoder")
    if not audio_layers or not text_layers:
        raise SafeError(f"{path}: no encoder or decoder layers (encoder/layer_0, decoder/layer_0); expected a "
                        "CTranslate2 WhisperSpec")
    for i in range(2):
        conv = f"encoder/conv{i + 1}"
        state[f"encoder.conv{i + 1}.weight"], state[f"encoder.conv{i + 1}.bias"] = get(f"{conv}/weight"), \
            get(f"{conv}/bias")
    def block(src: str, dst: str) -> None:
        """What encoder and decoder layers share: self-attention (fused q/k/v) and the MLP."""
        attention = f"{src}/self_attention"
        (q, q_bias), *kv = split(get(f"{attention}/linear_0/weight"), get(f"{attention}/linear_0/bias"), 3)
        state[f"{dst}.attn.query.weight"], state[f"{dst}.attn.query.bias"] = q, q_bias
        key_value(f"{dst}.attn", kv, f"{attention}/linear_0")
        linear(f"{dst}.attn.out", f"{attention}/linear_1")
        norm(f"{dst}.attn_ln", f"{attention}/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    for i in range(audio_layers):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}")
    norm("encoder.ln_post", "encoder/layer_norm")
    positions = get("encoder/position_encodings/encodings").float()
    expected = sinusoids(*positions.shape)
    gap = float((positions - expected).abs().max())
    if gap > 2e-3:  # float16 rounding of values in [-1, 1] is at most 2^-11 ~ 4.9e-4
        raise SafeError(f"{path}: encoder/position_encodings differ from whisper's sinusoids by up to {gap:.3g}; "
                        "expected a Whisper encoder's sinusoidal positions")
    # The stored values, as OpenAI's own float16 .pt checkpoints carry them (whisper loads its
    # positional_embedding buffer from the checkpoint), not the recomputed float32 ones.
    state["encoder.positional_embedding"] = positions

    state["decoder.token_embedding.weight"] = get("decoder/embeddings/weight")
    state["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
    for i in range(text_layers):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        block(src, dst)
        cross = f"{src}/attention"
        linear(f"{dst}.cross_attn.query", f"{cross}/linear_0")
        key_value(f"{dst}.cross_attn", split(get(f"{cross}/linear_1/weight"), get(f"{cross}/linear_1/bias"), 2),
                  f"{cross}/linear_1")
        linear(f"{dst}.cross_attn.out", f"{cross}/linear_2")
        norm(f"{dst}.cross_attn_ln", f"{cross}/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")

    vocab, width = state["decoder.token_embedding.weight"].shape
    if vocabulary_size is not None and vocabulary_size != vocab:
        raise SafeError(f"{path.parent / 'vocabulary.txt'}: {vocabulary_size} tokens, but the model's embedding has "
                        f"{vocab} rows; expected the vocabulary the model was converted with")
    dims = {
        "n_mels": int(state["encoder.conv1.weight"].shape[1]), "n_audio_ctx": int(positions.shape[0]),
        "n_audio_state": int(positions.shape[1]), "n_audio_head": int(get("encoder/num_heads").item()),
        "n_audio_layer": audio_layers, "n_vocab": int(vocab),
        "n_text_ctx": int(state["decoder.positional_embedding"].shape[0]), "n_text_state": int(width),
        "n_text_head": int(get("decoder/num_heads").item()), "n_text_layer": text_layers,
    }
    return dims, state


def _vocabulary_size(folder: Path) -> int | None:
    vocabulary = folder / "vocabulary.txt"
    if vocabulary.is_file():
        return len(vocabulary.read_text(encoding="utf-8").splitlines())
    vocabulary = folder / "vocabulary.json"
    if vocabulary.is_file():
        return len(json.loads(vocabulary.read_text(encoding="utf-8")))
    return None


def _convert(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    model_bin = folder / "model.bin"
    spec, _, variables = read_model_bin(model_bin)
    if spec != "WhisperSpec":
        raise SafeError(f"{model_bin}: a CTranslate2 {spec} model; {KEY} needs a Whisper model (WhisperSpec)")
    return whisper_state_dict(variables, model_bin, _vocabulary_size(folder))


def _entry(folder: Path) -> Path:
    """The cache entry of a folder's conversion: named by the SHA-256 of its model.bin."""
    digest = hashlib.sha256()
    with open(folder / "model.bin", "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return cache_root() / "whisper-ct2" / digest.hexdigest()[:20]


def ctranslate2_whisper_dims(folder: Union[str, Path]) -> dict[str, int]:
    """openai-whisper's ``ModelDimensions`` fields of a CTranslate2 Whisper folder."""
    folder = Path(folder).expanduser()
    dims_file = _entry(folder) / "dims.json"
    return json.loads(dims_file.read_text()) if dims_file.is_file() else _convert(folder)[0]


def load_ctranslate2_whisper(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Any:
    """openai-whisper's ``Whisper`` model from a CTranslate2 Whisper folder (converted once, cached)."""
    from safetensors.torch import load_file, save_file
    from whisper.model import ModelDimensions, Whisper

    folder = Path(folder).expanduser()
    entry = _entry(folder)
    weights, dims_file = entry / "model.safetensors", entry / "dims.json"
    if not (weights.is_file() and dims_file.is_file()):
        dims, state = _convert(folder)
        entry.mkdir(parents=True, exist_ok=True)
        tmp = entry / f".model.safetensors.tmp-{os.getpid()}"
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp))
        os.replace(tmp, weights)
        tmp_dims = entry / f".dims.json.tmp-{os.getpid()}"
        tmp_dims.write_text(json.dumps(dims, indent=1) + "\n")
        os.replace(tmp_dims, dims_file)  # written last: its presence marks the entry whole
    model = Whisper(ModelDimensions(**json.loads(dims_file.read_text())))
    model.load_state_dict(load_file(str(weights)))  # float16 values into whisper's float32 parameters
    return model.to(device)
