"""`safe ask`, `safe predict`, `safe serve`: use a trained run (safe_cli/api.py, safe_cli/serve.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import SafeError
from .common import console, handle_errors

RUN = typer.Argument(..., help="Run folder (its latest stage), stage folder or checkpoint folder.")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
DTYPE = typer.Option(None, "--dtype", help="The base's dtype (float32, bfloat16, float16); default: the run's.")


@handle_errors
def ask(
    run: str = RUN,
    question: str = typer.Option(..., "--question", "-q", help="The question."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image file."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="An audio file (wav, flac, mp3, ...)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Audio tokens (0 = the base alone); default: the "
                                         "run's gate or policy decides."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Longest answer."),
    device: str = DEVICE,
    dtype: Optional[str] = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON."),
) -> None:
    """Answer one question with a trained run, as it is deployed; print the answer, its budget and
    whether the audio encoder ran.

    Exit codes: 0 answered; 2 bad input (no finished stage, a file that cannot be read).

    Examples:

        safe ask runs/demo/soft_retention/seed-0 \\
            -q "Which digit is spoken?" --audio clip.wav

        safe ask runs/demo/soft_retention/seed-0 \\
            -q "What digit is shown?" --image digit.png --budget 0 --json
    """
    from ..api import SAFE

    model = SAFE.from_run(run, device, dtype)
    result = model.answer(question, image=image, audio=audio, budget=budget, max_new_tokens=max_new_tokens)
    if as_json:
        print(json.dumps({"model": model.name, "decided_by": model.decider.name, **result.to_dict()}, indent=1))
        return
    print(result.text)
    used = "the audio encoder ran" if result.audio_used else "no audio (the base's own answer)"
    console.print(f"budget {result.budget} ({model.decider.name}): {used}; {1000 * result.seconds:.0f} ms",
                  style="dim", highlight=False)


def _done_ids(out: Path) -> set[str]:
    """Ids already written to ``out``; a torn last line (a killed run) is cut off first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(out, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    done = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SafeError(f"{out}:{number}: not a line this command wrote; give another --out") from None
    return done


@handle_errors
def predict(
    run: str = RUN,
    data: Path = typer.Option(..., "--data", help="A manifest (.jsonl / .json, either record format)."),
    out: Path = typer.Option(..., "--out", help="Predictions, one JSON line per record (appended; ids already "
                             "there are skipped, so a killed run resumes)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    device: str = DEVICE,
    dtype: Optional[str] = DTYPE,
) -> None:
    """Answer every record of a manifest; one line per record: id, task, answer, budget, whether
    the encoder ran, and the score (the profile's metric for the task) when it has references.
    A record whose image or clip cannot be read is written with its error, and the run goes on.

    Exit codes: 0 every record written; 2 bad input.

    Example:

        safe predict runs/demo/soft_retention/seed-0 \\
            --data eval.jsonl --out preds.jsonl
    """
    from ..api import SAFE, Request
    from ..data.manifest import read_manifest
    from ..data.scoring import metric_for, score
    from ..progress import progress_bar

    records = read_manifest(data, check_files=False)
    done = _done_ids(out)
    todo = [r for r in records if r.id not in done]
    model = SAFE.from_run(run, device, dtype)
    metrics = dict(model.profile.evaluation.metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = errors = 0
    with open(out, "a", encoding="utf-8") as handle, progress_bar("predict", len(todo)) as advance:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            lines, good, prepared = {}, [], []
            for record in chunk:
                request = Request(record.question, record.image, record.audio, history=tuple(record.history),
                                  system=record.system)
                try:
                    prepared.append(model.prepare(request))
                    good.append((record, request))
                except SafeError as exc:
                    lines[record.id] = {"id": record.id, "task": record.task, "error": str(exc)}
            answers = model.answer_batch([r for _, r in good], max_new_tokens, prepared=prepared)
            for (record, _), result in zip(good, answers):
                line = {"id": record.id, "task": record.task, "answer": result.text, "budget": result.budget,
                        "audio_used": result.audio_used}
                if record.answers:
                    line["score"] = score(result.text, record.answers, metric_for(record.task, metrics))
                lines[record.id] = line
            for record in chunk:  # manifest order; one write and fsync a batch, so a kill loses at most it
                errors += "error" in lines[record.id]
                handle.write(json.dumps(lines[record.id]) + "\n")
                advance()
            handle.flush()
            os.fsync(handle.fileno())
            written += len(chunk)
    console.print(f"wrote {written} predictions to {out} ({len(done)} already there, {errors} with an error)",
                  highlight=False)


@handle_errors
def serve(
    run: str = RUN,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Required bearer key: the name of an environment "
                                          "variable holding it, or the key itself."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Most requests answered in one batch."),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", min=0, help="How long a batch waits to fill."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", min=0.001, help="Largest request body (413 above)."),
    max_clip_seconds: float = typer.Option(30.0, "--max-clip-seconds", min=0.1, help="Longest clip (400 above)."),
    allow_local_files: bool = typer.Option(False, "--allow-local-files", help="Read file:// image URLs."),
    device: str = DEVICE,
    dtype: Optional[str] = DTYPE,
) -> None:
    """Serve a trained run over HTTP with OpenAI's chat-completions API (POST /v1/chat/completions,
    GET /v1/models, GET /health). Concurrent requests are answered in batches; the gate decides
    each one's budget inside the batch's one prefill, and budget-0 requests never reach the
    audio encoder. Images as data: URLs, audio as input_audio parts (base64 wav, mp3, flac).

    Example:

        safe serve runs/demo/soft_retention/seed-0 --port 8000

    then point the openai package at it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY).
    """
    import uvicorn

    from ..api import SAFE
    from ..serve import ServeSettings, create_app, resolve_api_key

    model = SAFE.from_run(run, device, dtype)
    settings = ServeSettings(api_key=resolve_api_key(api_key), max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_body_bytes=int(max_body_mb * 2**20), max_clip_seconds=max_clip_seconds,
                             allow_local_files=allow_local_files)
    console.print(f"serving [bold]{model.name}[/] ({model.decider.name}) on http://{host}:{port}/v1", highlight=False)
    uvicorn.run(create_app(model, settings), host=host, port=port, log_level="warning")
