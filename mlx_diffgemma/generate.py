"""Block-diffusion generation: canvases denoised in parallel, committed one after another.

Layers, bottom-up: ``denoise_canvas`` (the inner loop over denoising steps),
``generate_step`` (prefill, then canvas after canvas, token ids only),
``stream_generate`` (text deltas, drafts and statistics) and ``generate``/``batch_generate``.
"""

from __future__ import annotations

import hashlib
import math
import time
from bisect import bisect_right
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from os.path import commonprefix
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from mlx_lm.generate import wired_limit
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, StreamingDetokenizer

from . import host
from .cache import DiffusionCache
from .compiled import compiled_step
from .constrained import Automaton, Guide, automaton_for, check_length
from .freezing import Freezer
from .model import Model, gathered_experts
from .prompt_cache import PromptCache
from .reply import Markers, Reply, ReplyStream
from .sampler import DiffusionSettings, accept, distribution, is_stable, renoise, sample, temperature
from .vision import attach_images, split_image_parts

PREFILL_STEP_SIZE = 512

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


class Noise(Protocol):
    """Where the randomness of denoising comes from: a function of (canvas, step) only,
    so a row's output does not depend on how long other rows of its batch denoise."""

    def initial_canvas(self, canvas: int, shape: tuple[int, int]) -> mx.array: ...

    def step(self, canvas: int, step: int, shape: tuple[int, int]) -> tuple[mx.array, mx.array]:
        """Uniform numbers for sampling and uniform token ids for renoising, both ``shape``."""
        ...


class SeededNoise:
    """Noise from MLX's counter-based generator. Row ``r`` of a batch draws from its own
    stream, seeded with ``seed + r``: identical prompts in one batch get independent
    samples (as the reference draws per row), and row ``r`` equals a run of its prompt
    alone with seed ``seed + r``."""

    def __init__(self, vocab_size: int, seed: int | None = None):
        self.vocab_size = vocab_size
        self.seed = seed if seed is not None else random_seed()
        self._canvas_keys: tuple[int, list[mx.array]] | None = None

    def _keys(self, canvas: int, rows: int) -> list[mx.array]:
        """Per row, the key of one canvas."""
        if self._canvas_keys is None or self._canvas_keys[0] != canvas or len(self._canvas_keys[1]) < rows:
            keys = [mx.random.split(mx.random.key(self.seed + r), canvas + 1)[canvas] for r in range(rows)]
            self._canvas_keys = (canvas, keys)
        return self._canvas_keys[1][:rows]

    def initial_canvas(self, canvas: int, shape) -> mx.array:
        keys = self._keys(canvas, shape[0])
        return mx.stack([mx.random.randint(0, self.vocab_size, shape[1:], key=mx.random.split(k, 1)[0]) for k in keys])

    def step(self, canvas: int, step: int, shape) -> tuple[mx.array, mx.array]:
        uniform, tokens = [], []
        for key in self._keys(canvas, shape[0]):
            uniform_key, token_key = mx.random.split(mx.random.split(key, step + 2)[step + 1], 2)
            uniform.append(mx.random.uniform(shape=shape[1:], key=uniform_key))
            tokens.append(mx.random.randint(0, self.vocab_size, shape[1:], key=token_key))
        return mx.stack(uniform), mx.stack(tokens)


def random_seed() -> int:
    return int(time.time_ns() % 2**31)


def shared_seed(model: Model, seed: int | None) -> int:
    """``seed``, or a fresh one; on a sharded model, rank 0's choice on every rank, since
    ranks that denoise different canvases would silently mix halves of two."""
    group = model.group
    if seed is not None or group is None or group.size() == 1:
        return seed if seed is not None else random_seed()
    mine = mx.array(random_seed() if group.rank() == 0 else 0, dtype=mx.int32)
    return int(mx.distributed.all_sum(mine, group=group).item())


@dataclass
class Prefilled:
    """The prompt is in the cache."""

    tokens: int


@dataclass
class Draft:
    """The argmax canvas after a denoising step."""

    step: int
    tokens: mx.array  # [B, C]


@dataclass
class Canvas:
    """A committed canvas: new tokens per row (EOS and what follows dropped)."""

    index: int
    tokens: list[list[int]]
    finish_reasons: list[str | None]  # per row: "stop" (EOS), "length" (max_tokens), or None
    steps: int  # denoising steps run for this canvas
    forward_passes: list[int]  # per row, the steps before the row stopped denoising
    valid_tokens: list[int]  # per row, canvas tokens up to and including EOS (the reference's count)


