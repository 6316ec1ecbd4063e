"""An OpenAI-compatible HTTP server (``mlx-diffgemma serve``), as LM Studio offers.

One model, loaded once. Requests are served in arrival order by a single worker thread:
MLX and the tokenizer (chat template included) are driven from that thread only, while
the event loop keeps answering ``/health`` and ``/v1/models``. A client that goes away,
streamed or not, stops its generation within one denoising step. The worker keeps a
``PromptCache`` of several conversations (least recently used out first, bounded by
bytes), so the next turn of a conversation encodes only what is new, even when other
conversations came in between, and a prompt-cache file's prefix is encoded once. Under
``mlx.launch`` rank 0 serves and the other ranks follow each request (``Lockstep``). If
the worker thread dies, ``/health`` answers 503 and so does every new request.

Accepted: ``POST /v1/chat/completions`` and ``/v1/completions`` with an
``application/json`` body (any charset) of at most ``MAX_BODY_BYTES``. Messages may be
``system``, ``developer`` (as system), ``user``, ``assistant`` (``content`` null or absent
when it carries ``tool_calls``; their ``arguments`` may be a JSON string) and ``tool``
(answering an earlier call by ``tool_call_id``); content is a string or a list of text
parts, and in user messages ``image_url`` parts: a ``data:`` URI, or an ``http(s)`` URL
when the server was started with ``allow_remote_images`` (fetched here, at most
``MAX_IMAGE_BYTES`` within ``IMAGE_TIMEOUT`` seconds). ``tools`` go to the chat template.
``n`` (1 to ``MAX_CHOICES``) choices are denoised as one batch, choice ``i`` with seed
``seed + i``. ``max_tokens`` beyond the context is clamped to what fits and the reply ends
with ``finish_reason: "length"``.
``/v1/completions`` with a ``suffix`` infills: the completion is the middle between the
prompt and the suffix, its length chosen by ``infill.py``'s rule (``max_tokens`` bounds it;
``stop`` and a sharded model are refused). ``echo`` and ``best_of`` are accepted at their
neutral values only (``false``; 1 or ``n``).

``temperature`` maps onto DiffusionGemma's schedule: ``t_max = temperature`` and
``t_min = temperature / 2`` (the default 0.8 -> 0.4 shape); ``temperature = 0`` is
near-greedy (1e-4). Model-specific extras may be passed in the body: ``steps``,
``entropy_bound``, ``t_min``, ``t_max``, ``canvas_length``, ``self_conditioning_top_k``.

Refused, always in OpenAI's error shape: a body that is not JSON (415 for another or no
content type, 413 above the size limit, 400 for malformed or deeply nested JSON), fields
of the wrong type or range, unknown roles, content parts other than text and images (an
image that cannot be read, or sent to a model without a vision tower), a tool message that
answers no earlier call, a prompt that leaves no room to generate, and sampler fields
DiffusionGemma cannot honour (``top_p``, ``top_k``, ``logprobs``, penalties, ...) at any
value but their neutral one. Unknown routes and methods answer 404 and 405.

Browsers: CORS is allowed for ``cors_origins`` (``"*"`` for any); by default only for
pages served from localhost, 127.0.0.1 or [::1], so other web pages cannot drive the model.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from .generate import (Draft, GenerationResponse, PromptCache, check_request, fitting_tokens, prepare_prompt,
                       random_seed, resolve_settings, stream_batch_generate, stream_generate)
from . import anthropic, responses_api
from .infill import Infill, stream_infill
from .constrained import automaton_for, check_length, schema_regex, tool_call_regex
from .lockstep import Lockstep
from .model import Model
from .tools import RequestError, arguments_json, call_id, openai_tools, template_tool_call, tool_choice
from .vision import ImageError, attach_images, read_image

logger = logging.getLogger(__name__)

GREEDY_TEMPERATURE = 1e-4
EXTRA_SETTINGS = ("steps", "entropy_bound", "t_min", "t_max", "canvas_length", "self_conditioning_top_k")
MAX_BODY_BYTES = 32 * 2**20
MAX_JSON_DEPTH = 64
MAX_CHOICES = 8
MAX_IMAGE_BYTES = 20 * 2**20  # an image fetched from an http(s) URL
IMAGE_TIMEOUT = 10.0  # seconds to fetch it
ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# Sampler fields DiffusionGemma has no counterpart for: accepted only at the value that changes nothing.
NEUTRAL = {"top_p": (1,), "top_k": (0, -1), "min_p": (0,), "presence_penalty": (0,), "frequency_penalty": (0,),
           "repetition_penalty": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},)}
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    413: "request_too_large", 503: "overloaded_error"}
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def worker_died() -> APIError:
    return APIError(503, "the generation thread has stopped; restart the server", kind="server_error")


@dataclass
class Accepted:
    """The worker took a request: its prompt fits and generation starts."""

    prompt_tokens: int


Event = Accepted | GenerationResponse | Exception | None


@dataclass
class Job:
    """One request for the worker; events flow back to the event loop through ``emit``
    (``Accepted`` or an ``APIError`` first, then responses, then ``None``)."""

    prompt: str | list[dict[str, Any]]
    options: dict[str, Any]
    n: int = 1
    tools: list[dict[str, Any]] | None = None
    template: dict[str, Any] = field(default_factory=dict)  # chat template options (enable_thinking, ...)
    tool_choice: str | None = None  # "required" or a function's name: the reply is one call, constrained
    suffix: str | None = None  # infilling: the completion is the middle between the prompt and this
    emit: Callable[[Event], None] = lambda event: None  # set by the request that waits for the events
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The single thread that runs MLX and the tokenizer. With ``lockstep`` (a sharded
    model under ``mlx.launch``) the other ranks follow each job and are released on ``stop``."""

    def __init__(self, model: Model, tokenizer, lockstep: Lockstep | None = None,
                 prompt_cache: PromptCache | None = None):
        self.model, self.tokenizer, self.lockstep = model, tokenizer, lockstep
        self.generate = lockstep.stream if lockstep else stream_generate
        self.prompt_cache = prompt_cache or PromptCache()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        self.failure: str | None = None
        self.thread = threading.Thread(target=self.run, name="mlx-diffgemma-worker", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return not self.closed and self.thread.is_alive()

    def submit(self, job: Job) -> None:
        with self.lock:  # so that no job lands in the queue after a dying worker drained it
            if not self.alive:
                raise worker_died()
            self.jobs.put(job)

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                self.serve(job)
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            logger.critical("the generation thread died", exc_info=True)
        finally:
            with self.lock:
                self.closed = True
            while not self.jobs.empty():
                if (job := self.jobs.get_nowait()) is not None:
                    job.emit(worker_died())
                    job.emit(None)
            if self.lockstep:
                self.lockstep.close()

    def serve(self, job: Job) -> None:
        try:
            if job.cancelled.is_set() or self.stopping.is_set():
                return
            try:
                ids, options = self.prepare(job)
            except APIError as e:
                job.emit(e)
                return
            job.emit(Accepted(len(ids)))
            responses = self.responses(job, ids, options)
            try:
                for response in responses:  # with drafts: one per denoising step, so cancellation is prompt
                    if job.cancelled.is_set() or self.stopping.is_set():
                        break
                    if response.draft is None:
                        job.emit(response)
            finally:
                responses.close()
        except Exception as e:  # reported to the client; the worker goes on
            logger.error("generation failed", exc_info=True)
            job.emit(e)
        except BaseException:
            job.emit(worker_died())
            raise
        finally:
            job.emit(None)

    def prepare(self, job: Job) -> tuple[list[int], dict[str, Any]]:
        """Token ids and options, ``max_tokens`` clamped to the context; an ``APIError`` if refused.
        Images are expanded to their soft tokens here, so that the reply is sized to the whole prompt."""
        images: list[Any] = []
        try:
            ids = prepare_prompt(self.tokenizer, job.prompt, images=images, tools=job.tools, **job.template)
        except Exception as e:  # the chat template refused the conversation
            raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
        options = dict(job.options)
        if images:
            if self.lockstep is not None:
                raise APIError(400, "images are not supported on a model sharded across machines", "messages")
            try:
                [ids], features = attach_images(self.model, [ids], [images])
            except ImageError as e:
                raise APIError(400, str(e), "messages") from None
            options["image_features"] = features
        if job.suffix is not None:
            return ids, {"infills": self.infills(job, options)}
        try:
            settings = resolve_settings(self.model, **{k: options.get(k) for k in EXTRA_SETTINGS})
            room = fitting_tokens(self.model, len(ids), settings.canvas_length)
            if room == 0:
                raise ValueError(f"prompt too long: {len(ids)} prompt tokens leave no room for a canvas of "
                                 f"{settings.canvas_length} in the model's context of {self.model.args.max_position_embeddings}")
            options["max_tokens"] = min(options["max_tokens"], room)
            check_request(self.model, [ids], options["max_tokens"], settings.canvas_length)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        param = "response_format" if options.get("json_schema") is not None else "tool_choice"
        try:  # compiled here, once, so that a refused constraint is a 400 before anything streams
            if job.tool_choice not in (None, "auto", "none"):  # the reply is one call, its arguments valid
                options["regex"] = tool_call_regex(job.tools, None if job.tool_choice == "required" else job.tool_choice)
            if options.get("json_schema") is not None or options.get("regex") is not None:
                constraint = automaton_for(self.tokenizer, json_schema=options.get("json_schema"),
                                           regex=options.get("regex"), vocab_size=self.model.args.vocab_size)
                check_length(constraint, options["max_tokens"])
        except ValueError as e:
            raise APIError(400, str(e), param) from None
        return ids, options

    def infills(self, job: Job, options: dict[str, Any]) -> list[Generator[Draft, None, Infill]]:
        """One infill per choice (choice ``i`` with seed ``seed + i``), its input checked now."""
        if self.lockstep is not None:
            raise APIError(400, "'suffix' (infilling) is not supported on a model sharded across machines", "suffix")
        seed = random_seed() if options["seed"] is None else options["seed"]
        settings = {k: options.get(k) for k in EXTRA_SETTINGS}
        try:
            return [stream_infill(self.model, self.tokenizer, job.prompt, job.suffix, max_tokens=options["max_tokens"],
                                  seed=seed + i, **settings) for i in range(job.n)]
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def infill_responses(self, infills: list[Generator[Draft, None, Infill]], prompt_tokens: int) -> Iterator[GenerationResponse]:
        """Each choice's middle as one response, after a draft response per denoising step
        (not sent, but ``serve`` checks for cancellation at each)."""
        # Prefill runs inside the infill and is not timed apart: prompt_tps is left at 0.
        base = dict(prompt_tokens=prompt_tokens, prompt_tps=0.0, cached_tokens=0)
        for i, steps in enumerate(infills):
            tic = time.perf_counter()
            while True:
                try:
                    draft = next(steps)
                except StopIteration as done:
                    result = done.value
                    break
                yield GenerationResponse(text="", tokens=[], draft="", step=draft.step, generation_tokens=0,
                                         generation_tps=0.0, index=i, **base)
            length, seconds = len(result.tokens), time.perf_counter() - tic
            yield GenerationResponse(text=result.text, tokens=result.tokens, draft=None, step=None, generation_tokens=length,
                                     generation_tps=length / seconds, steps_per_canvas=[result.steps],
                                     tokens_per_forward=length / max(result.steps, 1), peak_memory=mx.get_peak_memory() / 1e9,
                                     finish_reason="stop", index=i, raw=result.text, **base)

    def responses(self, job: Job, ids: list[int], options: dict[str, Any]) -> Iterator[GenerationResponse]:
        if job.suffix is not None:
            yield from self.infill_responses(options["infills"], len(ids))
            return
        options = {**options, "draft": True}
        if job.n == 1:
            yield from self.generate(self.model, self.tokenizer, ids, prompt_cache=self.prompt_cache, **options)
        elif self.lockstep is None:
            if options.get("image_features") is not None:  # every row's images, row after row
                options["image_features"] = mx.concatenate([options["image_features"]] * job.n)
            yield from stream_batch_generate(self.model, self.tokenizer, [ids] * job.n, **options)
        else:  # the followers run single prompts: one choice after another, seeds as a batch would use
            seed = options.pop("seed")
            seed = random_seed() if seed is None else seed
            for i in range(job.n):
                for response in self.lockstep.stream(self.model, self.tokenizer, ids, prompt_cache=self.prompt_cache,
                                                     seed=seed + i, **options):
                    yield replace(response, index=i)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the current job at its next step, drop queued ones, and wait for the thread."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout)


def parse_number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}", name)
    if low is not None and value < low:
        raise APIError(400, f"'{name}' must be >= {low}", name)
    if high is not None and value > high:
        raise APIError(400, f"'{name}' must be <= {high}", name)
    return kind(value)


