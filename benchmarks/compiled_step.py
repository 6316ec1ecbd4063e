"""The compiled GPU-path step against the same step uncompiled and against the CPU path, on this machine.

A denoising step with self-conditioning (the denoiser forward and the sampler's tail, as
``denoise_canvas`` runs it, evaluated) on two random float32 shapes, side by side in one run:

* ``mid``: the benchmark's own mid-size model (``random_checkpoint.MID_SIZE``), prompt 512;
* ``vocab``: the vocabulary-heavy shape of issue #18 (hidden 512, 8 layers, 16 experts top-4,
  vocabulary 32,768), prompt 300;

both with canvas 256. Variants, one step each in turn per round (the order rotating), so that
a drift in the machine's speed hits all alike:

* ``cpu``: the CPU path (experts grouped: a BLAS matmul per expert), uncompiled, as on a CPU today;
* ``gpu``: the GPU path (experts gathered: ``gather_mm``), uncompiled;
* ``gpu-compiled``: the GPU path as ``compiled.CompiledStep`` (one ``mx.compile`` graph, prefix
  padded to its bucket);
* ``gpu-padded``: the same function run eagerly (``mx.disable_compile``): the padding's cost alone.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        nice -n 10 .venv/bin/python benchmarks/compiled_step.py [--rounds 4] [--shapes mid vocab]

It first times the vocabulary-sized tail alone, eager and compiled (``--shapes`` with no
name: only that).

Each variant runs its own chain of steps from the same canvas with the same noise; the times
are medians over the rounds after one warm-up step with self-conditioning (which, for the
compiled variant, traces it: that time is reported apart). The canvases the chains reach are
compared token for token. On this CPU, ``gather_mm`` is a plain loop, so the GPU path is slow
here: these figures say what compiling changes on MLX's CPU backend, not what it does on Metal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from random_checkpoint import SHAPES, write_random_checkpoint  # noqa: E402

from mlx_diffgemma import compiled  # noqa: E402
from mlx_diffgemma import model as model_module  # noqa: E402
from mlx_diffgemma.generate import SeededNoise, prefill  # noqa: E402
from mlx_diffgemma.model import softcap  # noqa: E402
from mlx_diffgemma.sampler import DiffusionSettings, accept, distribution, renoise, sample  # noqa: E402
from mlx_diffgemma.utils import load_model  # noqa: E402

TEMPERATURE = 0.7


def eager_step(model, cache, settings):
    """The step as ``denoise_canvas`` runs it without compiling (float32: self-conditioning on probabilities)."""

    def step(canvas, sc, uniform, noise_tokens):
        scaled = model.denoise(canvas, cache, None, 0, sc) / TEMPERATURE
        probs, entropy = distribution(scaled)
        new_canvas = renoise(sample(probs, uniform), accept(entropy, settings.entropy_bound), noise_tokens)
        return new_canvas, scaled.argmax(axis=-1).astype(canvas.dtype), probs, entropy

    return step


def uncompiled(fast, canvas, sc, uniform, noise_tokens):
    """The compiled step's function run eagerly: its padded prefix without the compilation."""
    mx.disable_compile()
    try:
        return fast(canvas, sc, TEMPERATURE, uniform, noise_tokens)
    finally:
        mx.enable_compile()


