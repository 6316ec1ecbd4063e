"""A model reply split into reasoning, answer and tool calls, as it streams.

Gemma 4 writes a reasoning span ``<|channel>thought\\n...<channel|>`` before its answer
when thinking is on, and tool calls as ``<|tool_call>call:NAME{...}<tool_call|>``. The
markers come from the tokenizer wrapper of mlx-lm (``think_start``/``think_end``,
``tool_call_start``/``tool_call_end``) and calls are parsed by its tool parser (for
Gemma 4, ``mlx_lm.tool_parsers.gemma4``). A span still open at the end of the text is
held back until it closes; when the reply ends inside one, an open reasoning span is
reasoning and an unfinished or malformed tool call is answer text. No marker is ever
left in the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

# Chat-format markers that must never reach a user as text.
MARKERS = re.compile(r"<\|?(?:turn|channel|tool_call|tool_response|tool|think)\|?>|<\|\"\|>|<bos>|<eos>")


@dataclass
class Reply:
    """The parts of a reply so far."""

    answer: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name": str, "arguments": dict}


@dataclass
class Markers:
    think_start: str | None = None  # e.g. "<|channel>thought"
    think_end: str | None = None
    tool_start: str | None = None
    tool_end: str | None = None
    parse_tool: Callable[[str], Any] | None = None

    @classmethod
    def of(cls, tokenizer) -> "Markers":
        """The markers an mlx-lm ``TokenizerWrapper`` detected (none for other tokenizers)."""
        return cls(
            getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None),
            getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None),
            getattr(tokenizer, "tool_parser", None),
        )


def parse_reply(text: str, markers: Markers, finished: bool = True) -> Reply:
    """Split ``text`` (a whole reply, or the part of it committed so far) into its parts."""
    reply, pos, answer = Reply(), 0, []
    while pos < len(text):
        kind, start = _next_span(text, pos, markers, finished)
        answer.append(text[pos:start])
        if kind is None:
            break
        opener, closer = (markers.think_start, markers.think_end) if kind == "think" else (markers.tool_start, markers.tool_end)
        end = text.find(closer, start + len(opener))
        body = text[start + len(opener) : None if end < 0 else end]
        pos = len(text) if end < 0 else end + len(closer)
        if kind == "think":  # an open span streams what it has so far
            reply.reasoning += ("\n" if reply.reasoning and body.strip() else "") + body.strip()
            continue
        calls = _parse_calls(body, markers) if end >= 0 else None
        if calls is not None:
            reply.tool_calls += calls
        elif end >= 0 or finished:  # unparseable, or never closed: the model's words, as text
            answer.append(body)
    reply.answer = _clean("".join(answer)).lstrip()
    reply.reasoning = _clean(reply.reasoning)
    return reply


def _next_span(text: str, pos: int, markers: Markers, finished: bool) -> tuple[str | None, int]:
    """The kind and index of the next reasoning or tool-call opener at or after ``pos``;
    without one, the end of the text (less what may be the start of an opener)."""
    openers = [(kind, opener) for kind, opener, closer in (("think", markers.think_start, markers.think_end),
                                                           ("tool", markers.tool_start, markers.tool_end))
               if opener and closer]
    hits = [(i, kind) for kind, opener in openers if (i := text.find(opener, pos)) >= 0]
    if hits:
        i, kind = min(hits)
        return kind, i
    end = len(text)
    if not finished:  # hold back a piece that may yet become an opener ("<|channel>" of "<|channel>thought")
        for _, opener in openers:
            end = min(end, next((len(text) - k for k in range(len(opener) - 1, 0, -1)
                                 if text.endswith(opener[:k]) and len(text) - k >= pos), end))
    return None, end


def _parse_calls(body: str, markers: Markers) -> list[dict[str, Any]] | None:
    if markers.parse_tool is None:
        return None
    try:
        parsed = markers.parse_tool(body.strip())
    except (ValueError, TypeError, KeyError):  # json.JSONDecodeError is a ValueError
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)
               for c in calls):
        return None
    return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


def _clean(text: str) -> str:
    return MARKERS.sub("", text)


class ReplyStream:
    """Deltas of answer and reasoning, and newly completed tool calls, as a reply's text grows.

    Each update parses the whole text so far; what was already handed out is a prefix of
    what the next parse gives, so the deltas add up to the parse of the whole reply.
    """

    def __init__(self, markers: Markers):
        self.markers = markers
        self.sent = Reply()

    def update(self, text: str, finished: bool) -> Reply:
        now = parse_reply(text, self.markers, finished)
        delta = Reply(
            answer=_after(now.answer, self.sent.answer),
            reasoning=_after(now.reasoning, self.sent.reasoning),
            tool_calls=now.tool_calls[len(self.sent.tool_calls):],
        )
        self.sent = Reply(self.sent.answer + delta.answer, self.sent.reasoning + delta.reasoning, now.tool_calls)
        return delta


def _after(now: str, sent: str) -> str:
    """What ``now`` adds to ``sent``; text already sent is never taken back."""
    return now[len(sent):] if now.startswith(sent) else ""
