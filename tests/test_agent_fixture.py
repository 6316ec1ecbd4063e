"""The trained agent fixture (``tests/fixtures/agent_model``) thinks, calls a tool and answers.

Each reply must come back for at least 9 of the seeds 0-9 with the default sampler settings.
Prompts are built with the fixture's chat template (tools declared, thinking on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm.tool_parsers import gemma4

from fixtures.build_agent_model import WEATHER_TOOL  # the schema the fixture was trained with

from mlx_diffgemma import load
from mlx_diffgemma.generate import stream_batch_generate

FIXTURE = Path(__file__).parent / "fixtures" / "agent_model"
SEEDS = range(10)
MARKERS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<|turn>", "<turn|>", '<|"|>')


@pytest.fixture(scope="module")
def agent():
    return load(FIXTURE)


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=True, add_generation_prompt=True)


def replies(agent, messages: list[dict], tools: list[dict] | None = None) -> list[str]:
    """The raw replies (markers included) for seeds 0-9; "" for one that did not end at an EOS id
    within one canvas. Row ``r`` of a batch seeded 0 is the prompt alone with seed ``r``."""
    model, tokenizer = agent
    ids = prompt_ids(tokenizer, messages, tools)
    raw, finish = [""] * len(SEEDS), [None] * len(SEEDS)
    for r in stream_batch_generate(model, tokenizer, [ids] * len(SEEDS), model.args.canvas_length, seed=SEEDS[0]):
        raw[r.index] += r.raw
        finish[r.index] = r.finish_reason or finish[r.index]
    return [text if reason == "stop" else "" for text, reason in zip(raw, finish)]


def is_tool_call(text: str, city: str) -> bool:
    """A reasoning span, then exactly one get_weather call for ``city``, and nothing else."""
    thought, sep, rest = text.partition("<channel|>")
    if not (sep and thought.startswith("<|channel>thought\n") and len(thought) > len("<|channel>thought\n")):
        return False
    if not (rest.startswith("<|tool_call>") and rest.endswith("<tool_call|>") and rest.count("<|tool_call>") == 1):
        return False
    try:
        call = gemma4.parse_tool_call(rest[len("<|tool_call>"):-len("<tool_call|>")])
    except ValueError:
        return False
    return call == {"name": "get_weather", "arguments": {"location": city}}


def is_plain(text: str, expected: str) -> bool:
    return text == expected and not any(m in text for m in MARKERS)


def follow_up(city: str, result: dict) -> list[dict]:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"location": city}}}
    return [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "get_weather", "content": json.dumps(result)},
    ]


def test_template_renders_gemma4_markers_and_wrapper_detects_them(agent):
    _, tokenizer = agent
    assert tokenizer.convert_tokens_to_ids(["<|turn>", "<turn|>"]) == [105, 106]
    assert 106 in tokenizer.eos_token_ids
    assert tokenizer.has_thinking and (tokenizer.think_start, tokenizer.think_end) == ("<|channel>thought", "<channel|>")
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<|tool_call>", "<tool_call|>")
    text = tokenizer.decode(prompt_ids(tokenizer, follow_up("Paris", {"temperature": 18, "condition": "sunny"}), [WEATHER_TOOL]))
    assert "<|turn>system\n<|think|>\n<|tool>declaration:get_weather{" in text
    assert text.endswith('<|turn>model\n<|tool_call>call:get_weather{location:<|"|>Paris<|"|>}<tool_call|>'
                         '<|tool_response>response:get_weather{value:<|"|>{"temperature": 18, "condition": "sunny"}<|"|>}'
                         "<tool_response|>")
    off = tokenizer.decode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], enable_thinking=False,
                                                         add_generation_prompt=True))
    assert off.endswith("<|turn>user\nSay hi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


@pytest.mark.parametrize("city", ["Paris", "Tokyo"])
def test_weather_question_gives_thought_then_tool_call(agent, city):
    texts = replies(agent, [{"role": "user", "content": f"What is the weather in {city}?"}], [WEATHER_TOOL])
    good = sum(is_tool_call(t, city) for t in texts)
    assert good >= 9, texts


def test_say_hi_gives_plain_answer(agent):
    texts = replies(agent, [{"role": "user", "content": "Say hi"}])
    assert sum(is_plain(t, "Hi! How can I help?") for t in texts) >= 9, texts


@pytest.mark.parametrize("city,result,expected", [
    ("Paris", {"temperature": 18, "condition": "sunny"}, "It is 18°C and sunny in Paris."),
    ("Tokyo", {"temperature": 22, "condition": "cloudy"}, "It is 22°C and cloudy in Tokyo."),
])
def test_answer_after_tool_result_uses_it(agent, city, result, expected):
    texts = replies(agent, follow_up(city, result), [WEATHER_TOOL])
    assert sum(is_plain(t, expected) for t in texts) >= 9, texts
