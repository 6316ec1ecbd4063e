"""The CPU path's vocabulary-sized math in numpy (host.py) against the MLX ops it stands in for."""

import platform
import resource
from contextlib import nullcontext
from itertools import islice

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_diffgemma import host, load, sudoku
from mlx_diffgemma.generate import Draft, SeededNoise, generate, generate_step, resolve_settings
from mlx_diffgemma import model
from mlx_diffgemma.model import softcap
from mlx_diffgemma.sampler import distribution, sample


def logits_like_a_model(shape, seed=0):
    """Logits with a model's spread: a few tokens well above a broad floor."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, size=shape).astype(np.float32)
    x[..., : shape[-1] // 50] += 12 * rng.random(shape[:-1] + (shape[-1] // 50,), dtype=np.float32)
    return x


def test_softcap_in_place_equals_mlx_softcap():
    x = logits_like_a_model((2, 16, 4096)) * 5
    expected = np.array(softcap(mx.array(x), 30.0))
    owned = mx.array(x)
    out = host.softcap_(owned, 30.0)
    assert out is owned  # written in its own buffer
    assert np.allclose(np.array(out), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("temperature", [0.8, 0.45])
def test_sampler_step_equals_the_samplers_distribution_and_samples(temperature):
    x = logits_like_a_model((2, 64, 8192), seed=1)
    uniform = mx.array(np.random.default_rng(2).random((2, 64), dtype=np.float32))
    scaled = mx.array(x) / temperature
    probs, entropy = distribution(scaled)
    samples = sample(probs, uniform)
    got = host.sampler_step(mx.array(x), temperature, uniform)
    assert got is not None
    argmax, host_probs, host_entropy, host_samples = got
    assert np.array_equal(np.array(argmax), np.array(scaled.argmax(axis=-1)))
    assert np.allclose(np.array(host_probs), np.array(probs), rtol=1e-4, atol=1e-7)
    # float32 sums over the vocabulary: MLX's entropy is off the float64 one by about 3e-4 here, the host's by 1e-4
    exact = np.exp(x.astype(np.float64) / temperature - (x.max(axis=-1, keepdims=True) / temperature))
    exact /= exact.sum(axis=-1, keepdims=True)
    exact_entropy = -(exact * np.log(np.maximum(exact, 1e-300))).sum(axis=-1)
    assert np.abs(np.array(host_entropy) - exact_entropy).max() < 2e-4
    assert np.allclose(np.array(host_entropy), np.array(entropy), atol=1e-3)
    assert np.mean(np.array(host_samples) == np.array(samples)) >= 0.99  # a draw on a CDF boundary may differ
    assert np.array(entropy).max() > 0.5  # the test ran on spread-out distributions, not one-hot ones


def test_sampler_step_can_leave_the_scaled_logits_for_self_conditioning():
    x = logits_like_a_model((1, 8, 1024), seed=3)
    uniform = mx.array(np.random.default_rng(4).random((1, 8), dtype=np.float32))
    keep = host.sampler_step(mx.array(x), 0.5, uniform)
    scaled = host.sampler_step(mx.array(x), 0.5, uniform, keep_probs=False)
    assert np.allclose(np.array(scaled[1]), x / 0.5)
    for a, b in zip(keep[2:], scaled[2:]):  # the same entropies and samples either way
        assert np.array_equal(np.array(a), np.array(b))


def test_the_hosts_draws_are_the_samplers_draws_on_its_probabilities_plateaus_and_ends_included():
    x = logits_like_a_model((1, 64, 4096), seed=7)
    x[:, ::2, 1000:3000] = -1e4  # probabilities that are exactly zero: flat stretches of the CDF
    rng = np.random.default_rng(8)
    u = rng.random((1, 64), dtype=np.float32)
    u[0, :4] = [0.0, 1.0, np.nextafter(np.float32(1), np.float32(0)), 0.5]
    argmax, probs, entropy, samples = host.sampler_step(mx.array(x), 0.8, mx.array(u))
    assert np.array_equal(np.array(samples), np.array(sample(probs, mx.array(u))))


def test_softmax_equals_mlx_softmax_and_leaves_its_input():
    x = logits_like_a_model((2, 8, 2048), seed=5)
    logits = mx.array(x)
    probs = host.softmax(logits)
    assert np.allclose(np.array(probs), np.array(mx.softmax(mx.array(x), axis=-1)), rtol=1e-5, atol=1e-8)
    assert np.array_equal(np.array(logits), x)


def test_tempered_softmax_leaves_the_scaled_logits_and_writes_their_softmax_in_place():
    x = logits_like_a_model((2, 8, 2048), seed=6)
    expected = np.array(mx.softmax(mx.array(x) / 0.7, axis=-1))
    logits = mx.array(x)
    scaled = host.tempered_softmax(logits, 0.7)
    assert np.allclose(scaled, x / 0.7)
    assert np.allclose(np.array(logits), expected, rtol=1e-5, atol=1e-8)


def test_an_array_that_is_not_one_buffer_is_left_to_mlx():
    strided = mx.array(logits_like_a_model((8, 256)))[:, ::2]
    assert host.buffer_view(strided) is None
    assert host.softcap_(strided, 30.0) is None
    assert host.buffer_view(mx.zeros((4, 8), dtype=mx.bfloat16)) is None


def test_every_row_is_computed_whatever_the_split():
    x = logits_like_a_model((1, 3, 512))
    got = host.sampler_step(mx.array(x), 1.0, mx.array([[0.1, 0.5, 0.9]]))
    expected = distribution(mx.array(x))[1]
    assert np.allclose(np.array(got[2]), np.array(expected), atol=1e-4)


def drafts(model, on_host: bool = True) -> list[list[list[int]]]:
    """The drafts of a short generation; with ``on_host`` false, inside ``host.disabled()``: MLX's ops."""
    with nullcontext() if on_host else host.disabled():
        events = generate_step(model, [[2, 10, 11, 12], [2, 13, 14, 15]], max_tokens=48,
                               settings=resolve_settings(model, steps=8, canvas_length=16), eos_token_ids=[],
                               noise=SeededNoise(model.args.vocab_size, 0))
        return [e.tokens.tolist() for e in events if isinstance(e, Draft)]


