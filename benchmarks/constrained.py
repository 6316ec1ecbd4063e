"""Constrained output: validity on random JSON schemas, automaton build time, and the cost of a
constrained denoising step against a free one, measured side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/constrained.py --schemas 200 --out benchmarks/CONSTRAINED.md

Everything is built here, offline: a SentencePiece BPE tokenizer of 32,768 tokens (Gemma 4's
special tokens, byte fallback) trained on the Python standard library's source, the
mid-size random model of ``benchmarks/random_checkpoint.py`` at that vocabulary (float32)
for the step cost, and a tiny random model at the same vocabulary for validity.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from helpers import build_tokenizer  # noqa: E402
from random_checkpoint import SHAPES, write_random_checkpoint  # noqa: E402
from schemas import random_schema  # noqa: E402

from mlx_diffgemma import load  # noqa: E402
from mlx_diffgemma.constrained import Automaton, Guide, automaton_for, schema_regex, token_bytes  # noqa: E402
from mlx_diffgemma.generate import SeededNoise, denoise_canvas, generate, prefill, resolve_settings  # noqa: E402

SIX_FIELDS = {  # a realistic extraction schema
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,3}"},
        "age": {"type": "integer"},
        "country": {"enum": ["France", "Japan", "Brazil", "Kenya", "Canada"]},
        "interests": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "subscribed": {"type": "boolean"},
    },
    "required": ["name", "email", "age", "country", "interests", "subscribed"],
}


def stdlib_lines() -> list[str]:
    """Non-empty lines of the Python standard library's source: a corpus that is always at hand."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    text = "\n".join(f.read_text(errors="ignore") for f in files[:1500])
    return [line for line in text.splitlines() if line.strip()][:400_000]


