"""The Python generation API: stopping rules, streaming, seeds, batches, bad input."""

import re
from pathlib import Path

import pytest

from mlx_diffgemma import batch_generate, generate, load, stream_generate

FAST = dict(steps=4)  # a short schedule keeps these tests quick; the loop is the same
PROMPT = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


def run(loaded, prompt=PROMPT, max_tokens=40, **kwargs):
    model, tokenizer = loaded
    return list(stream_generate(model, tokenizer, prompt, max_tokens, **{**FAST, **kwargs}))


def test_same_seed_same_text_and_different_seed_different_text(loaded):
    model, tokenizer = loaded
    a = generate(model, tokenizer, PROMPT, 40, seed=1, **FAST)
    b = generate(model, tokenizer, PROMPT, 40, seed=1, **FAST)
    c = generate(model, tokenizer, PROMPT, 40, seed=2, **FAST)
    assert a == b and a != c


def test_stream_and_generate_give_the_same_text(loaded):
    model, tokenizer = loaded
    streamed = "".join(r.text for r in run(loaded, seed=3))
    assert streamed == generate(model, tokenizer, PROMPT, 40, seed=3, **FAST)


def test_max_tokens_shorter_than_a_canvas(loaded):
    model, tokenizer = loaded
    tokenizer.eos_token_ids = []  # no EOS: only the length rule can stop it
    try:
        last = run(loaded, max_tokens=5, seed=4)[-1]
    finally:
        tokenizer.eos_token_ids = [1, 106]
    assert last.generation_tokens == 5 and last.finish_reason == "length"
    assert len(last.steps_per_canvas) == 1


def test_length_is_counted_across_canvases(loaded):
    model, tokenizer = loaded
    tokenizer.eos_token_ids = []
    try:
        responses = run(loaded, max_tokens=40, seed=5)
    finally:
        tokenizer.eos_token_ids = [1, 106]
    last = responses[-1]
    assert last.generation_tokens == 40 and last.finish_reason == "length"
    assert len(last.steps_per_canvas) == 3  # canvases of 16
    assert all(1 <= s <= FAST["steps"] for s in last.steps_per_canvas)


def test_eos_stops_and_is_dropped(loaded):
    model, tokenizer = loaded
    free = _tokens(loaded, seed=6, eos=[])
    eos = next(t for t in free[20:] if t not in free[:20])
    cut = free.index(eos)
    assert _tokens(loaded, seed=6, eos=[eos]) == free[:cut]
    tokenizer.eos_token_ids = [eos]
    try:
        responses = run(loaded, seed=6)
    finally:
        tokenizer.eos_token_ids = [1, 106]
    assert "".join(r.raw for r in responses) == tokenizer.decode(free[:cut])
    assert responses[-1].finish_reason == "stop" and responses[-1].generation_tokens == cut


def _tokens(loaded, seed, eos):
    from mlx_diffgemma.generate import Canvas, SeededNoise, generate_step, resolve_settings, prepare_prompt

    model, tokenizer = loaded
    out = []
    for event in generate_step(model, [prepare_prompt(tokenizer, PROMPT)], max_tokens=40,
                               settings=resolve_settings(model, **FAST), eos_token_ids=eos,
                               noise=SeededNoise(model.args.vocab_size, seed)):
        if isinstance(event, Canvas):
            out += event.tokens[0]
    return out


def test_stop_string_cuts_the_text(loaded):
    model, tokenizer = loaded
    full = "".join(r.raw for r in run(loaded, seed=7))
    words = [w for w in re.findall(r"\S{2,}", full) if full.count(w) == 1 and full.index(w) > 5]
    stop = words[0]
    responses = run(loaded, seed=7, stop=[stop])
    text = "".join(r.raw for r in responses)
    assert text == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"


def test_draft_updates_show_each_denoising_step(loaded):
    responses = run(loaded, max_tokens=16, seed=8, draft=True)
    drafts = [r for r in responses if r.draft is not None]
    assert drafts and all(r.text == "" for r in drafts)
    assert [r.step for r in drafts] == list(range(1, len(drafts) + 1))
    assert len(drafts) == responses[-1].steps_per_canvas[0]


