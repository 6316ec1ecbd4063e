"""Two processes over the ring backend (mlx.launch) against one: logits, tokens, memory."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_diffgemma import sudoku
from mlx_diffgemma.distributed import _kv_range
from mlx_diffgemma.utils import load_model

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, *args: str) -> dict:
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher), "-n", str(n), "--backend", "ring", "--starting-port", str(free_port()),
           "--python", sys.executable, str(ROOT / "benchmarks" / "distributed.py"), *args]
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


def test_two_ranks_match_one_process_on_quantized_weights(tokenizer_dir, vocab_size, tmp_path):
    """8-bit embeddings and attention, computed in float32: sharding the packed weights, scales
    and biases must not change the logits beyond float32 rounding. (Head size 32, so that each
    rank's half of the output projection's inputs fills whole groups of 64.)"""
    from convert import convert
    from helpers import build_reference_model, save_checkpoint

    source = save_checkpoint(build_reference_model(vocab_size, head_dim=32, global_head_dim=32), tokenizer_dir, tmp_path / "hf")
    quantized = convert(str(source), str(tmp_path / "q"), dtype="float32", recipe="mixed_4_8", progress=False)
    result = launch(2, "--model", str(quantized), "--parity", "--canvas-length", "16", "--prompt-tokens", "24",
                    "--dtype", "float32")
    assert result["max_abs_diff_first_step"] <= 1e-4 and result["max_abs_diff_self_conditioned"] <= 1e-4
    assert result["ranks_agree"]


@pytest.mark.skipif(not (sudoku.MODEL_DIR / "config.json").is_file(), reason="the built-in Sudoku model is not shipped")
def test_two_ranks_generate_the_same_sudoku_solutions():
    result = launch(2, "--model", str(sudoku.MODEL_DIR), "--parity", "--sudoku", "--canvas-length", "16")
    assert result["identical_rows"] == "8/8" and result["ranks_agree"]


@pytest.mark.parametrize("heads, kv_heads, n, expected", [
    (8, 4, 2, [(0, 2), (2, 4)]),  # even split
    (8, 2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # fewer KV heads than ranks: shared
    (4, 1, 2, [(0, 1), (0, 1)]),
])
def test_each_rank_keeps_the_kv_heads_its_queries_read(heads, kv_heads, n, expected):
    assert [_kv_range(heads, kv_heads, n, r) for r in range(n)] == expected


def test_quantized_layers_that_cannot_split_on_group_boundaries_are_refused(hf_checkpoint, tmp_path):
    from convert import convert

    from mlx_diffgemma.distributed import shard

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
    model.shard(mx.distributed.init())  # a single process: a group of one
    assert model.model.decoder.embed_tokens.weight.shape == before
