"""FLOPs per denoising step of the real 26B-A4B model, on paper, and what they mean on an M-series GPU.

    python benchmarks/on_paper.py [--prefix 2000] [--tflops 14] [--efficiency 0.6] [--open 0.7]

The counts come from ``mlx_diffgemma.bench.denoise_flops`` (the same function ``mlx-diffgemma bench``
uses to report its share of the matmul peak) applied to the checkpoint's text configuration
(``benchmarks/convert_recipes.py``'s ``REAL_TEXT_CONFIG``). Each row adds one option on top of the
one above it. The step time assumes the GPU sustains ``--efficiency`` of ``--tflops``; tokens/s
assumes ``--tokens-per-forward`` committed tokens per step, as ``mlx-diffgemma bench`` reports for a
model (the reference sampler's figure depends on the text: 256 tokens over 10 to 40 steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from convert_recipes import REAL_TEXT_CONFIG  # noqa: E402

from mlx_diffgemma.bench import denoise_flops  # noqa: E402
from mlx_diffgemma.model import ModelArgs  # noqa: E402


def real_args() -> ModelArgs:
    """The text model's arguments; layer types and RoPE are ``ModelArgs``' defaults (every sixth layer full)."""
    return ModelArgs.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": REAL_TEXT_CONFIG})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=2000, help="cached prompt tokens before the canvas")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--tflops", type=float, default=14.0, help="the GPU's dense half-precision peak (M3/M4 Max: about 14-17)")
    parser.add_argument("--efficiency", type=float, default=0.6, help="share of the peak a step sustains")
    parser.add_argument("--tokens-per-forward", type=float, default=10.0)
    parser.add_argument("--open", type=float, default=0.7, help="mean share of the canvas still open per step, frozen positions on")
    parser.add_argument("--sc-top-k", type=int, default=64)
    args = parser.parse_args()
    model = real_args()
    C, H, V = args.canvas, model.hidden_size, model.vocab_size
    full = denoise_flops(model, args.prefix, C)
    sc_product = 2.0 * H * V * C  # the softmax @ embedding-table product of self-conditioning
    head = 2.0 * H * V * C
    sparse = full - sc_product + 2.0 * H * args.sc_top_k * C
    frozen = denoise_flops(model, args.prefix, C, open_positions=args.open * C) - (sc_product - 2.0 * H * args.sc_top_k * C) * args.open
    rows = [
        ("reference step (full self-conditioning)", full),
        (f"+ sparse self-conditioning (`--sc-top-k {args.sc_top_k}`)", sparse),
        (f"+ frozen positions (`--freeze-after`), {args.open:.0%} of the canvas open on average", frozen),
    ]
    print(f"Real text model: hidden {H}, {model.num_hidden_layers} layers, {model.num_experts} experts top "
          f"{model.top_k_experts}, vocabulary {V:,}; canvas {C}, prefix {args.prefix}. "
          f"LM head {head / 1e12:.2f} TFLOP and self-conditioning product {sc_product / 1e12:.2f} TFLOP of a step.\n")
    print(f"| step | TFLOP per step | step at {args.efficiency:.0%} of {args.tflops:g} TFLOPS | "
          f"tokens/s at {args.tokens_per_forward:g} tokens per forward |")
    print("|---|---:|---:|---:|")
    for name, flops in rows:
        seconds = flops / (args.tflops * 1e12 * args.efficiency)
        print(f"| {name} | {flops / 1e12:.2f} | {seconds * 1e3:.0f} ms | {args.tokens_per_forward / seconds:.0f} |")


if __name__ == "__main__":
    main()
