"""Block-diffusion training: batches, corruption, the loss on a toy task, and `finetune` end to end."""

import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_diffgemma.command.cli import app
from mlx_diffgemma import load, sudoku
from mlx_diffgemma.train import (
    DataError,
    Example,
    TrainingArgs,
    corrupt,
    diffusion_loss,
    encode_example,
    make_batch,
    train,
)
from mlx_diffgemma.utils import CheckpointError, load_adapters, load_model

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, global_head_dim=16, num_global_key_value_heads=2, num_experts=4, top_k_experts=2,
            moe_intermediate_size=16, layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A tiny random model with the Sudoku tokenizer (digits), canvas of 8 tokens."""
    folder = sudoku.init_model(tmp_path_factory.mktemp("toy") / "model", n=9, seed=0, **TINY)
    config = json.loads((folder / "config.json").read_text())
    config["canvas_length"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def copy_examples(n: int, seed: int = 0) -> list[Example]:
    """Prompt: 6 random digits; completion: the same digits reversed (one canvas with EOS and pad)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        digits = rng.integers(1, 10, size=6).tolist()
        out.append(Example(sudoku.prompt_ids(digits), sudoku.completion_ids(digits[::-1])))
    return out


def test_make_batch_takes_one_block_after_its_clean_prefix():
    ex = Example([2, 5, 6], [10, 11, 12, 13, 14, 15])  # + EOS = 7 tokens: blocks [10..13], [14, 15, EOS, pad]
    seen = set()
    for seed in range(20):
        b = make_batch([ex], canvas=4, eos=1, pad=0, max_prefix=100, rng=np.random.default_rng(seed))
        prefix, target = b.prefix[0].tolist(), b.targets[0].tolist()
        if target == [10, 11, 12, 13]:
            assert prefix == [2, 5, 6]
        else:
            assert target == [14, 15, 1, 0] and prefix == [2, 5, 6, 10, 11, 12, 13]
        seen.add(tuple(target))
    assert len(seen) == 2


def test_make_batch_left_pads_prefixes_of_different_lengths():
    b = make_batch([Example([2, 5], [7]), Example([2, 5, 6, 8], [7])], 4, 1, 0, 100, np.random.default_rng(0))
    assert b.left_padding == [2, 0]
    assert b.prefix.tolist() == [[0, 0, 2, 5], [2, 5, 6, 8]]


def test_corruption_level_varies_per_row_and_spans_clean_to_noise():
    targets = mx.full((256, 512), 3)
    noisy = corrupt(targets, vocab_size=16, key=mx.random.key(0))
    changed = (noisy != targets).astype(mx.float32).mean(axis=1)
    # A uniform replacement keeps the token by chance 1/16 of the time: changed = t * 15/16.
    assert 0.0 <= changed.min().item() < 0.05 and 0.85 < changed.max().item() <= 15 / 16 + 0.02
    assert abs(changed.mean().item() - 0.5 * 15 / 16) < 0.05


def test_self_conditioning_rows_use_the_detached_prediction(toy_model):
    model = load_model(toy_model)
    b = make_batch(copy_examples(4), 8, 1, 0, 100, np.random.default_rng(0))
    plain = diffusion_loss(model, b, mx.random.key(0), self_conditioning=0.0).item()
    half = diffusion_loss(model, b, mx.random.key(0), self_conditioning=0.5).item()
    assert plain != pytest.approx(half, abs=1e-6)
    assert diffusion_loss(model, b, mx.random.key(0), self_conditioning=0.0).item() == pytest.approx(plain, abs=1e-6)


