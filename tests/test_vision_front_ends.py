"""Images through the front ends: the command line, the chat REPL and session, and the server
(OpenAI, Anthropic and Responses requests), on test_vision.py's tiny vision checkpoint."""

import base64
import http.server
import io
import json
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import anthropic
import mlx.core as mx
import openai
import pexpect
import pytest
from starlette.testclient import TestClient
from test_server import start_server
from test_vision import IMAGES, checkpoint, make_image, reference, token_ids  # noqa: F401 (fixtures)

from mlx_diffgemma import generate, stream_generate
from mlx_diffgemma.chat import ChatSession
from mlx_diffgemma.generate import PromptCache, prepare_prompt
from mlx_diffgemma.server import create_app
from mlx_diffgemma.utils import load
from mlx_diffgemma.vision import attach_images, split_image_parts

CLI = str(Path(__file__).parents[1] / "cli.py")
FAST = {"steps": 3}
IMAGE_TOKENS = 1 + 60 + 1  # a 150x100 image: <|image>, 60 soft tokens, <image|>
OTHER = make_image(5, 150, 100)  # another image of the same size


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "photo.png").write_bytes(png(IMAGES[0]))
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.png").write_bytes(png(IMAGES[0])[:200])
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint):  # noqa: F811
    return load(checkpoint)


def prompt_tokens(stats: str) -> int:
    return int(stats.split("prompt: ")[1].split(" token")[0])


# Command line.
def run_cli(*args):
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_with_images_prints_a_reply_with_the_images_in_the_prompt(checkpoint, files):  # noqa: F811
    common = ["generate", "-m", str(checkpoint), "--max-tokens", "8", "--steps", "3", "--seed", "0", "--stats"]
    text = run_cli(*common, "What is it?")
    one = run_cli(*common, "--image", str(files / "photo.png"), "What is it?")
    two = run_cli(*common, "--image", str(files / "photo.png"), "--image", str(files / "photo.png"), "What is it?")
    for result in (text, one, two):
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
    assert prompt_tokens(one.stderr) == prompt_tokens(text.stderr) + IMAGE_TOKENS
    assert prompt_tokens(two.stderr) == prompt_tokens(text.stderr) + 2 * IMAGE_TOKENS


@pytest.mark.parametrize("args, message", [
    (["--image", "{files}/notes.txt"], "error: --image: {files}/notes.txt is not an image Pillow can read"),
    (["--image", "{files}/cut.png"], "error: --image: {files}/cut.png is a damaged image"),
    (["--image", "{files}/missing.png"], "error: --image: {files}/missing.png: no such image file"),
    (["--raw", "--image", "{files}/photo.png"], "error: --image need the chat template; leave out --raw"),
])
def test_generate_refuses_a_bad_image_in_one_error_line(checkpoint, files, args, message):  # noqa: F811
    result = run_cli("generate", "-m", str(checkpoint), *[a.format(files=files) for a in args], "What is it?")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(message.format(files=files)) and result.stderr.count("\n") == 1


# Chat: the session, its cache, and the REPL's /image.
def test_a_later_turn_reuses_the_cache_of_a_history_with_an_image_and_answers_as_from_scratch(loaded, files):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, seed=0, **FAST)
    first = list(session.send("What is it?", images=[str(files / "photo.png")]))
    assert first[-1].cached_tokens == 0
    session.messages.append({"role": "user", "content": "And the colours?"})
    ids, images = session.prompt_ids(), split_image_parts(session.messages)[1]
    session.messages.pop()
    [whole], features = attach_images(model, [ids], [images])
    second = list(session.send("And the colours?"))
    assert second[-1].prompt_tokens == len(whole)
    assert second[-1].cached_tokens >= first[-1].prompt_tokens  # the image is not encoded again
    fresh = generate(model, tokenizer, whole, image_features=features, seed=0, **FAST)
    assert "".join(r.text for r in second) == fresh


