"""Chat: reply display, cache reuse across turns, and the real terminal REPL in a pseudo-terminal."""

import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pexpect
import pytest

from rich.console import Console

from fixtures.build_agent_model import WEATHER_TOOL

from mlx_diffgemma import generate, load
from mlx_diffgemma.chat import ChatSession
from mlx_diffgemma.reply import Reply
from mlx_diffgemma.repl import format_call, render

CLI = str(Path(__file__).parents[1] / "cli.py")
AGENT_MODEL = Path(__file__).parent / "fixtures" / "agent_model"
FAST = dict(max_tokens=24, steps=3)
WEATHER_TOOLS = [WEATHER_TOOL]  # the schema the agent fixture was trained with


def shown(*renderables) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    for r in renderables:
        console.print(r)
    return console.file.getvalue()


def test_reasoning_streams_in_full_then_collapses_to_one_line_when_the_answer_starts():
    thinking = shown(render(Reply(reasoning="Let me add two and two.")))
    assert thinking.strip() == "Let me add two and two."
    answering = shown(render(Reply(answer="It is 4.", reasoning="Let me add two and two.")))
    assert answering.splitlines() == ["thought for 6 words", "It is 4."]


def test_tool_calls_read_as_calls_and_the_draft_shows_only_what_is_new():
    call = {"name": "get_weather", "arguments": {"location": "Paris", "days": 2, "units": None}}
    assert format_call(call) == 'get_weather(location="Paris", days=2, units=null)'
    out = shown(render(Reply(reasoning="Weather, so a call.", tool_calls=[call])))
    assert out.splitlines() == ["thought for 4 words", '→ get_weather(location="Paris", days=2, units=null)']
    assert shown(render(Reply(answer="Hi"), draft=Reply(answer="Hi there"))).splitlines() == ["Hi", " there"]
    assert shown(render(Reply(reasoning="Hm"), draft=Reply(reasoning="Hm, so"))).splitlines() == ["Hm", ", so"]


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


def test_model_output_cannot_drive_the_terminal():
    answer = "Hi\x1b[2J\rthere\x08\x9b!\n\tok"
    reply = Reply(answer=answer, reasoning="hm\x1b]0;x\x07", tool_calls=[{"name": "f", "arguments": {"a": "\x1b[31m"}}])
    out = shown(render(reply, draft=Reply(answer=answer + "more\x1b[H\x00")), render(Reply(reasoning="hm\x1b]0;x\x07")))
    assert not any(c in out for c in "\x1b\x07\r\x08\x9b\x00")
    assert "Hi\\x1b[2J\\rthere\\x08\\x9b!\n" in out and "more\\x1b[H\\x00" in out  # newlines kept (tabs: rich expands them)
    assert "hm\\x1b]0;x\\x07" in out


def test_chat_repl_turns_stats_reset_context_full_commands_and_ctrl_d(small_context_checkpoint, tmp_path):
    child = spawn_chat(small_context_checkpoint, "--max-tokens", "24", "--steps", "3", "--seed", "0")
    child.sendline("/bogus")
    child.expect("error: unknown command /bogus; /help lists the commands")
    child.expect(">>> ")
    child.sendline("/help")
    child.expect("/save <file>")
    child.expect(">>> ")
    child.sendline("/system Be brief.")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'system.json'}")
    child.expect("saved 1 message to")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'no-such-folder' / 'x.json'}")
    child.expect("error: cannot save: ")
    child.expect(">>> ")
    child.sendline("/system")
    child.expect(">>> ")
    child.sendline("Hello world")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"generation: \d+ tokens?,")
    child.expect(r"tokens/forward")
    child.expect(">>> ")
    child.sendline("How are you today?")
    child.expect(">>> ")
    child.sendline(" ".join(["quick brown fox"] * 80))
    child.expect("error: the context is full: .* /reset starts a new conversation")
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


def test_default_max_tokens_fit_each_turn_until_the_context_is_full(small_context_checkpoint):
    # 200 tokens of context, canvases of 16: the default 512 fits no turn, but each turn gets what is left.
    child = spawn_chat(small_context_checkpoint, "--steps", "2", "--seed", "0", "--no-draft")
    for _ in range(20):
        child.sendline("Hello world")
        if child.expect([">>> ", "the context is full"]) == 1:
            break
        child.sendline("/stats")
        child.expect(r"generation: \d+ tokens?,")
        child.expect(">>> ")
    else:
        pytest.fail("the context never filled")
    child.expect("/reset starts a new conversation")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(">>> ")
    child.sendline("Hello world")
    child.expect(">>> ")
    assert "error" not in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_a_failed_load_clears_the_spinner_before_the_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    child = pexpect.spawn(sys.executable, [CLI, "chat", "-m", str(tmp_path)], encoding="utf-8", timeout=120,
                          dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert child.exitstatus == 1
    # The spinner's last frame is drawn and erased (cursor up, erase line) before the error is written.
    assert out.rindex("Loading") < out.rindex("\x1b[2K") < out.index("error: cannot load")
    assert re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).strip().splitlines()[-1].startswith("error: cannot load")