def denoise_canvas(
    model: Model, cache, index: int, batch_size: int, settings: DiffusionSettings, noise: Noise,
    fixed: mx.array | None = None, guides: Sequence[Guide | None] | None = None,
) -> Generator[Draft, None, tuple[mx.array, list[int]]]:
    """Denoise one canvas; yields a draft per step, returns the argmax canvas and per-row passes.

    ``fixed`` ``[B, C]`` clamps positions to token ids (``-1`` leaves a position free): they
    start in the canvas, are never renoised, and are their own argmax. The entropy bound
    and the stopping rule see only the free positions; self-conditioning sees, at a fixed
    position, the model's own distribution or a one-hot of the token
    (``settings.fixed_self_conditioning``).

    ``guides`` (per row, or ``None`` for a free row) constrain a row to a regular language
    (``constrained.py``): its argmax is the most probable accepted canvas, its samples are
    drawn from accepted canvases and its entropies are conditioned on acceptance.
    """
    shape = (batch_size, settings.canvas_length)
    free = None if fixed is None else fixed < 0

    def clamp(tokens: mx.array) -> mx.array:
        return tokens if free is None else mx.where(free, tokens, fixed).astype(tokens.dtype)

    canvas = clamp(noise.initial_canvas(index, shape))
    one_hot = None
    if free is not None and settings.fixed_self_conditioning == "one_hot":
        one_hot = mx.arange(model.args.vocab_size) == mx.maximum(fixed, 0)[..., None]  # read only where not free
    # What the next step self-conditions on: the previous step's logits, or, when the softmax
    # the model would take of them is exactly the sampler's (float32, full softmax), the
    # sampler's probabilities, so that the vocabulary is not exponentiated again.
    reuse_probs = settings.self_conditioning_top_k == 0 and model.compute_dtype == mx.float32
    # The same step as one compiled graph, where nothing in it reads the host (compiled.py).
    freezer = None
    if settings.freeze_after:
        if guides is not None:
            raise ValueError("frozen positions (freeze_after) cannot be combined with a constraint")
        freezer = Freezer(shape, settings.freeze_after, len(model.layers))
    plain = fixed is None and guides is None and freezer is None
    fast = compiled_step(model, cache, settings, batch_size) if plain else None
    # On the CPU path the sampler's step over the logits runs in numpy (host.py), in their buffer,
    # which then holds the probabilities or, for self-conditioning on logits or for a guide, the scaled logits.
    on_host = freezer is None and not gathered_experts()
    keep_probs = reuse_probs and guides is None
    # Every position of every row guided: the free sampler's argmax, entropies and samples are never read.
    all_guided = guides is not None and all(g is not None and g.positions == shape[1] for g in guides)
    argmax, sc, history = canvas, None, []
    done = mx.zeros((batch_size,), dtype=mx.bool_)
    passes = np.zeros(batch_size, dtype=np.int64)
    for step, remaining in enumerate(range(settings.steps, 0, -1)):
        stopped = np.array(done)
        passes += ~stopped
        # Rows that already stopped keep their argmax, canvas and self-conditioning input;
        # when none has, the previous input is released as soon as the forward has read it.
        held = sc if stopped.any() and freezer is None else None  # a stopped row's open positions: none
        on_host_step = None
        guided_scaled = None  # a fully guided step on the host: the scaled logits, in numpy
        uniform, noise_tokens = noise.step(index, step, shape) if remaining > 1 else (None, None)
        if fast is not None:
            new_canvas, new_argmax, sc, token_entropy = fast(canvas, sc, temperature(remaining, settings), uniform,
                                                             noise_tokens)
        elif freezer is not None:  # only the open positions: every array below is [B, m, ...]
            open_index, rows = freezer.next_index()
            if sc is not None and rows is not None:
                sc = mx.take_along_axis(sc, rows[..., None], axis=1)
            logits = model.denoise(canvas, cache, None if reuse_probs else sc, settings.self_conditioning_top_k,
                                   sc if reuse_probs else None, open_index, freezer.keys_values)
            scaled = logits / temperature(remaining, settings)
            sc = logits = None
            new_argmax = clamp(freezer.spread(scaled.argmax(axis=-1), argmax))  # frozen: their token, argmax then
        else:
            logits = model.denoise(canvas, cache, None if reuse_probs else sc, settings.self_conditioning_top_k,
                                   sc if reuse_probs else None)
            sc = None
            if on_host and remaining > 1 and all_guided and reuse_probs:
                guided_scaled = host.tempered_softmax(logits, temperature(remaining, settings))
            elif on_host and remaining > 1:
                on_host_step = host.sampler_step(logits, temperature(remaining, settings), uniform, keep_probs=keep_probs)
            if guided_scaled is not None:  # only what the guides read; the logits now hold their softmax
                scaled, probs, new_argmax = guided_scaled, logits, None
            elif on_host_step is None:
                scaled = logits / temperature(remaining, settings)
                new_argmax = scaled.argmax(axis=-1)
            else:
                new_argmax, kept, token_entropy, samples = on_host_step
                probs, scaled = (kept, None) if keep_probs else (None, kept)
                if guides is not None:  # a guide reads the scaled logits and their softmax
                    probs = host.softmax(scaled)
                    probs = mx.softmax(scaled, axis=-1) if probs is None else probs
            if new_argmax is not None:
                new_argmax = clamp(new_argmax.astype(canvas.dtype))
            logits = None
        if remaining == 1:  # the last step: only its argmax is committed, nothing else is used
            if guides is not None:
                new_argmax = _guided_argmax(guides, scaled, new_argmax)
            argmax = mx.where(done[:, None], argmax, new_argmax) if stopped.any() else new_argmax
            mx.eval(argmax)
            yield Draft(step=step + 1, tokens=argmax)
            break
        if fast is None:
            sampled = on_host_step is not None or guided_scaled is not None
            if not sampled:
                probs, token_entropy = distribution(scaled)
            if freezer is not None:  # frozen positions keep their token and are certain, as fixed ones
                samples = freezer.spread(sample(probs, freezer.take(uniform)), canvas)
                token_entropy = freezer.spread(token_entropy, mx.zeros(shape))
            elif not sampled:
                samples = sample(probs, uniform)
            if guides is not None:
                free_row = None if all_guided else (samples, new_argmax, token_entropy)
                samples, new_argmax, token_entropy = _guided_step(guides, scaled, probs, uniform, noise_tokens, free_row)
                new_argmax = clamp(new_argmax)
            if free is not None:  # fixed positions are certain: they take nothing from the entropy budget
                token_entropy = mx.where(free, token_entropy, 0.0)
            accepted = accept(token_entropy, settings.entropy_bound)
            new_canvas = clamp(renoise(samples, accepted, noise_tokens))
            sc = probs if reuse_probs else scaled
            if one_hot is not None:
                point = one_hot.astype(sc.dtype) if reuse_probs else mx.where(one_hot, 0.0, -mx.inf).astype(sc.dtype)
                keep = free if freezer is None else freezer.take(free)
                sc = mx.where(keep[..., None], sc, point if freezer is None else freezer.take(point))
            del probs, scaled
        if stopped.any():
            new_argmax = mx.where(done[:, None], argmax, new_argmax)
            new_canvas = mx.where(done[:, None], canvas, new_canvas)
        if held is not None:
            sc = mx.where(done[:, None, None], held, sc)
        counted = free  # the positions the stopping rule averages over: not fixed, not frozen
        if freezer is not None:
            counted = freezer.open_mask() if free is None else free & freezer.open_mask()
        if counted is None:
            mean_entropy = token_entropy.mean(axis=-1)
        else:
            mean_entropy = token_entropy.sum(axis=-1) / mx.maximum(counted.sum(axis=-1), 1)
        confident = mean_entropy < settings.confidence_threshold
        done = done | (is_stable(history, new_argmax, settings.stability_threshold) & confident)
        if freezer is not None:
            freezer.update(accepted, samples, new_argmax, argmax, done)
        history = (history + [new_argmax])[-settings.stability_threshold :] if settings.stability_threshold else []
        canvas, argmax = new_canvas, new_argmax
        del held
        mx.eval(canvas, argmax, sc, done)
        yield Draft(step=step + 1, tokens=argmax)
        if done.all().item():
            break
    return argmax, passes.tolist()


