"""Tool declarations from OpenAI and Anthropic clients, checked and normalised."""

import json

import pytest

from mlx_diffgemma.tools import RequestError, anthropic_tools, openai_tools, parse_arguments, responses_tools, tool_choice

WEATHER = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
NORMAL = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "description": "Weather"}}]


def test_the_three_client_shapes_give_one_template_form():
    assert openai_tools([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                            "parameters": WEATHER}}]) == NORMAL
    assert responses_tools([{"type": "function", "name": "get_weather", "description": "Weather",
                             "parameters": WEATHER}]) == NORMAL
    assert anthropic_tools([{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]) == NORMAL


@pytest.mark.parametrize("tools, message", [
    ("get_weather", "'tools' must be a list"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tool name must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": 3}}}], "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}], "twice"),
    ([{"type": "retrieval"}], r"tools\[0\] must be"),
])
def test_bad_openai_tools_name_the_field(tools, message):
    with pytest.raises(RequestError, match=message) as error:
        openai_tools(tools)
    assert error.value.param.startswith("tools")


def test_anthropic_server_tools_and_missing_schemas_are_refused():
    with pytest.raises(RequestError, match="only client tools"):
        anthropic_tools([{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(RequestError, match="input_schema is required"):
        anthropic_tools([{"name": "f"}])


@pytest.mark.parametrize("choice, mode", [
    (None, None), ("auto", "auto"), ("none", "none"), ("required", "required"),
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ({"type": "function", "name": "get_weather"}, "get_weather"),
    ({"type": "any"}, "required"), ({"type": "tool", "name": "get_weather"}, "get_weather"),
])
def test_tool_choice_modes(choice, mode):
    assert tool_choice(choice, NORMAL) == mode


@pytest.mark.parametrize("choice, tools, message", [
    ({"type": "function", "function": {"name": "get_time"}}, NORMAL, "'get_time', which is not among the declared"),
    ("always", NORMAL, "must be"),
    ("required", [], "no tools are declared"),
])
def test_bad_tool_choice_names_the_field(choice, tools, message):
    with pytest.raises(RequestError, match=message) as error:
        tool_choice(choice, tools)
    assert error.value.param == "tool_choice"


def test_history_arguments_come_as_json_strings_or_objects():
    assert parse_arguments(json.dumps({"a": 1}), "x") == {"a": 1} == parse_arguments({"a": 1}, "x")
    assert parse_arguments("", "x") == {}
    with pytest.raises(RequestError, match="JSON object"):
        parse_arguments("[1, 2]", "x")
