"""OpenAI's Responses API (``POST /v1/responses``) over the chat generation path.

A request (``input`` items, ``instructions``, function tools, ``reasoning``; a user
message's ``input_image`` parts, ``data:`` URIs decoded here) becomes an OpenAI-style chat request, which the server checks and runs as any other; the reply
becomes output items (``reasoning``, ``message``, ``function_call``) and, streamed, the
Responses API's events. Nothing is stored: ``previous_response_id`` is refused.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from .generate import GenerationResponse
from .tools import RequestError, arguments_json, call_id, responses_tools
from .vision import ImageError, read_image

THINKING_OFF = ("none", "minimal")


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions request that serves a Responses API ``body``."""
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise RequestError(f"'{field}' is not supported: this server stores no responses; send the whole input", field)
    if body.get("background"):
        raise RequestError("'background' responses are not supported", "background")
    messages = _instructions(body.get("instructions")) + _input(body.get("input"))
    chat: dict[str, Any] = {"messages": messages}
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    for ours, theirs in (("model", "model"), ("max_tokens", "max_output_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("stream", "stream")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    if body.get("tools") is not None:
        chat["tools"] = responses_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = body["tool_choice"]
    reasoning = body.get("reasoning")
    if reasoning is not None:
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
        if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise RequestError(f"reasoning.effort {effort!r} is not one of none, minimal, low, medium, high", "reasoning")
        if effort is not None:
            chat["chat_template_kwargs"] = {"enable_thinking": effort not in THINKING_OFF}
    return chat


def _text_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as a chat ``response_format``: the Responses API names the schema's fields flat."""
    spec = (text or {}).get("format") if isinstance(text, dict) else None
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": spec.get("name"), "schema": spec.get("schema")}}
    raise RequestError(f"text.format {kind!r} is not supported: 'text', 'json_object' or 'json_schema'", "text")


def _instructions(instructions: Any) -> list[dict[str, Any]]:
    if instructions is None or instructions == "":
        return []
    if not isinstance(instructions, str):
        raise RequestError("'instructions' must be a string", "instructions")
    return [{"role": "system", "content": instructions}]


def _input(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str) and items:
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("'input' must be a non-empty string or list of input items", "input")
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"{where}: role must be user, assistant, system or developer", where)
            content = _content(item.get("content"), where, images=role == "user")
            out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name")):
                raise RequestError(f"{where}: a function_call needs a call_id and a name", where)
            calls.add(item["call_id"])
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.get("call_id") not in calls:
                raise RequestError(f"{where}: call_id {item.get('call_id')!r} answers no earlier function_call", where)
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _content(output, where)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not sent back to the model
        else:
            raise RequestError(f"{where}: input items of type {kind!r} are not supported", where)
    return out


def _content(content: Any, where: str, images: bool = False) -> str | list[dict[str, Any]]:
    """Text, or with ``images`` (user messages) text and image parts: ``input_image`` parts
    with a ``data:`` URI decoded here, with an http(s) URL as ``image_url`` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of content parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and images:
            parts.append(_image(part.get("image_url"), f"{where}.content[{j}].image_url"))
        else:
            accepted = "text and input_image" if images else "text"
            raise RequestError(f"{where}: content parts of type {kind!r} are not supported ({accepted} only)", where)
    if any(p["type"] != "text" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _image(url: Any, at: str) -> dict[str, Any]:
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return {"type": "image_url", "image_url": {"url": url}}
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(f"{at}: an input_image needs an image_url, a data: URI or an http(s) URL (file_id is not supported)", at)
    try:
        return {"type": "image", "image": read_image(url)}
    except ImageError as e:
        raise RequestError(f"{at}: {e}", at) from None


class ResponseBuilder:
    """Output items from a reply's updates, as a whole response and as stream events.

    Items open in the order the reply's parts arrive; an item is done when a part of
    another kind begins. Stream events (with sequence numbers) wait in ``pending`` until
    ``drain`` hands them out.
    """

    def __init__(self, model_id: str, request: dict[str, Any], prompt_tokens: int):
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.model_id, self.request, self.prompt_tokens = model_id, request, prompt_tokens
        self.output: list[dict[str, Any]] = []
        self.open: str | None = None
        self.pending: list[dict[str, Any]] = []
        self.sequence = 0
        self.last: GenerationResponse | None = None

    def response(self, status: str = "completed") -> dict[str, Any]:
        last = self.last
        out = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model_id,
            "output": self.output, "parallel_tool_calls": True, "tool_choice": self.request.get("tool_choice", "auto"),
            "tools": self.request.get("tools", []), "error": None, "incomplete_details": None,
            "instructions": self.request.get("instructions"), "metadata": self.request.get("metadata"),
            "temperature": self.request.get("temperature"), "top_p": self.request.get("top_p"),
            "max_output_tokens": self.request.get("max_output_tokens"),
        }
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if status != "in_progress":
            output_tokens = last.generation_tokens if last else 0
            out["usage"] = {"input_tokens": self.prompt_tokens, "output_tokens": output_tokens,
                            "total_tokens": self.prompt_tokens + output_tokens,
                            "input_tokens_details": {"cached_tokens": last.cached_tokens if last else 0,
                                                     "cache_write_tokens": 0},
                            "output_tokens_details": {"reasoning_tokens": 0}}
        return out

    def start(self) -> None:
        self._event("response.created", response=self.response("in_progress"))
        self._event("response.in_progress", response=self.response("in_progress"))

    def update(self, r: GenerationResponse) -> None:
        self.last = r
        for kind, value in (("reasoning", r.reasoning), ("message", r.text)):
            if value:
                if self.open != kind:
                    self._open(kind)
                item, index = self.output[-1], len(self.output) - 1
                item["content"][0]["text"] += value
                name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                extra = {} if kind == "reasoning" else {"logprobs": []}
                self._event(name, item_id=item["id"], output_index=index, content_index=0, delta=value, **extra)
        for call in r.tool_calls:
            self._close()
            args = arguments_json(call["arguments"])
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id(), "name": call["name"],
                    "arguments": "", "status": "in_progress"}
            self.output.append(item)
            index = len(self.output) - 1
            self._event("response.output_item.added", output_index=index, item=dict(item))
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=args)
            item.update(arguments=args, status="completed")
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=args)
            self._event("response.output_item.done", output_index=index, item=item)

    def finish(self) -> dict[str, Any]:
        """Close the last item; the final response (also sent as the last event)."""
        self._close()
        status = "incomplete" if self.last is not None and self.last.finish_reason == "length" else "completed"
        final = self.response(status)
        self._event(f"response.{status}", response=final)
        return final

    def _open(self, kind: str) -> None:
        self._close()
        if kind == "reasoning":
            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress", "role": "assistant",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output.append(item)
        index = len(self.output) - 1
        self._event("response.output_item.added", output_index=index, item=dict(item, content=[]))
        item["content"].append(part)
        self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=dict(part))
        self.open = kind

    def _close(self) -> None:
        if self.open is None:
            return
        item, index = self.output[-1], len(self.output) - 1
        part = item["content"][0]
        if self.open == "reasoning":
            self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=part["text"])
        else:
            self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=part["text"], logprobs=[])
        self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=dict(part))
        item["status"] = "completed"
        self._event("response.output_item.done", output_index=index, item=item)
        self.open = None

    def drain(self) -> list[dict[str, Any]]:
        events, self.pending = self.pending, []
        return events

    def _event(self, kind: str, **fields: Any) -> None:
        # A copy: items and the response go on changing after the event is made.
        self.pending.append(copy.deepcopy({"type": kind, "sequence_number": self.sequence, **fields}))
        self.sequence += 1
