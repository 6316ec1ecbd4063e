"""Infilling: the text between a prefix and a suffix, written by a canvas clamped around it.

The prefix is the prompt. The canvas holds ``L`` free positions, then the suffix fixed in
place, then end of text (EOS, then pad, as a finished reply's last canvas looks). The
middle's length ``L`` is unknown, so several lengths are denoised side by side, one per
row of a batch, and the rule keeps the one whose canvas the model finds most likely: the
lowest mean negative log-likelihood over the middle *and the suffix* (a middle of the
wrong length leaves the suffix a poor continuation). ``benchmarks/infill.py`` measures
the rule on the Sudoku model, where the true length is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .generate import SeededNoise, denoise_canvas, prefill, resolve_settings, shared_seed
from .model import Model
from .sampler import DiffusionSettings

DEFAULT_LENGTHS = (4, 8, 16, 32, 64, 128)


@dataclass
class Infill:
    tokens: list[int]  # the middle
    length: int  # the chosen length
    scores: dict[int, float]  # mean negative log-likelihood per candidate length (lower is likelier)
    text: str = ""  # the middle, decoded (``infill``)


def candidate_lengths(room: int, lengths: Sequence[int] | None) -> list[int]:
    """The lengths to try: those asked for (or the defaults) that fit, the room itself among the defaults."""
    wanted = sorted(set(lengths)) if lengths is not None else sorted({n for n in DEFAULT_LENGTHS if n < room} | {room})
    if lengths is not None and any(not isinstance(n, int) or n < 1 for n in wanted):
        raise ValueError("infill lengths must be positive integers")
    fitting = [n for n in wanted if n <= room]
    if not fitting:
        raise ValueError(f"no infill length fits: the canvas leaves room for {room} tokens between prefix and suffix")
    return fitting


def infill_tokens(
    model: Model,
    prefix: Sequence[int],
    suffix: Sequence[int],
    *,
    end: Sequence[int],
    pad: int,
    lengths: Sequence[int] | None = None,
    seed: int | None = None,
    lead: Sequence[int] = (),
    settings: DiffusionSettings | None = None,
    **overrides: Any,
) -> Infill:
    """The middle (token ids) between ``prefix`` and ``suffix``; ``end`` follows the suffix (EOS).

    ``lead`` are tokens fixed at the start of the canvas, before the middle (the part of
    the prefix that belongs to the canvas, as a Sudoku grid's first cells do)."""
    settings = resolve_settings(model, settings, **overrides)
    width = settings.canvas_length
    room = width - len(lead) - len(suffix) - len(end)
    if not prefix:
        raise ValueError("infill needs a prefix")
    if room < 1:
        raise ValueError(f"the suffix ({len(suffix)} tokens) leaves no room in a canvas of {width}")
    if len(prefix) + width > model.args.max_position_embeddings:
        raise ValueError(f"prefix too long: {len(prefix)} tokens plus a canvas of {width} exceed the context")
    candidates = candidate_lengths(room, lengths)
    rows = [list(lead) + [-1] * n + list(suffix) + list(end) + [pad] * (room - n) for n in candidates]
    fixed = mx.array(rows, dtype=mx.int32)
    cache = model.make_cache()
    prefill(model, mx.array([list(prefix)] * len(rows)), cache)
    noise = SeededNoise(model.args.vocab_size, shared_seed(model, seed))
    steps = denoise_canvas(model, cache, 0, len(rows), settings, noise, fixed)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            canvas, _ = done.value
            break
    scores = _scores(model, cache, canvas, len(lead), [n + len(suffix) for n in candidates])
    best = min(range(len(candidates)), key=lambda i: scores[i])
    middle = canvas[best, len(lead) : len(lead) + candidates[best]].tolist()
    return Infill(middle, candidates[best], dict(zip(candidates, scores)))


def _scores(model: Model, cache, canvas: mx.array, start: int, scored: list[int]) -> list[float]:
    """Mean negative log-likelihood of each row's ``scored[row]`` canvas tokens from ``start``."""
    logits = model.denoise(canvas, cache)
    nll = nn.losses.cross_entropy(logits, canvas, reduction="none")  # [B, C]
    position = mx.arange(canvas.shape[1])[None, :]
    mask = (position >= start) & (position < start + mx.array(scored)[:, None])
    return ((nll * mask).sum(axis=1) / mask.sum(axis=1)).tolist()


def infill(model: Model, tokenizer, prefix: str, suffix: str, **kwargs: Any) -> Infill:
    """The text between ``prefix`` and ``suffix`` (plain text, no chat template); ``tokens``
    of the result are the middle's ids and ``text`` its decoding. Keyword arguments as
    ``infill_tokens`` (``lengths``, ``seed``, ``settings`` and single settings)."""
    if not suffix:
        raise ValueError("infill needs a suffix; for a plain continuation use generate")
    prefix_ids = list(tokenizer.encode(prefix))
    suffix_ids = list(tokenizer.encode(suffix, add_special_tokens=False))
    eos = sorted(tokenizer.eos_token_ids)[:1]
    result = infill_tokens(model, prefix_ids, suffix_ids, end=eos, pad=model.args.pad_token_id or 0, **kwargs)
    result.text = tokenizer.decode(result.tokens)
    return result