def _guided_argmax(guides: Sequence[Guide | None], scaled: mx.array, argmax: mx.array) -> mx.array:
    """``argmax`` with each guided row's counted positions replaced by its most probable accepted canvas."""
    logits, out = _host_view(scaled), np.array(argmax)
    for row, guide in enumerate(guides):
        if guide is not None:
            out[row, : guide.positions] = guide.argmax(logits[row])
    return mx.array(out, dtype=argmax.dtype)


def _guided_step(guides: Sequence[Guide | None], scaled: mx.array | np.ndarray, probs: mx.array, uniform: mx.array,
                 noise_tokens: mx.array, free: tuple[mx.array, mx.array, mx.array] | None
                 ) -> tuple[mx.array, mx.array, mx.array]:
    """Samples, argmax and entropies with the guided rows' counted positions constrained, the
    rest taken from ``free`` (the free sampler's samples, argmax and entropies; ``None`` when
    every position of every row is guided).

    The draw of a sampled canvas's last state takes its uniform number from the step's
    renoise token at position 0 (the noise gives one uniform number per position).
    """
    logits, p, u = _host_view(scaled), _host_view(probs), np.array(uniform)
    shape = logits.shape[:2]
    if free is None:
        outs = [np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.float32)]
    else:
        outs = [np.array(a) for a in free]
    for row, guide in enumerate(guides):
        if guide is not None:
            end_uniform = (int(noise_tokens[row, 0].item()) + 0.5) / logits.shape[-1]
            for out, part in zip(outs, guide.step(logits[row], p[row], u[row], end_uniform)):
                out[row, : guide.positions] = part
    return mx.array(outs[0], dtype=mx.int32), mx.array(outs[1], dtype=mx.int32), mx.array(outs[2])


