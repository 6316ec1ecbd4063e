"""A forced tool call is constrained whole: Gemma 4's call format with arguments valid against
the function's parameters, through the Python API, the OpenAI and the Anthropic endpoints."""

import json
import re
from pathlib import Path

import anthropic
import jsonschema
import openai
import pytest
from test_server_hardening import LiveServer

from mlx_diffgemma import load
from mlx_diffgemma.constrained import TOOL_MARKERS, tool_call_regex
from mlx_diffgemma.generate import stream_generate
from mlx_diffgemma.server import create_app

AGENT_MODEL = Path(__file__).parent / "fixtures" / "agent_model"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string", "maxLength": 12}, "days": {"type": "integer"},
                                     "unit": {"enum": ["c", "f"]}}, "required": ["location", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "[A-Z][a-z]+/[A-Z][a-z]+"}},
    "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def fits(regex: str, text: str) -> bool:
    """``text`` matches a call regex, its markers written as the stand-ins the automaton sees."""
    for marker, stand_in in TOOL_MARKERS.items():
        text = text.replace(marker, stand_in)
    return re.fullmatch(regex, text) is not None


def test_the_call_regex_accepts_gemma_calls_whose_arguments_fit_the_schema():
    pattern = tool_call_regex([WEATHER, TIME])
    assert fits(pattern, '<|tool_call>call:get_weather{location:<|"|>Paris<|"|>,unit:<|"|>c<|"|>}<tool_call|>')
    assert fits(pattern, '<|tool_call>call:get_time{zone:<|"|>Europe/Paris<|"|>}<tool_call|>')
    assert not fits(pattern, '<|tool_call>call:get_weather{unit:<|"|>c<|"|>}<tool_call|>')  # location missing
    assert not fits(pattern, '<|tool_call>call:get_time{zone:<|"|>paris<|"|>}<tool_call|>')  # pattern broken
    only_time = tool_call_regex([WEATHER, TIME], "get_time")
    assert not fits(only_time, '<|tool_call>call:get_weather{location:<|"|>P<|"|>,unit:<|"|>c<|"|>}<tool_call|>')


def test_no_marker_fits_inside_an_argument():
    """A string value (free text, a pattern with ``.`` or a negated class) can hold no marker:
    the model, trained on calls, would otherwise write one there."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "string", "pattern": "x.[^y]"}}, "required": ["a", "b"]}}}
    pattern = tool_call_regex([tool])
    assert fits(pattern, '<|tool_call>call:f{a:<|"|>Paris<|"|>,b:<|"|>x-z<|"|>}<tool_call|>')
    for marker in TOOL_MARKERS:
        assert not fits(pattern, f'<|tool_call>call:f{{a:<|"|>Pa{marker}ris<|"|>,b:<|"|>x-z<|"|>}}<tool_call|>')
        assert not fits(pattern, f'<|tool_call>call:f{{a:<|"|>P<|"|>,b:<|"|>x{marker}z<|"|>}}<tool_call|>')
        assert not fits(pattern, f'<|tool_call>call:f{{a:<|"|>P<|"|>,b:<|"|>x-{marker}<|"|>}}<tool_call|>')


@pytest.mark.parametrize("parameters, message", [
    ({"type": "object", "properties": {"first-name": {"type": "string"}}}, "'first-name'"),
    ({"type": "object", "properties": {"extra": {"type": "object"}}}, "an object without named properties"),
])
def test_parameters_the_call_format_cannot_carry_are_refused(parameters, message):
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with pytest.raises(ValueError, match=message):
        tool_call_regex([tool])


@pytest.fixture(scope="module")
def agent():
    return load(AGENT_MODEL)


def forced_calls(agent, tools, choice, seed):
    model, tokenizer = agent
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    responses = list(stream_generate(model, tokenizer, messages, max_tokens=48, tools=tools, seed=seed,
                                     regex=tool_call_regex(tools, choice), steps=6))
    return [c for r in responses for c in r.tool_calls], "".join(r.text for r in responses)


@pytest.mark.parametrize("choice", ["get_time", None])
def test_forced_calls_parse_and_their_arguments_validate(agent, choice):
    for seed in range(3):
        calls, text = forced_calls(agent, [WEATHER, TIME], choice, seed)
        assert len(calls) == 1 and text == "", (calls, text)
        assert choice is None or calls[0]["name"] == choice
        jsonschema.validate(calls[0]["arguments"], SCHEMAS[calls[0]["name"]])


@pytest.fixture(scope="module")
def live(agent):
    server = LiveServer(create_app(*agent, "agent"))
    yield server
    server.stop()


def test_openai_tool_choice_forces_a_valid_call_streamed_or_not(live):
    client = openai.OpenAI(base_url=f"{live.base}/v1", api_key="x", max_retries=0)
    kwargs = dict(model="agent", messages=[{"role": "user", "content": "What time is it in Paris?"}], tools=[WEATHER, TIME],
                  tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=48, seed=2,
                  extra_body={"steps": 6})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_time"
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, SCHEMAS["get_time"])
    streamed = [d for c in client.chat.completions.create(stream=True, **kwargs) for d in (c.choices[0].delta.tool_calls or [])]
    assert json.loads("".join(d.function.arguments or "" for d in streamed)) == arguments


def test_anthropic_tool_choice_forces_a_valid_tool_use(live):
    client = anthropic.Anthropic(base_url=live.base, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "input_schema": SCHEMAS["get_weather"]}]
    message = client.messages.create(model="agent", max_tokens=48, tools=tools, tool_choice={"type": "any"},
                                     messages=[{"role": "user", "content": "Weather in Tokyo?"}],
                                     extra_body={"steps": 6})
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, SCHEMAS["get_weather"])


def test_a_forced_call_whose_parameters_cannot_be_written_is_a_400_naming_tool_choice(live):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a-b": {"type": "string"}}}}}
    import httpx

    response = httpx.post(f"{live.base}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": "required"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    assert "'a-b'" in response.json()["error"]["message"]
