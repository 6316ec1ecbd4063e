"""The entropy-bound sampler of DiffusionGemma, as small pure functions.

Per denoising step (``remaining`` counts down from ``steps`` to 1, as in the reference):
scale the logits by a linearly falling temperature, sample every position, accept the
lowest-entropy samples while the sum of their entropies minus the largest stays within
the bound (arXiv:2505.24857), renoise the rest with uniform random tokens, and stop the
canvas once its argmax is stable and the mean entropy is below a threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx


@dataclass(frozen=True)
class DiffusionSettings:
    """Denoising parameters; the defaults are the reference implementation's."""

    steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    confidence_threshold: float = 0.005
    stability_threshold: int = 1
    canvas_length: int = 256  # tokens denoised together; the model's own unless overridden
    # Not in the reference: denoise the last canvas only as long as the tokens still wanted
    # (faster when max_tokens is not a multiple of the canvas; changes that canvas's output).
    short_final_canvas: bool = False
    # Not in the reference: feed self-conditioning only the k most likely tokens of each
    # position (their exact probabilities; the tail is dropped) instead of the whole softmax.
    # 0 is the reference's full product with the embedding table.
    self_conditioning_top_k: int = 0
    # Not in the reference (which has no fixed tokens): what self-conditioning sees at a
    # position clamped to a token, "one_hot" of that token or "model" (its own prediction).
    fixed_self_conditioning: str = "one_hot"
    # Not in the reference (an approximation, off by default): a position whose sample was
    # accepted and equal to an unchanged argmax for this many steps in a row is frozen: its
    # token stays, and only the other positions run through the layers and the vocabulary
    # (the frozen ones' keys and values are those of their last step). 0 is off.
    freeze_after: int = 0

    def __post_init__(self):
        checks = [
            (isinstance(self.steps, int) and self.steps > 0, "steps must be a positive integer"),
            (isinstance(self.canvas_length, int) and self.canvas_length > 0, "canvas_length must be a positive integer"),
            (_positive(self.entropy_bound), "entropy_bound must be a number > 0"),
            (_number(self.t_min) and self.t_min >= 0, "t_min must be a number >= 0"),
            (_number(self.t_max) and self.t_max > 0, "t_max must be a number > 0"),
            (_number(self.t_min) and _number(self.t_max) and self.t_max >= self.t_min, "t_max must be >= t_min"),
            (_positive(self.confidence_threshold), "confidence_threshold must be a number > 0"),
            (isinstance(self.stability_threshold, int) and self.stability_threshold >= 0, "stability_threshold must be an integer >= 0"),
            (isinstance(self.self_conditioning_top_k, int) and self.self_conditioning_top_k >= 0,
             "self_conditioning_top_k must be an integer >= 0"),
            (self.fixed_self_conditioning in ("one_hot", "model"), "fixed_self_conditioning must be 'one_hot' or 'model'"),
            (isinstance(self.freeze_after, int) and self.freeze_after >= 0, "freeze_after must be an integer >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self._describe()})")

    def _describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())

    @classmethod
    def from_generation_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The settings a checkpoint's ``generation_config.json`` names, as keyword arguments."""
        names = {"max_denoising_steps": "steps", "t_min": "t_min", "t_max": "t_max",
                 "confidence_threshold": "confidence_threshold", "stability_threshold": "stability_threshold"}
        out = {ours: config[theirs] for theirs, ours in names.items() if config.get(theirs) is not None}
        bound = (config.get("sampler_config") or {}).get("entropy_bound")
        if bound is not None:
            out["entropy_bound"] = bound
        return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return _number(x) and x > 0


def temperature(remaining: int, settings: DiffusionSettings) -> float:
    """Linear schedule: ``t_max`` at the first step, ``t_min + (t_max - t_min) / steps`` at the last."""
    return settings.t_min + (settings.t_max - settings.t_min) * remaining / settings.steps


def distribution(logits: mx.array) -> tuple[mx.array, mx.array]:
    """Probabilities of the softmax of ``logits`` and their entropy in nats.

    ``H = logsumexp(x) - sum(p * x)``, the dot product taken as a batched matmul. The
    log-partition comes from the largest logit and its probability,
    ``logsumexp(x) = max(x) - log(max(p))``, so the vocabulary is exponentiated once (the
    softmax), not twice: on a CPU, ``exp`` over a canvas's logits is a large share of a step.
    """
    probs = mx.softmax(logits, axis=-1)
    lse = logits.max(axis=-1) - mx.log(probs.max(axis=-1))
    expected = (probs[..., None, :] @ logits[..., :, None])[..., 0, 0]
    return probs, lse - expected


def sample(probs: mx.array, uniform: mx.array) -> mx.array:
    """Categorical samples by inverse CDF: one uniform number per position, not one per token.

    The uniform number is scaled by the row's own total: a float32 cumsum over a large
    vocabulary ends a little off 1 (MLX's CPU scan over 262,144 values: 0.99998 to 1.00002),
    and a shortfall would otherwise send that fraction of draws to the last token id.
    """
    cdf = mx.cumsum(probs, axis=-1)
    index = (cdf < (uniform * cdf[..., -1])[..., None]).sum(axis=-1)
    return mx.minimum(index, probs.shape[-1] - 1).astype(mx.int32)


def accept(token_entropy: mx.array, bound: float) -> mx.array:
    """Accept the lowest-entropy positions while ``sum(H) - max(H) <= bound`` (at least one per row)."""
    order = mx.argsort(token_entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(token_entropy, order, axis=-1)
    keep = (mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy) <= bound
    return mx.put_along_axis(mx.zeros(keep.shape, dtype=mx.bool_), order, keep, axis=-1)


def renoise(samples: mx.array, accepted: mx.array, noise_tokens: mx.array) -> mx.array:
    """The next canvas: accepted positions keep their sample, the others get fresh uniform tokens."""
    return mx.where(accepted, samples, noise_tokens)


def is_stable(history: list[mx.array], argmax: mx.array, threshold: int) -> mx.array:
    """Rows whose argmax canvas equals each of the last ``threshold`` ones."""
    if threshold == 0:
        return mx.ones(argmax.shape[:1], dtype=mx.bool_)
    if len(history) < threshold:
        return mx.zeros(argmax.shape[:1], dtype=mx.bool_)
    stable = mx.ones(argmax.shape[:1], dtype=mx.bool_)
    for past in history[-threshold:]:
        stable = stable & (past == argmax).all(axis=-1)
    return stable
