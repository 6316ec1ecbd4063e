"""KV cache filled by the causal encoder and read by the denoiser.

Sliding-attention layers keep only the last ``sliding_window - 1`` positions (a new
token plus those makes a full window); full-attention layers keep everything.
Row ``b`` of a left-padded batch starts with ``left_padding[b]`` padding tokens
that no query may attend to and that do not count towards positions.
"""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    """Keys and values of one attention layer, shaped ``[B, kv_heads, T, head_dim]``.

    They live in buffers allocated ahead (``step`` positions at a time, and a quarter of
    what is held, so growing is rare) and written in place: positions ``[start, end)`` of
    the buffers are the cached ones. Writes make a new array (``mx.slice_update``), which
    MLX does in place when nothing else holds the buffer, and as a copy when a snapshot
    (``DiffusionCache.copy``) does, so a snapshot never sees later writes. The state
    follows mlx-lm's cache protocol (``state``, ``meta_state``, ``from_state``).
    """

    step = 256

    def __init__(self, window: int | None):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.start = self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def extend(self, keys: mx.array, values: mx.array, store: bool) -> tuple[mx.array, mx.array]:
        """Return cached + new keys/values; with ``store`` keep them (trimmed to the window)."""
        if not store:
            if self.keys is None:
                return keys, values
            cached_keys, cached_values = self.state
            return mx.concatenate([cached_keys, keys], axis=2), mx.concatenate([cached_values, values], axis=2)
        new = keys.shape[2]
        if self.keys is None or self.end + new > self.keys.shape[2]:
            self._reserve(keys, values)
        at = mx.array([self.end])
        self.keys = mx.slice_update(self.keys, keys, at, axes=(2,))
        self.values = mx.slice_update(self.values, values, at, axes=(2,))
        first, self.end = self.start, self.end + new
        if self.window is not None:
            self.start = max(self.start, self.end - (self.window - 1))
        return self.keys[:, :, first : self.end], self.values[:, :, first : self.end]

    def _reserve(self, keys: mx.array, values: mx.array) -> None:
        """New buffers holding the cached positions at their start and room for ``keys`` and more."""
        needed = self.length + keys.shape[2]
        capacity = -(-(needed + max(self.step, self.length // 4)) // self.step) * self.step
        B, H, _, D = keys.shape
        fresh_keys = mx.zeros((B, H, capacity - self.length, D), keys.dtype)
        fresh_values = mx.zeros((B, H, capacity - self.length, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = fresh_keys, fresh_values
        else:
            cached_keys, cached_values = self.state
            self.keys = mx.concatenate([cached_keys, fresh_keys], axis=2)
            self.values = mx.concatenate([cached_values, fresh_values], axis=2)
        self.start, self.end = 0, needed - keys.shape[2]

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        """The cached keys and values (views of the buffers)."""
        return self.keys[:, :, self.start : self.end], self.values[:, :, self.start : self.end]

    @state.setter
    def state(self, state: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = state
        self.start, self.end = 0, self.keys.shape[2]

    @property
    def meta_state(self) -> tuple[str]:
        return (str(self.window),)

    @classmethod
    def from_state(cls, state: tuple[mx.array, mx.array], meta_state: tuple[str]) -> "LayerCache":
        layer = cls(None if meta_state[0] == "None" else int(meta_state[0]))
        layer.state = state
        return layer

    @property
    def buffers(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.buffers)


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
        """A snapshot; cheap: it shares the buffers, which ``extend`` never changes in place
        while another cache holds them (see ``LayerCache``)."""
        other = DiffusionCache.__new__(DiffusionCache)
        other.offset, other.left_padding = self.offset, self.left_padding
        other.layers = []
        for layer in self.layers:
            twin = LayerCache(layer.window)
            twin.keys, twin.values, twin.start, twin.end = layer.keys, layer.values, layer.start, layer.end
            other.layers.append(twin)
        return other

    def state(self) -> list[mx.array]:
        """The buffers, to evaluate after an encode."""
        return [a for layer in self.layers for a in layer.buffers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

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
