"""The mlx-diffgemma command: version, help text, one-line errors, defaults that fit the model."""

import json
import shutil
import socket
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from fixtures.build_agent_model import WEATHER_TOOL

import mlx_diffgemma
from mlx_diffgemma.command.cli import app
from mlx_diffgemma.convert import MODES, describe_mode

SUDOKU_MODEL = str(Path(mlx_diffgemma.__file__).parent / "sudoku_model")  # 512-token context, canvas 37, no chat template
COMMANDS = [[], ["generate"], ["infill"], ["chat"], ["bench"], ["serve"], ["convert"], ["finetune"], ["demo"], ["demo", "sudoku"]]
PLAIN = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=PLAIN)


def one_error_line(result) -> str:
    """The output of a command that failed as it should: exit status 1, one line, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"mlx-diffgemma {mlx_diffgemma.__version__}"


def test_help_text_has_no_flag_placeholders_or_markup():
    helps = {}
    for command in COMMANDS:
        result = invoke(*command, "--help")
        assert result.exit_code == 0, result.output
        helps[" ".join(command)] = " ".join(result.output.split())  # whitespace unwrapped
    for name, text in helps.items():
        assert "<bool>" not in text and "BOOLEAN" not in text and "``" not in text, name
    assert "--raw Send the prompt" in helps["generate"] and "--version Print the version" in helps[""]
    assert "pip install 'mlx-diffgemma[plot]'" in helps["bench"]
    assert "one trailing newline, as echo adds, is dropped" in helps["generate"]
    assert 'one JSON object per line: {"name": ..., "arguments": {...}}' in helps["generate"]
    assert all("--think / --no-think" in helps[c] and "--tools FILE" in helps[c] for c in ("generate", "chat"))
    assert "default: the checkpoint's own" in helps["convert"]
    assert all(describe_mode(mode) in helps["convert"] for mode in MODES)
    assert "--cors-origin" in helps["serve"] and "localhost" in helps["serve"]


def test_interrupted_messages_are_plain_like_the_rest(monkeypatch, tmp_path):
    import mlx_diffgemma.convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_diffgemma.convert, "convert", interrupted)
    result = CliRunner().invoke(app, ["convert", "--hf-path", "a", "--mlx-path", str(tmp_path / "b")], color=True)
    assert result.exit_code == 130
    assert result.output == "interrupted: nothing was written\n"  # no colour: not an error, as in finetune


def test_convert_leaves_unset_flags_to_the_library(monkeypatch, tmp_path, hf_checkpoint):
    import mlx_diffgemma.convert

    calls = []
    monkeypatch.setattr(mlx_diffgemma.convert, "convert", lambda *args, **kwargs: calls.append(kwargs) or Path("out"))
    assert invoke("convert", "--hf-path", "a", "--mlx-path", "b").exit_code == 0
    assert calls[0]["dtype"] is None and calls[0]["q_bits"] is None and calls[0]["q_group_size"] is None
    monkeypatch.undo()
    line = one_error_line(invoke("convert", "--hf-path", str(hf_checkpoint), "--mlx-path", str(tmp_path / "o"),
                                 "--q-group-size", "32"))
    assert line == "error: --q-group-size needs -q (or --recipe)"
    assert not (tmp_path / "o").exists()


def test_default_max_tokens_fit_the_context_and_a_given_one_that_does_not_is_refused():
    result = invoke("generate", "--model", SUDOKU_MODEL, "--raw", "--seed", "0", "--steps", "4", "123456")
    assert result.exit_code == 0, result.output  # 512 new tokens would not fit after the prompt: 481 do
    line = one_error_line(invoke("generate", "--model", SUDOKU_MODEL, "--raw", "--max-tokens", "600", "123456"))
    assert line == ("error: 7 prompt tokens leave room for 481 new tokens, not the 600 asked for in the model's context "
                    "of 512 tokens (filled in canvases of 37)")


@pytest.mark.parametrize("stdin, prompt_tokens", [("123456\n", 7), ("123456\n\n", 8), ("123456", 7)])
def test_raw_prompt_from_stdin_loses_one_trailing_newline(stdin, prompt_tokens):
    # The Sudoku tokenizer has one token per character, newline included, after <bos>.
    result = invoke("generate", "--model", SUDOKU_MODEL, "--raw", "--stats", "--max-tokens", "1", "--steps", "1", "--seed", "0",
                    "-", input=stdin)
    assert result.exit_code == 0, result.output
    assert f"prompt: {prompt_tokens} tokens," in result.output and "generation: 1 token," in result.output


def test_a_model_without_chat_template_says_so_in_one_line():
    line = one_error_line(invoke("generate", "--model", SUDOKU_MODEL, "123456"))
    assert "no chat template" in line and "--raw" in line
    line = one_error_line(invoke("chat", "--model", SUDOKU_MODEL, input="hello\n"))
    assert "no chat template" in line and "generate --raw" in line


def write_adapters(folder: Path, base_model: str, weights: bool = False) -> Path:
    """Adapters as finetune --lora writes them (untrained); without ``weights``, only their config."""
    from mlx.utils import tree_flatten

    from mlx_diffgemma import load
    from mlx_diffgemma.adapters import LORA_KEYS, apply_lora

    folder.mkdir()
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": list(LORA_KEYS)}
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora, "base_model": base_model}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights:
        model, _ = load(base_model)
        apply_lora(model, config["num_layers"], config["lora_parameters"])
        mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    return folder


def test_adapters_load_onto_their_recorded_base_model_unless_model_is_given(tmp_path):
    adapters = write_adapters(tmp_path / "sudoku-adapters", SUDOKU_MODEL, weights=True)
    result = invoke("generate", "--raw", "123456", "--max-tokens", "1", "--steps", "1", "--adapter-path", str(adapters))
    assert result.exit_code == 0, result.output
    missing_base = str(tmp_path / "base-that-was-moved")
    adapters = write_adapters(tmp_path / "adapters", missing_base)
    for command in (["generate", "--raw", "123456"], ["chat"], ["serve", "--port", "0"]):
        line = one_error_line(invoke(*command, "--adapter-path", str(adapters)))
        assert line.startswith(f"error: cannot load {missing_base}: "), line
    # An explicit --model wins: it loads, and the adapters (config only, no weights) are what fails.
    line = one_error_line(invoke("generate", "--raw", "123456", "--model", SUDOKU_MODEL, "--adapter-path", str(adapters)))
    assert line.startswith(f"error: cannot load {SUDOKU_MODEL}: ") and "has no adapters" in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["truncated shard", "malformed index"])
def damaged_checkpoint(request, hf_checkpoint, tmp_path_factory):
    """The tiny sharded checkpoint with one file damaged; yields the folder and the damaged file's name."""
    path = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(hf_checkpoint, path)
    if request.param == "truncated shard":
        victim = sorted(path.glob("model-*.safetensors"))[1]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim = path / "model.safetensors.index.json"
        victim.write_text("{not json")
    return path, victim.name


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "convert"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(damaged_checkpoint, command, tmp_path):
    path, victim = damaged_checkpoint
    args = {
        "generate": ["generate", "--model", str(path), "hello"],
        "chat": ["chat", "--model", str(path)],
        "serve": ["serve", "--model", str(path), "--port", str(free_port())],
        "convert": ["convert", "--hf-path", str(path), "--mlx-path", str(tmp_path / "out")],
    }[command]
    line = one_error_line(invoke(*args, input=""))
    assert victim in line


