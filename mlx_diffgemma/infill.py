"""Infilling: the text between a prefix and a suffix, written by a canvas clamped around it.

The prefix is the prompt. The canvas holds ``L`` free positions, then the suffix fixed in
place, then end of text (EOS, then pad, as a finished reply's last canvas looks). The
middle's length ``L`` is unknown, so several lengths are denoised side by side, one per
row of a batch, and the rule keeps the one whose canvas the model finds most likely: the
lowest mean negative log-likelihood over the middle *and the suffix* (a middle of the
wrong length leaves the suffix a poor continuation). ``benchmarks/infill.py`` measures
the rule where the true length is known and shorter and longer candidates exist
(``benchmarks/INFILL.md``).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .generate import Draft, SeededNoise, denoise_canvas, prefill, resolve_settings, shared_seed
from .model import Model
from .sampler import DiffusionSettings

DEFAULT_LENGTHS = (4, 8, 16, 32, 64, 128)


@dataclass
class Infill:
    tokens: list[int]  # the middle
    length: int  # the chosen length
    scores: dict[int, float]  # mean negative log-likelihood per candidate length (lower is likelier)
    text: str = ""  # the middle, decoded (``infill``)
    steps: int = 0  # denoising steps run


def candidate_lengths(room: int, lengths: Sequence[int] | None) -> list[int]:
    """The lengths to try: those asked for (or the defaults) that fit, the room itself among the defaults."""
    wanted = sorted(set(lengths)) if lengths is not None else sorted({n for n in DEFAULT_LENGTHS if n < room} | {room})
    if lengths is not None and any(not isinstance(n, int) or n < 1 for n in wanted):
        raise ValueError("infill lengths must be positive integers")
    fitting = [n for n in wanted if n <= room]
    if not fitting:
        raise ValueError(f"no infill length fits: the canvas leaves room for {room} tokens between prefix and suffix")
    return fitting


def stream_infill_tokens(
    model: Model,
    prefix: Sequence[int],
    suffix: Sequence[int],
    *,
    end: Sequence[int],
    pad: int,
    lengths: Sequence[int] | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    lead: Sequence[int] = (),
    settings: DiffusionSettings | None = None,
    **overrides: Any,
) -> Generator[Draft, None, Infill]:
    """Denoise the candidates for the middle between ``prefix`` and ``suffix``, a draft per
    step; the generator returns the ``Infill``. ``end`` follows the suffix (EOS).

    The input is checked at once (a ``ValueError``), before any denoising. ``max_tokens``
    bounds the middle's length. ``lead`` are tokens fixed at the start of the canvas, before
    the middle (the part of the prefix that belongs to the canvas, as a Sudoku grid's first
    cells do)."""
    settings = resolve_settings(model, settings, **overrides)
    width = settings.canvas_length
    room = width - len(lead) - len(suffix) - len(end)
    if not prefix:
        raise ValueError("infill needs a prefix")
    if not suffix:
        raise ValueError("infill needs a suffix; for a plain continuation use generate")
    if room < 1:
        raise ValueError(f"the suffix is too long: its {len(suffix)} tokens (and {len(lead) + len(end)} fixed around "
                         f"it) leave no room for a middle in a canvas of {width} tokens")
    if len(prefix) + width > model.args.max_position_embeddings:
        raise ValueError(f"prefix too long: {len(prefix)} tokens plus a canvas of {width} exceed the context")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens!r})")
    candidates = candidate_lengths(min(room, max_tokens or room), lengths)
    rows = [list(lead) + [-1] * n + list(suffix) + list(end) + [pad] * (room - n) for n in candidates]
    return _denoise_candidates(model, list(prefix), rows, candidates, len(lead), len(suffix), settings, seed)


def _denoise_candidates(model: Model, prefix: list[int], rows: list[list[int]], candidates: list[int], start: int,
                        suffix: int, settings: DiffusionSettings, seed: int | None) -> Generator[Draft, None, Infill]:
    cache = model.make_cache()
    prefill(model, mx.array([prefix] * len(rows)), cache)
    noise = SeededNoise(model.args.vocab_size, shared_seed(model, seed))
    canvas, passes = yield from denoise_canvas(model, cache, 0, len(rows), settings, noise, mx.array(rows, dtype=mx.int32))
    scores = _scores(model, cache, canvas, start, [n + suffix for n in candidates])
    best = min(range(len(candidates)), key=lambda i: scores[i])
    middle = canvas[best, start : start + candidates[best]].tolist()
    return Infill(middle, candidates[best], dict(zip(candidates, scores)), steps=max(passes))


def infill_tokens(model: Model, prefix: Sequence[int], suffix: Sequence[int], **kwargs: Any) -> Infill:
    """The middle (token ids) between ``prefix`` and ``suffix``; keyword arguments as
    ``stream_infill_tokens`` (``end`` and ``pad`` are required)."""
    return _result(stream_infill_tokens(model, prefix, suffix, **kwargs))


def _scores(model: Model, cache, canvas: mx.array, start: int, scored: list[int]) -> list[float]:
    """Mean negative log-likelihood of each row's ``scored[row]`` canvas tokens from ``start``."""
    logits = model.denoise(canvas, cache)
    nll = nn.losses.cross_entropy(logits, canvas, reduction="none")  # [B, C]
    position = mx.arange(canvas.shape[1])[None, :]
    mask = (position >= start) & (position < start + mx.array(scored)[:, None])
    return ((nll * mask).sum(axis=1) / mask.sum(axis=1)).tolist()


def stream_infill(model: Model, tokenizer, prefix: str, suffix: str, **kwargs: Any) -> Generator[Draft, None, Infill]:
    """``stream_infill_tokens`` on text (no chat template): the ``Infill`` it returns has
    ``text``, the middle decoded. Keyword arguments as ``stream_infill_tokens`` (``lengths``,
    ``max_tokens``, ``seed``, ``settings`` and single settings)."""
    if not prefix:  # encoded, an empty prefix would still hold BOS
        raise ValueError("infill needs a prefix")
    eos = sorted(tokenizer.eos_token_ids)[:1]
    steps = stream_infill_tokens(model, list(tokenizer.encode(prefix)), list(tokenizer.encode(suffix, add_special_tokens=False)),
                                 end=eos, pad=model.args.pad_token_id or 0, **kwargs)

    def decoded() -> Generator[Draft, None, Infill]:
        result = yield from steps
        result.text = tokenizer.decode(result.tokens)
        return result

    return decoded()


def infill(model: Model, tokenizer, prefix: str, suffix: str, **kwargs: Any) -> Infill:
    """The text between ``prefix`` and ``suffix``: ``stream_infill`` run to its end."""
    return _result(stream_infill(model, tokenizer, prefix, suffix, **kwargs))


def _result(steps: Generator[Draft, None, Infill]) -> Infill:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
