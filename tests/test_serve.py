"""Using a trained run: the Python API, `safe ask`, `safe predict` and the OpenAI-compatible
`safe serve`, on a demo run with a distilled gate (tiny settings)."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from safe_cli.api import SAFE, Request
from safe_cli.cli.main import app
from safe_cli.config import load_profile
from safe_cli.data.manifest import Record, write_manifest
from safe_cli.data.sources import split_pool
from safe_cli.serve import ServeSettings, create_app
from safe_cli.training.stage_a import train_stage_a
from safe_cli.training.stage_b import train_stage_b
from safe_cli.training.stage_c import distill_policy

from test_policy_stages import STAGES_BC


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "run"
    profile = load_profile("demo", STAGES_BC)
    train_stage_a(profile, variant="soft_retention", seed=0, run_dir=directory)
    train_stage_b(profile, variant="soft_retention", seed=0, run_dir=directory)
    distill_policy(profile, variant="soft_retention", seed=0, run_dir=directory)
    return directory


@pytest.fixture(scope="module")
def safe(run):
    return SAFE.from_run(run)


@pytest.fixture(scope="module")
def examples(safe):
    """(question, PIL image or None, clip or None) for text, image and image+audio questions."""
    pool = split_pool(load_profile("demo"), "test", safe.sample_rate)  # the full test split: 200 a task
    picked = []
    for task, with_clip, count in (("text/arith", False, 4), ("vl/digit", False, 6), ("audio/digit", True, 6),
                                   ("av/same", True, 4), ("vl/even", True, 4), ("text/arith", True, 8)):
        chosen = [e for e in pool.examples if e.task == task and (e.audio is not None) == with_clip][:count]
        queries = pool.queries(chosen, with_answers=False)
        picked += [(q.question, _rgb(q.image), clip) for q, clip in zip(queries, pool.audio(chosen))]
    return picked


def _rgb(image):
    from PIL import Image

    return None if image is None else Image.fromarray(np.asarray(image)).convert("RGB")


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _wav(clip, rate) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, clip, rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def _message(question, image, clip, rate):
    parts = [{"type": "text", "text": question}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": _png(image)}})
    if clip is not None:
        parts.append({"type": "input_audio", "input_audio": {"data": _wav(clip, rate), "format": "wav"}})
    return [{"role": "user", "content": parts}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process=None, seconds: float = 120) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


class InProcessServer:
    """create_app on uvicorn in a thread, so the test can look inside the batch runner."""

    def __init__(self, safe, **settings):
        import uvicorn

        self.port = _free_port()
        self.app = create_app(safe, ServeSettings(**settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        _wait(f"http://127.0.0.1:{self.port}/health")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def post(self, body, headers=None, raw=None):
        import urllib.error
        import urllib.request

        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def test_python_api_answers_as_deployed_and_budget_zero_is_the_base(safe, examples):
    question, image, clip = examples[10]  # a spoken digit
    deployed = safe.answer(question, image=image, audio=clip)
    alone = safe.answer(question, image=image, audio=clip, budget=0)
    assert alone.budget == 0 and not alone.audio_used
    assert deployed.budget in safe.token_budgets and deployed.audio_used == (deployed.budget > 0)
    batch = safe.answer_batch([Request(q, i, c) for q, i, c in examples[:12]])
    assert [a.text for a in batch] == [safe.answer(q, image=i, audio=c).text for q, i, c in examples[:12]]
    assert all(not a.audio_used for a, (_, _, c) in zip(batch, examples[:12]) if c is None)


def test_the_openai_client_gets_what_safe_ask_answers(run, safe, examples, tmp_path):
    """A real `safe serve` process and the real openai client: a text-only, an image+text and an
    image+audio+text request, each answered as `safe ask` answers it."""
    from openai import OpenAI

    port = _free_port()
    env = {**os.environ, "SAFE_NO_PROGRESS": "1", "SERVE_KEY": "sesame"}
    process = subprocess.Popen([sys.executable, "-m", "safe_cli", "serve", str(run), "--port", str(port),
                                "--api-key", "SERVE_KEY"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        _wait(f"http://127.0.0.1:{port}/health", process)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame")
        assert [m.id for m in client.models.list().data] == [safe.name]
        wav = tmp_path / "clip.wav"
        png = tmp_path / "image.png"
        for question, image, clip in (examples[0], examples[4], examples[16]):
            response = client.chat.completions.create(model=safe.name,
                                                      messages=_message(question, image, clip, safe.sample_rate))
            extra = response.model_extra["safe"]
            args = ["ask", str(run), "-q", question, "--json"]
            if image is not None:
                image.save(png)
                args += ["--image", str(png)]
            if clip is not None:
                sf.write(wav, clip, safe.sample_rate, subtype="FLOAT")
                args += ["--audio", str(wav)]
            asked = CliRunner().invoke(app, args)
            assert asked.exit_code == 0, asked.output
            expected = json.loads(asked.output)
            assert response.choices[0].message.content == expected["text"]
            assert extra["budget"] == expected["budget"] and extra["audio_used"] == expected["audio_used"]
            assert response.usage.prompt_tokens == expected["prompt_tokens"]
        with pytest.raises(Exception) as refused:
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
        assert getattr(refused.value, "status_code", None) == 401
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(20)


def test_batching_changes_no_answer_and_audio_free_rows_are_the_bases_logits(safe, examples):
    """32 concurrent requests, half with a clip, gathered into batches: each answer is the one
    the same request gets alone; in every batch the server formed, the rows the gate gave budget
    0 decode exactly the base's own logits over that batch."""
    without = [e for e in examples if e[2] is None] * 2
    with_clip = [e for e in examples if e[2] is not None]
    requests = [pair[i] for pair in zip(without[:16], with_clip[:16]) for i in (0, 1)]
    assert sum(c is not None for _, _, c in requests) == 16
    formed = []
    original = safe.answer_batch

    def recording(batch, *args, **kwargs):
        answers = original(batch, *args, **kwargs)
        formed.append((list(batch), list(kwargs["prepared"]), [a.budget for a in answers], args[0]))
        return answers

    safe.answer_batch = recording
    try:
        with InProcessServer(safe, max_batch=8, max_wait_ms=50) as server:
            bodies = [{"model": safe.name, "messages": _message(q, i, c, safe.sample_rate)} for q, i, c in requests]
            with ThreadPoolExecutor(32) as pool:
                together = list(pool.map(server.post, bodies))
            alone = [server.post(body) for body in bodies]
            sizes = list(server.app.state.runner.batches)
    finally:
        safe.answer_batch = original
    assert all(status == 200 for status, _ in together + alone)
    assert [b["choices"][0]["message"]["content"] for _, b in together] == \
        [b["choices"][0]["message"]["content"] for _, b in alone]
    assert [b["safe"]["budget"] for _, b in together] == [b["safe"]["budget"] for _, b in alone]
    assert max(sizes[:-32]) > 1  # the concurrent ones were batched; the lone ones were not
    model, batcher = safe.model, safe.batcher
    from safe_cli.data.batches import Query

    checked = 0
    for batch, prepared, budgets, limit in formed:
        off = torch.tensor([b == 0 for b in budgets])
        if len(batch) < 2 or not off.any():
            continue
        inputs = batcher.for_generation([Query(r.question, image) for r, (image, _) in zip(batch, prepared)])
        settings = dict(max_new_tokens=limit, min_new_tokens=limit, do_sample=False, output_scores=True,
                        return_dict_in_generate=True, pad_token_id=0)
        decided = torch.tensor(budgets)
        gated, _ = model.generate_gated(**inputs, decide=lambda hidden: decided, audio=[c for _, c in prepared],
                                        **settings)
        base = model.base_model.generate(**inputs, **settings)
        for gated_step, base_step in zip(gated.scores, base.scores):
            assert torch.equal(gated_step[off], base_step[off])
        checked += 1
    assert checked


