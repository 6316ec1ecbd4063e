"""Memory under sustained traffic: the server's RSS after a warm-up and after many requests.

Runs the server in this process (a uvicorn thread on 127.0.0.1) with the tests' tiny
random checkpoint, or ``--checkpoint`` of your own, and sends ``--requests`` requests in
a row: plain ones, streamed ones, streams abandoned after their first chunk, and the last
``--concurrent`` at once. Prints RSS after ``--warmup`` requests and at the end, and what the
conversations' prompt caches hold then: each request is a new conversation, which the server
keeps up to ``--prompt-cache-bytes`` by design; the rest of the growth is what would leak.

    python benchmarks/server_soak.py --requests 150 --warmup 20 --concurrent 8
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

FAST = {"steps": 3}


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_request(base: str, model: str, i: int) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": f"Request {i}: tell me something"}],
            "max_tokens": 32, "seed": i, **FAST}
    url = f"{base}/v1/chat/completions"
    kind = i % 3
    if kind == 0:
        httpx.post(url, json=body, timeout=120).raise_for_status()
    elif kind == 1:
        with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                          timeout=120) as r:
            r.raise_for_status()
            for _ in r.iter_lines():
                pass
    else:  # abandoned after the first chunk
        with httpx.stream("POST", url, json={**body, "stream": True, "max_tokens": 256, "steps": 12}, timeout=120) as r:
            r.raise_for_status()
            next(r.iter_lines())


def soak(base: str, model: str, total: int = 150, warmup: int = 20, concurrent: int = 8,
         rss: Callable[[], int] = rss_bytes) -> tuple[int, int]:
    """RSS after ``warmup`` requests and after ``total``; the last ``concurrent`` run at once."""
    after_warmup = 0
    for i in range(total - concurrent):
        one_request(base, model, i)
        if i + 1 == warmup:
            after_warmup = rss()
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            one_request(base, model, i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(total - concurrent, total)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    return after_warmup, rss()


def tiny_checkpoint(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import build_reference_model, build_tokenizer, save_checkpoint

    vocab = build_tokenizer(out / "tokenizer")
    return save_checkpoint(build_reference_model(vocab), out / "tokenizer", out / "model")


def main() -> None:
    import uvicorn

    from mlx_diffgemma.prompt_cache import DEFAULT_MAX_BYTES, PromptCache
    from mlx_diffgemma.server import create_app
    from mlx_diffgemma.utils import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a model folder (default: a tiny random one)")
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--prompt-cache-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="the server's bound on the conversations' caches (its default: 4 GiB)")
    args = parser.parse_args()
    prompt_cache = PromptCache(args.prompt_cache_bytes)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tmp))
        model, tokenizer = load(checkpoint)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, "soak", prompt_cache=prompt_cache), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        started = time.perf_counter()
        try:
            after_warmup, final = soak(f"http://127.0.0.1:{port}", "soak", args.requests, args.warmup, args.concurrent)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    mib = 2**20
    print(f"{args.requests} requests in {time.perf_counter() - started:.1f} s")
    print(f"RSS after {args.warmup}: {after_warmup / mib:.1f} MiB")
    print(f"RSS after {args.requests}: {final / mib:.1f} MiB")
    print(f"ratio: {final / after_warmup:.3f}")
    print(f"prompt caches held at the end: {prompt_cache.nbytes / mib:.1f} MiB ({len(prompt_cache.conversations)} conversations)")


if __name__ == "__main__":
    main()
