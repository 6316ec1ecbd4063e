"""DiffusionGemma text model in MLX.

One transformer stack serves two passes that share every weight (the checkpoint
stores it once, under ``model.decoder``):

* the **encoder**: a causal pass over new tokens (the prompt, then each committed
  canvas) that only fills the KV cache;
* the **denoiser**: a bidirectional pass of a canvas over [cached prefix + canvas]
  that reads the cache without changing it and returns logits for every position,
  with self-conditioning on the previous step's logits.

The two passes differ only in their per-layer ``layer_scalar``; the encoder's
live under ``model.encoder.language_model.layers.N``.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import host
from .cache import DiffusionCache, LayerCache

LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "proportional")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
# The vision tower's weights: read from disk by vision.py on the first image, kept by convert.
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# Weights the text model does not use.
IGNORED_PREFIXES = (*VISION_PREFIXES, "model.encoder.embed_audio.")

logger = logging.getLogger(__name__)

# Which routed-expert implementation runs: "auto" picks by device ("grouped" on the CPU,
# "gathered" elsewhere); "grouped" or "gathered" forces one, e.g. to run the GPU path (no
# host reads, so it can be compiled) on a CPU in tests. See ``Experts``.
EXPERT_PATH = "auto"


class ConfigError(ValueError):
    """The checkpoint's config.json cannot describe a DiffusionGemma text model."""


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    layer_types: list[str] | None = None
    rope_parameters: dict[str, dict[str, Any]] | None = None
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = True
    per_layer_config: dict[str, dict[str, int]] | None = None
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    use_bidirectional_attention: str | None = None
    tie_word_embeddings: bool = True
    canvas_length: int = 256
    image_token_id: int | None = None
    max_position_embeddings: int = 131072
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    # Resolved per layer in __post_init__.
    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a checkpoint ``config.json`` (nested ``text_config``); unknown keys are ignored."""
        model_type = config.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(f"config.json has model_type {model_type!r}, expected 'diffusion_gemma'")
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no 'text_config' section")
        params = {**text, "model_type": model_type}
        for key in ("canvas_length", "tie_word_embeddings", "image_token_id"):
            if config.get(key) is not None:
                params[key] = config[key]
        names = {p for p in inspect.signature(cls).parameters}
        missing = [n for n, p in inspect.signature(cls).parameters.items() if p.default is p.empty and n not in params]
        if missing:
            raise ConfigError(f"config.json text_config is missing {', '.join(missing)}")
        return cls(**{k: v for k, v in params.items() if k in names})

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if unknown := set(self.layer_types) - set(LAYER_TYPES):
            raise ConfigError(f"unknown layer type(s) {sorted(unknown)}; expected {LAYER_TYPES}")
        if self.layer_types[-1] != "full_attention":
            logger.warning("The last layer must use full attention; treating it as full_attention, as transformers does.")
            self.layer_types[-1] = "full_attention"
        if self.rope_parameters is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        for layer_type in set(self.layer_types):
            rope = self.rope_parameters.get(layer_type)
            if rope is None or rope.get("rope_type", "default") not in ROPE_TYPES:
                raise ConfigError(f"rope_parameters[{layer_type!r}] must be one of the rope types {ROPE_TYPES}, got {rope!r}")
        if self.use_bidirectional_attention == "all":
            raise ConfigError("use_bidirectional_attention='all' (a non-causal encoder) is not supported")
        if not self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=false (separate encoder and decoder weights) is not supported")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported; expected one of {ACTIVATIONS}")
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(f"top_k_experts={self.top_k_experts} must be in 1..num_experts={self.num_experts}")
        if self.sliding_window < 1 or self.canvas_length < 1:
            raise ConfigError("sliding_window and canvas_length must be positive")
        self.layer_head_dims, self.layer_kv_heads = [], []
        for i, layer_type in enumerate(self.layer_types):
            head_dim, kv_heads = self.head_dim, self.num_key_value_heads
            if self.per_layer_config is not None:
                override = self.per_layer_config.get(str(i)) or self.per_layer_config.get(i) or {}
                head_dim = override.get("head_dim", head_dim)
                kv_heads = override.get("num_key_value_heads", kv_heads)
            elif layer_type == "full_attention":
                head_dim = self.global_head_dim
                if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                    kv_heads = self.num_global_key_value_heads
            if self.num_attention_heads % kv_heads:
                raise ConfigError(f"layer {i}: {self.num_attention_heads} query heads do not divide into {kv_heads} KV heads")
            self.layer_head_dims.append(head_dim)
            self.layer_kv_heads.append(kv_heads)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: float) -> mx.array:
    """``cap * tanh(x / cap)`` as one fused kernel: no extra logits-sized temporaries."""
    return mx.tanh(x / cap) * cap


def rms_norm(x: mx.array, eps: float) -> mx.array:
    """RMS norm without a learned scale (value norm, router norm, self-conditioning post norm)."""
    return mx.fast.rms_norm(x, None, eps)


def gated_gelu(gate_up: mx.array, up: mx.array | None = None) -> mx.array:
    """``gelu_approx(gate) * up``: of the halves of ``gate_up`` (the experts' fused projection),
    or of ``gate_up`` and ``up``. The CPU path takes it on the host (host.py)."""
    out = None if gathered_experts() else host.gated_gelu(gate_up, up)
    if out is None:
        gate, up = mx.split(gate_up, 2, axis=-1) if up is None else (gate_up, up)
        out = nn.gelu_approx(gate) * up
    return out


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated_gelu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.top_k = args.top_k_experts
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        x = rms_norm(x, self.eps) * self.scale * (x.shape[-1] ** -0.5)
        probs = mx.softmax(self.proj(x).astype(mx.float32), axis=-1)
        indices = mx.stop_gradient(mx.argpartition(-probs, self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * self.per_expert_scale[indices], indices


def grouped_linear(layer: nn.Module, x: mx.array, counts: list[int]) -> mx.array:
    """Apply a (quantized) SwitchLinear to rows sorted by expert, ``counts[e]`` rows for expert
    ``e``, as one dense matmul per expert. On the CPU this runs at BLAS speed, where MLX's
    ``gather_mm`` is a plain loop (about 100x slower on a mid-size model)."""
    # Each expert's weights are sliced as a batch of one ([e:e+1], not [e]): the matmul then
    # reads them in place, where a 2-D slice is copied first (a copy of every expert's
    # weights per layer: +96 MiB peak and 1.7x the time on the mid-size model).
    out, start = [], 0
    quantized = isinstance(layer, QuantizedSwitchLinear)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows, start = x[None, start : start + n], start + n
        if quantized:
            biases = layer["biases"][e : e + 1] if "biases" in layer else None
            out.append(mx.quantized_matmul(rows, layer.weight[e : e + 1], layer.scales[e : e + 1], biases, transpose=True,
                                           group_size=layer.group_size, bits=layer.bits, mode=layer.mode)[0])
        else:
            out.append((rows @ layer.weight[e : e + 1].swapaxes(-1, -2))[0])
    return mx.concatenate(out)


def gathered_experts() -> bool:
    """Whether the experts run gathered (``gather_mm``/``gather_qmm``, no host reads) rather
    than grouped (a BLAS matmul per expert, with the counts read on the host): ``EXPERT_PATH``."""
    if EXPERT_PATH not in ("auto", "grouped", "gathered"):
        raise ValueError(f"EXPERT_PATH must be 'auto', 'grouped' or 'gathered', got {EXPERT_PATH!r}")
    return EXPERT_PATH == "gathered" or (EXPERT_PATH == "auto" and mx.default_device() != mx.cpu)


class Experts(nn.Module):
    """The routed experts, gate and up projections fused as in the checkpoint.

    Holds experts ``[first, first + count)`` of ``num_experts``: all of them, or one rank's
    share after ``shard``; rows routed elsewhere contribute zero here.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.first, self.count = 0, args.num_experts
        self.gate_up_proj = SwitchLinear(args.hidden_size, 2 * args.moe_intermediate_size, args.num_experts, bias=False)
        self.down_proj = SwitchLinear(args.moe_intermediate_size, args.hidden_size, args.num_experts, bias=False)

    def __call__(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        shape, k = indices.shape, indices.shape[-1]
        x = x.reshape(-1, x.shape[-1])
        flat = indices.reshape(-1)
        y = self._gathered(x, flat, k) if gathered_experts() else self._grouped(x, flat, k)
        y = y.reshape(*shape, -1)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _grouped(self, x: mx.array, flat: mx.array, k: int) -> mx.array:
        order = mx.argsort(flat)
        counts = np.bincount(np.array(flat), minlength=self.num_experts)
        local = counts[self.first : self.first + self.count].tolist()
        if self.count == self.num_experts:
            rows = order
        elif not sum(local):  # no row was routed to this rank's experts
            return mx.zeros((flat.size, self.down_proj.weight.shape[1]), dtype=x.dtype)
        else:  # only the rows routed to this rank's experts (contiguous in expert order)
            start = int(counts[: self.first].sum())
            rows = order[start : start + sum(local)]
        y = grouped_linear(self.down_proj, gated_gelu(grouped_linear(self.gate_up_proj, x[rows // k], local)), local)
        if self.count == self.num_experts:
            return y[mx.argsort(order)]
        out = mx.zeros((flat.size, y.shape[-1]), dtype=y.dtype)
        out[rows] = y
        return out

    def _gathered(self, x: mx.array, flat: mx.array, k: int) -> mx.array:
        # Many tokens: one row per (token, expert), visited in expert order so that each
        # expert's weights are read once. Few tokens: gather per token.
        mine = None
        if self.count != self.num_experts:
            local = flat - self.first
            mine = (local >= 0) & (local < self.count)
            flat = mx.where(mine, local, 0)
        sort = flat.size >= 64
        if sort:
            order = mx.argsort(flat)
            x, idx = x[order // k][:, None], flat[order]
        else:
            x, idx = x[:, None, None], flat.reshape(-1, k)
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=sort), 2, axis=-1)
        y = self.down_proj(nn.gelu_approx(gate) * up, idx, sorted_indices=sort)
        y = (y[mx.argsort(order)] if sort else y).reshape(-1, y.shape[-1])
        return y if mine is None else y * mine[:, None].astype(y.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = args.layer_types[layer_idx] == "sliding_attention"
        self.head_dim = head_dim = args.layer_head_dims[layer_idx]
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.layer_kv_heads[layer_idx]
        self.eps = args.rms_norm_eps
        bias, dims = args.attention_bias, args.hidden_size
        self.q_proj = nn.Linear(dims, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dims, self.n_kv_heads * head_dim, bias=bias)
        if self.is_sliding:  # full-attention layers use the keys as values
            self.v_proj = nn.Linear(dims, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dims, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        rope = args.rope_parameters[args.layer_types[layer_idx]]
        self.rope = initialize_rope(head_dim, rope["rope_theta"], False, rope)

    def keys_values(self, x: mx.array, positions) -> tuple[mx.array, mx.array]:
        keys, values = self._keys_values(x)
        return self.rope(keys, offset=positions), values

    def _keys_values(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Normalized keys (before RoPE) and values, ``[B, kv_heads, L, D]``."""
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1) if self.is_sliding else k
        return self.k_norm(k).transpose(0, 2, 1, 3), rms_norm(v, self.eps).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, positions, mask: mx.array | None, cache: LayerCache, store: bool,
                 open_positions: "OpenPositions | None" = None) -> mx.array:
        """With ``open_positions``, ``x`` holds only the open canvas positions: their queries attend
        over every canvas position's keys and values, the frozen ones' kept from their last run."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys, values = self._keys_values(x)
        if open_positions is None:
            q = self.rope(q, offset=positions)
        else:
            keys, values = open_positions.canvas_keys_values(self.layer_idx, keys, values)
            q = open_positions.take(self.rope(open_positions.spread(q), offset=positions))
            mask = None if mask is None else mask[:, :, :1]  # canvas queries all see the same keys
        k, v = cache.extend(self.rope(keys, offset=positions), values, store)
        return self.o_proj(attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, L, -1))


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    """Dot-product attention (scale 1: queries and keys are normalized), ``[B, heads, L, D]``
    queries over ``[B, kv_heads, S, D]`` keys and values, ``mask`` boolean ``[B|1, 1, L, S]``.
    The CPU path takes the softmax on the host (host.py): MLX's own runs one value at a time
    there, and a canvas's attention holds about as many scores as its logits."""
    if gathered_experts() or not host.enabled():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    B, H, L, D = q.shape
    groups = H // k.shape[1]
    scores = (q.reshape(B, k.shape[1], groups * L, D) @ k.swapaxes(-1, -2)).astype(mx.float32)
    if mask is not None:
        shape = scores.shape
        scores = mx.where(mask[:, :, None], scores.reshape(B, -1, groups, L, shape[-1]), -mx.inf).reshape(shape)
    probs = host.softmax(scores, in_place=True)
    probs = mx.softmax(scores, axis=-1) if probs is None else probs
    return (probs.astype(v.dtype) @ v).reshape(B, H, L, -1)


class OpenPositions:
    """One denoiser call over the open positions of a canvas (frozen positions, ``freezing.py``):
    ``index`` ``[B, m]`` (sorted; a row may repeat one to fill the width) of a canvas of ``width``,
    and per layer the canvas's keys (before RoPE) and values from each position's last run,
    updated in place in ``keys_values`` (``None`` before the first call, which runs every position)."""

    def __init__(self, index: mx.array, width: int, keys_values: list[tuple[mx.array, mx.array] | None]):
        self.index, self.width, self.keys_values = index, width, keys_values
        self._heads_index = index[:, None, :, None]

    def canvas_keys_values(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        kept = self.keys_values[layer]
        if kept is not None:
            where = mx.broadcast_to(self._heads_index, keys.shape)
            keys, values = mx.put_along_axis(kept[0], where, keys, axis=2), mx.put_along_axis(kept[1], where, values, axis=2)
        self.keys_values[layer] = keys, values
        return keys, values

    def spread(self, q: mx.array) -> mx.array:
        """``[B, H, m, D]`` queries placed at their canvas positions (zeros elsewhere), for RoPE."""
        B, H, _, D = q.shape
        return mx.put_along_axis(mx.zeros((B, H, self.width, D), dtype=q.dtype),
                                 mx.broadcast_to(self._heads_index, q.shape), q, axis=2)

    def take(self, q: mx.array) -> mx.array:
        return mx.take_along_axis(q, self._heads_index, axis=2)


class TransformerBlock(nn.Module):
    """Attention, then a dense MLP and routed experts side by side."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        dims, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(dims, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(dims, eps=eps)
        self.layer_scalar = mx.ones((1,))
        self.group: mx.distributed.Group | None = None  # set by ``shard``: the MLP and experts hold partial sums

    def __call__(self, x, positions, mask, cache: LayerCache, store: bool, layer_scalar: mx.array,
                 open_positions: OpenPositions | None = None) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, mask, cache, store,
                                                             open_positions))
        dense = self.mlp(self.pre_feedforward_layernorm(x))
        weights, indices = self.router(x)
        routed = self.experts(self.pre_feedforward_layernorm_2(x), weights, indices)
        if self.group is not None:  # one collective for both partial sums
            dense, routed = mx.split(mx.distributed.all_sum(mx.concatenate([dense, routed], axis=-1), group=self.group), 2, axis=-1)
        dense, routed = self.post_feedforward_layernorm_1(dense), self.post_feedforward_layernorm_2(routed)
        return (x + self.post_feedforward_layernorm(dense + routed)) * layer_scalar


class SelfConditioning(nn.Module):
    """Gated MLP that mixes the previous step's soft embeddings into the canvas embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, embeddings: mx.array, soft_embeddings: mx.array | None) -> mx.array:
        # A zero signal (the first step) passes through the MLP as zero.
        if soft_embeddings is not None:
            h = self.pre_norm(soft_embeddings)
            embeddings = embeddings + self.down_proj(nn.gelu_approx(self.gate_proj(h)) * self.up_proj(h))
        return rms_norm(embeddings, self.eps)


class Decoder(nn.Module):
    """The shared stack; the checkpoint stores it as ``model.decoder``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayer() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    """Holds what the encoder does not share with the decoder: its layer scalars."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)
        self.encoder = Encoder(args)


def embedding_product(embed: nn.Module, probs: mx.array) -> mx.array:
    """``probs @ embedding_table`` for a plain, quantized or vocabulary-sharded embedding."""
    if hasattr(embed, "product"):  # distributed.ShardedEmbedding
        return embed.product(probs)
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            probs, embed.weight, embed.scales, embed.get("biases"), transpose=False,
            group_size=embed.group_size, bits=embed.bits, mode=embed.mode,
        )
    return probs @ embed.weight


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        # Denoising settings named by the checkpoint's generation_config.json (set by the loader).
        self.generation_defaults: dict[str, Any] = {}
        self.group: mx.distributed.Group | None = None  # the ranks it is split across (``distributed.shard``)
        self.vision = None  # ``vision.Vision`` when the checkpoint takes images (set by the loader)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.decoder.layers

    def make_cache(self, left_padding: list[int] | None = None) -> DiffusionCache:
        """A fresh cache; ``left_padding[b]`` padding tokens lead row ``b`` of a batch."""
        windows = [self.args.sliding_window if t == "sliding_attention" else None for t in self.args.layer_types]
        return DiffusionCache(windows, left_padding)

    def _embed(self, ids: mx.array) -> mx.array:
        embed = self.model.decoder.embed_tokens
        h = embed(ids)
        return h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)

    def _run_layers(self, h, cache: DiffusionCache, causal: bool, store: bool, scalars: list[mx.array], last: int,
                    blocks: mx.array | None = None, open_positions: OpenPositions | None = None):
        positions, masks = cache.batch_positions, {}
        width = h.shape[1] if open_positions is None else open_positions.width
        for layer, layer_cache, scalar in zip(self.layers[:last], cache.layers, scalars):
            key = (layer_cache.length, layer_cache.window)
            if key not in masks:
                masks[key] = cache.attention_mask(layer_cache, width, causal)
                if blocks is not None:  # new keys of the query's own block, past the cached ones
                    masks[key] = masks[key] | mx.pad(blocks, [(0, 0), (0, 0), (0, 0), (layer_cache.length, 0)])
            h = layer(h, positions, masks[key], layer_cache, store, scalar, open_positions)
        return h

    def encode(self, input_ids: mx.array, cache: DiffusionCache, image_features: mx.array | None = None) -> None:
        """Causal pass over ``input_ids`` ``[B, L]`` that appends their keys/values to ``cache``.

        ``image_features`` ``[N, hidden]`` replace the embeddings of the ``N`` image tokens in
        ``input_ids`` (in row-major order), as the reference's ``masked_scatter`` does; with
        ``use_bidirectional_attention="vision"`` each run of image tokens also attends within
        itself both ways. An image's tokens must all be in one call.
        """
        h = self._embed(input_ids)
        blocks = None
        if image_features is not None:
            is_image = input_ids == self.args.image_token_id
            if int(is_image.sum()) != image_features.shape[0]:
                raise ValueError(f"{int(is_image.sum())} image tokens for {image_features.shape[0]} image features")
            index = mx.maximum(mx.cumsum(is_image.flatten().astype(mx.int32)) - 1, 0)
            h = mx.where(is_image[..., None], image_features.astype(h.dtype)[index].reshape(h.shape), h)
            if self.args.use_bidirectional_attention == "vision":
                starts = is_image & ~mx.pad(is_image[:, :-1], [(0, 0), (1, 0)])
                run = mx.where(is_image, mx.cumsum(starts.astype(mx.int32), axis=1), 0)
                blocks = ((run[:, :, None] == run[:, None, :]) & (run[:, :, None] > 0))[:, None]
        scalars = [layer.layer_scalar for layer in self.model.encoder.language_model.layers]
        h = self._run_layers(h, cache, causal=True, store=True, scalars=scalars, last=len(self.layers) - 1, blocks=blocks)
        # The last layer only has to leave its keys/values: its output feeds no logits.
        last = self.layers[-1]
        keys, values = last.self_attn.keys_values(last.input_layernorm(h), cache.batch_positions)
        cache.layers[-1].extend(keys, values, store=True)
        cache.offset += input_ids.shape[1]

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The dtype hidden states run in (the norms are kept in it, as the embedding is)."""
        return self.model.decoder.norm.weight.dtype

    def denoise(
        self, canvas_ids: mx.array, cache: DiffusionCache, self_conditioning_logits: mx.array | None = None,
        self_conditioning_top_k: int = 0, self_conditioning_probs: mx.array | None = None,
        open_index: mx.array | None = None, canvas_keys_values: list[tuple[mx.array, mx.array] | None] | None = None,
    ) -> mx.array:
        """Float32 logits ``[B, C, V]`` for a canvas ``[B, C]`` placed right after the cached prefix.

        ``self_conditioning_logits`` are the previous step's processed logits (``None`` on the
        first step). With ``self_conditioning_top_k``, only each position's k most likely tokens
        are mixed (``T*k`` embedding rows instead of a ``T*V`` product). ``self_conditioning_probs``
        may replace the logits with their softmax when the caller already has it. The cache is
        read, never changed.

        Frozen positions (an approximation, not the reference): with ``open_index`` ``[B, m]``
        (sorted canvas positions; a row may repeat one to fill the width), only those positions
        run through the layers and get logits (``[B, m, V]``; the self-conditioning inputs are
        theirs too). ``canvas_keys_values`` (one entry per layer, ``None`` at first, when every
        position must be open) keeps each layer's canvas keys and values, updated in place:
        the other positions are attended with those of their last run.
        """
        decoder = self.model.decoder
        open_positions = None
        if open_index is not None:
            first = canvas_keys_values is not None and canvas_keys_values[0] is None
            if canvas_keys_values is None or (first and open_index.shape[1] != canvas_ids.shape[1]):
                raise ValueError("open_index needs canvas_keys_values, and a first pass that runs every canvas position")
            open_positions = OpenPositions(open_index, canvas_ids.shape[1], canvas_keys_values)
            canvas_ids = mx.take_along_axis(canvas_ids, open_index, axis=1)
        h = self._embed(canvas_ids)
        soft, probs = None, self_conditioning_probs
        if probs is None and self_conditioning_logits is not None:
            # As the reference: logits cast to the embedding dtype, softmax in float32.
            logits = self_conditioning_logits.astype(h.dtype).astype(mx.float32)
            if 0 < self_conditioning_top_k < logits.shape[-1]:
                top = mx.argpartition(logits, -self_conditioning_top_k, axis=-1)[..., -self_conditioning_top_k:]
                weights = mx.exp(mx.take_along_axis(logits, top, axis=-1) - mx.logsumexp(logits, axis=-1, keepdims=True))
                soft = (weights.astype(h.dtype)[..., None, :] @ decoder.embed_tokens(top))[..., 0, :]
            else:
                probs = None if gathered_experts() else host.softmax(logits)
                probs = mx.softmax(logits, axis=-1) if probs is None else probs
        if probs is not None:
            soft = embedding_product(decoder.embed_tokens, probs.astype(h.dtype))
        if soft is not None:
            soft = soft * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)
        h = decoder.self_conditioning(h, soft)
        scalars = [layer.layer_scalar for layer in self.layers]
        h = self._run_layers(h, cache, causal=False, store=False, scalars=scalars, last=len(self.layers),
                             open_positions=open_positions)
        logits = decoder.embed_tokens.as_linear(decoder.norm(h)).astype(mx.float32)
        cap = self.args.final_logit_softcapping
        if not cap:
            return logits
        # The CPU path reads the host anyway: there numpy's tanh is 20x MLX's (host.py).
        capped = None if gathered_experts() else host.softcap_(logits, cap)
        return softcap(logits, cap) if capped is None else capped

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint keys (HF or MLX layout) onto this module tree."""
        out = {}
        for key, value in weights.items():
            if key.startswith(IGNORED_PREFIXES) or "rotary_emb" in key or key == "lm_head.weight":
                continue
            if key.startswith("language_model.model."):  # some MLX conversions nest the text model
                key = key[len("language_model.") :]
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                key += ".weight"
            out[key] = value
        return out

    @property
    def quant_predicate(self):
        """The community 4-bit recipe: 8-bit for the sensitive parts (see ``is_sensitive``)."""

        def predicate(path: str, module: nn.Module):
            if not hasattr(module, "to_quantized"):
                return False
            if is_sensitive(path):
                return {"group_size": 64, "bits": 8} if module.weight.shape[-1] % 64 == 0 else False
            return True

        return predicate


def is_sensitive(path: str) -> bool:
    """Modules that mixed-precision recipes keep at higher precision: the embedding table (also
    the LM head and the self-conditioning product), attention projections, the dense MLP and the
    router, as the published community 4-bit conversion does; the routed experts take the rest."""
    return path.endswith("embed_tokens") or any(part in path for part in (".self_attn.", ".mlp.", ".router."))
