"""Canvases with tokens fixed in place: never renoised, outside the entropy budget."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load, sudoku
from mlx_diffgemma.generate import Canvas, Draft, SeededNoise, denoise_canvas, generate_step, prefill, resolve_settings


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


def run(model, fixed, seed=0, max_tokens=40, **settings):
    events = list(generate_step(model, [[2, 10, 11, 12]], max_tokens=max_tokens,
                                settings=resolve_settings(model, steps=6, **settings), eos_token_ids=[],
                                noise=SeededNoise(model.args.vocab_size, seed), fixed=fixed))
    return [e for e in events if isinstance(e, Draft)], [e for e in events if isinstance(e, Canvas)]


@pytest.mark.parametrize("mode", ["one_hot", "model"])
def test_fixed_tokens_hold_in_every_draft_and_across_canvases(loaded, mode):
    model, _ = loaded
    fixed = [None] * 40
    for position, token in ((0, 50), (7, 51), (15, 52), (16, 53), (33, 54)):  # canvases of 16
        fixed[position] = token
    drafts, canvases = run(model, [fixed], fixed_self_conditioning=mode)
    committed = [t for c in canvases for t in c.tokens[0]]
    assert [committed[p] for p in (0, 7, 15, 16, 33)] == [50, 51, 52, 53, 54]
    first_canvas = [d for d in drafts if d.tokens.shape[1] == 16][:3]
    assert all(d.tokens[0, 7].item() == 51 for d in first_canvas)


def test_fixed_positions_take_nothing_from_the_entropy_budget_or_the_stopping_rule(loaded):
    """A canvas with all but two positions fixed settles in fewer steps than a free one,
    and tokens per forward counts only the free positions."""
    model, _ = loaded
    fixed = [[60 + i for i in range(16)]]
    fixed[0][3] = fixed[0][9] = None
    _, free_run = run(model, None, max_tokens=16, t_max=0.01, t_min=0.01, confidence_threshold=0.5)
    _, clamped_run = run(model, fixed, max_tokens=16, t_max=0.01, t_min=0.01, confidence_threshold=0.5)
    assert clamped_run[0].steps <= free_run[0].steps
    assert clamped_run[0].valid_tokens[0] == 2


def test_denoising_with_nothing_free_leaves_the_canvas_as_given(loaded):
    model, _ = loaded
    cache = model.make_cache()
    prefill(model, mx.array([[2, 10, 11]]), cache)
    fixed = mx.array([list(range(70, 86))], dtype=mx.int32)
    settings = resolve_settings(model, steps=3)
    steps = denoise_canvas(model, cache, 0, 1, settings, SeededNoise(model.args.vocab_size, 1), fixed)
    try:
        while True:
            assert np.array_equal(np.array(next(steps).tokens), np.array(fixed))
    except StopIteration as done:
        argmax, _ = done.value
    assert np.array_equal(np.array(argmax), np.array(fixed))


@pytest.mark.skipif(not (sudoku.MODEL_DIR / "config.json").is_file(), reason="the built-in Sudoku model is not shipped")
def test_clamped_sudoku_keeps_every_given():
    model = sudoku.load_model()
    n = sudoku.grid_size(model)
    import random

    puzzles = [sudoku.generate_puzzle(sudoku.DIFFICULTIES[n]["hard"], random.Random(i), n)[0] for i in range(8)]
    for attempt in sudoku.solve(model, puzzles, seed=0, clamp=True):
        assert all(g == d for g, d in zip(attempt.grid, attempt.puzzle) if d)
