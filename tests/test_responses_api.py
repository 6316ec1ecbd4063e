"""The Responses API translation: input items to chat requests, replies to items and events."""

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mlx_diffgemma.generate import GenerationResponse
from mlx_diffgemma.responses_api import ResponseBuilder, chat_request
from mlx_diffgemma.tools import RequestError

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def response(text="", reasoning="", calls=(), reason=None):
    return GenerationResponse(text=text, tokens=[5], draft=None, step=None, prompt_tokens=7, prompt_tps=0.0,
                              cached_tokens=0, generation_tokens=4, generation_tps=0.0, finish_reason=reason,
                              reasoning=reasoning, tool_calls=list(calls))


def test_input_items_with_a_function_call_round_trip_become_chat_messages():
    chat = chat_request({
        "model": "m", "instructions": "Be brief.", "tools": [TOOL], "reasoning": {"effort": "none"},
        "max_output_tokens": 64,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": '{"t": 3}'},
            {"role": "developer", "content": "Answer in one line."},
        ],
    })
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 3}'},
        {"role": "system", "content": "Answer in one line."},
    ]
    assert chat["tools"][0]["function"]["name"] == "get_weather"
    assert chat["max_tokens"] == 64 and chat["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat_request({"input": "Hi"})["messages"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].image_url"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(RequestError) as error:
        chat_request(body)
    assert error.value.param == param


def test_text_formats_become_chat_response_formats():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    assert chat_request({"input": "hi", "text": {"format": fmt}})["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    assert chat_request({"input": "hi", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in chat_request({"input": "hi", "text": {"format": {"type": "text"}}})


def replay(builder, updates):
    builder.start()
    events = builder.drain()
    for r in updates:
        builder.update(r)
        events += builder.drain()
    final = builder.finish()
    return final, events + builder.drain()


def test_a_reply_becomes_valid_items_and_events_that_agree():
    updates = [response(reasoning="Check the tool."), response(text="Let me look."),
               response(calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}], reason="stop")]
    final, events = replay(ResponseBuilder("m", {"tools": [TOOL]}, 7), updates)
    parsed = Response.model_validate(final)
    assert [item.type for item in parsed.output] == ["reasoning", "message", "function_call"]
    assert parsed.output[1].content[0].text == "Let me look." and parsed.output_text == "Let me look."
    assert parsed.output[2].name == "get_weather" and parsed.output[2].arguments == '{"city": "Oslo"}'
    assert parsed.status == "completed" and parsed.usage.output_tokens == 4
    adapter = TypeAdapter(ResponseStreamEvent)
    typed = [adapter.validate_python(e) for e in events]
    assert [e.sequence_number for e in typed] == list(range(len(typed)))
    assert typed[0].type == "response.created" and typed[-1].type == "response.completed"
    assert "".join(e.delta for e in typed if e.type == "response.output_text.delta") == "Let me look."
    assert typed[-1].response.output[2].arguments == '{"city": "Oslo"}'


def test_a_reply_cut_by_max_output_tokens_is_incomplete():
    final, events = replay(ResponseBuilder("m", {}, 7), [response(text="abc", reason="length")])
    parsed = Response.model_validate(final)
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "max_output_tokens"
    assert events[-1]["type"] == "response.incomplete"