def _host_view(a: mx.array | np.ndarray) -> np.ndarray:
    """``a`` as numpy, without a copy where it is one float32 buffer."""
    if isinstance(a, np.ndarray):
        return a
    view = host.buffer_view(a)
    return np.array(a) if view is None else view.reshape(a.shape)


def prefill(model: Model, input_ids: mx.array, cache, step_size: int = PREFILL_STEP_SIZE,
            image_features: mx.array | None = None) -> None:
    """Encode a prompt in chunks, so attention temporaries stay bounded on long prompts
    (in one pass when it holds images, so that no image is split)."""
    if image_features is not None:
        model.encode(input_ids, cache, image_features)
        mx.eval(cache.state())
        return
    for start in range(0, input_ids.shape[1], step_size):
        model.encode(input_ids[:, start : start + step_size], cache)
        mx.eval(cache.state())


def _fixed_canvas(fixed: Sequence[Sequence[int | None]] | None, start: int, width: int) -> mx.array | None:
    """Rows of fixed token ids (``-1`` where free) for the canvas at output position ``start``."""
    if fixed is None:
        return None
    rows = [[-1 if t is None else t for t in row[start : start + width]] for row in fixed]
    if all(t < 0 for row in rows for t in row):
        return None
    return mx.array([row + [-1] * (width - len(row)) for row in rows], dtype=mx.int32)


def _commit(row: list[int], eos: set[int], budget: int, pad: int) -> tuple[list[int], str | None, int]:
    """Cut a row's canvas at its first EOS id (dropped) or at its token budget.

    Returns the kept tokens, the finish reason, and the tokens the reference counts as
    generated for tokens per forward pass: the canvas up to and including EOS, less any
    that equal the pad id (the reference pads after EOS, then counts non-pad tokens).
    """
    first_eos = next((i for i, token in enumerate(row) if token in eos), None)
    valid = sum(token != pad for token in row[: None if first_eos is None else first_eos + 1])
    if first_eos is not None and first_eos < budget:
        return row[:first_eos], "stop", valid
    return row[:budget], "length" if len(row) >= budget else None, valid


