"""The CPU path's elementwise math in numpy (``mlx_diffgemma/host.py``) against MLX's ops, per shape.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/host_math.py --shapes mid vocab

For each shape of ``random_checkpoint.SHAPES`` (float32, canvas 256): one canvas of ``--steps`` denoising
steps (every step runs) and one denoiser forward with self-conditioning on the previous logits, with the
host functions on and inside ``host.disabled()`` (MLX's ops, as before they existed), alternated
round by round in one process. Medians of ``--rounds``; the first round warms up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from random_checkpoint import SHAPES, write_random_checkpoint  # noqa: E402

from mlx_diffgemma import host  # noqa: E402
from mlx_diffgemma.generate import SeededNoise, denoise_canvas, prefill, resolve_settings  # noqa: E402
from mlx_diffgemma.utils import load_model  # noqa: E402

def measure(shape: str, steps: int, rounds: int, folder: Path) -> dict:
    config, prompt = SHAPES[shape]
    model = load_model(write_random_checkpoint(folder / shape, **config))
    cache = model.make_cache()
    prefill(model, mx.array([[(7 * i) % model.args.vocab_size for i in range(prompt)]]), cache)
    settings = resolve_settings(model, steps=steps, stability_threshold=steps)  # never stable: every step runs
    canvas = mx.random.randint(0, model.args.vocab_size, (1, 256), key=mx.random.key(3))
    previous = model.denoise(canvas, cache)
    mx.eval(previous)
    step_s, forward_s = {True: [], False: []}, {True: [], False: []}
    for rep in range(rounds + 1):
        for on in (True, False) if rep % 2 else (False, True):
            with nullcontext() if on else host.disabled():
                tic = time.perf_counter()
                ran = sum(1 for _ in denoise_canvas(model, cache, 0, 1, settings, SeededNoise(model.args.vocab_size, rep)))
                elapsed = (time.perf_counter() - tic) / ran
                tic = time.perf_counter()
                mx.eval(model.denoise(canvas, cache, previous))
            if rep:
                step_s[on].append(elapsed)
                forward_s[on].append(time.perf_counter() - tic)
    step = {on: statistics.median(v) for on, v in step_s.items()}
    forward = {on: statistics.median(v) for on, v in forward_s.items()}
    return {"shape": shape, "step_mlx_s": step[False], "step_host_s": step[True], "step_ratio": step[True] / step[False],
            "forward_mlx_s": forward[False], "forward_host_s": forward[True], "forward_ratio": forward[True] / forward[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["mid", "vocab"])
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per canvas, all run")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print("| shape | step, MLX ops | step, host | ratio | forward, MLX ops | forward, host | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            r = measure(shape, args.steps, args.rounds, Path(folder))
            print(f"| {shape} | {r['step_mlx_s']:.3f} s | {r['step_host_s']:.3f} s | **{r['step_ratio']:.2f}x** | "
                  f"{r['forward_mlx_s']:.3f} s | {r['forward_host_s']:.3f} s | {r['forward_ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
