"""Top-k self-conditioning (``--sc-top-k``) against the reference's full softmax: quality and speed.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python benchmarks/sparse_self_conditioning.py [--count 200] [--out benchmarks/SPARSE_SELF_CONDITIONING.md]

Quality: the built-in Sudoku model (a trained model, vocabulary 16) solves the held-out
puzzles of benchmarks/sudoku.py with the full softmax and with each position's top k tokens.
Speed and memory: one self-conditioned denoiser forward of the random mid-size model
(vocabulary 32768, canvas 256, float32), median of repeats, and MLX's peak allocation above
what the forward's inputs already hold, for each k, in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_checkpoint import write_random_checkpoint  # noqa: E402
from sudoku import evaluate, held_out  # noqa: E402

from mlx_diffgemma import sudoku  # noqa: E402
from mlx_diffgemma.generate import prefill  # noqa: E402
from mlx_diffgemma.utils import load_model  # noqa: E402


def quality(count: int, ks: list[int]) -> list[str]:
    model = sudoku.load_model()
    rows = ["| level (givens of 36) | " + " | ".join(f"k = {k}" if k else "full softmax (reference)" for k in ks) + " |",
            "|---|" + "---:|" * len(ks)]
    for level, givens in sudoku.DIFFICULTIES[6].items():
        puzzles = held_out(count, givens, 6)
        cells = []
        for k in ks:
            r = evaluate(model, puzzles, self_conditioning_top_k=k)
            cells.append(f"{r['solve_rate']:.1%} ({r['steps_per_canvas']:.1f} steps)")
            print(f"  sudoku {level} k={k}: {cells[-1]}", flush=True)
        rows.append(f"| {level} ({givens}) | " + " | ".join(cells) + " |")
    return rows


def speed(ks: list[int], repeats: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_random_checkpoint(Path(tmp) / "mid", dtype=mx.float32))
    cache = model.make_cache()
    prefill(model, mx.random.randint(0, model.args.vocab_size, (1, 512), key=mx.random.key(0)), cache)
    canvas = mx.random.randint(0, model.args.vocab_size, (1, 256), key=mx.random.key(1))
    previous = model.denoise(canvas, cache) / 0.7
    mx.eval(previous)
    times, peaks = {k: [] for k in ks}, {}
    for _ in range(repeats):  # interleaved, so a drift in the machine's speed hits every k alike
        for k in ks:
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            start = time.perf_counter()
            mx.eval(model.denoise(canvas, cache, previous, k))
            times[k].append(time.perf_counter() - start)
            peaks[k] = (mx.get_peak_memory() - base) / 2**20
    full = float(np.median(times[ks[0]]))
    rows = ["| self-conditioning | forward, s (median) | time vs full | peak above inputs, MiB |", "|---|---:|---:|---:|"]
    for k in ks:
        t = float(np.median(times[k]))
        rows.append(f"| {'full softmax' if not k else f'top {k}'} | {t:.3f} | {t / full:.2f}x | {peaks[k]:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200, help="held-out puzzles per level")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    blas = os.environ.get("LD_PRELOAD") or "MLX's default BLAS"
    lines = ["# Top-k self-conditioning against the full softmax", "",
             f"Command: `{' '.join(['python'] + sys.argv)}`; BLAS: {blas}.", "",
             "## Quality: the built-in 6x6 Sudoku model (vocabulary 16), solve rate on held-out puzzles", ""]
    lines += quality(args.count, [0, 4, 2, 1])
    lines += ["", "## Speed and memory: the random mid-size model (vocabulary 32768, canvas 256, float32)", ""]
    lines += speed([0, 256, 64, 16], args.repeats)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
