"""The real server on a loopback port, driven with the official ``openai`` package."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

CLI = str(Path(__file__).parents[1] / "cli.py")
FAST = {"steps": 3}  # extra body fields: a short schedule keeps the tests quick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *args):
    port = free_port()
    process = subprocess.Popen([sys.executable, CLI, "serve", "-m", str(checkpoint), "--port", str(port), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(hf_checkpoint):
    process, base = start_server(hf_checkpoint)
    yield base, str(hf_checkpoint)
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model, content, **kwargs):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, extra_body=FAST, **kwargs)


def test_lists_its_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server[1]]


def test_chat_non_stream_and_stream_agree_and_report_usage(client, server):
    model = server[1]
    full = chat(client, model, "Hello world", max_tokens=24, seed=1)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and 0 < full.usage.completion_tokens <= 24
    assert full.model_extra["diffusion"]["steps_per_canvas"]
    chunks = list(chat(client, model, "Hello world", max_tokens=24, seed=1, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_completions_non_stream_and_stream(client, server):
    model = server[1]
    full = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=20, seed=2, extra_body=FAST)
    streamed = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=20, seed=2,
                                         stream=True, extra_body=FAST)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert full.usage.completion_tokens <= 20


def test_stop_sequences_cut_the_reply(client, server):
    model = server[1]
    text = client.completions.create(model=model, prompt="Hello", max_tokens=40, seed=3, extra_body=FAST).choices[0].text
    stop = next(text[i : i + 2] for i in range(5, len(text) - 2) if text.count(text[i : i + 2]) == 1 and text[i : i + 2].strip())
    cut = client.completions.create(model=model, prompt="Hello", max_tokens=40, seed=3, stop=[stop], extra_body=FAST)
    # The reply is cut at a token boundary (ids and text agree): up to the token holding the stop string.
    assert text[: text.index(stop)].startswith(cut.choices[0].text) and cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text


def test_multi_turn_conversation_reuses_the_prompt_prefix(client, server):
    model = server[1]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    first = chat(client, model, history, max_tokens=40, seed=4)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And how are you today?"}]
    second = chat(client, model, history, max_tokens=16, seed=4)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


@pytest.mark.parametrize(
    "body, status, message",
    [
        ("{not json", 400, "not valid JSON"),
        ({"model": None}, 400, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model 'gpt-4' not found"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "'temperature' must be a number"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "steps": 0}, 400, "steps must be a positive integer"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "'messages[0].role' must be one of"),
    ],
)
def test_malformed_requests_get_openai_style_errors(server, body, status, message):
    base, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{base}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"]


def test_eight_concurrent_clients_are_all_answered(client, server):
    model = server[1]
    prompts = [f"Question number {i}" for i in range(8)]
    expected = [chat(client, model, p, max_tokens=16, seed=i).choices[0].message.content for i, p in enumerate(prompts)]
    results = [None] * 8

    def ask(i):
        results[i] = chat(client, model, prompts[i], max_tokens=16, seed=i).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


def test_client_cut_off_mid_stream_then_next_request_is_served(server, client):
    base, model = server
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story"}], "stream": True,
            "max_tokens": 4000, "canvas_length": 256, "steps": 48}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        # While it generates, the server still answers.
        started = time.perf_counter()
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"
        assert time.perf_counter() - started < 2
    # The abandoned generation is stopped, and the next request goes through.
    reply = chat(client, model, "Hello again", max_tokens=16, seed=5)
    assert reply.choices[0].message.content is not None


PREFIX, SUFFIX = "def add(a, b):\n    ", "return a + b"  # the suffix leaves 9 of the 16 canvas positions


def test_a_completion_with_a_suffix_is_the_middle_infill_chooses_streamed_or_not(client, server):
    from mlx_diffgemma import load
    from mlx_diffgemma.infill import infill

    model = server[1]
    full = client.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, seed=5, n=2, extra_body=FAST)
    streamed = list(client.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, seed=5, stream=True,
                                              extra_body=FAST))
    model_obj, tokenizer = load(model)
    expected = [infill(model_obj, tokenizer, PREFIX, SUFFIX, max_tokens=6, seed=5 + i, steps=3) for i in range(2)]
    assert [c.text for c in full.choices] == [e.text for e in expected]  # choice i: seed + i
    assert full.usage.completion_tokens == sum(e.length for e in expected) and all(e.length <= 6 for e in expected)
    assert "".join(c.choices[0].text for c in streamed) == expected[0].text
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


@pytest.mark.parametrize("fields, status, message", [
    ({"suffix": "x" * 40}, 400, "the suffix is too long"),
    ({"suffix": ""}, 400, "'suffix' must be a non-empty string"),
    ({"suffix": 3}, 400, "'suffix' must be a non-empty string"),
    ({"suffix": SUFFIX, "stop": ["\n"]}, 400, "'stop' cannot be combined with 'suffix'"),
    ({"echo": True}, 400, "'echo' is not supported"),
    ({"best_of": 3}, 400, "'best_of' is not supported"),
    ({"echo": False, "best_of": 2, "n": 2}, 200, None),
])
def test_suffix_echo_and_best_of_are_honoured_or_refused_naming_the_field(server, fields, status, message):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", json={"prompt": PREFIX, "max_tokens": 4, **FAST, **fields}, timeout=60)
    assert response.status_code == status, response.text
    if message is not None:
        error = response.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
