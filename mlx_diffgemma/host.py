"""The CPU path's transcendental elementwise math on the host, in numpy.

On an x86 CPU, MLX evaluates ``tanh`` and ``exp`` one value at a time (about 17 ns each: 150 ms
for the ``tanh`` of a 256 x 32,768 canvas), while numpy's SIMD loops take under 1 ns. The CPU
path (grouped experts, which already reads the host every layer) therefore runs here, in numpy,
on rows split across the cores (numpy releases the GIL): the softcap and the sampler's step over
the logits, the attention softmax and the gated GELU, writing into the arrays' own buffers where
the caller owns them. The GPU path (gathered experts, which may be compiled) never comes here,
nor does training (``disabled``): a numpy result carries no gradient. ``keep_freed_memory`` is
the CPU path's other cost on the host: glibc's handling of its vocabulary-sized buffers.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

_WORKERS = os.cpu_count() or 1
_POOL: list[ThreadPoolExecutor] = []
_BLOCK_VALUES = 8 * 32768  # values per pass (8 rows of a 32,768 vocabulary): a block's temporaries stay in the cache
_GELU_SCALE = math.sqrt(2 / math.pi)
_DISABLED = [0]
_KEEP_FREED = 1 << 30  # bytes: glibc's mmap and trim thresholds while freed memory is kept
_KEPT: list[bool] = []


@contextmanager
def disabled() -> Iterator[None]:
    """Every function here declines inside (MLX's ops run instead): for code that MLX
    differentiates, since a result made in numpy carries no gradient."""
    _DISABLED[0] += 1
    try:
        yield
    finally:
        _DISABLED[0] -= 1


def enabled() -> bool:
    """Whether the functions here may run (not inside ``disabled``)."""
    return not _DISABLED[0]


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 1 GiB for reuse, as MLX's buffer cache does
    on Metal, instead of unmapping them: by default every block of 32 MiB or more (a canvas's
    256 x 32,768 logits) is mapped afresh and costs 8,192 page faults, about 16 ms a buffer on
    this project's CPUs. The process keeps its peak memory instead. Applied once; returns whether
    it holds (``False`` off glibc)."""
    if not _KEPT:
        try:
            libc = ctypes.CDLL(None) if sys.platform == "linux" else None
            mallopt = getattr(libc, "mallopt", None)
        except OSError:
            mallopt = None
        # M_TRIM_THRESHOLD (-1) and M_MMAP_THRESHOLD (-3).
        _KEPT.append(bool(mallopt) and mallopt(-1, _KEEP_FREED) == 1 and mallopt(-3, _KEEP_FREED) == 1)
    return _KEPT[0]


def pool() -> ThreadPoolExecutor:
    """One thread per core, shared by the host's row-parallel work."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="mlx-diffgemma-host"))
    return _POOL[0]


def for_rows(n: int, fn: Callable[[int, int], None]) -> None:
    """``fn(start, stop)`` over ``n`` rows split evenly across the pool's threads."""
    parts = min(n, _WORKERS)
    if parts <= 1:
        fn(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    list(pool().map(fn, bounds[:-1], bounds[1:]))


def buffer_view(a: mx.array) -> np.ndarray | None:
    """``a`` evaluated, as a 2-D numpy view of its buffer (rows of its last axis); ``None`` where
    it is not one contiguous float32 buffer, or is empty. Writing into the view changes ``a``: only
    a caller that owns ``a`` (no other array reads its buffer) may."""
    if not enabled() or a.dtype != mx.float32 or a.size == 0:
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


def _blocks(start: int, stop: int, width: int) -> Iterator[slice]:
    """Row blocks of about ``_BLOCK_VALUES`` values: a block's passes stay in the cache."""
    step = max(1, _BLOCK_VALUES // width)
    for a in range(start, stop, step):
        yield slice(a, min(a + step, stop))


def _softmax_into(x: np.ndarray, out: np.ndarray) -> None:
    np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    np.exp(out, out=out)
    np.divide(out, out.sum(axis=-1, keepdims=True), out=out)


def softmax(logits: mx.array, in_place: bool = False) -> mx.array | None:
    """The softmax of float32 ``logits`` over their last axis: in a new array, or written into
    ``logits`` (``in_place``, when the caller owns it); ``None`` where ``logits`` is not one
    float32 buffer."""
    x = buffer_view(logits)
    if x is None:
        return None
    out = x if in_place else np.empty_like(x)

    def rows(start: int, stop: int) -> None:
        for block in _blocks(start, stop, x.shape[1]):
            _softmax_into(x[block], out[block])

    for_rows(x.shape[0], rows)
    return logits if in_place else mx.array(out).reshape(logits.shape)


def tempered_softmax(logits: mx.array, temperature: float) -> np.ndarray | None:
    """``logits / temperature`` in a new numpy array, and its softmax written into ``logits``
    (which the caller owns and gives up): what a constrained step reads, without the free
    sampler's passes. ``None`` where the buffer cannot be written."""
    x = buffer_view(logits)
    if x is None:
        return None
    scaled = np.empty_like(x)

    def rows(start: int, stop: int) -> None:
        for block in _blocks(start, stop, x.shape[1]):
            np.divide(x[block], temperature, out=scaled[block])
            _softmax_into(scaled[block], x[block])

    for_rows(x.shape[0], rows)
    return scaled.reshape(logits.shape)


def gated_gelu(gate_up: mx.array, up: mx.array | None = None) -> mx.array | None:
    """``nn.gelu_approx(gate) * up``, in a new array: ``gate`` and ``up`` the two halves of
    ``gate_up``'s last axis (as ``mx.split`` gives them), or ``gate_up`` itself and ``up``.
    ``None`` where they are not float32 buffers."""
    both = buffer_view(gate_up)
    second = None if up is None else buffer_view(up)
    if both is None or (up is not None and second is None):
        return None
    half = both.shape[-1] // 2
    gate, up_view = (both[:, :half], both[:, half:]) if up is None else (both, second)
    out = np.empty(gate.shape, dtype=np.float32)

    def rows(start: int, stop: int) -> None:
        x, o = gate[start:stop], out[start:stop]
        np.multiply(x, x, out=o)
        np.multiply(o, x, out=o)
        np.multiply(o, 0.044715, out=o)
        np.add(o, x, out=o)
        np.multiply(o, _GELU_SCALE, out=o)
        np.tanh(o, out=o)  # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
        np.add(o, 1.0, out=o)
        np.multiply(o, x, out=o)
        np.multiply(o, 0.5, out=o)
        np.multiply(o, up_view[start:stop], out=o)

    for_rows(gate.shape[0], rows)
    return mx.array(out).reshape(*gate_up.shape[:-1], gate.shape[-1])


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
    probs_array = logits if keep_probs else mx.zeros(logits.shape, dtype=mx.float32)
    probs = x if keep_probs else buffer_view(probs_array)

    def rows(start: int, stop: int) -> None:
        for block in _blocks(start, stop, vocab):
            scaled = x[block]
            np.divide(scaled, temperature, out=scaled)
            argmax[block] = scaled.argmax(axis=-1)
            top = scaled.max(axis=-1, keepdims=True)
            e = np.exp(scaled - top)
            total = e.sum(axis=-1, keepdims=True)
            # H = logsumexp(x) - sum(p * x), with logsumexp(x) = max(x) + log(sum(exp(x - max)))
            entropy[block] = (top + np.log(total))[:, 0] - np.einsum("ij,ij->i", e, scaled) / total[:, 0]
            np.divide(e, total, out=probs[block])

    for_rows(n, rows)
    # MLX's scan adds in the same order as numpy's cumsum, at about 5x its speed; the CDF is
    # sorted, so the count of values below a row's threshold is a binary search.
    cdf = buffer_view(mx.cumsum(probs_array, axis=-1))
    threshold = u * cdf[:, -1]
    for i in range(n):
        samples[i] = min(int(np.searchsorted(cdf[i], threshold[i])), vocab - 1)
    shape = logits.shape[:-1]
    return (mx.array(argmax).reshape(shape), logits, mx.array(entropy).reshape(shape), mx.array(samples).reshape(shape))
