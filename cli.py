"""The mlx-diffgemma command: a thin typer app over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from mlx_diffgemma.convert import MODES, describe_mode

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
DEFAULT_MAX_TOKENS = 512

# Plain help (rich_markup_mode=None): rich's panels would give every flag a <bool> placeholder
# and read "[plot]" as markup.
app = typer.Typer(
    help="Run Google's DiffusionGemma text diffusion model locally with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)

ModelOption = typer.Option(
    None, "--model", "-m", show_default=False,
    help=f"Hub id (org/name) or local folder of a DiffusionGemma checkpoint (default: {DEFAULT_MODEL}).")
ModelOrBase = typer.Option(
    None, "--model", "-m", show_default=False,
    help="Hub id (org/name) or local folder of a DiffusionGemma checkpoint (default: the base model recorded with "
    f"--adapter-path's adapters, else {DEFAULT_MODEL}).")
MaxTokens = typer.Option(
    None, "--max-tokens", show_default=False,
    help=f"Most tokens to generate, in canvases of the model's canvas length (default: {DEFAULT_MAX_TOKENS}, "
    "or as many as the model's context still holds if fewer).")
Steps = typer.Option(None, "--steps", help="Most denoising steps per canvas (default: the checkpoint's, else 48).")
EntropyBound = typer.Option(None, "--entropy-bound", help="Entropy budget for accepting tokens per step; higher accepts more (default 0.1).")
TMin = typer.Option(None, "--t-min", help="Temperature at the last denoising step (default 0.4).")
TMax = typer.Option(None, "--t-max", help="Temperature at the first denoising step (default 0.8).")
Seed = typer.Option(None, "--seed", help="Random seed, for reproducible output.")
CanvasLength = typer.Option(None, "--canvas-length", help="Tokens denoised together (default: the model's, 256).")
ScTopK = typer.Option(
    None, "--sc-top-k",
    help="Self-condition on each position's k most likely tokens only (faster on large vocabularies; "
    "not the reference's full softmax, which is the default, 0).")
FreezeAfter = typer.Option(
    None, "--freeze-after", metavar="N",
    help="Approximate, faster as a canvas settles: freeze a position once its accepted token has held for N steps; "
    "frozen positions are no longer run through the model (default 0, off: the reference re-predicts every position).")
AdapterPath = typer.Option(None, "--adapter-path", help="LoRA adapters from 'finetune --lora' to apply.")
Think = typer.Option(
    None, "--think/--no-think", show_default=False,
    help="Ask the model to reason before it answers, or not (default: as the chat template decides).")
Tools = typer.Option(
    None, "--tools", metavar="FILE", show_default=False,
    help='A JSON file of function tools the model may call, in OpenAI form: [{"type": "function", "function": '
    '{"name": ..., "description": ..., "parameters": {...}}}].')


def show_version(value: bool) -> None:
    if value:
        from mlx_diffgemma import __version__

        typer.echo(f"mlx-diffgemma {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."),
):
    """Run Google's DiffusionGemma text diffusion model locally with MLX."""
PromptCacheFile = typer.Option(
    None, "--prompt-cache-file", metavar="FILE", show_default=False,
    help="A prompt cache written by 'mlx-diffgemma cache-prompt': a prompt that starts with its prefix skips encoding "
    "it (its system prompt is used when --system is not given).")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def resolve_model(model: str | None, adapter_path: str | None = None) -> str:
    """--model; else the base model recorded with the adapters; else the default model."""
    if model is None and adapter_path is not None:
        from mlx_diffgemma.utils import read_adapter_config

        try:
            model = read_adapter_config(Path(adapter_path)).get("base_model")
        except ValueError as e:
            fail(str(e))
    return model or DEFAULT_MODEL


def read_tools(path: Path | None) -> list[dict] | None:
    """The tools declared in ``path`` (--tools), checked; exits with a one-line error on a bad file."""
    import json

    from mlx_diffgemma.tools import openai_tools

    if path is None:
        return None
    try:
        return openai_tools(json.loads(path.read_text()), param=str(path))
    except (OSError, ValueError) as e:  # json.JSONDecodeError and RequestError among them
        fail(f"--tools: {e}")


