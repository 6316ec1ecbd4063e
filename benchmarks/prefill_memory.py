"""Memory of chunked prefill as the prompt grows past the sliding window.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/prefill_memory.py

On the mid-size random model (window 512), prompts of 1x and 8x the window are encoded in
512-token chunks; MLX's peak allocation above the weights is compared with the size of the
KV cache the prompt leaves behind.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import mlx.core as mx
    import numpy as np
    from random_checkpoint import MID_SIZE, write_random_checkpoint

    from mlx_diffgemma.generate import prefill
    from mlx_diffgemma.utils import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_random_checkpoint(Path(tmp) / "ckpt"))
    weights = mx.get_active_memory()
    window = MID_SIZE["sliding_window"]
    for n in (window, 8 * window):
        mx.clear_cache()
        mx.reset_peak_memory()
        cache = model.make_cache()
        start = time.perf_counter()
        prefill(model, mx.array(np.random.default_rng(0).integers(0, MID_SIZE["vocab_size"], (1, n))), cache)
        seconds = time.perf_counter() - start
        cache_mib = sum(a.nbytes for a in cache.state()) / 2**20
        peak_mib = (mx.get_peak_memory() - weights) / 2**20
        print(f"{n} tokens ({n // window}x the window): {seconds:.1f} s, KV cache {cache_mib:.1f} MiB, "
              f"peak above the weights {peak_mib:.1f} MiB")


if __name__ == "__main__":
    main()
