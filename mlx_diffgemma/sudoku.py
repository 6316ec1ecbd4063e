"""Sudoku (9x9, and the smaller 6x6 and 4x4): a puzzle generator with unique solutions, a
solver, and the text format the built-in Sudoku model reads (the cells row by row, ``0``
for an empty cell).

Puzzles come from a random full grid with cells removed in random order while the
solution stays unique, down to a number of givens; ``DIFFICULTIES`` names the levels.
Validity, uniqueness and the number of givens are invariant under the Sudoku symmetries
(digit relabelling, row and column permutations within bands and stacks, band and stack
permutations, transposition of square boxes), so ``transform`` turns one generated puzzle
into many distinct training examples cheaply. A grid's size follows from its length.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # size -> box rows, box columns
DIFFICULTIES = {  # givens left in the grid
    9: {"easy": 40, "medium": 34, "hard": 28},
    6: {"easy": 18, "medium": 14, "hard": 11},
    4: {"easy": 8, "medium": 6, "hard": 5},
}


def size_of(grid: list[int]) -> int:
    n = math.isqrt(len(grid))
    if n * n != len(grid) or n not in BOXES:
        raise ValueError(f"a grid has 16, 36 or 81 cells (got {len(grid)})")
    return n


@lru_cache
def peers(n: int) -> list[list[int]]:
    """For each cell, the other cells of its row, column and box."""
    br, bc = BOXES[n]

    def unit(i: int) -> tuple[int, int, int]:
        r, c = divmod(i, n)
        return r, c, (r // br) * br + c // bc

    return [
        [j for j in range(n * n) if j != i and any(a == b for a, b in zip(unit(i), unit(j)))]
        for i in range(n * n)
    ]


def count_solutions(grid: list[int], limit: int = 2, rng: random.Random | None = None) -> tuple[int, list[int] | None]:
    """Solutions of ``grid`` (0 = empty) up to ``limit``, and the first one found.

    Depth-first search on the empty cell with the fewest candidates; ``rng`` shuffles the
    digits tried, which makes it a random full-grid generator on an empty grid.
    """
    n = size_of(grid)
    grid, near, full = list(grid), peers(n), (1 << (n + 1)) - 2
    found: list[list[int]] = []

    def search() -> bool:
        best, best_mask, best_count = -1, 0, n + 1
        for i, value in enumerate(grid):
            if value == 0:
                used = 0
                for j in near[i]:
                    used |= 1 << grid[j]
                mask = full & ~used
                count = bin(mask).count("1")
                if count < best_count:
                    best, best_mask, best_count = i, mask, count
                    if count <= 1:
                        break
        if best < 0:
            found.append(list(grid))
            return len(found) >= limit
        if best_count == 0:
            return False
        digits = [d for d in range(1, n + 1) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            grid[best] = d
            if search():
                return True
        grid[best] = 0
        return False

    search()
    return len(found), (found[0] if found else None)


def is_valid_solution(puzzle: list[int], solution: list[int]) -> bool:
    """``solution`` is a full valid grid that agrees with every given of ``puzzle``."""
    n = size_of(puzzle)
    if len(solution) != n * n or any(not 1 <= d <= n for d in solution):
        return False
    if any(p and p != s for p, s in zip(puzzle, solution)):
        return False
    return all(solution[i] != solution[j] for i in range(n * n) for j in peers(n)[i])


def generate_puzzle(givens: int, rng: random.Random, n: int = 9) -> tuple[list[int], list[int]]:
    """An ``n`` x ``n`` puzzle with a unique solution and ``givens`` filled cells (or the
    fewest reachable along one random removal order), and its solution."""
    _, solution = count_solutions([0] * (n * n), limit=1, rng=rng)
    puzzle = list(solution)
    order = list(range(n * n))
    rng.shuffle(order)
    filled = n * n
    for i in order:
        if filled == givens:
            break
        kept, puzzle[i] = puzzle[i], 0
        if count_solutions(puzzle)[0] != 1:
            puzzle[i] = kept
        else:
            filled -= 1
    return puzzle, solution


def transform(puzzle: list[int], solution: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """The same puzzle under a random Sudoku symmetry (an equally hard, unique puzzle)."""
    n = size_of(puzzle)
    br, bc = BOXES[n]
    digits = list(range(1, n + 1))
    rng.shuffle(digits)
    relabel = np.array([0] + digits)

    def lines(width: int) -> list[int]:  # band order, then line order within each band
        bands = rng.sample(range(n // width), n // width)
        return [width * b + r for b in bands for r in rng.sample(range(width), width)]

    rows, cols = lines(br), lines(bc)
    flip = br == bc and rng.random() < 0.5
    out = []
    for grid in (puzzle, solution):
        g = relabel[np.array(grid).reshape(n, n)][rows][:, cols]
        out.append((g.T if flip else g).reshape(-1).tolist())
    return out[0], out[1]


def format_grid(grid: list[int]) -> str:
    return "".join(str(d) for d in grid)


def parse_grid(text: str) -> list[int]:
    """A grid from text: 16, 36 or 81 cells of digits, with ``0`` or ``.`` for empty cells;
    whitespace, ``|``, ``-`` and ``+`` (as in a drawn grid) are ignored."""
    cells = [c for c in text if not c.isspace() and c not in "|-+"]
    if len(cells) not in (16, 36, 81) or any(c not in "0123456789." for c in cells):
        raise ValueError(f"a puzzle is 81 cells (or 36, or 16) of digits, with 0 or . for empty ones (got {len(cells)} cells)")
    grid = [0 if c == "." else int(c) for c in cells]
    n = size_of(grid)
    if any(d > n for d in grid):
        raise ValueError(f"a {n}x{n} puzzle uses the digits 1-{n}")
    clash = next(((i, j) for i in range(n * n) for j in peers(n)[i] if j > i and grid[i] and grid[i] == grid[j]), None)
    if clash is not None:
        (r1, c1), (r2, c2) = divmod(clash[0], n), divmod(clash[1], n)
        raise ValueError(f"the puzzle repeats {grid[clash[0]]} at row {r1 + 1} column {c1 + 1} and row {r2 + 1} column {c2 + 1}")
    return grid


def conflicts(grid: list[int]) -> set[int]:
    """Filled cells that repeat a digit of their row, column or box."""
    near = peers(size_of(grid))
    return {i for i, d in enumerate(grid) if d and any(grid[j] == d for j in near[i])}


def render(grid: list[int], puzzle: list[int] | None = None) -> str:
    """A drawn grid (rich markup): with ``puzzle``, givens in bold and clashing cells in red."""
    n = size_of(grid)
    br, bc = BOXES[n]
    clash = conflicts(grid) if puzzle is not None else set()
    rule = "-+-".join(["-" * (2 * bc - 1)] * (n // bc))
    out = []
    for r in range(n):
        if r and r % br == 0:
            out.append(rule)
        cells = []
        for c in range(n):
            d = grid[n * r + c]
            text = str(d) if d else "."
            if puzzle is not None and puzzle[n * r + c]:
                text = f"[bold]{text}[/bold]"
            elif n * r + c in clash:
                text = f"[red]{text}[/red]"
            cells.append(text + (" |" if (c + 1) % bc == 0 and c + 1 < n else ""))
        out.append(" ".join(cells))
    return "\n".join(out)


def puzzles(givens: int | tuple[int, int], seed: int, n: int = 9) -> Iterator[tuple[list[int], list[int]]]:
    """An endless stream of generated puzzles; ``givens`` a count or an inclusive range."""
    rng = random.Random(seed)
    while True:
        target = givens if isinstance(givens, int) else rng.randint(*givens)
        yield generate_puzzle(target, rng, n)


# ---------------------------------------------------------------- the built-in model

VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>", *"0123456789", ".", "\n"]
PAD, EOS, BOS = 0, 1, 2
DIGIT0 = VOCAB.index("0")


def model_config(n: int, **text_config: Any) -> dict[str, Any]:
    """A DiffusionGemma text model at toy scale for ``n`` x ``n`` grids: the same layer layout
    (sliding and full attention, a dense MLP beside routed experts, self-conditioning), a
    16-token vocabulary, and a canvas of the cells plus EOS. The RoPE base is small so that
    some rotation periods fall near the grid's row and box strides."""
    text = {
        "vocab_size": len(VOCAB), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32, "global_head_dim": 32,
        "num_global_key_value_heads": 4, "attention_k_eq_v": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 128, "sliding_window": 256, "max_position_embeddings": 512,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        "final_logit_softcapping": 30.0, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS,
    }
    text.update(text_config)
    return {"model_type": "diffusion_gemma", "canvas_length": n * n + 1, "tie_word_embeddings": True, "text_config": text}


