"""Agent traffic through the three APIs, with the official clients: tool calls out,
reasoning apart, tool results back. The model's replies are scripted here (the wire
formats are what is tested); tests/test_agent_fixture.py drives the real sampler."""

import json

import anthropic
import httpx
import openai
import pytest
from test_server_hardening import LiveServer

from mlx_diffgemma.generate import GenerationResponse
from mlx_diffgemma.server import create_app
from mlx_diffgemma.utils import load

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                                           "required": ["location"]}}}
CALL = {"name": "get_weather", "arguments": {"location": "Paris"}}


def scripted(parts):
    """A stand-in for stream_generate that replies with ``parts`` (reasoning, text, calls) per canvas."""
    def generate(model, tokenizer, ids, prompt_cache=None, **options):
        count = 0
        for i, (reasoning, text, calls) in enumerate(parts):
            count += 5
            last = i == len(parts) - 1
            yield GenerationResponse(text=text, tokens=[7] * 5, draft=None, step=None, prompt_tokens=len(ids),
                                     prompt_tps=1.0, cached_tokens=0, generation_tokens=count, generation_tps=1.0,
                                     finish_reason="stop" if last else None, reasoning=reasoning, tool_calls=calls,
                                     raw=reasoning + text)
    return generate


@pytest.fixture(scope="module")
def live(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    server = LiveServer(create_app(model, tokenizer, "tiny"))
    yield server
    server.stop()


@pytest.fixture
def reply(live, monkeypatch):
    def set_parts(parts):
        monkeypatch.setattr(live.app.state.worker, "generate", scripted(parts))
    return set_parts


TOOL_TURN = [("The user wants the weather.", "", []), ("", "Let me check.", [CALL])]


def test_openai_chat_returns_tool_calls_and_reasoning_apart(live, reply):
    reply(TOOL_TURN)
    client = openai.OpenAI(base_url=f"{live.base}/v1", api_key="x", max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=[WEATHER])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                                 tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [(0, "get_weather", CALL["arguments"])]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "The user wants the weather."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_tool_result_turn_is_answered(live, reply):
    reply([("", "It is 18 degrees in Paris.", [])])
    client = openai.OpenAI(base_url=f"{live.base}/v1", api_key="x", max_retries=0)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'}]
    out = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    assert out.choices[0].message.content == "It is 18 degrees in Paris." and out.choices[0].finish_reason == "stop"


def test_anthropic_messages_blocks_streamed_and_not(live, reply):
    reply(TOOL_TURN)
    client = anthropic.Anthropic(base_url=live.base, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "description": "Current weather", "input_schema": WEATHER["function"]["parameters"]}]
    message = client.messages.create(model="tiny", max_tokens=64, tools=tools,
                                     messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].name == "get_weather" and message.content[2].input == {"location": "Paris"}
    assert message.stop_reason == "tool_use"
    with client.messages.stream(model="tiny", max_tokens=64, tools=tools,
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["thinking", "text", "tool_use"]
    assert streamed.content[2].input == {"location": "Paris"} and streamed.stop_reason == "tool_use"

    reply([("", "18 degrees.", [])])
    answer = client.messages.create(model="tiny", max_tokens=64, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": message.content[2].id, "name": "get_weather",
                                           "input": {"location": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": message.content[2].id, "content": "18"}]}])
    assert answer.content[0].text == "18 degrees." and answer.stop_reason == "end_turn"


def test_responses_api_items_streamed_and_not(live, reply):
    reply(TOOL_TURN)
    client = openai.OpenAI(base_url=f"{live.base}/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    out = client.responses.create(model="tiny", input="Weather in Paris?", tools=tools)
    assert [item.type for item in out.output] == ["reasoning", "message", "function_call"]
    assert out.output_text == "Let me check." and json.loads(out.output[2].arguments) == {"location": "Paris"}
    with client.responses.stream(model="tiny", input="Weather?", tools=tools) as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[2].name == "get_weather"


@pytest.mark.parametrize("path, body, status, field", [
    ("/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "max"}, 400,
     "reasoning_effort"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
])
def test_bad_agent_requests_name_the_field(live, path, body, status, field):
    response = httpx.post(f"{live.base}{path}", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert field in error["message"] or error.get("param") == field
    if path == "/v1/messages":
        assert response.json()["type"] == "error" and error["type"] == "invalid_request_error"


def test_anthropic_clients_authenticate_with_x_api_key(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    server = LiveServer(create_app(model, tokenizer, "tiny", api_key="secret"))
    try:
        body = {"model": "tiny", "max_tokens": 4, "steps": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{server.base}/v1/messages", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{server.base}/v1/messages", json=body, headers={"x-api-key": "secret"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["type"] == "message"
    finally:
        server.stop()


def test_readme_agent_examples_run_against_the_server(live, monkeypatch):
    """The README's "Agents and tools" Python examples, as written but for the address."""
    import re
    from pathlib import Path

    monkeypatch.setattr(live.app.state.worker, "generate", scripted(TOOL_TURN))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Agents and tools", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for code in blocks:
        exec(code.replace("http://localhost:1234", live.base), {})