def test_serve_passes_cors_origins(monkeypatch):
    import mlx_diffgemma.server

    calls = []
    monkeypatch.setattr(mlx_diffgemma.server, "serve", lambda *args, **kwargs: calls.append(kwargs))
    port = str(free_port())
    assert invoke("serve", "--model", SUDOKU_MODEL, "--port", port).exit_code == 0
    result = invoke("serve", "--model", SUDOKU_MODEL, "--port", port, "--cors-origin", "https://a.example", "--cors-origin", "*")
    assert result.exit_code == 0, result.output
    assert [c["cors_origins"] for c in calls] == [None, ["https://a.example", "*"]]


def test_serve_on_a_busy_port_fails_before_loading_the_model(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(invoke("serve", "--model", str(tmp_path / "no-model-here"), "--port", str(port)))
    assert f"port {port}" in line and "in use" in line and "no-model-here" not in line


AGENT_MODEL = str(Path(__file__).parent / "fixtures" / "agent_model")  # a Gemma-4-style template: thinking, tools
WEATHER_TOOLS = [WEATHER_TOOL]  # the schema the agent fixture was trained with


@pytest.fixture
def scripted_reply(monkeypatch):
    """``generate`` gets a reply that thinks, answers and calls a tool; returns the prompts it was sent, decoded."""
    from mlx_diffgemma.generate import GenerationResponse

    prompts = []

    def scripted(model, tokenizer, ids, max_tokens=None, **options):
        prompts.append(tokenizer.decode(ids))
        base = dict(tokens=[], draft=None, step=None, prompt_tokens=len(ids), prompt_tps=1.0, cached_tokens=0,
                    generation_tokens=1, generation_tps=1.0)
        yield GenerationResponse(text="", reasoning="Two and ", **base)
        yield GenerationResponse(text="", reasoning="two.", **base)
        yield GenerationResponse(text="It is 4.", **base)
        yield GenerationResponse(text="", tool_calls=[{"name": "get_weather", "arguments": {"location": "Paris"}}],
                                 finish_reason="stop", **base)

    monkeypatch.setattr(mlx_diffgemma, "stream_generate", scripted)
    return prompts


def tools_file(tmp_path: Path, tools) -> str:
    path = tmp_path / "tools.json"
    path.write_text(tools if isinstance(tools, str) else json.dumps(tools))
    return str(path)


def test_generate_writes_reasoning_to_stderr_the_answer_to_stdout_then_tool_calls_as_json_lines(scripted_reply):
    result = invoke("generate", "--model", AGENT_MODEL, "What is 2+2?")
    assert result.exit_code == 0, result.output
    assert result.stdout == 'It is 4.\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n'
    assert result.stderr == "Two and two.\n"
    hidden = invoke("generate", "--model", AGENT_MODEL, "--hide-reasoning", "What is 2+2?")
    assert hidden.exit_code == 0 and hidden.stdout == result.stdout and hidden.stderr == ""


def test_generate_renders_system_think_and_tools_into_the_chat_template(scripted_reply, tmp_path):
    assert invoke("generate", "--model", AGENT_MODEL, "--think", "Hi").exit_code == 0
    result = invoke("generate", "--model", AGENT_MODEL, "--no-think", "--system", "Be brief.",
                    "--tools", tools_file(tmp_path, WEATHER_TOOLS), "Hi")
    assert result.exit_code == 0, result.output
    thinking, plain = scripted_reply
    assert "<|think|>" in thinking and "<|think|>" not in plain
    assert "Be brief." in plain and "get_weather" in plain and "The city name." in plain


@pytest.mark.parametrize("tools, message", [
    ("[not json", "--tools: Expecting value"),
    ({"type": "function"}, "must be a list"),
    ([{"name": "get_weather"}], 'must be {"type": "function", "function": {...}}'),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}], "not a valid JSON schema"),
])
def test_a_bad_tools_file_is_one_error_line(tmp_path, tools, message):
    for command in (["generate", "Hi"], ["chat"]):
        line = one_error_line(invoke(*command, "--model", AGENT_MODEL, "--tools", tools_file(tmp_path, tools)))
        assert message in line, line
    line = one_error_line(invoke("generate", "--model", AGENT_MODEL, "--tools", str(tmp_path / "missing.json"), "Hi"))
    assert line.startswith("error: --tools: ") and "missing.json" in line