def write_tokenizer(folder: Path) -> None:
    """A character-level tokenizer for grids (``tokenizer.json``), loadable by ``transformers``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.add_special_tokens(VOCAB[:4])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def init_model(folder: Path, n: int = 9, seed: int = 0, **text_config: Any) -> Path:
    """A randomly initialised Sudoku model folder (config, weights, tokenizer), ready to train."""
    from mlx.utils import tree_flatten

    from .model import Model, ModelArgs

    config = model_config(n, **text_config)
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS, "pad_token_id": PAD, "bos_token_id": BOS}))
    write_tokenizer(folder)
    return folder


def prompt_ids(puzzle: list[int]) -> list[int]:
    return [BOS] + [DIGIT0 + d for d in puzzle]


def completion_ids(solution: list[int]) -> list[int]:
    return [DIGIT0 + d for d in solution]


def grid_from_ids(ids: list[int], n: int) -> list[int]:
    """The cells of a canvas; a cell whose token is not a digit reads as 0 (empty)."""
    cells = [t - DIGIT0 if DIGIT0 <= t <= DIGIT0 + 9 else 0 for t in ids[: n * n]]
    return cells + [0] * (n * n - len(cells))


def grid_size(model) -> int:
    """The grid a Sudoku model solves, from its canvas (the cells and EOS)."""
    return size_of([0] * (model.args.canvas_length - 1))


def write_dataset(path: Path, count: int, givens: int | tuple[int, int], seed: int, transforms: int = 1, n: int = 9) -> None:
    """``count`` prompt/completion lines (puzzle, solution) for ``finetune``; each generated
    puzzle appears under ``transforms`` random symmetries."""
    rng = random.Random(seed + 1)
    stream = puzzles(givens, seed, n)
    with path.open("w") as f:
        written = 0
        while written < count:
            puzzle, solution = next(stream)
            for _ in range(min(transforms, count - written)):
                p, s = transform(puzzle, solution, rng)
                f.write(json.dumps({"prompt": format_grid(p), "completion": format_grid(s)}) + "\n")
                written += 1


# ---------------------------------------------------------------- solving with the sampler

MODEL_DIR = Path(__file__).parent / "sudoku_model"


@dataclass
class Attempt:
    puzzle: list[int]
    grid: list[int]  # the committed canvas as a grid
    steps: int  # denoising steps until the canvas stopped, summed over tries
    solved: bool
    tries: int = 1  # canvases denoised for this puzzle


def rule_automaton(puzzle: list[int], vocab_size: int):
    """The grids that keep the givens and have every digit once in each row and each box, as
    an automaton over the cells in reading order (state: the cell, and the digits used so far
    in its row and in the boxes of its band). Columns are left to the model: tracking them
    too would multiply the states by the digits used in every column."""
    from .constrained import Automaton

    n = size_of(puzzle)
    br, bc = BOXES[n]
    ids: dict[tuple, int] = {}
    edges: list[tuple[int, int, int]] = []  # (state, digit, next state)
    frontier = [(0, 0, (0,) * (n // bc))]
    ids[frontier[0]] = 0
    while frontier:
        ahead = []
        for state in frontier:
            cell, row, boxes = state
            if cell == n * n:
                continue
            r, c = divmod(cell, n)
            digits = [puzzle[cell]] if puzzle[cell] else range(1, n + 1)
            for d in digits:
                bit = 1 << d
                if row & bit or boxes[c // bc] & bit:
                    continue
                new_row = 0 if c == n - 1 else row | bit
                new_boxes = tuple(b | bit if i == c // bc else b for i, b in enumerate(boxes))
                if c == n - 1 and (r + 1) % br == 0:  # a band ends: its boxes are complete
                    new_boxes = (0,) * len(boxes)
                target = (cell + 1, new_row, new_boxes)
                if target not in ids:
                    ids[target] = len(ids)
                    ahead.append(target)
                edges.append((ids[state], d, ids[target]))
        frontier = ahead
    token_class = np.full(vocab_size, n, dtype=np.int32)  # digit d is class d - 1; every other token class n
    token_class[DIGIT0 + 1 : DIGIT0 + n + 1] = np.arange(n)
    table = np.full((len(ids) + 1, n + 1), -1, dtype=np.int32)  # the last row: after EOS
    for state, d, target in edges:
        table[state, d - 1] = target
    finals = [i for (cell, _, _), i in ids.items() if cell == n * n]
    return Automaton.from_table(table, token_class, 0, finals)


def solve_stream(model, puzzles: list[list[int]], seed: int = 0, clamp: bool = False, rules: bool = False,
                 **settings: Any) -> Iterator[tuple[int, list[list[int]]] | list[Attempt]]:
    """Denoise a batch of puzzles with the standard sampler (the model's defaults unless
    ``settings`` override them): yields ``(step, grids)`` drafts, then the attempts.

    With ``clamp``, the givens are fixed in the canvas (they are known cells of the
    answer) and only the empty cells are denoised. With ``rules``, the canvas is
    constrained to grids that keep the givens and repeat no digit in a row or a box
    (``rule_automaton``, through the constrained sampler of ``constrained.py``)."""
    from .generate import Canvas, Draft, SeededNoise, generate_step, resolve_settings

    n = grid_size(model)
    if any(len(p) != n * n for p in puzzles):
        raise ValueError(f"this model solves {n}x{n} puzzles ({n * n} cells)")
    if clamp and rules:
        raise ValueError("rules keep the givens already: use clamp or rules, not both")
    resolved = resolve_settings(model, **settings)
    # No EOS rule: the canvas is the cells then EOS, and a stray EOS must not cut a grid short.
    events = generate_step(
        model, [prompt_ids(p) for p in puzzles], max_tokens=n * n, settings=resolved, eos_token_ids=[],
        noise=SeededNoise(model.args.vocab_size, seed), pad_token_id=PAD,
        fixed=[[DIGIT0 + d if d else None for d in p] for p in puzzles] if clamp else None,
        constraint=[rule_automaton(p, model.args.vocab_size) for p in puzzles] if rules else None,
    )
    for event in events:
        if isinstance(event, Draft):
            yield event.step, [grid_from_ids(row, n) for row in event.tokens.tolist()]
        elif isinstance(event, Canvas):
            grids = [grid_from_ids(t, n) for t in event.tokens]
            yield [Attempt(p, g, k, is_valid_solution(p, g)) for p, g, k in zip(puzzles, grids, event.forward_passes)]
            return


RETRY_SEED_STRIDE = 1_000_003  # try t of a puzzle draws from seed + t * stride: no stream is reused


def solve(model, puzzles: list[list[int]], seed: int = 0, clamp: bool = False, rules: bool = False,
          tries: int = 1, **settings: Any) -> list[Attempt]:
    """Solve a batch of puzzles (see ``solve_stream``). With ``tries`` above 1, a puzzle whose
    grid is not a valid solution is denoised again from fresh noise, up to ``tries`` canvases
    in all: a grid is checked in microseconds, so a wrong one need not be kept."""
    if tries < 1:
        raise ValueError(f"tries must be at least 1 (got {tries})")
    attempts: list[Attempt | None] = [None] * len(puzzles)
    todo = list(range(len(puzzles)))
    for t in range(tries):
        batch = [puzzles[i] for i in todo]
        result = None
        for event in solve_stream(model, batch, seed + t * RETRY_SEED_STRIDE, clamp, rules, **settings):
            if isinstance(event, list):
                result = event
        if result is None:
            raise RuntimeError("generation ended without a canvas")
        for i, new in zip(todo, result):
            old = attempts[i]
            if old is not None:
                new.steps, new.tries = new.steps + old.steps, old.tries + 1
            attempts[i] = new
        todo = [i for i in todo if not attempts[i].solved]
        if not todo:
            break
    return attempts


def load_model(path: Path | None = None):
    """The built-in Sudoku model (or another trained with this tokenizer)."""
    from .utils import load_model as load_weights

    return load_weights(path or MODEL_DIR)
