"""Our encoder + denoiser logits against the transformers reference, on a tiny random model."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import build_reference_model, save_checkpoint
from transformers.cache_utils import DynamicCache

from mlx_diffgemma.utils import load_model

TOL = 1e-3


def reference_logits(ref, prompt: np.ndarray, committed: list[np.ndarray], canvas: np.ndarray, sc_steps: int = 1):
    """Reference logits for ``canvas`` after ``prompt`` and committed canvases; one entry per denoising step."""
    cache = DynamicCache(config=ref.config.text_config)
    out, sc = [], None
    with torch.no_grad():
        for ids in [prompt, *committed]:
            ref.model.encoder(input_ids=torch.tensor(ids), past_key_values=cache)
        for _ in range(sc_steps):
            logits = ref(past_key_values=cache, decoder_input_ids=torch.tensor(canvas), self_conditioning_logits=sc).logits
            out.append(logits.numpy())
            sc = logits
    return out


def our_logits(model, prompt, committed, canvas, sc_steps: int = 1):
    cache = model.make_cache()
    for ids in [prompt, *committed]:
        model.encode(mx.array(ids), cache)
    out, sc = [], None
    for _ in range(sc_steps):
        sc = model.denoise(mx.array(canvas), cache, sc)
        out.append(np.array(sc))
    return out


def random_ids(rng, vocab, *shape):
    return rng.integers(0, vocab, size=shape).astype(np.int64)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint)


@pytest.mark.parametrize("prompt_len", [5, 21], ids=["shorter-than-window", "longer-than-window"])
def test_logits_match_reference_with_and_without_self_conditioning(model, reference_model, vocab_size, prompt_len):
    rng = np.random.default_rng(prompt_len)
    prompt, canvas = random_ids(rng, vocab_size, 1, prompt_len), random_ids(rng, vocab_size, 1, 16)
    ours = our_logits(model, prompt, [], canvas, sc_steps=2)
    ref = reference_logits(reference_model, prompt, [], canvas, sc_steps=2)
    assert ours[0].dtype == np.float32 and ours[0].shape == (1, 16, vocab_size)
    for step in range(2):
        assert np.abs(ours[step] - ref[step]).max() <= TOL, f"step {step}"


def test_logits_match_reference_for_second_canvas(model, reference_model, vocab_size):
    rng = np.random.default_rng(1)
    prompt = random_ids(rng, vocab_size, 1, 11)
    committed, canvas = random_ids(rng, vocab_size, 1, 16), random_ids(rng, vocab_size, 1, 16)
    ours = our_logits(model, prompt, [committed], canvas, sc_steps=2)
    ref = reference_logits(reference_model, prompt, [committed], canvas, sc_steps=2)
    for a, b in zip(ours, ref):
        assert np.abs(a - b).max() <= TOL


def test_logits_match_reference_for_batch_of_two(model, reference_model, vocab_size):
    rng = np.random.default_rng(2)
    prompt, canvas = random_ids(rng, vocab_size, 2, 9), random_ids(rng, vocab_size, 2, 16)
    ours = our_logits(model, prompt, [], canvas, sc_steps=2)
    ref = reference_logits(reference_model, prompt, [], canvas, sc_steps=2)
    for a, b in zip(ours, ref):
        assert a.shape == (2, 16, vocab_size)
        assert np.abs(a - b).max() <= TOL


def test_real_checkpoint_config_style_matches_reference(tokenizer_dir, vocab_size, tmp_path):
    """Full-attention shape given as global_head_dim / num_global_key_value_heads / attention_k_eq_v."""
    from transformers import DiffusionGemmaForBlockDiffusion

    reference = build_reference_model(vocab_size, seed=3)
    path = save_checkpoint(reference, tokenizer_dir, tmp_path / "ckpt", real_style=True)
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path)
    assert model.args.layer_head_dims == [16, 32, 16, 32] and model.args.layer_kv_heads == [2, 1, 2, 1]
    rng = np.random.default_rng(3)
    prompt, canvas = random_ids(rng, vocab_size, 1, 12), random_ids(rng, vocab_size, 1, 16)
    ours = our_logits(model, prompt, [], canvas, sc_steps=2)
    ref = reference_logits(reloaded, prompt, [], canvas, sc_steps=2)
    for a, b in zip(ours, ref):
        assert np.abs(a - b).max() <= TOL


def test_bfloat16_error_is_no_worse_than_the_references_own(hf_checkpoint, reference_model, vocab_size):
    """bfloat16 rounding moves a tiny random model's logits a lot (router choices flip), in
    transformers as in ours: compare both bfloat16 runs with the float32 reference."""
    import copy

    model = load_model(hf_checkpoint, dtype=mx.bfloat16)
    reference_bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)
    rng = np.random.default_rng(4)
    prompt, canvas = random_ids(rng, vocab_size, 1, 12), random_ids(rng, vocab_size, 1, 16)
    ours = our_logits(model, prompt, [], canvas)[0]
    assert ours.dtype == np.float32
    exact = reference_logits(reference_model, prompt, [], canvas)[0]
    theirs = reference_logits(reference_bf16, prompt, [], canvas)[0]
    ours_err, theirs_err = np.abs(ours - exact), np.abs(theirs - exact)
    print(
        f"bfloat16 logit error vs float32 reference: ours max {ours_err.max():.3f} mean {ours_err.mean():.4f}, "
        f"transformers max {theirs_err.max():.3f} mean {theirs_err.mean():.4f}"
    )
    assert ours_err.mean() <= 1.5 * theirs_err.mean()


def test_denoiser_leaves_cache_unchanged(model, vocab_size):
    rng = np.random.default_rng(5)
    cache = model.make_cache()
    model.encode(mx.array(random_ids(rng, vocab_size, 1, 13)), cache)
    before = [np.array(a) for a in cache.state()]
    offset = cache.offset
    logits = model.denoise(mx.array(random_ids(rng, vocab_size, 1, 16)), cache)
    model.denoise(mx.array(random_ids(rng, vocab_size, 1, 16)), cache, logits)
    after = [np.array(a) for a in cache.state()]
    assert cache.offset == offset == 13
    assert len(before) == len(after)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_sliding_layers_keep_only_their_window(model, vocab_size):
    cache = model.make_cache()
    model.encode(mx.array(random_ids(np.random.default_rng(6), vocab_size, 1, 21)), cache)
    window = model.args.sliding_window
    lengths = [layer.length for layer in cache.layers]
    assert lengths == [window - 1, 21, window - 1, 21]


def test_left_padded_batch_rows_match_each_row_alone(model, vocab_size):
    rng = np.random.default_rng(7)
    short, long = random_ids(rng, vocab_size, 5), random_ids(rng, vocab_size, 12)
    canvas = random_ids(rng, vocab_size, 2, 16)
    batch = np.stack([np.concatenate([np.zeros(7, dtype=np.int64), short]), long])
    cache = model.make_cache(left_padding=[7, 0])
    model.encode(mx.array(batch), cache)
    batched = model.denoise(mx.array(canvas), cache)
    batched = np.array(model.denoise(mx.array(canvas), cache, batched))
    for row, prompt in enumerate([short, long]):
        alone = our_logits(model, prompt[None], [], canvas[row : row + 1], sc_steps=2)[-1]
        assert np.abs(batched[row] - alone[0]).max() <= TOL


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("tokens", [3, 40])
def test_cpu_grouped_experts_equal_gathered_experts(model, quantize, tokens):
    """The CPU path (one dense matmul per expert) and the Metal path (gather_mm) agree."""
    import copy

    import mlx.nn as nn

    experts = copy.deepcopy(model.layers[0].experts)
    if quantize:
        nn.quantize(experts, group_size=32, bits=4)
    x = mx.random.normal((2, tokens, model.args.hidden_size), key=mx.random.key(tokens))
    weights, indices = model.layers[0].router(x)
    grouped = experts(x, weights, indices)
    gathered = experts._gathered(x.reshape(-1, x.shape[-1]), indices.reshape(-1), indices.shape[-1])
    gathered = (gathered.reshape(*indices.shape, -1) * weights[..., None]).sum(axis=-2)
    assert np.abs(np.array(grouped) - np.array(gathered)).max() <= 1e-5
