"""Chat: reply formatting, cache reuse across turns, and the real terminal REPL in a pseudo-terminal."""

import json
import shutil
import sys
import time
from pathlib import Path

import pexpect
import pytest

from mlx_diffgemma import generate, load
from mlx_diffgemma.chat import ChatSession, split_reply

CLI = str(Path(__file__).parents[1] / "cli.py")
FAST = dict(max_tokens=24, steps=3)


def test_split_reply_separates_reasoning_and_tool_calls_and_hides_markers():
    text = "<|channel>thought\nLet me think.<channel|>The answer is 4.<|tool_call>call:calc{x:2}<tool_call|><turn|>"
    reply = split_reply(text)
    assert reply.reasoning == "Let me think."
    assert reply.answer == "The answer is 4."
    assert reply.tool_calls == ["calc{x:2}"]
    partial = split_reply("<|channel>thought\nstill thinking")
    assert partial.answer == "" and partial.reasoning == "still thinking"


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(hf_checkpoint)


def test_second_turn_encodes_only_new_tokens(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **FAST, seed=0)
    encoded = []
    original = model.encode
    model.encode = lambda ids, cache: (encoded.append(ids.shape[1]), original(ids, cache))[1]
    try:
        list(session.send("Hello world"))
        cached = list(session.prompt_cache.tokens)
        session.messages.append({"role": "user", "content": "How are you today?"})
        second_prompt = session.prompt_ids()
        session.messages.pop()
        encoded.clear()
        reuse = "".join(r.text for r in session.send("How are you today?"))
    finally:
        model.encode = original
    assert cached and second_prompt[: len(cached)] == cached
    assert encoded[0] == len(second_prompt) - len(cached) < len(second_prompt)
    # Reusing the cache gives what encoding the whole conversation from scratch gives.
    assert reuse == generate(model, tokenizer, second_prompt, seed=0, **FAST)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_refused_turn_leaves_history_unchanged(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **FAST)
    list(session.send("Hello world"))
    before = list(session.messages)
    with pytest.raises(ValueError, match="steps must be"):
        list(session.send("again", steps=0))
    assert session.messages == before


@pytest.fixture(scope="module")
def small_context_checkpoint(hf_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a 200-token context, so a long message overflows it."""
    path = tmp_path_factory.mktemp("ctx") / "model"
    shutil.copytree(hf_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 200
    (path / "config.json").write_text(json.dumps(config))
    return path


def spawn_chat(checkpoint, *args):
    child = pexpect.spawn(sys.executable, [CLI, "chat", "-m", str(checkpoint), *args], encoding="utf-8", codec_errors="replace",
                          timeout=120, dimensions=(40, 120))
    child.expect(">>> ")
    return child


def test_chat_repl_turns_stats_reset_too_long_and_ctrl_d(small_context_checkpoint, tmp_path):
    child = spawn_chat(small_context_checkpoint, "--max-tokens", "24", "--steps", "3", "--seed", "0")
    child.sendline("Hello world")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"generation: \d+ tokens")
    child.expect(r"tokens/forward")
    child.expect(">>> ")
    child.sendline("How are you today?")
    child.expect(">>> ")
    child.sendline(" ".join(["quick brown fox"] * 80))
    child.expect("prompt too long")
    child.expect(">>> ")
    transcript = tmp_path / "chat.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    roles = [m["role"] for m in json.loads(transcript.read_text())]
    assert roles == ["user", "assistant", "user", "assistant"]


def interrupt_reply(child, text):
    """Send a message; a second after the live view starts (rich hides the cursor), when the first
    denoising steps are done but not the first canvas, press Ctrl-C."""
    child.sendline(text)
    child.expect(r"\x1b\[\?25l")
    time.sleep(1.0)
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(">>> ")


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(hf_checkpoint, tmp_path):
    # Canvases of 256 under the full 48-step schedule: the first one takes long enough to be interrupted.
    child = spawn_chat(hf_checkpoint, "--max-tokens", "4000", "--canvas-length", "256", "--steps", "48", "--seed", "0")
    interrupt_reply(child, "Tell me a long story")
    child.sendline("/stats")
    child.expect("tokens/forward|no reply yet")
    child.expect(">>> ")
    interrupt_reply(child, "And another one")
    transcript = tmp_path / "chat.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads(transcript.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "And another one"
