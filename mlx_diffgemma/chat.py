"""Multi-turn chat on top of ``stream_generate``: history and cache reuse. Replies come
split into answer, reasoning and tool calls by ``stream_generate`` (see ``reply.py``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from .generate import GenerationResponse, PromptCache, stream_generate
from .model import Model
from .vision import attach_images, split_image_parts

TEMPLATE_OPTIONS = ("enable_thinking", "tools", "chat_template_kwargs")


class ChatSession:
    """A conversation with one model. Each turn encodes only the tokens the cache lacks:
    the conversation so far is kept as the exact token ids the model saw and wrote, and a
    new turn appends the chat template's text for it. ``generator`` is ``stream_generate``
    or, for a sharded model, ``Lockstep.stream``. A ``prompt_cache`` with a ``prefix`` (a
    prompt-cache file) lets every conversation that starts with that prefix skip encoding it.
    A user message may carry images (paths, or anything ``vision.read_image`` takes); they stay
    in the history, and the cache, which tells images apart, is reused on later turns."""

    def __init__(self, model: Model, tokenizer, system: str | None = None,
                 generator: Callable[..., Iterator[GenerationResponse]] = stream_generate,
                 prompt_cache: PromptCache | None = None, **options: Any):
        self.model, self.tokenizer, self.options, self.generator = model, tokenizer, options, generator
        self.system = system
        self.prompt_cache = prompt_cache or PromptCache()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.history_ids: list[int] = []
        self.last: GenerationResponse | None = None
        self.prompt_cache.reset(self.model)

    def set_system(self, text: str) -> None:
        """A new system prompt starts a new conversation."""
        self.system = text or None
        self.reset()

    def prompt_ids(self, enable_thinking: bool | None = None, tools: list[dict] | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The conversation's ids: those the model already saw, then the template's text for the rest."""
        kwargs = {**(chat_template_kwargs or {}), "enable_thinking": enable_thinking, "tools": tools}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        messages, _ = split_image_parts(self.messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        if self.history_ids:
            seen = self.tokenizer.decode(self.history_ids)
            if text.startswith(seen):
                return self.history_ids + self.tokenizer.encode(text[len(seen):], add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def send(self, text: str, images: list[Any] | None = None, **options: Any) -> Iterator[GenerationResponse]:
        """Stream the reply to a user message, with ``images`` before its text. An interrupted
        reply is kept as far as it got; a refused one (bad settings, prompt too long, an image
        that cannot be read) leaves the history as it was."""
        content: Any = text
        if images:
            content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
        yield from self._reply({"role": "user", "content": content}, options)

    def send_tool_result(self, content: str, name: str | None = None, **options: Any) -> Iterator[GenerationResponse]:
        """Stream the reply to a tool's result (a ``tool`` turn after the model's call)."""
        message = {"role": "tool", "content": content, **({"name": name} if name else {})}
        yield from self._reply(message, options)

    def _reply(self, message: dict[str, Any], options: dict[str, Any]) -> Iterator[GenerationResponse]:
        self.messages.append(message)
        options = {**self.options, **options}
        template = {k: options.pop(k, None) for k in TEMPLATE_OPTIONS}
        try:
            ids = self.prompt_ids(**template)
            prompt, images = ids, split_image_parts(self.messages)[1]
            if images:  # expanded here, so that the reply is sized to the whole prompt
                [prompt], options["image_features"] = attach_images(self.model, [ids], [images])
            stream = self.generator(self.model, self.tokenizer, prompt, prompt_cache=self.prompt_cache, **options)
            first = next(stream, None)  # checks the request and prefills
        except BaseException:
            self.messages.pop()
            raise
        reply: list[int] = []
        calls: list[dict[str, Any]] = []
        try:
            for response in itertools.chain([first] if first is not None else [], stream):
                reply += response.tokens
                calls += response.tool_calls
                self.last = response
                yield response
        finally:
            stream.close()
            message: dict[str, Any] = {"role": "assistant", "content": self.tokenizer.decode(reply)}
            if calls:
                message["tool_calls"] = [{"type": "function", "function": c} for c in calls]
            self.messages.append(message)
            self.history_ids = ids + reply
