"""The sampler's pure functions, on hand-written numbers and against the reference classes."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from mlx_diffgemma.sampler import DiffusionSettings, accept, distribution, is_stable, renoise, sample, temperature


def test_entropy_of_uniform_and_one_hot():
    logits = mx.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert np.allclose(np.array(distribution(logits)[1]), [math.log(4), 0.0], atol=1e-5)


def test_accept_keeps_lowest_entropies_within_the_bound():
    # sorted: 0.01, 0.02, 0.05, 0.3 -> running sum minus max: 0, 0.01, 0.03, 0.08
    h = mx.array([[0.3, 0.01, 0.05, 0.02]])
    assert np.array(accept(h, 0.1)).tolist() == [[True, True, True, True]]
    assert np.array(accept(h, 0.02)).tolist() == [[False, True, False, True]]
    # The lowest-entropy token is always accepted, however tight the bound.
    assert np.array(accept(mx.array([[5.0, 4.0]]), 1e-9)).tolist() == [[False, True]]


def test_accept_matches_reference_sampler():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 32, 50)).astype(np.float32) * 3
    ref = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.7), 32, 50, 10)
    current, proposal = torch.zeros(3, 32, dtype=torch.long), torch.ones(3, 32, dtype=torch.long)
    ref.accept_canvas(current, proposal, torch.tensor(logits), 5)
    ours = accept(distribution(mx.array(logits))[1], 0.7)
    assert np.array_equal(np.array(ours), ref.accepted_token_mask.numpy())


def test_temperature_schedule_matches_reference():
    settings = DiffusionSettings(steps=8, t_min=0.3, t_max=0.9)
    ref = LinearTemperatureScheduleLogitsProcessor(t_min=0.3, t_max=0.9, max_denoising_steps=8)
    scores = torch.ones(1, 1, 2)
    for remaining in range(8, 0, -1):
        assert float(ref(None, scores, remaining)[0, 0, 0]) == pytest.approx(1 / temperature(remaining, settings))
    assert temperature(8, settings) == pytest.approx(0.9)


def test_inverse_cdf_sampling():
    probs = mx.array([[0.1, 0.2, 0.7]])
    picks = [int(sample(probs, mx.array([u]))[0]) for u in (0.05, 0.15, 0.29, 0.31, 0.99, 1.0)]
    assert picks == [0, 1, 1, 2, 2, 2]


def test_inverse_cdf_draws_follow_the_probabilities_when_the_total_falls_short_of_one():
    # A row whose float32 total ends below 1 (as a long cumsum can): the shortfall must not
    # go to the last token id. Here the total is 0.9, so 10% of draws would land on id 3.
    probs = mx.array([0.45, 0.27, 0.18, 0.0])
    n = 200_000
    uniform = mx.random.uniform(shape=(n,), key=mx.random.key(0))
    picks = np.array(sample(mx.broadcast_to(probs, (n, 4)), uniform))
    freq = np.bincount(picks, minlength=4) / n
    assert freq[3] == 0.0
    assert np.allclose(freq, np.array(probs) / 0.9, atol=0.005)


def test_renoise_replaces_only_rejected_positions():
    out = renoise(mx.array([5, 6, 7]), mx.array([True, False, True]), mx.array([1, 2, 3]))
    assert out.tolist() == [5, 2, 7]


def test_stopping_rule_matches_reference_over_a_sequence():
    sequence = [[1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 2, 4], [1, 2, 4], [1, 2, 4]]
    confident_logits = torch.tensor([[[50.0, 0.0]] * 3])  # entropy ~ 0
    for threshold in (0, 1, 2):
        ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.01)
        history = []
        for canvas in sequence:
            theirs = bool(ref(torch.tensor([canvas]), confident_logits)[0])
            ours = bool(is_stable(history, mx.array([canvas]), threshold)[0])
            history = (history + [mx.array([canvas])])[-threshold:] if threshold else []
            assert ours == theirs, (threshold, canvas)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": 2.5}, "steps must be a positive integer"),
        ({"entropy_bound": 0}, "entropy_bound must be a number > 0"),
        ({"t_min": -0.1}, "t_min must be a number >= 0"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_max must be >= t_min"),
        ({"confidence_threshold": float("nan")}, "confidence_threshold must be a number > 0"),
        ({"stability_threshold": -1}, "stability_threshold must be an integer >= 0"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSettings(**kwargs)


def test_settings_read_from_generation_config():
    config = {"max_denoising_steps": 24, "t_min": 0.5, "sampler_config": {"entropy_bound": 0.2, "_cls_name": "x"}}
    assert DiffusionSettings.from_generation_config(config) == {"steps": 24, "t_min": 0.5, "entropy_bound": 0.2}