def generate_step(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    settings: DiffusionSettings,
    eos_token_ids: Sequence[int],
    noise: Noise,
    pad_token_id: int = 0,
    cache: DiffusionCache | None = None,
    fixed: Sequence[Sequence[int | None]] | None = None,
    constraint: Automaton | Sequence[Automaton] | None = None,
    image_features: mx.array | None = None,
) -> Iterator[Prefilled | Draft | Canvas]:
    """Generate for a batch of token-id prompts (left-padded); yields the end of prefill, drafts and committed canvases.

    With ``cache`` (one prompt), the prompt continues what the cache already holds. Committed
    canvases are encoded into the cache as the next one starts; the last one is not.
    ``fixed`` gives per row a token id, or ``None`` for a free position, for the first
    output positions (across canvases); the rest is free (``denoise_canvas``).
    ``constraint`` (one automaton, or one per row) keeps each row's output in an automaton's
    language: each canvas ends in
    a state that can still be completed within the tokens left, and its committed tokens
    carry the state to the next canvas. ``image_features`` are the soft tokens of the
    prompts' images (``vision.attach_images``).
    """
    if constraint is not None and fixed is not None:
        raise ValueError("fixed tokens and a constraint cannot be combined")
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    if cache is None:
        cache = model.make_cache(left_padding=[width - n for n in lengths])
    elif len(prompts) != 1:
        raise ValueError("a reused cache serves one prompt at a time")
    ids = mx.array([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    prefill(model, ids, cache, image_features=image_features)
    yield Prefilled(ids.size)
    budgets = [max_tokens] * len(prompts)
    reasons: list[str | None] = [None] * len(prompts)
    eos = set(eos_token_ids)
    automata = [constraint] * len(prompts) if isinstance(constraint, Automaton) else constraint
    states = [a.start for a in automata] if automata is not None else []
    for index in range(math.ceil(max_tokens / settings.canvas_length)):
        if index > 0:
            model.encode(argmax, cache)
        canvas_settings = settings
        if settings.short_final_canvas:
            wanted = max(b for b, r in zip(budgets, reasons) if r is None)
            canvas_settings = replace(settings, canvas_length=min(settings.canvas_length, wanted))
        clamped = _fixed_canvas(fixed, index * settings.canvas_length, canvas_settings.canvas_length)
        guides = None
        if constraint is not None:
            counted = [min(canvas_settings.canvas_length, b) for b in budgets]
            guides = [Guide(a, q, n, b - n) if r is None else None
                      for a, q, n, b, r in zip(automata, states, counted, budgets, reasons)]
        argmax, passes = yield from denoise_canvas(model, cache, index, len(prompts), canvas_settings, noise, clamped,
                                                   guides)
        new_tokens, valid = [], []
        for row, tokens in enumerate(argmax.tolist()):
            if reasons[row] is not None:  # finished earlier: its canvas is discarded
                new_tokens.append([])
                valid.append(0)
                passes[row] = 0
                continue
            kept, reasons[row], count = _commit(tokens, eos, budgets[row], pad_token_id)
            if clamped is not None:  # fixed tokens were not denoised: they do not count
                count -= int((np.array(clamped[row, :count]) >= 0).sum())
            budgets[row] -= len(kept)
            if constraint is not None and reasons[row] is None:
                states[row] = automata[row].advance(states[row], kept)
            new_tokens.append(kept)
            valid.append(count)
        yield Canvas(index, new_tokens, list(reasons), max(passes), passes, valid)
        if all(reasons):
            return


@dataclass
class GenerationResponse:
    """One streamed update: a committed delta, or (with ``draft=True``) the live draft.

    A reply is split as it is committed (``reply.py``): ``text`` is the answer, without any
    chat-format marker; ``reasoning`` the thinking span; ``tool_calls`` the calls completed
    in this update; ``raw`` the decoded text as the model wrote it, markers included.
    """

    text: str  # newly committed answer text ("" for draft updates)
    tokens: list[int]  # newly committed token ids (EOS excluded)
    draft: str | None  # the current canvas's argmax text, during denoising
    step: int | None  # denoising step of the draft
    prompt_tokens: int
    prompt_tps: float
    cached_tokens: int  # prompt tokens reused from a prompt cache instead of encoded
    generation_tokens: int
    generation_tps: float
    steps_per_canvas: list[int] = field(default_factory=list)
    tokens_per_forward: float = 0.0
    peak_memory: float = 0.0  # GB
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None while running
    index: int = 0  # the row of a batch this response belongs to
    reasoning: str = ""  # newly committed reasoning text
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments"} completed now
    raw: str = ""  # newly committed text as decoded, markers included
    stop_string: str | None = None  # with finish_reason "stop": the stop string that ended the reply, if one did


def prepare_prompt(tokenizer, prompt: Prompt, images: list[Any] | None = None, **template_kwargs: Any) -> list[int]:
    """Token ids from text, ids, or chat messages (chat template with the generation prompt).

    ``template_kwargs`` (``tools``, ``enable_thinking``, ...) go to the chat template, so
    they apply to chat messages only; ``None`` values are left out. With ``images`` (a list),
    the image parts of chat messages are moved into it (their sources, in order) and the
    template renders an image placeholder for each (``vision.split_image_parts``).
    """
    template_kwargs = {k: v for k, v in template_kwargs.items() if v is not None}
    messages = not isinstance(prompt, str) and bool(prompt) and all(isinstance(m, dict) for m in prompt)
    if template_kwargs and not messages:
        raise ValueError(f"{', '.join(sorted(template_kwargs))} apply to chat messages only, not to a text or token prompt")
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    prompt = list(prompt)
    if messages:
        if not getattr(tokenizer, "has_chat_template", True):
            raise ValueError("this model has no chat template: send the prompt as plain text (--raw on the command line)")
        if images is not None:
            prompt, found = split_image_parts(prompt)
            images.extend(found)
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **template_kwargs))
    if all(isinstance(t, (int, np.integer)) for t in prompt):
        return [int(t) for t in prompt]
    raise ValueError("prompt must be a string, a list of token ids, or a list of chat messages")


def fitting_tokens(model: Model, prompt_tokens: int, canvas: int) -> int:
    """The most new tokens that fit the context after a prompt: whole canvases only, since
    every canvas occupies its full length in the cache whatever is kept of it."""
    return max(0, (model.args.max_position_embeddings - prompt_tokens) // canvas * canvas)


def check_request(model: Model, prompts: list[list[int]], max_tokens: int, canvas: int) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens!r})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt is empty")
    vocab = model.args.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt has token ids outside the vocabulary (0..{vocab - 1})")
    needed = max(len(p) for p in prompts) + math.ceil(max_tokens / canvas) * canvas
    if needed > model.args.max_position_embeddings:
        raise ValueError(
            f"prompt too long: {max(len(p) for p in prompts)} prompt tokens plus {max_tokens} new tokens "
            f"(in canvases of {canvas}) exceed the model's context of {model.args.max_position_embeddings}"
        )


def resolve_settings(model: Model, settings: DiffusionSettings | None = None, **overrides: Any) -> DiffusionSettings:
    """``settings`` with the ``overrides`` that are not ``None``. Without ``settings``: the
    checkpoint's generation config over the reference defaults (``DiffusionSettings``)."""
    explicit = {k: v for k, v in overrides.items() if v is not None}
    if settings is not None:
        return replace(settings, **explicit) if explicit else settings
    return DiffusionSettings(**{"canvas_length": model.args.canvas_length, **model.generation_defaults, **explicit})