def test_generation_on_the_host_gives_the_mlx_ops_tokens(hf_checkpoint):
    model, _ = load(hf_checkpoint)
    assert drafts(model) == drafts(model, on_host=False)


def test_constrained_generation_on_the_host_gives_the_mlx_ops_tokens(hf_checkpoint, monkeypatch):
    """A guided step reads the scaled logits and their softmax from the host, without the free
    sampler's passes where every position is guided (two canvases of 16 here, then one of 8)."""
    model, tokenizer = load(hf_checkpoint)
    calls, tempered = [], host.tempered_softmax
    monkeypatch.setattr(host, "tempered_softmax", lambda *a: calls.append(1) or tempered(*a))

    def reply(on_host: bool) -> str:
        with nullcontext() if on_host else host.disabled():
            return generate(model, tokenizer, "Write JSON.", max_tokens=40, steps=6, seed=3,
                            json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})

    assert reply(True) == reply(False)
    assert calls


def test_bfloat16_generation_keeps_the_scaled_logits_on_the_host_and_its_first_step_agrees(hf_checkpoint, monkeypatch):
    """Later steps drift apart on a random model, whose flat logits turn float32 rounding
    differences into different bfloat16 inputs (the step itself agrees to 1e-6: the tests above)."""
    model, _ = load(hf_checkpoint)
    model.set_dtype(mx.bfloat16)
    kept, step = [], host.sampler_step

    def spy(*args, **kwargs):
        kept.append(kwargs["keep_probs"])
        return step(*args, **kwargs)

    monkeypatch.setattr(host, "sampler_step", spy)
    on_host = drafts(model)
    assert kept and not any(kept)  # self-conditioning reads the scaled logits, as the MLX path gives it
    off = drafts(model, on_host=False)
    assert len(on_host) == len(off) and on_host[0] == off[0]


