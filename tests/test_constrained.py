"""Output constrained to a regex or a JSON schema: the dynamic programs against brute force,
and whole replies of a random model that always parse and validate."""

import itertools
import json
import math
import random
import re

import jsonschema
import numpy as np
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.constrained import (Automaton, Guide, automaton_for, check_length, class_scores, forward_backward,
                                       schema_regex)
from mlx_diffgemma.generate import generate, stream_generate
from schemas import random_schema

EOS = 6


class TinyTokenizer:
    """Six ordinary tokens and an EOS: small enough to enumerate every canvas."""

    pieces = ["a", "b", "ab", "ba", "c", "1", "<eos>"]
    eos_token_ids = [EOS]
    all_special_ids = [EOS]

    def get_vocab(self):
        return {p: i for i, p in enumerate(self.pieces)}

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids if i != EOS)


def matches(regex: str, tokens) -> bool:
    """Whether a canvas's text up to EOS matches ``regex`` (Python's ``re``, not the automaton)."""
    text = "".join(TinyTokenizer.pieces[t] for t in itertools.takewhile(lambda t: t != EOS, tokens))
    return re.fullmatch(regex, text) is not None


def accepted(automaton: Automaton, tokens) -> bool:
    """Whether the automaton accepts a canvas that must finish the language (EOS, or the end)."""
    state = automaton.start
    for t in tokens:
        state = int(automaton.next[state, automaton.token_class[t]])
        if state < 0:
            return False
    return automaton.distance[state] == 0


def accepted_canvases(automaton: Automaton, regex: str, n: int) -> list[tuple]:
    """Every canvas of ``n`` tokens the automaton accepts; each must match the regex too.

    outlines-core 0.2.14 leaves some transitions out of its index (for ``(ab)+`` over the
    tokens ``a`` and ``b`` only ``ab`` is reachable), so its language can be smaller than
    the regex's: never larger, which is what validity needs.
    """
    canvases = [c for c in itertools.product(range(7), repeat=n) if accepted(automaton, c)]
    assert canvases and all(matches(regex, c) for c in canvases)
    return canvases


def distributions(rng, n, vocab=7):
    logits = rng.normal(size=(n, vocab)).astype(np.float32) * 2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


REGEXES = ["(ab|c)+b?", "a*1(ba)?", "c|b{2,3}"]


@pytest.mark.parametrize("regex", REGEXES)
@pytest.mark.parametrize("seed", range(3))
def test_the_argmax_canvas_is_the_most_probable_accepted_one_by_brute_force(regex, seed):
    automaton = automaton_for(TinyTokenizer(), regex=regex)
    logits, _ = distributions(np.random.default_rng(seed), 5)
    best = max(accepted_canvases(automaton, regex, 5), key=lambda c: sum(logits[i, t] for i, t in enumerate(c)))
    chosen = Guide(automaton, automaton.start, 5, 0).argmax(logits)
    assert tuple(chosen) == best


@pytest.mark.parametrize("regex", REGEXES)
def test_samples_follow_the_distribution_conditioned_on_acceptance(regex):
    rng = np.random.default_rng(1)
    automaton = automaton_for(TinyTokenizer(), regex=regex)
    logits, probs = distributions(rng, 4)
    canvases = accepted_canvases(automaton, regex, 4)
    weight = np.array([math.prod(probs[i, t] for i, t in enumerate(c)) for c in canvases])
    exact = dict(zip(canvases, weight / weight.sum()))
    guide, draws = Guide(automaton, automaton.start, 4, 0), 6000
    counts: dict = {}
    for _ in range(draws):
        sampled, _, _ = guide.step(logits, probs, rng.random(4), rng.random())
        counts[tuple(sampled)] = counts.get(tuple(sampled), 0) + 1
    assert set(counts) <= set(exact)

    def total_variation(counted: dict) -> float:
        return 0.5 * sum(abs(counted.get(c, 0) / draws - p) for c, p in exact.items())

    picks = rng.choice(len(canvases), size=draws, p=np.array(list(exact.values())))
    direct = {canvases[i]: n for i, n in zip(*np.unique(picks, return_counts=True))}
    assert total_variation(counts) < 1.5 * total_variation(direct) + 0.01  # as close as exact draws get
    for position in range(4):
        seen = np.bincount([c[position] for c, n in counts.items() for _ in range(n)], minlength=7) / draws
        want = np.bincount([c[position] for c in canvases], weights=list(exact.values()), minlength=7)
        np.testing.assert_allclose(seen, want, atol=0.03)


