"""Block-diffusion fine-tuning: the objective DiffusionGemma is sampled with, as a loss.

Sampling (``generate.py``) encodes the prompt and every committed canvas causally into
the cache, then denoises the next canvas from uniformly random tokens: each step
predicts every position, keeps the confident ones and puts fresh uniform tokens on the
rest, feeding its own softened prediction back in (self-conditioning). Training mirrors
that, per example:

1. pick one canvas-sized block of the completion (the completion ends with EOS and is
   padded with the pad id to whole canvases); the prompt and the blocks before it are
   the clean, causally encoded prefix;
2. draw a noise level ``t ~ U(0, 1)`` and replace each token of the block with a
   uniformly random token with probability ``t`` (the uniform-noise corruption of
   discrete diffusion, arXiv:2107.03006; block diffusion over a clean prefix,
   arXiv:2503.09573);
3. the denoiser predicts the clean block: cross-entropy over all its positions
   (unweighted: the sampler asks for every position at every step);
4. for a fraction of the batch, first run the denoiser without gradient and feed its
   prediction, scaled by a temperature from the sampler's range, back in as the
   self-conditioning input (Chen et al., arXiv:2208.04202).

``train`` runs full training or LoRA (mlx-lm's layers) and yields reports; it saves
checkpoints that ``load`` reads (a model folder, or adapters) and that a later run resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from jinja2 import TemplateError
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_model

from . import host
from .adapters import ADAPTER_CONFIG, ADAPTER_FILE, LORA_KEYS, apply_lora
from .model import Model
from .sampler import DiffusionSettings
from .tools import RequestError, template_tool_call
from .utils import TOKENIZER_FILES, CheckpointError, load_config, load_safetensors, read_json, read_weights, replace_folder

STATE_FILE, OPTIMIZER_FILE = "training_state.json", "optimizer.safetensors"


class DataError(ValueError):
    """A training file that cannot be read as prompt/completion examples."""


@dataclass
class Example:
    prompt: list[int]
    completion: list[int]  # without EOS


@dataclass
class TrainingArgs:
    iters: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup: int = 0  # linear warmup steps, then cosine decay to a tenth
    weight_decay: float = 0.0
    self_conditioning: float = 0.5  # fraction of each batch trained with self-conditioning
    max_seq_length: int = 2048  # prefix tokens kept before the target canvas
    lora: bool = False
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_layers: int = -1  # last N layers get adapters; -1 for all
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = 8
    save_every: int = 100
    seed: int = 0
    grad_clip: float = 1.0

    def __post_init__(self):
        for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "val_batches", "save_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if not 0 <= self.self_conditioning <= 1:
            raise ValueError(f"self_conditioning must be in [0, 1] (got {self.self_conditioning})")


@dataclass
class Batch:
    prefix: mx.array  # [B, P], left-padded
    left_padding: list[int]
    targets: mx.array  # [B, C], the clean canvas


@dataclass
class Report:
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_sec: float | None = None  # prefix and canvas tokens through the model
    learning_rate: float | None = None
    saved: Path | None = None


# ---------------------------------------------------------------- data


def template_kwargs(record: dict[str, Any]) -> dict[str, Any]:
    """A record's ``tools`` (function schemas) and ``enable_thinking``, for the chat template."""
    kwargs = {}
    if "tools" in record:
        tools = record["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError("'tools' must be a list of function schemas")
        kwargs["tools"] = tools
    if "enable_thinking" in record:
        if not isinstance(record["enable_thinking"], bool):
            raise DataError("'enable_thinking' must be true or false")
        kwargs["enable_thinking"] = record["enable_thinking"]
    return kwargs


def encode_example(tokenizer, record: dict[str, Any]) -> Example:
    """A prompt/completion record (or chat ``messages`` ending with the assistant's) as token ids.

    The prompt goes through the chat template when the tokenizer has one, as ``generate`` does,
    with the record's ``tools`` and ``enable_thinking`` when it has them. An assistant reply with
    ``tool_calls`` is written as the template writes it (the calls in the model's own syntax).
    """
    reply = None
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages) \
                or messages[-1].get("role") != "assistant":
            raise DataError("'messages' must be objects ending with an assistant message")
        messages = [with_call_arguments(m) for m in messages]
        prompt, reply = messages[:-1], messages[-1]
        if not prompt:
            raise DataError("'messages' need a message before the assistant's")
        completion = reply.get("content") or ""
        if not isinstance(completion, str):
            raise DataError("the assistant message's 'content' must be a string")
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if getattr(tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
    else:
        raise DataError("each line needs 'prompt' and 'completion' (or 'messages')")
    kwargs = template_kwargs(record)
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("'messages' need a chat template, which the tokenizer lacks")
        prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **kwargs))
    elif kwargs:
        raise DataError(f"{' and '.join(repr(k) for k in kwargs)} need a chat template, which the tokenizer lacks")
    else:
        prompt_ids = list(tokenizer.encode(prompt))
    if reply is not None and reply.get("tool_calls"):
        completion_ids = rendered_reply(tokenizer, prompt, reply, kwargs)
    else:
        completion_ids = list(tokenizer.encode(completion, add_special_tokens=False))
    if not prompt_ids or not completion_ids:
        raise DataError("empty prompt or completion")
    return Example(prompt_ids, completion_ids)


