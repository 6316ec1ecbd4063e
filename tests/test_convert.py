"""Conversion to MLX format: round trips per recipe, the output layout, refusals and cleanup."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import save_checkpoint

from mlx_diffgemma.convert import MODES, RecipeError, convert
from mlx_diffgemma.convert.converter import ShardWriter
from mlx_diffgemma import load
from mlx_diffgemma.utils import CheckpointError, ConfigError, load_model

RECIPES = {
    "float32": dict(),
    "bfloat16": dict(dtype="bfloat16"),
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
    assert config["vision_config"] == json.loads((hf_checkpoint / "config.json").read_text())["vision_config"]
    quant = config["quantization"]
    assert quant == config["quantization_config"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 32, "affine")
    assert quant["model.decoder.layers.1.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "model.decoder.layers.1.experts.gate_up_proj" not in quant  # at the defaults
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.encoder.vision_tower.") for k in index["weight_map"])
    assert "Vision tower included" in (path / "README.md").read_text()
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
        (dict(quantize=True, q_bits=7), RecipeError, r"affine at 7 bits with group size 64; affine takes bits 1, 2, 3, 4, 5, 6 or 8"),
        (dict(quantize=True, q_group_size=48), RecipeError, r"group size 48; .* and group size 32, 64 or 128 \(default 64\)$"),
        (dict(quantize=True, q_mode="mxfp4", q_bits=8), RecipeError, "mxfp4 at 8 bits with group size 32; mxfp4 takes bits 4 and group size 32$"),
        (dict(quantize=True, q_mode="nvfp4", q_group_size=32), RecipeError, "nvfp4 takes bits 4 and group size 16$"),
        (dict(recipe="mixed_4_8", q_mode="mxfp8"), RecipeError, "mxfp8 at 4 bits with group size 32; mxfp8 takes bits 8"),
        (dict(quantize=True, q_mode="int4"), RecipeError, "unknown quantization mode 'int4'"),
        (dict(recipe="mixed_5_9"), RecipeError, "unknown recipe 'mixed_5_9'"),
        (dict(recipe="mixed_4_8", q_bits=3), RecipeError, "sets its own bits"),
        (dict(dtype="int8"), RecipeError, "unknown dtype 'int8'"),
        (dict(q_bits=4), RecipeError, r"^--q-bits needs -q \(or --recipe\)$"),
        (dict(q_group_size=32), RecipeError, r"^--q-group-size needs -q \(or --recipe\)$"),
        (dict(q_mode="mxfp4"), RecipeError, r"^--q-mode needs -q \(or --recipe\)$"),
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
    assert result.stderr.strip() == ("error: MLX cannot quantize affine at 7 bits with group size 64; affine takes bits "
                                     "1, 2, 3, 4, 5, 6 or 8 (default 4) and group size 32, 64 or 128 (default 64)")



def saved_tensors(path):
    return {k: v for f in sorted(path.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}


def float_dtypes(path):
    return {v.dtype for v in saved_tensors(path).values() if mx.issubdtype(v.dtype, mx.floating)}


def edit_copy(src, dst, tensor_dtype=None, drop=(), **config):
    """A copy of a checkpoint with its tensors cast to ``tensor_dtype`` and its config edited."""
    copy(src, dst)
    if tensor_dtype is not None:
        for f in dst.glob("model*.safetensors"):
            tensors = {k: v.astype(tensor_dtype) for k, v in mx.load(str(f)).items()}
            mx.save_safetensors(str(f), tensors, metadata={"format": "pt"})
    old = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**{k: v for k, v in old.items() if k not in drop}, **config}))
    return dst


def test_default_dtype_is_the_checkpoints_own(hf_checkpoint, tmp_path):
    assert json.loads((hf_checkpoint / "config.json").read_text())["dtype"] == "float32"
    out = convert(hf_checkpoint, tmp_path / "default", progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert float_dtypes(out) == {mx.float32}
    # Quantized: the scales and biases keep the checkpoint's precision too.
    out = convert(hf_checkpoint, tmp_path / "8-bit", progress=False, quantize=True, q_bits=8)
    assert float_dtypes(out) == {mx.float32}
    # Older configs call it torch_dtype; the config is trusted over the tensors, as in mlx-lm.
    older = edit_copy(hf_checkpoint, tmp_path / "older", drop=("dtype",), torch_dtype="bfloat16")
    out = convert(older, tmp_path / "from-torch-dtype", progress=False)
    assert float_dtypes(out) == {mx.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    # No dtype in the config: that of the tensors.
    half = edit_copy(hf_checkpoint, tmp_path / "half", tensor_dtype=mx.float16, drop=("dtype",))
    out = convert(half, tmp_path / "from-tensors", progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert float_dtypes(out) == {mx.float16}
    # An explicit dtype still wins.
    out = convert(half, tmp_path / "explicit", progress=False, dtype="bfloat16")
    assert float_dtypes(out) == {mx.bfloat16}


def test_modes_table_is_what_mlx_accepts():
    w = mx.random.normal((8, 256))
    for mode, spec in MODES.items():
        accepted = set()
        for bits in range(1, 9):
            for group_size in (16, 32, 64, 128):
                try:
                    mx.eval(mx.quantize(w, group_size, bits, mode=mode))
                    accepted.add((bits, group_size))
                except ValueError:
                    pass
        assert accepted == {(b, g) for b in spec.bits for g in spec.group_sizes}, mode
        default = mx.quantize(w, mode=mode)
        explicit = mx.quantize(w, spec.default_group_size, spec.default_bits, mode=mode)
        assert [a.shape for a in default] == [a.shape for a in explicit], mode


@pytest.mark.parametrize("mode, bits, group_size", [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
def test_float_modes_pick_their_own_bits_and_group_size(hf_checkpoint, tmp_path, mode, bits, group_size):
    out = convert(hf_checkpoint, tmp_path / mode, progress=False, quantize=True, q_mode=mode)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (bits, group_size, mode)
    model = load_model(out)
    assert model.layers[1].experts.gate_up_proj.mode == mode
    assert np.isfinite(logits(model, model.args.vocab_size)).all()


def test_mixed_recipe_in_a_float_mode(hf_checkpoint, tmp_path):
    out = convert(hf_checkpoint, tmp_path / "mixed", progress=False, recipe="mixed_4_8", q_mode="mxfp4")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 32, "mxfp4")
    assert quant["model.decoder.layers.1.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    load_model(out)


def card(path):
    return (path / "README.md").read_text()


def test_model_card_states_overrides_and_unquantized_modules(hf_checkpoint, conversions, tmp_path):
    # Uniform at group size 32: every module quantized, nothing overridden.
    assert "4-bit affine (group size 32); scales, biases and the unquantized tensors in float32" in card(conversions["4-bit"])
    assert "overrides" not in card(conversions["4-bit"]) and "unquantized, " not in card(conversions["4-bit"])
    assert "Weights: bfloat16, not quantized." in card(conversions["bfloat16"])
    mixed = card(conversions["mixed_4_8"])
    assert "recipe mixed_4_8" in mixed
    assert "Per-module overrides (listed in config.json): 8-bit affine (group size 64) for 31 modules." in mixed
    # The tiny experts' down projection takes 32 inputs: no groups of 64.
    out = convert(hf_checkpoint, tmp_path / "group-64", progress=False, quantize=True)
    assert ("Left unquantized, their input size not a multiple of the group size: "
            "`model.decoder.layers.*.experts.down_proj` (4 modules).") in card(out)
    assert "overrides" not in card(out)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant == {"group_size": 64, "bits": 4, "mode": "affine"}
    model = load_model(out)
    assert not hasattr(model.layers[0].experts.down_proj, "scales") and model.layers[0].experts.gate_up_proj.bits == 4


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def header_end(path):
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def text_shard(folder):
    """The shard holding layer 1's attention: text weights, so conversion must read it."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / next(f for k, f in index["weight_map"].items() if "layers.1.self_attn.q_proj" in k)


