"""Anthropic's Messages API (``POST /v1/messages``) over the chat generation path.

A request becomes an OpenAI-style chat request (messages with ``tool_calls`` and ``tool``
turns, function tools, ``stop``, ``chat_template_kwargs``), which the server checks and
runs as any other (image blocks: base64 ones decoded here, URL ones as ``image_url`` parts);
the replies become content blocks (``thinking``, ``text``,
``tool_use``) or, streamed, the Messages API's events.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .generate import GenerationResponse
from .tools import RequestError, anthropic_tools, arguments_json, call_id
from .vision import ImageError, read_image

STOP_REASONS = {"length": "max_tokens"}


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions request that serves a Messages API ``body``."""
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("'max_tokens' is required and must be a positive integer", "max_tokens")
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    chat: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens}
    for ours, theirs in (("model", "model"), ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("stream", "stream")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("'stop_sequences' must be a list of non-empty strings", "stop_sequences")
        chat["stop"] = stop
    if body.get("tools") is not None:
        chat["tools"] = anthropic_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise RequestError("'thinking' must be {\"type\": \"enabled\"} or {\"type\": \"disabled\"}", "thinking")
        chat["chat_template_kwargs"] = {"enable_thinking": thinking["type"] != "disabled"}
    return chat


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system):
        return [{"role": "system", "content": "".join(str(b.get("text", "")) for b in system)}]
    raise RequestError("'system' must be a string or a list of text blocks", "system")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where}: role must be 'user' or 'assistant'", where)
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise RequestError(f"{where}: content must be a string or a list of content blocks", where)
        parts, tool_calls, results = [], [], []
        for j, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            at = f"{where}.content[{j}]"
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and message["role"] == "user":
                parts.append(_image(block.get("source"), at))
            elif kind in ("thinking", "redacted_thinking") and message["role"] == "assistant":
                continue  # earlier reasoning is not sent back to the model
            elif kind == "tool_use" and message["role"] == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                        or not isinstance(block.get("input"), dict):
                    raise RequestError(f"{at}: a tool_use block needs an id, a name and an input object", at)
                calls.add(block["id"])
                tool_calls.append({"id": block["id"], "type": "function",
                                   "function": {"name": block["name"], "arguments": block["input"]}})
            elif kind == "tool_result" and message["role"] == "user":
                if block.get("tool_use_id") not in calls:
                    raise RequestError(f"{at}: tool_use_id {block.get('tool_use_id')!r} answers no earlier tool_use", at)
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": _result_text(block, at)})
            else:
                raise RequestError(f"{at}: a {kind!r} block is not supported in a {message['role']} message", at)
        out += results
        if parts or tool_calls or not results:
            images = any(p["type"] != "text" for p in parts)
            turn: dict[str, Any] = {"role": message["role"], "content": parts if images else "".join(p["text"] for p in parts)}
            if tool_calls:
                turn["tool_calls"] = tool_calls
            out.append(turn)
    return out


def _image(source: Any, at: str) -> dict[str, Any]:
    """An image block's source as a chat content part: a base64 image decoded, a URL as an ``image_url`` part."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind != "base64" or not isinstance(source.get("media_type"), str) or not isinstance(source.get("data"), str):
        raise RequestError(f"{at}: an image block's source must be {{\"type\": \"base64\", \"media_type\", \"data\"}} "
                           "or {\"type\": \"url\", \"url\"}", at)
    try:
        return {"type": "image", "image": read_image(f"data:{source['media_type']};base64,{source['data']}")}
    except ImageError as e:
        raise RequestError(f"{at}: {e}", at) from None


def _result_text(block: dict[str, Any], at: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        text = "".join(str(b.get("text", "")) for b in content)
    else:
        raise RequestError(f"{at}: tool_result content must be a string or text blocks", at)
    return f"Error: {text}" if block.get("is_error") else text


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "none", "tool"):
        raise RequestError("'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"none\" | \"tool\"}", "tool_choice")
    if choice["type"] == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"any": "required"}.get(choice["type"], choice["type"])


def stop_reason(last: GenerationResponse | None, tool_use: bool) -> tuple[str, str | None]:
    """The Messages API's ``stop_reason`` and ``stop_sequence`` for a finished reply."""
    if tool_use:
        return "tool_use", None
    if last is not None and last.stop_string is not None:
        return "stop_sequence", last.stop_string
    return STOP_REASONS.get(last.finish_reason if last else None, "end_turn"), None


def usage(last: GenerationResponse | None, prompt_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": last.generation_tokens if last else 0,
            "cache_read_input_tokens": last.cached_tokens if last else 0}


def message(model_id: str, responses: list[GenerationResponse], prompt_tokens: int) -> dict[str, Any]:
    """The whole reply as a Messages API message."""
    content: list[dict[str, Any]] = []
    reasoning = "".join(r.reasoning for r in responses)
    text = "".join(r.text for r in responses)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text:
        content.append({"type": "text", "text": text})
    for call in (c for r in responses for c in r.tool_calls):
        content.append({"type": "tool_use", "id": call_id("toolu_"), "name": call["name"], "input": call["arguments"]})
    last = responses[-1] if responses else None
    reason, sequence = stop_reason(last, any(b["type"] == "tool_use" for b in content))
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model_id,
            "content": content, "stop_reason": reason, "stop_sequence": sequence, "usage": usage(last, prompt_tokens)}


class MessageEvents:
    """A streamed reply as Messages API events: ``(event name, data)`` pairs.

    Blocks open in the order the reply's parts arrive (thinking, then text, then tool
    uses); a block is closed when a part of another kind begins.
    """

    def __init__(self, model_id: str, prompt_tokens: int):
        self.model_id, self.prompt_tokens = model_id, prompt_tokens
        self.index, self.open, self.tool_use = -1, None, False

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        shell = message(self.model_id, [], self.prompt_tokens)
        shell.update(stop_reason=None, stop_sequence=None)
        return [("message_start", {"type": "message_start", "message": shell})]

    def update(self, r: GenerationResponse) -> list[tuple[str, dict[str, Any]]]:
        events = []
        for kind, value in (("thinking", r.reasoning), ("text", r.text)):
            if value:
                if self.open != kind:
                    events += self._open(kind, {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})})
                events.append(self._delta({"type": f"{kind}_delta", kind: value}))
        for call in r.tool_calls:
            self.tool_use = True
            events += self._open("tool_use", {"type": "tool_use", "id": call_id("toolu_"), "name": call["name"], "input": {}})
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments_json(call["arguments"])}))
        return events

    def finish(self, last: GenerationResponse | None) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        reason, sequence = stop_reason(last, self.tool_use)
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                         "usage": {"output_tokens": last.generation_tokens if last else 0}}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _open(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        self.index, self.open = self.index + 1, kind
        return events + [("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]


def error_body(message_text: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """The Messages API's error shape."""
    return {"type": "error", "error": {"type": kind, "message": message_text}}


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
