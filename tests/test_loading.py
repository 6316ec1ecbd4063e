"""Loading: HF and MLX layouts, hub ids, tokenizer, and the errors a user sees."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import quantize_model, save_config, save_model

import mlx_diffgemma
from mlx_diffgemma.utils import CheckpointError, ConfigError, load, load_model


def logits(model, seed=0):
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, 300, (1, 10))), cache)
    canvas = mx.array(rng.integers(0, 300, (1, 16)))
    first = model.denoise(canvas, cache)
    return np.array(model.denoise(canvas, cache, first))


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def save_mlx_layout(model, src, dst, quantize: bool):
    """Write what mlx-community conversions hold: MLX key names, a quantization block with
    per-module overrides, tokenizer files beside. Returns the saved (quantized) model."""
    config = json.loads((src / "config.json").read_text())
    if quantize:
        model, config = quantize_model(model, config, group_size=32, bits=4, quant_predicate=model.quant_predicate)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja" or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
    return model


def test_load_returns_model_and_tokenizer_with_chat_template(hf_checkpoint):
    model, tokenizer = mlx_diffgemma.load(str(hf_checkpoint))
    assert isinstance(model, mlx_diffgemma.Model)
    assert sorted(tokenizer.eos_token_ids) == [1, 106]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello world"}], add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert text.startswith("<bos><|turn>user\nHello world<turn|>\n") and text.endswith("<|turn>model\n")


def test_hub_id_is_fetched_with_snapshot_download(hf_checkpoint, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(hf_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load("google/diffusiongemma-tiny")
    assert calls and calls[0][0] == "google/diffusiongemma-tiny"
    assert "*.safetensors" in calls[0][1] and "*.json" in calls[0][1]
    assert model.args.num_hidden_layers == 4


def test_hf_vision_tower_weights_are_ignored(hf_checkpoint):
    index = json.loads((hf_checkpoint / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.encoder.vision_tower.") for k in index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded, as the hub checkpoint
    load_model(hf_checkpoint)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        load_model(path)


def test_wrong_model_type_is_named(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma3"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'gemma3'.*expected 'diffusion_gemma'"):
        load_model(path)


def rewrite_shard_with(path, key, transform):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][key]
    tensors = mx.load(str(shard))
    value = transform(tensors.pop(key))
    if value is not None:
        tensors[key] = value
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    key = "model.decoder.layers.2.self_attn.q_proj.weight"
    rewrite_shard_with(path, key, lambda v: None)
    with pytest.raises(CheckpointError, match="1 missing tensor.*layers.2.self_attn.q_proj.weight"):
        load_model(path)


def test_misshapen_tensor_is_named(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    key = "model.decoder.layers.1.mlp.up_proj.weight"
    rewrite_shard_with(path, key, lambda v: v[:-1])
    with pytest.raises(CheckpointError, match=r"wrong shape.*layers.1.mlp.up_proj.weight \(127, 64\) != \(128, 64\)"):
        load_model(path)


def test_inconsistent_config_is_named(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["layer_types"] = ["sliding_attention", "full_attention"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="layer_types has 2 entries for 4 layers"):
        load_model(path)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_mlx_layout_round_trips_exactly(hf_checkpoint, tmp_path):
    model = load_model(hf_checkpoint)
    save_mlx_layout(load_model(hf_checkpoint), hf_checkpoint, tmp_path / "mlx", quantize=False)
    assert np.array_equal(logits(load_model(tmp_path / "mlx")), logits(model))


def test_quantized_community_layout_loads_with_per_module_bits(hf_checkpoint, tmp_path):
    path = tmp_path / "mlx-4bit"
    in_memory = save_mlx_layout(load_model(hf_checkpoint), hf_checkpoint, path, quantize=True)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.decoder.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8}
    loaded, _ = load(path)
    layer = loaded.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 8
    assert layer.experts.gate_up_proj.bits == 4 and layer.experts.gate_up_proj.group_size == 32
    assert isinstance(loaded.model.decoder.embed_tokens, nn.QuantizedEmbedding)
    # Self-conditioning multiplies by the quantized embedding table: exercised by logits().
    assert np.array_equal(logits(loaded), logits(in_memory))


def test_an_unreachable_hub_id_is_one_line_that_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as error:
        load("someone/not-downloaded-model")
    message = str(error.value)
    assert "\n" not in message and len(message) < 250
    assert "not in the local cache" in message and "local model folder" in message and "demo sudoku" in message


def test_a_truncated_shard_names_the_file(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=f"cannot read .*{shard.name}: .*incomplete download"):
        load_model(path)


@pytest.mark.parametrize("index", ["{not json", "[]", '{"metadata": {}}', '{"weight_map": {"a": 3}}'])
def test_a_malformed_shard_index_names_the_file(hf_checkpoint, tmp_path, index):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(path)


def test_a_damaged_tokenizer_or_generation_config_names_the_file(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path / "ckpt")
    (path / "generation_config.json").write_text('{"eos_token_id": [1,')
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        load(path)
    (path / "generation_config.json").unlink()
    (path / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read the tokenizer"):
        load(path)
