"""Side-by-side speed and memory of mlx_diffgemma against mlx-vlm's DiffusionGemma (the peer).

Both runtimes load the same random mid-size checkpoint (``random_checkpoint.MID_SIZE``, float32),
get the same prompt token ids, the same canvas length and the same denoising settings, and run
on the same backend with the same environment, one after the other in fresh processes:

    apt-get install -y libopenblas0-pthread   # MLX's Linux CPU build otherwise uses a slow reference BLAS
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python benchmarks/compare_mlx_vlm.py [--vlm-python /tmp/vlmcheck/venv/bin/python] \\
        [--prompt-tokens 512] [--canvas 256] [--steps 8] [--out benchmarks/COMPARE_MLX_VLM.md]

Our side runs with this interpreter (``mlx_diffgemma`` importable); the peer side runs with
``--vlm-python`` (mlx-vlm installed, ``mlx_diffgemma`` never imported). The headline numbers are
ratios ours / peer measured in the same run; seconds are shown for reference.

What each side measures, in this order, in one process:

* matmul peak: a float32 2048x2048 @ 2048x2048 matmul (GFLOP/s), the yardstick for the
  "fraction of matmul peak" column;
* prefill: the prompt encoded into a fresh cache and evaluated (1 warm-up, median of 3);
* denoiser forward: one canvas forward with self-conditioning on the previous logits
  (ours ``model.denoise``; peer ``diffusion_self_conditioning`` + ``diffusion_decoder_logits``
  with the loop's masks), evaluated (1 warm-up, median of 3);
* generation loop: each runtime's own loop for ``max_tokens`` (default two canvases) with
  no early stop: prefill, then canvas after canvas (ours ``generate_step``; peer
  ``stream_diffusion_generate``). "Per step in loop" is the first canvas's denoising time
  (after prefill until its tokens exist) divided by the steps it ran. The peer builds a
  canvas's steps as one lazy graph, so only whole canvases can be timed inside its loop;
  ours evaluates every step, so its steady-state step (after a warm-up step) is shown too;
* memory: MLX's peak allocation during the generation loop and the process's peak RSS
  (VmHWM, whole process: load, all measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLM_PYTHON = "/tmp/vlmcheck/venv/bin/python"
SEED = 0


# --------------------------------------------------------------------------------------------
# Helpers shared by both workers (standard library only at import time: the peer's interpreter
# runs this file too, without our package).
# --------------------------------------------------------------------------------------------


def vm_hwm_mib() -> float:
    """The process's peak resident set (kernel high-water mark), MiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def blas_in_use() -> str:
    """Which BLAS library this process has mapped (OpenBLAS when preloaded)."""
    maps = Path("/proc/self/maps").read_text()
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line})
    return ", ".join(Path(p).name for p in libs) or "MLX built-in (no external BLAS mapped)"


