"""Splitting Gemma 4 replies into reasoning, answer and tool calls, whole and streamed."""

import re

import pytest
from mlx_lm.tool_parsers import gemma4

from mlx_diffgemma.reply import Markers, ReplyStream, parse_reply

GEMMA4 = Markers("<|channel>thought", "<channel|>", gemma4.tool_call_start, gemma4.tool_call_end, gemma4.parse_tool_call)
CALL = '<|tool_call>call:get_weather{location:<|"|>Paris<|"|>,days:3}<tool_call|>'
WEATHER = {"name": "get_weather", "arguments": {"location": "Paris", "days": 3}}


@pytest.mark.parametrize("text, answer, reasoning, calls", [
    ("Hi! How can I help?", "Hi! How can I help?", "", []),
    ("<|channel>thought\nThe user greets me.<channel|>Hello!", "Hello!", "The user greets me.", []),
    ("<|channel>thought\nNeed the weather.<channel|>" + CALL, "", "Need the weather.", [WEATHER]),
    ("Let me check. " + CALL + CALL, "Let me check. ", "", [WEATHER, WEATHER]),
    # A malformed call is the model's words: text, without markers.
    ("<|tool_call>call:get_weather{location:<tool_call|>", "call:get_weather{location:", "", []),
    # The reply ended inside its reasoning: that is reasoning, and there is no answer.
    ("<|channel>thought\nstill thinking", "", "still thinking", []),
    ("Answer<turn|>", "Answer", "", []),
])
def test_a_whole_reply_splits_into_its_parts(text, answer, reasoning, calls):
    reply = parse_reply(text, GEMMA4)
    assert (reply.answer, reply.reasoning, reply.tool_calls) == (answer, reasoning, calls)


def test_an_unclosed_call_is_held_back_while_the_reply_goes_on_and_is_text_if_it_ends_so():
    partial = 'Checking <|tool_call>call:get_weather{location:<|"|>Par'
    assert parse_reply(partial, GEMMA4, finished=False).answer == "Checking "
    assert parse_reply(partial, GEMMA4, finished=True).answer == "Checking call:get_weather{location:Par"


def atoms(text: str) -> list[str]:
    """The text as a tokenizer cuts it: each chat marker whole (they are single tokens), other characters alone."""
    out = []
    for part in re.split(r'(<\|channel>|<channel\|>|<\|tool_call>|<tool_call\|>|<\|"\|>)', text):
        out += [part] if part.startswith("<") and part.endswith(">") else list(part)
    return out


@pytest.mark.parametrize("cut", range(1, 12))
def test_streamed_deltas_add_up_to_the_whole_reply(cut):
    text = "<|channel>thought\nThe user wants the weather in Paris.<channel|>Sure. " + CALL + " Done."
    units = atoms(text)
    pieces = ["".join(units[i : i + cut]) for i in range(0, len(units), cut)]
    stream, answer, reasoning, calls = ReplyStream(GEMMA4), "", "", []
    seen = ""
    for i, piece in enumerate(pieces):
        seen += piece
        delta = stream.update(seen, finished=i == len(pieces) - 1)
        answer, reasoning, calls = answer + delta.answer, reasoning + delta.reasoning, calls + delta.tool_calls
        assert "<|" not in delta.answer and "|>" not in delta.answer
    whole = parse_reply(text, GEMMA4)
    assert (answer, reasoning, calls) == (whole.answer, whole.reasoning, whole.tool_calls)
    assert answer == "Sure.  Done." and calls == [WEATHER]


def test_a_tokenizer_without_markers_leaves_text_as_it_is_but_strips_chat_markers():
    assert parse_reply("<|channel>thought\nx<channel|>y", Markers()).answer == "thought\nxy"
