"""The bench command and its arithmetic."""

import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffgemma.bench import denoise_flops, run_bench
from mlx_diffgemma.model import ModelArgs
from mlx_diffgemma.sampler import DiffusionSettings
from mlx_diffgemma.utils import load_model


def test_denoise_flops_counts_each_part():
    args = ModelArgs(
        model_type="diffusion_gemma", vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4, top_k_experts=2,
        moe_intermediate_size=6, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
        global_head_dim=4, num_global_key_value_heads=1,
    )
    prefix, canvas = 10, 5
    sliding = 8 * 2 * 4 * 2 + 8 * 1 * 4 * 2 + 2 * 2 * 4 * (2 + canvas)  # q, o; k, v; attention over 2 + 5 keys
    full = 8 * 2 * 4 * 2 + 8 * 1 * 4 + 2 * 2 * 4 * (prefix + canvas)  # keys double as values
    ffn = 3 * 8 * 16 + 8 * 4 + 2 * 3 * 8 * 6  # dense MLP, router, two experts
    head = 2 * 8 * 100 + 3 * 8 * 16  # LM head, self-conditioning product, its MLP
    assert denoise_flops(args, prefix, canvas) == 2 * canvas * (sliding + full + 2 * ffn + head)


def test_bench_rows_for_each_prompt_length(hf_checkpoint):
    model = load_model(hf_checkpoint)
    rows, peak = run_bench(model, [8, 40], 32, DiffusionSettings(steps=3, canvas_length=16), [1, 106])
    assert peak > 0 and [r.prompt_tokens for r in rows] == [8, 40]
    for r in rows:
        assert r.prefill_tps > 0 and r.step_ms > 0 and r.generation_tps > 0
        assert 1 <= r.steps_per_canvas <= 3 and 0 < r.tokens_per_forward <= 16 and 0 < r.matmul_fraction
        # one settling curve per canvas, one point per step it ran, ending fully settled
        assert 1 <= len(r.settling) <= 2
        assert all(1 <= len(c) <= 3 and c[-1] == 1.0 and all(0 <= f <= 1 for f in c) for c in r.settling)


@pytest.mark.slow
def test_bench_command_prints_a_table_and_draws_a_plot(hf_checkpoint, tmp_path):
    cli = str(Path(__file__).parents[1] / "cli.py")
    plot = tmp_path / "bench.png"
    out = subprocess.run([sys.executable, cli, "bench", "-m", str(hf_checkpoint), "--prompt-tokens", "8,24",
                          "--max-tokens", "32", "--steps", "2", "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ms/step" in out.stdout and "matmul peak" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad_plot = subprocess.run([sys.executable, cli, "bench", "-m", str(hf_checkpoint), "--plot", str(tmp_path / "b.txt")],
                              capture_output=True, text=True)
    assert bad_plot.returncode == 1 and "--plot must name" in bad_plot.stderr
    bad = subprocess.run([sys.executable, cli, "bench", "-m", str(hf_checkpoint), "--prompt-tokens", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "--prompt-tokens must be" in bad.stderr
