"""Conversion recipes on a mid-size random model: size on disk, conversion peak memory, load time,
and denoiser logits error against the float32 source; plus the sizes the same recipes give the
real 26B checkpoint (computed from its shapes, not measured).

    python benchmarks/convert_recipes.py [--out benchmarks/CONVERT.md]

Each conversion and each load runs in a fresh process; peak RSS is the kernel's high-water mark.

    python benchmarks/convert_recipes.py --sudoku

measures instead what the dtype kept by a conversion does to a trained model: top-1 agreement of
the built-in Sudoku model's denoiser (float32) with its conversions, over noisy canvases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# All in bfloat16, the real checkpoint's dtype (the random source is float32).
RECIPES = {
    "bfloat16": dict(dtype="bfloat16"),
    "8-bit": dict(dtype="bfloat16", quantize=True, q_bits=8),
    "6-bit": dict(dtype="bfloat16", quantize=True, q_bits=6),
    "mixed_4_8": dict(dtype="bfloat16", recipe="mixed_4_8"),
    "4-bit": dict(dtype="bfloat16", quantize=True, q_bits=4),
    "mixed_3_6": dict(dtype="bfloat16", recipe="mixed_3_6"),
}
# The Sudoku model is float32: each recipe with a bfloat16 cast first, and keeping float32 (the default).
SUDOKU_RECIPES = {
    "bfloat16": dict(dtype="bfloat16"),
    "8-bit, bfloat16 cast": dict(dtype="bfloat16", quantize=True, q_bits=8),
    "8-bit, float32 kept": dict(quantize=True, q_bits=8),
    "mixed_4_8, bfloat16 cast": dict(dtype="bfloat16", recipe="mixed_4_8"),
    "mixed_4_8, float32 kept": dict(recipe="mixed_4_8"),
    "4-bit, bfloat16 cast": dict(dtype="bfloat16", quantize=True, q_bits=4),
    "4-bit, float32 kept": dict(quantize=True, q_bits=4),
}
REAL_TEXT_CONFIG = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
)


def high_water_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def child(task: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(task: str, args: list[str]) -> None:
    import mlx.core as mx
    import numpy as np

    from mlx_diffgemma.convert import convert
    from mlx_diffgemma.utils import load_model

    base = high_water_mib()  # after the imports: what the conversion itself adds
    if task == "convert":
        start = time.perf_counter()
        convert(args[0], args[1], progress=False, max_shard_bytes=int(args[3]), **json.loads(args[2]))
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_mib": high_water_mib() - base}))
        return
    start = time.perf_counter()
    model = load_model(Path(args[0]))
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, model.args.vocab_size, (1, 64))), cache)
    canvas = mx.array(rng.integers(0, model.args.vocab_size, (1, 64)))
    first = model.denoise(canvas, cache)
    np.save(args[1], np.array(model.denoise(canvas, cache, first)))
    print(json.dumps({"seconds": seconds}))


def compare(reference, approx) -> tuple[float, float]:
    """Mean KL(reference || approx) per position, and top-1 agreement."""
    import numpy as np

    p = reference - reference.max(-1, keepdims=True)
    p = p - np.log(np.exp(p).sum(-1, keepdims=True))
    q = approx - approx.max(-1, keepdims=True)
    q = q - np.log(np.exp(q).sum(-1, keepdims=True))
    return float((np.exp(p) * (p - q)).sum(-1).mean()), float(np.mean(approx.argmax(-1) == reference.argmax(-1)))


def real_sizes() -> dict[str, float]:
    """GiB of the real text model per recipe, from its parameter shapes (quantization overhead: one
    scale and one bias in bfloat16 per group)."""
    from mlx.utils import tree_flatten

    from mlx_diffgemma.convert.recipes import make_predicate
    from mlx_diffgemma.model import Model, ModelArgs

    config = {"model_type": "diffusion_gemma", "text_config": {**REAL_TEXT_CONFIG}}
    model = Model(ModelArgs.from_dict(config))  # lazy: nothing is allocated
    modules = {p for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    params = [(k, v.shape, v.size) for k, v in tree_flatten(model.parameters())]
    sizes = {}
    for name, kwargs in RECIPES.items():
        predicate = None
        if kwargs:
            predicate, _ = make_predicate(kwargs.get("recipe", "uniform"), kwargs.get("q_bits"), None)
        bits = 0.0
        for key, shape, size in params:
            path, _, leaf = key.rpartition(".")
            chosen = predicate(path, shape) if predicate and leaf == "weight" and path in modules else None
            bits += size * (16 if chosen is None else chosen["bits"] + 32 / chosen["group_size"])
        sizes[name] = bits / 8 / 2**30
    return sizes


def sudoku_canvases(count: int, draws: int, seed: int = 0):
    """Prompts and noisy solution canvases for 6x6 puzzles at every difficulty: each solution
    (cells, then EOS) corrupted ``draws`` times as in training (a noise level per canvas)."""
    import random

    import mlx.core as mx

    from mlx_diffgemma import sudoku
    from mlx_diffgemma.train import corrupt

    rng = random.Random(seed)
    prompts, targets = [], []
    for givens in sudoku.DIFFICULTIES[6].values():
        for _ in range(count // len(sudoku.DIFFICULTIES[6])):
            puzzle, solution = sudoku.generate_puzzle(givens, rng, 6)
            prompts += [sudoku.prompt_ids(puzzle)] * draws
            targets += [sudoku.completion_ids(solution) + [sudoku.EOS]] * draws
    targets = mx.array(targets)
    return mx.array(prompts), corrupt(targets, len(sudoku.VOCAB), mx.random.key(seed))


def sudoku_logits(model, prompts, canvases, batch: int = 256):
    """Denoiser logits without and with self-conditioning (on its own first pass)."""
    import mlx.core as mx
    import numpy as np

    plain, conditioned = [], []
    for start in range(0, prompts.shape[0], batch):
        cache = model.make_cache()
        model.encode(prompts[start : start + batch], cache)
        canvas = canvases[start : start + batch]
        first = model.denoise(canvas, cache)
        second = model.denoise(canvas, cache, first)
        mx.eval(first, second)
        plain.append(np.array(first))
        conditioned.append(np.array(second))
    return np.concatenate(plain), np.concatenate(conditioned)


def sudoku_table(count: int = 120, draws: int = 3) -> str:
    import numpy as np

    from mlx_diffgemma import sudoku
    from mlx_diffgemma.convert import convert
    from mlx_diffgemma.utils import load_model

    prompts, canvases = sudoku_canvases(count, draws)
    reference = sudoku_logits(load_model(sudoku.MODEL_DIR), prompts, canvases)
    lines = [
        f"{canvases.shape[0]} noisy canvases ({count} 6x6 puzzles, {draws} noise draws each, "
        f"{canvases.size} positions); top-1 agreement with the float32 original, KL in brackets.",
        "",
        "| conversion | size on disk (KiB) | first pass | self-conditioned pass |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in SUDOKU_RECIPES.items():
            out = convert(sudoku.MODEL_DIR, Path(tmp) / name, progress=False, **kwargs)
            approx = sudoku_logits(load_model(out), prompts, canvases)
            cells = []
            for ref, app in zip(reference, approx):
                kl, agree = compare(ref, app)
                cells.append(f"{100 * agree:.2f}% ({kl:.5f})")
            size = sum(f.stat().st_size for f in out.glob("model-*.safetensors")) / 2**10
            lines.append(f"| {name} | {size:.0f} | {' | '.join(cells)} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    parser.add_argument("--sudoku", action="store_true", help="the dtype kept by conversion, on the trained Sudoku model")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child[0], args.child[1:])
    if args.sudoku:
        table = sudoku_table()
        print(table)
        if args.out:
            args.out.write_text(table + "\n")
        return
    import numpy as np
    from random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write_random_checkpoint(tmp / "source", shard_bytes=128 * 2**20)
        shards = sorted(source.glob("model-*.safetensors"))
        source_mib = sum(f.stat().st_size for f in shards) / 2**20
        largest_mib = max(f.stat().st_size for f in shards) / 2**20
        child("logits", [str(source), str(tmp / "source.npy")])
        reference = np.load(tmp / "source.npy")
        rows = []
        for name, kwargs in RECIPES.items():
            out = tmp / name
            conv = child("convert", [str(source), str(out), json.dumps(kwargs), str(64 * 2**20)])
            load = child("logits", [str(out), str(tmp / f"{name}.npy")])
            approx = np.load(tmp / f"{name}.npy")
            kl, agree = compare(reference, approx)
            if name == "bfloat16":  # the unquantized model the quantized ones are measured against
                reference = approx
            size = sum(f.stat().st_size for f in out.glob("model-*.safetensors")) / 2**20
            rows.append((name, size, conv["peak_mib"], conv["seconds"], load["seconds"], agree, kl))
    real = real_sizes()
    lines = [
        f"Mid-size random model: {source_mib:.0f} MiB in float32, {len(shards)} input shards of at most "
        f"{largest_mib:.0f} MiB; output shards of at most 64 MiB. Logits: 64 canvas positions after a 64-token "
        "prompt, second (self-conditioned) step. The bfloat16 row is measured against the float32 source, the "
        "quantized rows against the bfloat16 conversion (quantization error alone). Conversion peak RSS: the "
        "process's high-water mark above its state after imports.",
        "",
        "| recipe | size on disk (MiB) | conversion peak RSS (MiB) | convert (s) | load (s) | top-1 agreement | KL | real 26B text model (GiB, computed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {s:.0f} | {m:.0f} | {c:.1f} | {l:.2f} | {a:.3f} | {k:.5f} | {real[n]:.1f} |" for n, s, m, c, l, a, k in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
