"""Side-by-side speed and memory of mlx_diffgemma against mlx-vlm's DiffusionGemma (the peer).

Both runtimes load the same random checkpoint (float32) of one of ``random_checkpoint.SHAPES``: the
mid-size model (``--shape mid``, the default) or the vocabulary-heavy shape (``--shape vocab``),
get the same prompt token ids, the same canvas length and the same denoising settings, and run
on the same backend with the same environment:

    apt-get install -y libopenblas0-pthread   # MLX's Linux CPU build otherwise uses a slow reference BLAS
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python benchmarks/compare_mlx_vlm.py [--vlm-python /tmp/vlmcheck/venv/bin/python] \\
        [--shape mid|vocab] [--prompt-tokens 512] [--canvas 256] [--steps 8] [--rounds 3] [--out benchmarks/COMPARE_MLX_VLM.md]

Our side runs in a worker process with this interpreter (``mlx_diffgemma`` importable); the
peer's in a worker with ``--vlm-python`` (mlx-vlm installed; ``mlx_diffgemma`` never imported).
Both workers load their model and warm up (one prefill, one forward), then wait; the driver
asks them for one measurement at a time, alternating ours / peer and swapping the order every
round, so the two never run at once and a drift in the machine's speed hits both alike. The
headline numbers are ratios ours / peer from the same run; seconds are shown for reference.

Measurements (best of ``--rounds`` for the short ones):

* matmul: a float32 2048x2048 @ 2048x2048 matmul, GFLOP/s; the best rate seen in either worker
  is the yardstick for "% of matmul peak";
* prefill: the prompt encoded into a fresh cache and evaluated;
* denoiser forward: one canvas forward with self-conditioning on the previous logits (ours
  ``model.denoise``; peer ``diffusion_self_conditioning`` + ``diffusion_decoder_logits`` with
  the masks its loop builds), evaluated;
* generation (``--generate-rounds``, default 1): each runtime's own loop for ``--max-tokens``
  (default two canvases) with no early stop: prefill, then canvas after canvas (ours
  ``generate_step``; peer ``stream_diffusion_generate``). "Step in own loop" is the first
  canvas's time (prefill done until its tokens exist) over the steps it ran. The peer builds a
  canvas's steps as one lazy graph, so only whole canvases can be timed inside its loop; ours
  evaluates every step, so its steady-state step (steps 2..S of that canvas) is shown too;
* memory: MLX's peak allocation during generation, and each worker's peak RSS (VmHWM, the whole
  process: imports, load, every measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLM_PYTHON = "/tmp/vlmcheck/venv/bin/python"
SEED = 0


# --------------------------------------------------------------------------------------------
# Worker side (standard library only at import time: the peer's interpreter runs this file too,
# without our package).
# --------------------------------------------------------------------------------------------


def vm_hwm_gib() -> float:
    """The process's peak resident set (kernel high-water mark), GiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20


def blas_in_use() -> str:
    """Which BLAS serves MLX's float32 matmuls: a preloaded library (LD_PRELOAD, mapped first, so
    its sgemm wins) or the reference BLAS bundled in ``mlx_cpu.libs``."""
    maps = Path("/proc/self/maps").read_text()
    preload = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    mapped = [p for p in preload if os.path.realpath(p) in maps or p in maps]
    if mapped:
        # OpenBLAS reads these at load: OPENBLAS_CORETYPE picks its kernels (Haswell's AVX2 ones
        # run about half as fast as its AVX-512 ones on an AVX-512 CPU).
        settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OPENBLAS_"))
        return "preloaded " + ", ".join(os.path.realpath(p) for p in mapped) + f" ({settings or 'no OPENBLAS_ settings'})"
    return "MLX's bundled reference BLAS (mlx_cpu.libs/libblas)"