def timed(fn, mx, warmup: int = 1, reps: int = 3) -> float:
    """Median wall time of ``fn()`` (which returns what to evaluate), after ``warmup`` calls."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(mx, n: int = 2048) -> float:
    a = mx.random.normal((n, n), key=mx.random.key(1))
    b = mx.random.normal((n, n), key=mx.random.key(2))
    mx.eval(a, b)
    return 2 * n**3 / timed(lambda: a @ b, mx, warmup=1, reps=5) / 1e9


def common_start(workdir: Path):
    import mlx.core as mx

    mx.random.seed(SEED)
    meta = json.loads((workdir / "prompt.json").read_text())
    return mx, meta


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def worker_checkpoint(workdir: Path, args) -> None:
    """Write the random mid-size checkpoint and the prompt (our interpreter)."""
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    import mlx.core as mx
    import numpy as np
    from random_checkpoint import MID_SIZE, write_random_checkpoint

    write_random_checkpoint(workdir / "ckpt", dtype=mx.float32, canvas_length=args.canvas)
    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, MID_SIZE["vocab_size"], size=args.prompt_tokens).tolist()
    ids[0] = 2  # BOS
    (workdir / "prompt.json").write_text(json.dumps({"ids": ids, "canvas": args.canvas, "steps": args.steps,
                                                     "max_tokens": args.max_tokens}))


def worker_ours(workdir: Path) -> dict:
    sys.path.insert(0, str(REPO))
    mx, meta = common_start(workdir)
    import importlib

    from mlx_diffgemma.sampler import DiffusionSettings
    from mlx_diffgemma.utils import load_model

    # The module itself (the package re-exports its ``generate`` function under the same name).
    gen = importlib.import_module("mlx_diffgemma.generate")
    ids = mx.array(meta["ids"])[None]
    C, S, N = meta["canvas"], meta["steps"], meta["max_tokens"]
    model = load_model(workdir / "ckpt")
    mx.eval(model.parameters())
    vocab = model.args.vocab_size
    out = {"blas": blas_in_use(), "matmul_gflops": matmul_gflops(mx)}

    def fresh_prefill():
        cache = model.make_cache()
        gen.prefill(model, ids, cache)
        return cache

    out["prefill_s"] = timed(lambda: fresh_prefill().state(), mx)

    cache = fresh_prefill()
    canvas = mx.random.randint(0, vocab, (1, C), key=mx.random.key(3))
    previous = model.denoise(canvas, cache, None)
    mx.eval(previous)
    out["forward_s"] = timed(lambda: model.denoise(canvas, cache, previous), mx)

    # Our loop, one canvas, step by step: the first step (no self-conditioning) is the warm-up.
    settings = DiffusionSettings(steps=S, confidence_threshold=1e-9, canvas_length=C)
    step_times, last = [], time.perf_counter()
    for _ in gen.denoise_canvas(model, cache, 0, 1, settings, gen.SeededNoise(vocab, SEED)):
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
    out["steady_step_s"] = statistics.mean(step_times[1:]) if len(step_times) > 1 else step_times[0]

    # End to end: prefill (timed by wrapping the module's prefill), then canvases.
    marks = {}
    original_prefill = gen.prefill

    def prefill_timed(*a, **k):
        original_prefill(*a, **k)
        marks["prefill_end"] = time.perf_counter()

    gen.prefill = prefill_timed
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens, canvas_ends, steps = 0, [], []
    start = time.perf_counter()
    for event in gen.generate_step(model, [meta["ids"]], max_tokens=N, settings=settings, eos_token_ids=[],
                                   noise=gen.SeededNoise(vocab, SEED)):
        if isinstance(event, gen.Canvas):
            canvas_ends.append(time.perf_counter())
            tokens += len(event.tokens[0])
            steps.append(event.steps)
    end = time.perf_counter()
    gen.prefill = original_prefill
    out.update(
        e2e_tokens=tokens, e2e_total_s=end - start, e2e_prompt_s=marks["prefill_end"] - start,
        e2e_generation_s=end - marks["prefill_end"], loop_step_s=(canvas_ends[0] - marks["prefill_end"]) / steps[0],
        steps_per_canvas=steps, mx_peak_gib=mx.get_peak_memory() / 2**30,
    )
    out["vm_hwm_gib"] = vm_hwm_mib() / 1024
    return out


class _NullDetokenizer:
    """The peer's loop detokenizes as it goes; a random model has no tokenizer, and our side
    does not decode either, so both sides only count token ids."""

    last_segment = ""

    def reset(self):
        pass

    def add_token(self, token, skip_special_token_ids=None):
        pass

    def finalize(self):
        pass


class _NoStopTokenizer:
    @staticmethod
    def stopping_criteria(token) -> bool:
        return False


def text_only_view(folder: Path, out: Path) -> Path:
    """The checkpoint as the peer loads it text-only: same weight files (linked), config with
    ``vision_config: null`` (without it mlx-vlm builds a Gemma 4 vision tower and asks for its weights)."""
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vision_config": None}))
    return out


def worker_peer(workdir: Path) -> dict:
    mx, meta = common_start(workdir)
    from types import SimpleNamespace

    import mlx_vlm
    from mlx_vlm.generate.diffusion import stream_diffusion_generate
    from mlx_vlm.utils import load_model

    ids = mx.array(meta["ids"])[None]
    C, S, N = meta["canvas"], meta["steps"], meta["max_tokens"]
    model = load_model(text_only_view(workdir / "ckpt", workdir / "ckpt_peer"))
    mx.eval(model.parameters())
    vocab = model.config.text_config.vocab_size
    out = {"blas": blas_in_use(), "version": mlx_vlm.__version__, "matmul_gflops": matmul_gflops(mx)}

    def fresh_prefill():
        cache = model.diffusion_prefill_cache(ids, cache=model.make_cache())
        mx.eval([c.state for c in cache])
        return cache

    out["prefill_s"] = timed(lambda: [c.state for c in fresh_prefill()], mx)

    cache = fresh_prefill()
    canvas = mx.random.randint(0, vocab, (1, C), key=mx.random.key(3))
    masks = model.diffusion_decoder_masks(canvas, cache, None)  # as its loop does, once per canvas
    embedding = model.diffusion_prepare_self_conditioning()
    previous = model.diffusion_decoder_logits(canvas, cache=cache, decoder_attention_mask=masks)
    mx.eval(previous)

    def forward():
        conditioning = model.diffusion_self_conditioning(previous, embedding)
        return model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=conditioning,
                                              decoder_attention_mask=masks)

    out["forward_s"] = timed(forward, mx)

    # End to end in the peer's own loop, with DiffusionGemma's entropy-bound sampler (the peer's
    # default is "confidence-threshold") and temperature 1.0, so tokens are sampled at the
    # schedule's temperature alone (the peer's default 0.0 would take the argmax).
    mx.clear_cache()
    mx.reset_peak_memory()
    results = stream_diffusion_generate(
        model, SimpleNamespace(detokenizer=_NullDetokenizer()), _NoStopTokenizer(), ids, None, None,
        max_tokens=N, skip_special_token_ids=[], temperature=1.0, max_denoising_steps=S,
        diffusion_full_canvas=True, diffusion_sampler="entropy-bound",
    )
    first = last = None
    steps, previous_steps = [], 0
    start = time.perf_counter()
    for result in results:
        if result.generation_tokens == 1 and first is None:
            first = result
        if result.diffusion_block_complete:
            steps.append(result.diffusion_denoising_steps - previous_steps)
            previous_steps = result.diffusion_denoising_steps
        last = result
    end = time.perf_counter()
    prompt_s = last.prompt_tokens / last.prompt_tps
    out.update(
        e2e_tokens=last.generation_tokens, e2e_total_s=end - start, e2e_prompt_s=prompt_s,
        e2e_generation_s=end - start - prompt_s,
        # The peer's own clock: generation_tps = tokens / time since prefill ended.
        loop_step_s=(first.generation_tokens / first.generation_tps) / steps[0],
        steps_per_canvas=steps, mx_peak_gib=mx.get_peak_memory() / 2**30,
    )
    out["vm_hwm_gib"] = vm_hwm_mib() / 1024
    return out


# --------------------------------------------------------------------------------------------
# FLOPs (from the config)
# --------------------------------------------------------------------------------------------


def layer_shapes(text: dict) -> list[tuple[bool, int, int]]:
    """Per layer: (sliding?, head_dim, kv_heads), as both runtimes resolve them."""
    n = text["num_hidden_layers"]
    types = text.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    out = []
    for t in types:
        if t == "sliding_attention":
            out.append((True, text["head_dim"], text["num_key_value_heads"]))
        else:
            out.append((False, text["global_head_dim"], text.get("num_global_key_value_heads") or text["num_key_value_heads"]))
    return out


def block_macs(text: dict, sliding: bool, head_dim: int, kv_heads: int) -> int:
    """Multiply-accumulates of one transformer block per token, without attention scores:
    q, k, (v on sliding layers; full-attention layers reuse k as v), o; dense gated MLP
    (gate, up, down); router; top-k routed experts (fused gate_up, down)."""
    H, heads = text["hidden_size"], text["num_attention_heads"]
    attention = H * heads * head_dim + H * kv_heads * head_dim * (2 if sliding else 1) + heads * head_dim * H
    dense = 3 * H * text["intermediate_size"]
    router = H * text["num_experts"]
    experts = text["top_k_experts"] * 3 * H * text["moe_intermediate_size"]
    return attention + dense + router + experts


def denoiser_step_flops(text: dict, prompt: int, canvas: int, self_conditioning: bool = True) -> float:
    """FLOPs of one denoiser forward over a canvas:

        2 * C * [ sum_layers (q + k (+ v) + o projections + dense MLP 3*H*I + router H*E
                              + top_k * 3*H*I_moe + attention nh*hd*keys*2 (scores and values))
                  + LM head V*H + self-conditioning (product V*H + gated MLP 3*H*I) ]

    where keys = C + prompt on full-attention layers and C + min(prompt, window - 1) on
    sliding ones (the canvas attends to all of itself and the cached prefix). Softmaxes,
    norms, sampling and the softcap are not counted.
    """
    H, V, heads = text["hidden_size"], text["vocab_size"], text["num_attention_heads"]
    per_token = 0
    for sliding, head_dim, kv_heads in layer_shapes(text):
        keys = canvas + (min(prompt, text["sliding_window"] - 1) if sliding else prompt)
        per_token += block_macs(text, sliding, head_dim, kv_heads) + 2 * heads * head_dim * keys
    per_token += V * H
    if self_conditioning:
        per_token += V * H + 3 * H * text["intermediate_size"]
    return 2.0 * canvas * per_token


def prefill_flops(text: dict, prompt: int) -> float:
    """FLOPs of encoding the prompt: every block but the last in full, the last block's k/v
    projections only (its output feeds nothing), and causal attention scores (each token sees
    itself and the earlier ones, within the window on sliding layers)."""
    H, heads = text["hidden_size"], text["num_attention_heads"]
    shapes = layer_shapes(text)
    total = 0
    for sliding, head_dim, kv_heads in shapes[:-1]:
        window = text["sliding_window"] if sliding else prompt
        keys = sum(min(t + 1, window) for t in range(prompt))
        total += prompt * block_macs(text, sliding, head_dim, kv_heads) + 2 * heads * head_dim * keys
    sliding, head_dim, kv_heads = shapes[-1]
    total += prompt * H * kv_heads * head_dim * (2 if sliding else 1)
    return 2.0 * total


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_worker(python: str, role: str, workdir: Path, extra: list[str] = ()) -> dict:
    """Run one worker in a fresh process with this process's environment (LD_PRELOAD included)."""
    command = [python, str(Path(__file__).resolve()), "--worker", role, "--workdir", str(workdir), *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{role} worker failed ({python}):\n{proc.stderr[-4000:]}")
    print(f"  {role}: {time.perf_counter() - start:.0f} s", flush=True)
    result = workdir / f"{role}.json"
    return json.loads(result.read_text()) if result.exists() else {}


def table(ours: dict, peer: dict, text: dict, args) -> str:
    P, C, S = args.prompt_tokens, args.canvas, args.steps
    step_sc = denoiser_step_flops(text, P, C)
    # The loop's first step has no self-conditioning signal (ours skips its MLP and product; the
    # peer runs the MLP on zeros): average over the S steps of a canvas.
    step_avg = ((S - 1) * step_sc + denoiser_step_flops(text, P, C, self_conditioning=False)) / S
    pre = prefill_flops(text, P)

    def frac(flops: float, seconds: float, side: dict) -> str:
        return f"{flops / seconds / 1e9 / side['matmul_gflops']:.0%}"

    rows = [
        ("Prefill, s (lower is better)", ours["prefill_s"], peer["prefill_s"], pre, "prefill_s"),
        ("Denoiser forward with self-conditioning, s", ours["forward_s"], peer["forward_s"], step_sc, "forward_s"),
        ("Denoising step in own loop (canvas / steps), s", ours["loop_step_s"], peer["loop_step_s"], step_avg, "loop_step_s"),
    ]
    lines = [
        f"| Measure | ours | mlx-vlm {peer.get('version', '')} | ours / peer | ours % of matmul peak | peer % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, o, p, flops, key in rows:
        lines.append(f"| {name} | {o:.3f} | {p:.3f} | **{o / p:.2f}** | {frac(flops, o, ours)} | {frac(flops, p, peer)} |")
    lines.append(f"| Our steady-state step (after a warm-up step), s | {ours['steady_step_s']:.3f} | | "
                 f"{ours['steady_step_s'] / peer['loop_step_s']:.2f} vs peer loop step | {frac(step_sc, ours['steady_step_s'], ours)} | |")
    for name, key in (("generation only (after prefill)", "e2e_generation_s"), ("including prefill", "e2e_total_s")):
        o, p = ours["e2e_tokens"] / ours[key], peer["e2e_tokens"] / peer[key]
        lines.append(f"| End-to-end tokens/s, {name} (higher is better) | {o:.1f} | {p:.1f} | **{o / p:.2f}** | | |")
    for name, key in (("MLX peak allocation in the loop, GiB", "mx_peak_gib"), ("Process peak RSS (VmHWM), GiB", "vm_hwm_gib")):
        lines.append(f"| {name} | {ours[key]:.2f} | {peer[key]:.2f} | **{ours[key] / peer[key]:.2f}** | | |")
    lines.append(f"| float32 2048^3 matmul, GFLOP/s | {ours['matmul_gflops']:.1f} | {peer['matmul_gflops']:.1f} | "
                 f"{ours['matmul_gflops'] / peer['matmul_gflops']:.2f} | | |")
    notes = [
        "",
        f"Model: random MID_SIZE float32 (hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"{text['num_experts']} experts top-{text['top_k_experts']}, vocab {text['vocab_size']}); "
        f"prompt {P} tokens, canvas {C}, {S} denoising steps, {args.max_tokens} new tokens "
        f"(canvases x steps run: ours {ours['steps_per_canvas']}, peer {peer['steps_per_canvas']}).",
        f"Settings on both sides: entropy bound 0.1, temperature {0.8} -> {0.4 + 0.4 / S:.2f} (linear, t_min 0.4, t_max 0.8), "
        f"no early stop (ours: confidence_threshold 1e-9; peer: no stopping config), full canvases.",
        f"Denoiser FLOPs per step: {step_sc / 1e9:.1f} GFLOP with self-conditioning; prefill {pre / 1e9:.1f} GFLOP.",
        f"BLAS: ours {ours['blas']}; peer {peer['blas']}. LD_PRELOAD={os.environ.get('LD_PRELOAD', '(unset)')}.",
    ]
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vlm-python", default=DEFAULT_VLM_PYTHON, help="interpreter with mlx-vlm installed")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (all run)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens end to end (default: two canvases)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--worker", choices=["checkpoint", "ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or 2 * args.canvas

    if args.worker:
        if args.worker == "checkpoint":
            worker_checkpoint(args.workdir, args)
            return
        result = (worker_ours if args.worker == "ours" else worker_peer)(args.workdir)
        (args.workdir / f"{args.worker}.json").write_text(json.dumps(result))
        return

    preload = os.environ.get("LD_PRELOAD")
    print(f"BLAS: {'OpenBLAS preloaded (' + preload + ')' if preload and 'blas' in preload.lower() else 'MLX built-in reference BLAS (LD_PRELOAD unset): float32 matmuls are slow'}")
    with tempfile.TemporaryDirectory(prefix="compare_mlx_vlm_") as tmp:
        workdir = Path(tmp)
        sizes = ["--prompt-tokens", str(args.prompt_tokens), "--canvas", str(args.canvas),
                 "--steps", str(args.steps), "--max-tokens", str(args.max_tokens)]
        run_worker(sys.executable, "checkpoint", workdir, sizes)
        text = json.loads((workdir / "ckpt" / "config.json").read_text())["text_config"]
        ours = run_worker(sys.executable, "ours", workdir)
        peer = run_worker(args.vlm_python, "peer", workdir)
    report = table(ours, peer, text, args)
    print()
    print(report)
    if args.out:
        args.out.write_text(f"# mlx_diffgemma vs mlx-vlm DiffusionGemma\n\n{report}")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
