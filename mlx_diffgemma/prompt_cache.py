"""Prompt caches kept between requests, and prompt-cache files.

A ``PromptCache`` holds the KV caches of several conversations, each with the token ids
it holds; a request reuses the one that holds the longest prefix of its ids and encodes
only the rest. The least recently used are dropped once they hold more than
``max_bytes``. A prompt-cache file (``save_prompt_cache``) holds one encoded prefix, such
as a long system prompt, with its token ids and the model it was made for; loaded as a
``PromptCache``'s ``prefix``, every conversation that starts with it starts from it.

The files are safetensors written here rather than with mlx-lm's ``save_prompt_cache``:
mlx-lm's ``load_prompt_cache`` rebuilds each layer from a class name looked up in its own
module only, so it cannot rebuild these layers. The layers do follow its protocol
(``state``, ``meta_state``, ``from_state``), and that is what is written and read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import DiffusionCache, LayerCache
from .model import Model

DEFAULT_MAX_BYTES = 4 * 2**30
FILE_FORMAT = "mlx-diffgemma prompt cache 1"


@dataclass
class Conversation:
    """One cached conversation, and a snapshot taken right after its last prompt was
    encoded: a client that sends the whole conversation again, with the reply
    re-tokenized from its text, still shares that prompt as a prefix even when it no
    longer shares the generated canvases."""

    cache: DiffusionCache | None
    tokens: list[int]
    snapshot: tuple[list[int], DiffusionCache] | None = None

    def reusable(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` this conversation can skip encoding."""
        if self.cache is not None and _extends(ids, self.tokens):
            return len(self.tokens)
        if self.snapshot is not None and _extends(ids, self.snapshot[0]):
            return len(self.snapshot[0])
        return 0

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers held (the snapshot shares them until the cache is written)."""
        caches = [c for c in (self.cache, self.snapshot and self.snapshot[1]) if c is not None]
        buffers = {id(a): a for c in caches for a in c.state()}
        return sum(a.nbytes for a in buffers.values())


class PromptCache:
    """KV caches kept between requests (chat turns, server requests), least recently used out first.

    ``prepare`` picks the conversation that holds the longest prefix of a request's ids
    (or starts one, from ``prefix`` when the ids extend it); that conversation is the
    current one until the next ``prepare``, and ``cache``, ``tokens`` and ``snapshot`` are
    its. After a reply (``keep``), the oldest conversations are dropped while all of them
    together hold more than ``max_bytes`` (``None``: no bound). The ``prefix`` is held
    apart and never dropped.
    """

    def __init__(self, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 prefix: tuple[list[int], DiffusionCache] | None = None):
        self.max_bytes, self.prefix = max_bytes, prefix
        self.conversations: list[Conversation] = []  # least recently used first
        self.current: Conversation | None = None

    @property
    def cache(self) -> DiffusionCache | None:
        return self.current.cache if self.current else None

    @property
    def tokens(self) -> list[int]:
        return self.current.tokens if self.current else []

    @property
    def snapshot(self) -> tuple[list[int], DiffusionCache] | None:
        return self.current.snapshot if self.current else None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.conversations)

    def prepare(self, model: Model, ids: list[int]) -> list[int]:
        """Make the conversation that holds the longest prefix of ``ids`` current; return the ids still to encode."""
        best = max(self.conversations, key=lambda c: c.reusable(ids), default=None)
        reused = best.reusable(ids) if best else 0
        if self.prefix is not None and _extends(ids, self.prefix[0]) and len(self.prefix[0]) > reused:
            best, reused = Conversation(self.prefix[1].copy(), list(self.prefix[0])), len(self.prefix[0])
        elif reused == 0:
            best = Conversation(model.make_cache(), [])
        elif best.cache is None or not _extends(ids, best.tokens):
            best.tokens, best.cache = list(best.snapshot[0]), best.snapshot[1].copy()
        if best in self.conversations:
            self.conversations.remove(best)
        self.conversations.append(best)
        self.current = best
        return ids[reused:]

    def remember_prompt(self, ids: list[int]) -> None:
        self.current.snapshot = (list(ids), self.current.cache.copy())

    def keep(self, ids: list[int]) -> None:
        """After a reply: the cache holds a prefix of ``ids`` (prompt and kept reply). If it
        holds more (the reply was cut at a stop string inside an encoded canvas), only the
        prompt snapshot is kept. Then the oldest conversations go while over ``max_bytes``."""
        current = self.current
        if current is not None and current.cache is not None and current.cache.offset:
            if current.cache.offset <= len(ids):
                current.tokens = ids[: current.cache.offset]
            else:
                current.cache, current.tokens = None, []
        while self.conversations and self.max_bytes is not None and self.nbytes > self.max_bytes:
            dropped = self.conversations.pop(0)
            if dropped is self.current:
                self.current = None

    def reset(self, model: Model) -> None:
        """Forget the current conversation (a new one starts, or its cache may be half-written)."""
        if self.current in self.conversations:
            self.conversations.remove(self.current)
        self.current = None

    def clear(self) -> None:
        """Forget every conversation (the ``prefix`` stays)."""
        self.conversations, self.current = [], None


def _extends(ids: list[int], prefix: list[int]) -> bool:
    """Whether ``ids`` continue ``prefix`` with at least one more token."""
    return 0 < len(prefix) < len(ids) and ids[: len(prefix)] == prefix


def model_fingerprint(model: Model) -> str:
    """A digest of the model's configuration and of the first values of every weight, so a
    cache file is not used with another checkpoint (or other adapters) of the same shape."""
    digest = hashlib.sha256(json.dumps(asdict(model.args), sort_keys=True, default=str).encode())
    for name, weight in tree_flatten(model.parameters()):
        head = weight.reshape(-1)[:16]
        head = head.astype(mx.float32) if mx.issubdtype(head.dtype, mx.floating) else head
        digest.update(f"{name}{weight.shape}{weight.dtype}".encode())
        digest.update(np.array(head).tobytes())
    return digest.hexdigest()


def save_prompt_cache(path: str | Path, model: Model, cache: DiffusionCache, tokens: list[int],
                      system: str | None = None) -> None:
    """Write ``cache`` (one row, holding exactly ``tokens``) to a ``.safetensors`` file;
    ``system``: the system prompt whose chat-template rendering the tokens are, if they are."""
    if cache.left_padding is not None or cache.offset != len(tokens):
        raise ValueError("a prompt-cache file holds one unpadded prompt, all of it encoded")
    arrays = {}
    for i, layer in enumerate(cache.layers):
        arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = layer.state
    metadata = {
        "format": FILE_FORMAT, "model": model_fingerprint(model), "tokens": json.dumps(tokens),
        "meta_state": json.dumps([layer.meta_state for layer in cache.layers]),
    }
    if system is not None:
        metadata["system"] = system
    mx.save_safetensors(str(path), arrays, metadata)


def load_prompt_cache(path: str | Path, model: Model) -> tuple[list[int], DiffusionCache, str | None]:
    """The token ids, cache and system prompt (``None`` for raw text) of a prompt-cache
    file; a ``ValueError`` if it is not one, or was made for another model."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read prompt-cache file {path}: {e}") from None
    if not isinstance(arrays, dict) or metadata.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not an mlx-diffgemma prompt-cache file")
    if metadata.get("model") != model_fingerprint(model):
        raise ValueError(f"prompt-cache file {path} was made for another model")
    tokens, meta_states = json.loads(metadata["tokens"]), json.loads(metadata["meta_state"])
    cache = DiffusionCache([])
    cache.layers = [
        LayerCache.from_state((arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"]), tuple(meta))
        for i, meta in enumerate(meta_states)
    ]
    cache.offset = len(tokens)
    mx.eval(cache.state())
    return tokens, cache, metadata.get("system")


def system_prefix(tokenizer, system: str, **template_kwargs) -> list[int]:
    """The ids every conversation with this system prompt starts with: the chat template's
    rendering of the system turn alone (``template_kwargs``, such as ``tools``, as the
    conversations will pass them)."""
    template_kwargs = {k: v for k, v in template_kwargs.items() if v is not None}
    messages = [{"role": "system", "content": system}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, **template_kwargs))