def cpu_in_use() -> str:
    """The CPU's model, cores and widest vector unit: the peer's elementwise work runs one value at a
    time, so how much faster ours is depends on the SIMD width numpy and BLAS get."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {simd}"


def seconds(mx, fn) -> float:
    """Wall time of ``fn()`` and the evaluation of what it returns."""
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def matmul_gflops(mx, n: int = 2048) -> float:
    """Median rate of 5 float32 n x n matmuls, after one warm-up."""
    a = mx.random.normal((n, n), key=mx.random.key(1))
    b = mx.random.normal((n, n), key=mx.random.key(2))
    mx.eval(a @ b)
    times = sorted(seconds(mx, lambda: a @ b) for _ in range(5))
    return 2 * n**3 / times[2] / 1e9


class OursSide:
    """mlx_diffgemma: prefill, denoiser forward and the generation loop."""

    def __init__(self, workdir: Path, meta: dict):
        sys.path.insert(0, str(REPO))
        import importlib

        import mlx.core as mx
        from mlx_diffgemma.sampler import DiffusionSettings
        from mlx_diffgemma.utils import load_model

        # The module itself: the package re-exports its ``generate`` function under that name.
        self.gen = importlib.import_module("mlx_diffgemma.generate")
        self.mx, self.meta = mx, meta
        self.ids = mx.array(meta["ids"])[None]
        self.model = load_model(workdir / "ckpt")
        mx.eval(self.model.parameters())
        self.vocab = self.model.args.vocab_size
        self.settings = DiffusionSettings(steps=meta["steps"], confidence_threshold=1e-9, canvas_length=meta["canvas"])
        self.info = {"name": "mlx_diffgemma"}
        self.cache = self._prefill()
        self.canvas = mx.random.randint(0, self.vocab, (1, meta["canvas"]), key=mx.random.key(3))
        self.previous = self.model.denoise(self.canvas, self.cache, None)
        mx.eval(self.previous)

    def _prefill(self):
        cache = self.model.make_cache()
        self.gen.prefill(self.model, self.ids, cache)
        return cache

    def prefill(self) -> float:
        return seconds(self.mx, lambda: self._prefill().state())

    def forward(self) -> float:
        return seconds(self.mx, lambda: self.model.denoise(self.canvas, self.cache, self.previous))

    def generate(self) -> dict:
        """``generate_step`` end to end. Prefill is timed by wrapping the module's ``prefill``;
        our loop evaluates each step and yields a Draft after it, which times single steps."""
        mx, gen = self.mx, self.gen
        marks = {}
        original_prefill = gen.prefill

        def prefill_timed(*a, **k):
            original_prefill(*a, **k)
            marks["prefill_end"] = time.perf_counter()

        gen.prefill = prefill_timed
        mx.clear_cache()
        mx.reset_peak_memory()
        tokens, boundaries, steps, drafts = 0, [], [], []
        start = time.perf_counter()
        try:
            for event in gen.generate_step(self.model, [self.meta["ids"]], max_tokens=self.meta["max_tokens"],
                                           settings=self.settings, eos_token_ids=[],
                                           noise=gen.SeededNoise(self.vocab, SEED)):
                if isinstance(event, gen.Draft) and not boundaries:
                    drafts.append(time.perf_counter())
                if isinstance(event, gen.Canvas):
                    boundaries.append(time.perf_counter())
                    tokens += len(event.tokens[0])
                    steps.append(event.steps)
        finally:
            gen.prefill = original_prefill
        end = time.perf_counter()
        edges = [marks["prefill_end"], *boundaries]
        return dict(
            tokens=tokens, total_s=end - start, prompt_s=marks["prefill_end"] - start,
            canvas_s=[b - a for a, b in zip(edges, edges[1:])], steps=steps, mx_peak_gib=mx.get_peak_memory() / 2**30,
            # First canvas, steps 2..S (step 1, without self-conditioning, is the warm-up).
            steady_step_s=(drafts[-1] - drafts[0]) / (len(drafts) - 1) if len(drafts) > 1 else None,
        )


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
    """The checkpoint as the peer loads it text-only: the same weight files (linked), and the config
    with ``vision_config: null`` (otherwise mlx-vlm builds a Gemma 4 vision tower and wants its weights)."""
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vision_config": None}))
    return out


class PeerSide:
    """mlx-vlm's DiffusionGemma: the same three measurements through its own entry points."""

    def __init__(self, workdir: Path, meta: dict):
        import mlx.core as mx
        import mlx_vlm
        from mlx_vlm.generate.diffusion import stream_diffusion_generate
        from mlx_vlm.utils import load_model

        self.mx, self.meta, self.stream = mx, meta, stream_diffusion_generate
        self.ids = mx.array(meta["ids"])[None]
        self.model = load_model(text_only_view(workdir / "ckpt", workdir / "ckpt_peer"))
        mx.eval(self.model.parameters())
        self.info = {"name": "mlx-vlm", "version": mlx_vlm.__version__}
        vocab = self.model.config.text_config.vocab_size
        self.cache = self._prefill()
        self.canvas = mx.random.randint(0, vocab, (1, meta["canvas"]), key=mx.random.key(3))
        self.masks = self.model.diffusion_decoder_masks(self.canvas, self.cache, None)  # once per canvas, as its loop
        self.embedding = self.model.diffusion_prepare_self_conditioning()
        self.previous = self.model.diffusion_decoder_logits(self.canvas, cache=self.cache, decoder_attention_mask=self.masks)
        mx.eval(self.previous)

    def _prefill(self):
        cache = self.model.diffusion_prefill_cache(self.ids, cache=self.model.make_cache())
        self.mx.eval([c.state for c in cache])
        return cache

    def prefill(self) -> float:
        return seconds(self.mx, lambda: [c.state for c in self._prefill()])

    def forward(self) -> float:
        def step():
            conditioning = self.model.diffusion_self_conditioning(self.previous, self.embedding)
            return self.model.diffusion_decoder_logits(self.canvas, cache=self.cache, self_conditioning=conditioning,
                                                       decoder_attention_mask=self.masks)

        return seconds(self.mx, step)

    def generate(self) -> dict:
        """``stream_diffusion_generate`` with DiffusionGemma's entropy-bound sampler (the peer's
        default is "confidence-threshold") and temperature 1.0, so tokens are sampled at the
        schedule's temperature alone (the peer's default 0.0 takes the argmax)."""
        mx = self.mx
        mx.clear_cache()
        mx.reset_peak_memory()
        results = self.stream(
            self.model, SimpleNamespace(detokenizer=_NullDetokenizer()), _NoStopTokenizer(), self.ids, None, None,
            max_tokens=self.meta["max_tokens"], skip_special_token_ids=[], temperature=1.0,
            max_denoising_steps=self.meta["steps"], diffusion_full_canvas=True, diffusion_sampler="entropy-bound",
        )
        boundaries, steps, done_steps, last = [], [], 0, None
        start = time.perf_counter()
        for result in results:  # one result per token, then one per finished canvas
            if result.diffusion_block_complete:
                boundaries.append(time.perf_counter())
                steps.append(result.diffusion_denoising_steps - done_steps)
                done_steps = result.diffusion_denoising_steps
            last = result
        end = time.perf_counter()
        prompt_s = last.prompt_tokens / last.prompt_tps  # the peer's own prefill clock
        edges = [start + prompt_s, *boundaries]
        return dict(
            tokens=last.generation_tokens, total_s=end - start, prompt_s=prompt_s,
            canvas_s=[b - a for a, b in zip(edges, edges[1:])], steps=steps, mx_peak_gib=mx.get_peak_memory() / 2**30,
        )


