"""How often the infill length rule finds the true length, on the trained Sudoku model.

    python benchmarks/infill.py --count 100 --spread 3

Each held-out puzzle's solution is cut into a lead (cells fixed at the canvas start), a
middle of known length and a suffix; the rule denoises candidate lengths from the true
one minus ``spread`` to the true one (a Sudoku canvas is exactly a grid, so no longer
middle fits) and keeps the likeliest. Reported: how often it picks the true length, how
often it picks the longest candidate (which is the true one here: the baseline a trivial
rule would reach), and the share of the chosen middles' cells that are right.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from mlx_diffgemma import sudoku
from mlx_diffgemma.infill import infill_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--spread", type=int, default=3)
    parser.add_argument("--level", default="medium")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = sudoku.load_model()
    n = sudoku.grid_size(model)
    rng = random.Random(args.seed)
    right_length, right_cells, cells, tic = 0, 0, 0, time.perf_counter()
    for i in range(args.count):
        puzzle, solution = sudoku.generate_puzzle(sudoku.DIFFICULTIES[n][args.level], random.Random(10_000 + i), n)
        a = rng.randrange(0, n * n - 8)
        b = rng.randrange(a + args.spread + 2, n * n + 1)
        ids = sudoku.completion_ids(solution)
        result = infill_tokens(model, sudoku.prompt_ids(puzzle), ids[b:], end=[sudoku.EOS], pad=sudoku.PAD,
                               lead=ids[:a], lengths=range(b - a - args.spread, b - a + 1), seed=args.seed + i)
        right_length += result.length == b - a
        truth = ids[a : a + result.length]
        right_cells += sum(x == y for x, y in zip(result.tokens, truth))
        cells += result.length
    report = {"puzzles": args.count, "level": args.level, "candidates": args.spread + 1,
              "true_length_chosen": right_length / args.count, "middle_cell_accuracy": right_cells / cells,
              "seconds_per_puzzle": (time.perf_counter() - tic) / args.count}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