# A chat REPL whose replies are scripted from the prompt the session renders (the agent fixture's
# template: thinking on puts <|think|> in the system turn), so that the display of reasoning and
# tool calls is tested without a model that writes them on cue.
SCRIPTED_CHAT = """
import sys
from rich.console import Console
from mlx_diffgemma import load
from mlx_diffgemma.generate import GenerationResponse
from mlx_diffgemma.repl import run_chat

def update(**fields):
    return GenerationResponse(**{"text": "", "tokens": [], "draft": None, "step": None, "prompt_tokens": 1,
                                 "prompt_tps": 1.0, "cached_tokens": 0, "generation_tokens": 1, "generation_tps": 1.0,
                                 "finish_reason": None, **fields})

def scripted(model, tokenizer, ids, prompt_cache=None, **options):
    prompt = tokenizer.decode(ids)
    last_user_turn = prompt[prompt.rfind("<|turn>user"):]
    if "<|think|>" in prompt:
        yield update(reasoning="The user asked something, ")
        yield update(reasoning="so I answer.")
    if prompt.endswith("<tool_response|>"):
        temperature = prompt[prompt.rfind("temperature"):].split(":")[1].split("}")[0].strip()
        yield update(text=f"It is {temperature} degrees.", finish_reason="stop")
    elif "weather" in last_user_turn:
        yield update(tool_calls=[{"name": "get_weather", "arguments": {"location": "Paris"}}], finish_reason="stop")
    else:
        yield update(text="Hello there.", finish_reason="stop")

model, tokenizer = load(sys.argv[1])
run_chat(model, tokenizer, system=None, draft=False, console=Console(highlight=False), generator=scripted,
         enable_thinking={"on": True, "off": False}[sys.argv[2]])
"""


def spawn_scripted_chat(thinking: str):
    child = pexpect.spawn(sys.executable, ["-c", SCRIPTED_CHAT, str(AGENT_MODEL), thinking], encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(40, 120))
    child.expect(">>> ")
    return child


def test_think_command_toggles_thinking_and_the_reasoning_collapses_once_the_answer_starts():
    child = spawn_scripted_chat("off")
    child.sendline("Hi")
    child.expect("Hello there.")
    child.expect(">>> ")
    assert "thought for" not in child.before
    child.sendline("/think")
    child.expect("thinking on for the next turns")
    child.expect(">>> ")
    child.sendline("Hi again")
    child.expect("thought for 7 words")
    child.expect("Hello there.")
    child.expect(">>> ")
    child.sendline("/think")
    child.expect("thinking off for the next turns")
    child.expect(">>> ")
    child.sendline("/help")
    child.expect("/tool-result <json>")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_tool_result_answers_the_call_shown_and_is_refused_without_one(tmp_path):
    child = spawn_scripted_chat("on")
    child.sendline('/tool-result {"temperature": 21}')
    child.expect("error: the last reply made no tool call")
    child.expect(">>> ")
    child.sendline("What is the weather in Paris?")
    child.expect("thought for 7 words")
    child.expect(r'→ get_weather\(location="Paris"\)')
    child.expect(">>> ")
    child.sendline("/tool-result {temperature: 21}")
    child.expect("error: /tool-result needs JSON")
    child.expect(">>> ")
    child.sendline('/tool-result {"temperature": 21}')
    child.expect("It is 21 degrees.")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'chat.json'}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    child.sendline('/tool-result {"temperature": 22}')
    child.expect("error: the last reply made no tool call")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    messages = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]
    assert messages[2] == {"role": "tool", "content": '{"temperature": 21}', "name": "get_weather"}


def test_chat_with_tools_on_the_agent_model_shows_its_call_and_answers_a_tool_result(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(WEATHER_TOOLS))
    child = spawn_chat(AGENT_MODEL, "--tools", str(tools), "--think", "--seed", "0", "--no-draft")
    child.sendline("What is the weather in Paris?")
    child.expect(r"thought for \d+ words")
    child.expect(r'→ get_weather\(location="\w+"\)')
    child.expect(">>> ")
    child.sendline('/tool-result {"temperature": 21}')
    child.expect(">>> ")
    assert "error" not in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
