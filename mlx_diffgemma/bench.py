"""Speed measurements (``mlx-diffgemma bench``): prefill, denoising steps, generation, memory, and
the fraction of the machine's matmul throughput a denoising step achieves."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .generate import Canvas, Draft, SeededNoise, denoise_canvas, generate_step, prefill
from .model import Model, ModelArgs
from .sampler import DiffusionSettings


@dataclass
class BenchRow:
    prompt_tokens: int
    prefill_tps: float
    step_ms: float  # one denoising step: denoiser forward plus sampling
    steps_per_canvas: float
    tokens_per_forward: float
    generation_tps: float
    peak_memory_gb: float
    step_tflops: float  # achieved by a denoising step
    matmul_fraction: float  # of the measured matmul peak
    # Per canvas of the end-to-end run, per step: the fraction of the canvas's draft that
    # already equals what it commits (how a canvas settles; 1.0 at its last step).
    settling: list[list[float]] = field(default_factory=list)


def _block_macs(args: ModelArgs, i: int) -> int:
    """Multiply-adds of block ``i`` per token, attention scores aside: q, k (v on sliding layers;
    full-attention layers reuse k as v), o; the dense MLP; the router; the top-k experts."""
    H, nH = args.hidden_size, args.num_attention_heads
    D, kv = args.layer_head_dims[i], args.layer_kv_heads[i]
    sliding = args.layer_types[i] == "sliding_attention"
    attention = H * nH * D * 2 + H * kv * D * (2 if sliding else 1)
    return attention + 3 * H * args.intermediate_size + H * args.num_experts + args.top_k_experts * 3 * H * args.moe_intermediate_size


def denoise_flops(args: ModelArgs, prefix: int, canvas: int, self_conditioning: bool = True,
                  open_positions: float | None = None) -> float:
    """Floating-point operations (2 per multiply-add) of one denoiser pass over ``canvas`` tokens
    after ``prefix`` cached ones: the blocks, attention over [visible prefix + canvas], the LM
    head, and self-conditioning (softmax @ embedding table, and its MLP) unless it is the first step.
    With frozen positions, only ``open_positions`` of the canvas run (their queries still see
    every key)."""
    H, V, nH = args.hidden_size, args.vocab_size, args.num_attention_heads
    per_token = 0
    for i, kind in enumerate(args.layer_types):
        visible = (min(prefix, args.sliding_window - 1) if kind == "sliding_attention" else prefix) + canvas
        per_token += _block_macs(args, i) + 2 * nH * args.layer_head_dims[i] * visible  # scores and values
    per_token += H * V
    if self_conditioning:
        per_token += H * V + 3 * H * args.intermediate_size
    return 2.0 * per_token * (canvas if open_positions is None else open_positions)


def prefill_flops(args: ModelArgs, prompt: int) -> float:
    """Floating-point operations of encoding a prompt: every block but the last in full, the last
    one's k/v projections only (its output feeds nothing), and causal attention within the window."""
    nH, last = args.num_attention_heads, args.num_hidden_layers - 1
    total = 0
    for i, kind in enumerate(args.layer_types[:-1]):
        window = args.sliding_window if kind == "sliding_attention" else prompt
        keys = sum(min(t + 1, window) for t in range(prompt))
        total += prompt * _block_macs(args, i) + 2 * nH * args.layer_head_dims[i] * keys
    kv_projections = 2 if args.layer_types[last] == "sliding_attention" else 1
    total += prompt * args.hidden_size * args.layer_kv_heads[last] * args.layer_head_dims[last] * kv_projections
    return 2.0 * total


