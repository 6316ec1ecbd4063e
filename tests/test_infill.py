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


def test_input_is_checked_at_the_call_and_the_suffix_stays_intact_in_every_candidate(loaded):
    from mlx_diffgemma.infill import stream_infill

    model, tokenizer = loaded
    prefix, suffix = "def add(a, b):\n    ", "return a + b"  # a 6-token suffix leaves 9 of 16 canvas positions
    with pytest.raises(ValueError, match="suffix is too long"):
        stream_infill(model, tokenizer, prefix, "x" * 40)  # raised before the generator is advanced
    with pytest.raises(ValueError, match="needs a prefix"):
        stream_infill(model, tokenizer, "", suffix)
    steps, drafts = stream_infill(model, tokenizer, prefix, suffix, seed=2, steps=3, max_tokens=5), []
    while True:
        try:
            drafts.append(next(steps))
        except StopIteration as done:
            result = done.value
            break
    assert [d.step for d in drafts] == list(range(1, result.steps + 1))
    suffix_ids = list(tokenizer.encode(suffix, add_special_tokens=False))
    assert max(result.scores) == 5 and result.length <= 5  # max_tokens bounds the candidates
    canvas = drafts[-1].tokens.tolist()
    for row, n in zip(canvas, sorted(result.scores)):
        assert row[n : n + len(suffix_ids)] == suffix_ids
    assert tokenizer.decode(list(tokenizer.encode(prefix)) + result.tokens + suffix_ids).endswith(suffix)
