"""Function tools as API clients declare them, checked and put in the one form chat
templates take (OpenAI's ``{"type": "function", "function": {...}}``).

Both the OpenAI and the Anthropic shapes are accepted; a bad declaration is a
``RequestError`` naming the field, which the server answers with a 400.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RequestError(ValueError):
    """A request field that cannot be served; ``param`` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _function(name: Any, description: Any, parameters: Any, param: str) -> dict[str, Any]:
    if not isinstance(name, str) or not NAME.match(name):
        raise RequestError(f"{param}: a tool name must be 1 to 64 letters, digits, '_' or '-' (got {name!r})", param)
    if description is not None and not isinstance(description, str):
        raise RequestError(f"{param}: the description of '{name}' must be a string", param)
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise RequestError(f"{param}: the parameters of '{name}' must be a JSON schema object", param)
    try:
        validator_for(parameters).check_schema(parameters)
    except SchemaError as e:
        raise RequestError(f"{param}: the parameters of '{name}' are not a valid JSON schema: {e.message}", param) from None
    function = {"name": name, "parameters": parameters}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def openai_tools(tools: Any, param: str = "tools") -> list[dict[str, Any]]:
    """Chat Completions tools: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
    out = []
    for i, tool in enumerate(_list(tools, param)):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise RequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        f = tool["function"]
        out.append(_function(f.get("name"), f.get("description"), f.get("parameters"), where))
    return _unique(out, param)


def responses_tools(tools: Any, param: str = "tools") -> list[dict[str, Any]]:
    """Responses API tools: ``[{"type": "function", "name", "description", "parameters"}]``."""
    out = []
    for i, tool in enumerate(_list(tools, param)):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise RequestError(f"{where}: only function tools are supported (got type {kind!r})", where)
        out.append(_function(tool.get("name"), tool.get("description"), tool.get("parameters"), where))
    return _unique(out, param)


def anthropic_tools(tools: Any, param: str = "tools") -> list[dict[str, Any]]:
    """Messages API tools: ``[{"name", "description", "input_schema"}]`` (client tools only)."""
    out = []
    for i, tool in enumerate(_list(tools, param)):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise RequestError(f"{where}: only client tools with an input_schema are supported (got type {kind!r})", where)
        if "input_schema" not in tool:
            raise RequestError(f"{where}: input_schema is required", where)
        out.append(_function(tool.get("name"), tool.get("description"), tool.get("input_schema"), where))
    return _unique(out, param)


def _list(tools: Any, param: str) -> list:
    if not isinstance(tools, list):
        raise RequestError(f"'{param}' must be a list", param)
    return tools


def _unique(tools: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    names = [t["function"]["name"] for t in tools]
    if duplicate := next((n for n in names if names.count(n) > 1), None):
        raise RequestError(f"'{param}' declares '{duplicate}' twice", param)
    return tools


def tool_choice(choice: Any, tools: list[dict[str, Any]], param: str = "tool_choice") -> str | None:
    """The mode a ``tool_choice`` asks for: ``"none"``, ``"auto"``, ``"required"``, or a tool's name.

    Accepts the OpenAI forms (``"auto"``, ``"none"``, ``"required"``,
    ``{"type": "function", "function": {"name"}}`` or the Responses API's
    ``{"type": "function", "name"}``) and Anthropic's (``{"type": "auto"|"any"|"none"|"tool"}``).
    ``None`` when absent.
    """
    if choice is None:
        return None
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, str) and choice in ("none", "auto", "required"):
        mode = choice
    elif isinstance(choice, dict) and choice.get("type") in ("auto", "none", "any"):
        mode = {"any": "required"}.get(choice["type"], choice["type"])
    elif isinstance(choice, dict) and choice.get("type") in ("function", "tool"):
        function = choice.get("function")
        mode = function.get("name") if isinstance(function, dict) else choice.get("name")
        if not isinstance(mode, str):
            raise RequestError(f"'{param}' must name the function it forces", param)
        if mode not in names:
            raise RequestError(f"'{param}' names '{mode}', which is not among the declared tools", param)
    else:
        raise RequestError(f"'{param}' must be \"none\", \"auto\", \"required\" or name a declared function", param)
    if mode != "none" and not tools:
        raise RequestError(f"'{param}' is {mode!r} but no tools are declared", param)
    return mode


def call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def arguments_json(arguments: dict[str, Any]) -> str:
    """A call's arguments as the JSON string OpenAI clients expect."""
    return json.dumps(arguments, ensure_ascii=False)


def template_tool_call(call: Any, param: str, with_id: bool = True) -> dict[str, Any]:
    """An assistant's tool call (OpenAI's shape) as chat templates take it, arguments as an
    object. ``with_id``: the call must carry its ``id`` (the server matches tool results to it)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or (with_id and not isinstance(call.get("id"), str)) \
            or call.get("type", "function") != "function":
        shape = '{"id", "type": "function", "function": {"name", "arguments"}}' if with_id \
            else '{"type": "function", "function": {"name", "arguments"}}'
        raise RequestError(f"'{param}' must be {shape}", param)
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f"'{param}.function.name' must be a non-empty string", f"{param}.function.name")
    arguments = parse_arguments(function.get("arguments", {}), f"{param}.function.arguments")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return {"id": call["id"], **out} if isinstance(call.get("id"), str) else out


def parse_arguments(arguments: Any, param: str) -> dict[str, Any]:
    """A history call's arguments: OpenAI sends a JSON string, others an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise RequestError(f"{param}: arguments must be a JSON object (as a string)", param) from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{param}: arguments must be a JSON object", param)
    return arguments
