"""Sharded DiffusionGemma against one process: logits, generated tokens, memory and step time.

Run under mlx.launch; every rank prints nothing, rank 0 prints one JSON line:

    mlx.launch -n 2 --backend ring --python .venv/bin/python benchmarks/distributed.py --model DIR --parity
    mlx.launch -n 4 --backend ring --python .venv/bin/python benchmarks/distributed.py --random mid --out /tmp/mid

``--parity`` also loads the whole model in each process and compares: the denoiser's
float32 logits on a random prompt and canvas (first step and a self-conditioned one),
and the tokens generated with the same seed. Timing: the sharded denoiser step, and
separately the collectives one step makes (the same all_sum and all_gather calls on
arrays of the same shapes), so the rest is computation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_diffgemma.generate import Canvas, SeededNoise, generate_step, prefill  # noqa: E402
from mlx_diffgemma.sampler import DiffusionSettings  # noqa: E402
from mlx_diffgemma.utils import load_model  # noqa: E402


def logits_pair(model, ids: mx.array, canvas: mx.array, sc: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """The first step's logits, and a self-conditioned step's (on ``sc``, else on the first step's)."""
    cache = model.make_cache()
    prefill(model, ids, cache)
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, (first if sc is None else sc) / 0.7)
    mx.eval(first, second)
    return first, second


def generated(model, prompts: list[list[int]], settings: DiffusionSettings, max_tokens: int) -> list[list[int]]:
    tokens = [[] for _ in prompts]
    for event in generate_step(model, prompts, max_tokens=max_tokens, settings=settings, eos_token_ids=[],
                               noise=SeededNoise(model.args.vocab_size, 7)):
        if isinstance(event, Canvas):
            for row, new in enumerate(event.tokens):
                tokens[row] += new
    return tokens


def step_seconds(model, ids: mx.array, canvas: mx.array, repeats: int) -> float:
    cache = model.make_cache()
    prefill(model, ids, cache)
    logits = model.denoise(canvas, cache)
    mx.eval(logits)
    tic = time.perf_counter()
    for _ in range(repeats):
        logits = model.denoise(canvas, cache, logits)
        mx.eval(logits)
    return (time.perf_counter() - tic) / repeats


def collective_seconds(model, group, canvas_length: int, repeats: int) -> float:
    """The communication of one sharded denoiser step, alone: per layer the attention output
    all_sum and the MLP+experts all_sum; the embedding lookup and product all_sums, the
    self-conditioning MLP all_sum, and the logits all_gather."""
    if group.size() == 1:
        return 0.0
    dims, vocab = model.args.hidden_size, model.args.vocab_size
    rows = -(-vocab // group.size())
    x, x2 = mx.ones((1, canvas_length, dims)), mx.ones((1, canvas_length, 2 * dims))
    part = mx.ones((canvas_length, rows))
    mx.eval(x, x2, part)

    def one_step():
        outs = [mx.distributed.all_sum(x, group=group) for _ in range(3)]
        for _ in model.layers:
            outs += [mx.distributed.all_sum(x, group=group), mx.distributed.all_sum(x2, group=group)]
        outs.append(mx.distributed.all_gather(part, group=group))
        mx.eval(outs)

    one_step()
    tic = time.perf_counter()
    for _ in range(repeats):
        one_step()
    return (time.perf_counter() - tic) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint folder")
    parser.add_argument("--random", choices=["tiny", "mid"], help="write a random float32 checkpoint to --out first (rank 0)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dist_model"))
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--sudoku", action="store_true", help="with --parity: generate from Sudoku puzzles (a trained model)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--canvas-length", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["native", "float32", "float64"], default="native",
                        help="cast the weights; float64 separates a sharding error from float32 rounding")
    args = parser.parse_args()

    group = mx.distributed.init()
    path = args.model
    if args.random:
        from benchmarks.random_checkpoint import write_random_checkpoint

        path = args.out
        if group.rank() == 0 and not (path / "config.json").is_file():
            small = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, head_dim=32,
                         global_head_dim=64, moe_intermediate_size=64, sliding_window=64) if args.random == "tiny" else {}
            write_random_checkpoint(path, **small)
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # wait for rank 0

    mx.reset_peak_memory()
    dtype = None if args.dtype == "native" else getattr(mx, args.dtype)
    sharded = load_model(path, dtype=dtype, group=group)
    load_peak = mx.get_peak_memory()
    weights = sum(v.nbytes for _, v in tree_flatten(sharded.parameters()))

    rng = np.random.default_rng(0)
    vocab = sharded.args.vocab_size
    ids = mx.array(rng.integers(3, vocab, size=(1, args.prompt_tokens)))
    canvas = mx.array(rng.integers(0, vocab, size=(1, args.canvas_length)))
    settings = DiffusionSettings(steps=args.steps, canvas_length=args.canvas_length, stability_threshold=0)

    result = {
        "ranks": group.size(), "dtype": args.dtype, "rank0_weights_mib": weights / 2**20, "rank0_load_peak_mib": load_peak / 2**20,
        "blas": os.environ.get("LD_PRELOAD", "default"),
    }
    mx.reset_peak_memory()
    result["step_ms"] = 1000 * step_seconds(sharded, ids, canvas, args.repeats)
    result["step_peak_mib"] = mx.get_peak_memory() / 2**20
    result["collectives_ms"] = 1000 * collective_seconds(sharded, group, args.canvas_length, args.repeats)
    if args.parity:
        if args.sudoku:  # a trained model: puzzles as prompts, its own canvas and default settings
            from mlx_diffgemma import sudoku
            from mlx_diffgemma.generate import resolve_settings

            n = sudoku.grid_size(sharded)
            puzzles = [sudoku.generate_puzzle(sudoku.DIFFICULTIES[n]["easy"], random.Random(i), n)[0] for i in range(8)]
            prompts, settings, max_tokens = [sudoku.prompt_ids(p) for p in puzzles], resolve_settings(sharded), n * n
        else:
            prompts, max_tokens = [ids[0].tolist()], args.max_tokens
        tokens = generated(sharded, prompts, settings, max_tokens)
        pair = logits_pair(sharded, ids, canvas)
        whole = load_model(path, dtype=dtype)
        reference = logits_pair(whole, ids, canvas)
        pair = (pair[0], logits_pair(sharded, ids, canvas, sc=reference[0])[1])
        result["max_abs_diff_first_step"] = mx.abs(pair[0] - reference[0]).max().item()
        result["max_abs_diff_self_conditioned"] = mx.abs(pair[1] - reference[1]).max().item()
        expected = generated(whole, prompts, settings, max_tokens)
        flat, flat_expected = sum(tokens, []), sum(expected, [])
        result["identical_rows"] = f"{sum(a == b for a, b in zip(tokens, expected))}/{len(prompts)}"
        result["identical_tokens"] = f"{sum(a == b for a, b in zip(flat, flat_expected))}/{len(flat)}"
        # Every rank must have generated the same canvases: compare their token sums.
        total = mx.distributed.all_sum(mx.array(sum(flat)), group=group).item()
        result["ranks_agree"] = total == group.size() * sum(flat)
    if group.rank() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
