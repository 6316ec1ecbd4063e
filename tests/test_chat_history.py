"""ChatSession keeps the conversation as the exact ids and text the model wrote."""

from mlx_diffgemma import load
from mlx_diffgemma.chat import ChatSession


def test_a_reply_cut_at_a_stop_string_is_kept_in_the_history_as_shown(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    tokenizer.eos_token_ids = []
    session = ChatSession(model, tokenizer, max_tokens=48, steps=4, seed=3)
    full = list(session.send("Hello world"))
    text = "".join(r.raw for r in full)
    piece = next(text[i : i + 3] for i in range(20, len(text)) if "\ufffd" not in text[i : i + 3]
                 and text.find(text[i : i + 3]) == i)
    session.reset()
    responses = list(session.send("Hello world", stop=[piece]))
    shown = "".join(r.raw for r in responses)
    reply_ids = [t for r in responses for t in r.tokens]
    assert responses[-1].finish_reason == "stop" and piece not in shown
    assert session.messages[-1] == {"role": "assistant", "content": shown}
    assert tokenizer.decode(reply_ids) == shown
    assert session.history_ids[-len(reply_ids):] == reply_ids
    assert responses[-1].generation_tokens == len(reply_ids)


def test_template_options_reach_every_turn_and_tool_results_are_turns(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    seen = []
    original = tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.append((list(messages), kwargs))
        return original(messages, **kwargs)

    tokenizer.apply_chat_template = spy
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    session = ChatSession(model, tokenizer, max_tokens=16, steps=2, seed=0, tools=tools, enable_thinking=True)
    list(session.send("What is 2 + 3?"))
    list(session.send_tool_result('{"sum": 5}', name="add"))
    assert [kw["tools"] for _, kw in seen] == [tools, tools] and all(kw["enable_thinking"] for _, kw in seen)
    assert seen[-1][0][-1] == {"role": "tool", "content": '{"sum": 5}', "name": "add"}
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