def test_the_prompt_cache_never_takes_one_image_for_another(loaded):
    model, tokenizer = loaded
    cache = PromptCache()
    ask = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    ids = prepare_prompt(tokenizer, ask)
    [ids], features = attach_images(model, [ids], [[IMAGES[0]]])
    _, other = attach_images(model, [prepare_prompt(tokenizer, ask)], [[OTHER]])
    reply = [t for r in stream_generate(model, tokenizer, ids, image_features=features, prompt_cache=cache, seed=0,
                                        max_tokens=16, **FAST) for t in r.tokens]
    turn = ids + reply + tokenizer.encode("And now?", add_special_tokens=False)
    same = list(stream_generate(model, tokenizer, turn, image_features=features, prompt_cache=cache, seed=1, **FAST))
    assert same[-1].cached_tokens >= len(ids)  # the prompt with its image, at least
    # Token ids that extend the cached ones, with another image: nothing from the image on may be reused.
    longer = turn + tokenizer.encode(" Really?", add_special_tokens=False)
    swapped = list(stream_generate(model, tokenizer, longer, image_features=other, prompt_cache=cache, seed=1, **FAST))
    assert swapped[-1].cached_tokens <= turn.index(model.args.image_token_id)
    fresh = [t for r in stream_generate(model, tokenizer, longer, image_features=other, seed=1, **FAST) for t in r.tokens]
    assert [t for r in swapped for t in r.tokens] == fresh


def test_chat_image_command_attaches_to_the_next_message(checkpoint, files, tmp_path):  # noqa: F811
    child = pexpect.spawn(sys.executable, [CLI, "chat", "-m", str(checkpoint), "--max-tokens", "16", "--steps", "3",
                                           "--seed", "0", "--no-draft"],
                          encoding="utf-8", codec_errors="replace", timeout=120, dimensions=(40, 200))
    child.expect(">>> ")
    child.sendline(f"/image {files / 'notes.txt'}")
    child.expect("error: .*notes.txt is not an image Pillow can read")
    child.expect(">>> ")
    child.sendline("/image")
    child.expect(r"error: /image needs a file: /image <path>")
    child.expect(">>> ")
    child.sendline(f"/image {files / 'photo.png'}")
    child.expect("1 image attached to your next message")
    child.expect(">>> ")
    child.sendline("What is it?")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"prompt: (\d+) tokens")
    with_image = int(child.match.group(1))
    child.expect(">>> ")
    child.sendline("And now?")  # the image stays in the history
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"prompt: (\d+) tokens")
    assert int(child.match.group(1)) > with_image
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'chat.json'}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    messages = json.loads((tmp_path / "chat.json").read_text())
    assert messages[0]["content"][0] == {"type": "image", "image": str(files / "photo.png")}
    assert isinstance(messages[2]["content"], str)  # the image went with one message only
    assert "Traceback" not in child.before


# The server: in process, through the official clients.
@pytest.fixture
def app(loaded):
    model, tokenizer = loaded
    apps = []

    def make(**kwargs):
        apps.append(create_app(model, tokenizer, "vision", **kwargs))
        return TestClient(apps[-1], base_url="http://testserver")

    yield make
    for a in apps:
        a.state.worker.stop()


def ask_openai(url: str, text: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def test_openai_anthropic_and_responses_clients_send_images(app):
    http = app()
    uri = data_uri(png(IMAGES[0]))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    text = client.chat.completions.create(model="vision", messages=[{"role": "user", "content": "What is it?"}],
                                          max_tokens=8, seed=0, extra_body=FAST)
    image = client.chat.completions.create(model="vision", messages=ask_openai(uri), max_tokens=8, seed=0, extra_body=FAST)
    assert image.usage.prompt_tokens == text.usage.prompt_tokens + IMAGE_TOKENS
    assert image.choices[0].message.content
    two = client.chat.completions.create(model="vision", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "What is it?"}]}], max_tokens=8, n=2, seed=0, extra_body=FAST)
    assert two.usage.prompt_tokens == text.usage.prompt_tokens + 2 * IMAGE_TOKENS and len(two.choices) == 2
    claude = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=http, max_retries=0)
    message = claude.messages.create(model="vision", max_tokens=8, extra_body=FAST, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": uri.split(",")[1]}},
        {"type": "text", "text": "What is it?"}]}])
    assert message.usage.input_tokens == image.usage.prompt_tokens
    response = client.responses.create(model="vision", max_output_tokens=8, extra_body=FAST, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is it?"}, {"type": "input_image", "image_url": uri}]}])
    assert response.usage.input_tokens == image.usage.prompt_tokens


def test_the_next_turn_of_a_conversation_with_an_image_reuses_its_cache(app):
    http = app()
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    messages = ask_openai(data_uri(png(IMAGES[0])))
    first = client.chat.completions.create(model="vision", messages=messages, max_tokens=16, seed=0, extra_body=FAST)
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "And now?"}]
    second = client.chat.completions.create(model="vision", messages=messages, max_tokens=8, seed=0, extra_body=FAST)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


