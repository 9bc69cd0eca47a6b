"""An OpenAI-compatible chat-completions server around a trained run (``safe serve``).

FastAPI + uvicorn: the kept, typed way to serve JSON over HTTP in Python, and what vLLM's and
LlamaFactory's OpenAI servers use; FastAPI gives the routes and request parsing, uvicorn the
event loop and HTTP.

Requests are gathered into batches: the first waiting request opens a batch, which closes
after ``max_wait_ms`` or at ``max_batch`` requests, and runs on one worker thread (the model is
used by one batch at a time) through ``SAFE.answer_batch``: the gate decides each request's
budget inside the batch's one prefill, and a request it gives budget 0 never reaches the
encoder, answered as the base answers it. Decoding is greedy; ``temperature`` and ``top_p``
are accepted and ignored (the answer a request gets does not depend on its neighbours).

Content parts, as OpenAI's API defines them: ``text``, ``image_url`` (``data:`` URLs; ``file://``
paths only with ``allow_local_files``) and ``input_audio`` (``{"data": base64, "format": "wav" |
"mp3" | "flac" | ...}``). Only the last message may carry an image or a clip; earlier user and
assistant messages are the conversation's history, a system message its system prompt. Each
response carries OpenAI's ``usage`` and a ``safe`` object: the budget, whether the encoder ran,
and the batch it was answered in. Errors are OpenAI-style: ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest  # at module level: FastAPI reads the route annotations
from fastapi.responses import JSONResponse

from .api import SAFE, Request, load_image
from .errors import SafeError

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "webm", "aac")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServeSettings:
    api_key: Optional[str] = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 20 * 2**20
    max_clip_seconds: float = 30.0
    allow_local_files: bool = False
    max_tokens: int = 64  # the most new tokens a request may ask for


def resolve_api_key(value: Optional[str]) -> Optional[str]:
    """``--api-key``: the named environment variable's value if there is one, else the key itself."""
    if not value:
        return None
    return os.environ.get(value, value)


# --------------------------------------------------------------------------- parsing


def _decode_base64(data: Any, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{param} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param=param) from None


def decode_audio_bytes(data: bytes, audio_format: str, sample_rate: int, param: str) -> np.ndarray:
    """The clip's samples at ``sample_rate`` (the project's decoder: soundfile, else ffmpeg)."""
    from .data.audio_io import AudioDecodeError, load_audio

    with tempfile.NamedTemporaryFile(suffix=f".{audio_format}") as handle:
        handle.write(data)
        handle.flush()
        try:
            return load_audio(handle.name, sample_rate)
        except AudioDecodeError as exc:
            raise APIError(400, f"{param}: not a readable {audio_format} clip: {exc.reason}", param=param) from None


def _image(url: Any, settings: ServeSettings, param: str):
    if not isinstance(url, str):
        raise APIError(400, f"{param} must be a string URL", param=param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise APIError(400, f"{param}: only base64 data:image/... URLs are read", param=param)
        data = _decode_base64(payload, param)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as opened:
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise APIError(400, f"{param}: not a readable image: {exc}", param=param) from None
    if url.startswith("file://"):
        if not settings.allow_local_files:
            raise APIError(400, f"{param}: file:// URLs are refused unless the server runs with --allow-local-files",
                           param=param)
        try:
            return load_image(Path(unquote(urlparse(url).path)))
        except SafeError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
    raise APIError(400, f"{param}: only data: URLs (and file:// with --allow-local-files) are read; "
                   "this server does not fetch from the network", param=param)


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"{param}: only the last message may carry images or audio", param=param)


