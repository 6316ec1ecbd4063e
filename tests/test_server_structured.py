"""``response_format`` through the real server, driven with the official ``openai`` package."""

import json
import random

import httpx
import jsonschema
import pydantic
import pytest

from schemas import random_schema
from test_server import FAST, client, server  # noqa: F401 (fixtures)


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    legs: int
    kind: str = pydantic.Field(pattern="^(cat|dog|bird)$")
    vaccinated: bool


def test_parse_with_a_pydantic_model_returns_an_instance(client, server):
    _, model = server
    reply = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "A pet, as JSON."}],
                                          response_format=Pet, max_tokens=128, seed=1, extra_body=FAST)
    message = reply.choices[0].message
    assert isinstance(message.parsed, Pet), message.content
    assert Pet.model_validate_json(message.content) == message.parsed


def test_streamed_json_schema_replies_validate_and_equal_the_whole_reply(client, server):
    _, model = server
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {
        "enum": ["a", "b"]}, "maxItems": 2}}, "required": ["id", "tags"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    kwargs = dict(model=model, messages=[{"role": "user", "content": "JSON"}], response_format=fmt, max_tokens=64,
                  seed=4, extra_body=FAST)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), schema)


def test_random_schemas_through_the_server_all_validate(client, server):
    _, model = server
    rng = random.Random(7)
    for i in range(8):
        schema = random_schema(rng)
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON"}],
                                               response_format=fmt, max_tokens=96, seed=i, extra_body=FAST)
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_object_mode_returns_an_object(client, server):
    _, model = server
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON"}],
                                           response_format={"type": "json_object"}, max_tokens=64, seed=0,
                                           extra_body=FAST)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "yaml"}}, "'response_format.type' must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "must be a JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integr"}}}}, "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "hostname"}}}},
     "unsupported JSON schema: Format hostname is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "[a-z]{40}"}}},
      "max_tokens": 8}, "more than max_tokens (8)"),
    ({"response_format": {"type": "json_object"}, "tools": [TOOL], "tool_choice": "required"}, "forces a call"),
    ({"response_format": {"type": "json_object"}, "reasoning_effort": "high"}, "cannot be combined with thinking"),
])
def test_bad_response_formats_are_400s_naming_the_field(server, extra, message):
    base, _ = server
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "response_format"
    assert "\n" not in error["message"]


def test_the_responses_api_takes_a_json_schema_text_format(client, server):
    _, model = server
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    response = client.responses.create(model=model, input="JSON", max_output_tokens=48, extra_body=FAST,
                                       text={"format": {"type": "json_schema", "name": "t", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)
