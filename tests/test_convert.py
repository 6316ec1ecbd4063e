"""Conversion to MLX format: round trips per recipe, the output layout, refusals and cleanup."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma.convert import RecipeError, convert
from mlx_diffgemma.convert.converter import ShardWriter
from mlx_diffgemma import load
from mlx_diffgemma.utils import CheckpointError, ConfigError, load_model

RECIPES = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(),
    "8-bit": dict(quantize=True, q_bits=8, q_group_size=32),
    "mixed_4_8": dict(recipe="mixed_4_8", q_group_size=32),
    "4-bit": dict(quantize=True, q_bits=4, q_group_size=32),
}


def logits(model, vocab):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        cache = model.make_cache()
        model.encode(mx.array(rng.integers(0, vocab, (1, 12))), cache)
        canvas = mx.array(rng.integers(0, vocab, (1, 16)))
        first = model.denoise(canvas, cache)
        out.append(np.array(model.denoise(canvas, cache, first)))
    return np.concatenate(out, axis=1)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_divergence(reference, approx):
    p, q = log_softmax(reference), log_softmax(approx)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def conversions(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return {name: convert(hf_checkpoint, out / name, progress=False, **kwargs) for name, kwargs in RECIPES.items()}


def test_round_trip_error_grows_as_precision_falls(hf_checkpoint, conversions, vocab_size):
    reference = logits(load_model(hf_checkpoint), vocab_size)
    kl, agree = {}, {}
    for name, path in conversions.items():
        approx = logits(load_model(path), vocab_size)
        kl[name] = kl_divergence(reference, approx)
        agree[name] = float(np.mean(approx.argmax(-1) == reference.argmax(-1)))
    print("\n".join(f"{name:>10}: top-1 agreement {agree[name]:.3f}, KL {kl[name]:.5f}" for name in RECIPES))
    assert kl["float32"] == 0.0 and agree["float32"] == 1.0
    assert kl["bfloat16"] < kl["8-bit"] < kl["mixed_4_8"] < kl["4-bit"] < 0.5
    assert agree["bfloat16"] >= 0.5


def test_output_has_the_mlx_layout(conversions, hf_checkpoint):
    path = conversions["mixed_4_8"]
    files = sorted(p.name for p in path.iterdir())
    for name in ("config.json", "model.safetensors.index.json", "README.md", "tokenizer.json", "generation_config.json"):
        assert name in files
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    config = json.loads((path / "config.json").read_text())
    assert "vision_config" not in config
    quant = config["quantization"]
    assert quant == config["quantization_config"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 32, "affine")
    assert quant["model.decoder.layers.1.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "model.decoder.layers.1.experts.gate_up_proj" not in quant  # at the defaults
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert not any("vision" in k for k in index["weight_map"])
    assert "vision tower" in (path / "README.md").read_text()
    model, tokenizer = load(path)
    assert model.layers[1].experts.gate_up_proj.bits == 4 and model.layers[1].self_attn.q_proj.bits == 8
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_output_shards_respect_the_size_limit(hf_checkpoint, tmp_path):
    out = convert(hf_checkpoint, tmp_path / "small-shards", progress=False, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    load_model(out)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(quantize=True, q_bits=7), RecipeError, "supports 2, 3, 4, 5, 6, 8 bits, not 7"),
        (dict(quantize=True, q_group_size=48), RecipeError, "group sizes 32, 64, 128, not 48"),
        (dict(quantize=True, q_mode="mxfp4", q_bits=8, q_group_size=32), RecipeError, "mxfp4 quantization supports 4 bits"),
        (dict(recipe="mixed_5_9"), RecipeError, "unknown recipe 'mixed_5_9'"),
        (dict(recipe="mixed_4_8", q_bits=3), RecipeError, "sets its own bits"),
        (dict(dtype="int8"), RecipeError, "unknown dtype 'int8'"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(hf_checkpoint, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        convert(hf_checkpoint, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refusals_name_the_problem(hf_checkpoint, conversions, tmp_path):
    with pytest.raises(CheckpointError, match="inside the input folder"):
        convert(hf_checkpoint, hf_checkpoint / "mlx", progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty; pass --force"):
        convert(hf_checkpoint, busy, progress=False)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="already quantized"):
        convert(conversions["4-bit"], tmp_path / "again", progress=False)
    wrong = copy(hf_checkpoint, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["model_type"] = "llama"
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        convert(wrong, tmp_path / "o1", progress=False)
    partial = copy(hf_checkpoint, tmp_path / "partial")
    next(partial.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        convert(partial, tmp_path / "o2", progress=False)
    assert not any(p.name.startswith(("o1", "o2", ".o1", ".o2")) for p in tmp_path.iterdir())


def test_interrupted_conversion_leaves_nothing_behind(hf_checkpoint, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ShardWriter.add

    def add_then_interrupt(self, name, value):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        original(self, name, value)

    monkeypatch.setattr(ShardWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_checkpoint, tmp_path / "out", progress=False, max_shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_conversion_keeps_the_old_output(hf_checkpoint, tmp_path, monkeypatch):
    out = convert(hf_checkpoint, tmp_path / "out", progress=False)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(ShardWriter, "finish", lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        convert(hf_checkpoint, out, progress=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    convert(hf_checkpoint, out, progress=False, force=True, quantize=True, q_group_size=32)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_cli_convert_errors_are_one_line(hf_checkpoint, tmp_path):
    cli = str(Path(__file__).parents[1] / "cli.py")
    result = subprocess.run([sys.executable, cli, "convert", "--hf-path", str(hf_checkpoint), "--mlx-path",
                             str(tmp_path / "o"), "-q", "--q-bits", "7"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: affine quantization supports 2, 3, 4, 5, 6, 8 bits, not 7"
