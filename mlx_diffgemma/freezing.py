"""Frozen positions: an opt-in approximation that runs only the still-open canvas positions.

Once a position's accepted sample has equalled an unchanged argmax for
``settings.freeze_after`` steps in a row, it is frozen: its token stays in the canvas, and
from then on it is neither run through the layers nor given logits. Attention still reads
its keys and values from its last step (``Model.denoise``'s ``canvas_keys_values``), so
they go stale. The reference re-predicts every position
at every step; this trades that for fewer FLOPs per step as a canvas settles. Its quality is
measured on the Sudoku model (benchmarks/SUDOKU.md).

The bookkeeping is per row and on the host: which positions are open, their indices padded to
one width for the batch, and the previous step's self-conditioning rows gathered to match.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class Freezer:
    """The frozen positions of one canvas batch and the canvas keys and values they keep."""

    def __init__(self, shape: tuple[int, int], freeze_after: int, num_layers: int):
        self.freeze_after = freeze_after
        self.frozen = np.zeros(shape, dtype=bool)
        self.streak = np.zeros(shape, dtype=np.int64)
        self.keys_values: list[tuple[mx.array, mx.array] | None] = [None] * num_layers
        self.index_np = np.broadcast_to(np.arange(shape[1]), shape).copy()
        self.index = mx.array(self.index_np)
        self.has_open = mx.ones((shape[0], 1), dtype=mx.bool_)
        self.open_positions = 0  # summed over steps and rows: the positions that ran

    def next_index(self) -> tuple[mx.array, mx.array | None]:
        """This step's open positions ``[B, m]`` (sorted; a row with fewer repeats its last,
        or position 0 if none is left) and, where they differ from the last step's, the rows of
        the last step's outputs to gather for them (else ``None``)."""
        open_ = ~self.frozen
        width = max(int(open_.sum(axis=1).max()), 1)
        index = np.zeros((open_.shape[0], width), dtype=np.int64)
        for row, mask in enumerate(open_):
            positions = np.flatnonzero(mask)
            if len(positions):
                index[row, : len(positions)] = positions
                index[row, len(positions) :] = positions[-1]
        self.open_positions += int(open_.sum())
        self.has_open = mx.array(open_.any(axis=1, keepdims=True))
        if index.shape == self.index_np.shape and (index == self.index_np).all():
            return self.index, None
        rows = np.stack([np.minimum(np.searchsorted(old, new), len(old) - 1) for old, new in zip(self.index_np, index)])
        self.index_np, self.index = index, mx.array(index)
        return self.index, mx.array(rows)

    def spread(self, values: mx.array, default: mx.array) -> mx.array:
        """``[B, m]`` values of the open positions written over ``default`` ``[B, C]`` (a row
        with none left ran a stand-in position: it keeps ``default``)."""
        values = mx.where(self.has_open, values.astype(default.dtype), self.take(default))
        return mx.put_along_axis(default, self.index, values, axis=1)

    def open_mask(self) -> mx.array:
        """``[B, C]``: the positions not frozen at this step."""
        return mx.array(~self.frozen)

    def take(self, values: mx.array) -> mx.array:
        """The open positions of ``[B, C, ...]`` values."""
        index = self.index.reshape(self.index.shape + (1,) * (values.ndim - 2))
        return mx.take_along_axis(values, index, axis=1)

    def update(self, accepted: mx.array, samples: mx.array, argmax: mx.array, previous: mx.array, done: mx.array) -> None:
        """Count the steps each open position's accepted sample equalled an unchanged argmax;
        freeze those that reach ``freeze_after``, and every position of a stopped row."""
        settled = np.array(accepted & (samples == argmax) & (argmax == previous))
        self.streak = np.where(settled & ~self.frozen, self.streak + 1, 0)
        self.frozen |= self.streak >= self.freeze_after
        self.frozen[np.array(done)] = True