def _exact_detokenizer(tokenizer) -> StreamingDetokenizer | None:
    """mlx-lm's streaming detokenizer where its text is meant to be the tokenizer's decode:
    the byte-level ones (SentencePiece, BPE) of a tokenizer that cleans up no spaces."""
    detokenizer = getattr(tokenizer, "detokenizer", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return detokenizer if isinstance(detokenizer, (SPMStreamingDetokenizer, BPEStreamingDetokenizer)) else None


class ReplyText:
    """One row's committed tokens and the text released from them.

    What is released always decodes from exactly the tokens released: text is held back
    while it may be an incomplete character or the start of a stop string, and a reply cut
    at a stop string keeps only the tokens before it, so ids, counts and text agree.

    The text streams from mlx-lm's detokenizer, token by token. Each release is checked with
    the tokenizer's decode of the unreleased tokens only, so the reply is not decoded again at
    every canvas: the tokens released must decode to the text released, alone and followed
    by the tokens held back (Hugging Face's byte fallback turns a whole run of byte tokens to
    U+FFFD when the run ends in an incomplete character, so such a run is held back whole).
    Where streaming cannot be trusted (a tokenizer without a byte-level detokenizer, an id
    outside the tokenizer, a release the tokenizer decodes otherwise), the whole reply is
    decoded at every canvas from then on.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.released, self.text = 0, ""  # tokens released, and their text
        self.stopped_by: str | None = None  # the stop string that ended the reply
        self.detokenizer = _exact_detokenizer(tokenizer)  # None: decode the whole reply instead
        # Token counts where the streamed text is their whole text, and the length of that text.
        self.counts, self.lengths = [0], [0]

    def add(self, new_tokens: list[int], finished: bool) -> tuple[str, list[int], bool]:
        """Commit ``new_tokens``; return the text and tokens now released and whether a stop string ended the reply."""
        self.tokens += new_tokens
        release = self._streamed(new_tokens, finished) if self.detokenizer is not None else None
        if release is None:
            self.detokenizer = None
            release = self._decoded(finished)
        end, text, cut = release
        if cut >= 0:
            self.tokens = self.tokens[:end]
        delta_text, delta_tokens = text[len(self.text):], self.tokens[self.released:end]
        self.released, self.text = end, text
        return delta_text, delta_tokens, cut >= 0

    def _stop(self, full: str, finished: bool) -> tuple[int, int | None]:
        """Where a stop string begins in ``full`` (-1: nowhere), and the longest text that may
        be released (``None``: all of it). No stop string begins in released text: it was held back."""
        found = [(i, s) for s in self.stop if (i := full.find(s, len(self.text))) >= 0]
        cut, self.stopped_by = min(found) if found else (-1, None)
        return cut, cut if cut >= 0 else None if finished else len(full.rstrip("\ufffd")) - self.hold

    def _streamed(self, new_tokens: list[int], finished: bool) -> tuple[int, str, int] | None:
        """The release from the streamed text: tokens, their text, the stop string's place; ``None``
        where streaming cannot be trusted."""
        detokenizer, vocab = self.detokenizer, len(self.tokenizer)
        for token in new_tokens:
            if not 0 <= token < vocab:
                return None
            detokenizer.add_token(token)
            if len(detokenizer.text) > self.lengths[-1]:  # it grows only when no byte is pending
                self.counts.append(len(detokenizer.tokens))
                self.lengths.append(len(detokenizer.text))
        if finished:
            detokenizer.finalize()
            self.counts.append(len(detokenizer.tokens))
            self.lengths.append(len(detokenizer.text))
        full = detokenizer.text
        cut, limit = self._stop(full, finished)
        i = len(self.counts) - 1 if limit is None else bisect_right(self.lengths, max(limit, len(self.text))) - 1
        unreleased = None if limit is None else self.tokenizer.decode(self.tokens[self.released:])
        while True:
            end, delta = self.counts[i], full[len(self.text) : self.lengths[i]]
            if self.tokenizer.decode(self.tokens[self.released : end]) != delta:
                return None
            if unreleased is None or unreleased.startswith(delta):
                return end, full[: self.lengths[i]], cut
            # The tokens after these still turn some of their text to U+FFFD: hold that back.
            i = bisect_right(self.lengths, len(self.text) + len(commonprefix([unreleased, delta]))) - 1

    def _decoded(self, finished: bool) -> tuple[int, str, int]:
        """The release from the whole reply decoded."""
        full = self.tokenizer.decode(self.tokens)
        cut, limit = self._stop(full, finished)
        end = len(self.tokens) if limit is None else self._last_fitting(full, limit)
        return end, self.tokenizer.decode(self.tokens[:end]), cut

    def _last_fitting(self, full: str, limit: int) -> int:
        """The most tokens whose text is a complete prefix of ``full`` no longer than ``limit``."""
        def fits(k: int) -> bool:
            text = self.tokenizer.decode(self.tokens[:k])
            return len(text) <= limit and not text.endswith("\ufffd") and full.startswith(text)

        lo, hi = self.released, len(self.tokens)
        while lo < hi:  # text length grows with k, except inside a multi-byte character
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(self.tokenizer.decode(self.tokens[:mid])) <= limit else (lo, mid - 1)
        while lo > self.released and not fits(lo):
            lo -= 1
        return lo


def stream_batch_generate(
    model: Model,
    tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
    *,
    settings: DiffusionSettings | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str = (),
    draft: bool = False,
    noise: Noise | None = None,
    prompt_cache: PromptCache | None = None,
    enable_thinking: bool | None = None,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    fixed: Sequence[int | None] | None = None,
    json_schema: Any = None,
    regex: str | None = None,
    image_features: mx.array | None = None,
    **overrides: Any,
) -> Iterator[GenerationResponse]:
    """Stream replies to several prompts at once; each response's ``index`` names its row.

    Row ``r`` draws its own noise from ``seed + r`` and equals the run of its prompt alone
    with that seed. Per committed canvas, each row that has new text or has just finished
    yields one response; with ``draft``, every denoising step yields each row's draft.
    ``settings`` (built once with ``resolve_settings``) holds the denoising settings;
    ``overrides`` change single fields of it (``steps=8``; ``None`` changes nothing). Without
    ``settings``, unset fields come from the checkpoint's generation config, else the
    reference defaults. With ``prompt_cache`` (one prompt), a prompt that extends the cached tokens
    (the next turn of a chat) encodes only what is new. ``noise`` replaces the seeded
    randomness altogether (tests pin it to compare with the reference implementation).
    For chat-message prompts, ``enable_thinking``, ``tools`` (function schemas) and other
    ``chat_template_kwargs`` go to the chat template. ``fixed`` clamps the reply's first
    positions, in every row, to token ids (``None`` leaves one free): the reply is written
    around them, as when a tool call is forced to begin the reply. ``json_schema`` (a
    schema, or ``"json_object"`` for any JSON object) or ``regex`` constrains every reply to
    the texts it accepts (``constrained.py``): even a reply ended by ``max_tokens`` is
    accepted whole, since the last canvas must end in an accepting state (a stop string,
    though, cuts the text where it matches).

    Images come in chat messages' image parts; token-id prompts whose images were already
    expanded (``vision.attach_images``, so that a caller can size the reply to the whole
    prompt) pass the images' soft tokens, every row's in order, as ``image_features``. A
    ``prompt_cache`` tells images apart by their soft tokens, so a conversation with images
    in its history encodes only its new tokens too.
    """
    resolved = resolve_settings(model, settings, **overrides)
    constraint = None
    if json_schema is not None or regex is not None:
        constraint = automaton_for(tokenizer, json_schema=json_schema, regex=regex, vocab_size=model.args.vocab_size)
        check_length(constraint, max_tokens)
    template_kwargs = {**(chat_template_kwargs or {}), "enable_thinking": enable_thinking, "tools": tools}
    images: list[list[Any]] = [[] for _ in prompts]
    ids = [prepare_prompt(tokenizer, p, images=found, **template_kwargs) for p, found in zip(prompts, images)]
    if any(images):
        if image_features is not None:
            raise ValueError("give images in chat messages or image_features with token ids, not both")
        ids, image_features = attach_images(model, ids, images)
    check_request(model, ids, max_tokens, resolved.canvas_length)
    if prompt_cache is not None and len(ids) != 1:
        raise ValueError("a prompt cache serves one prompt at a time")
    stop = [stop] if isinstance(stop, str) else list(stop)
    noise = noise or SeededNoise(model.args.vocab_size, shared_seed(model, seed))
    replies = [ReplyText(tokenizer, stop) for _ in ids]
    parts = [ReplyStream(Markers.of(tokenizer)) for _ in ids]
    steps_per_canvas: list[int] = []
    passes, valid = [0] * len(ids), [0] * len(ids)
    finished: list[str | None] = [None] * len(ids)
    to_encode, features, keys = None, image_features, ids[0]
    if prompt_cache is not None:
        if image_features is not None:
            keys = image_keys(ids[0], model.args.image_token_id, image_features)
        reused = len(keys) - len(prompt_cache.prepare(model, keys))
        to_encode = ids[0][reused:]
        if image_features is not None:  # the reused part's images are in the cache already
            seen = ids[0][:reused].count(model.args.image_token_id)
            features = image_features[seen:] if seen < image_features.shape[0] else None
    encoded = [len(to_encode)] if to_encode is not None else [len(p) for p in ids]
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_time = None

    def response(row: int, delta: Reply | None = None, raw: str = "", new_tokens=(), draft_text=None,
                 step=None) -> GenerationResponse:
        elapsed = time.perf_counter() - start - (prompt_time or 0.0)
        count, delta = len(replies[row].tokens), delta or Reply()
        return GenerationResponse(
            text=delta.answer, reasoning=delta.reasoning, tool_calls=delta.tool_calls, raw=raw,
            tokens=list(new_tokens), draft=draft_text, step=step, prompt_tokens=len(ids[row]),
            prompt_tps=sum(encoded) / prompt_time if prompt_time else 0.0, cached_tokens=len(ids[row]) - encoded[row],
            generation_tokens=count, generation_tps=count / elapsed if elapsed > 0 else 0.0,
            steps_per_canvas=list(steps_per_canvas), tokens_per_forward=valid[row] / passes[row] if passes[row] else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finished[row], index=row,
            stop_string=replies[row].stopped_by,
        )

    events = generate_step(
        model, [to_encode] if to_encode is not None else ids, max_tokens=max_tokens, settings=resolved,
        eos_token_ids=tokenizer.eos_token_ids, noise=noise, pad_token_id=model.args.pad_token_id or 0,
        cache=prompt_cache.cache if prompt_cache is not None else None,
        fixed=[list(fixed)] * len(ids) if fixed else None, constraint=constraint, image_features=features,
    )
    with wired_limit(model):
        try:
            for event in events:
                if isinstance(event, Prefilled):
                    prompt_time = time.perf_counter() - start
                    if prompt_cache is not None:
                        prompt_cache.remember_prompt(keys)
                    continue
                if isinstance(event, Draft):
                    if draft:
                        for row in (r for r in range(len(ids)) if finished[r] is None):
                            yield response(row, draft_text=tokenizer.decode(event.tokens[row].tolist()), step=event.step)
                    continue
                steps_per_canvas.append(event.steps)
                for row in (r for r in range(len(ids)) if finished[r] is None):
                    passes[row] += event.forward_passes[row]
                    valid[row] += event.valid_tokens[row]
                    raw, new, stopped = replies[row].add(event.tokens[row], event.finish_reasons[row] is not None)
                    finished[row] = "stop" if stopped else event.finish_reasons[row]
                    if raw or new or finished[row]:
                        delta = parts[row].update(replies[row].text, finished[row] is not None)
                        yield response(row, delta, raw, new)
                if all(finished):
                    return
        except (Exception, KeyboardInterrupt):
            if prompt_cache is not None:  # interrupted mid-computation: the cache may be half-written
                prompt_cache.reset(model)
            raise
        finally:
            if prompt_cache is not None:
                prompt_cache.keep(keys + replies[0].tokens)
            mx.clear_cache()


def image_keys(ids: list[int], image_token_id: int, image_features: mx.array) -> list[int]:
    """``ids`` with each image's tokens replaced by a key digested from its soft tokens: a
    prompt cache matches an image only to the same image, and never to a text token (keys
    are negative)."""
    rows = np.array(image_features.astype(mx.float32))
    out, start = list(ids), 0
    for i, t in enumerate(ids):
        if t == image_token_id and (i == 0 or ids[i - 1] != image_token_id):  # an image's first token
            n = next((j for j in range(i, len(ids)) if ids[j] != image_token_id), len(ids)) - i
            digest = hashlib.sha256(rows[start : start + n].tobytes()).digest()
            out[i : i + n] = [-1 - int.from_bytes(digest[:7], "little")] * n
            start += n
    return out


def stream_generate(model: Model, tokenizer, prompt: Prompt, max_tokens: int = 256, **kwargs: Any) -> Iterator[GenerationResponse]:
    """Stream a reply canvas by canvas; with ``draft=True``, also each denoising step's draft.

    Keyword arguments as ``stream_batch_generate``: ``settings`` and single settings,
    ``seed``, ``stop``, ``draft``, ``noise``, ``prompt_cache``, ``enable_thinking``, ``tools``,
    ``chat_template_kwargs``, ``fixed``, ``json_schema``, ``regex`` and ``image_features``.
    """
    return stream_batch_generate(model, tokenizer, [prompt], max_tokens, **kwargs)


def generate(model: Model, tokenizer, prompt: Prompt, max_tokens: int = 256, **kwargs: Any) -> str:
    """The whole answer as a string (reasoning and tool calls apart: see ``stream_generate``);
    keyword arguments as ``stream_generate``."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))


def batch_generate(model: Model, tokenizer, prompts: Sequence[Prompt], max_tokens: int = 256, **kwargs: Any) -> list[str]:
    """Replies to several prompts at once; row ``r`` equals its prompt alone with seed ``seed + r``.

    Keyword arguments as ``stream_batch_generate``.
    """
    texts = [""] * len(prompts)
    for response in stream_batch_generate(model, tokenizer, prompts, max_tokens, **kwargs):
        texts[response.index] += response.text
    return texts
