"""Infilling: a canvas clamped around the middle, its length chosen by likelihood."""

import pytest

from mlx_diffgemma import load
from mlx_diffgemma.infill import candidate_lengths, infill, infill_tokens


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


def test_candidate_lengths_fit_the_room_left_by_the_suffix():
    assert candidate_lengths(12, None) == [4, 8, 12]
    assert candidate_lengths(12, [3, 5, 30]) == [3, 5]
    with pytest.raises(ValueError, match="no infill length fits"):
        candidate_lengths(2, [3, 4])
    with pytest.raises(ValueError, match="positive integers"):
        candidate_lengths(8, [0, 2])


def test_the_middle_is_one_of_the_candidates_and_the_likeliest(loaded):
    model, tokenizer = loaded
    result = infill_tokens(model, [2, 10, 11, 12], [40, 41, 42], end=[1], pad=0, lengths=[2, 5, 9], seed=0, steps=4)
    assert result.length in (2, 5, 9) and len(result.tokens) == result.length
    assert set(result.scores) == {2, 5, 9} and result.scores[result.length] == min(result.scores.values())


def test_infill_text_and_clear_errors(loaded):
    model, tokenizer = loaded
    result = infill(model, tokenizer, "def add(a, b):\n", "\n    return a + b\n", seed=1, steps=3, lengths=[3, 6])
    assert result.text == tokenizer.decode(result.tokens) and result.length in (3, 6)
    with pytest.raises(ValueError, match="suffix is too long"):
        infill(model, tokenizer, "x", "The quick brown fox jumps over the lazy dog. " * 3)
    with pytest.raises(ValueError, match="needs a suffix"):
        infill(model, tokenizer, "x", "")