def add_tokenizer(model_dir: Path, tokenizer_dir: Path) -> None:
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            (model_dir / f.name).write_bytes(f.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"]["eos_token_id"] = [1, 106]
    (model_dir / "config.json").write_text(json.dumps(config))


def build_times(tokenizer, vocab: int) -> dict:
    """Seconds to turn the vocabulary into bytes, and the six-field schema into an automaton."""
    t0 = time.perf_counter()
    token_bytes(tokenizer)
    t1 = time.perf_counter()
    regex = schema_regex(SIX_FIELDS)
    automaton = Automaton.build(regex, tokenizer, vocab)
    t2 = time.perf_counter()
    return {"vocabulary": t1 - t0, "automaton": t2 - t1, "states": automaton.num_states,
            "classes": automaton.num_classes, "pairs": len(automaton.pair_src), "class sets": len(automaton.set_starts)}


def step_cost(model, tokenizer, steps: int, reps: int) -> dict:
    """Time per denoising step of one 256-token canvas, free and constrained, interleaved."""
    automaton = automaton_for(tokenizer, json_schema=SIX_FIELDS, vocab_size=model.args.vocab_size)
    prompt = mx.array([tokenizer.encode("Extract the person's details as JSON: " + "Ada, 36, Kenya, chess. " * 12)])
    settings = resolve_settings(model, steps=steps, confidence_threshold=1e-12)  # no early stop: equal step counts
    times: dict[str, list[float]] = {"free": [], "constrained": []}
    for rep in range(reps + 1):
        for kind in ("free", "constrained"):
            cache = model.make_cache()
            prefill(model, prompt, cache)
            guides = [Guide(automaton, automaton.start, 256, 512)] if kind == "constrained" else None
            start = time.perf_counter()
            drafts = denoise_canvas(model, cache, 0, 1, settings, SeededNoise(model.args.vocab_size, rep), None, guides)
            for _ in drafts:
                pass
            if rep:  # the first round warms up
                times[kind].append((time.perf_counter() - start) / steps)
    free, constrained = np.median(times["free"]), np.median(times["constrained"])
    return {"free_s": float(free), "constrained_s": float(constrained), "ratio": float(constrained / free)}


def cost_model(work: Path, args) -> tuple:
    """The step-cost model (``--shape``) with the benchmark's tokenizer."""
    folder = write_random_checkpoint(work / args.shape, vocab_size=args.vocab, **SHAPES[args.shape][0])
    add_tokenizer(folder, work / "tok")
    return load(folder)


def validity(write, count: int) -> dict:
    """``write(schema, seed)`` gives a reply's text; how many of ``count`` random schemas' replies validate."""
    rng, valid, failures, seconds = random.Random(0), 0, [], []
    for i in range(count):
        schema = random_schema(rng)
        start = time.perf_counter()
        text = write(schema, i)
        seconds.append(time.perf_counter() - start)
        try:
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append((schema, text, str(e)[:200]))
    return {"count": count, "valid": valid, "failures": failures[:5], "median_s": float(np.median(seconds))}


def server_validity(model_dir: Path, count: int) -> dict:
    """The same through ``mlx-diffgemma serve`` with the ``openai`` client (``response_format``)."""
    import openai
    from test_server import start_server

    process, base = start_server(model_dir)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="local", max_retries=0, timeout=300)

    def write(schema, seed):
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        reply = client.chat.completions.create(model=str(model_dir), messages=[{"role": "user", "content": "Write JSON."}],
                                               response_format=fmt, max_tokens=128, seed=seed, extra_body={"steps": 4})
        return reply.choices[0].message.content

    try:
        return validity(write, count)
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=200, help="random schemas for validity")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas in the step-cost runs")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid",
                        help="the step-cost model: the mid-size one, or the vocabulary-heavy shape of issue #18")
    parser.add_argument("--cost-only", action="store_true", help="only the step cost (no validity runs, no report)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    build_tokenizer(work / "tok", stdlib_lines(), args.vocab)
    print(f"tokenizer trained in {time.perf_counter() - t:.0f} s", flush=True)
    if args.cost_only:
        print("step", step_cost(*cost_model(work, args), args.steps, args.reps), flush=True)
        return
    tiny = write_random_checkpoint(work / "tiny", vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   global_head_dim=32, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
                                   moe_intermediate_size=32, canvas_length=32)
    add_tokenizer(tiny, work / "tok")
    model, tokenizer = load(tiny)
    builds = build_times(tokenizer, args.vocab)
    print("build", builds, flush=True)
    valid = validity(lambda schema, seed: generate(model, tokenizer, "Write JSON.", max_tokens=128, json_schema=schema,
                                                   seed=seed, steps=4), args.schemas)
    print("validity", {k: v for k, v in valid.items() if k != "failures"}, valid["failures"], flush=True)
    served = server_validity(tiny, args.schemas)
    print("server", {k: v for k, v in served.items() if k != "failures"}, served["failures"], flush=True)
    cost = step_cost(*cost_model(work, args), args.steps, args.reps)
    print("step", cost, flush=True)
    if args.out:
        args.out.write_text(report(args, builds, valid, served, cost))


def report(args, builds: dict, valid: dict, served: dict, cost: dict) -> str:
    return f"""# Constrained output: measurements

`python benchmarks/constrained.py --schemas {args.schemas} --vocab {args.vocab} --steps {args.steps} --reps {args.reps}`
on this project's Linux CPU machine (2 cores, MLX CPU backend, float32, OpenBLAS preloaded). Tokenizer:
SentencePiece BPE, {args.vocab} tokens, trained on the Python standard library (byte fallback, Gemma 4's special
tokens). Schema for the cost: six fields (a bounded string, an e-mail pattern, an integer, an enum of five,
an array of up to four strings, a boolean), all required.

## Validity (a random model: the most adversarial writer)

{valid['valid']} of {valid['count']} replies parse and validate with `jsonschema` (random schemas from
`tests/schemas.py`: nested objects, bounded arrays, enums, integers and numbers, strings with length
bounds and patterns, optional fields), tiny random model at the same vocabulary, max_tokens 128, canvas 32,
4 steps; median {valid['median_s']:.2f} s per reply, automaton build included. Through `mlx-diffgemma serve`
with the `openai` client (`response_format` `json_schema`, same schemas and settings): {served['valid']} of
{served['count']} (median {served['median_s']:.2f} s per request).

## Automaton build (six-field schema)

| part | seconds |
|---|---|
| vocabulary as bytes (once per tokenizer) | {builds['vocabulary']:.2f} |
| regex, outlines-core index and token classes | {builds['automaton']:.2f} |

{builds['states']} states, {builds['classes']} token classes, {builds['pairs']} pairs of states joined by a token, {builds['class sets']} distinct class sets.

## Step cost (mid-size model, canvas 256, same run, median of {args.reps})

| | seconds per step |
|---|---|
| free | {cost['free_s']:.3f} |
| constrained | {cost['constrained_s']:.3f} |
| ratio | **{cost['ratio']:.2f}x** |
"""


if __name__ == "__main__":
    main()
