"""Frozen positions (``freeze_after``): only open positions run; frozen tokens stay put."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load, sudoku
from mlx_diffgemma.generate import Canvas, Draft, SeededNoise, generate_step, prefill, resolve_settings


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


def run(model, prompts, max_tokens=32, seed=0, **settings):
    events = generate_step(model, prompts, max_tokens=max_tokens, settings=resolve_settings(model, steps=8, **settings),
                           eos_token_ids=[], noise=SeededNoise(model.args.vocab_size, seed))
    events = list(events)
    return [e for e in events if isinstance(e, Draft)], [e for e in events if isinstance(e, Canvas)]


def test_open_positions_get_the_logits_the_whole_canvas_gives_them(loaded):
    """With every position's layer inputs from the same canvas, a subset's logits are the full pass's."""
    model, _ = loaded
    cache = model.make_cache()
    prefill(model, mx.array([[2, 10, 11, 12, 13], [2, 14, 15, 16, 17]]), cache)
    canvas = mx.array([[20 + i for i in range(16)]] * 2)
    inputs = [None] * len(model.layers)
    full = model.denoise(canvas, cache, open_index=mx.array([list(range(16))] * 2), canvas_keys_values=inputs)
    assert np.allclose(np.array(full), np.array(model.denoise(canvas, cache)), atol=1e-5)
    subset = mx.array([[1, 4, 5, 15], [0, 2, 2, 2]])  # the second row repeats its last to fill the width
    part = model.denoise(canvas, cache, open_index=subset, canvas_keys_values=inputs)
    expected = np.take_along_axis(np.array(full), np.array(subset)[..., None], axis=1)
    assert part.shape == (2, 4, model.args.vocab_size)
    assert np.allclose(np.array(part), expected, atol=1e-5)


def test_freezing_that_never_triggers_changes_nothing(loaded):
    model, _ = loaded
    plain, plain_canvases = run(model, [[2, 10, 11]])
    never, never_canvases = run(model, [[2, 10, 11]], freeze_after=10_000)
    assert [c.tokens for c in never_canvases] == [c.tokens for c in plain_canvases]
    assert all(np.array_equal(np.array(a.tokens), np.array(b.tokens)) for a, b in zip(plain, never))


def test_a_frozen_position_keeps_its_token_and_leaves_the_forward(loaded, monkeypatch):
    """Record each step's frozen mask and open width: frozen tokens never change in later
    drafts, and the forward's width shrinks as positions freeze."""
    generate = importlib.import_module("mlx_diffgemma.generate")  # the package exports a function of that name
    masks, widths = [], []

    class Recording(generate.Freezer):
        def next_index(self):
            masks.append(self.frozen.copy())
            index, rows = super().next_index()
            widths.append(index.shape[1])
            return index, rows

    monkeypatch.setattr(generate, "Freezer", Recording)
    model, _ = loaded
    drafts, _ = run(model, [[2, 10, 11], [2, 30, 31, 32]], max_tokens=16, freeze_after=1, t_max=0.02, t_min=0.01,
                    entropy_bound=2.0)
    tokens = [np.array(d.tokens) for d in drafts]
    assert widths[0] == 16 and min(widths) < 16 and widths == sorted(widths, reverse=True)
    for step, frozen in enumerate(masks[1:], start=1):  # frozen before step ``step``: as in draft ``step - 1``
        for later in tokens[step:]:
            assert np.array_equal(later[frozen], tokens[step - 1][frozen])


def test_freezing_refuses_a_constraint(loaded):
    model, tokenizer = loaded
    from mlx_diffgemma.constrained import Automaton

    automaton = Automaton.from_table(np.array([[0, 0], [-1, -1]], dtype=np.int32),
                                     np.zeros(model.args.vocab_size, dtype=np.int32), 0, [0])
    with pytest.raises(ValueError, match="freeze_after"):
        list(generate_step(model, [[2, 10]], max_tokens=8, settings=resolve_settings(model, freeze_after=2),
                           eos_token_ids=[], noise=SeededNoise(model.args.vocab_size, 0), constraint=automaton))


def test_freeze_after_must_be_a_non_negative_integer(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="freeze_after must be an integer >= 0"):
        resolve_settings(model, freeze_after=-1)


@pytest.mark.skipif(not (sudoku.MODEL_DIR / "model.safetensors").exists(), reason="the built-in Sudoku model is not shipped")
def test_frozen_sudoku_grids_keep_every_given_and_mostly_solve():
    import random

    model = sudoku.load_model()
    n = sudoku.grid_size(model)
    rng = random.Random(5)
    puzzles = [sudoku.generate_puzzle(sudoku.DIFFICULTIES[n]["easy"], rng, n)[0] for _ in range(20)]
    attempts = sudoku.solve(model, puzzles, seed=0, freeze_after=2)
    assert sum(a.solved for a in attempts) >= 14


@pytest.mark.skipif(not (sudoku.MODEL_DIR / "model.safetensors").exists(), reason="the built-in Sudoku model is not shipped")
def test_a_row_of_a_batch_solves_as_it_does_alone_while_others_stop_earlier():
    """Rows stop at different steps and freeze at different rates; each one's grid and step
    count are those it gets alone with its seed (row ``r`` of a batch seeded 0 draws seed ``r``).
    A loose stopping rule stops rows while part of their canvas is still noise."""
    import random

    model = sudoku.load_model()
    n = sudoku.grid_size(model)
    rng = random.Random(9)
    puzzles = [sudoku.generate_puzzle(sudoku.DIFFICULTIES[n][level], rng, n)[0] for level in ("easy", "hard", "medium", "hard")]
    settings = dict(freeze_after=2, confidence_threshold=0.5)
    batch = sudoku.solve(model, puzzles, seed=0, **settings)
    assert len({a.steps for a in batch}) > 1
    for row, puzzle in enumerate(puzzles):
        [alone] = sudoku.solve(model, [puzzle], seed=row, **settings)
        assert (batch[row].grid, batch[row].steps) == (alone.grid, alone.steps)
