"""Prompt caches on the random mid-size model (``random_checkpoint.MID_SIZE``, float32), all in one run:

* two conversations alternate, each opening with its own ``--prefix``-token prompt (A, then B, then A's
  next turn): the prefill of A's next turn (``--new`` tokens past what the cache holds) against A's first;
* a prompt-cache file of A's prompt: the time to load it (fingerprint check included) against its prefill,
  and the prefill of a request that starts with it;
* one denoising step (self-conditioning on) over the ``--prefix``-token cache, with the preallocated cache
  and with the cache as it was before (whole cache concatenated per call), alternated, medians.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n 10 python benchmarks/prompt_cache.py

What a request costs is timed as ``stream_generate`` spends it before its first canvas: choosing a cache
(``PromptCache.prepare``), encoding what it lacks (``prefill``) and the snapshot after the prompt. A reply is
two committed canvases; the first is encoded into the cache, as ``generate_step`` does when the second starts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from random_checkpoint import write_random_checkpoint  # noqa: E402

from mlx_diffgemma.cache import LayerCache  # noqa: E402
from mlx_diffgemma.generate import prefill  # noqa: E402
from mlx_diffgemma.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache  # noqa: E402
from mlx_diffgemma.utils import load_model  # noqa: E402


class ConcatenatingLayer(LayerCache):
    """The cache before preallocation (commit 4c95b3c): cached + new concatenated on every call."""

    def __init__(self, window, cached):
        super().__init__(window)
        self.cached = cached

    @property
    def length(self) -> int:
        return self.cached[0].shape[2]

    def extend(self, keys, values, store):
        assert not store, "only the denoiser's read is timed"
        return mx.concatenate([self.cached[0], keys], axis=2), mx.concatenate([self.cached[1], values], axis=2)


def request(model, caches: PromptCache, ids: list[int]) -> tuple[float, int]:
    """Seconds until the prompt is in the cache, and the tokens reused."""
    tic = time.perf_counter()
    rest = caches.prepare(model, ids)
    prefill(model, mx.array([rest]), caches.cache)
    caches.remember_prompt(ids)
    return time.perf_counter() - tic, len(ids) - len(rest)


def reply(model, caches: PromptCache, ids: list[int], tokens: list[int]) -> None:
    canvas = model.args.canvas_length
    model.encode(mx.array([tokens[:canvas]]), caches.cache)
    mx.eval(caches.cache.state())
    caches.keep(ids + tokens)


def step_seconds(model, cache, canvas, probs) -> float:
    tic = time.perf_counter()
    mx.eval(model.denoise(canvas, cache, None, 0, probs))
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=4000, help="tokens each conversation opens with")
    parser.add_argument("--new", type=int, default=64, help="tokens of the next turn past what the cache holds")
    parser.add_argument("--repeats", type=int, default=5, help="denoising steps timed per cache kind")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_random_checkpoint(Path(tmp) / "mid", dtype=mx.float32))
        vocab, canvas = model.args.vocab_size, model.args.canvas_length

        def tokens(n: int) -> list[int]:
            return rng.integers(1, vocab, size=n).tolist()

        caches = PromptCache()
        mx.eval(model.denoise(mx.array([tokens(canvas)]), model.make_cache()))  # warm up
        prompts, replies, firsts, held = {}, {}, {}, {}
        for name in "AB":
            prompts[name], replies[name] = tokens(args.prefix), tokens(2 * canvas)
            firsts[name], _ = request(model, caches, prompts[name])
            if name == "A":  # the prompt's cache, as a file and for the denoising steps
                path, cache = Path(tmp) / "a.safetensors", caches.snapshot[1]
                save_prompt_cache(path, model, cache, prompts[name])
            reply(model, caches, prompts[name], replies[name])
            held[name] = len(caches.tokens)
            print(f"conversation {name}, {args.prefix}-token prompt: prefill {firsts[name]:.3f} s")
        first = firsts["A"]
        # A's next turn has --new tokens past what its cache holds; B's also has the reply's last canvas,
        # which generation never encodes.
        for name, extra in (("A", args.new), ("B", canvas + args.new)):
            ids = (prompts[name] + replies[name] + tokens(extra))[: held[name] + extra]
            second, reused = request(model, caches, ids)
            print(f"{name}'s next turn after the other's ({len(ids)} tokens, {reused} reused, {extra} new): "
                  f"prefill {second:.3f} s = {second / firsts[name]:.1%} of {name}'s first")
            reply(model, caches, ids, tokens(2 * canvas))
        print(f"caches held: {len(caches.conversations)} conversations, {caches.nbytes / 2**20:.0f} MiB")
        a = prompts["A"]

        mx.clear_cache()
        tic = time.perf_counter()
        prefix_tokens, loaded, _ = load_prompt_cache(path, model)
        load = time.perf_counter() - tic
        print(f"prompt-cache file ({path.stat().st_size / 2**20:.0f} MiB): loaded in {load:.3f} s = "
              f"{load / first:.1%} of its prefill")
        from_file = PromptCache(prefix=(prefix_tokens, loaded))
        branch, reused = request(model, from_file, a + tokens(args.new))
        print(f"a request that starts with the file's prefix ({reused} reused, {args.new} new): prefill "
              f"{branch:.3f} s = {branch / first:.1%} of the prompt's, {(branch + load) / first:.1%} with the load")

        old = model.make_cache()
        old.offset = cache.offset
        old.layers = [ConcatenatingLayer(layer.window, tuple(mx.array(np.array(s)) for s in layer.state))
                      for layer in cache.layers]
        mx.eval([layer.cached for layer in old.layers])
        canvas_ids = mx.array([tokens(canvas)])
        probs = mx.softmax(mx.random.normal((1, canvas, vocab)), axis=-1)
        mx.eval(probs)
        times = {"preallocated": [], "concatenating (before)": []}
        for _ in range(args.repeats):
            times["preallocated"].append(step_seconds(model, cache, canvas_ids, probs))
            times["concatenating (before)"].append(step_seconds(model, old, canvas_ids, probs))
        for name, values in times.items():
            print(f"denoising step over {cache.offset} cached tokens, {name}: median {statistics.median(values):.3f} s "
                  f"({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
