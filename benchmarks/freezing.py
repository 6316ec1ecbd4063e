"""Frozen positions (``--freeze-after N``) on the trained Sudoku model: quality, positions run, FLOPs and time.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/freezing.py --count 200

For each setting (0 = off, the reference) and level: the solve rate on the held-out puzzles of
``benchmarks/sudoku.py`` with the same seeds (puzzle ``i`` draws from seed ``i``, batches of 100
as ``sudoku.py eval``), the canvas positions the denoiser ran per step, the FLOPs of a canvas on paper (``bench.denoise_flops``), and
the wall time of one puzzle at a time (batch 1, where a row's frozen positions are all saved),
the settings alternated puzzle by puzzle so that they share the machine's state.

With ``--shapes mid vocab``: the time of a 256-position canvas on random models of the mid-size
and vocabulary-heavy shapes instead, off against frozen (``shape_timing``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sudoku import held_out  # noqa: E402  (benchmarks/sudoku.py)

from mlx_diffgemma import sudoku  # noqa: E402
from mlx_diffgemma.bench import denoise_flops  # noqa: E402


def shape_timing(shape: str, canvases: int, steps: int, freeze_after: int) -> dict:
    """One 256-position canvas on a random model of ``random_checkpoint.SHAPES[shape]``, off and frozen
    alternated: seconds per canvas and positions run. A random model never settles at the default
    temperatures, so both run at temperature 0.02, where its argmax holds and positions freeze, and
    every step runs (no early stop: a canvas never counts as stable, since the stability window is the
    canvas's steps): this times the mechanism, not a quality setting."""
    import tempfile

    import mlx.core as mx

    from random_checkpoint import SHAPES, write_random_checkpoint

    from mlx_diffgemma.generate import SeededNoise, denoise_canvas, prefill, resolve_settings
    from mlx_diffgemma.utils import load_model

    config, prompt = SHAPES[shape]
    model = load_model(write_random_checkpoint(Path(tempfile.mkdtemp()), **config))
    counter = Counter(model)
    ids = mx.array([[(7 * i) % model.args.vocab_size for i in range(prompt)]])
    seconds, positions = {0: [], freeze_after: []}, {0: 0, freeze_after: 0}
    for rep in range(canvases + 1):
        for k in (0, freeze_after):
            settings = resolve_settings(model, steps=steps, t_max=0.02, t_min=0.02, stability_threshold=steps,
                                        freeze_after=k)
            cache = model.make_cache()
            prefill(model, ids, cache)
            before, tic = counter.positions, time.perf_counter()
            ran = sum(1 for _ in denoise_canvas(model, cache, 0, 1, settings, SeededNoise(model.args.vocab_size, rep)))
            assert ran == steps, f"{ran} of {steps} steps ran"
            if rep:  # the first round warms up
                seconds[k].append(time.perf_counter() - tic)
                positions[k] += counter.positions - before
    off, on = sorted(seconds[0])[len(seconds[0]) // 2], sorted(seconds[freeze_after])[len(seconds[freeze_after]) // 2]
    open_per_step = positions[freeze_after] / (canvases * steps)
    flops = {k: sum(denoise_flops(model.args, prompt, 256, self_conditioning=s > 0,
                                  open_positions=256 if k == 0 else open_per_step) for s in range(steps)) for k in (0, freeze_after)}
    return {"shape": shape, "steps": steps, "seconds_off": off, "seconds_frozen": on, "time_ratio": on / off,
            "open_positions_per_step": open_per_step, "flops_ratio": flops[freeze_after] / flops[0]}


class Counter:
    """Wraps ``model.denoise`` to count the canvas positions its calls run."""

    def __init__(self, model):
        self.inner, self.positions = model.denoise, 0
        model.denoise = self

    def __call__(self, canvas, cache, *args, **kwargs):
        index = args[3] if len(args) > 3 else kwargs.get("open_index")
        self.positions += (canvas if index is None else index).size
        return self.inner(canvas, cache, *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--timed", type=int, default=40, help="puzzles per level timed one at a time")
    parser.add_argument("--settings", default="0,1,2,3", help="freeze_after values (0: off)")
    parser.add_argument("--levels", default="easy,medium,hard")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", nargs="*", default=[], choices=["mid", "vocab"],
                        help="instead: time a canvas of these random-model shapes (random_checkpoint.SHAPES), off against "
                        "--shape-freeze-after")
    parser.add_argument("--shape-freeze-after", type=int, default=2)
    parser.add_argument("--shape-canvases", type=int, default=3)
    parser.add_argument("--shape-steps", type=int, default=16)
    args = parser.parse_args()
    if args.shapes:
        for shape in args.shapes:
            print(json.dumps(shape_timing(shape, args.shape_canvases, args.shape_steps, args.shape_freeze_after)), flush=True)
        return
    model = sudoku.load_model()
    counter = Counter(model)
    n = sudoku.grid_size(model)
    canvas, prompt = n * n + 1, len(sudoku.prompt_ids([0] * n * n))
    values = [int(v) for v in args.settings.split(",")]
    report = {}
    for level in args.levels.split(","):
        puzzles = held_out(args.count, sudoku.DIFFICULTIES[n][level], n)
        for k in values:
            attempts = []
            for start in range(0, len(puzzles), 100):
                attempts += sudoku.solve(model, puzzles[start : start + 100], seed=start, freeze_after=k)
            report[(level, k)] = {
                "solve_rate": sum(a.solved for a in attempts) / len(attempts),
                "steps_per_canvas": sum(a.steps for a in attempts) / len(attempts),
            }
        timed = puzzles[: args.timed]
        seconds = {k: 0.0 for k in values}
        run_positions = {k: 0 for k in values}
        run_steps = {k: 0 for k in values}
        for i, puzzle in enumerate(timed):
            for k in values:
                before = counter.positions
                tic = time.perf_counter()
                [attempt] = sudoku.solve(model, [puzzle], seed=i, freeze_after=k)
                seconds[k] += time.perf_counter() - tic
                run_positions[k] += counter.positions - before
                run_steps[k] += attempt.steps
        for k in values:
            mean_open = run_positions[k] / run_steps[k]
            row = report[(level, k)]
            row["batch1_open_positions_per_step"] = mean_open
            row["batch1_steps_per_canvas"] = run_steps[k] / len(timed)
            row["batch1_flops_per_canvas"] = row["batch1_steps_per_canvas"] * denoise_flops(
                model.args, prompt, canvas, open_positions=mean_open)
            row["batch1_seconds_per_puzzle"] = seconds[k] / len(timed)
            row["time_vs_off"] = seconds[k] / seconds[values[0]]
            print(level, k, json.dumps(row), flush=True)
    print(f"| level | freeze_after | solved | steps per canvas | open positions per step (batch 1, of {canvas}) "
          "| FLOPs per canvas vs off | time per puzzle vs off (batch 1) |")
    print("|---|---|---|---|---|---|---|")
    for level in args.levels.split(","):
        base = report[(level, values[0])]["batch1_flops_per_canvas"]
        for k in values:
            r = report[(level, k)]
            print(f"| {level} | {k or 'off'} | {r['solve_rate']:.1%} | {r['steps_per_canvas']:.1f} | "
                  f"{r['batch1_open_positions_per_step']:.1f} | {r['batch1_flops_per_canvas'] / base:.2f}x | "
                  f"{r['time_vs_off']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({f"{lv}/{k}": r for (lv, k), r in report.items()}, indent=2))


if __name__ == "__main__":
    main()
