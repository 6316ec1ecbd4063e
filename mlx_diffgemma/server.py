"""An OpenAI-compatible HTTP server (``mlx-diffgemma serve``), as LM Studio offers.

One model, loaded once. Requests are served in arrival order by a single worker thread
(MLX is driven from that thread only) while the event loop keeps answering ``/health``
and ``/v1/models``. A client that goes away stops its generation. The worker keeps one
``PromptCache``, so the next turn of a conversation encodes only what is new. Under
``mlx.launch`` rank 0 serves and the other ranks follow each request (``Lockstep``).

``temperature`` maps onto DiffusionGemma's schedule: ``t_max = temperature`` and
``t_min = temperature / 2`` (the default 0.8 -> 0.4 shape); ``temperature = 0`` is
near-greedy (1e-4). Model-specific extras may be passed in the body: ``steps``,
``entropy_bound``, ``t_min``, ``t_max``, ``canvas_length``, ``self_conditioning_top_k``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .chat import split_reply
from .lockstep import Lockstep
from .generate import GenerationResponse, PromptCache, check_request, prepare_prompt, resolve_settings, stream_generate
from .model import Model

GREEDY_TEMPERATURE = 1e-4
EXTRA_SETTINGS = ("steps", "entropy_bound", "t_min", "t_max", "canvas_length", "self_conditioning_top_k")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class Job:
    """One request for the worker; events flow back to the event loop through ``emit``."""

    ids: list[int]
    options: dict[str, Any]
    emit: Callable[[GenerationResponse | Exception | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The single thread that runs MLX. With ``lockstep`` (a sharded model under
    ``mlx.launch``) the other ranks follow each job and are released on ``stop``."""

    def __init__(self, model: Model, tokenizer, lockstep: Lockstep | None = None):
        self.model, self.tokenizer, self.lockstep = model, tokenizer, lockstep
        self.generate = lockstep.stream if lockstep else stream_generate
        self.prompt_cache = PromptCache()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="mlx-diffgemma-worker", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set() or self.stopping.is_set():
                job.emit(None)
                continue
            stream = self.generate(self.model, self.tokenizer, job.ids, prompt_cache=self.prompt_cache, **job.options)
            try:
                for response in stream:
                    if job.cancelled.is_set() or self.stopping.is_set():
                        break
                    job.emit(response)
            except Exception as e:  # reported to the client; the worker goes on
                job.emit(e)
            finally:
                stream.close()
                job.emit(None)
        if self.lockstep:
            self.lockstep.close()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the current job at its next step, drop queued ones, and wait for the thread."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout)


def parse_number(body: dict, name: str, kind: type, low: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}", name)
    if low is not None and value < low:
        raise APIError(400, f"'{name}' must be >= {low}", name)
    return kind(value)


def sampling_options(body: dict) -> dict[str, Any]:
    """Request fields onto ``stream_generate`` options (validated here or by ``DiffusionSettings``)."""
    options: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options["max_tokens"] = parse_number({"max_tokens": max_tokens}, "max_tokens", int, 1) or 256
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


def usage(r: GenerationResponse | None, prompt_tokens: int) -> dict[str, Any]:
    completion = r.generation_tokens if r else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens if r else 0}}


def diffusion_stats(r: GenerationResponse | None) -> dict[str, Any]:
    if r is None:
        return {}
    return {"steps_per_canvas": r.steps_per_canvas, "tokens_per_forward": r.tokens_per_forward,
            "prompt_tps": r.prompt_tps, "generation_tps": r.generation_tps, "peak_memory_gb": r.peak_memory}


