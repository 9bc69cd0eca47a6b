"""`safe serve` under load on localhost: batched against sequential serving, side by side.

    python bench/serve_load.py RUN_DIR [--clients 32] [--requests 10] [--out FILE]

Starts the server twice in this process (uvicorn in a thread), once with ``--max-batch 8``
(``--max-wait-ms 10``) and once with ``--max-batch 1`` (each request alone), and sends the same
load to each: ``--clients`` concurrent clients, each sending ``--requests`` chat completions in
turn, half of them with a spoken clip (the demo's test questions: text, VL, audio, AV). Prints
errors, p50 / p95 latency, requests per second and this process's RSS before and after each
load; writes JSON (default bench/results/serve_load.json).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf
import torch

from safe_cli.api import SAFE
from safe_cli.config import load_profile
from safe_cli.data.sources import split_pool
from safe_cli.serve import ServeSettings, create_app


def bodies(safe: SAFE, count: int) -> list[bytes]:
    from PIL import Image

    pool = split_pool(load_profile("demo"), "test", safe.sample_rate)
    with_clip = [e for e in pool.examples if e.audio is not None]
    without = [e for e in pool.examples if e.audio is None]
    rng = np.random.default_rng(0)
    chosen = [(with_clip if i % 2 else without)[int(rng.integers(1_000_000)) % len(with_clip if i % 2 else without)]
              for i in range(count)]
    out = []
    for example in chosen:
        query = pool.queries([example], with_answers=False)[0]
        parts = [{"type": "text", "text": query.question}]
        if query.image is not None:
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(query.image)).convert("RGB").save(buffer, format="PNG")
            parts.append({"type": "image_url",
                          "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}})
        if example.audio is not None:
            buffer = io.BytesIO()
            sf.write(buffer, pool.audio([example])[0], safe.sample_rate, format="WAV")
            parts.append({"type": "input_audio",
                          "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "wav"}})
        out.append(json.dumps({"model": safe.name, "messages": [{"role": "user", "content": parts}]}).encode())
    return out


def serve(safe: SAFE, settings: ServeSettings):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(safe, settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1/chat/completions"


def load(url: str, payloads: list[bytes], clients: int, per_client: int) -> dict:
    latencies, errors = [], []

    def client(index: int) -> None:
        for j in range(per_client):
            body = payloads[(index * per_client + j) % len(payloads)]
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    json.loads(response.read())
                latencies.append(time.perf_counter() - start)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(repr(exc))

    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": clients * per_client, "errors": len(errors), "error_samples": errors[:3],
        "seconds": wall, "requests_per_second": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * ordered[int(0.95 * (len(ordered) - 1))],
        "rss_before_mb": rss_before / 2**20, "rss_after_mb": process.memory_info().rss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    args = parser.parse_args()

    safe = SAFE.from_run(args.run)
    payloads = bodies(safe, 64)
    results = {}
    for name, batch in (("sequential (max-batch 1)", 1), (f"batched (max-batch {args.max_batch})", args.max_batch)):
        server, thread, url = serve(safe, ServeSettings(max_batch=batch, max_wait_ms=args.max_wait_ms))
        load(url, payloads[:8], 4, 2)  # warm up
        results[name] = load(url, payloads, args.clients, args.requests)
        server.should_exit = True
        thread.join(10)
    print(f"{args.clients} clients x {args.requests} requests, half with a clip, {safe.name} ({safe.decider.name})")
    print(f"  {'':28s} {'errors':>6s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'RSS MB before/after':>20s}")
    for name, r in results.items():
        print(f"  {name:28s} {r['errors']:6d} {r['requests_per_second']:7.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['rss_before_mb']:9.0f} / {r['rss_after_mb']:.0f}")
    names = list(results)
    ratio = results[names[1]]["requests_per_second"] / results[names[0]]["requests_per_second"]
    print(f"  batched / sequential throughput: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "serve_load", "clients": args.clients, "requests": args.requests,
                                    "threads": torch.get_num_threads(), "machine": platform.machine(),
                                    "python": sys.version.split()[0], "throughput_ratio": ratio,
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