def parse_chat(body: Any, safe: SAFE, settings: ServeSettings) -> tuple[Request, Any, Optional[np.ndarray], int]:
    """(request, image, clip, max new tokens) from a chat-completions body; APIError on anything wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if model != safe.name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {safe.name!r}",
                       param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    if body.get("stream"):
        raise APIError(400, "stream is not supported: this server answers whole (omit stream or set it false)",
                       param="stream")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        limit = safe.batcher.max_new_tokens or 16
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= settings.max_tokens:
        raise APIError(400, f"max_tokens must be an integer in 1..{settings.max_tokens}", param="max_tokens")
    system, history, pending = None, [], None
    for i, message in enumerate(messages[:-1]):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{param}: role must be system, user or assistant", param=param)
        text = _text_of(message.get("content"), f"{param}.content")
        if message["role"] in ("system", "developer"):
            system = text
        elif message["role"] == "user":
            pending = text
        else:
            history.append((pending or "", text))
            pending = None
    last = messages[-1]
    param = f"messages[{len(messages) - 1}]"
    if not isinstance(last, dict) or last.get("role") != "user":
        raise APIError(400, f"{param}: the last message must be the user's", param=param)
    content = last.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not parts:
        raise APIError(400, f"{param}.content must be a string or a non-empty list of parts", param=f"{param}.content")
    texts, image, clip = [], None, None
    for j, part in enumerate(parts):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            if image is not None:
                raise APIError(400, f"{where}: one image per request", param=where)
            url = part.get("image_url")
            image = _image(url.get("url") if isinstance(url, dict) else url, settings, f"{where}.image_url.url")
        elif kind == "input_audio":
            if clip is not None:
                raise APIError(400, f"{where}: one audio clip per request", param=where)
            spec = part.get("input_audio")
            if not isinstance(spec, dict):
                raise APIError(400, f"{where}.input_audio must be an object with data and format", param=where)
            audio_format = str(spec.get("format", "")).lower()
            if audio_format not in AUDIO_FORMATS:
                raise APIError(400, f"{where}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}",
                               param=f"{where}.input_audio.format")
            data = _decode_base64(spec.get("data"), f"{where}.input_audio.data")
            clip = decode_audio_bytes(data, audio_format, safe.sample_rate, f"{where}.input_audio.data")
            seconds = len(clip) / safe.sample_rate
            if seconds > settings.max_clip_seconds:
                raise APIError(400, f"{where}: the clip is {seconds:.1f} s; this server takes at most "
                               f"{settings.max_clip_seconds:g} s", param=where, code="audio_too_long")
        else:
            raise APIError(400, f"{where}: unknown content part type {kind!r} (text, image_url, input_audio)",
                           param=f"{where}.type")
    question = "".join(texts).strip()
    if not question:
        raise APIError(400, f"{param}: the message has no text", param=param)
    return Request(question, history=tuple(history), system=system), image, clip, limit


# --------------------------------------------------------------------------- batching


@dataclass
class _Pending:
    request: Request
    prepared: tuple
    limit: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class BatchRunner:
    """Gathers requests into batches and runs each on one worker thread."""

    def __init__(self, safe: SAFE, settings: ServeSettings):
        self.safe, self.settings = safe, settings
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safe-model")
        self.batches: list[int] = []  # sizes of the batches run, for /health and the tests
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, request: Request, prepared: tuple, limit: int):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(request, prepared, limit, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            # One max_new_tokens a batch: requests asking for different lengths go in separate runs.
            for limit in sorted({p.limit for p in batch}):
                group = [p for p in batch if p.limit == limit]
                self.batches.append(len(group))
                try:
                    answers = await loop.run_in_executor(
                        self.executor, lambda g=group, n=limit: self.safe.answer_batch(
                            [p.request for p in g], n, prepared=[p.prepared for p in g]))
                except Exception as exc:  # one bad batch must not take the server down
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, result in zip(group, answers):
                    if not p.future.done():
                        p.future.set_result(result)


# --------------------------------------------------------------------------- the app


def create_app(safe: SAFE, settings: ServeSettings):
    runner = BatchRunner(safe, settings)

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        await runner.stop()

    app = FastAPI(title="SAFE", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runner = runner
    created = int(time.time())

    def error(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(http: HTTPRequest) -> None:
        if settings.api_key is None:
            return
        header = http.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": safe.name, "base_fingerprint": safe.fingerprint,
                "decided_by": safe.decider.name, "batches": len(runner.batches)}

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        try:
            check_key(http)
        except APIError as exc:
            return error(exc)
        return {"object": "list", "data": [{"id": safe.name, "object": "model", "created": created,
                                            "owned_by": "safe"}]}

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        try:
            check_key(http)
            declared = http.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
                raise APIError(413, f"the body is over {settings.max_body_bytes} bytes", code="request_too_large")
            raw = await http.body()
            if len(raw) > settings.max_body_bytes:
                raise APIError(413, f"the body is over {settings.max_body_bytes} bytes", code="request_too_large")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the body is not valid JSON: {exc}") from None
            request, image, clip, limit = parse_chat(body, safe, settings)
            answer = await runner.submit(request, (image, clip), limit)
        except APIError as exc:
            return error(exc)
        except SafeError as exc:
            return error(APIError(400, str(exc)))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": safe.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": "stop" if answer.finished else "length", "logprobs": None}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens},
            "safe": {"budget": answer.budget, "audio_used": answer.audio_used, "batch_size": answer.batch_size,
                     "batch_seconds": answer.seconds},
        }

    return app