def read_schema(path: Path | None, regex: str | None, think: bool | None) -> dict | None:
    """The JSON schema in ``path`` (--json-schema), checked with --regex and --think; one error line if refused."""
    import json

    from mlx_diffgemma.constrained import schema_regex

    if path is not None and regex is not None:
        fail("give --json-schema or --regex, not both")
    if (path is not None or regex is not None) and think:
        fail(f"{'--json-schema' if path else '--regex'} cannot be combined with --think: the whole reply is constrained")
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text())
        schema_regex(schema)
    except (OSError, ValueError) as e:  # json.JSONDecodeError among them
        fail(f"--json-schema {path}: {getattr(e, 'strerror', None) or e}")
    return schema


def load_or_fail(model: str, sharded: bool = False, adapter_path: str | None = None, console: Console | None = None):
    """Load, or exit with a one-line error. With ``sharded`` and several ranks (under
    ``mlx.launch``), each rank loads its slice of the model. With a ``console``, a spinner
    shows while loading; it is cleared before any error is printed."""
    from contextlib import nullcontext

    import mlx.core as mx

    from mlx_diffgemma import load

    try:
        with console.status(f"Loading {model} ...") if console else nullcontext():
            return load(model, group=mx.distributed.init() if sharded else None, adapter_path=adapter_path)
    except (ValueError, OSError) as e:
        fail(f"cannot load {model}: {e}")


def open_prompt_cache(path: Path | None, model_obj, max_bytes: int | None = None):
    """A ``PromptCache`` (at most ``max_bytes``, default 4 GiB) starting from the file's
    prefix, and the file's system prompt; exits with a one-line error on a bad file, or
    under ``mlx.launch`` (each rank holds only its slice of every layer's keys)."""
    import mlx.core as mx

    from mlx_diffgemma.prompt_cache import DEFAULT_MAX_BYTES, PromptCache, load_prompt_cache

    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if path is None:
        return PromptCache(max_bytes), None
    if mx.distributed.init().size() > 1:
        fail("--prompt-cache-file needs the whole model in one process; it cannot be used under mlx.launch")
    try:
        tokens, cache, system = load_prompt_cache(path, model_obj)
    except ValueError as e:
        fail(str(e))
    return PromptCache(max_bytes, prefix=(tokens, cache)), system


