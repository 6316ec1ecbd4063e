"""The text side of streaming: ``ReplyText`` turning a long reply's canvases into released text.

    python benchmarks/detokenizer.py --tokenizer DIR   # or: --vocab 32768 to train one here

The reply is real text (the Python standard library's source, with a line of multi-byte
characters every few lines so that characters split across tokens and canvases), 4,096 tokens
committed in 16 canvases of 256, as ``stream_batch_generate`` commits them. Times are the median
of ``--reps`` runs of the whole reply, with and without a stop string that never matches (so every
canvas searches and holds text back).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from constrained import stdlib_lines  # noqa: E402
from helpers import build_tokenizer  # noqa: E402
from mlx_lm.tokenizer_utils import load as load_tokenizer  # noqa: E402

from mlx_diffgemma.generate import ReplyText  # noqa: E402

MULTI_BYTE = "Grüße, café, 東京 and 🙂: ünïcödé ✓"


def reply_tokens(tokenizer, count: int) -> list[int]:
    lines = stdlib_lines()[:20_000]
    text = "\n".join(line if i % 5 else f"{line}  # {MULTI_BYTE}" for i, line in enumerate(lines))
    tokens = tokenizer.encode(text, add_special_tokens=False)[:count]
    if len(tokens) < count:
        raise SystemExit(f"the text gives only {len(tokens)} tokens")
    return tokens


def run(tokenizer, tokens: list[int], canvas: int, stop: list[str]) -> tuple[float, str]:
    reply = ReplyText(tokenizer, stop)
    start, text = time.perf_counter(), ""
    for i in range(0, len(tokens), canvas):
        delta, _, _ = reply.add(tokens[i : i + canvas], finished=i + canvas >= len(tokens))
        text += delta
    return time.perf_counter() - start, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: train one of --vocab tokens)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    folder = args.tokenizer
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "tok"
        build_tokenizer(folder, stdlib_lines(), args.vocab)
    tokenizer = load_tokenizer(folder)
    tokens = reply_tokens(tokenizer, args.tokens)
    full = tokenizer.decode(tokens)
    print(f"{len(tokens)} tokens, {len(full)} characters, canvases of {args.canvas}, "
          f"detokenizer {type(tokenizer.detokenizer).__name__}")
    for label, stop in (("no stop string", []), ("a stop string that never matches", ["<never matches>"])):
        times = []
        for _ in range(args.reps):
            seconds, text = run(tokenizer, tokens, args.canvas, stop)
            assert text == full, "the released text differs from the whole reply's decode"
            times.append(seconds)
        print(f"{label}: median {statistics.median(times) * 1e3:.1f} ms for the reply "
              f"({statistics.median(times) * 1e3 / (len(tokens) / args.canvas):.2f} ms per canvas)")


if __name__ == "__main__":
    main()