def serve(role: str, workdir: Path) -> None:
    """Worker loop: load and warm up, then answer one command per stdin line with one JSON line."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the answers
    import mlx.core as mx

    mx.random.seed(SEED)
    meta = json.loads((workdir / "prompt.json").read_text())
    side = (OursSide if role == "ours" else PeerSide)(workdir, meta)
    commands = {"matmul": lambda: matmul_gflops(mx), "prefill": side.prefill, "forward": side.forward,
                "generate": side.generate, "memory": lambda: {"vm_hwm_gib": vm_hwm_gib()}}
    channel.write(json.dumps({**side.info, "blas": blas_in_use()}) + "\n")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        channel.write(json.dumps(commands[line.strip()]()) + "\n")


def write_inputs(workdir: Path, args) -> None:
    """Write the random checkpoint of ``--shape`` and the prompt (our interpreter)."""
    import mlx.core as mx
    import numpy as np
    from random_checkpoint import MID_SIZE, SHAPES, write_random_checkpoint

    write_random_checkpoint(workdir / "ckpt", dtype=mx.float32, canvas_length=args.canvas, **SHAPES[args.shape][0])
    ids = np.random.default_rng(SEED).integers(3, MID_SIZE["vocab_size"], size=args.prompt_tokens).tolist()
    ids[0] = 2  # BOS
    meta = {"ids": ids, "canvas": args.canvas, "steps": args.steps, "max_tokens": args.max_tokens}
    (workdir / "prompt.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------------------------
# FLOPs (from the config)
# --------------------------------------------------------------------------------------------


def config_flops(text: dict, prompt: int, canvas: int) -> tuple[float, float, float]:
    """Denoiser step FLOPs with and without self-conditioning, and prefill FLOPs, from the
    formulas ``mlx-diffgemma bench`` uses (``mlx_diffgemma.bench``); the driver runs in our venv."""
    from mlx_diffgemma.bench import denoise_flops, prefill_flops
    from mlx_diffgemma.model import ModelArgs

    args = ModelArgs.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text})
    return denoise_flops(args, prompt, canvas), denoise_flops(args, prompt, canvas, False), prefill_flops(args, prompt)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


class Worker:
    """A worker process and its command channel; its stderr goes to a log in the work folder."""

    def __init__(self, python: str, role: str, workdir: Path):
        self.role, self.log = role, workdir / f"{role}.log"
        command = [python, str(Path(__file__).resolve()), "--worker", role, "--workdir", str(workdir)]
        self.proc = subprocess.Popen(command, env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True, bufsize=1)

    def answer(self):
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{self.role} worker failed:\n{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        return self.answer()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def measure(args, workdir: Path) -> tuple[dict, dict]:
    """Interleave the measurements of both workers; returns (ours, peer) summaries."""
    ours, peer = Worker(sys.executable, "ours", workdir), Worker(args.vlm_python, "peer", workdir)
    results = {}
    try:
        for worker in (ours, peer):
            results[worker.role] = {"info": worker.answer(), "matmul": [], "prefill": [], "forward": [], "generate": []}
        print("  both workers loaded and warmed up", flush=True)
        for r in range(args.rounds):
            order = (ours, peer) if r % 2 == 0 else (peer, ours)
            for command in ("matmul", "prefill", "forward"):
                for worker in order:
                    results[worker.role][command].append(worker.ask(command))
            print(f"  round {r + 1}/{args.rounds}: prefill ours {results['ours']['prefill'][-1]:.2f} s, "
                  f"peer {results['peer']['prefill'][-1]:.2f} s; forward ours {results['ours']['forward'][-1]:.2f} s, "
                  f"peer {results['peer']['forward'][-1]:.2f} s", flush=True)
        for r in range(args.generate_rounds):
            for worker in (ours, peer) if r % 2 == 0 else (peer, ours):
                results[worker.role]["generate"].append(worker.ask("generate"))
                print(f"  generation {r + 1}/{args.generate_rounds} {worker.role}: "
                      f"{results[worker.role]['generate'][-1]['total_s']:.0f} s", flush=True)
        for worker in (ours, peer):
            results[worker.role]["memory"] = worker.ask("memory")
    finally:
        for worker in (ours, peer):
            if worker.proc.poll() is None:
                worker.close()
    return summarize(results["ours"]), summarize(results["peer"])


def summarize(raw: dict) -> dict:
    """Best of the rounds; for generation, the fastest run and its first canvas."""
    run = min(raw["generate"], key=lambda g: g["total_s"])
    first_step = min(g["canvas_s"][0] / g["steps"][0] for g in raw["generate"])
    steady = [g["steady_step_s"] for g in raw["generate"] if g.get("steady_step_s")]
    return {
        **raw["info"], "matmul_gflops": max(raw["matmul"]), "matmul_all": raw["matmul"],
        "prefill_s": min(raw["prefill"]), "forward_s": min(raw["forward"]), "prefill_all": raw["prefill"],
        "forward_all": raw["forward"], "loop_step_s": first_step, "steady_step_s": min(steady) if steady else None,
        "tokens": run["tokens"], "total_s": run["total_s"], "generation_s": run["total_s"] - run["prompt_s"],
        "canvas_s": run["canvas_s"], "steps": run["steps"], "mx_peak_gib": max(g["mx_peak_gib"] for g in raw["generate"]),
        "vm_hwm_gib": raw["memory"]["vm_hwm_gib"],
    }


def table(ours: dict, peer: dict, text: dict, args) -> str:
    P, C, S = args.prompt_tokens, args.canvas, args.steps
    step_sc, step_first, pre = config_flops(text, P, C)
    # The loop's first step has no self-conditioning signal (ours skips its MLP and product; the
    # peer runs the MLP on zeros): average over the S steps of a canvas.
    step_avg = ((S - 1) * step_sc + step_first) / S
    peak = max(ours["matmul_gflops"], peer["matmul_gflops"])  # one yardstick for both sides

    def frac(flops: float, secs: float) -> str:
        return f"{flops / secs / 1e9 / peak:.0%}"

    lines = [
        f"| Measure | ours | mlx-vlm {peer.get('version', '')} | ours / peer | ours % of matmul peak | peer % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [
        (f"Prefill of {P} tokens, s", "prefill_s", pre),
        (f"Denoiser forward with self-conditioning (canvas {C}), s", "forward_s", step_sc),
        ("Denoising step in own loop (first canvas / its steps), s", "loop_step_s", step_avg),
    ]
    for name, key, flops in rows:
        o, p = ours[key], peer[key]
        lines.append(f"| {name} | {o:.2f} | {p:.2f} | **{o / p:.2f}** | {frac(flops, o)} | {frac(flops, p)} |")
    if ours["steady_step_s"]:
        o = ours["steady_step_s"]
        lines.append(f"| Our steady-state step (steps 2..{S} of the first canvas), s | {o:.2f} | | "
                     f"{o / peer['loop_step_s']:.2f} (vs peer loop step) | {frac(step_sc, o)} | |")
    for name, key in (("after prefill", "generation_s"), ("including prefill", "total_s")):
        o, p = ours["tokens"] / ours[key], peer["tokens"] / peer[key]
        lines.append(f"| End-to-end tokens/s, {name} (higher is better) | {o:.2f} | {p:.2f} | **{o / p:.2f}** | | |")
    for name, key in (("MLX peak allocation during generation, GiB", "mx_peak_gib"),
                      ("Worker peak RSS (VmHWM), GiB", "vm_hwm_gib")):
        lines.append(f"| {name} | {ours[key]:.2f} | {peer[key]:.2f} | **{ours[key] / peer[key]:.2f}** | | |")
    lines.append(f"| float32 2048^3 matmul, GFLOP/s (best) | {ours['matmul_gflops']:.0f} | {peer['matmul_gflops']:.0f} "
                 f"| {ours['matmul_gflops'] / peer['matmul_gflops']:.2f} | peak used: {peak:.0f} | |")

    def series(values: list[float]) -> str:
        return " ".join(f"{v:.2f}" for v in values)

    notes = [
        "",
        "ours / peer: below 1 means ours takes less time or memory; in the tokens/s rows, above 1 means ours is faster.",
        f"Model: random {args.shape} shape, float32 (hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"{text['num_experts']} experts top-{text['top_k_experts']}, vocab {text['vocab_size']}); prompt {P} tokens, "
        f"canvas {C}, {S} denoising steps, {args.max_tokens} new tokens; steps run per canvas: ours {ours['steps']}, "
        f"peer {peer['steps']}.",
        f"Settings on both sides: entropy-bound sampler, bound 0.1; temperature linear from 0.8 to {0.4 + 0.4 / S:.2f} "
        "(t_max 0.8, t_min 0.4); no early stop (ours: confidence_threshold 1e-9; peer: no stopping config); full canvases.",
        f"Best of {args.rounds} interleaved rounds. All rounds, s: prefill ours {series(ours['prefill_all'])}, "
        f"peer {series(peer['prefill_all'])}; forward ours {series(ours['forward_all'])}, peer {series(peer['forward_all'])}; "
        f"matmul GFLOP/s ours {series(ours['matmul_all'])}, peer {series(peer['matmul_all'])}.",
        f"Generation (fastest of {args.generate_rounds}): canvases took ours {series(ours['canvas_s'])} s, "
        f"peer {series(peer['canvas_s'])} s (later canvases include encoding the previous one).",
        f"FLOPs: denoiser step {step_sc / 1e9:.1f} GFLOP with self-conditioning, "
        f"{step_avg / 1e9:.1f} on average over a canvas; prefill {pre / 1e9:.1f} GFLOP.",
        f"BLAS: ours {ours['blas']}; peer {peer['blas']}.",
        f"CPU: {cpu_in_use()}.",
    ]
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vlm-python", default=DEFAULT_VLM_PYTHON, help="interpreter with mlx-vlm installed")
    parser.add_argument("--shape", choices=["mid", "vocab"], default="mid",
                        help="random_checkpoint.SHAPES: the mid-size model or the vocabulary-heavy shape")
    parser.add_argument("--prompt-tokens", type=int, help="default: the shape's (512 mid, 300 vocab)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (all run)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens end to end (default: two canvases)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of matmul, prefill and forward")
    parser.add_argument("--generate-rounds", type=int, default=1, help="end-to-end generations per side")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or 2 * args.canvas

    if args.worker:
        serve(args.worker, args.workdir)
        return
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # the driver is our interpreter; a peer worker never gets here
    from random_checkpoint import SHAPES

    args.prompt_tokens = args.prompt_tokens or SHAPES[args.shape][1]

    preload = os.environ.get("LD_PRELOAD", "")
    print("BLAS: " + (f"preloaded {preload}" if "blas" in preload.lower()
                      else "MLX's bundled reference BLAS (LD_PRELOAD unset): float32 matmuls are slow"), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare_mlx_vlm_") as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, args)
        text = json.loads((workdir / "ckpt" / "config.json").read_text())["text_config"]
        ours, peer = measure(args, workdir)
    report = table(ours, peer, text, args)
    print(f"\n{report}\n(total {time.perf_counter() - start:.0f} s)")
    if args.out:
        args.out.write_text(f"# mlx_diffgemma vs mlx-vlm DiffusionGemma\n\n{report}")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