def with_call_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its tool calls as chat templates take them: arguments as objects, which
    OpenAI data holds as JSON strings."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    if not isinstance(calls, list):
        raise DataError("'tool_calls' must be a list of {'type': 'function', 'function': {...}}")
    try:
        return {**message, "tool_calls": [template_tool_call(c, f"tool_calls[{j}]", with_id=False) for j, c in enumerate(calls)]}
    except RequestError as e:
        raise DataError(str(e)) from None


def rendered_reply(tokenizer, prompt: list[dict[str, Any]], reply: dict[str, Any], kwargs: dict[str, Any]) -> list[int]:
    """The tokens the chat template writes for the assistant ``reply`` after the model's turn
    header: the conversation rendered with the reply, less the conversation before it and the
    tokens of the generation prompt that the rendering repeats (Gemma 4's template opens the turn
    with ``<|turn>model\n`` in both, and adds an empty thought only to the generation prompt)."""
    before = tokenizer.apply_chat_template(prompt, tokenize=False, **kwargs)
    header = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)[len(before):]
    text = tokenizer.apply_chat_template([*prompt, reply], tokenize=False, **kwargs)
    if not text.startswith(before):
        raise DataError("the chat template writes the earlier messages differently once the reply follows")
    ids = tokenizer.encode(text[len(before):], add_special_tokens=False)
    opening = tokenizer.encode(header, add_special_tokens=False)
    shared = next((i for i, (a, b) in enumerate(zip(ids, opening)) if a != b), min(len(ids), len(opening)))
    return list(ids[shared:])


def load_examples(path: Path, tokenizer) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(encode_example(tokenizer, json.loads(line)))
        except (ValueError, TemplateError, AttributeError, TypeError) as e:  # DataError and JSON errors included
            raise DataError(f"{path}:{number}: {e}") from None
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


def load_datasets(data: Path, tokenizer) -> tuple[list[Example], list[Example] | None]:
    """``data`` is a JSONL file (training only) or a folder with ``train.jsonl`` and optionally ``valid.jsonl``."""
    if data.is_dir():
        valid = data / "valid.jsonl"
        return load_examples(data / "train.jsonl", tokenizer), load_examples(valid, tokenizer) if valid.is_file() else None
    return load_examples(data, tokenizer), None


def make_batch(examples: Sequence[Example], canvas: int, eos: int, pad: int, max_prefix: int, rng: np.random.Generator) -> Batch:
    """One random canvas-sized block per example, after its clean prefix."""
    prefixes, targets = [], []
    for ex in examples:
        completion = ex.completion + [eos]
        blocks = math.ceil(len(completion) / canvas)
        completion += [pad] * (blocks * canvas - len(completion))
        k = int(rng.integers(blocks))
        prefixes.append((ex.prompt + completion[: k * canvas])[-max_prefix:])
        targets.append(completion[k * canvas : (k + 1) * canvas])
    width = max(len(p) for p in prefixes)
    padding = [width - len(p) for p in prefixes]
    prefix = mx.array([[pad] * n + p for n, p in zip(padding, prefixes)])
    return Batch(prefix, padding, mx.array(targets))


