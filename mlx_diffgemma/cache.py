"""KV cache filled by the causal encoder and read by the denoiser.

Sliding-attention layers keep only the last ``sliding_window - 1`` positions (a new
token plus those makes a full window); full-attention layers keep everything.
Row ``b`` of a left-padded batch starts with ``left_padding[b]`` padding tokens
that no query may attend to and that do not count towards positions.
"""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    """Keys and values of one attention layer, shaped ``[B, kv_heads, T, head_dim]``."""

    def __init__(self, window: int | None):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def extend(self, keys: mx.array, values: mx.array, store: bool) -> tuple[mx.array, mx.array]:
        """Return cached + new keys/values; with ``store`` keep them (trimmed to the window)."""
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        if store:
            start = 0 if self.window is None else max(0, keys.shape[2] - (self.window - 1))
            self.keys, self.values = keys[:, :, start:], values[:, :, start:]
        return keys, values


class DiffusionCache:
    """The per-layer caches of one generation, plus the shared sequence state."""

    def __init__(self, windows: list[int | None], left_padding: list[int] | None = None):
        self.layers = [LayerCache(w) for w in windows]
        self.offset = 0  # tokens encoded so far, padding included
        self.left_padding = None if left_padding is None or not any(left_padding) else mx.array(left_padding)

    @property
    def batch_positions(self) -> int | mx.array:
        """RoPE offset of the next token: a scalar, or one per row when padded."""
        if self.left_padding is None:
            return self.offset
        return self.offset - self.left_padding

    def copy(self) -> "DiffusionCache":
        """A snapshot; cheap, since MLX arrays are immutable and ``extend`` makes new ones."""
        other = DiffusionCache.__new__(DiffusionCache)
        other.offset, other.left_padding = self.offset, self.left_padding
        other.layers = []
        for layer in self.layers:
            twin = LayerCache(layer.window)
            twin.keys, twin.values = layer.keys, layer.values
            other.layers.append(twin)
        return other

    def state(self) -> list[mx.array]:
        return [a for layer in self.layers for a in (layer.keys, layer.values) if a is not None]

    def attention_mask(self, layer: LayerCache, num_new: int, causal: bool) -> mx.array | None:
        """Boolean mask ``[B|1, 1, num_new, layer.length + num_new]`` for the next call.

        Cached keys of ``layer`` cover absolute positions ``[offset - length, offset)``, the
        new ones ``[offset, offset + num_new)``. Causal (encoder) queries see keys at or
        before themselves and, on sliding layers, inside the window; denoiser queries see
        every key. Padding keys are hidden, except from themselves, so no row is empty.
        """
        start = self.offset - layer.length
        if not causal and self.left_padding is None:
            return None
        key_pos = mx.arange(start, self.offset + num_new)
        query_pos = mx.arange(self.offset, self.offset + num_new)[:, None]
        mask = mx.ones((num_new, key_pos.shape[0]), dtype=mx.bool_)
        if causal:
            mask = key_pos <= query_pos
            if layer.window is not None:
                mask = mask & (key_pos > query_pos - layer.window)
        mask = mask[None, None]
        if self.left_padding is not None:
            valid = key_pos[None, None, None, :] >= self.left_padding[:, None, None, None]
            mask = mask & (valid | (key_pos == query_pos)[None, None])
        return mask