def test_raw_refuses_the_flags_that_need_the_chat_template(tmp_path):
    line = one_error_line(invoke("generate", "--model", SUDOKU_MODEL, "--raw", "--system", "Be brief.", "--no-think", "1"))
    assert line == "error: --system, --think/--no-think need the chat template; leave out --raw"
    line = one_error_line(invoke("generate", "--model", SUDOKU_MODEL, "--raw", "--tools", tools_file(tmp_path, WEATHER_TOOLS), "1"))
    assert line == "error: --tools need the chat template; leave out --raw"


def test_generate_on_the_agent_model_thinks_on_stderr_and_prints_its_tool_call_on_stdout(tmp_path):
    result = invoke("generate", "--model", AGENT_MODEL, "--think", "--seed", "0", "--tools", tools_file(tmp_path, WEATHER_TOOLS),
                    "What is the weather in Paris?")
    assert result.exit_code == 0, result.output
    call = json.loads(result.stdout)  # no answer: the call alone
    assert call["name"] == "get_weather" and set(call["arguments"]) == {"location"}
    assert "get_weather" in result.stderr and "<|channel>" not in result.stderr + result.stdout


def sudoku_infill_files(tmp_path: Path, prefix: str, suffix: str) -> list[str]:
    (tmp_path / "prefix.txt").write_text(prefix)
    (tmp_path / "suffix.txt").write_text(suffix)
    return ["--prefix-file", str(tmp_path / "prefix.txt"), "--suffix-file", str(tmp_path / "suffix.txt")]


