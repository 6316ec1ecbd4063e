"""The ``mlx-diffgemma`` command: a thin typer app over the library."""

from __future__ import annotations

import sys
from typing import Optional

import typer

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
DEFAULT_MAX_TOKENS = 512

app = typer.Typer(
    help="Run Google's DiffusionGemma text diffusion model locally with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id (org/name) or local folder of a DiffusionGemma checkpoint.")
MaxTokens = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", help="Most tokens to generate (in canvases of the model's canvas length).")
Steps = typer.Option(None, "--steps", help="Most denoising steps per canvas (default: the checkpoint's, else 48).")
EntropyBound = typer.Option(None, "--entropy-bound", help="Entropy budget for accepting tokens per step; higher accepts more (default 0.1).")
TMin = typer.Option(None, "--t-min", help="Temperature at the last denoising step (default 0.4).")
TMax = typer.Option(None, "--t-max", help="Temperature at the first denoising step (default 0.8).")
Seed = typer.Option(None, "--seed", help="Random seed, for reproducible output.")
CanvasLength = typer.Option(None, "--canvas-length", help="Tokens denoised together (default: the model's, 256).")


@app.callback()
def main():
    """Run Google's DiffusionGemma text diffusion model locally with MLX."""


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def load_or_fail(model: str):
    from mlx_diffgemma import load

    try:
        return load(model)
    except (ValueError, OSError) as e:
        fail(f"cannot load {model}: {e}")


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt; read from standard input when omitted or '-'."),
    model: str = ModelOption,
    max_tokens: int = MaxTokens,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    canvas_length: Optional[int] = CanvasLength,
    seed: Optional[int] = Seed,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    stats: bool = typer.Option(False, "--stats", help="Print speed and denoising statistics to standard error."),
):
    """Answer one prompt and print the reply as it is committed, canvas by canvas."""
    from mlx_diffgemma import stream_generate

    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        fail("empty prompt")
    model_obj, tokenizer = load_or_fail(model)
    request = prompt if raw else [{"role": "user", "content": prompt}]
    last = None
    try:
        for last in stream_generate(
            model_obj, tokenizer, request, max_tokens, steps=steps, entropy_bound=entropy_bound,
            t_min=t_min, t_max=t_max, canvas_length=canvas_length, seed=seed,
        ):
            print(last.text, end="", flush=True)
    except ValueError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print()
        raise typer.Exit(130)
    print()
    if stats and last is not None:
        from mlx_diffgemma.repl import format_stats

        typer.echo(format_stats(last), err=True)


@app.command()
def chat(
    model: str = ModelOption,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = MaxTokens,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    canvas_length: Optional[int] = CanvasLength,
    seed: Optional[int] = Seed,
    no_draft: bool = typer.Option(False, "--no-draft", help="Stream committed text only, without the live denoising view."),
):
    """Chat in the terminal; each canvas is shown denoising live. /help lists the commands."""
    from rich.console import Console

    from mlx_diffgemma.repl import run_chat

    console = Console(highlight=False)
    with console.status(f"Loading {model} ..."):
        model_obj, tokenizer = load_or_fail(model)
    run_chat(
        model_obj, tokenizer, system=system, draft=not no_draft, console=console, max_tokens=max_tokens,
        steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, canvas_length=canvas_length, seed=seed,
    )


@app.command()
def bench(
    model: str = ModelOption,
    prompt_tokens: str = typer.Option("128,1024", "--prompt-tokens", help="Comma-separated prompt lengths to measure."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens generated per measurement."),
    steps: Optional[int] = Steps,
    canvas_length: Optional[int] = CanvasLength,
    seed: int = typer.Option(0, "--seed", help="Seed for the random prompts and the sampler."),
):
    """Measure prefill, denoising steps, generation speed, memory and matmul efficiency."""
    import os

    from rich.console import Console
    from rich.table import Table

    from mlx_diffgemma.bench import run_bench
    from mlx_diffgemma.generate import resolve_settings

    try:
        lengths = [int(n) for n in prompt_tokens.split(",")]
        if any(n < 1 for n in lengths):
            raise ValueError
    except ValueError:
        fail(f"--prompt-tokens must be comma-separated positive integers, got {prompt_tokens!r}")
    model_obj, tokenizer = load_or_fail(model)
    try:
        settings = resolve_settings(model_obj, steps=steps, canvas_length=canvas_length)
        rows, peak = run_bench(model_obj, lengths, max_tokens, settings, sorted(tokenizer.eos_token_ids), seed)
    except ValueError as e:
        fail(str(e))
    table = Table(title=f"{model} ({settings.steps} steps max, canvas {settings.canvas_length})")
    for column in ("prompt", "prefill t/s", "ms/step", "steps/cv", "tok/fwd", "gen t/s", "peak GB", "TFLOP/s", "% peak"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r.prompt_tokens), f"{r.prefill_tps:.0f}", f"{r.step_ms:.1f}", f"{r.steps_per_canvas:.1f}",
                      f"{r.tokens_per_forward:.2f}", f"{r.generation_tps:.1f}", f"{r.peak_memory_gb:.2f}",
                      f"{r.step_tflops:.3f}", f"{r.matmul_fraction:.0%}")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # no truncation in files
    console.print(table)
    blas = os.environ.get("LD_PRELOAD") or "the default BLAS"
    console.print(f"matmul peak (square matmul in the model's dtype): {peak / 1e12:.3f} TFLOP/s; BLAS: {blas}")


@app.command()
def serve(
    model: str = ModelOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to your network."),
    port: int = typer.Option(1234, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/ requests."),
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from mlx_diffgemma.server import serve as run_server

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    model_obj, tokenizer = load_or_fail(model)
    run_server(model_obj, tokenizer, model, host=host, port=port, api_key=api_key)


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Folder or hub id of the original checkpoint."),
    mlx_path: str = typer.Option(..., "--mlx-path", help="Output folder (created; must be empty unless --force)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Weight dtype: bfloat16, float16 or float32."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize (the uniform recipe unless --recipe)."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Bits per weight for uniform quantization: 2, 3, 4, 5, 6 or 8 (default 4)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Weights per quantization group: 32, 64 or 128."),
    q_mode: str = typer.Option("affine", "--q-mode", help="Quantization mode: affine, mxfp4, mxfp8 or nvfp4."),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", help="uniform, or mixed_L_H (mixed_4_8 = the community 4-bit layout: experts at L bits; "
        "embeddings, attention, dense MLP and router at H bits). Implies -q."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
):
    """Convert a checkpoint to MLX format, optionally quantized, shard by shard."""
    from convert import RecipeError
    from convert import convert as run_convert

    try:
        out = run_convert(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                          q_mode=q_mode, recipe=recipe, force=force)
    except (RecipeError, ValueError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.secho("interrupted: nothing was written", fg=typer.colors.RED, err=True)
        raise typer.Exit(130)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
