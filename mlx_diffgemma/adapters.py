"""LoRA adapters on the attention and dense-MLP projections (mlx-lm's layers)."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .model import Model

LORA_KEYS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
ADAPTER_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"


def apply_lora(model: Model, num_layers: int, parameters: dict[str, Any]) -> None:
    """Freeze the model and put LoRA adapters on the attention and dense-MLP projections.

    The routed experts keep their weights: their CPU path reads them directly.
    """
    model.freeze()
    linear_to_lora_layers(model, len(model.layers) if num_layers < 0 else num_layers, parameters)


def fuse_lora(model: nn.Module) -> None:
    """Fold every adapter into the weights of the layer it adapts."""
    fused = [(name, m.fuse()) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    model.update_modules(tree_unflatten(fused))
