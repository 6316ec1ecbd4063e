"""Run by tests/test_distributed.py under ``mlx.launch``: an unseeded generation on a
sharded model; every rank prints its token ids and the seed it drew, if any."""

import importlib
import json
import sys

import mlx.core as mx

from mlx_diffgemma import load, stream_generate

generation = importlib.import_module("mlx_diffgemma.generate")  # the module, not the function it exports

drawn: list[int] = []
draw = generation.random_seed
generation.random_seed = lambda: drawn.append(draw()) or drawn[-1]

group = mx.distributed.init()
model, tokenizer = load(sys.argv[1], group=group)
tokens = [t for r in stream_generate(model, tokenizer, [2, 10, 11, 12, 13], 32, steps=4) for t in r.tokens]
print(json.dumps({"rank": group.rank(), "tokens": tokens, "drawn": drawn}), flush=True)