def matmul_peak_flops(dtype: mx.Dtype, max_n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a plain square matmul, grown until one takes a tenth of ``seconds`` (or ``max_n``)."""
    n = 256
    while True:
        a, b = mx.random.normal((n, n)).astype(dtype), mx.random.normal((n, n)).astype(dtype)
        mx.eval(a, b, a @ b)
        start = time.perf_counter()
        mx.eval(a @ b)
        if n >= max_n or time.perf_counter() - start > seconds / 10:
            break
        n *= 2
    repeats, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        mx.eval(a @ b)
        repeats += 1
    return 2 * n**3 * repeats / elapsed


def bench_prompt(
    model: Model, prompt_tokens: int, max_tokens: int, settings: DiffusionSettings, eos_token_ids: list[int],
    peak: float, seed: int = 0,
) -> BenchRow:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.args.vocab_size, prompt_tokens).tolist()
    noise = SeededNoise(model.args.vocab_size, seed)
    mx.reset_peak_memory()

    cache = model.make_cache()
    start = time.perf_counter()
    prefill(model, mx.array([ids]), cache)
    prefill_tps = prompt_tokens / (time.perf_counter() - start)

    # Per-step time on one canvas that runs every step (no early stop).
    fixed = replace(settings, confidence_threshold=1e-30)
    times, last = [], time.perf_counter()
    for _ in denoise_canvas(model, cache, 0, 1, fixed, noise):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    step = float(np.median(times[1:] if len(times) > 1 else times))

    # End to end with the real stopping rules.
    start, tokens, passes, valid, steps = time.perf_counter(), 0, 0, 0, []
    drafts, settling = [], []
    for event in generate_step(model, [ids], max_tokens=max_tokens, settings=settings, eos_token_ids=eos_token_ids, noise=noise):
        if isinstance(event, Draft):
            drafts.append(event.tokens[0])
        elif isinstance(event, Canvas):
            tokens += len(event.tokens[0])
            passes += event.forward_passes[0]
            valid += event.valid_tokens[0]
            steps.append(event.steps)
            settling.append([(d == drafts[-1]).mean().item() for d in drafts])
            drafts = []
    elapsed = time.perf_counter() - start
    flops = denoise_flops(model.args, prompt_tokens, settings.canvas_length) / step
    return BenchRow(
        prompt_tokens, prefill_tps, step * 1e3, float(np.mean(steps)), valid / max(passes, 1), tokens / elapsed,
        mx.get_peak_memory() / 1e9, flops / 1e12, flops / peak, settling,
    )


def run_bench(
    model: Model, prompt_lengths: list[int], max_tokens: int, settings: DiffusionSettings, eos_token_ids: list[int],
    seed: int = 0,
) -> tuple[list[BenchRow], float]:
    """One row per prompt length, and the measured matmul peak (FLOP/s) in the model's dtype."""
    peak = matmul_peak_flops(model.compute_dtype)
    return [bench_prompt(model, n, max_tokens, settings, eos_token_ids, peak, seed) for n in prompt_lengths], peak


def plot_bench(rows: list[BenchRow], path: Path, title: str) -> None:
    """Two panels: how each canvas settles step by step (the first prompt length's run), and
    the time per denoising step by prompt length, labelled with the share of matmul peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (settle, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, curve in enumerate(rows[0].settling):
        settle.plot(range(1, len(curve) + 1), [100 * f for f in curve], marker=".", label=f"canvas {i + 1}")
    settle.set(xlabel="denoising step", ylabel="% of canvas already final", ylim=(0, 102),
               title=f"How canvases settle ({rows[0].prompt_tokens}-token prompt)")
    settle.legend(fontsize="small")
    lengths = [r.prompt_tokens for r in rows]
    speed.plot(lengths, [r.step_ms for r in rows], marker="o")
    for r in rows:
        speed.annotate(f"{r.matmul_fraction:.0%} of peak", (r.prompt_tokens, r.step_ms), textcoords="offset points",
                       xytext=(0, 8), ha="center", fontsize="small")
    speed.set(xlabel="prompt tokens", ylabel="ms per denoising step", title="Denoising step time",
              ylim=(0, 1.25 * max(r.step_ms for r in rows)))
    if len(lengths) > 1 and max(lengths) / min(lengths) >= 8:
        speed.set_xscale("log")
    speed.set_xticks(lengths, [str(n) for n in lengths])
    speed.minorticks_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
