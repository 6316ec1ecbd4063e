"""Vocabulary-sized elementwise math on the host, for MLX's CPU backend.

On an x86 CPU, MLX evaluates ``tanh`` and ``exp`` one value at a time (about 17 ns each: 150 ms
for the ``tanh`` of a 256 x 32,768 canvas), while numpy's SIMD loops take under 1 ns. The CPU
path (grouped experts, which already reads the host every layer) therefore runs the softcap and
the sampler's step over the logits here, in numpy, on rows split across the cores (numpy releases
the GIL), writing into the logits' own buffer: no copy either way. The GPU path (gathered experts,
which may be compiled) never comes here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

_WORKERS = os.cpu_count() or 1
_POOL: list[ThreadPoolExecutor] = []
_BLOCK = 8  # rows per pass: a block's temporaries stay in the cache


def pool() -> ThreadPoolExecutor:
    """One thread per core, shared by the host's row-parallel work."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="mlx-diffgemma-host"))
    return _POOL[0]


def for_rows(n: int, fn: Callable[[int, int], None]) -> None:
    """``fn(start, stop)`` over ``n`` rows split evenly across the pool's threads."""
    parts = min(n, _WORKERS)
    bounds = [n * i // parts for i in range(parts + 1)]
    if parts <= 1:
        fn(0, n)
    else:
        list(pool().map(fn, bounds[:-1], bounds[1:]))


def buffer_view(a: mx.array) -> np.ndarray | None:
    """``a`` evaluated, as a numpy view of its buffer with the vocabulary last; ``None`` where it
    is not one contiguous float32 buffer. Writing into the view changes ``a``: only a caller that
    owns ``a`` (no other array reads its buffer) may."""
    if a.dtype != mx.float32:
        return None
    mx.eval(a)
    view = np.asarray(memoryview(a))
    if not view.flags.c_contiguous or not view.flags.writeable:
        return None
    return view.reshape(-1, a.shape[-1])


def softcap_(logits: mx.array, cap: float) -> mx.array | None:
    """``cap * tanh(logits / cap)`` written into ``logits`` (which the caller owns); ``None``
    where its buffer cannot be written (the caller then softcaps as usual)."""
    x = buffer_view(logits)
    if x is None:
        return None

    def rows(start: int, stop: int) -> None:
        block = x[start:stop]
        np.divide(block, cap, out=block)
        np.tanh(block, out=block)
        np.multiply(block, cap, out=block)

    for_rows(x.shape[0], rows)
    return logits


def softmax(logits: mx.array) -> mx.array | None:
    """The softmax of float32 ``logits`` over the vocabulary, in a new array (``logits`` is left
    as it is); ``None`` where ``logits`` is not one float32 buffer."""
    x = buffer_view(logits)
    if x is None:
        return None
    out = np.empty_like(x)

    def rows(start: int, stop: int) -> None:
        block = out[start:stop]
        np.subtract(x[start:stop], x[start:stop].max(axis=-1, keepdims=True), out=block)
        np.exp(block, out=block)
        np.divide(block, block.sum(axis=-1, keepdims=True), out=block)

    for_rows(x.shape[0], rows)
    return mx.array(out).reshape(logits.shape)


def sampler_step(logits: mx.array, temperature: float, uniform: mx.array,
                 keep_probs: bool = True) -> tuple[mx.array, ...] | None:
    """The sampler's step over ``logits`` ``[B, C, V]`` (which the caller owns and gives up):
    ``argmax``, ``entropy`` and the inverse-CDF ``samples`` for ``uniform`` ``[B, C]``, all of
    ``logits / temperature``, with the same arithmetic as ``sampler.distribution`` and
    ``sampler.sample``; and ``logits`` itself, now holding the softmax (``keep_probs``) or the
    scaled logits. Returns ``(argmax, probs or scaled, entropy, samples)``, or ``None`` where the
    buffer cannot be written."""
    x = buffer_view(logits)
    if x is None:
        return None
    u = np.array(uniform, dtype=np.float32).reshape(-1)
    n, vocab = x.shape
    argmax, samples = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32)
    entropy = np.empty(n, dtype=np.float32)

    def rows(start: int, stop: int) -> None:
        for a in range(start, stop, _BLOCK):
            b = min(a + _BLOCK, stop)
            scaled = x[a:b]
            np.divide(scaled, temperature, out=scaled)
            argmax[a:b] = scaled.argmax(axis=-1)
            top = scaled.max(axis=-1, keepdims=True)
            e = np.exp(scaled - top)
            total = e.sum(axis=-1, keepdims=True)
            # H = logsumexp(x) - sum(p * x), with logsumexp(x) = max(x) + log(sum(exp(x - max)))
            entropy[a:b] = (top + np.log(total))[:, 0] - np.einsum("ij,ij->i", e, scaled) / total[:, 0]
            probs = np.divide(e, total, out=scaled if keep_probs else e)
            cdf = np.cumsum(probs, axis=-1)
            samples[a:b] = np.minimum((cdf < (u[a:b] * cdf[:, -1])[:, None]).sum(axis=-1), vocab - 1)

    for_rows(n, rows)
    shape = logits.shape[:-1]
    return (mx.array(argmax).reshape(shape), logits, mx.array(entropy).reshape(shape), mx.array(samples).reshape(shape))
