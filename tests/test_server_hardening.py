"""The server under hostile, broken and agent-style traffic: an in-process server on a
loopback port (so tests can reach its worker and read its log), driven with ``httpx``
and the official ``openai`` client."""

import json
import logging
import os
import socket
import threading
import time
import warnings

import httpx
import openai
import pytest
import uvicorn

import mlx_diffgemma.server as server_module
from mlx_diffgemma.server import MAX_BODY_BYTES, chat_messages, check_port, create_app
from mlx_diffgemma.utils import load

FAST = {"steps": 3}
SLOW = {"steps": 500, "max_tokens": 4000}  # about ten seconds a canvas on the tiny model
CONTEXT = 256  # the tiny model's context, cut down so that "too long" is cheap to reach
HI = [{"role": "user", "content": "hi"}]


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class LiveServer:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app, self.base = app, f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def post(self, path, body, **kwargs):
        return httpx.post(f"{self.base}{path}", json=body, timeout=kwargs.pop("timeout", 60), **kwargs)


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    model.args.max_position_embeddings = CONTEXT
    return model, tokenizer, str(hf_checkpoint)


@pytest.fixture(scope="module")
def live(loaded):
    model, tokenizer, model_id = loaded
    records = LogRecords()
    logging.getLogger().addHandler(records)
    server = LiveServer(create_app(model, tokenizer, model_id))
    server.records = records
    yield server
    server.stop()
    logging.getLogger().removeHandler(records)


def fresh_server(loaded, **kwargs) -> LiveServer:
    model, tokenizer, model_id = loaded
    return LiveServer(create_app(model, tokenizer, model_id, **kwargs))


def chat_body(live, **fields):
    return {"model": live_model(live), "messages": HI, "max_tokens": 8, **FAST, **fields}


def live_model(live) -> str:
    return httpx.get(f"{live.base}/v1/models").json()["data"][0]["id"]


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def assert_quick_reply(live):
    started = time.perf_counter()
    response = live.post("/v1/chat/completions", chat_body(live))
    assert response.status_code == 200
    return time.perf_counter() - started


# Item 1 and 14: histories that OpenAI clients and agent frameworks send.
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
AGENT_HISTORY = [
    {"role": "developer", "content": "You are a weather bot."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "tool_calls": [{"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": [{"type": "text", "text": "sunny"}]},
    {"role": "user", "content": "Thanks"},
]


def test_agent_history_is_rendered_for_the_chat_template():
    messages = chat_messages(AGENT_HISTORY)
    assert messages[0] == {"role": "system", "content": "You are a weather bot."}
    assert messages[1]["content"] == "Weather in Paris?"
    assert messages[2]["content"] == "" and messages[2]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[3] == {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call_1", "name": "get_weather"}
    assert messages[5]["content"] == "sunny" and messages[5]["name"] == "get_weather"


def test_agent_history_through_the_openai_client(live):
    client = openai.OpenAI(base_url=f"{live.base}/v1", api_key="unused", max_retries=0, timeout=60)
    model = live_model(live)
    reply = client.chat.completions.create(model=model, messages=AGENT_HISTORY, tools=TOOLS, max_tokens=8, extra_body=FAST)
    assert reply.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=model, messages=AGENT_HISTORY, max_tokens=8, stream=True,
                                                 extra_body=FAST))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=AGENT_HISTORY[:3] + [
            {"role": "tool", "tool_call_id": "call_9", "content": "?"}], max_tokens=8, extra_body=FAST)
    assert e.value.body["param"] == "messages[3].tool_call_id"


# Item 2: the tokenizer is used from the worker thread only; refused prompts get a 400 before any stream.
def test_prompts_are_tokenized_on_the_worker_thread(live, monkeypatch):
    threads = []
    original = server_module.prepare_prompt

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(server_module, "prepare_prompt", recording)
    assert live.post("/v1/chat/completions", chat_body(live)).status_code == 200
    assert live.post("/v1/completions", {"prompt": "Hello", "max_tokens": 8, **FAST}).status_code == 200
    assert threads == ["mlx-diffgemma-worker"] * 2


def test_a_refused_prompt_gets_its_400_before_streaming(live):
    long = [{"role": "user", "content": "The quick brown fox " * 200}]
    response = live.post("/v1/chat/completions", chat_body(live, messages=long, stream=True))
    assert "prompt too long" in assert_openai_error(response, 400)["message"]


