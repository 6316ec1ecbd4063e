"""Convert a DiffusionGemma checkpoint to MLX format, shard by shard.

The output is the layout MLX conversions on the hub use: ``model-0000k-of-0000n.safetensors``
with an index, ``config.json`` with a ``quantization`` block (defaults plus per-module
overrides), tokenizer and processor files, the generation config and a model card. The vision
tower is kept as mlx-vlm's conversions keep it: same names, cast but never quantized, so
mlx-vlm loads the folder too. It is written to a hidden folder beside the target and moved
into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_diffgemma.model import VISION_PREFIXES, Model, ModelArgs
from mlx_diffgemma.utils import (
    INDEX_FILE,
    TOKENIZER_FILES,
    CheckpointError,
    get_model_path,
    load_config,
    load_safetensors,
    quantization_config,
    replace_folder,
    weight_files,
)

from .recipes import Params, Predicate, RecipeError, make_predicate

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DEFAULT_SHARD_BYTES = 5 * 2**30
# Image preprocessing settings, read by vision.py (and mlx-vlm) beside the weights.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class ShardWriter:
    """Collects output tensors and writes a shard whenever ``max_bytes`` is reached."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, value: mx.array) -> None:
        mx.eval(value)
        self.pending[name] = value
        self.pending_bytes += value.nbytes
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        mx.save_safetensors(str(self.folder / f"shard-{len(self.shards)}.safetensors"), self.pending, metadata={"format": "mlx"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards ``model-0000k-of-0000n`` and write the index; returns the total bytes."""
        self.flush()
        weight_map, total = {}, 0
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / f"shard-{i}.safetensors").rename(self.folder / final)
            total += (self.folder / final).stat().st_size
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return total


def quantizable_modules(model: Model) -> dict[str, Any]:
    return {path: module for path, module in model.named_modules() if hasattr(module, "to_quantized")}


def read_tensor(file: Path, value: mx.array) -> None:
    """Evaluate a lazily loaded tensor; data cut short shows only now, and the error must name the file."""
    try:
        mx.eval(value)
    except RuntimeError as e:
        reason = str(e).split("] ", 1)[-1].rstrip(".")  # MLX prefixes its messages with the function name
        raise CheckpointError(f"cannot read {file}: {reason}; the file may be incomplete: download it again") from None


def source_tensors(model: Model, file: Path, keep_tower: bool) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """One shard's tensors, lazily: the text model's (sanitized) and, if kept, the vision tower's."""
    weights = load_safetensors(file)
    tower = {k: v for k, v in weights.items() if k.startswith(VISION_PREFIXES)} if keep_tower else {}
    return model.sanitize(weights), tower


def convert_tensors(
    files: list[Path], model: Model, dtype: mx.Dtype, predicate: Predicate | None, writer: ShardWriter,
    keep_tower: bool,
) -> Iterator[tuple[int, dict[str, Params | None]]]:
    """Cast (and quantize) each tensor in turn; yields source bytes done and the per-module
    quantization chosen so far (``None`` for a module left as is). Only one input shard is open
    at a time. The vision tower's tensors are cast and never quantized (mlx-vlm's conversions
    leave every multimodal module unquantized)."""
    modules = quantizable_modules(model)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    seen: set[str] = set()
    chosen: dict[str, Params | None] = {}
    for file in files:
        tensors, tower = source_tensors(model, file, keep_tower)
        for name, value in tower.items():
            read_tensor(file, value)
            writer.add(name, value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value)
            yield value.nbytes, chosen
        for name, value in tensors.items():
            if name not in expected:
                raise CheckpointError(f"{file.name}: unexpected tensor {name}")
            if tuple(value.shape) != tuple(expected[name]):
                raise CheckpointError(f"{file.name}: {name} has shape {tuple(value.shape)}, expected {tuple(expected[name])}")
            seen.add(name)
            read_tensor(file, value)
            path, _, leaf = name.rpartition(".")
            quantizable = predicate is not None and leaf == "weight" and path in modules
            params = predicate(path, value.shape) if quantizable else None
            if quantizable:
                chosen[path] = params
            if params is None:
                writer.add(name, value.astype(dtype))
            else:
                q = mx.quantize(value.astype(dtype), params["group_size"], params["bits"], mode=params["mode"])
                for suffix, array in zip(("weight", "scales", "biases"), q):
                    writer.add(f"{path}.{suffix}", array)
            yield value.nbytes, chosen
        del tensors, tower
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:5])}")