BAD = [
    ("malformed JSON", None, b'{"model": ', {}, 400),
    ("empty messages", {"messages": []}, None, {}, 400),
    ("wrong model", {"model": "someone-else"}, None, {}, 404),
    ("bad base64", {"audio_data": "%%%not base64%%%"}, None, {}, 400),
    ("non-audio bytes", {"audio_data": base64.b64encode(b"this is not a sound file at all" * 20).decode()},
     None, {}, 400),
    ("unknown part", {"extra_part": {"type": "video_url", "video_url": {"url": "x"}}}, None, {}, 400),
    ("two audios", {"two_audios": True}, None, {}, 400),
    ("file:// without the flag", {"image_url": "file:///etc/hostname"}, None, {}, 400),
    ("missing key", {}, None, {"Authorization": ""}, 401),
    ("clip over the limit", {"long_clip": True}, None, {}, 400),
    ("body over the limit", None, b"{" + b" " * 500_000 + b"}", {}, 413),
    ("max_tokens out of range", {"max_tokens": 10_000}, None, {}, 400),
    ("stream asked for", {"stream": True}, None, {}, 400),
    ("last message not the user's", {"messages": [{"role": "assistant", "content": "hi"}]}, None, {}, 400),
]


def _bad_body(safe, examples, change):
    question, image, clip = examples[16]  # av/same: an image and a clip
    rate = safe.sample_rate
    messages = _message(question, image, clip, rate)
    parts = messages[0]["content"]
    body = {"model": safe.name, "messages": messages}
    if "audio_data" in change:
        parts[-1]["input_audio"]["data"] = change["audio_data"]
    if "extra_part" in change:
        parts.append(change["extra_part"])
    if change.get("two_audios"):
        parts.append(dict(parts[-1]))
    if "image_url" in change:
        parts[1]["image_url"]["url"] = change["image_url"]
    if change.get("long_clip"):
        parts[-1]["input_audio"]["data"] = _wav(np.zeros(int(rate * 3.0), np.float32), rate)
    for key in ("model", "messages", "max_tokens", "stream"):
        if key in change:
            body[key] = change[key]
    return body