def parse_flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false", name)
    return bool(value)


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return parse_flag(options, "include_usage")


def check_neutral(body: dict) -> None:
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            continue
        shown = " or ".join(json.dumps(v) for v in neutral)
        raise APIError(400, f"'{name}' cannot be honoured by the diffusion sampler: leave it out or send {shown}", name)


def sampling_options(body: dict) -> dict[str, Any]:
    """Request fields onto ``stream_generate`` options (validated here or by ``DiffusionSettings``)."""
    check_neutral(body)
    options: dict[str, Any] = {}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options["max_tokens"] = parse_number(body, name, int, 1) or 256
    temperature = parse_number(body, "temperature", float, 0)
    if temperature is not None:
        t = max(temperature, GREEDY_TEMPERATURE)
        options["t_max"], options["t_min"] = t, t / 2 if temperature > 0 else t
    for name in EXTRA_SETTINGS:
        if body.get(name) is not None:
            options[name] = parse_number(body, name, float if name in ("entropy_bound", "t_min", "t_max") else int)
    options["seed"] = parse_number(body, "seed", int)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        options["stop"] = stop
    return options


def message_content(content: Any, param: str, image: Callable[[dict, str], Any] | None = None) -> str | list[dict[str, Any]]:
    """A message's content: a string, or OpenAI's list of parts; text, and where ``image`` is
    given (it reads an image part: user messages), images too, as the chat template's parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{param}' must be a string or a list of content parts", param)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "image") and image is not None:
            parts.append({"type": "image", "image": image(part, f"{param}[{i}]")})
        else:
            accepted = "a text part {\"type\": \"text\", \"text\": \"...\"}"
            accepted += " or an image_url part" if image is not None else "; images go in user messages"
            raise APIError(400, f"'{param}[{i}]' must be {accepted}", f"{param}[{i}]")
    if any(p["type"] == "image" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def read_image_part(part: dict, param: str, remote: bool = False) -> Any:
    """The decoded image of an ``image_url`` part (a ``data:`` URI; with ``remote``, an http(s)
    URL fetched here), or of an ``image`` part a translated request (Anthropic's, the
    Responses API's) decoded already."""
    if part["type"] == "image":  # decoded by a translator: a PIL image, which no JSON body can carry
        try:
            from PIL.Image import Image
        except ImportError:
            Image = ()
        if not isinstance(part.get("image"), Image):
            raise APIError(400, f"'{param}' must be a text part or an image_url part", param)
        return part["image"]
    spec = part.get("image_url")
    url, param = spec.get("url") if isinstance(spec, dict) else spec, f"{param}.image_url"
    if not isinstance(url, str) or not url.startswith(("data:", "http://", "https://")):
        raise APIError(400, f"'{param}' must be {{\"url\": \"data:image/...;base64,...\"}} or an http(s) URL", param)
    if url.startswith("http") and not remote:
        raise APIError(400, f"'{param}': remote images are not fetched; send the image as a data: URI "
                            "(or start the server with --allow-remote-images)", param)
    try:
        return read_image(fetch_image(url, param) if url.startswith("http") else url)
    except ImageError as e:
        raise APIError(400, f"'{param}': {e}", param) from None


def fetch_image(url: str, param: str) -> bytes:
    """The body of a GET ``url``: at most ``MAX_IMAGE_BYTES``, within ``IMAGE_TIMEOUT`` seconds in all."""
    import httpx

    deadline, data = time.monotonic() + IMAGE_TIMEOUT, bytearray()
    try:
        with httpx.stream("GET", url, timeout=IMAGE_TIMEOUT, follow_redirects=True) as response:
            if response.status_code != 200:
                raise APIError(400, f"'{param}': {url[:100]} answered HTTP {response.status_code}", param)
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise APIError(400, f"'{param}': {url[:100]} is larger than {MAX_IMAGE_BYTES // 2**20} MiB", param)
                if time.monotonic() > deadline:
                    raise APIError(400, f"'{param}': {url[:100]} took longer than {IMAGE_TIMEOUT:g} s", param)
    except httpx.HTTPError as e:
        raise APIError(400, f"'{param}': cannot fetch {url[:100]}: {str(e) or type(e).__name__}", param) from None
    return bytes(data)


def history_tool_call(call: Any, param: str) -> dict[str, Any]:
    """An assistant's earlier tool call, as chat templates take it (arguments as an object)."""
    try:
        return template_tool_call(call, param)
    except RequestError as e:
        raise APIError(400, str(e), e.param) from None


def chat_messages(messages: Any, image: Callable[[dict, str], Any] | None = None) -> list[dict[str, Any]]:
    """Checked messages in the form chat templates take; an ``APIError`` naming the field
    otherwise. ``image`` reads a user message's image part (``read_image_part``); without
    it, image parts are refused as the model has no vision tower."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out, calls = [], {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)} (got {role!r})", f"{where}.role")
        tool_calls = m.get("tool_calls") if role == "assistant" else None
        if tool_calls is not None and (not isinstance(tool_calls, list) or not tool_calls):
            raise APIError(400, f"'{where}.tool_calls' must be a non-empty list", f"{where}.tool_calls")
        content = m.get("content")
        if content is None and not tool_calls:
            raise APIError(400, f"'{where}.content' is required", f"{where}.content")
        message = {"role": "system" if role == "developer" else role,
                   "content": "" if content is None else message_content(
                       content, f"{where}.content", (image or no_images) if role == "user" else None)}
        if tool_calls:
            message["tool_calls"] = [history_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(tool_calls)]
            calls.update((c["id"], c["function"]["name"]) for c in message["tool_calls"])
        if role == "tool":
            call_id, name = m.get("tool_call_id"), m.get("name")
            if call_id not in calls:
                raise APIError(400, f"'{where}.tool_call_id' ({call_id!r}) answers no earlier assistant tool call",
                               f"{where}.tool_call_id")
            if name is not None and not isinstance(name, str):
                raise APIError(400, f"'{where}.name' must be a string", f"{where}.name")
            message.update(tool_call_id=call_id, name=name or calls[call_id])
        out.append(message)
    return out


def no_images(part: dict, param: str) -> Any:
    raise APIError(400, f"'{param}': this model takes no images: its checkpoint has no vision tower", param)


def request_tools(body: dict) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The request's function tools and its ``tool_choice`` mode; ``"none"`` offers no tools."""
    try:
        tools = openai_tools(body["tools"]) if body.get("tools") is not None else []
        choice = tool_choice(body.get("tool_choice"), tools)
    except RequestError as e:
        raise APIError(400, str(e), e.param) from None
    return (tools or None) if choice != "none" else None, choice


def response_format(body: dict) -> Any:
    """The JSON schema a ``response_format`` asks for (``"json_object"`` for any object), or ``None`` for text."""
    spec = body.get("response_format")
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind != "json_schema":
        raise APIError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")
    schema = (spec.get("json_schema") or {}).get("schema") if isinstance(spec.get("json_schema"), dict) else None
    if not isinstance(schema, dict):
        raise APIError(400, "'response_format.json_schema.schema' must be a JSON schema object", "response_format")
    try:
        schema_regex(schema)
    except ValueError as e:
        raise APIError(400, str(e), "response_format") from None
    return schema


def template_options(body: dict) -> dict[str, Any]:
    """``chat_template_kwargs``, with ``reasoning_effort`` switching thinking ("none" turns it off)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise APIError(400, f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
        kwargs = {"enable_thinking": effort not in ("none", "minimal"), **kwargs}
    if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
        raise APIError(400, "'chat_template_kwargs.enable_thinking' must be true or false", "chat_template_kwargs")
    return kwargs


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object; 415 for another content type (none included: a page may
    send a body without one and no CORS preflight), 413 when too large, 400 when malformed."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the body must be JSON sent as 'Content-Type: application/json' (got {media_type or 'none'!r})")
    too_large = APIError(413, f"the body exceeds {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > MAX_BODY_BYTES:
            raise too_large
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # malformed JSON, invalid UTF-8, NaN or Infinity
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    if too_deep(body):
        raise APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


async def watch_disconnect(request: Request, cancelled: threading.Event) -> None:
    """Cancel the job as soon as the client hangs up (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancelled.set()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def as_api_error(e: Exception) -> APIError:
    return e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", kind="server_error")


def choices(responses: list[GenerationResponse], n: int) -> list[list[GenerationResponse]]:
    rows: list[list[GenerationResponse]] = [[] for _ in range(n)]
    for r in responses:
        rows[r.index].append(r)
    return rows


def finish_reason(row: list[GenerationResponse]) -> str:
    return (row[-1].finish_reason if row else None) or "stop"


def usage(rows: list[list[GenerationResponse]], prompt_tokens: int) -> dict[str, Any]:
    completion = sum(row[-1].generation_tokens for row in rows if row)
    cached = rows[0][-1].cached_tokens if rows and rows[0] else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def diffusion_stats(rows: list[list[GenerationResponse]]) -> dict[str, Any]:
    last = max((row[-1] for row in rows if row), key=lambda r: len(r.steps_per_canvas), default=None)
    if last is None:
        return {}
    return {"steps_per_canvas": last.steps_per_canvas, "tokens_per_forward": last.tokens_per_forward,
            "prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps, "peak_memory_gb": last.peak_memory}


def row_calls(row: list[GenerationResponse]) -> list[dict[str, Any]]:
    return [c for r in row for c in r.tool_calls]


class ChatReply:
    """``chat.completion`` objects, or their chunks as SSE lines, from the worker's responses."""

    def __init__(self, base: dict[str, Any], usage_chunk: bool = False):
        self.base, self.usage_chunk, self.started, self.calls = base, usage_chunk, set(), {}
        self.prompt_tokens = 0

    def start(self, prompt_tokens: int) -> list[str]:
        self.prompt_tokens = prompt_tokens
        return []

    def chunk(self, r: GenerationResponse) -> list[str]:
        delta: dict[str, Any] = {} if r.index in self.started else {"role": "assistant"}
        self.started.add(r.index)
        if r.text:
            delta["content"] = r.text
        if r.reasoning:
            delta["reasoning_content"] = r.reasoning
        if r.tool_calls:
            first = self.calls.get(r.index, 0)
            self.calls[r.index] = first + len(r.tool_calls)
            delta["tool_calls"] = [{"index": first + k, **self.tool_call(c)} for k, c in enumerate(r.tool_calls)]
        if not delta:
            return []
        return [sse({**self.base, "object": "chat.completion.chunk",
                     "choices": [{"index": r.index, "delta": delta, "finish_reason": None}]})]

    def finish(self, rows: list[list[GenerationResponse]]) -> list[str]:
        lines = [sse({**self.base, "object": "chat.completion.chunk", "choices": [
            {"index": i, "delta": {}, "finish_reason": self.finish_reason(row)} for i, row in enumerate(rows)]})]
        if self.usage_chunk:
            lines.append(sse({**self.base, "object": "chat.completion.chunk", "choices": [],
                              "usage": usage(rows, self.prompt_tokens), "diffusion": diffusion_stats(rows)}))
        return lines + ["data: [DONE]\n\n"]

    def error(self, e: APIError) -> list[str]:
        return [sse(e.body()), "data: [DONE]\n\n"]

    def whole(self, rows: list[list[GenerationResponse]]) -> dict[str, Any]:
        out = []
        for i, row in enumerate(rows):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(r.text for r in row)}
            if reasoning := "".join(r.reasoning for r in row):
                message["reasoning_content"] = reasoning
            if calls := row_calls(row):
                message["tool_calls"] = [self.tool_call(c) for c in calls]
                message["content"] = message["content"] or None
            out.append({"index": i, "message": message, "finish_reason": self.finish_reason(row)})
        return {**self.base, "object": "chat.completion", "choices": out, "usage": usage(rows, self.prompt_tokens),
                "diffusion": diffusion_stats(rows)}

    @staticmethod
    def tool_call(call: dict[str, Any]) -> dict[str, Any]:
        return {"id": call_id(), "type": "function",
                "function": {"name": call["name"], "arguments": arguments_json(call["arguments"])}}

    @staticmethod
    def finish_reason(row: list[GenerationResponse]) -> str:
        return "tool_calls" if row_calls(row) else finish_reason(row)


class CompletionReply:
    """``text_completion`` objects, or their chunks as SSE lines: the text as the model
    wrote it (a raw prompt gets a raw continuation, markers included)."""

    def __init__(self, base: dict[str, Any], usage_chunk: bool = False):
        self.base, self.usage_chunk = {**base, "object": "text_completion"}, usage_chunk
        self.prompt_tokens = 0

    def start(self, prompt_tokens: int) -> list[str]:
        self.prompt_tokens = prompt_tokens
        return []

    def chunk(self, r: GenerationResponse) -> list[str]:
        if not r.raw:
            return []
        return [sse({**self.base, "choices": [{"index": r.index, "text": r.raw, "finish_reason": None, "logprobs": None}]})]

    def finish(self, rows: list[list[GenerationResponse]]) -> list[str]:
        lines = [sse({**self.base, "choices": [{"index": i, "text": "", "finish_reason": finish_reason(row), "logprobs": None}
                                               for i, row in enumerate(rows)]})]
        if self.usage_chunk:
            lines.append(sse({**self.base, "choices": [], "usage": usage(rows, self.prompt_tokens),
                              "diffusion": diffusion_stats(rows)}))
        return lines + ["data: [DONE]\n\n"]

    def error(self, e: APIError) -> list[str]:
        return [sse(e.body()), "data: [DONE]\n\n"]

    def whole(self, rows: list[list[GenerationResponse]]) -> dict[str, Any]:
        return {**self.base, "usage": usage(rows, self.prompt_tokens), "diffusion": diffusion_stats(rows),
                "choices": [{"index": i, "text": "".join(r.raw for r in row), "logprobs": None,
                             "finish_reason": finish_reason(row)} for i, row in enumerate(rows)]}


class MessagesReply:
    """Anthropic Messages API replies (``anthropic.py``): a message, or its stream events."""

    def __init__(self, model_id: str):
        self.model_id, self.events, self.prompt_tokens = model_id, None, 0

    def start(self, prompt_tokens: int) -> list[str]:
        self.prompt_tokens = prompt_tokens
        self.events = anthropic.MessageEvents(self.model_id, prompt_tokens)
        return [anthropic.sse(*e) for e in self.events.start()]

    def chunk(self, r: GenerationResponse) -> list[str]:
        return [anthropic.sse(*e) for e in self.events.update(r)]

    def finish(self, rows: list[list[GenerationResponse]]) -> list[str]:
        return [anthropic.sse(*e) for e in self.events.finish(rows[0][-1] if rows[0] else None)]

    def error(self, e: APIError) -> list[str]:
        return [anthropic.sse("error", anthropic.error_body(e.message, ANTHROPIC_ERRORS.get(e.status, "api_error")))]

    def whole(self, rows: list[list[GenerationResponse]]) -> dict[str, Any]:
        return anthropic.message(self.model_id, rows[0], self.prompt_tokens)


class ResponsesReply:
    """OpenAI Responses API replies (``responses_api.py``): a response, or its stream events."""

    def __init__(self, model_id: str, body: dict[str, Any]):
        self.model_id, self.body, self.builder = model_id, body, None

    def start(self, prompt_tokens: int) -> list[str]:
        self.builder = responses_api.ResponseBuilder(self.model_id, self.body, prompt_tokens)
        self.builder.start()
        return self.drain()

    def chunk(self, r: GenerationResponse) -> list[str]:
        self.builder.update(r)
        return self.drain()

    def finish(self, rows: list[list[GenerationResponse]]) -> list[str]:
        self.builder.finish()
        return self.drain()

    def error(self, e: APIError) -> list[str]:
        event = {"type": "error", "code": e.kind, "message": e.message, "param": e.param,
                 "sequence_number": self.builder.sequence if self.builder else 0}
        return [anthropic.sse("error", event)]

    def whole(self, rows: list[list[GenerationResponse]]) -> dict[str, Any]:
        for r in rows[0]:
            self.builder.update(r)
        return self.builder.finish()

    def drain(self) -> list[str]:
        return [anthropic.sse(e["type"], e) for e in self.builder.drain()]


class APIKeyAuth:
    """Bearer-key check on ``/v1/`` routes (a pure ASGI middleware, so that a client's
    hang-up still reaches the route). Preflight requests pass: they carry no key."""

    def __init__(self, app, api_key: str):
        self.app, self.expected, self.key = app, f"Bearer {api_key}".encode(), api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
            key = hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)  # as Anthropic's clients send it
            if not (bearer or key):
                await APIError(401, "invalid or missing API key", kind="authentication_error").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model: Model, tokenizer, model_id: str, api_key: str | None = None, lockstep: Lockstep | None = None,
               cors_origins: list[str] | None = None, prompt_cache: PromptCache | None = None,
               allow_remote_images: bool = False) -> FastAPI:
    """The server's app. ``cors_origins``: origins browsers may call it from (``"*"`` for any);
    ``None`` allows pages from localhost, 127.0.0.1 and [::1] only. ``prompt_cache``: the
    conversations' caches (its byte bound, a prompt-cache file's prefix); by default a fresh one.
    ``allow_remote_images``: image parts may be http(s) URLs, which the server fetches."""
    worker = Worker(model, tokenizer, lockstep, prompt_cache)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="mlx-diffgemma", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    if api_key:
        app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_middleware(CORSMiddleware, allow_origins=cors_origins or [],
                       allow_origin_regex=None if cors_origins is not None else LOCAL_ORIGINS,
                       allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type", "X-API-Key", "Anthropic-Version"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if request.url.path == "/v1/messages":  # Anthropic clients read their own error shape
            return JSONResponse(anthropic.error_body(e.message, ANTHROPIC_ERRORS.get(e.status, "api_error")), e.status)
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, kind=kind).response(e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return APIError(400, f"invalid request: {e.errors()}").response()

    @app.get("/health")
    async def health():
        if not worker.alive:
            body = worker_died().body()
            body["error"]["message"] += f" ({worker.failure})" if worker.failure else ""
            return JSONResponse(body, status_code=503)
        return {"status": "ok", "model": model_id, "queued": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "mlx-diffgemma"}]}

    async def read_request(request: Request, any_model: bool = False) -> dict[str, Any]:
        if not worker.alive:
            raise worker_died()
        body = await read_json(request)
        if not any_model and body.get("model") not in (None, model_id):
            raise APIError(404, f"model '{body['model']}' not found; this server serves '{model_id}'", "model", "not_found_error")
        return body

    async def run(request: Request, job: Job, stream: bool, reply):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job.emit = lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        worker.submit(job)
        watcher = asyncio.create_task(watch_disconnect(request, job.cancelled))
        try:
            accepted = await events.get()
            if isinstance(accepted, Exception):
                raise as_api_error(accepted)
            if accepted is None:  # the client went away while queued
                return Response(status_code=499)
        except BaseException:
            job.cancelled.set()
            watcher.cancel()
            raise
        opening = reply.start(accepted.prompt_tokens)
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # SSE lines, when streaming

        async def collect() -> tuple[list[GenerationResponse], Exception | None]:
            responses = []
            while (event := await events.get()) is not None:
                if isinstance(event, Exception):
                    while await events.get() is not None:
                        pass
                    return responses, event
                responses.append(event)
                if stream:
                    for piece in reply.chunk(event):
                        pieces.put_nowait(piece)
            return responses, None

        if not stream:
            try:
                responses, error = await collect()
            finally:
                job.cancelled.set()
                watcher.cancel()
            if error is not None:
                raise as_api_error(error)
            return JSONResponse(reply.whole(choices(responses, job.n)))

        async def events_stream():
            task = asyncio.create_task(collect())
            task.add_done_callback(lambda _: pieces.put_nowait(None))
            try:
                for piece in opening:
                    yield piece
                while (piece := await pieces.get()) is not None:
                    yield piece
                responses, error = task.result()
                for piece in reply.error(as_api_error(error)) if error is not None else reply.finish(
                        choices(responses, job.n)):
                    yield piece
            finally:  # done, or the client went away
                job.cancelled.set()
                watcher.cancel()
                task.cancel()

        return StreamingResponse(events_stream(), media_type="text/event-stream")

    def chat_job(body: dict) -> tuple[Job, bool, bool]:
        """The job for a chat request (OpenAI's, or one translated from another API)."""
        image = None if model.vision is None else lambda part, param: read_image_part(part, param, allow_remote_images)
        messages = chat_messages(body.get("messages"), image)
        tools, choice = request_tools(body)
        options = sampling_options(body)
        template = template_options(body)
        schema = response_format(body)
        if schema is not None:
            if choice not in (None, "auto", "none"):
                raise APIError(400, "'response_format' cannot be combined with a 'tool_choice' that forces a call",
                               "response_format")
            if template.get("enable_thinking"):
                raise APIError(400, "'response_format' cannot be combined with thinking: the whole reply is the JSON",
                               "response_format")
            # The constrained reply is the JSON itself: no reasoning span before it.
            template, options["json_schema"] = {**template, "enable_thinking": False}, schema
        n = parse_number(body, "n", int, 1, MAX_CHOICES) or 1
        stream = parse_flag(body, "stream")
        return Job(messages, options, n, tools, template, choice), stream, stream and include_usage(body)

    def translated(body: dict, translate: Callable[[dict], dict]) -> dict:
        try:
            return translate(body)
        except RequestError as e:
            raise APIError(400, str(e), e.param) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # In a thread: images are decoded, and fetched with allow_remote_images, while reading the request.
        job, stream, usage_chunk = await asyncio.to_thread(chat_job, await read_request(request))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        return await run(request, job, stream, ChatReply(base, usage_chunk))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_request(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        options = sampling_options(body)
        n = parse_number(body, "n", int, 1, MAX_CHOICES) or 1
        if body.get("echo") is not None and body["echo"] is not False:
            raise APIError(400, "'echo' is not supported: leave it out or send false", "echo")
        if parse_number(body, "best_of", int, 1) not in (None, 1, n):
            raise APIError(400, "'best_of' is not supported beyond one candidate per choice: leave it out or send 1 or 'n'",
                           "best_of")
        suffix = body.get("suffix")
        if suffix is not None:
            if not isinstance(suffix, str) or not suffix:
                raise APIError(400, "'suffix' must be a non-empty string", "suffix")
            if "stop" in options:
                raise APIError(400, "'stop' cannot be combined with 'suffix': the middle ends where the suffix begins", "stop")
        stream = parse_flag(body, "stream")
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        return await run(request, Job(prompt, options, n, suffix=suffix), stream,
                         CompletionReply(base, stream and include_usage(body)))

    @app.post("/v1/messages")
    async def messages(request: Request):
        # Any model name: Anthropic clients send their own, and this server has one model to offer.
        body = await read_request(request, any_model=True)
        job, stream, _ = await asyncio.to_thread(lambda: chat_job(translated({**body, "model": None}, anthropic.chat_request)))
        return await run(request, job, stream, MessagesReply(model_id))

    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await read_request(request)
        job, stream, _ = await asyncio.to_thread(lambda: chat_job(translated(body, responses_api.chat_request)))
        return await run(request, job, stream, ResponsesReply(model_id, body))

    return app


def check_port(host: str, port: int) -> None:
    """Raise a one-line ``OSError`` if ``host:port`` cannot be bound (checked before loading a model)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} on {host} is in use; choose another with --port") from None
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(model: Model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 1234, api_key: str | None = None,
          lockstep: Lockstep | None = None, cors_origins: list[str] | None = None,
          prompt_cache: PromptCache | None = None, allow_remote_images: bool = False) -> None:
    import uvicorn

    app = create_app(model, tokenizer, model_id, api_key, lockstep, cors_origins, prompt_cache, allow_remote_images)
    uvicorn.run(app, host=host, port=port, log_level="info")
