"""Two processes over the ring backend (mlx.launch) against one: logits, tokens, memory."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_diffgemma import sudoku
from mlx_diffgemma.distributed import _kv_range, shard
from mlx_diffgemma.utils import load_model

ROOT = Path(__file__).resolve().parent.parent


def free_port(count: int = 4) -> int:
    """A port from which ``count`` consecutive ports are free: each ring rank binds its own."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + count < 65536 and all(_bindable(start + i) for i in range(count)):
            return start
    raise RuntimeError("no run of free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


LAUNCHER = Path(sys.executable).parent / "mlx.launch"


def launch(n: int, *args: str, script: Path = ROOT / "benchmarks" / "distributed.py") -> dict:
    """Rank 0's JSON line from ``script`` run on ``n`` ranks (``n == 1``: a plain process)."""
    cmd = [sys.executable, str(script), *args]
    if n > 1:
        cmd = [str(LAUNCHER), "-n", str(n), "--backend", "ring", "--starting-port", str(free_port()),
               "--python", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    return json.loads(lines[-1])


def test_two_ranks_match_one_process_on_the_tiny_model(hf_checkpoint):
    result = launch(2, "--model", str(hf_checkpoint), "--parity", "--canvas-length", "16", "--prompt-tokens", "24",
                    "--dtype", "float32")
    assert result["ranks"] == 2 and result["ranks_agree"]
    assert result["max_abs_diff_first_step"] <= 1e-4
    assert result["max_abs_diff_self_conditioned"] <= 1e-4
    # Each rank holds about half the weights (norms and the router are replicated).
    whole = sum(v.nbytes for _, v in tree_flatten(load_model(hf_checkpoint).parameters())) / 2**20
    assert result["rank0_weights_mib"] < 0.6 * whole


@pytest.mark.slow
def test_two_ranks_match_one_process_on_quantized_weights(tokenizer_dir, vocab_size, tmp_path):
    """8-bit embeddings and attention, computed in float32: sharding the packed weights, scales
    and biases must not change the logits beyond float32 rounding. (Head size 32, so that each
    rank's half of the output projection's inputs fills whole groups of 64.)"""
    from mlx_diffgemma.convert import convert
    from helpers import build_reference_model, save_checkpoint

    source = save_checkpoint(build_reference_model(vocab_size, head_dim=32, global_head_dim=32), tokenizer_dir, tmp_path / "hf")
    quantized = convert(str(source), str(tmp_path / "q"), dtype="float32", recipe="mixed_4_8", progress=False)
    result = launch(2, "--model", str(quantized), "--parity", "--canvas-length", "16", "--prompt-tokens", "24",
                    "--dtype", "float32")
    assert result["max_abs_diff_first_step"] <= 1e-4 and result["max_abs_diff_self_conditioned"] <= 1e-4
    assert result["ranks_agree"]


@pytest.mark.slow
def test_unseeded_sharded_generation_uses_rank_0s_seed_on_every_rank(hf_checkpoint):
    """Without a seed, rank 0 draws one and shares it: both ranks denoise the same canvases,
    and the output equals one process seeded with rank 0's draw."""
    from mlx_diffgemma import load, stream_generate

    cmd = [str(LAUNCHER), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--python",
           sys.executable, str(ROOT / "tests" / "sharded_unseeded.py"), str(hf_checkpoint)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    ranks = {r["rank"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert out.returncode == 0 and set(ranks) == {0, 1}, out.stdout + out.stderr
    assert len(ranks[0]["drawn"]) == 1 and ranks[1]["drawn"] == []
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    model, tokenizer = load(hf_checkpoint)
    alone = [t for r in stream_generate(model, tokenizer, [2, 10, 11, 12, 13], 32, steps=4, seed=ranks[0]["drawn"][0])
             for t in r.tokens]
    assert ranks[0]["tokens"] == alone


@pytest.mark.slow
@pytest.mark.skipif(not (sudoku.MODEL_DIR / "config.json").is_file(), reason="the built-in Sudoku model is not shipped")
def test_two_ranks_generate_the_same_sudoku_solutions():
    result = launch(2, "--model", str(sudoku.MODEL_DIR), "--parity", "--sudoku", "--canvas-length", "16")
    assert result["identical_rows"] == "8/8" and result["ranks_agree"]


@pytest.mark.slow
def test_sharded_chat_follows_rank_0_through_stopped_replies_resets_and_refusals(hf_checkpoint):
    """Rank 0 chats; rank 1 follows each turn (Lockstep). A reply stopped after its first
    draft, a conversation reset on rank 0 only, a refused request and a stop string must
    neither hang the ranks nor change any reply from what one process writes."""
    script = ROOT / "tests" / "lockstep_chat.py"
    one, two = launch(1, str(hf_checkpoint), script=script), launch(2, str(hf_checkpoint), script=script)
    assert two["ranks"] == 2 and two["replies"] == one["replies"]
    full, after_stop, after_reset, refusal, stopped = one["replies"]
    assert len(full) == 20 and len(after_stop) == 20 and after_reset == full
    assert "steps must be a positive integer" in refusal
    assert 0 < len(stopped) <= 6 and stopped == full[: len(stopped)]  # only the tokens before the stop string


def launch_cli(log: Path, *args: str, stdin=None) -> subprocess.Popen:
    """``mlx.launch -n 2 -- mlx-diffgemma ARGS`` in a session of its own (for Ctrl-C)."""
    cmd = [str(LAUNCHER), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
           str(Path(sys.executable).parent / "mlx-diffgemma"), *args]
    return subprocess.Popen(cmd, stdin=stdin, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def ctrl_c_ends_every_process(process: subprocess.Popen, log: Path) -> None:
    """Send SIGINT to the launcher and every rank, as Ctrl-C in the terminal does; all must exit."""
    os.killpg(process.pid, signal.SIGINT)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            process.poll()  # reap the launcher, or it stays in the group as a zombie
            os.killpg(process.pid, 0)
            time.sleep(0.5)
        pytest.fail("a process is still running 60 s after Ctrl-C:\n" + log.read_text())
    except ProcessLookupError:
        pass  # every process of the session has exited
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sharded_server_survives_a_client_going_away_and_shuts_down_every_rank(hf_checkpoint, tmp_path):
    """``mlx.launch ... -- mlx-diffgemma serve``: rank 0 serves, rank 1 follows. A streaming
    client that disconnects stops both ranks at the same step; Ctrl-C ends every process."""
    import httpx

    port, log = free_port(), tmp_path / "serve.log"
    server = launch_cli(log, "serve", "--model", str(hf_checkpoint), "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline and server.poll() is None, log.read_text()
                time.sleep(0.5)
        body = {"prompt": "hi", "max_tokens": 16, "seed": 5, "steps": 8}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 64, "stream": True}, timeout=120) as r:
            next(r.iter_lines())  # one chunk, then the client goes away
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert again == first
    finally:
        ctrl_c_ends_every_process(server, log)


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_sharded_chat_reply_ends_every_rank(hf_checkpoint, tmp_path):
    """Ctrl-C reaches the launcher and both ranks mid-reply. The launcher stops forwarding
    input, so the chat must end: rank 0 stops at a step both ranks reach and releases rank 1."""
    log = tmp_path / "chat.log"
    chat = launch_cli(log, "chat", "--model", str(hf_checkpoint), "--max-tokens", "400", "--no-draft",
                      stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while ">>> " not in log.read_text():
            assert time.time() < deadline and chat.poll() is None, log.read_text()
            time.sleep(0.5)
        chat.stdin.write(b"Tell me a long story\n")
        chat.stdin.flush()
        time.sleep(3)  # 25 canvases of 48 steps: still replying
    finally:
        ctrl_c_ends_every_process(chat, log)


@pytest.mark.parametrize("heads, kv_heads, n, expected", [
    (8, 4, 2, [(0, 2), (2, 4)]),  # even split
    (8, 2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # fewer KV heads than ranks: shared
    (4, 1, 2, [(0, 1), (0, 1)]),
])
def test_each_rank_keeps_the_kv_heads_its_queries_read(heads, kv_heads, n, expected):
    assert [_kv_range(heads, kv_heads, n, r) for r in range(n)] == expected


def test_quantized_layers_that_cannot_split_on_group_boundaries_are_refused(hf_checkpoint, tmp_path):
    from mlx_diffgemma.convert import convert

    class TwoRanks:  # shard() checks before it sends anything
        def size(self):
            return 2

        def rank(self):
            return 0

    model = load_model(convert(str(hf_checkpoint), str(tmp_path / "q"), recipe="mixed_4_8", progress=False))
    with pytest.raises(ValueError, match="o_proj: 64 inputs split 2 ways"):
        shard(model, TwoRanks())


def test_one_rank_group_leaves_the_model_whole(hf_checkpoint):
    model = load_model(hf_checkpoint)
    before = model.model.decoder.embed_tokens.weight.shape
    shard(model, mx.distributed.init())  # a single process: a group of one
    assert model.model.decoder.embed_tokens.weight.shape == before