@pytest.mark.parametrize("name,change,raw,headers,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(safe, examples, name, change, raw, headers,
                                                                      status, request):
    server = request.getfixturevalue("guarded_server")
    auth = {"Authorization": "Bearer k"}
    body = _bad_body(safe, examples, change or {})
    got, payload = server.post(body, {**auth, **headers}, raw)
    assert got == status, (name, payload)
    assert set(payload) == {"error"} and payload["error"]["message"] and payload["error"]["type"]
    ok, good = server.post({"model": safe.name, "messages": _message(*examples[0], safe.sample_rate)}, auth)
    assert ok == 200 and good["choices"][0]["message"]["content"] == safe.answer(*examples[0][:1],
                                                                                  image=examples[0][1]).text


@pytest.fixture(scope="module")
def guarded_server(safe):
    with InProcessServer(safe, api_key="k", max_body_bytes=400_000, max_clip_seconds=2.0) as server:
        yield server


def test_ask_refuses_unreadable_files_and_unfinished_runs(run, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    result = CliRunner().invoke(app, ["ask", str(run), "-q", "Which digit?", "--audio", str(broken)])
    assert result.exit_code == 2 and "broken.wav" in result.output
    result = CliRunner().invoke(app, ["ask", str(tmp_path), "-q", "Which digit?"])
    assert result.exit_code == 2 and "is not a SAFE run" in result.output


def test_predict_killed_and_rerun_writes_every_record_once(run, safe, tmp_path):
    pool = split_pool(load_profile("demo"), "test", safe.sample_rate)  # the full test split: 200 a task
    source = [e for e in pool.examples if e.task in ("audio/digit", "vl/digit")][:24]
    clip_dir = tmp_path / "clips"
    clip_dir.mkdir()
    records = []
    for i, example in enumerate(source):
        image = audio = None
        query = pool.queries([example], with_answers=False)[0]
        if query.image is not None:
            image = str(clip_dir / f"{i}.png")
            _rgb(query.image).save(image)
        if example.audio is not None:
            audio = str(clip_dir / f"{i}.wav")
            sf.write(audio, pool.audio([example])[0], safe.sample_rate)
        records.append(Record(id=f"r{i}", task=example.task, question=example.question, answer=example.answer,
                              answers=example.answers, image=image, audio=audio))
    records.append(Record(id="broken", task="audio/digit", question="Which digit is spoken?", answer="1",
                          answers=("1",), audio=str(clip_dir / "missing.wav")))
    manifest = write_manifest(records, tmp_path / "eval.jsonl")
    out = tmp_path / "preds.jsonl"
    command = [sys.executable, "-m", "safe_cli", "predict", str(run), "--data", str(manifest), "--out", str(out),
               "--batch-size", "1"]
    process = subprocess.Popen(command, env={**os.environ, "SAFE_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    process.kill()
    process.wait()
    partial = out.read_text().count("\n")
    assert 3 <= partial < len(records), partial
    result = subprocess.run(command, env={**os.environ, "SAFE_NO_PROGRESS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(r.id for r in records)
    broken = next(line for line in lines if line["id"] == "broken")
    assert "missing.wav" in broken["error"] and "answer" not in broken
    scored = [line for line in lines if "score" in line]
    assert len(scored) == len(records) - 1 and all(line["score"] in (0.0, 1.0) for line in scored)
    # The same answers as the API gives for those records.
    first = next(line for line in lines if line["id"] == "r0")
    assert first["answer"] == safe.answer(records[0].question, image=records[0].image, audio=records[0].audio).text