# Items 3 and 10: an abandoned request, streamed or not, frees the worker within a step.
def test_an_abandoned_stream_frees_the_worker_within_a_step(live):
    with httpx.stream("POST", f"{live.base}/v1/chat/completions", json=chat_body(live, stream=True, **SLOW), timeout=60) as r:
        assert r.status_code == 200
        time.sleep(0.5)  # mid-canvas: no chunk has been sent yet
    assert assert_quick_reply(live) < 3


def test_an_abandoned_plain_request_frees_the_worker_within_a_step(live):
    with pytest.raises(httpx.ReadTimeout):
        live.post("/v1/chat/completions", chat_body(live, **SLOW), timeout=0.7)
    assert assert_quick_reply(live) < 3


# Item 4: a dead worker is reported at once.
def test_a_dead_worker_makes_health_and_requests_fail_fast(loaded):
    live = fresh_server(loaded)
    try:
        def crash(*args, **kwargs):
            raise SystemExit("simulated crash")

        live.app.state.worker.generate = crash
        assert_openai_error(live.post("/v1/chat/completions", chat_body(live), timeout=10), 503)
        assert_openai_error(httpx.get(f"{live.base}/health"), 503)
        started = time.perf_counter()
        error = assert_openai_error(live.post("/v1/chat/completions", chat_body(live), timeout=10), 503)
        assert "generation thread" in error["message"] and time.perf_counter() - started < 1
    finally:
        live.stop()


