"""Bounded load test of ``python -m serve http`` on loopback.

Starts the server (a serving checkpoint given with --model, else the `tiny`
preset with random weights, exported to a temporary directory), sends
--requests completions from --concurrency client threads (each sends its next
request when the previous one is answered), and prints status counts, p50/p99
latency and generated tokens/s. Exit status 1 if any response is a 5xx or a
request gets no answer.

    PYTHONPATH=. python benchmarks/serve_load.py [--requests 200 --concurrency 16 --max-tokens 16]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_model(directory: Path) -> Path:
    from flax import nnx

    import moejax
    from moejax.checkpoint import save_model
    from serve import export
    cfg = moejax.ModelConfig.preset("tiny")
    save_model(directory / "run", moejax.Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
    export(directory / "run", directory / "serving")
    return directory / "serving"


def post(port: int, body: dict, timeout: float = 600) -> tuple[int, dict, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, reply, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="serving checkpoint (default: random `tiny`, exported)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args()
    for flag in ("requests", "concurrency", "max_tokens", "slots"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        server = subprocess.Popen([sys.executable, "-m", "serve", "http", "--model", str(model), "--port", str(port),
                                   "--slots", str(args.slots), "--max-queue", str(4 * args.concurrency)],
                                  cwd=REPO, env=env)
        try:
            while True:
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit(f"server exited with {server.returncode}")
                    time.sleep(0.5)
            words = ["def", "import", "return", "class", "for", "while", "self", "print", "(", ")", ":"]
            rng = random.Random(0)
            bodies = [{"prompt": " ".join(rng.choices(words, k=rng.randint(2, 12))), "max_tokens": args.max_tokens,
                       "temperature": 0.7, "seed": i} for i in range(args.requests)]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(lambda b: post(port, b), bodies))
            wall = time.perf_counter() - start
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    statuses = collections.Counter(s for s, _, _ in results)
    ok = [(r, t) for s, r, t in results if s == 200]
    latencies = sorted(t for _, t in ok)
    tokens = sum(r["usage"]["completion_tokens"] for r, _ in ok)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    print(f"{args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
          f"{args.slots} slots, {os.cpu_count()} CPU cores")
    print(f"status counts: {dict(sorted(statuses.items()))}")
    print(f"latency p50 {p(0.5):.2f} s, p99 {p(0.99):.2f} s; {tokens} tokens in {wall:.1f} s = "
          f"{tokens / wall:.1f} tokens/s; {len(ok) / wall:.2f} requests/s")
    bad = sum(n for s, n in statuses.items() if s >= 500)
    return 1 if bad or len(results) != args.requests else 0


if __name__ == "__main__":
    sys.exit(main())
