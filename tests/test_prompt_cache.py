"""Preallocated KV caches, prompt-cache files, and the server's least-recently-used prompt caches."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.cache import LayerCache
from mlx_diffgemma.command.cli import app
from mlx_diffgemma.generate import prefill
from mlx_diffgemma.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache, system_prefix

FAST = {"steps": 3, "seed": 0}


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


class ConcatenatingLayer(LayerCache):
    """The cache as it was before preallocation: everything concatenated on every call."""

    def __init__(self, window):
        super().__init__(window)
        self.cached = None

    @property
    def length(self) -> int:
        return 0 if self.cached is None else self.cached[0].shape[2]

    def extend(self, keys, values, store):
        if self.cached is not None:
            keys = mx.concatenate([self.cached[0], keys], axis=2)
            values = mx.concatenate([self.cached[1], values], axis=2)
        if store:
            start = 0 if self.window is None else max(0, keys.shape[2] - (self.window - 1))
            self.cached = (keys[:, :, start:], values[:, :, start:])
        return keys, values


def ids(rng, vocab, n):
    return mx.array(rng.integers(1, vocab, size=(1, n)))


@pytest.mark.parametrize("step", [256, 4])
@pytest.mark.parametrize("chunks", [[5], [20], [3, 4, 6], [2, 9, 1, 12, 7]])
def test_preallocated_cache_gives_the_concatenating_caches_keys_and_logits(loaded, monkeypatch, chunks, step):
    """The test model's sliding window is 8: prompts shorter and longer than it, in one or several encodes,
    with buffers grown in big steps or in steps of 4 (growing and compacting often)."""
    model, _ = loaded
    monkeypatch.setattr(LayerCache, "step", step)
    rng = np.random.default_rng(sum(chunks))
    vocab = model.args.vocab_size
    ours, old = model.make_cache(), model.make_cache()
    old.layers = [ConcatenatingLayer(layer.window) for layer in old.layers]
    for n in chunks:
        chunk = ids(rng, vocab, n)
        model.encode(chunk, ours)
        model.encode(chunk, old)
    for layer, reference in zip(ours.layers, old.layers):
        for a, b in zip(layer.state, reference.cached):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    canvas = ids(rng, vocab, model.args.canvas_length)
    np.testing.assert_allclose(np.array(model.denoise(canvas, ours)), np.array(model.denoise(canvas, old)), atol=1e-5)


def test_a_snapshot_does_not_see_later_writes_either_way(loaded, monkeypatch):
    model, _ = loaded
    monkeypatch.setattr(LayerCache, "step", 4)
    rng = np.random.default_rng(1)
    vocab, canvas = model.args.vocab_size, ids(rng, model.args.vocab_size, model.args.canvas_length)
    cache = model.make_cache()
    model.encode(ids(rng, vocab, 6), cache)
    snapshot = cache.copy()
    before = [np.array(a) for layer in snapshot.layers for a in layer.state]
    logits = np.array(model.denoise(canvas, snapshot))
    for n in (1, 3, 9):  # in place, then grown, on the original
        model.encode(ids(rng, vocab, n), cache)
        mx.eval(cache.state())
    for a, b in zip([np.array(a) for layer in snapshot.layers for a in layer.state], before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.array(model.denoise(canvas, snapshot)), logits)
    after = [np.array(a) for layer in cache.layers for a in layer.state]
    model.encode(ids(rng, vocab, 2), snapshot)  # and the snapshot's writes do not reach the original
    mx.eval(snapshot.state())
    for a, b in zip([np.array(a) for layer in cache.layers for a in layer.state], after):
        np.testing.assert_array_equal(a, b)


def test_a_prompt_cache_file_round_trips_and_refuses_another_model(loaded, hf_checkpoint, tmp_path):
    model, _ = loaded
    rng = np.random.default_rng(2)
    prompt = ids(rng, model.args.vocab_size, 21)
    canvas = ids(rng, model.args.vocab_size, model.args.canvas_length)
    cache = model.make_cache()
    prefill(model, prompt, cache, step_size=8)
    expected = np.array(model.denoise(canvas, cache))
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, model, cache, prompt[0].tolist(), system="be brief")
    tokens, restored, system = load_prompt_cache(path, model)
    assert tokens == prompt[0].tolist() and system == "be brief" and restored.offset == 21
    np.testing.assert_array_equal(np.array(model.denoise(canvas, restored)), expected)

    other, _ = load(hf_checkpoint)
    weight = other.model.decoder.embed_tokens.weight
    other.model.decoder.embed_tokens.weight = mx.concatenate([weight[:1] + 1, weight[1:]])
    with pytest.raises(ValueError, match="made for another model"):
        load_prompt_cache(path, other)
    with pytest.raises(ValueError, match="not an mlx-diffgemma prompt-cache file"):
        load_prompt_cache(next(Path(hf_checkpoint).glob("*.safetensors")), model)


def run(model, tokenizer, prompt, cache, **kwargs):
    responses = list(stream_generate(model, tokenizer, prompt, prompt_cache=cache, **{**FAST, "max_tokens": 16, **kwargs}))
    return responses[-1].cached_tokens, [t for r in responses for t in r.tokens]


def test_the_lru_keeps_two_alternating_conversations_cached(loaded):
    model, tokenizer = loaded
    cache = PromptCache()
    more = tokenizer.encode(" and then?", add_special_tokens=False)
    first = {name: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
             for name, text in (("a", "Hello world"), ("b", "Tell me about diffusion models please"))}
    held, second = {}, {}
    for name, prompt in first.items():
        cached, reply = run(model, tokenizer, prompt, cache, max_tokens=32)  # two canvases: the first is encoded
        assert cached == 0
        held[name] = list(cache.tokens)
        second[name] = prompt + reply + more
        assert len(held[name]) >= len(prompt) and second[name][: len(held[name])] == held[name]
    encoded = []
    original = model.encode
    model.encode = lambda ids, c: (encoded.append(ids.shape[1]), original(ids, c))[1]
    try:
        for name in ("a", "b"):
            encoded.clear()
            cached, reply = run(model, tokenizer, second[name], cache)
            assert cached == len(held[name])
            assert encoded[0] == len(second[name]) - len(held[name])
            # What the reused cache gives equals encoding the whole conversation afresh.
            assert reply == run(model, tokenizer, second[name], None)[1]
    finally:
        model.encode = original
    assert len(cache.conversations) == 2


def test_the_byte_bound_drops_the_least_recently_used_conversation(loaded):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(f"Conversation number {i} is here", add_special_tokens=True) for i in range(3)]
    assert len({len(p) for p in prompts}) == 1  # the same length: the same bytes each
    cache = PromptCache(max_bytes=None)
    run(model, tokenizer, prompts[0], cache)
    one = cache.nbytes
    assert one > 0
    cache.max_bytes = 2 * one
    run(model, tokenizer, prompts[1], cache)
    run(model, tokenizer, prompts[2], cache)
    assert [c.tokens for c in cache.conversations] == [prompts[1], prompts[2]] and cache.nbytes <= 2 * one
    more = tokenizer.encode(" more", add_special_tokens=False)
    assert run(model, tokenizer, prompts[1] + more, cache)[0] == len(prompts[1])
    assert run(model, tokenizer, prompts[0] + more, cache)[0] == 0


def test_a_prompt_cache_prefix_starts_every_conversation_that_extends_it(loaded):
    model, tokenizer = loaded
    system = "You are a helpful assistant who answers in one short sentence."
    prefix = system_prefix(tokenizer, system)
    base = model.make_cache()
    prefill(model, mx.array([prefix]), base)
    cache = PromptCache(prefix=(prefix, base))
    for question in ("Hello world", "What is diffusion?"):
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                               add_generation_prompt=True)
        cached, reply = run(model, tokenizer, prompt, cache)
        assert cached == len(prefix) and reply == run(model, tokenizer, prompt, None)[1]
    cache.clear()
    assert cache.prefix is not None


def invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def test_cache_prompt_then_generate_with_the_file_equals_generate_with_the_system_prompt(hf_checkpoint, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text("You are a helpful assistant who answers in one short sentence.")
    out = tmp_path / "system.safetensors"
    made = invoke("cache-prompt", "-m", str(hf_checkpoint), "--prompt-file", str(system), "-o", str(out))
    assert made.exit_code == 0 and out.exists(), made.output
    common = ["generate", "Hello world", "-m", str(hf_checkpoint), "--steps", "3", "--seed", "0", "--max-tokens", "16"]
    with_file = invoke(*common, "--prompt-cache-file", str(out), "--stats")
    plain = invoke(*common, "--system", system.read_text())
    assert with_file.exit_code == 0 and plain.exit_code == 0, with_file.output
    assert with_file.stdout == plain.stdout and "warning" not in with_file.output


def test_a_bad_prompt_cache_file_is_one_error_line(hf_checkpoint, tmp_path):
    weights = str(next(Path(hf_checkpoint).glob("*.safetensors")))
    result = invoke("generate", "Hello", "-m", str(hf_checkpoint), "--prompt-cache-file", weights)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("error: ") and "not an mlx-diffgemma prompt-cache file" in lines[-1]
    result = invoke("cache-prompt", "-m", str(hf_checkpoint), "--prompt-file", weights, "-o", str(tmp_path / "x.bin"))
    assert result.exit_code == 1 and result.output.strip() == f"error: -o must name a .safetensors file, got {tmp_path / 'x.bin'}"