def lead_or_follow(model_obj, tokenizer, prompt_cache=None):
    """Under ``mlx.launch``: ranks other than 0 follow rank 0's requests (with ``prompt_cache``,
    made as rank 0's is), then exit here; rank 0 gets the ``Lockstep`` to generate with. In
    one process: ``None``."""
    import mlx.core as mx

    from mlx_diffgemma.lockstep import Lockstep

    group = mx.distributed.init()
    if group.size() == 1:
        return None
    lockstep = Lockstep(group)
    if not lockstep.leader:
        lockstep.follow(model_obj, tokenizer, prompt_cache)
        raise typer.Exit(0)
    return lockstep


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(
        None, help="The prompt; read from standard input when omitted or '-' (one trailing newline, as echo adds, is dropped)."),
    model: Optional[str] = ModelOrBase,
    max_tokens: Optional[int] = MaxTokens,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    canvas_length: Optional[int] = CanvasLength,
    seed: Optional[int] = Seed,
    raw: bool = typer.Option(
        False, "--raw", help="Send the prompt as is, without the chat template (needed for a model without one)."),
    stats: bool = typer.Option(False, "--stats", help="Print speed and denoising statistics to standard error."),
    quiet: bool = typer.Option(
        False, "--quiet",
        help="Show no progress (canvas, step and live draft) on standard error; it is shown only on a terminal."),
    short_final_canvas: bool = typer.Option(
        False, "--short-final-canvas",
        help="Denoise the last canvas only as long as the tokens still wanted (faster; that canvas differs from the reference)."),
    sc_top_k: Optional[int] = ScTopK,
    freeze_after: Optional[int] = FreezeAfter,
    adapter_path: Optional[str] = AdapterPath,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    think: Optional[bool] = Think,
    tools: Optional[Path] = Tools,
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", help="Do not print the model's reasoning."),
    prompt_cache_file: Optional[Path] = PromptCacheFile,
    json_schema: Optional[Path] = typer.Option(
        None, "--json-schema", metavar="FILE", show_default=False,
        help="A JSON schema file: the reply is JSON valid against it (thinking is off)."),
    regex: Optional[str] = typer.Option(
        None, "--regex", show_default=False, help="A regular expression the whole reply must match (thinking is off)."),
    image: Optional[list[Path]] = typer.Option(
        None, "--image", metavar="PATH", show_default=False,
        help="An image for the model to read, before the prompt's text; repeatable (needs the [vision] extra)."),
):
    """Answer one prompt and print the reply as it is committed, canvas by canvas.

    The answer goes to standard output; the reasoning, when the model thinks, to standard error
    (dimmed on a terminal). Tool calls follow the answer on standard output, one JSON object per
    line: {"name": ..., "arguments": {...}}. While a canvas denoises, a terminal on standard error
    shows its progress on one line, erased before anything else is printed; a pipe or file gets
    none. Under mlx.launch every rank holds a slice of the model and rank 0 prints.
    """
    import json

    import mlx.core as mx

    from mlx_diffgemma import stream_generate
    from mlx_diffgemma.generate import prepare_prompt, resolve_settings
    from mlx_diffgemma.progress import Progress
    from mlx_diffgemma.repl import fit_context
    from mlx_diffgemma.vision import attach_images, read_image

    if prompt is None or prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")
    if not prompt.strip():
        fail("empty prompt")
    templated = [flag for flag, value in (("--system", system), ("--tools", tools), ("--think/--no-think", think),
                                          ("--image", image or None)) if value is not None]
    if raw and templated:
        fail(f"{', '.join(templated)} need the chat template; leave out --raw")
    try:
        for path in image or ():  # read before the model loads, to fail fast
            read_image(path)
    except ValueError as e:
        fail(f"--image: {e}")
    tool_list = read_tools(tools)
    schema = read_schema(json_schema, regex, think)
    if schema is not None or regex is not None:
        think = None if raw else False  # the constrained reply is the answer itself
    model = resolve_model(model, adapter_path)
    model_obj, tokenizer = load_or_fail(model, sharded=True, adapter_path=adapter_path)
    prompt_cache, cached_system = open_prompt_cache(prompt_cache_file, model_obj)
    if system is None and not raw:
        system = cached_system
    rank0 = mx.distributed.init().rank() == 0
    # Only rank 0 writes the reply; reasoning goes to stderr, dimmed on a terminal (click drops the style elsewhere).
    echo = print if rank0 else (lambda *args, **kwargs: None)
    show_reasoning = rank0 and not hide_reasoning
    progress = None
    messages = [{"role": "system", "content": system}] if system else []
    content = [*({"type": "image", "image": str(path)} for path in image), {"type": "text", "text": prompt}] if image else prompt
    last, thinking, answered, calls, images, features = None, False, False, [], [], None
    try:
        ids = prepare_prompt(tokenizer, prompt if raw else [*messages, {"role": "user", "content": content}],
                             images=images, enable_thinking=think, tools=tool_list)
        if images:  # expanded here, so that the reply is sized to the whole prompt
            [ids], features = attach_images(model_obj, [ids], [images])
        if prompt_cache.prefix and ids[: len(prompt_cache.prefix[0])] != prompt_cache.prefix[0]:
            typer.echo(f"warning: the prompt does not start with {prompt_cache_file}'s prefix; it is encoded in full",
                       err=True)
        if rank0 and not quiet and sys.stderr.isatty():
            progress = Progress(sys.stderr, resolve_settings(model_obj, steps=steps).steps)
        for last in fit_context(stream_generate, DEFAULT_MAX_TOKENS)(
            model_obj, tokenizer, ids, max_tokens, steps=steps, entropy_bound=entropy_bound,
            t_min=t_min, t_max=t_max, canvas_length=canvas_length, seed=seed, short_final_canvas=short_final_canvas,
            self_conditioning_top_k=sc_top_k, freeze_after=freeze_after,
            prompt_cache=prompt_cache if prompt_cache_file else None,
            json_schema=schema, regex=regex, image_features=features, draft=progress is not None,
        ):
            if last.draft is not None:
                progress.show(last.step, last.draft)
                continue
            if progress:
                progress.clear()
            if last.reasoning and show_reasoning:
                typer.secho(last.reasoning, dim=True, err=True, nl=False)
                thinking = True
            if last.text and thinking:
                typer.echo(err=True)
                thinking = False
            echo(last.text, end="", flush=True)
            answered = answered or bool(last.text)
            calls += last.tool_calls
    except ValueError as e:
        if progress:
            progress.clear()
        fail(str(e))
    except KeyboardInterrupt:
        if progress:
            progress.clear()
        echo()
        raise typer.Exit(130)
    if thinking:
        typer.echo(err=True)
    if answered or not calls:
        echo()
    for call in calls:
        echo(json.dumps(call, ensure_ascii=False), flush=True)
    if stats and last is not None and rank0:
        from mlx_diffgemma.repl import format_stats

        typer.echo(format_stats(last), err=True)


