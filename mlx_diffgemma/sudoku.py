"""9x9 Sudoku: a puzzle generator with unique solutions, a solver, and the text format the
built-in Sudoku model reads (81 characters, row by row, ``0`` for an empty cell).

Puzzles come from a random full grid with cells removed in random order while the
solution stays unique, down to a number of givens; ``DIFFICULTIES`` names the levels.
Validity, uniqueness and the number of givens are invariant under the Sudoku symmetries
(digit relabelling, row and column permutations within bands and stacks, band and stack
permutations, transposition), so ``transform`` turns one generated puzzle into many
distinct training examples cheaply.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

DIFFICULTIES = {"easy": 40, "medium": 34, "hard": 28}  # givens left in the grid
ALL = 0x3FE  # bits 1..9

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
PEERS = [
    sorted({j for j in range(81) if j != i and (_ROW[j] == _ROW[i] or _COL[j] == _COL[i] or _BOX[j] == _BOX[i])})
    for i in range(81)
]


def _candidates(grid: list[int], i: int) -> int:
    used = 0
    for j in PEERS[i]:
        used |= 1 << grid[j]
    return ALL & ~used


def count_solutions(grid: list[int], limit: int = 2, rng: random.Random | None = None) -> tuple[int, list[int] | None]:
    """Solutions of ``grid`` (0 = empty) up to ``limit``, and the first one found.

    Depth-first search on the empty cell with the fewest candidates; ``rng`` shuffles the
    digits tried, which makes it a random full-grid generator on an empty grid.
    """
    grid = list(grid)
    found: list[list[int]] = []

    def search() -> bool:
        best, best_mask, best_count = -1, 0, 10
        for i in range(81):
            if grid[i] == 0:
                mask = _candidates(grid, i)
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
        digits = [d for d in range(1, 10) if best_mask >> d & 1]
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
    if len(solution) != 81 or any(not 1 <= d <= 9 for d in solution):
        return False
    if any(p and p != s for p, s in zip(puzzle, solution)):
        return False
    return all(solution[i] != solution[j] for i in range(81) for j in PEERS[i])


def generate_puzzle(givens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """A puzzle with a unique solution and ``givens`` filled cells (or the fewest reachable
    along one random removal order), and its solution."""
    _, solution = count_solutions([0] * 81, limit=1, rng=rng)
    puzzle = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    filled = 81
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
    digits = list(range(1, 10))
    rng.shuffle(digits)
    relabel = np.array([0] + digits)

    def lines() -> list[int]:
        bands = rng.sample(range(3), 3)
        return [3 * b + r for b in bands for r in rng.sample(range(3), 3)]

    rows, cols = lines(), lines()
    out = []
    for grid in (puzzle, solution):
        g = relabel[np.array(grid).reshape(9, 9)][rows][:, cols]
        out.append((g.T if rng.random() < 0.5 else g).reshape(-1).tolist())
    return out[0], out[1]


def format_grid(grid: list[int]) -> str:
    return "".join(str(d) for d in grid)


def parse_grid(text: str) -> list[int]:
    """An 81-cell grid from text: digits, with ``0`` or ``.`` for empty cells; whitespace, ``|``,
    ``-`` and ``+`` (as in a drawn grid) are ignored."""
    cells = [c for c in text if not c.isspace() and c not in "|-+"]
    if len(cells) != 81 or any(c not in "0123456789." for c in cells):
        raise ValueError(f"a puzzle is 81 cells of digits 1-9 with 0 or . for empty ones (got {len(cells)} cells)")
    grid = [0 if c == "." else int(c) for c in cells]
    if count_solutions(grid, limit=1)[0] == 0:
        raise ValueError("this puzzle has no solution")
    return grid


def render(grid: list[int], puzzle: list[int] | None = None) -> str:
    """A drawn grid; with ``puzzle``, the givens are bold (rich markup)."""
    out = []
    for r in range(9):
        if r and r % 3 == 0:
            out.append("------+-------+------")
        cells = []
        for c in range(9):
            d = grid[9 * r + c]
            text = str(d) if d else "."
            if puzzle is not None and puzzle[9 * r + c]:
                text = f"[bold]{text}[/bold]"
            cells.append(text + (" |" if c in (2, 5) else ""))
        out.append(" ".join(cells))
    return "\n".join(out)


def puzzles(givens: int | tuple[int, int], seed: int) -> Iterator[tuple[list[int], list[int]]]:
    """An endless stream of generated puzzles; ``givens`` a count or an inclusive range."""
    rng = random.Random(seed)
    while True:
        target = givens if isinstance(givens, int) else rng.randint(*givens)
        yield generate_puzzle(target, rng)


# ---------------------------------------------------------------- the built-in model

VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>", *"0123456789", ".", "\n"]
PAD, EOS, BOS = 0, 1, 2
DIGIT0 = VOCAB.index("0")
CANVAS = 82  # the 81 cells and EOS

# A DiffusionGemma text model at toy scale: same layer layout (sliding and full attention,
# dense MLP beside routed experts, self-conditioning), 16-token vocabulary. The RoPE base
# is small so that some rotation periods fall near the grid's 9, 27 and 81.
MODEL_CONFIG: dict[str, Any] = {
    "model_type": "diffusion_gemma",
    "canvas_length": CANVAS,
    "tie_word_embeddings": True,
    "text_config": {
        "vocab_size": len(VOCAB), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32, "global_head_dim": 32,
        "num_global_key_value_heads": 4, "attention_k_eq_v": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 128, "sliding_window": 256, "max_position_embeddings": 512,
        "layer_types": ["sliding_attention", "full_attention"] * 3,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        "final_logit_softcapping": 30.0, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS,
    },
}


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


def init_model(folder: Path, seed: int = 0, **text_config: Any) -> Path:
    """A randomly initialised Sudoku model folder (config, weights, tokenizer), ready to train."""
    from mlx.utils import tree_flatten

    from .model import Model, ModelArgs

    config = json.loads(json.dumps(MODEL_CONFIG))
    config["text_config"].update(text_config)
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


def grid_from_ids(ids: list[int]) -> list[int]:
    """The 81 cells of a canvas; a cell whose token is not a digit reads as 0 (empty)."""
    cells = [t - DIGIT0 if DIGIT0 <= t <= DIGIT0 + 9 else 0 for t in ids[:81]]
    return cells + [0] * (81 - len(cells))


def write_dataset(path: Path, count: int, givens: int | tuple[int, int], seed: int, transforms: int = 1) -> None:
    """``count`` prompt/completion lines (puzzle, solution) for ``finetune``; each generated
    puzzle appears under ``transforms`` random symmetries."""
    rng = random.Random(seed + 1)
    stream = puzzles(givens, seed)
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
    steps: int  # denoising steps until the canvas stopped
    solved: bool


def solve_stream(model, puzzles: list[list[int]], seed: int = 0, **settings: Any) -> Iterator[tuple[int, list[list[int]]] | list[Attempt]]:
    """Denoise a batch of puzzles with the standard sampler (the model's defaults unless
    ``settings`` override them): yields ``(step, grids)`` drafts, then the attempts."""
    from .generate import Canvas, Draft, SeededNoise, generate_step, resolve_settings

    resolved = resolve_settings(model, **settings)
    events = generate_step(
        model, [prompt_ids(p) for p in puzzles], max_tokens=81, settings=resolved, eos_token_ids=[EOS],
        noise=SeededNoise(model.args.vocab_size, seed), pad_token_id=PAD,
    )
    for event in events:
        if isinstance(event, Draft):
            yield event.step, [grid_from_ids(row) for row in event.tokens.tolist()]
        elif isinstance(event, Canvas):
            grids = [grid_from_ids(t) for t in event.tokens]
            yield [Attempt(p, g, n, is_valid_solution(p, g)) for p, g, n in zip(puzzles, grids, event.forward_passes)]
            return


def solve(model, puzzles: list[list[int]], seed: int = 0, **settings: Any) -> list[Attempt]:
    for event in solve_stream(model, puzzles, seed, **settings):
        if isinstance(event, list):
            return event
    raise RuntimeError("generation ended without a canvas")


def load_model(path: Path | None = None):
    """The built-in Sudoku model (or another trained with this tokenizer)."""
    from .utils import load_model as load_weights

    return load_weights(path or MODEL_DIR)