# ---------------------------------------------------------------- objective


def corrupt(targets: mx.array, vocab_size: int, key: mx.array) -> mx.array:
    """Each row gets a noise level ``t ~ U(0, 1)``; each token is replaced by a uniform one with probability ``t``."""
    level_key, where_key, token_key = mx.random.split(key, 3)
    t = mx.random.uniform(shape=(targets.shape[0], 1), key=level_key)
    replace = mx.random.uniform(shape=targets.shape, key=where_key) < t
    return mx.where(replace, mx.random.randint(0, vocab_size, targets.shape, key=token_key), targets)


def _block_loss(model: Model, batch: Batch, rows: slice, noisy: mx.array, self_condition_temperature: float | None):
    cache = model.make_cache(batch.left_padding[rows])
    model.encode(batch.prefix[rows], cache)
    sc = None
    if self_condition_temperature is not None:
        sc = mx.stop_gradient(model.denoise(noisy[rows], cache)) / self_condition_temperature
    logits = model.denoise(noisy[rows], cache, sc)
    return nn.losses.cross_entropy(logits, batch.targets[rows], reduction="sum")


def diffusion_loss(
    model: Model, batch: Batch, key: mx.array, self_conditioning: float = 0.5, temperature: float = 0.6
) -> mx.array:
    """Mean cross-entropy of the denoiser's prediction of the clean canvas (see the module docstring).

    The first ``self_conditioning`` fraction of rows get their own detached prediction,
    divided by ``temperature`` as the sampler does, as self-conditioning input.
    """
    noisy = corrupt(batch.targets, model.args.vocab_size, key)
    rows = batch.targets.shape[0]
    with_sc = round(rows * self_conditioning)
    total = mx.array(0.0)
    if with_sc:
        total = total + _block_loss(model, batch, slice(0, with_sc), noisy, temperature)
    if with_sc < rows:
        total = total + _block_loss(model, batch, slice(with_sc, rows), noisy, None)
    return total / batch.targets.size


# ---------------------------------------------------------------- adapters and checkpoints


def lora_config(args: TrainingArgs) -> dict[str, Any]:
    return {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0, "keys": list(LORA_KEYS)}


def save_checkpoint(model: Model, base: Path, out: Path, args: TrainingArgs, step: int, optimizer: optim.Optimizer, history: list[dict]) -> None:
    """Write what a run needs to be used (a model folder, or adapters) and resumed, atomically."""
    staging = out.parent / f".{out.name}.saving"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_checkpoint(model, base, staging, args, step, optimizer, history)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_checkpoint(model: Model, base: Path, staging: Path, args: TrainingArgs, step: int,
                      optimizer: optim.Optimizer, history: list[dict]) -> None:
    if args.lora:
        mx.save_safetensors(str(staging / ADAPTER_FILE), dict(tree_flatten(model.trainable_parameters())))
        layers = len(model.layers) if args.lora_layers < 0 else args.lora_layers
        config = {"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora_config(args), "base_model": str(base)}
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    else:
        save_model(staging, model)
        (staging / "config.json").write_text(json.dumps(load_config(base), indent=2))
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy(base / name, staging / name)
    mx.save_safetensors(str(staging / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
    state = {"step": step, "args": asdict(args), "history": history}
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))


# ---------------------------------------------------------------- the loop


def _schedule(args: TrainingArgs):
    decay = optim.cosine_decay(args.learning_rate, max(1, args.iters - args.warmup), args.learning_rate / 10)
    if args.warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(args.learning_rate / 100, args.learning_rate, args.warmup), decay], [args.warmup])


def _random_batch(examples: Sequence[Example], args: TrainingArgs, model: Model, eos: int, pad: int, rng: np.random.Generator) -> Batch:
    picks = rng.integers(len(examples), size=args.batch_size)
    return make_batch([examples[i] for i in picks], model.args.canvas_length, eos, pad, args.max_seq_length, rng)