def read_text_file(path: Path, flag: str) -> str:
    """The text of ``path``; exits with a one-line error if it cannot be read or is empty."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:  # UnicodeDecodeError among them
        fail(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}")
    if not text:
        fail(f"{flag}: {path} is empty")
    return text


@app.command()
def infill(
    prefix_file: Path = typer.Option(..., "--prefix-file", help="The text before the gap (sent as is, no chat template)."),
    suffix_file: Path = typer.Option(..., "--suffix-file", help="The text after the gap; it must fit in one canvas."),
    model: Optional[str] = ModelOrBase,
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", show_default=False, help="Longest middle to try (default: what the canvas leaves after the suffix)."),
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    canvas_length: Optional[int] = CanvasLength,
    seed: Optional[int] = Seed,
    sc_top_k: Optional[int] = ScTopK,
    adapter_path: Optional[str] = AdapterPath,
    stats: bool = typer.Option(False, "--stats", help="Print the chosen length and each candidate's score to standard error."),
):
    """Write the text between a prefix and a suffix and print it (exactly the middle, no newline added).

    The suffix is fixed at the end of a canvas and several middle lengths are denoised side by
    side; the length whose canvas the model finds most likely wins.
    """
    import time

    from mlx_diffgemma.generate import resolve_settings
    from mlx_diffgemma.infill import infill as run_infill

    prefix, suffix = read_text_file(prefix_file, "--prefix-file"), read_text_file(suffix_file, "--suffix-file")
    model = resolve_model(model, adapter_path)
    model_obj, tokenizer = load_or_fail(model, adapter_path=adapter_path)
    tic = time.perf_counter()
    try:
        settings = resolve_settings(model_obj, steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max,
                                    canvas_length=canvas_length, self_conditioning_top_k=sc_top_k)
        result = run_infill(model_obj, tokenizer, prefix, suffix, max_tokens=max_tokens, seed=seed, settings=settings)
    except ValueError as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    typer.echo(result.text, nl=False)
    if stats:
        scores = ", ".join(f"{n}: {score:.3f}" for n, score in result.scores.items())
        typer.echo(f"\nmiddle of {result.length} tokens; mean NLL per candidate length: {scores}; "
                   f"{result.steps} denoising steps, {time.perf_counter() - tic:.2f} s", err=True)


@app.command()
def chat(
    model: Optional[str] = ModelOrBase,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: Optional[int] = MaxTokens,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    canvas_length: Optional[int] = CanvasLength,
    seed: Optional[int] = Seed,
    no_draft: bool = typer.Option(False, "--no-draft", help="Stream committed text only, without the live denoising view."),
    sc_top_k: Optional[int] = ScTopK,
    adapter_path: Optional[str] = AdapterPath,
    think: Optional[bool] = Think,
    tools: Optional[Path] = Tools,
    prompt_cache_file: Optional[Path] = PromptCacheFile,
):
    """Chat in the terminal; each canvas is shown denoising live. /help lists the commands
    (/think turns thinking on or off; /tool-result answers a tool call by hand).

    Under mlx.launch every rank holds a slice of the model; rank 0 reads your messages.
    """
    from rich.console import Console

    from mlx_diffgemma import stream_generate
    from mlx_diffgemma.repl import fit_context, run_chat

    console = Console(highlight=False)
    tool_list = read_tools(tools)
    model = resolve_model(model, adapter_path)
    model_obj, tokenizer = load_or_fail(model, sharded=True, adapter_path=adapter_path, console=console)
    if not tokenizer.has_chat_template:
        fail(f"{model} has no chat template, so it cannot chat; 'mlx-diffgemma generate --raw' sends it plain text")
    prompt_cache, cached_system = open_prompt_cache(prompt_cache_file, model_obj)
    lockstep = lead_or_follow(model_obj, tokenizer)
    try:
        run_chat(
            model_obj, tokenizer, system=system if system is not None else cached_system, draft=not no_draft,
            console=console, prompt_cache=prompt_cache,
            generator=fit_context(lockstep.stream if lockstep else stream_generate, DEFAULT_MAX_TOKENS),
            sharded=lockstep is not None, enable_thinking=think, tools=tool_list, max_tokens=max_tokens,
            steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, canvas_length=canvas_length, seed=seed,
            self_conditioning_top_k=sc_top_k,
        )
    finally:
        if lockstep:
            lockstep.close()


@app.command()
def bench(
    model: Optional[str] = ModelOption,
    prompt_tokens: str = typer.Option("128,1024", "--prompt-tokens", help="Comma-separated prompt lengths to measure."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens generated per measurement."),
    steps: Optional[int] = Steps,
    canvas_length: Optional[int] = CanvasLength,
    seed: int = typer.Option(0, "--seed", help="Seed for the random prompts and the sampler."),
    sc_top_k: Optional[int] = ScTopK,
    freeze_after: Optional[int] = FreezeAfter,
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Also draw how canvases settle and the step time per prompt length (.png, .svg, .pdf); "
        "needs matplotlib (pip install 'mlx-diffgemma[plot]')."),
):
    """Measure prefill, denoising steps, generation speed, memory and matmul efficiency."""
    import importlib.util
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
    if plot is not None:
        if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            fail(f"--plot must name a .png, .svg or .pdf file, got {plot}")
        if not plot.parent.is_dir():
            fail(f"--plot: folder {plot.parent} does not exist")
        if importlib.util.find_spec("matplotlib") is None:
            fail("--plot needs matplotlib: pip install 'mlx-diffgemma[plot]'")
    model = resolve_model(model)
    model_obj, tokenizer = load_or_fail(model)
    try:
        settings = resolve_settings(model_obj, steps=steps, canvas_length=canvas_length, self_conditioning_top_k=sc_top_k,
                                    freeze_after=freeze_after)
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
    if plot is not None:
        from mlx_diffgemma.bench import plot_bench

        plot_bench(rows, plot, f"{model}: {settings.steps} steps max, canvas {settings.canvas_length}")
        console.print(f"plot written to {plot}")


@app.command()
def serve(
    model: Optional[str] = ModelOrBase,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to your network."),
    port: int = typer.Option(1234, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/ requests."),
    cors_origin: Optional[list[str]] = typer.Option(
        None, "--cors-origin", metavar="ORIGIN", show_default=False,
        help="A web page origin browsers may call the server from, e.g. https://example.com; repeatable; '*' allows any "
        "(default: only pages served from localhost, 127.0.0.1 or [::1], on any port)."),
    adapter_path: Optional[str] = AdapterPath,
    prompt_cache_file: Optional[Path] = typer.Option(
        None, "--prompt-cache-file", metavar="FILE", show_default=False,
        help="A prompt cache written by 'mlx-diffgemma cache-prompt': requests that start with its prefix skip encoding it."),
    prompt_cache_bytes: Optional[int] = typer.Option(
        None, "--prompt-cache-bytes", min=0, show_default=False,
        help="Most bytes the KV caches of recent conversations may hold; the least recently used go first (default: 4 GiB)."),
    allow_remote_images: bool = typer.Option(
        False, "--allow-remote-images",
        help="Fetch images given as http(s) URLs (default: data: URIs only). The server then fetches any URL a client sends."),
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Under mlx.launch every rank holds a slice of the model; rank 0 serves.
    """
    import mlx.core as mx

    from mlx_diffgemma.server import check_port
    from mlx_diffgemma.server import serve as run_server

    model = resolve_model(model, adapter_path)
    if mx.distributed.init().rank() == 0:  # the rank that will listen
        try:
            check_port(host, port)
        except OSError as e:
            fail(str(e))
    model_obj, tokenizer = load_or_fail(model, sharded=True, adapter_path=adapter_path)
    prompt_cache, _ = open_prompt_cache(prompt_cache_file, model_obj, prompt_cache_bytes)
    lockstep = lead_or_follow(model_obj, tokenizer, prompt_cache)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    run_server(model_obj, tokenizer, model, host=host, port=port, api_key=api_key, lockstep=lockstep,
               cors_origins=cors_origin or None, prompt_cache=prompt_cache, allow_remote_images=allow_remote_images)