def quantization_block(default: Params, chosen: dict[str, Params | None]) -> dict[str, Any]:
    """Defaults, then the modules whose parameters differ from them."""
    block: dict[str, Any] = dict(default)
    block.update({path: params for path, params in sorted(chosen.items()) if params is not None and params != default})
    return block


def module_patterns(paths: list[str]) -> str:
    """``a.0.b, a.1.b`` as ``a.*.b`` (2 modules): a short list for the model card."""
    counts = Counter(re.sub(r"\.\d+\.", ".*.", path) for path in paths)
    return ", ".join(f"`{p}`" + (f" ({n} modules)" if n > 1 else "") for p, n in sorted(counts.items()))


def precision_lines(dtype: str, quantization: dict[str, Any] | None, recipe: str | None, skipped: list[str]) -> list[str]:
    if quantization is None:
        return [f"Weights: {dtype}, not quantized."]
    scales = "scales, biases and " if quantization["mode"] == "affine" else ""
    lines = [f"Weights: {quantization['bits']}-bit {quantization['mode']} (group size {quantization['group_size']})"
             f"{f', recipe {recipe}' if recipe else ''}; {scales}the unquantized tensors in {dtype}."]
    overrides = Counter((p["bits"], p["mode"], p["group_size"]) for p in quantization.values() if isinstance(p, dict))
    if overrides:
        described = "; ".join(f"{b}-bit {m} (group size {g}) for {n} modules" for (b, m, g), n in sorted(overrides.items()))
        lines.append(f"Per-module overrides (listed in config.json): {described}.")
    if skipped:
        lines.append(f"Left unquantized, their input size not a multiple of the group size: {module_patterns(skipped)}.")
    return lines


def model_card(source: str, dtype: str, quantization: dict[str, Any] | None, recipe: str | None,
               skipped: list[str], size: int, tower: bool) -> str:
    precision = "\n".join(f"- {line}" for line in precision_lines(dtype, quantization, recipe, skipped))
    vision = (f"Vision tower included, in {dtype} (not quantized, as in mlx-vlm's conversions): images work here and in mlx-vlm."
              if tower else "Text only: the source checkpoint has no vision tower.")
    return f"""---
library_name: mlx
license: apache-2.0
base_model: {source}
tags: [mlx, diffusion_gemma, text-diffusion]
---

# {source} for MLX

Converted with `mlx-diffgemma convert` from `{source}`.

{precision}
- {size / 2**30:.2f} GiB on disk.
- {vision}

```bash
mlx-diffgemma chat --model <this folder or repo>
```
"""


def check_paths(source: Path, out: Path, force: bool) -> None:
    source, out = source.resolve(), out.resolve()
    if out == source or source in out.parents:
        raise CheckpointError(f"output folder {out} is inside the input folder {source}")
    if out in source.parents:
        raise CheckpointError(f"output folder {out} contains the input folder {source}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} is not empty; pass --force to replace it")


def check_unused_flags(q_bits: int | None, q_group_size: int | None, q_mode: str) -> None:
    """Quantization settings without quantization would be silently ignored: refuse them."""
    for flag, given in (("--q-bits", q_bits is not None), ("--q-group-size", q_group_size is not None),
                        ("--q-mode", q_mode != "affine")):
        if given:
            raise RecipeError(f"{flag} needs -q (or --recipe)")


