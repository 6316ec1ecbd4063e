"""Feedback on long work: generate's progress on a terminal (never in pipes or on stdout), and the
warning that quantized weights are slow on MLX's CPU backend."""

import io
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.convert import convert
from mlx_diffgemma.progress import ERASE_LINE, Progress
from mlx_diffgemma.utils import CPU_QUANTIZED_WARNING

CLI = str(Path(__file__).parents[1] / "cli.py")
ARGS = ["generate", "--raw", "Hello world", "--max-tokens", "32", "--steps", "4", "--seed", "1"]


@pytest.fixture(scope="module")
def quantized_checkpoint(hf_checkpoint, tmp_path_factory):
    return convert(hf_checkpoint, tmp_path_factory.mktemp("q") / "4-bit", progress=False, quantize=True, q_group_size=32)


def generate(model: Path, *flags: str, terminal: bool) -> tuple[str, str, int]:
    """Run the command with standard error on a terminal (a pty) or a pipe: stdout, stderr, status."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, CLI, *ARGS, "--model", str(model), *flags]
    if not terminal:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        return result.stdout, result.stderr, result.returncode
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        err += chunk
    out = process.stdout.read().decode()
    process.wait(timeout=300)
    os.close(leader)
    return out, err.decode(errors="replace"), process.returncode


def test_a_terminal_shows_each_step_below_the_reply_and_erases_it_and_stdout_stays_the_answer(hf_checkpoint):
    out, err, status = generate(hf_checkpoint, terminal=True)
    quiet_out, quiet_err, quiet_status = generate(hf_checkpoint, "--quiet", terminal=True)
    assert status == quiet_status == 0
    assert "canvas 1, step 1/4" in err and "canvas 2, step 1/4" in err
    assert err.rstrip("\r\n").endswith(ERASE_LINE + "\x1b8")  # the last line drawn is erased
    assert out == quiet_out and "\x1b" not in out and "canvas" not in out  # stdout: the answer alone
    assert "canvas" not in quiet_err and "\x1b" not in quiet_err


def test_a_pipe_gets_no_progress_and_quantized_weights_on_the_cpu_are_announced_once(quantized_checkpoint):
    out, err, status = generate(quantized_checkpoint, terminal=False)
    assert status == 0 and out.strip()
    assert "canvas" not in err and "\x1b" not in err
    assert err.count(CPU_QUANTIZED_WARNING) == 1


def test_progress_is_one_line_that_fits_the_terminal_with_the_draft_escaped():
    stream = io.StringIO()
    progress = Progress(stream, steps=48)
    progress.show(1, "Hello\n  there \x1b[31m" + "x" * 200)
    progress.show(2, "Hello again")
    progress.clear()
    progress.clear()  # once erased, nothing more
    progress.show(1, "next")
    drawn = stream.getvalue()
    assert "canvas 1, step 1/48  Hello there \\x1b[31mxxx" in drawn and "canvas 1, step 2/48  Hello again" in drawn
    assert "canvas 2, step 1/48  next" in drawn
    assert drawn.count(ERASE_LINE + "\x1b8") == 1  # one clear
    first = drawn.split(ERASE_LINE)[1].split("\x1b8")[0]
    assert "\n" not in first and len(first.replace("\x1b[2m", "").replace("\x1b[0m", "")) == 80
    assert first.endswith("…\x1b[0m")


def test_quantized_weights_warn_on_the_cpu_only(quantized_checkpoint, hf_checkpoint, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="mlx_diffgemma"):
        load(hf_checkpoint)
        assert CPU_QUANTIZED_WARNING not in caplog.messages
        load(quantized_checkpoint)
        assert caplog.messages.count(CPU_QUANTIZED_WARNING) == 1
        caplog.clear()
        monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
        load(quantized_checkpoint)
        assert CPU_QUANTIZED_WARNING not in caplog.messages
