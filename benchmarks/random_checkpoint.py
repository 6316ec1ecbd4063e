"""Random DiffusionGemma checkpoints of any size, written without torch, for benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_diffgemma.convert.converter import ShardWriter
from mlx_diffgemma.model import Model, ModelArgs

MID_SIZE = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=2, num_experts=16,
    top_k_experts=4, moe_intermediate_size=512, sliding_window=512, canvas_length=256,
)
# The two shapes speed ratios are quoted on (issue #18): config overrides of MID_SIZE and the prompt length.
# "mid" is layer-heavy; "vocab" spends most of a step on vocabulary-sized work.
SHAPES = {
    "mid": ({}, 512),
    "vocab": (dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64, global_head_dim=128, num_global_key_value_heads=2,
                   num_experts=16, top_k_experts=4, moe_intermediate_size=256, sliding_window=512,
                   layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention", "full_attention"]), 300),
}


def write_random_checkpoint(out: Path, dtype=mx.float32, seed: int = 0, shard_bytes: int = 2**40, **text_config) -> Path:
    """Random weights (norms and scalars near one) in sharded MLX layout with a hub-style config.json."""
    text_config = {**MID_SIZE, **text_config}
    canvas = text_config.pop("canvas_length")
    config = {"model_type": "diffusion_gemma", "canvas_length": canvas, "tie_word_embeddings": True,
              "text_config": {**text_config, "attention_k_eq_v": True, "model_type": "diffusion_gemma_text"}}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, shard_bytes)
    for name, value in tree_flatten(model.parameters()):
        if value.ndim > 1:
            value = mx.random.normal(value.shape) * value.shape[-1] ** -0.5
        elif not name.endswith("layer_scalar"):
            value = 1.0 + 0.1 * mx.random.normal(value.shape)
        writer.add(name, value.astype(dtype))
    writer.finish()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