def test_entropies_are_those_of_the_conditioned_marginals():
    regex = "(ab|c)+b?"
    rng = np.random.default_rng(2)
    automaton = automaton_for(TinyTokenizer(), regex=regex)
    logits, probs = distributions(rng, 4)
    canvases = accepted_canvases(automaton, regex, 4)
    weight = np.array([math.prod(float(probs[i, t]) for i, t in enumerate(c)) for c in canvases])
    marginal = np.zeros((4, 7))
    for c, w in zip(canvases, weight / weight.sum()):
        marginal[np.arange(4), c] += w
    exact = -(np.where(marginal > 0, marginal * np.log(np.where(marginal > 0, marginal, 1)), 0)).sum(axis=1)
    _, _, entropy = Guide(automaton, automaton.start, 4, 0).step(logits, probs, rng.random(4), 0.5)
    np.testing.assert_allclose(entropy, exact, atol=1e-5)
    best, mass, _, _ = class_scores(automaton, logits, probs)
    _, marginal = forward_backward(automaton, mass, automaton.start, automaton.distance <= 0)
    np.testing.assert_allclose(marginal.sum(axis=1), 1.0)


def test_a_canvas_that_is_not_the_last_ends_where_the_language_can_still_be_completed():
    automaton = automaton_for(TinyTokenizer(), regex="a{6}")
    logits, _ = distributions(np.random.default_rng(0), 3)
    logits[:, 0] = -50.0  # the model wants anything but "a"
    chosen = Guide(automaton, automaton.start, 3, 3).argmax(logits)
    assert list(chosen) == [0, 0, 0]  # three more "a" fit after it; "ab" or "ba" would not
    state = automaton.advance(automaton.start, chosen.tolist())
    assert automaton.distance[state] == 3


@pytest.mark.parametrize("regex", REGEXES + ["[ab]+"])
def test_tokens_share_a_class_exactly_when_their_transitions_agree_in_every_state(regex):
    from outlines_core import Index, Vocabulary

    from mlx_diffgemma.constrained import token_bytes

    transitions = Index(regex, Vocabulary(EOS, token_bytes(TinyTokenizer()))).get_transitions()
    moves = {t: tuple(transitions[s].get(t) for s in sorted(transitions)) for t in range(6)}
    classes = automaton_for(TinyTokenizer(), regex=regex).token_class
    for t, u in itertools.combinations(range(6), 2):
        assert (classes[t] == classes[u]) == (moves[t] == moves[u]), (t, u)
    assert classes[EOS] not in classes[:6]


@pytest.mark.parametrize("bad,message", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "invalid JSON schema"),
    ({"type": "string", "format": "hostname"}, "unsupported JSON schema: Format hostname"),
    ("{not json", "not valid JSON"),
    (["a"], "must be an object"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
     "'minimum' (at #/properties/n) cannot be enforced"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems' (at #) cannot be enforced"),
])
def test_bad_schemas_are_one_line_errors_naming_the_problem(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        schema_regex(bad)
    assert "\n" not in str(error.value)


def test_a_property_named_like_a_keyword_is_not_taken_for_one():
    schema_regex({"type": "object", "properties": {"minimum": {"type": "integer"}}, "required": ["minimum"]})


def test_a_regex_the_library_cannot_compile_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot compile the regex"):
        automaton_for(TinyTokenizer(), regex="(a")


def test_a_constraint_whose_shortest_output_exceeds_max_tokens_is_refused():
    automaton = automaton_for(TinyTokenizer(), regex="1{5}")
    check_length(automaton, 5)
    with pytest.raises(ValueError, match="shortest output the constraint allows is 5 tokens, more than max_tokens \\(4\\)"):
        check_length(automaton, 4)


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


def test_random_schemas_give_replies_that_parse_and_validate(loaded):
    """A random model is the most adversarial writer there is; 200 schemas run in benchmarks/constrained.py."""
    model, tokenizer = loaded
    rng = random.Random(0)
    for i in range(12):
        schema = random_schema(rng)
        text = generate(model, tokenizer, "Write JSON.", max_tokens=96, json_schema=schema, seed=i, steps=3)
        jsonschema.validate(json.loads(text), schema)


def test_a_reply_cut_by_max_tokens_is_still_accepted_and_spans_canvases(loaded):
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, "Digits", max_tokens=40, regex="[0-9]{3}(-[0-9]+)*", seed=3,
                                     steps=3))
    text = "".join(r.text for r in responses)
    assert len(responses[-1].steps_per_canvas) >= 2 or responses[-1].finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}(-[0-9]+)*", text), text


def test_json_object_mode_gives_an_object(loaded):
    model, tokenizer = loaded
    text = generate(model, tokenizer, "JSON please", max_tokens=64, json_schema="json_object", seed=0, steps=3)
    assert isinstance(json.loads(text), dict)


def test_fixed_tokens_and_a_constraint_are_refused_together(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="cannot be combined"):
        generate(model, tokenizer, "x", max_tokens=16, regex="a+", fixed=[50], steps=2)
