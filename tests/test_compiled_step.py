"""The compiled step of the GPU (gathered experts) path, run on the CPU by forcing that path."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import compiled, load
from mlx_diffgemma import model as model_module
from mlx_diffgemma.generate import Canvas, Draft, SeededNoise, generate_step, resolve_settings


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load(hf_checkpoint)[0]


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setattr(model_module, "EXPERT_PATH", "gathered")


def run(model, prompts, seed=0, max_tokens=48, steps=8, **settings):
    """Every draft, and each committed canvas with its rows' forward passes (canvases of 16: three of them)."""
    events = generate_step(model, prompts, max_tokens=max_tokens, settings=resolve_settings(model, steps=steps, **settings),
                           eos_token_ids=[], noise=SeededNoise(model.args.vocab_size, seed))
    drafts, canvases = [], []
    for event in events:
        if isinstance(event, Draft):
            drafts.append(np.array(event.tokens))
        elif isinstance(event, Canvas):
            canvases.append((event.tokens, event.forward_passes))
    return drafts, canvases


def prompt(length, start=0):
    return [2] + [10 + (start + i) % 400 for i in range(length - 1)]


@pytest.mark.parametrize("prompts", [[prompt(5)], [prompt(5), prompt(9, start=50)]], ids=["one row", "left-padded batch"])
def test_the_compiled_gpu_path_step_gives_the_cpu_paths_canvases_token_for_token(model, prompts, monkeypatch):
    cpu_drafts, cpu_canvases = run(model, prompts)
    monkeypatch.setattr(model_module, "EXPERT_PATH", "gathered")
    before = compiled.traces
    gpu_drafts, gpu_canvases = run(model, prompts)
    assert compiled.traces > before  # the compiled step ran
    assert gpu_canvases == cpu_canvases
    assert len(gpu_drafts) == len(cpu_drafts) and all(np.array_equal(a, b) for a, b in zip(gpu_drafts, cpu_drafts))
    assert len(cpu_canvases) == 3 and sum(max(passes) for _, passes in cpu_canvases) > 6


def test_canvases_that_stop_early_with_top_k_self_conditioning_match_the_cpu_path_too(model, monkeypatch):
    """Self-conditioning on logits (top-k), and the stopping rule met before the last step."""
    prompts = [prompt(5), prompt(9, start=50)]
    settings = dict(steps=12, stability_threshold=0, confidence_threshold=6.0, self_conditioning_top_k=8)
    cpu_drafts, cpu_canvases = run(model, prompts, **settings)
    monkeypatch.setattr(model_module, "EXPERT_PATH", "gathered")
    gpu_drafts, gpu_canvases = run(model, prompts, **settings)
    assert gpu_canvases == cpu_canvases
    assert len(gpu_drafts) == len(cpu_drafts) and all(np.array_equal(a, b) for a, b in zip(gpu_drafts, cpu_drafts))
    assert all(1 < max(passes) < 12 for _, passes in cpu_canvases)


def test_one_trace_serves_every_step_every_canvas_and_the_next_request_in_the_same_bucket(model, gpu_path):
    run(model, [prompt(7)], steps=4)  # another test may have traced these shapes already
    before = compiled.traces
    run(model, [prompt(300)], seed=1, steps=8)  # a longer prefix, the same bucket
    run(model, [prompt(20)], seed=2, steps=8)
    assert compiled.traces == before


def test_a_prefix_in_the_next_bucket_traces_once_more_not_per_step(model, gpu_path):
    before = compiled.traces
    _, canvases = run(model, [prompt(compiled.PREFIX_BUCKET + 10)], steps=8)
    # The first step (no self-conditioning yet) and the later steps are one trace each.
    assert compiled.traces - before == 2
    assert sum(max(passes) for _, passes in canvases) > 4


def test_prefix_buckets_grow_by_1024_then_by_an_eighth():
    assert [compiled.prefix_bucket(n) for n in (1, 1024, 1025, 8192, 8193, 20000)] == [1024, 1024, 2048, 8192, 9216, 20480]


def test_fixed_tokens_keep_the_uncompiled_step_on_the_gpu_path(model, gpu_path):
    before = compiled.traces
    events = list(generate_step(model, [prompt(5)], max_tokens=16, settings=resolve_settings(model, steps=4),
                                eos_token_ids=[], noise=SeededNoise(model.args.vocab_size, 0), fixed=[[None, 77]]))
    assert [e for e in events if isinstance(e, Canvas)][0].tokens[0][1] == 77
    assert compiled.traces == before


def test_an_unknown_expert_path_is_refused(model, monkeypatch):
    monkeypatch.setattr(model_module, "EXPERT_PATH", "metal")
    with pytest.raises(ValueError, match="EXPERT_PATH"):
        model.denoise(mx.array([[3, 4]]), model.make_cache())
