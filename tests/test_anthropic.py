"""The Messages API translation: requests to chat requests, replies to blocks and events."""

import json

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from mlx_diffgemma.anthropic import MessageEvents, chat_request, message
from mlx_diffgemma.generate import GenerationResponse
from mlx_diffgemma.tools import RequestError

WEATHER_TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}


def response(text="", reasoning="", calls=(), reason=None, stop_string=None, tokens=3):
    return GenerationResponse(text=text, tokens=[5] * tokens, draft=None, step=None, prompt_tokens=10, prompt_tps=0.0,
                              cached_tokens=2, generation_tokens=tokens, generation_tps=0.0, finish_reason=reason,
                              reasoning=reasoning, tool_calls=list(calls), stop_string=stop_string)


def test_a_tool_loop_history_becomes_chat_messages_with_tool_turns():
    body = {
        "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}], "tools": [WEATHER_TOOL],
        "stop_sequences": ["###"], "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "x"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"t": 18}'},
                                         {"type": "text", "text": "And tomorrow?"}]},
        ],
    }
    chat = chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": '{"t": 18}'},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat["tools"][0]["function"]["name"] == "get_weather" and chat["stop"] == ["###"]
    assert chat["chat_template_kwargs"] == {"enable_thinking": True} and chat["max_tokens"] == 64


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "1"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ({"tools": [{"name": "f"}]}, "tools[0]"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"stop_sequences": "###"}, "stop_sequences"),
    ({"thinking": {"type": "maybe"}}, "thinking"),
])
def test_bad_requests_name_the_field(change, param):
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(RequestError) as error:
        chat_request(body)
    assert error.value.param == param


def test_a_whole_reply_is_a_valid_message_with_thinking_text_and_tool_use():
    responses = [response(reasoning="Need weather."), response(text="Checking.", reason="stop",
                                                               calls=[{"name": "get_weather", "arguments": {"location": "Paris"}}])]
    out = Message.model_validate(message("m", responses, 10))
    assert [b.type for b in out.content] == ["thinking", "text", "tool_use"]
    assert out.content[2].input == {"location": "Paris"} and out.stop_reason == "tool_use"
    assert out.usage.input_tokens == 10 and out.usage.output_tokens == 3
    stopped = Message.model_validate(message("m", [response(text="a", reason="stop", stop_string="###")], 10))
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "###")
    assert Message.model_validate(message("m", [response(text="a", reason="length")], 10)).stop_reason == "max_tokens"


def test_streamed_events_are_valid_and_rebuild_the_message():
    stream = MessageEvents("m", 10)
    events = stream.start()
    for r in [response(reasoning="Think"), response(reasoning=" more", text="Hi"), response(text=" there"),
              response(calls=[{"name": "get_weather", "arguments": {"location": "Paris"}}], reason="stop")]:
        events += stream.update(r)
    events += stream.finish(response(reason="stop"))
    adapter = TypeAdapter(RawMessageStreamEvent)
    parsed = [adapter.validate_python(data) for _, data in events]
    assert [name for name, _ in events] == [e.type for e in parsed]
    blocks, texts = {}, {}
    for e in parsed:
        if e.type == "content_block_start":
            blocks[e.index] = e.content_block.type
            texts[e.index] = ""
        elif e.type == "content_block_delta":
            texts[e.index] += getattr(e.delta, "thinking", None) or getattr(e.delta, "text", None) or e.delta.partial_json
    assert blocks == {0: "thinking", 1: "text", 2: "tool_use"}
    assert texts == {0: "Think more", 1: "Hi there", 2: json.dumps({"location": "Paris"})}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use" and events[-1][0] == "message_stop"