def checkpoint_dtype(source: Path, config: dict[str, Any], tensors: list[mx.array]) -> str:
    """The checkpoint's own dtype: its config's ``dtype`` (``torch_dtype`` in older files), else
    that of most of its floating-point weights."""
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if section.get(key) in DTYPES:
                return section[key]
    counts: Counter[mx.Dtype] = Counter()
    for value in tensors:
        if mx.issubdtype(value.dtype, mx.floating):
            counts[value.dtype] += value.size
    names = {v: k for k, v in DTYPES.items()}
    most = counts.most_common(1)[0][0] if counts else None
    if most not in names:
        raise CheckpointError(f"cannot tell the dtype of {source} from its config or weights; pass --dtype")
    return names[most]


def output_config(config: dict[str, Any], dtype: str, quantization: dict[str, Any] | None, tower: bool) -> dict[str, Any]:
    """The source config without stale dtype and quantization fields; ``vision_config`` only if
    the tower was written (mlx-vlm builds a tower for it and wants its weights)."""
    dropped = ("quantization", "quantization_config", "torch_dtype", *(() if tower else ("vision_config",)))
    out = {k: v for k, v in config.items() if k not in dropped}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k not in ("dtype", "torch_dtype")}
    out["dtype"] = dtype
    if quantization is not None:
        out["quantization"] = out["quantization_config"] = quantization
    return out


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    recipe: str | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert ``hf_path`` (folder or hub id) into an MLX folder at ``mlx_path``.

    ``dtype`` ``None`` keeps the checkpoint's own (as its config states, else as its weights are
    stored). ``quantize`` alone is the ``uniform`` recipe; a ``recipe`` implies quantization
    (``mixed_L_H`` sets its own bits). ``q_bits`` and ``q_group_size`` left as ``None`` are the
    defaults of ``q_mode`` (``recipes.MODES``); given without quantizing they are an error.
    Nothing is left behind on failure.
    """
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    predicate, default = None, None
    if quantize or recipe is not None:
        predicate, default = make_predicate(recipe or "uniform", q_bits, q_group_size, q_mode)
    else:
        check_unused_flags(q_bits, q_group_size, q_mode)
    out = Path(mlx_path).expanduser()
    local = Path(hf_path).expanduser()
    if local.exists():
        check_paths(local, out, force)
    source = get_model_path(hf_path)
    check_paths(source, out, force)
    config = load_config(source)
    model = Model(ModelArgs.from_dict(config))  # a skeleton: its random weights are never evaluated
    if quantization_config(config):
        raise CheckpointError(f"{source} is already quantized; convert from the original checkpoint")
    files = weight_files(source)
    keep_tower = bool(config.get("vision_config"))
    # Loading is lazy: this reads only the headers, so a damaged one stops us before anything is written.
    parts = [source_tensors(model, f, keep_tower) for f in files]
    headers = [v for text, tower in parts for v in (*text.values(), *tower.values())]
    has_tower = any(tower for _, tower in parts)
    dtype = dtype or checkpoint_dtype(source, config, headers)
    total_bytes, total_tensors = sum(v.nbytes for v in headers), len(headers)
    del parts, headers

    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        writer = ShardWriter(staging, max_shard_bytes)
        chosen: dict[str, Params | None] = {}
        with progress_bar(progress, total_bytes, total_tensors) as advance:
            for done, chosen in convert_tensors(files, model, DTYPES[dtype], predicate, writer, keep_tower):
                advance(done)
        size = writer.finish()
        quantization = quantization_block(default, chosen) if default is not None else None
        (staging / "config.json").write_text(json.dumps(output_config(config, dtype, quantization, has_tower), indent=2))
        for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
            if (source / name).is_file():
                shutil.copy(source / name, staging / name)
        skipped = sorted(path for path, params in chosen.items() if params is None)
        (staging / "README.md").write_text(model_card(str(hf_path), dtype, quantization, recipe, skipped, size, has_tower))
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            with suppress(OSError):
                folder.rmdir()
        raise
    return out


@contextmanager
def progress_bar(enabled: bool, total_bytes: int, total_tensors: int):
    """A rich progress bar over source bytes, counting tensors; yields ``advance(nbytes)``."""
    if not enabled:
        yield lambda nbytes: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(f"0/{total_tensors} tensors", total=total_bytes)
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += 1
            bar.update(task, advance=nbytes, description=f"{done}/{total_tensors} tensors")

        yield advance