def _temperature(rng: np.random.Generator) -> float:
    """A self-conditioning temperature from the sampler's default range."""
    settings = DiffusionSettings()
    return float(rng.uniform(settings.t_min, settings.t_max))


def evaluate(model: Model, examples: Sequence[Example], args: TrainingArgs, eos: int, pad: int) -> float:
    """Validation loss on fixed batches with fixed noise, so values are comparable across a run."""
    rng = np.random.default_rng(args.seed + 1)
    key = mx.random.key(args.seed + 1)
    losses = []
    for i in range(args.val_batches):
        batch = _random_batch(examples, args, model, eos, pad, rng)
        loss = diffusion_loss(model, batch, mx.random.split(key, args.val_batches)[i], args.self_conditioning, _temperature(rng))
        losses.append(loss.item())
    return float(np.mean(losses))


def train(
    model: Model,
    train_set: Sequence[Example],
    val_set: Sequence[Example] | None,
    args: TrainingArgs,
    base: Path,
    out: Path,
    eos: int,
    pad: int,
    resume: bool = False,
) -> Iterator[Report]:
    """Train ``model`` in place, yielding reports; checkpoints go to ``out`` (replaced each time).

    With ``resume``, ``out`` must hold a checkpoint of the same run: its weights or
    adapters, optimizer state and step are restored, and batches continue where they stopped.
    """
    if args.lora:
        apply_lora(model, args.lora_layers, lora_config(args))
    optimizer = optim.AdamW(learning_rate=_schedule(args), weight_decay=args.weight_decay)
    start, history = 0, []
    if resume:
        start, history = _restore(model, optimizer, out, args)
    model.train()
    loss_and_grad = nn.value_and_grad(model, diffusion_loss)
    tokens, losses, tic = 0, [], time.perf_counter()
    for step in range(start + 1, args.iters + 1):
        rng = np.random.default_rng([args.seed, step])
        batch = _random_batch(train_set, args, model, eos, pad, rng)
        key = mx.random.key(args.seed * 1_000_003 + step)
        with host.disabled():  # the CPU path's numpy math would cut the gradient
            loss, grads = loss_and_grad(model, batch, key, args.self_conditioning, _temperature(rng))
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        losses.append(loss.item())
        tokens += batch.prefix.size + batch.targets.size
        report = Report(step)
        if step % args.steps_per_report == 0 or step == args.iters:
            elapsed = time.perf_counter() - tic
            report.train_loss, report.tokens_per_sec = float(np.mean(losses)), tokens / elapsed
            report.learning_rate = float(optimizer.learning_rate.item())
            tokens, losses, tic = 0, [], time.perf_counter()
        if val_set and (step % args.steps_per_eval == 0 or step == args.iters):
            model.eval()
            report.val_loss = evaluate(model, val_set, args, eos, pad)
            model.train()
        if report.train_loss is not None or report.val_loss is not None:
            history.append({"step": step, "train_loss": report.train_loss, "val_loss": report.val_loss})
        if step % args.save_every == 0 or step == args.iters:
            save_checkpoint(model, base, out, args, step, optimizer, history)
            report.saved = out
        if report.val_loss is not None or report.train_loss is not None or report.saved:
            yield report
        if report.val_loss is not None or report.saved:
            tic = time.perf_counter()  # evaluation and saving are not training throughput
    model.eval()


def _restore(model: Model, optimizer: optim.Optimizer, out: Path, args: TrainingArgs) -> tuple[int, list[dict]]:
    state_file = out / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"nothing to resume: {out} has no {STATE_FILE}")
    state = read_json(state_file)
    if bool(state["args"].get("lora")) != args.lora:
        raise CheckpointError(f"{out} was trained {'with' if state['args'].get('lora') else 'without'} --lora")
    weights = load_safetensors(out / ADAPTER_FILE) if args.lora else read_weights(out)
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(load_safetensors(out / OPTIMIZER_FILE).items()))
    mx.eval(model.parameters(), optimizer.state)
    return state["step"], state.get("history", [])