# Item 5: an error ends the stream; keys compared in constant time without BaseHTTPMiddleware; a lifespan.
def test_an_error_mid_stream_ends_the_stream(loaded):
    live = fresh_server(loaded)
    try:
        worker = live.app.state.worker
        original = worker.generate

        def failing(*args, **kwargs):
            stream = original(*args, **kwargs)
            yield next(r for r in stream if r.draft is None)
            raise RuntimeError("device lost")

        worker.generate = failing
        body = chat_body(live, stream=True, max_tokens=48, messages=[{"role": "user", "content": "Hello world"}])
        with httpx.stream("POST", f"{live.base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert "device lost" in error["message"] and error["type"] == "server_error"
        assert not any('"finish_reason": "stop"' in line for line in lines)
    finally:
        live.stop()


def test_api_key_checked_without_base_http_middleware(loaded):
    from starlette.middleware.base import BaseHTTPMiddleware

    model, tokenizer, model_id = loaded
    open_app = create_app(model, tokenizer, model_id)
    assert all(m.cls is not server_module.APIKeyAuth and m.cls is not BaseHTTPMiddleware for m in open_app.user_middleware)
    open_app.state.worker.stop()
    live = fresh_server(loaded, api_key="secret")
    try:
        assert all(m.cls is not BaseHTTPMiddleware for m in live.app.user_middleware)
        assert_openai_error(httpx.get(f"{live.base}/v1/models"), 401)
        assert_openai_error(httpx.get(f"{live.base}/v1/models", headers={"authorization": "Bearer secreT"}), 401)
        assert httpx.get(f"{live.base}/v1/models", headers={"authorization": "Bearer secret"}).status_code == 200
        assert httpx.get(f"{live.base}/health").status_code == 200
        preflight = httpx.options(f"{live.base}/v1/chat/completions", headers={
            "origin": "http://localhost:5173", "access-control-request-method": "POST"})
        assert preflight.status_code == 200
    finally:
        live.stop()


def test_app_uses_a_lifespan_that_stops_the_worker(loaded):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        live = fresh_server(loaded)
    worker = live.app.state.worker
    live.stop()
    assert not worker.thread.is_alive()


# Item 7: CORS for local pages by default, or for the origins given.
@pytest.mark.parametrize("cors_origins, origin, allowed", [
    (None, "http://localhost:3000", True),
    (None, "https://127.0.0.1", True),
    (None, "http://[::1]:8080", True),
    (None, "https://evil.example", False),
    (None, "http://localhost.evil.example", False),
    (["https://app.example"], "https://app.example", True),
    (["https://app.example"], "http://localhost:3000", False),
    (["*"], "https://anywhere.example", True),
])
def test_cors(loaded, cors_origins, origin, allowed):
    from starlette.testclient import TestClient

    model, tokenizer, model_id = loaded
    app = create_app(model, tokenizer, model_id, cors_origins=cors_origins)
    try:
        client = TestClient(app)
        preflight = client.options("/v1/chat/completions", headers={
            "origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
        simple = client.get("/v1/models", headers={"origin": origin})
        assert (preflight.status_code == 200) == allowed
        assert ("access-control-allow-origin" in simple.headers) == allowed
    finally:
        app.state.worker.stop()


# Item 8: max_tokens clamped to the context; n choices, each its own noise; neutral sampler fields.
def test_max_tokens_beyond_the_context_is_clamped(live):
    reply = live.post("/v1/chat/completions", chat_body(live, max_tokens=10**6, seed=1)).json()
    room = (CONTEXT - reply["usage"]["prompt_tokens"]) // 16 * 16
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == room


def test_n_choices_equal_single_requests_with_successive_seeds(live):
    body = chat_body(live, messages=[{"role": "user", "content": "Hello world"}], max_tokens=24, seed=11)
    batch = live.post("/v1/chat/completions", {**body, "n": 3}).json()
    alone = [live.post("/v1/chat/completions", {**body, "seed": 11 + i}).json()["choices"][0] for i in range(3)]
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in batch["choices"]] == [c["message"]["content"] for c in alone]
    assert batch["usage"]["completion_tokens"] > 0
    streamed = httpx.post(f"{live.base}/v1/completions", json={"prompt": "Hello", "n": 2, "seed": 3, "stream": True,
                                                               "max_tokens": 16, **FAST}, timeout=60)
    pieces = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert {c["index"] for p in pieces for c in p["choices"]} == {0, 1}


class SoloLockstep:
    """A one-rank stand-in for ``Lockstep``: the sharded path's single-prompt generator."""

    def stream(self, model, tokenizer, prompt, *, prompt_cache, **options):
        from mlx_diffgemma.generate import stream_generate

        return stream_generate(model, tokenizer, prompt, prompt_cache=prompt_cache, **options)

    def close(self):
        pass


def test_n_choices_on_the_sharded_path_equal_the_batch(loaded, live):
    from starlette.testclient import TestClient

    model, tokenizer, model_id = loaded
    body = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 24, "seed": 5, "n": 2, **FAST}
    batch = live.post("/v1/chat/completions", body).json()["choices"]
    app = create_app(model, tokenizer, model_id, lockstep=SoloLockstep())
    try:
        rows = TestClient(app).post("/v1/chat/completions", json=body).json()["choices"]
    finally:
        app.state.worker.stop()
    assert [c["message"]["content"] for c in rows] == [c["message"]["content"] for c in batch]


def test_neutral_sampler_fields_are_accepted(live):
    neutral = {"top_p": 1, "top_k": -1, "min_p": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
               "repetition_penalty": 1.0, "logprobs": False, "top_logprobs": 0, "logit_bias": {}}
    assert live.post("/v1/chat/completions", chat_body(live, **neutral)).status_code == 200
    assert live.post("/v1/chat/completions", chat_body(live, **dict.fromkeys(neutral))).status_code == 200


# Item 9: JSON or nothing.
def test_json_with_a_charset_is_served(live):
    response = httpx.post(f"{live.base}/v1/chat/completions", content=json.dumps(chat_body(live)),
                          headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert response.status_code == 200


# Item 11.
def test_check_port_refuses_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use; choose another with --port"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)


# Item 12: memory stays flat under a mix of finished, streamed and abandoned requests.
def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_memory_stays_flat_over_forty_requests(live):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from server_soak import soak

    after_warmup, final = soak(live.base, live_model(live), total=40, warmup=10, concurrent=8, rss=rss_bytes)
    assert final / after_warmup < 1.15, (after_warmup, final)


# Item 13: a corpus of bad requests; each a 4xx in OpenAI's shape, no traceback, server healthy after.
def bad(content, status, content_type="application/json", path="/v1/chat/completions", method="POST"):
    return pytest.param(content, status, content_type, path, method)


def msg(**fields):
    return json.dumps({"messages": HI, "max_tokens": 8, **fields})


def history(*messages):
    return json.dumps({"messages": list(messages)})


CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
CORPUS = [
    bad("{not json", 400),
    bad("[1, 2, 3]", 400),
    bad('"just a string"', 400),
    bad(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    bad("[" * 10_000 + "]" * 10_000, 400),
    bad(json.dumps({"messages": HI, "x": json.loads("[" * 100 + "]" * 100)}), 400),
    bad('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    bad(b"x" * (MAX_BODY_BYTES + 1), 413),
    bad(msg(), 415, "text/plain"),
    bad("messages=hi", 415, "application/x-www-form-urlencoded"),
    bad(msg(), 415, None),
    bad(json.dumps({"model": None}), 400),
    bad(json.dumps({"messages": []}), 400),
    bad(json.dumps({"messages": "hi"}), 400),
    bad(history({"role": "wizard", "content": "hi"}), 400),
    bad(history({"content": "hi"}), 400),
    bad(history("hi"), 400),
    bad(history({"role": "user", "content": 42}), 400),
    bad(history({"role": "user", "content": None}), 400),
    bad(history({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}), 400),
    bad(history({"role": "user", "content": [{"type": "text", "text": 5}]}), 400),
    bad(history({"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}), 400),
    bad(history(CALL, {"role": "tool", "content": "x"}), 400),
    bad(history({**CALL, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{not json"}}]}), 400),
    bad(history({**CALL, "tool_calls": "f()"}), 400),
    bad(history({**CALL, "tool_calls": [{"function": {"name": "f"}}]}), 400),
    bad(msg(temperature="hot"), 400),
    bad(msg(temperature=-1), 400),
    bad(msg(max_tokens=0), 400),
    bad(msg(max_tokens="many"), 400),
    bad(msg(max_tokens=1.5), 400),
    bad(msg(steps=0), 400),
    bad(msg(seed="x"), 400),
    bad(msg(stop=""), 400),
    bad(msg(stop=[1, 2]), 400),
    bad(msg(stop=["a", "b", "c", "d", "e"]), 400),
    bad(msg(stream="no"), 400),
    bad(msg(stream=1), 400),
    bad(msg(stream=True, stream_options="yes"), 400),
    bad(msg(stream=True, stream_options={"include_usage": "yes"}), 400),
    bad(msg(n=0), 400),
    bad(msg(n=-1), 400),
    bad(msg(n=1.5), 400),
    bad(msg(n=9), 400),
    bad(msg(top_p=0.9), 400),
    bad(msg(top_k=40), 400),
    bad(msg(logprobs=True), 400),
    bad(msg(top_logprobs=3), 400),
    bad(msg(presence_penalty=0.5), 400),
    bad(msg(frequency_penalty="0"), 400),
    bad(msg(repetition_penalty=1.2), 400),
    bad(msg(logit_bias={"50": 100}), 400),
    bad(msg(min_p=0.1), 400),
    bad(msg(tools="all"), 400),
    bad(msg(tool_choice="required"), 400),
    bad(msg(model="gpt-4"), 404),
    bad(history({"role": "user", "content": "The quick brown fox " * 200}), 400),
    bad(json.dumps({"prompt": ""}), 400, path="/v1/completions"),
    bad(json.dumps({"prompt": 5}), 400, path="/v1/completions"),
    bad(json.dumps({"prompt": "hi", "top_p": 0.5}), 400, path="/v1/completions"),
    bad(None, 404, path="/v1/nothing-here", method="GET"),
    bad(None, 404, path="/v1/chat/completions/extra", method="POST"),
    bad(None, 405, path="/v1/chat/completions", method="GET"),
    bad(None, 405, path="/v1/models", method="DELETE"),
]


@pytest.mark.parametrize("content, status, content_type, path, method", CORPUS)
def test_bad_request_corpus(live, content, status, content_type, path, method):
    headers = {"content-type": content_type} if content_type else {}
    data = content.encode() if isinstance(content, str) else content
    before = len(live.records.records)
    response = httpx.request(method, f"{live.base}{path}", content=data, headers=headers, timeout=60)
    assert_openai_error(response, status)
    assert not [r for r in live.records.records[before:] if r.exc_info or r.levelno >= logging.ERROR]
    assert httpx.get(f"{live.base}/health").status_code == 200


def test_server_still_serves_after_the_corpus(live):
    assert assert_quick_reply(live) < 10
