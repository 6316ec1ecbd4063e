"""Train the built-in Sudoku model with `mlx-diffgemma finetune`, and measure its solve rate.

    python benchmarks/sudoku.py data  --size 6 --out /tmp/sudoku   # generated puzzles, JSONL
    python benchmarks/sudoku.py init  --size 6 --out /tmp/sudoku   # random model + tokenizer
    mlx-diffgemma finetune --model /tmp/sudoku/init --data /tmp/sudoku/data -o /tmp/sudoku/model ...
    python benchmarks/sudoku.py eval  --model /tmp/sudoku/model --count 200

Evaluation: held-out puzzles from a seed no training file uses, solved with the standard
sampler at the model's default settings (one canvas, at most 48 steps); a puzzle counts
as solved only when the whole grid is a valid solution that keeps every given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from mlx_diffgemma import sudoku

HELD_OUT_SEED = 12345
TRAIN_SEED, VALID_SEED = 1, 999_999
TRAIN_GIVENS = {9: (30, 45), 6: (10, 20), 4: (4, 10)}


def held_out(count: int, givens: int, n: int, seed: int = HELD_OUT_SEED) -> list[list[int]]:
    rng = random.Random(seed * 100 + givens)
    return [sudoku.generate_puzzle(givens, rng, n)[0] for _ in range(count)]


def evaluate(model, puzzles: list[list[int]], batch: int = 100, seed: int = 0, clamp: bool = False, rules: bool = False,
             tries: int = 1, **settings) -> dict:
    attempts, tic = [], time.perf_counter()
    for start in range(0, len(puzzles), batch):
        attempts += sudoku.solve(model, puzzles[start : start + batch], seed=seed + start, clamp=clamp, rules=rules,
                                 tries=tries, **settings)
    elapsed = time.perf_counter() - tic
    cells = [sum(g == s for g, s in zip(a.grid, sudoku.count_solutions(a.puzzle)[1])) / len(a.grid) for a in attempts]
    return {
        "puzzles": len(attempts),
        "solved": sum(a.solved for a in attempts),
        "solve_rate": sum(a.solved for a in attempts) / len(attempts),
        "cell_accuracy": float(np.mean(cells)),
        "steps_per_canvas": float(np.sum([a.steps for a in attempts]) / np.sum([a.tries for a in attempts])),
        "steps_per_puzzle": float(np.mean([a.steps for a in attempts])),
        "canvases_per_puzzle": float(np.mean([a.tries for a in attempts])),
        "tokens_per_forward": float(np.mean([(len(a.grid) + 1) * a.tries / a.steps for a in attempts])),
        "seconds_per_puzzle": elapsed / len(attempts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["data", "init", "eval", "curve"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/sudoku"))
    parser.add_argument("--model", type=Path, default=None, help="model to evaluate (default: the built-in one)")
    parser.add_argument("--size", type=int, choices=sorted(sudoku.BOXES), default=6)
    parser.add_argument("--train-examples", type=int, default=100_000)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--levels", default="easy,medium,hard")
    parser.add_argument("--seed", type=int, default=0, help="eval: sampler seed (puzzle i draws from seed + i)")
    parser.add_argument("--clamp", action="store_true", help="eval: fix the givens in the canvas")
    parser.add_argument("--rules", action="store_true",
                        help="eval: constrain the canvas to grids that keep the givens and repeat no digit in a row or box")
    parser.add_argument("--tries", type=int, default=1,
                        help="eval: denoise a puzzle whose grid is not a valid solution again, up to this many canvases")
    parser.add_argument("--freeze-after", type=int, default=0,
                        help="eval: freeze a cell once its accepted digit has held this many steps (0: off)")
    parser.add_argument("--fixed-sc", choices=["one_hot", "model"], default="one_hot",
                        help="eval, with --clamp: what self-conditioning sees at a given")
    parser.add_argument("--json", type=Path, help="eval: also write the results here")
    args = parser.parse_args()
    if args.stage == "data":
        folder = args.out / "data"
        folder.mkdir(parents=True, exist_ok=True)
        # Each generated puzzle under 20 random symmetries; validation from its own seed.
        givens = TRAIN_GIVENS[args.size]
        sudoku.write_dataset(folder / "train.jsonl", args.train_examples, givens, TRAIN_SEED, transforms=20, n=args.size)
        sudoku.write_dataset(folder / "valid.jsonl", 256, givens, VALID_SEED, n=args.size)
        print(f"wrote {folder}")
    elif args.stage == "init":
        print(f"wrote {sudoku.init_model(args.out / 'init', n=args.size, seed=0)}")
    elif args.stage == "curve":  # the loss history a finetune run saved, as a markdown table
        history = json.loads((args.model / "training_state.json").read_text())["history"]
        print("| step | training loss (mean of the last 10 steps) | validation loss |\n|---|---|---|")
        for h in history:
            if h["val_loss"] is not None:
                print(f"| {h['step']} | {h['train_loss']:.3f} | {h['val_loss']:.3f} |")

    else:
        model = sudoku.load_model(args.model)
        n = sudoku.grid_size(model)
        results = {}
        for level in args.levels.split(","):
            puzzles = held_out(args.count, sudoku.DIFFICULTIES[n][level], n)
            results[level] = evaluate(model, puzzles, seed=args.seed, clamp=args.clamp, rules=args.rules, tries=args.tries,
                                      fixed_self_conditioning=args.fixed_sc, freeze_after=args.freeze_after)
            print(level, json.dumps(results[level]), flush=True)
        report = {"model": str(args.model or sudoku.MODEL_DIR), "size": n, "puzzles_per_level": args.count, "seed": args.seed,
                  "clamp": args.clamp, "rules": args.rules, "tries": args.tries, "freeze_after": args.freeze_after, "fixed_self_conditioning": args.fixed_sc,
                  "blas": os.environ.get("LD_PRELOAD", "default"), "results": results}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