def create_app(model: Model, tokenizer, model_id: str, api_key: str | None = None,
               lockstep: Lockstep | None = None) -> FastAPI:
    app = FastAPI(title="mlx-diffgemma", docs_url=None, redoc_url=None)
    worker = Worker(model, tokenizer, lockstep)
    app.state.worker = worker
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return APIError(401, "invalid or missing API key", kind="authentication_error").response()
        return await call_next(request)

    @app.on_event("shutdown")
    def shutdown() -> None:
        worker.stop()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queued": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "mlx-diffgemma"}]}

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        if body.get("model") not in (None, model_id):
            raise APIError(404, f"model '{body['model']}' not found; this server serves '{model_id}'", "model", "not_found_error")
        return body

    def prepare(ids: list[int], options: dict) -> None:
        """Refuse a bad request before it reaches the worker."""
        try:
            settings = resolve_settings(model, **{k: options.get(k) for k in EXTRA_SETTINGS})
            check_request(model, [ids], options["max_tokens"], settings.canvas_length)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def run(request: Request, ids: list[int], options: dict, stream: bool, chunk, final):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, options, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        worker.jobs.put(job)
        if stream:
            async def sse():
                last = None
                try:
                    while (event := await events.get()) is not None:
                        if isinstance(event, Exception):
                            yield f"data: {json.dumps({'error': {'message': str(event), 'type': 'server_error'}})}\n\n"
                            continue
                        last = event
                        for piece in chunk(event):
                            yield f"data: {json.dumps(piece)}\n\n"
                    for piece in final(last):
                        yield f"data: {json.dumps(piece)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancelled.set()  # the client went away, or we are done

            return StreamingResponse(sse(), media_type="text/event-stream")
        responses: list[GenerationResponse] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if event is None:
                    break
                if isinstance(event, Exception):
                    raise APIError(500, f"generation failed: {event}", kind="server_error")
                responses.append(event)
        finally:
            job.cancelled.set()
        return JSONResponse(final(responses))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(m.get("content"), (str, list)):
                raise APIError(400, "each message needs a role (system, user, assistant, tool) and a content", "messages")
        messages = [{**m, "content": _text(m["content"])} for m in messages]
        options = sampling_options(body)
        try:
            ids = prepare_prompt(tokenizer, messages)
        except Exception as e:  # the chat template refused the conversation
            raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
        prepare(ids, options)
        rid, stream = f"chatcmpl-{uuid.uuid4().hex}", bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": rid, "created": int(time.time()), "model": model_id}
        sent = {"answer": "", "reasoning": "", "text": "", "role": False}

        def chunk(r: GenerationResponse):
            sent["text"] += r.text
            reply = split_reply(sent["text"])
            delta: dict[str, Any] = {} if sent["role"] else {"role": "assistant"}
            sent["role"] = True
            for key, value in (("content", reply.answer), ("reasoning_content", reply.reasoning)):
                old = sent["answer" if key == "content" else "reasoning"]
                if value.startswith(old) and len(value) > len(old):
                    delta[key] = value[len(old):]
                    sent["answer" if key == "content" else "reasoning"] = value
            if delta:
                yield {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

        def final_stream(last: GenerationResponse | None):
            reason = last.finish_reason if last and last.finish_reason else "stop"
            yield {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
            if include_usage:
                yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(last, len(ids)),
                       "diffusion": diffusion_stats(last)}

        def final(responses: list[GenerationResponse]):
            last = responses[-1] if responses else None
            reply = split_reply("".join(r.text for r in responses))
            message = {"role": "assistant", "content": reply.answer}
            if reply.reasoning:
                message["reasoning_content"] = reply.reasoning
            return {**base, "object": "chat.completion", "usage": usage(last, len(ids)), "diffusion": diffusion_stats(last),
                    "choices": [{"index": 0, "message": message, "finish_reason": (last.finish_reason if last else None) or "stop"}]}

        return await run(request, ids, options, stream, chunk, final_stream if stream else final)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        options = sampling_options(body)
        ids = prepare_prompt(tokenizer, prompt)
        prepare(ids, options)
        rid, stream = f"cmpl-{uuid.uuid4().hex}", bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id}

        def chunk(r: GenerationResponse):
            if r.text:
                yield {**base, "choices": [{"index": 0, "text": r.text, "finish_reason": None, "logprobs": None}]}

        def final_stream(last: GenerationResponse | None):
            reason = (last.finish_reason if last else None) or "stop"
            yield {**base, "choices": [{"index": 0, "text": "", "finish_reason": reason, "logprobs": None}]}
            if include_usage:
                yield {**base, "choices": [], "usage": usage(last, len(ids)), "diffusion": diffusion_stats(last)}

        def final(responses: list[GenerationResponse]):
            last = responses[-1] if responses else None
            text = "".join(r.text for r in responses)
            return {**base, "usage": usage(last, len(ids)), "diffusion": diffusion_stats(last),
                    "choices": [{"index": 0, "text": text, "finish_reason": (last.finish_reason if last else None) or "stop", "logprobs": None}]}

        return await run(request, ids, options, stream, chunk, final_stream if stream else final)

    return app


def _text(content: str | list) -> str:
    """Message content as text; OpenAI's list-of-parts form keeps its text parts."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def serve(model: Model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 1234, api_key: str | None = None,
          lockstep: Lockstep | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, model_id, api_key, lockstep), host=host, port=port, log_level="info")
