"""Tensor- and expert-parallel DiffusionGemma over ``mx.distributed`` (ring, MPI, JACCL).

Every rank holds a slice and runs the same program on the same tokens:

* attention: the query heads are split evenly; each rank keeps the key/value heads its
  queries read (an even split, or one shared head when there are fewer KV heads than
  ranks), and the output projection sums the ranks' parts (one ``all_sum``);
* dense MLP and experts: the MLP's hidden units are split, and each rank holds
  ``1/N`` of the experts, computing only the rows routed to them; both partial sums
  travel in one ``all_sum`` per layer (``TransformerBlock``);
* the tied embedding is split by vocabulary: lookups and the self-conditioning product
  are summed across ranks, logits are gathered, so every rank sees the full logits
  and runs the sampler on identical numbers (same seed, same canvases);
* the self-conditioning MLP is split like the dense MLP; norms and the router are replicated.

Loading with a group (``utils.load_model``) builds the model, shards it, then reads each
tensor and keeps only this rank's slice, so a rank's peak memory is its share plus one
tensor. ``lockstep.py`` lets rank 0 take requests (chat, the server) while the other
ranks follow it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .model import Model, embedding_product


class ShardedEmbedding(nn.Module):
    """This rank's ``ceil(V/N)`` rows of a (quantized) embedding, as lookup, product and LM head.

    The last rank's share is padded with zero rows so that every rank gathers the same shape.
    """

    def __init__(self, embed: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.vocab = embed.weight.shape[0]
        self.rows = -(-self.vocab // group.size())
        self.start, self.group = group.rank() * self.rows, group
        stop = min(self.start + self.rows, self.vocab)
        keep_rows(embed, self.start, stop)
        if stop - self.start < self.rows:
            embed.update({k: mx.pad(v, [(0, self.rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
                          for k, v in embed.parameters().items()})
        self.embed = embed

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        h = self.embed(mx.where(mine, local, 0))
        return mx.distributed.all_sum(mx.where(mine[..., None], h, 0).astype(h.dtype), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        part = self.embed.as_linear(x)  # [..., rows]
        n = self.group.size()
        gathered = mx.distributed.all_gather(part.reshape(-1, self.rows), group=self.group)  # [n * T, rows]
        gathered = gathered.reshape(n, -1, self.rows).transpose(1, 0, 2).reshape(*x.shape[:-1], n * self.rows)
        return gathered[..., : self.vocab]

    def product(self, probs: mx.array) -> mx.array:
        local = probs[..., self.start : self.start + self.rows]
        if local.shape[-1] < self.rows:
            local = mx.pad(local, [(0, 0)] * (local.ndim - 1) + [(0, self.rows - local.shape[-1])])
        return mx.distributed.all_sum(embedding_product(self.embed, local), group=self.group)


def keep_rows(module: nn.Module, start: int, stop: int) -> None:
    """Keep rows ``[start, stop)`` (axis 0: output units, or experts) of a plain or quantized layer."""
    # contiguous: a copy, so a slice of a freshly read tensor does not keep the whole tensor alive
    module.update({k: mx.contiguous(v[start:stop]) for k, v in module.parameters().items() if isinstance(v, mx.array)})


def _kv_range(heads: int, kv_heads: int, n: int, r: int) -> tuple[int, int]:
    """The key/value heads read by rank ``r``'s share of the query heads."""
    per_rank, group_size = heads // n, heads // kv_heads
    if kv_heads % n and n % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads cannot be shared by {n} ranks")
    return r * per_rank // group_size, ((r + 1) * per_rank - 1) // group_size + 1


def shard(model: Model, group: mx.distributed.Group) -> None:
    """Split ``model`` in place across ``group`` (see the module docstring)."""
    n, r = group.size(), group.rank()
    if n == 1:
        return
    args = model.args
    problems = [
        (args.num_attention_heads % n, f"{args.num_attention_heads} attention heads"),
        (args.num_experts % n, f"{args.num_experts} experts"),
        (args.intermediate_size % n, f"an MLP of {args.intermediate_size}"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{what} do not split evenly across {n} ranks")
    decoder = model.model.decoder
    split_inputs = {"self_conditioning.down_proj": decoder.self_conditioning.down_proj}
    for i, layer in enumerate(decoder.layers):
        split_inputs[f"layers.{i}.self_attn.o_proj"] = layer.self_attn.o_proj
        split_inputs[f"layers.{i}.mlp.down_proj"] = layer.mlp.down_proj
    for name, linear in split_inputs.items():  # quantized rows must split on whole groups
        group_size = getattr(linear, "group_size", None)
        width = linear.weight.shape[-1] * 32 // linear.bits if group_size else linear.weight.shape[-1]
        if group_size and (width // n) % group_size:
            raise ValueError(f"{name}: {width} inputs split {n} ways do not fill whole quantization groups of {group_size}")
    for layer in decoder.layers:
        attn = layer.self_attn
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        lo, hi = _kv_range(attn.n_heads, attn.n_kv_heads, n, r)
        for name in ("k_proj", "v_proj"):
            if name in attn:
                keep_rows(attn[name], lo * attn.head_dim, hi * attn.head_dim)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // n, hi - lo

        shard_inplace(layer.mlp.gate_proj, "all-to-sharded", group=group)
        shard_inplace(layer.mlp.up_proj, "all-to-sharded", group=group)
        shard_inplace(layer.mlp.down_proj, "sharded-to-all", group=group)
        experts = layer.experts
        experts.count = args.num_experts // n
        experts.first = r * experts.count
        keep_rows(experts.gate_up_proj, experts.first, experts.first + experts.count)
        keep_rows(experts.down_proj, experts.first, experts.first + experts.count)
        layer.group = group

    sc = decoder.self_conditioning
    sc.gate_proj = shard_linear(sc.gate_proj, "all-to-sharded", group=group)
    sc.up_proj = shard_linear(sc.up_proj, "all-to-sharded", group=group)
    sc.down_proj = shard_linear(sc.down_proj, "sharded-to-all", group=group)
    decoder.embed_tokens = ShardedEmbedding(decoder.embed_tokens, group)
    model.group = group
