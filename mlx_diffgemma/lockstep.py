"""Serving a sharded model: rank 0 takes requests, the other ranks follow it step for step."""

from __future__ import annotations

import json
import random
import signal
import threading
import zlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict
from typing import Any

import mlx.core as mx
import numpy as np

from .generate import GenerationResponse, PromptCache, stream_generate
from .model import Model
from .sampler import DiffusionSettings


class Lockstep:
    """Rank 0 serves requests (``chat``, ``serve``); the other ranks follow them step for step.

    A sharded model runs collectives inside every forward, so all ranks must make the same
    model calls. Rank 0 broadcasts each request (prompt ids and options, with a concrete
    seed); every rank then runs the same ``stream_generate``, which is deterministic given
    them. After each streamed response all ranks pass a gate where rank 0 says whether it
    still wants the next one: when its consumer stops (Ctrl-C in chat, a client that went
    away, a stop string), every rank stops at that same response.
    """

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.leader = group.rank() == 0

    def _sum(self, x: mx.array) -> mx.array:
        out = mx.distributed.all_sum(x, group=self.group)
        mx.eval(out)
        return out

    def _broadcast(self, message: dict | None) -> dict | None:
        """Rank 0's JSON message on every rank; ``None`` means shut down."""
        data = json.dumps(message).encode() if self.leader and message is not None else b""
        size = self._sum(mx.array([len(data)], dtype=mx.int32)).item()
        if not size:
            return None
        buffer = mx.array(np.frombuffer(data, dtype=np.uint8)) if self.leader else mx.zeros((size,), dtype=mx.uint8)
        return json.loads(bytes(np.array(self._sum(buffer))))

    def _gate(self, go: bool) -> bool:
        return bool(self._sum(mx.array([int(go and self.leader)], dtype=mx.int32)).item())

    def _agree(self, prompt_cache: PromptCache) -> None:
        """Every rank's prompt caches must hold the same conversations, so that each picks the
        same one; if any differs (rank 0 reset its conversation), all start afresh."""
        state = [[c.tokens, c.snapshot[0] if c.snapshot else None, c.cache.offset if c.cache is not None else None]
                 for c in prompt_cache.conversations]
        digest = zlib.crc32(json.dumps(state).encode()) & 0x7FFFFFFF
        digests = mx.distributed.all_gather(mx.array([digest], dtype=mx.int32), group=self.group)
        if len(set(digests.tolist())) > 1:
            prompt_cache.clear()

    def _run(self, model: Model, tokenizer, request: dict, prompt_cache: PromptCache) -> Iterator[GenerationResponse]:
        self._agree(prompt_cache)
        options = dict(request["options"])
        if options.get("settings") is not None:
            options["settings"] = DiffusionSettings(**options["settings"])
        responses = stream_generate(model, tokenizer, request["ids"], prompt_cache=prompt_cache, **options)
        with closing(responses):
            for response in responses:
                try:
                    yield response
                except GeneratorExit:
                    self._gate(False)
                    raise
                if not self._gate(True):
                    return

    def stream(self, model: Model, tokenizer, prompt: list[int], *, prompt_cache: PromptCache,
               **options: Any) -> Iterator[GenerationResponse]:
        """Rank 0's ``stream_generate``: the same arguments (token ids, a prompt cache)."""
        if options.get("seed") is None:
            options["seed"] = random.randrange(2**31)
        if isinstance(options.get("settings"), DiffusionSettings):
            options["settings"] = asdict(options["settings"])
        request = {"ids": list(prompt), "options": options}
        self._broadcast(request)
        yield from self._run(model, tokenizer, request, prompt_cache)

    def follow(self, model: Model, tokenizer, prompt_cache: PromptCache | None = None) -> None:
        """The other ranks: run rank 0's requests until it shuts down. ``prompt_cache`` must be
        made as rank 0's is (the same ``max_bytes``), so that each rank keeps the same conversations.

        Ctrl-C in a terminal reaches every rank of ``mlx.launch``; a follower ignores it,
        since only rank 0 can stop a reply at a step where all ranks agree.
        """
        prompt_cache = prompt_cache or PromptCache()
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            while (request := self._broadcast(None)) is not None:
                try:
                    for _ in self._run(model, tokenizer, request, prompt_cache):
                        pass
                except ValueError:  # a refused request: rank 0 reports it, and so it goes on
                    pass
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def close(self) -> None:
        """Rank 0: release the followers."""
        self._broadcast(None)