BAD_IMAGES = [
    (data_uri(b"not an image"), "messages[0].content[1].image_url", "the data: URI image is not an image Pillow can read"),
    (data_uri(png(IMAGES[0])[:200]), "messages[0].content[1].image_url", "the data: URI image is a damaged image"),
    ("data:image/png;base64,@@@", "messages[0].content[1].image_url", "not valid base64"),
    ("file:///etc/passwd", "messages[0].content[1].image_url", "must be"),
    ("/etc/hosts", "messages[0].content[1].image_url", "must be"),
    ("https://example.com/cat.png", "messages[0].content[1].image_url", "remote images are not fetched"),
]


@pytest.mark.parametrize("url, param, message", BAD_IMAGES)
def test_bad_images_are_a_400_naming_the_field_and_the_server_stays_up(app, url, param, message):
    http = app()
    body = {"model": "vision", "messages": ask_openai(url), "max_tokens": 8, **FAST}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert http.post("/v1/chat/completions", json={**body, "messages": ask_openai(data_uri(png(IMAGES[0])))}).status_code == 200


def test_other_bad_image_requests_are_400s(app, loaded, monkeypatch):
    model, _ = loaded
    http, uri = app(), data_uri(png(IMAGES[0]))
    body = {"model": "vision", "max_tokens": 8, **FAST}
    assistant = http.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ask_openai(uri)[0]["content"]}]})
    assert assistant.status_code == 400 and assistant.json()["error"]["param"] == "messages[1].content[1]"
    claude = http.post("/v1/messages", json={**body, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"}}]}]})
    assert claude.status_code == 400 and "messages[0].content[0]: the data: URI image is not an image" in claude.json()["error"]["message"]
    responses = http.post("/v1/responses", json={"model": "vision", "max_output_tokens": 8, **FAST, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": data_uri(b"GIF89a")}]}]})
    assert responses.status_code == 400 and responses.json()["error"]["param"] == "input[0].content[0].image_url"
    monkeypatch.setattr(model.args, "max_position_embeddings", 100)
    two = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "image_url", "image_url": {"url": uri}}]}]})
    assert two.status_code == 400 and "exceed the model's context of 100" in two.json()["error"]["message"]
    monkeypatch.undo()
    monkeypatch.setattr(model, "vision", None)
    blind = http.post("/v1/chat/completions", json={**body, "messages": ask_openai(uri)})
    assert blind.status_code == 400 and blind.json()["error"]["param"] == "messages[0].content[1]"
    assert "this model takes no images" in blind.json()["error"]["message"]
    monkeypatch.undo()
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json={**body, "messages": ask_openai(uri)}).status_code == 200


@pytest.fixture(scope="module")
def image_host(files):
    """A local http server (127.0.0.1 only) serving the test images."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_images_are_fetched_only_with_allow_remote_images(checkpoint, image_host, app, monkeypatch):  # noqa: F811
    process, base = start_server(checkpoint, "--allow-remote-images")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        remote = client.chat.completions.create(model=str(checkpoint), messages=ask_openai(f"{image_host}/photo.png"),
                                                max_tokens=8, seed=0, extra_body=FAST)
        local = client.chat.completions.create(model=str(checkpoint), messages=ask_openai(data_uri(png(IMAGES[0]))),
                                               max_tokens=8, seed=0, extra_body=FAST)
        assert remote.usage.prompt_tokens == local.usage.prompt_tokens
        assert remote.choices[0].message.content == local.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="answered HTTP 404"):
            client.chat.completions.create(model=str(checkpoint), messages=ask_openai(f"{image_host}/missing.png"),
                                           max_tokens=8, extra_body=FAST)
    finally:
        process.terminate()
        process.wait(timeout=10)
    refused = app().post("/v1/chat/completions", json={"messages": ask_openai(f"{image_host}/photo.png"), **FAST})
    assert refused.status_code == 400 and "--allow-remote-images" in refused.json()["error"]["message"]
    monkeypatch.setattr("mlx_diffgemma.server.MAX_IMAGE_BYTES", 1000)
    large = app(allow_remote_images=True).post("/v1/chat/completions",
                                               json={"messages": ask_openai(f"{image_host}/photo.png"), **FAST})
    assert large.status_code == 400 and "is larger than" in large.json()["error"]["message"]