def measure(name: str, config: dict, prompt_tokens: int, rounds: int, folder: Path) -> list[str]:
    path = write_random_checkpoint(folder / name, **config)
    model = load_model(path)
    settings = DiffusionSettings(canvas_length=256)
    shape = (1, settings.canvas_length)
    cache = model.make_cache()
    prefill(model, mx.array(np.random.default_rng(0).integers(3, model.args.vocab_size, (1, prompt_tokens))), cache)
    noise = SeededNoise(model.args.vocab_size, 0)
    start = noise.initial_canvas(0, shape)
    eager = eager_step(model, cache, settings)
    model_module.EXPERT_PATH = "gathered"  # the compiled step is offered on the gathered path only
    fast = compiled.compiled_step(model, cache, settings, 1)
    variants = {"cpu": ("grouped", eager), "gpu": ("gathered", eager),
                "gpu-compiled": ("gathered", lambda canvas, sc, u, n: fast(canvas, sc, TEMPERATURE, u, n)),
                "gpu-padded": ("gathered", lambda canvas, sc, u, n: uncompiled(fast, canvas, sc, u, n))}
    state = {v: (start, None) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    warm: dict[str, list[float]] = {v: [] for v in variants}
    order, traced = list(variants), 0
    for r in range(rounds + 2):  # step 0 without self-conditioning, step 1 the warm-up with it
        uniform, noise_tokens = noise.step(0, r, shape)
        for v in order[r % len(order):] + order[: r % len(order)]:
            model_module.EXPERT_PATH, step = variants[v]
            canvas, sc = state[v]
            before, tic = compiled.traces, time.perf_counter()
            new_canvas, argmax, sc, _ = step(canvas, sc, uniform, noise_tokens)
            mx.eval(new_canvas, argmax, sc)
            (times if r >= 2 else warm)[v].append(time.perf_counter() - tic)
            traced += compiled.traces - before if v == "gpu-compiled" else 0
            state[v] = (new_canvas, sc)
    model_module.EXPERT_PATH = "auto"
    med = {v: statistics.median(t) for v, t in times.items()}
    final = {v: np.array(c) for v, (c, _) in state.items()}
    same = {v: float((final[v] == final["cpu"]).mean()) for v in variants}
    same_gpu = {v: float((final[v] == final["gpu"]).mean()) for v in variants}
    lines = [f"### {name}: prompt {prompt_tokens}, canvas 256, {rounds} steps timed per variant", "",
             "| variant | s per step (median) | vs gpu uncompiled | vs cpu path | first steps (s) | canvas = cpu's | = gpu's |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        lines.append(f"| {v} | {med[v]:.3f} | {med[v] / med['gpu']:.2f}x | {med[v] / med['cpu']:.2f}x | "
                     f"{' / '.join(f'{t:.2f}' for t in warm[v])} | {same[v]:.1%} | {same_gpu[v]:.1%} |")
    return lines + ["", f"The compiled step was traced {traced} times in its {rounds + 2} steps.", ""]


def tail(rounds: int) -> list[str]:
    """The vocabulary-sized tail alone (softcap to renoise over 256 x 32,768 logits), eager and compiled."""

    def run(logits, temperature, bound, uniform, noise_tokens):
        scaled = softcap(logits, 30.0) / temperature
        probs, entropy = distribution(scaled)
        return renoise(sample(probs, uniform), accept(entropy, bound), noise_tokens), scaled.argmax(-1), probs, entropy

    inputs = (mx.random.normal((1, 256, 32768)) * 5, mx.array(TEMPERATURE), mx.array(0.1),
              mx.random.uniform(shape=(1, 256)), mx.random.randint(0, 32768, (1, 256)))
    times = {"eager": [], "compiled": []}
    for name, fn in (("eager", run), ("compiled", mx.compile(run))) * (rounds + 1):
        tic = time.perf_counter()
        mx.eval(fn(*inputs))
        times[name].append(time.perf_counter() - tic)
    eager, fused = (statistics.median(times[k][1:]) * 1000 for k in ("eager", "compiled"))
    return [f"Tail alone, medians of {rounds}: eager {eager:.0f} ms, compiled {fused:.0f} ms ({fused / eager:.2f}x)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=["mid", "vocab"])
    args = parser.parse_args()
    print(f"BLAS: {os.environ.get('LD_PRELOAD') or 'MLX default'}; mlx {mx.__version__}; device {mx.default_device()}")
    print("\n".join(tail(args.rounds)), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.shapes:
            config, prompt_tokens = SHAPES[name]
            print("\n".join(measure(name, config, prompt_tokens, args.rounds, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