@app.command("cache-prompt")
def cache_prompt(
    prompt_file: Path = typer.Option(..., "--prompt-file", help="The system prompt to encode (or, with --raw, plain text)."),
    output: Path = typer.Option(..., "--output", "-o", help="The prompt-cache file to write (.safetensors)."),
    model: Optional[str] = ModelOrBase,
    raw: bool = typer.Option(
        False, "--raw", help="Encode the text as is, without the chat template, for 'generate --raw' prompts that start with it."),
    think: Optional[bool] = Think,
    tools: Optional[Path] = Tools,
    adapter_path: Optional[str] = AdapterPath,
):
    """Encode a long system prompt once and save its KV cache, for --prompt-cache-file on generate, chat and serve.

    The file's text is a system prompt: the cache holds the chat template's rendering of the system turn,
    which starts every conversation with that system prompt (and the same --tools and --think, which the
    template may render there too). generate and chat use the file's system prompt unless given --system.
    """
    import time

    import mlx.core as mx

    from mlx_diffgemma.generate import prefill
    from mlx_diffgemma.prompt_cache import save_prompt_cache, system_prefix

    if output.suffix != ".safetensors":
        fail(f"-o must name a .safetensors file, got {output}")
    if not output.parent.is_dir():
        fail(f"-o: folder {output.parent} does not exist")
    if raw and (think is not None or tools is not None):
        fail("--tools and --think/--no-think need the chat template; leave out --raw")
    text = read_text_file(prompt_file, "--prompt-file")
    tool_list = read_tools(tools)
    model = resolve_model(model, adapter_path)
    model_obj, tokenizer = load_or_fail(model, adapter_path=adapter_path)
    if not raw and not tokenizer.has_chat_template:
        fail(f"{model} has no chat template: cache plain text with --raw")
    ids = list(tokenizer.encode(text)) if raw else system_prefix(tokenizer, text, tools=tool_list, enable_thinking=think)
    if len(ids) >= model_obj.args.max_position_embeddings:
        fail(f"{len(ids)} prompt tokens fill the model's context of {model_obj.args.max_position_embeddings}")
    cache = model_obj.make_cache()
    tic = time.perf_counter()
    prefill(model_obj, mx.array([ids]), cache)
    seconds = time.perf_counter() - tic
    try:
        save_prompt_cache(output, model_obj, cache, ids, None if raw else text)
    except (OSError, RuntimeError) as e:
        fail(f"cannot write {output}: {e}")
    typer.echo(f"{len(ids)} tokens encoded in {seconds:.2f} s; cache written to {output}", err=True)


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Folder or hub id of the original checkpoint."),
    mlx_path: str = typer.Option(..., "--mlx-path", help="Output folder (created; must be empty unless --force)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Weight dtype: bfloat16, float16 or float32 (default: the checkpoint's own)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize (the uniform recipe unless --recipe)."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Bits per weight for uniform quantization (default: the mode's)."),
    q_group_size: Optional[int] = typer.Option(None, "--q-group-size", help="Weights per quantization group (default: the mode's)."),
    q_mode: str = typer.Option("affine", "--q-mode", help=f"Quantization mode: {'; '.join(describe_mode(m) for m in MODES)}."),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", help="uniform, or mixed_L_H (mixed_4_8 = the community 4-bit layout: experts at L bits; "
        "embeddings, attention, dense MLP and router at H bits). Implies -q."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
):
    """Convert a checkpoint to MLX format, optionally quantized, shard by shard."""
    from mlx_diffgemma.convert import convert as run_convert

    try:
        out = run_convert(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                          q_mode=q_mode, recipe=recipe, force=force)
    except (ValueError, OSError) as e:  # RecipeError and CheckpointError among them
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        raise typer.Exit(130)
    typer.echo(f"wrote {out}")


@app.command()
def finetune(
    model: Optional[str] = ModelOption,
    data: str = typer.Option(..., "--data", help="JSONL of {prompt, completion} (or {messages}) lines, or a folder with train.jsonl and valid.jsonl."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Where checkpoints go (default: adapters with --lora, else finetuned)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters on the attention and dense-MLP projections instead of every weight."),
    iters: int = typer.Option(1000, "--iters", help="Training steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per step."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", help="Peak learning rate (AdamW, cosine decay to a tenth)."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    self_conditioning: float = typer.Option(0.5, "--self-conditioning", help="Fraction of each batch trained with self-conditioning."),
    max_seq_length: int = typer.Option(2048, "--max-seq-length", help="Prefix tokens kept before the target canvas."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank."),
    lora_scale: float = typer.Option(20.0, "--lora-scale", help="LoRA scale."),
    lora_layers: int = typer.Option(-1, "--lora-layers", help="Adapt the last N layers (-1: all)."),
    steps_per_report: int = typer.Option(10, "--steps-per-report", help="Steps between training-loss reports."),
    steps_per_eval: int = typer.Option(100, "--steps-per-eval", help="Steps between validation losses."),
    val_batches: int = typer.Option(8, "--val-batches", help="Batches per validation."),
    save_every: int = typer.Option(100, "--save-every", help="Steps between checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed for batches and noise."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --output."),
):
    """Fine-tune with the block-diffusion objective (full or LoRA); checkpoints can be loaded and resumed."""
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mlx_diffgemma.train import DataError, TrainingArgs, load_datasets, train
    from mlx_diffgemma.utils import CheckpointError, get_model_path

    try:
        args = TrainingArgs(
            iters=iters, batch_size=batch_size, learning_rate=learning_rate, warmup=warmup, weight_decay=weight_decay,
            self_conditioning=self_conditioning, max_seq_length=max_seq_length, lora=lora, lora_rank=lora_rank,
            lora_scale=lora_scale, lora_layers=lora_layers, steps_per_report=steps_per_report,
            steps_per_eval=steps_per_eval, val_batches=val_batches, save_every=save_every, seed=seed,
        )
    except ValueError as e:
        fail(str(e))
    out = Path(output or ("adapters" if lora else "finetuned"))
    if out.exists() and not resume and any(out.iterdir()):
        fail(f"{out} is not empty; pass --resume to continue its run, or choose another --output")
    model = resolve_model(model)
    model_obj, tokenizer = load_or_fail(model)
    try:
        train_set, val_set = load_datasets(Path(data), tokenizer)
    except DataError as e:
        fail(str(e))
    console = Console(highlight=False)
    console.print(f"{len(train_set)} training examples, {len(val_set or [])} validation; writing to {out}")
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    events = train(model_obj, train_set, val_set, args, get_model_path(model), out,
                   eos=tokenizer.eos_token_id,
                   pad=model_obj.args.pad_token_id or 0, resume=resume)
    try:
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
            task = progress.add_task("training", total=iters, status="")
            status = {}
            for report in events:
                if report.train_loss is not None:
                    status["loss"] = f"loss {report.train_loss:.3f}  {report.tokens_per_sec:.0f} tok/s"
                if report.val_loss is not None:
                    status["val"] = f"val {report.val_loss:.3f}"
                if console.is_terminal:
                    progress.update(task, completed=report.step, status="  ".join(status.values()))
                    if report.val_loss is not None:
                        progress.console.print(f"step {report.step}: validation loss {report.val_loss:.4f}")
                else:  # a log file: one line per report
                    console.print(f"step {report.step}/{iters}  " + "  ".join(status.values()), soft_wrap=True)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the last checkpoint in {out} is intact (--resume continues it)", err=True)
        raise typer.Exit(130)
    typer.echo(f"saved {out}")


demo_app = typer.Typer(help="Built-in demos that run offline, with nothing to download.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@demo_app.command("sudoku")
def demo_sudoku(
    puzzle: Optional[str] = typer.Option(None, "--puzzle", help="The cells row by row: digits, with 0 or . for empty (spaces and | - + ignored)."),
    difficulty: str = typer.Option("easy", "--difficulty", help="For a generated puzzle: easy, medium or hard (fewer givens)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the generated puzzle and the sampler."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A Sudoku model folder (default: the built-in one)."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Print only the result, without the live denoising view."),
    delay: float = typer.Option(0.15, "--delay", help="Seconds each denoising step stays on screen (the model itself takes milliseconds)."),
):
    """Solve a Sudoku with the built-in DiffusionGemma-architecture model, showing each denoising step."""
    import random
    import time
    from contextlib import nullcontext
    from pathlib import Path

    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    from mlx_diffgemma import sudoku
    from mlx_diffgemma.utils import CheckpointError

    if seed is None:
        seed = random.randrange(2**31)
    try:
        model_obj = sudoku.load_model(Path(model) if model else None)
        n = sudoku.grid_size(model_obj)
        levels = sudoku.DIFFICULTIES[n]
        if puzzle is not None:
            grid = sudoku.parse_grid(puzzle)
            if len(grid) != n * n:
                raise ValueError(f"the model solves {n}x{n} puzzles ({n * n} cells); this one has {len(grid)}")
        elif difficulty not in levels:
            raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(levels)}")
        else:
            grid, _ = sudoku.generate_puzzle(levels[difficulty], random.Random(seed), n)
    except (ValueError, CheckpointError, OSError) as e:
        fail(str(e))
    console = Console(highlight=False)
    console.print(Panel(Text.from_markup(sudoku.render(grid, grid)), title=f"puzzle ({sum(1 for d in grid if d)} givens)", expand=False))

    def view(cells, title):
        return Panel(Text.from_markup(sudoku.render(cells, grid)), title=title, expand=False)

    events, compute = sudoku.solve_stream(model_obj, [grid], seed=seed), 0.0
    with Live(console=console, auto_refresh=False) if not no_draft else nullcontext() as live:
        while True:
            tic = time.perf_counter()
            event = next(events)
            compute += time.perf_counter() - tic
            if isinstance(event, list):
                attempt = event[0]
                break
            if live is not None:
                live.update(view(event[1][0], f"denoising: step {event[0]}"), refresh=True)
                time.sleep(max(0.0, delay))
        verdict = "solved" if attempt.solved else "not solved (the grid breaks a rule or a given)"
        title = f"{verdict}: {attempt.steps} steps, {compute:.2f} s"
        if live is not None:
            live.update(view(attempt.grid, title), refresh=True)
        else:
            console.print(view(attempt.grid, title))
    if not attempt.solved:
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