def test_statistics(loaded):
    model, tokenizer = loaded
    last = run(loaded, seed=9)[-1]
    prompt_ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert last.prompt_tokens == len(prompt_ids)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert 0 < last.tokens_per_forward <= 16


def test_prompt_as_text_ids_or_messages(loaded):
    model, tokenizer = loaded
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    from_messages = generate(model, tokenizer, PROMPT, 16, seed=10, **FAST)
    assert generate(model, tokenizer, ids, 16, seed=10, **FAST) == from_messages
    assert isinstance(generate(model, tokenizer, "Hello world", 16, seed=10, **FAST), str)


def test_batch_rows_match_each_prompt_alone_with_seed_plus_row(loaded):
    model, tokenizer = loaded
    prompts = [PROMPT, "The quick brown fox jumps over the lazy dog. Hello world, how are you today?"]
    batched = batch_generate(model, tokenizer, prompts, 40, seed=11, **FAST)
    alone = [generate(model, tokenizer, p, 40, seed=11 + row, **FAST) for row, p in enumerate(prompts)]
    assert batched == alone


def test_identical_prompts_in_one_batch_draw_their_own_samples(loaded):
    model, tokenizer = loaded
    rows = batch_generate(model, tokenizer, [PROMPT] * 3, 32, seed=5, **FAST)
    assert len(set(rows)) == 3
    assert rows[2] == generate(model, tokenizer, PROMPT, 32, seed=7, **FAST)


def test_batch_stream_tags_each_response_with_its_row(loaded):
    from mlx_diffgemma.generate import stream_batch_generate

    model, tokenizer = loaded
    responses = list(stream_batch_generate(model, tokenizer, [PROMPT, "Hello"], 32, seed=3, draft=True, **FAST))
    assert {r.index for r in responses} == {0, 1}
    for row in (0, 1):
        final = [r for r in responses if r.index == row and r.draft is None]
        assert final[-1].finish_reason in ("stop", "length")
        assert final[-1].generation_tokens == sum(len(r.tokens) for r in final)


def first_occurrence(text: str, lo: int, hi: int, past: int = 0) -> tuple[int, str] | None:
    """A short piece of ``text`` starting in ``[lo, hi)`` and ending after ``past`` that occurs
    there first (no broken characters)."""
    for start in range(max(lo, 0), hi):
        for length in range(max(3, past - start + 1), 12):
            piece = text[start : start + length]
            if len(piece) == length and "\ufffd" not in piece and text.find(piece) == start:
                return start, piece
    return None


def reply_and_stop(loaded, where: str, max_tokens=48):
    """A seed's reply without EOS (text and ids) and a stop string placed ``where``; canvases of 16."""
    model, tokenizer = loaded
    tokenizer.eos_token_ids = []
    try:
        for seed in range(20, 40):
            tokens = [t for r in run(loaded, max_tokens=max_tokens, seed=seed) for t in r.tokens]
            text, boundary = tokenizer.decode(tokens), len(tokenizer.decode(tokens[:16]))
            if where == "inside a canvas":
                found = first_occurrence(text, len(tokenizer.decode(tokens[:4])), boundary - 12)
            else:  # starts in the first canvas's text, ends in the second's
                found = first_occurrence(text, boundary - 4, boundary, past=boundary)
            if found:
                return seed, text, tokens, *found
    finally:
        tokenizer.eos_token_ids = [1, 106]
    raise AssertionError(f"no seed gave a stop string {where}")


def stopped_run(loaded, seed, stop, **kwargs):
    model, tokenizer = loaded
    tokenizer.eos_token_ids = []
    try:
        return run(loaded, max_tokens=48, seed=seed, stop=[stop], **kwargs)
    finally:
        tokenizer.eos_token_ids = [1, 106]


@pytest.mark.parametrize("where", ["inside a canvas", "across two canvases"])
def test_a_stop_string_ends_text_tokens_and_counts_at_the_same_place(loaded, where):
    model, tokenizer = loaded
    seed, text, tokens, at, stop = reply_and_stop(loaded, where)
    responses = stopped_run(loaded, seed, stop)
    kept = [t for r in responses for t in r.tokens]
    reply = "".join(r.raw for r in responses)
    assert responses[-1].finish_reason == "stop" and responses[-1].stop_string == stop
    assert reply == tokenizer.decode(kept) and stop not in reply
    assert text.startswith(reply) and len(reply) <= at
    assert kept == tokens[: len(kept)]
    assert responses[-1].generation_tokens == len(kept)
    # Nothing before the stop string is lost beyond the token it shares a piece with.
    assert len(tokenizer.decode(tokens[: len(kept) + 1])) > at