def test_training_loss_falls_on_a_toy_task(toy_model, tmp_path):
    model = load_model(toy_model)
    data = copy_examples(256)
    args = TrainingArgs(iters=60, batch_size=16, learning_rate=3e-3, warmup=5, steps_per_report=10,
                        steps_per_eval=60, val_batches=2, save_every=60)
    reports = list(train(model, data, copy_examples(32, seed=1), args, toy_model, tmp_path / "out", eos=1, pad=0))
    losses = [r.train_loss for r in reports if r.train_loss is not None]
    assert losses[-1] < 0.75 * losses[0], losses
    assert reports[-1].val_loss is not None and reports[-1].saved == tmp_path / "out"
    # A full-training checkpoint is a model folder that loads and gives the trained logits.
    reloaded, _ = load(tmp_path / "out")
    b = make_batch(data[:2], 8, 1, 0, 100, np.random.default_rng(0))
    for m in (model, reloaded):
        cache = m.make_cache()
        m.encode(b.prefix, cache)
        m._check = m.denoise(b.targets, cache)
    assert mx.allclose(model._check, reloaded._check, atol=1e-5)


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in examples))


def test_finetune_lora_end_to_end_adapters_load_fuse_and_resume(toy_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    pairs = [("".join(map(str, d)), "".join(map(str, d[::-1]))) for d in rng.integers(1, 10, size=(64, 6))]
    write_jsonl(data / "train.jsonl", pairs[:56])
    write_jsonl(data / "valid.jsonl", pairs[56:])
    out = tmp_path / "adapters"
    common = ["finetune", "--model", str(toy_model), "--data", str(data), "-o", str(out), "--lora", "--lora-rank", "4",
              "--batch-size", "4", "--save-every", "2", "--steps-per-eval", "2", "--val-batches", "1", "--learning-rate", "1e-2"]
    result = CliRunner().invoke(app, common + ["--iters", "2"])
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output or "val " in result.output
    assert {"adapters.safetensors", "adapter_config.json", "training_state.json"} <= {p.name for p in out.iterdir()}

    # Resuming continues from the saved step.
    result = CliRunner().invoke(app, common + ["--iters", "4", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training_state.json").read_text())["step"] == 4
    # Without --resume a non-empty output is refused.
    result = CliRunner().invoke(app, common + ["--iters", "4"])
    assert result.exit_code == 1 and "--resume" in result.output

    base, tok = load(toy_model)
    adapted, _ = load(toy_model, adapter_path=out)
    fused, _ = load(toy_model, adapter_path=out, fuse=True)
    ids = mx.array([tok.encode("123456")])
    canvas = mx.array([sudoku.completion_ids([6, 5, 4, 3, 2, 1]) + [1, 0]])
    logits = []
    for m in (base, adapted, fused):
        cache = m.make_cache()
        m.encode(ids, cache)
        logits.append(m.denoise(canvas, cache))
    assert not mx.allclose(logits[0], logits[1], atol=1e-4)  # the adapters change the model
    assert mx.allclose(logits[1], logits[2], atol=1e-4)  # and fusing them does not

    with pytest.raises(CheckpointError):
        load_adapters(load_model(toy_model), tmp_path)
    generate = ["generate", "--model", str(toy_model), "--raw", "123456", "--max-tokens", "8", "--seed", "0", "--steps", "4"]
    result = CliRunner().invoke(app, generate + ["--adapter-path", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, generate + ["--adapter-path", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "has no adapters" in result.output


def test_a_data_line_with_tools_and_enable_thinking_renders_them_through_the_chat_template():
    from pathlib import Path

    from fixtures.build_agent_model import WEATHER_TOOL

    _, tokenizer = load(Path(__file__).parent / "fixtures" / "agent_model")  # a Gemma-4-style template
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Let me check."}]
    plain = encode_example(tokenizer, {"messages": messages, "enable_thinking": False})
    agent = encode_example(tokenizer, {"messages": messages, "tools": [WEATHER_TOOL], "enable_thinking": True})
    chat = "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    assert tokenizer.decode(plain.prompt) == f"<bos>{chat}<|channel>thought\n<channel|>"  # thinking off: an empty thought
    assert tokenizer.decode(agent.prompt).startswith("<bos><|turn>system\n<|think|>\n<|tool>declaration:get_weather{")
    assert tokenizer.decode(agent.prompt).endswith(f"<tool|><turn|>\n{chat}")
    assert agent.completion == plain.completion == tokenizer.encode("Let me check.", add_special_tokens=False)


def agent_tokenizer():
    from pathlib import Path

    return load(Path(__file__).parent / "fixtures" / "agent_model")[1]  # a Gemma-4-style template


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_a_reply_with_tool_calls_is_trained_as_the_template_writes_the_call(enable_thinking):
    from fixtures.build_agent_model import WEATHER_TOOL

    tokenizer = agent_tokenizer()
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    record = {"messages": messages, "tools": [WEATHER_TOOL], "enable_thinking": enable_thinking}
    example = encode_example(tokenizer, record)
    assert tokenizer.decode(example.completion) == '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    assert example.completion[0] == tokenizer.convert_tokens_to_ids("<|tool_call>")  # the marker, not its characters
    assert tokenizer.decode(example.prompt).endswith("<|turn>model\n" + ("" if enable_thinking else "<|channel>thought\n<channel|>"))
    as_object = {**call, "function": {**call["function"], "arguments": {"city": "Paris"}}}
    same = encode_example(tokenizer, {**record, "messages": [messages[0], {**messages[1], "tool_calls": [as_object]}]})
    assert same == example  # OpenAI's JSON-string arguments and plain objects give the same tokens
    raw = {"role": "assistant", "content": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'}
    assert encode_example(tokenizer, {**record, "messages": [messages[0], raw]}) == example  # the raw form too
    # An earlier call in the history keeps its arguments too.
    answered = [*messages, {"role": "tool", "tool_call_id": "1", "name": "get_weather", "content": "21 C"},
                {"role": "assistant", "content": "It is 21 C."}]
    later = encode_example(tokenizer, {**record, "messages": answered})
    assert 'call:get_weather{city:<|"|>Paris<|"|>}' in tokenizer.decode(later.prompt)
    assert tokenizer.decode(later.completion) == "It is 21 C."


@pytest.mark.parametrize("reply, message", [
    ({"role": "assistant", "tool_calls": "get_weather"}, "'tool_calls' must be a list"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]},
     "arguments must be a JSON object"),
    ({"role": "assistant", "content": [{"type": "text", "text": "hi"}]}, "'content' must be a string"),
    ({"role": "assistant", "content": None}, "empty prompt or completion"),
])
def test_a_bad_assistant_reply_is_a_data_error_naming_it(reply, message):
    with pytest.raises(DataError, match=message):
        encode_example(agent_tokenizer(), {"messages": [{"role": "user", "content": "Hi"}, reply]})


@pytest.mark.parametrize("line, message", [
    ("not json", "train.jsonl:1"),
    (json.dumps({"text": "x"}), "'prompt' and 'completion'"),
    (json.dumps({"prompt": "12", "completion": "3", "tools": {"name": "f"}}), "'tools' must be a list"),
    (json.dumps({"prompt": "12", "completion": "3", "enable_thinking": "yes"}), "'enable_thinking' must be true or false"),
    (json.dumps({"prompt": "12", "completion": "3", "tools": []}), "'tools' need a chat template"),
    (json.dumps({"messages": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "3"}]}),
     "'messages' need a chat template"),
    (json.dumps({"messages": ["12", {"role": "assistant", "content": "3"}]}), "'messages' must be objects"),
    (json.dumps({"messages": [{"role": "assistant", "content": "3"}]}), "need a message before the assistant's"),
])
def test_finetune_rejects_bad_data_with_one_line(toy_model, tmp_path, line, message):
    (tmp_path / "train.jsonl").write_text(line + "\n")
    result = CliRunner().invoke(app, ["finetune", "--model", str(toy_model), "--data", str(tmp_path / "train.jsonl"),
                                      "-o", str(tmp_path / "out"), "--iters", "1"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(toy_model, tmp_path, monkeypatch):
    from pathlib import Path

    from mlx_diffgemma import train as training

    model = load_model(toy_model)
    args = TrainingArgs(iters=2, batch_size=4, lora=True, lora_rank=2, save_every=1, steps_per_eval=10)
    out = tmp_path / "adapters"
    list(train(model, copy_examples(8), None, args, toy_model, out, eos=1, pad=0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = Path.rename

    def interrupted(self, target):  # Ctrl-C just as the new checkpoint is moved into place
        if self.name.endswith(".saving"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(model, toy_model, out, args, 3, training.optim.AdamW(1e-3), [])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # no staging or backup folders left