@pytest.mark.slow
def test_the_sudoku_model_solves_the_same_puzzles_on_the_host():
    model = sudoku.load_model()
    puzzles = [puzzle for puzzle, _ in islice(sudoku.puzzles(sudoku.DIFFICULTIES[6]["hard"], seed=5, n=6), 12)]
    on_host = [a.grid for a in sudoku.solve(model, puzzles, seed=0, steps=12)]  # 12 steps a canvas: a short test
    with host.disabled():
        off = [a.grid for a in sudoku.solve(model, puzzles, seed=0, steps=12)]
    assert sum(a == b for a, b in zip(on_host, off)) >= 11


@pytest.mark.parametrize("masked", [False, True])
def test_attention_on_the_host_equals_mlx_attention(masked, monkeypatch):
    calls, softmax = [], host.softmax
    monkeypatch.setattr(host, "softmax", lambda *args, **kwargs: calls.append(kwargs) or softmax(*args, **kwargs))
    rng = np.random.default_rng(6)
    q, k, v = (mx.array(rng.normal(size=shape).astype(np.float32)) for shape in
               [(2, 8, 5, 16), (2, 2, 12, 16), (2, 2, 12, 16)])  # four query heads per key head
    mask = None
    if masked:  # causal over the last 5 keys, as the encoder's, with a different first row per batch row
        mask = mx.array(np.arange(12)[None, :] <= np.arange(7, 12)[:, None])[None, None]
        mask = mx.concatenate([mask, mask & mx.array(np.arange(12) > 0)], axis=0)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    assert np.allclose(np.array(model.attention(q, k, v, mask)), np.array(expected), atol=1e-5)
    assert calls == [{"in_place": True}]  # the scores' softmax ran on the host, in their buffer


def test_gated_gelu_equals_mlx_for_fused_and_separate_projections():
    rng = np.random.default_rng(7)
    gate_up = mx.array(rng.normal(0, 3, size=(6, 5, 64)).astype(np.float32))
    gate, up = mx.split(gate_up, 2, axis=-1)
    expected = np.array(nn.gelu_approx(gate) * up)
    assert np.allclose(np.array(host.gated_gelu(gate_up)), expected, atol=1e-5)
    separate = host.gated_gelu(mx.array(np.array(gate)), mx.array(np.array(up)))
    assert separate.shape == (6, 5, 32)
    assert np.allclose(np.array(separate), expected, atol=1e-5)
    assert host.gated_gelu(gate_up.astype(mx.bfloat16)) is None  # left to MLX


def test_gradients_flow_through_the_mlx_ops_when_the_host_is_disabled():
    """Training differentiates the model: a numpy result would carry no gradient."""
    x = mx.array(logits_like_a_model((2, 4, 64)))

    def loss(x):
        return model.gated_gelu(x).sum()

    assert not mx.any(mx.grad(loss)(x)).item()  # the host's result is a constant: no gradient at all
    with host.disabled():
        grad = mx.grad(loss)(x)
        assert host.softcap_(mx.array(logits_like_a_model((1, 8))), 30.0) is None
    assert mx.all(mx.isfinite(grad)).item() and mx.any(grad != 0).item()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_logits_sized_buffers_are_reused_without_page_faults():
    # A canvas's logits (256 x 32,768 float32, 32 MiB): glibc maps such a block afresh each time
    # (8,192 page faults) unless freed memory is kept.
    assert host.keep_freed_memory()

    def faults_of_a_new_buffer() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mx.eval(mx.full((256, 32768), 1.0))
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_new_buffer()
    assert faults_of_a_new_buffer() < 1000