def test_prompt_cache_after_a_stop_string_holds_only_the_kept_reply(loaded):
    from mlx_diffgemma.generate import PromptCache

    model, tokenizer = loaded
    seed, _, _, _, stop = reply_and_stop(loaded, "across two canvases")  # found once canvas 1 is committed
    cache = PromptCache()
    responses = stopped_run(loaded, seed, stop, prompt_cache=cache)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    kept = [t for r in responses for t in r.tokens]
    assert cache.tokens == (ids + kept)[: len(cache.tokens)]
    assert cache.cache is None or cache.cache.offset == len(cache.tokens)


def test_checkpoint_generation_config_sets_defaults(loaded):
    model, tokenizer = loaded
    model.generation_defaults = {"steps": 2}
    try:
        last = run(loaded, seed=12, steps=None)[-1]
    finally:
        model.generation_defaults = {}
    assert max(last.steps_per_canvas) <= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be a positive integer"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(t_min=0.9, t_max=0.5), "t_max must be >= t_min"),
        (dict(entropy_bound=-1.0), "entropy_bound must be a number > 0"),
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt=[5, 100000]), "outside the vocabulary"),
        (dict(self_conditioning_top_k=-1), "self_conditioning_top_k must be an integer >= 0"),
    ],
)
def test_bad_input_is_a_clear_value_error(loaded, kwargs, message):
    model, tokenizer = loaded
    kwargs = {"prompt": PROMPT, "max_tokens": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, **kwargs)


def test_prompt_longer_than_the_context_is_refused(loaded):
    model, tokenizer = loaded
    limit = model.args.max_position_embeddings
    model.args.max_position_embeddings = 40
    try:
        with pytest.raises(ValueError, match="prompt too long"):
            generate(model, tokenizer, list(range(5, 35)), 16)
    finally:
        model.args.max_position_embeddings = limit


