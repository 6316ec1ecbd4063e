"""A denoising step as one compiled graph: the denoiser forward and the sampler's tail.

On the gathered expert path (a GPU; ``model.EXPERT_PATH``) a step reads nothing back to
the host, so ``mx.compile`` can take it whole, from the canvas to the next canvas: softcap,
temperature, softmax, entropy, sampling, argmax, acceptance and renoising are fused around
the vocabulary-sized logits instead of each reading them from memory again.

A compiled function is traced again for every new input shape, so shapes are kept fixed:
each layer's cached keys and values are passed padded to a bucket of the prefix length
(``prefix_bucket``, at most what a sliding layer holds) with the padding masked out, and the
positions, temperature and entropy bound are array inputs. One trace then serves every step
of a canvas, the next canvases and other requests while their prefix stays in the bucket (a
step with self-conditioning and the first step, without it, are two traces). ``traces``
counts them. On MLX's CPU backend this step measured slower than the same step uncompiled
(``benchmarks/compiled_step.py``); its gain on a GPU is not measured yet.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import mlx.core as mx

from .cache import DiffusionCache, LayerCache
from .model import Model, gathered_experts
from .sampler import DiffusionSettings, accept, distribution, renoise, sample

PREFIX_BUCKET = 1024  # the smallest step between prefix shapes, in positions

traces = 0  # how many times a step was traced (compiled) in this process

_compiled: dict[int, Callable] = {}  # per live model, by id


def prefix_bucket(length: int) -> int:
    """``length`` rounded up to a multiple of ``PREFIX_BUCKET``, or of an eighth of its power
    of two on long prefixes (so at most 12.5% padding there)."""
    unit = max(PREFIX_BUCKET, 1 << max(length.bit_length() - 4, 0))
    return -(-length // unit) * unit


class _PaddedLayer:
    """A layer's cached keys and values as the denoiser reads them (``LayerCache``'s
    interface), padded to a bucket; ``mask`` hides the padding."""

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array, window: int | None):
        self.keys, self.values, self.mask, self.window = keys, values, mask, window

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def extend(self, keys: mx.array, values: mx.array, store: bool) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


class _PaddedCache:
    """The denoiser's view of a ``DiffusionCache`` with padded layers and array positions."""

    def __init__(self, layers: list[_PaddedLayer], positions: mx.array):
        self.layers, self.batch_positions = layers, positions

    def attention_mask(self, layer: _PaddedLayer, num_new: int, causal: bool) -> mx.array:
        return layer.mask


def _pad(layer: LayerCache, bucket: int) -> tuple[mx.array, mx.array]:
    """The layer's cached keys and values followed by at least ``bucket - length`` positions
    of padding: a view of its buffers where they hold enough positions, else a padded copy."""
    if layer.start + bucket <= layer.keys.shape[2]:
        return layer.keys[:, :, layer.start : layer.start + bucket], layer.values[:, :, layer.start : layer.start + bucket]
    keys, values = layer.state
    width = [(0, 0), (0, 0), (0, bucket - layer.length), (0, 0)]
    return mx.pad(keys, width), mx.pad(values, width)


def _prefix_mask(cache: DiffusionCache, length: int, bucket: int, canvas_length: int) -> mx.array:
    """``[B|1, 1, 1, bucket + canvas]``: the cached keys, less left padding, and the canvas."""
    index = mx.arange(bucket + canvas_length)
    valid = (index < length) | (index >= bucket)
    if cache.left_padding is None:
        return valid[None, None, None]
    position = cache.offset - length + index  # of the cached keys; the canvas is past any padding
    return (valid & ((position >= cache.left_padding[:, None]) | (index >= bucket)))[:, None, None]


def _traced_step(model_ref: weakref.ref, params, layers, positions, canvas, sc, temperature, bound, uniform,
                 noise_tokens, reuse_probs: bool, top_k: int):
    """The step ``denoise_canvas`` runs, as one function of arrays (``mx.compile`` traces it).

    The model's parameters come in as inputs, so a compiled step always uses the current
    weights; they are put in the model for the trace and the model's own are put back.
    """
    global traces
    traces += 1
    model = model_ref()
    own = model.parameters()
    model.update(params)
    try:
        windows = [layer.window for layer in model.make_cache().layers]
        cache = _PaddedCache([_PaddedLayer(k, v, m, w) for (k, v, m), w in zip(layers, windows)], positions)
        logits = model.denoise(canvas, cache, None if reuse_probs else sc, top_k, sc if reuse_probs else None)
    finally:
        model.update(own)
    scaled = logits / temperature
    probs, entropy = distribution(scaled)
    new_canvas = renoise(sample(probs, uniform), accept(entropy, bound), noise_tokens)
    return new_canvas, scaled.argmax(axis=-1).astype(canvas.dtype), probs if reuse_probs else scaled, entropy


def _step_for(model: Model) -> Callable:
    """The model's compiled step, made once and dropped with the model: its traces are what
    later canvases and requests reuse (a new compiled function would trace afresh)."""
    key = id(model)
    if key not in _compiled:
        _compiled[key] = mx.compile(partial(_traced_step, weakref.ref(model)))
        weakref.finalize(model, _compiled.pop, key, None)
    return _compiled[key]


class CompiledStep:
    """One canvas's compiled step: built once per canvas (the cache is fixed while it denoises)."""

    def __init__(self, model: Model, cache: DiffusionCache, settings: DiffusionSettings, batch_size: int):
        self.step = _step_for(model)
        self.params = model.parameters()
        self.layers, masks = [], {}
        for layer in cache.layers:
            bucket = prefix_bucket(layer.length)
            if layer.window is not None:  # a sliding layer never holds more than window - 1 positions
                bucket = min(bucket, layer.window - 1)
            if (layer.length, bucket) not in masks:
                masks[layer.length, bucket] = _prefix_mask(cache, layer.length, bucket, settings.canvas_length)
            self.layers.append((*_pad(layer, bucket), masks[layer.length, bucket]))
        positions = cache.batch_positions
        self.positions = positions if isinstance(positions, mx.array) else mx.array(positions)
        self.bound = mx.array(settings.entropy_bound, dtype=mx.float32)
        self.top_k = settings.self_conditioning_top_k
        self.reuse_probs = self.top_k == 0 and model.compute_dtype == mx.float32
        self.shape = (batch_size, settings.canvas_length)

    def __call__(self, canvas: mx.array, sc: mx.array | None, temperature: float, uniform: mx.array | None = None,
                 noise_tokens: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """The next canvas, the argmax, what the next step self-conditions on and the entropies.

        Without noise (the last step, where only the argmax is used) the rest is computed from zeros.
        """
        if uniform is None:
            uniform, noise_tokens = mx.zeros(self.shape), mx.zeros(self.shape, dtype=mx.int32)
        return self.step(self.params, self.layers, self.positions, canvas, sc,
                         mx.array(temperature, dtype=mx.float32), self.bound, uniform, noise_tokens,
                         self.reuse_probs, self.top_k)


def compiled_step(model: Model, cache: DiffusionCache, settings: DiffusionSettings, batch_size: int) -> CompiledStep | None:
    """The compiled step for a canvas, or ``None`` where a step reads the host (the grouped
    expert path, the CPU's default) or the model is sharded (a collective per layer)."""
    if not gathered_experts() or model.group is not None:
        return None
    return CompiledStep(model, cache, settings, batch_size)