def test_infill_prints_the_middle_and_nothing_else_on_stdout_and_its_scores_on_stderr(tmp_path):
    import random

    from mlx_diffgemma import load, sudoku
    from mlx_diffgemma.infill import infill

    puzzle, solution = sudoku.generate_puzzle(14, random.Random(3), 6)
    prefix, suffix = "".join(map(str, puzzle)), "".join(map(str, solution[-10:]))  # the last 10 cells of the answer
    result = invoke("infill", "--model", SUDOKU_MODEL, *sudoku_infill_files(tmp_path, prefix, suffix),
                    "--seed", "0", "--steps", "6", "--stats")
    assert result.exit_code == 0, result.output
    model, tokenizer = load(SUDOKU_MODEL)
    expected = infill(model, tokenizer, prefix, suffix, seed=0, steps=6)
    assert result.stdout == expected.text and expected.text.isdigit()
    assert f"middle of {expected.length} tokens" in result.stderr and "26: " in result.stderr  # 36 - 10 cells fit
    capped = invoke("infill", "--model", SUDOKU_MODEL, *sudoku_infill_files(tmp_path, prefix, suffix), "--max-tokens", "5",
                    "--seed", "0", "--steps", "2")
    assert capped.exit_code == 0 and 1 <= len(capped.stdout) <= 5, capped.output


@pytest.mark.parametrize("prefix, suffix, message", [
    (None, "123", "error: --prefix-file: cannot read"),
    ("", "123", "is empty"),
    ("123", "", "error: --suffix-file: "),
    ("123", "1" * 40, "the suffix is too long: its 40 tokens (and 1 fixed around it) leave no room for a middle in a canvas of 37"),
])
def test_infill_refuses_a_missing_or_empty_file_or_a_suffix_longer_than_a_canvas_in_one_line(tmp_path, prefix, suffix, message):
    files = sudoku_infill_files(tmp_path, prefix or "", suffix)
    if prefix is None:
        (tmp_path / "prefix.txt").unlink()
    line = one_error_line(invoke("infill", "--model", SUDOKU_MODEL, *files))
    assert message in line, line
