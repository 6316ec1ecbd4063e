"""Random DiffusionGemma checkpoints of any size, written without torch, for benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import save_model

from mlx_diffgemma.model import Model, ModelArgs

MID_SIZE = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=2, num_experts=16,
    top_k_experts=4, moe_intermediate_size=512, sliding_window=512, canvas_length=256,
)


def write_random_checkpoint(out: Path, dtype=mx.float32, seed: int = 0, **text_config) -> Path:
    """Random weights (norms and scalars near one) in MLX layout, with a hub-style config.json."""
    text_config = {**MID_SIZE, **text_config}
    canvas = text_config.pop("canvas_length")
    config = {"model_type": "diffusion_gemma", "canvas_length": canvas, "tie_word_embeddings": True,
              "text_config": {**text_config, "attention_k_eq_v": True, "model_type": "diffusion_gemma_text"}}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    model.load_weights([(k, (v * 0.02 if v.ndim > 1 else v).astype(dtype)) for k, v in params])
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