@pytest.mark.parametrize(
    "damage, names",
    [
        (lambda src: cut(text_shard(src), 40), "text shard"),  # inside the JSON header
        (lambda src: cut(text_shard(src), header_end(text_shard(src)) + 10), "text shard"),  # header whole, data cut
        (lambda src: cut(src / "model.safetensors.index.json", 100), "model.safetensors.index.json"),
        (lambda src: (src / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'), "model.safetensors.index.json"),
    ],
    ids=["header-cut", "data-cut", "index-cut", "index-malformed"],
)
def test_damaged_source_is_a_one_line_error_and_leaves_nothing(hf_checkpoint, tmp_path, damage, names):
    src = copy(hf_checkpoint, tmp_path / "src")
    name = text_shard(src).name if names == "text shard" else names
    damage(src)
    with pytest.raises(CheckpointError) as error:
        convert(src, tmp_path / "new" / "out", progress=False)
    assert name in str(error.value) and "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_data_cut_short_after_the_header_was_read(hf_checkpoint, tmp_path, monkeypatch):
    """A shard whose data goes missing after its header was read (a download still being
    written, a disk error) fails only when the tensor is evaluated, mid-conversion."""
    from mlx_diffgemma.convert import converter

    src = copy(hf_checkpoint, tmp_path / "src")
    victim = text_shard(src)
    whole = victim.read_bytes()
    real_load = converter.load_safetensors

    def load_then_cut(path):
        victim.write_bytes(whole)  # the header always reads fine ...
        tensors = real_load(path)
        cut(victim, header_end(victim))  # ... and then the data is gone
        return tensors

    monkeypatch.setattr(converter, "load_safetensors", load_then_cut)
    with pytest.raises(CheckpointError, match=f"^cannot read {victim}: .*download it again$") as error:
        convert(src, tmp_path / "new" / "out", progress=False, max_shard_bytes=50_000)
    assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


# The tower: our conversions keep it as mlx-vlm's do, and each runtime reads the other's folders.

SOFT_TOKENS = 70  # the fewest the reference processor allows per image


@pytest.fixture(scope="module")
def vision_checkpoint(reference_model, tokenizer_dir, tmp_path_factory):
    """The tiny checkpoint with its config written as the hub's (mlx-vlm reads the full-attention
    shape only from ``global_head_dim``), image token ids inside the tiny vocabulary and a processor
    config with few soft tokens per image."""
    from transformers import AutoTokenizer

    out = save_checkpoint(reference_model, tokenizer_dir, tmp_path_factory.mktemp("hf-vision"), max_shard_size="60KB",
                          real_style=True)
    ids = AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids(["<unused6>", "<unused7>", "<unused8>"])
    config = json.loads((out / "config.json").read_text())
    config.update(zip(("boi_token_id", "image_token_id", "eoi_token_id"), ids))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": SOFT_TOKENS}}))
    return out


@pytest.fixture(scope="module")
def ours_4bit(vision_checkpoint, tmp_path_factory):
    return convert(vision_checkpoint, tmp_path_factory.mktemp("ours") / "4bit", quantize=True, q_bits=4, q_group_size=32,
                   progress=False)


@pytest.fixture(scope="module")
def community_4bit(vision_checkpoint, tmp_path_factory):
    """A conversion by mlx-vlm 0.7.10 itself: the layout of the published 4-bit conversions."""
    from mlx_vlm.convert import convert as mlx_vlm_convert

    out = tmp_path_factory.mktemp("community") / "4bit"
    mlx_vlm_convert(str(vision_checkpoint), mlx_path=str(out), quantize=True)
    return out


def peer_logits(peer, ids, canvas):
    """mlx-vlm's denoiser logits, without and with self-conditioning on the first pass."""
    cache = peer.diffusion_prefill_cache(ids, cache=peer.make_cache())
    masks = peer.diffusion_decoder_masks(canvas, cache, None)
    first = peer.diffusion_decoder_logits(canvas, cache=cache, decoder_attention_mask=masks)
    conditioning = peer.diffusion_self_conditioning(first, peer.diffusion_prepare_self_conditioning())
    second = peer.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=conditioning, decoder_attention_mask=masks)
    return np.array(first.astype(mx.float32)), np.array(second.astype(mx.float32))


def test_mlx_vlm_loads_our_4bit_conversion_and_its_text_logits_match_ours(ours_4bit, vocab_size):
    import mlx.nn as nn
    from mlx_vlm.utils import load_model as load_peer

    config = json.loads((ours_4bit / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == 16 and config["quantization"]["bits"] == 4
    peer = load_peer(ours_4bit)  # strict: every parameter, the tower's included
    assert isinstance(peer.model.decoder.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert peer.model.decoder.layers[0].self_attn.q_proj.bits == 4
    ours = load_model(ours_4bit)
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(2):
        ids, canvas = mx.array(rng.integers(3, vocab_size, (1, 12))), mx.array(rng.integers(3, vocab_size, (1, 16)))
        cache = ours.make_cache()
        ours.encode(ids, cache)
        first = ours.denoise(canvas, cache)
        second = ours.denoise(canvas, cache, first)
        peer_first, peer_second = peer_logits(peer, ids, canvas)
        errors += [np.abs(np.array(first) - peer_first).max(), np.abs(np.array(second) - peer_second).max()]
    print(f"largest logit difference from mlx-vlm: {max(errors):.2e}")
    assert max(errors) < 1e-3


def test_our_mixed_4_8_conversion_has_the_community_layout(vision_checkpoint, community_4bit, tmp_path):
    ours = convert(vision_checkpoint, tmp_path / "mixed", recipe="mixed_4_8", progress=False)

    def layout(folder):
        config = json.loads((folder / "config.json").read_text())
        quantization = {k: {"mode": "affine", **v} if isinstance(v, dict) else v for k, v in config["quantization"].items()}
        return {k: (v.shape, v.dtype) for k, v in saved_tensors(folder).items()}, quantization, config["vision_config"]

    tensors, quantization, vision_config = layout(ours)
    assert any(k.startswith("model.encoder.vision_tower.") for k in tensors)
    assert (tensors, quantization, vision_config) == layout(community_4bit)


def test_the_tower_is_kept_unquantized_and_named_as_in_the_source(vision_checkpoint, ours_4bit):
    source = {k: v for k, v in saved_tensors(vision_checkpoint).items() if "vision" in k}
    kept = {k: v for k, v in saved_tensors(ours_4bit).items() if "vision" in k}
    assert sorted(kept) == sorted(source) and all(mx.array_equal(kept[k], source[k]) for k in source)


@pytest.mark.parametrize("folder", ["ours_4bit", "community_4bit"])
def test_a_conversion_with_a_tower_takes_an_image(vision_checkpoint, folder, request):
    from PIL import Image

    from mlx_diffgemma.vision import attach_images

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    original = load_model(vision_checkpoint)
    converted = load_model(request.getfixturevalue(folder))
    assert converted.vision is not None and converted.vision.tower is None  # the tower stays on disk until an image
    assert converted.vision.processor.max_soft_tokens == SOFT_TOKENS  # processor_config.json came along
    prompt = [2, 20, converted.args.image_token_id, 21]
    ids, features = attach_images(converted, [prompt], [[image]])
    _, expected = attach_images(original, [prompt], [[image]])
    assert features.shape[0] == ids[0].count(converted.args.image_token_id) > 1
    assert np.abs(np.array(features) - np.array(expected)).max() < 1e-5  # the tower is not quantized
    cache = converted.make_cache()
    converted.encode(mx.array(ids), cache, image_features=features)
    assert np.isfinite(np.array(converted.denoise(mx.array([[5] * 16]), cache))).all()


def test_the_model_card_says_the_tower_is_included(ours_4bit, conversions):
    assert "Vision tower included, in float32 (not quantized" in card(ours_4bit)
    assert "Text only" not in card(ours_4bit)
    assert "Vision tower included" in card(conversions["4-bit"])


def test_a_source_without_a_vision_config_converts_text_only(hf_checkpoint, tmp_path):
    source = edit_copy(hf_checkpoint, tmp_path / "no-vision-config", drop=("vision_config",))
    out = convert(source, tmp_path / "text-only", progress=False, quantize=True, q_group_size=32)
    assert not any("vision" in k for k in saved_tensors(out))
    assert "vision_config" not in json.loads((out / "config.json").read_text())
    assert "Text only: the source checkpoint has no vision tower." in card(out)
    assert load_model(out).vision is None
