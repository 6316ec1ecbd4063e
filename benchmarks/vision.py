"""Per-image encode time and memory of the vision tower (mlx-vlm's Gemma 4 vision model, random
weights), float32 on this machine's CPU, for the issue's "memory" figures.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/vision.py --layers 8

The real checkpoint's tower has Gemma4VisionConfig's default shape (hidden 768, 16 layers, MLP 3072,
12 heads, patches of 16, at most 280 soft tokens after 3x3 pooling: 2,520 patches per image).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma.vision import ImageProcessor, VisionTower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--text-hidden", type=int, default=2816)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": args.layers, "num_attention_heads": 12,
              "num_key_value_heads": 12, "head_dim": 64, "patch_size": 16, "pooling_kernel_size": 3,
              "position_embedding_size": 10240, "rms_norm_eps": 1e-6, "model_type": "gemma4_vision"}
    tower = VisionTower(config, args.text_hidden)
    mx.eval(tower.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(tower.parameters()))
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    processor = ImageProcessor()
    tic = time.perf_counter()
    patches, positions = processor(image)
    preprocess = time.perf_counter() - tic
    times = []
    for _ in range(args.repeats + 1):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tic = time.perf_counter()
        features = tower(patches, positions)
        mx.eval(features)
        times.append(time.perf_counter() - tic)
        peak = mx.get_peak_memory() - base
    print(f"tower: {args.layers} layers, {weights / 2**20:.0f} MiB of float32 weights")
    print(f"image 1024x768 -> {patches.shape[0]} patches -> {features.shape[0]} soft tokens of {features.shape[1]}")
    print(f"preprocessing {preprocess * 1e3:.0f} ms; encode median {np.median(times[1:]):.2f} s "
          f"(first {times[0]:.2f} s); peak memory above the weights {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
