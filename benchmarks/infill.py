"""How often the infill length rule finds the true length, where shorter and longer candidates exist.

    python benchmarks/infill.py --count 200 --candidates 5 --level medium
    python benchmarks/infill.py --count 200 --candidates 5 --window below   # the truth is always the longest
    python benchmarks/infill.py --model agent --count 200 --candidates 5   # text: replies the agent fixture learned

On the trained Sudoku model, each held-out puzzle's solution is cut into a lead (cells fixed
at the start of the canvas), a middle of known length and a suffix (the rest of the grid,
then EOS). The candidates are ``--candidates`` consecutive lengths that hold the true one:
with ``--window random`` at a random place among them, so that taking the shortest, the
longest or a random candidate each finds the truth one time in ``--candidates``; the canvas
is widened by ``candidates - 1`` positions beyond the model's 37 so that every candidate
fits (the model was trained on 37: the extra positions hold PAD after EOS). With ``--window
below`` (the first version of this benchmark) the truth is the longest candidate and the
canvas stays 37. Reported, on the same draws: how often the rule and each baseline pick the
true length, the mean distance of the rule's pick from it, and the share of cells right in
the rule's middles (cell by cell against the truth, over the chosen length).

``--model agent`` does the same with text: replies the agent fixture (``tests/fixtures``)
was trained on, as tokens: a thought and a ``get_weather`` call, an answer from a tool
result, or a greeting, after their chat prompt, ended by ``<turn|>``. Its canvas of 48 holds
every candidate, so nothing is widened there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mlx_diffgemma import load, sudoku
from mlx_diffgemma.generate import prepare_prompt
from mlx_diffgemma.infill import infill_tokens

TESTS = Path(__file__).resolve().parents[1] / "tests"


def sudoku_cases(count: int, level: str, rng: random.Random) -> Iterator[tuple]:
    """(model, prompt ids, answer ids, end id, pad id) for held-out puzzles."""
    model = sudoku.load_model()
    n = sudoku.grid_size(model)
    for i in range(count):
        puzzle, solution = sudoku.generate_puzzle(sudoku.DIFFICULTIES[n][level], random.Random(10_000 + i), n)
        yield model, sudoku.prompt_ids(puzzle), sudoku.completion_ids(solution), sudoku.EOS, sudoku.PAD


def agent_cases(count: int, shortest: int, rng: random.Random) -> Iterator[tuple]:
    """The same for replies the agent fixture was trained on (tests/fixtures/agent_model), each ended by <turn|>."""
    sys.path.insert(0, str(TESTS))
    from fixtures.build_agent_model import TURN_END, chats

    model, tokenizer = load(str(TESTS / "fixtures" / "agent_model"))
    records = []
    for record in chats():
        reply = list(tokenizer.encode(record["messages"][-1]["content"], add_special_tokens=False))
        if len(reply) >= shortest:
            records.append((record, reply))
    for record, reply in rng.sample(records, count):
        prompt = prepare_prompt(tokenizer, record["messages"][:-1], tools=record.get("tools"), enable_thinking=True)
        yield model, prompt, reply, TURN_END, model.args.pad_token_id or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sudoku", "agent"), default="sudoku")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--window", choices=("random", "below"), default="random")
    parser.add_argument("--level", default="medium", help="Sudoku puzzles' level.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    k = args.candidates
    widen = k - 1 if args.window == "random" else 0
    rng = random.Random(args.seed)
    cases = (sudoku_cases(args.count, args.level, rng) if args.model == "sudoku" else agent_cases(args.count, k + 2, rng))
    hits = {"rule": 0, "shortest": 0, "longest": 0, "random": 0}
    distance, right, total, canvases, tic = 0, 0, 0, set(), time.perf_counter()
    for i, (model, prompt, ids, end, pad) in enumerate(cases):
        m = len(ids)
        a = rng.randrange(0, m - k - 1)  # lead ids[:a], middle ids[a:b] (at least k tokens), suffix ids[b:]
        b = rng.randrange(a + k, m)
        true = b - a
        low = true - (rng.randrange(k) if args.window == "random" else k - 1)
        lengths = list(range(low, low + k))
        canvas = max(model.args.canvas_length, m + 1 + widen)  # the model's own, unless a candidate would not fit
        canvases.add(canvas)
        result = infill_tokens(model, prompt, ids[b:], end=[end], pad=pad, lead=ids[:a], lengths=lengths,
                               seed=args.seed + i, canvas_length=canvas)
        picks = {"rule": result.length, "shortest": lengths[0], "longest": lengths[-1], "random": rng.choice(lengths)}
        for name, pick in picks.items():
            hits[name] += pick == true
        distance += abs(result.length - true)
        right += sum(x == y for x, y in zip(result.tokens, ids[a:]))
        total += result.length
    report = {"model": args.model, "cases": args.count, **({"level": args.level} if args.model == "sudoku" else {}),
              "candidates": k, "window": args.window, "canvas_lengths": sorted(canvases),
              "true_length_chosen": {name: hit / args.count for name, hit in hits.items()},
              "mean_distance_from_true_length": distance / args.count,
              "middle_token_accuracy": right / total, "seconds_per_case": (time.perf_counter() - tic) / args.count}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