def test_readme_python_example_runs(hf_checkpoint, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "mlx-community/diffusiongemma-26B-A4B-it-4bit" in code
    exec(code.replace("mlx-community/diffusiongemma-26B-A4B-it-4bit", str(hf_checkpoint)), {})
    assert capsys.readouterr().out.strip()


def test_short_final_canvas_denoises_only_the_tokens_still_wanted(loaded):
    """Canvas 16, 21 tokens: with the flag the second canvas is 5 wide; the first is unchanged."""
    from mlx_diffgemma.generate import Canvas, Draft, SeededNoise, generate_step
    from mlx_diffgemma.sampler import DiffusionSettings

    model, _ = loaded
    runs = {}
    for short in (False, True):
        settings = DiffusionSettings(steps=4, canvas_length=16, short_final_canvas=short)
        events = list(generate_step(model, [[2, 10, 11, 12]], max_tokens=21, settings=settings, eos_token_ids=[],
                                    noise=SeededNoise(model.args.vocab_size, 4)))
        widths = [e.tokens.shape[1] for e in events if isinstance(e, Draft)]
        canvases = [e.tokens[0] for e in events if isinstance(e, Canvas)]
        runs[short] = (widths, canvases)
    assert set(runs[False][0]) == {16}
    assert runs[True][0][0] == 16 and runs[True][0][-1] == 5
    assert runs[True][1][0] == runs[False][1][0]
    assert [len(c) for c in runs[True][1]] == [16, 5]


def test_top_k_self_conditioning_mixes_the_likely_tokens_with_their_exact_probabilities(loaded):
    """Dropping only the least likely token moves the logits far less than keeping only two
    (probabilities are not renormalized); k >= vocabulary is the reference's full softmax.
    (The random model amplifies any change of its self-conditioning input, so the test
    compares the two changes rather than a tolerance.)"""
    import mlx.core as mx

    from mlx_diffgemma.generate import prefill

    model, tokenizer = loaded
    model.set_dtype(mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array([[2, 10, 11, 12, 13]]), cache)
    canvas = mx.array([[20 + i for i in range(16)]])
    first = model.denoise(canvas, cache)
    dense = model.denoise(canvas, cache, first / 0.5)
    vocab = first.shape[-1]
    near = model.denoise(canvas, cache, first / 0.5, vocab - 1)
    two = model.denoise(canvas, cache, first / 0.5, 2)
    assert mx.abs(model.denoise(canvas, cache, first / 0.5, vocab) - dense).max().item() == 0
    assert mx.abs(near - dense).mean().item() < 0.1 * mx.abs(two - dense).mean().item()
    text = generate(model, tokenizer, PROMPT, 16, steps=3, seed=1, self_conditioning_top_k=4)
    assert text != generate(model, tokenizer, PROMPT, 16, steps=3, seed=1)


def test_one_settings_object_with_overrides_gives_what_loose_settings_give(loaded):
    from mlx_diffgemma.generate import resolve_settings

    model, tokenizer = loaded
    settings = resolve_settings(model, steps=4, entropy_bound=0.3)
    assert settings.canvas_length == model.args.canvas_length
    loose = generate(model, tokenizer, PROMPT, 32, seed=2, steps=4, entropy_bound=0.3)
    assert generate(model, tokenizer, PROMPT, 32, seed=2, settings=settings) == loose
    assert generate(model, tokenizer, PROMPT, 32, seed=2, settings=resolve_settings(model, steps=9), steps=4,
                    entropy_bound=0.3) == loose
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        generate(model, tokenizer, PROMPT, 32, settings=settings, steps=0)


def test_replies_are_split_into_answer_reasoning_and_tool_calls_as_they_stream(loaded, monkeypatch):
    """The model's canvases are pinned to a reply with a thought span and a tool call."""
    import importlib

    from mlx_lm.tool_parsers import gemma4

    generation = importlib.import_module("mlx_diffgemma.generate")  # the module, not the function it exports
    model, tokenizer = loaded
    monkeypatch.setattr(tokenizer, "_tool_call_start", gemma4.tool_call_start)
    monkeypatch.setattr(tokenizer, "_tool_call_end", gemma4.tool_call_end)
    monkeypatch.setattr(tokenizer, "_tool_parser", gemma4.parse_tool_call)
    written = tokenizer.encode("<|channel>thought\nAsk the tool.<channel|>Sure.<|tool_call>call:add{a:2,b:3}<tool_call|>",
                               add_special_tokens=False)
    canvases = [written[:7], written[7:] + [106] * (32 - len(written))]

    def pinned(model, prompts, **kwargs):
        yield generation.Prefilled(len(prompts[0]))
        for i, tokens in enumerate(canvases):
            reason = "stop" if i == 1 else None
            yield generation.Canvas(i, [tokens[: tokens.index(106)] if 106 in tokens else tokens], [reason], 1, [1], [len(tokens)])

    monkeypatch.setattr(generation, "generate_step", pinned)
    responses = list(stream_generate(model, tokenizer, PROMPT, 64))
    assert "".join(r.reasoning for r in responses) == "Ask the tool."
    assert "".join(r.text for r in responses) == "Sure."
    assert [c for r in responses for c in r.tool_calls] == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert "".join(r.raw for r in responses) == tokenizer.decode(written)
    assert not any("<" in r.text for r in responses)


def test_chat_template_options_reach_the_template_and_are_refused_for_text_prompts(loaded):
    from mlx_diffgemma.generate import prepare_prompt

    model, tokenizer = loaded
    seen = {}
    original = tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.update(kwargs)
        return original(messages, **kwargs)

    tokenizer.apply_chat_template = spy
    try:
        tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
        generate(model, tokenizer, PROMPT, 16, steps=2, tools=tools, enable_thinking=False,
                 chat_template_kwargs={"custom": 1})
    finally:
        del tokenizer.apply_chat_template
    assert seen["tools"] == tools and seen["enable_thinking"] is False and seen["custom"] == 1
    with pytest.raises(ValueError, match="apply to chat messages only"):
        prepare_prompt(tokenizer, "plain text", tools=tools)
