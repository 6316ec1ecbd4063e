"""Peak memory of loading a checkpoint against its size on disk (one copy of the weights, or two?).

    python benchmarks/load_memory.py [--size tiny|mid]

Each load runs in a fresh process; its peak RSS is the kernel's high-water mark (VmHWM; ru_maxrss
would carry the parent's over fork) and MLX's own peak allocation comes from mx.get_peak_memory().
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "tiny": dict(layer_types=["sliding_attention", "full_attention"] * 2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 num_experts=4, top_k_experts=2, moe_intermediate_size=64, sliding_window=8, canvas_length=16),
    "mid": {},
}


def measure(path: str) -> None:
    import mlx.core as mx

    from mlx_diffgemma.utils import load_model

    base = high_water_mib()
    load_model(Path(path))
    print(f"{high_water_mib() - base:.1f} {mx.get_peak_memory() / 2**20:.1f}")


def high_water_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="mid")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    from random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "ckpt", **SIZES[args.size])
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        out = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True, check=True)
        rss, mlx_peak = map(float, out.stdout.split())
        print(f"{args.size}: weights on disk {disk:.1f} MiB | load: peak RSS growth {rss:.1f} MiB "
              f"({rss / disk:.2f}x), MLX peak allocation {mlx_peak:.1f} MiB ({mlx_peak / disk:.2f}x)")


if __name__ == "__main__":
    main()
