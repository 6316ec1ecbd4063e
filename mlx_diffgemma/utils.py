"""Loading checkpoints: hub access, config, weights (HF and MLX layouts), tokenizer."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer_wrapper

from . import host
from .adapters import ADAPTER_CONFIG, ADAPTER_FILE, apply_lora, fuse_lora
from .distributed import shard
from .model import ConfigError, Model, ModelArgs
from .sampler import DiffusionSettings
from .vision import Vision

# What a text-only load needs from a hub snapshot.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
INDEX_FILE = "model.safetensors.index.json"
# Files a checkpoint folder carries besides config and weights (copied by convert and training).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# MLX's CPU backend has no fast quantized matmul: with OpenBLAS, float32 weights run 10-20x faster.
CPU_QUANTIZED_WARNING = (
    "quantized weights run on MLX's CPU backend here, 10-20x slower than float32 weights: expect slow generation"
)

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint folder is missing files or tensors, or they do not fit the config."""


def get_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched with ``snapshot_download``."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder")
        return path
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise CheckpointError(f"{path_or_repo}: no such folder, and not a hub id of the form org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # network, auth, missing repo: one readable line for the user
        raise CheckpointError(f"cannot download {path_or_repo}: {_hub_problem(e)}") from None


def _hub_problem(error: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return "the model is gated: accept its terms on its hub page, then log in with 'hf auth login'"
    if isinstance(error, errors.RepositoryNotFoundError):
        return "no such model on the hub (or it is private: log in with 'hf auth login')"
    if isinstance(error, errors.RevisionNotFoundError):
        return "no such revision on the hub"
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError)):
        return ("it is not in the local cache and the hub cannot be reached (offline?); pass a local model folder "
                "instead, or try the offline demo: mlx-diffgemma demo sudoku")
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return first[:200]


def load_config(model_path: Path) -> dict[str, Any]:
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{model_path} has no config.json: not a model folder")
    return read_json(config_file)


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors shards, checked against the index when there is one."""
    index_file = model_path / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file} is malformed: it needs a 'weight_map' of tensor names to shard files")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_path / n).is_file()]
        if missing:
            raise CheckpointError(f"missing shard(s) listed in {INDEX_FILE}: {', '.join(missing)}")
        return [model_path / n for n in names]
    files = sorted(Path(f) for f in glob.glob(str(model_path / "model*.safetensors")))
    if not files:
        raise CheckpointError(f"no model*.safetensors files in {model_path}")
    return files


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a ``CheckpointError`` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file may be damaged: download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is malformed: expected a JSON object")
    return data


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """The tensors of one file, read lazily; a truncated or damaged file is a ``CheckpointError``."""
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        reason = str(e).split("] ", 1)[-1]  # MLX prefixes its messages with the function name
        raise CheckpointError(f"cannot read {path}: {reason}") from None


def replace_folder(staging: Path, out: Path) -> None:
    """Move a finished ``staging`` folder to ``out``, replacing what was there.

    The old folder is moved aside first and deleted only once the new one is in place; if
    anything (Ctrl-C included) interrupts the swap, the old folder is put back whole.
    """
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    return config.get("quantization") or config.get("quantization_config")


def apply_quantization(model: Model, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Turn the layers the checkpoint stores quantized into quantized layers (per-module overrides honoured)."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: Model, weights: dict[str, mx.array]) -> None:
    """Fail with the names of missing, unexpected or misshapen tensors."""
    expected = dict(tree_flatten(model.parameters()))
    problems = []
    for label, names in (
        ("missing", [k for k in expected if k not in weights]),
        ("unexpected", [k for k in weights if k not in expected]),
    ):
        if names:
            problems.append(f"{len(names)} {label} tensor(s): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    wrong = [
        f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {'; '.join(wrong[:3])}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))


def read_weights(model_path: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder, lazily (``mx.load`` reads a tensor when it is used)."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(model_path):
        weights.update(load_safetensors(file))
    return weights


def load_model(model_path: Path, dtype: mx.Dtype | None = None, group: mx.distributed.Group | None = None) -> Model:
    """Config, model, sanitize, quantize, check, load: the weights are held once.

    With a ``group`` of several ranks the model is sharded before any weight is read,
    and tensors are read one at a time, so each rank holds only its slices.
    """
    config = load_config(model_path)
    if mx.default_device() == mx.cpu:  # the host path's vocabulary-sized buffers (host.py)
        host.keep_freed_memory()
    model = Model(ModelArgs.from_dict(config))
    weights = model.sanitize(read_weights(model_path))
    if (quantization := quantization_config(config)) is not None:
        apply_quantization(model, quantization, weights)
        if mx.default_device() == mx.cpu and (group is None or group.rank() == 0):
            logger.warning(CPU_QUANTIZED_WARNING)
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if group is not None and group.size() > 1:
        shard(model, group)
        for _, value in tree_flatten(model.parameters()):
            mx.eval(value)
    model.generation_defaults = DiffusionSettings.from_generation_config(load_generation_config(model_path))
    if config.get("vision_config") and (group is None or group.size() == 1):
        model.vision = Vision(model_path, config, model.args.hidden_size, dtype)
    if dtype is not None:
        model.set_dtype(dtype)
    # Evaluate the private arrays too (RoPE frequencies): a lazy array is bound to the thread
    # that made it, and a server runs the model from a worker thread.
    private = [v for m in model.modules() for v in m.values() if isinstance(v, mx.array)]
    mx.eval(model.parameters(), private)
    model.eval()
    return model


def load_generation_config(model_path: Path) -> dict[str, Any]:
    gen_file = model_path / "generation_config.json"
    return read_json(gen_file) if gen_file.is_file() else {}


def eos_token_ids(model_path: Path, args: ModelArgs) -> list[int]:
    """End-of-sequence ids: the generation config's when present, else the model config's."""
    eos = load_generation_config(model_path).get("eos_token_id")
    if eos is None:
        return list(args.eos_token_ids)
    return [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer(model_path: Path, args: ModelArgs) -> TokenizerWrapper:
    if not any((model_path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{model_path} has no tokenizer (tokenizer.json or tokenizer.model)")
    eos = eos_token_ids(model_path, args)
    try:
        return load_tokenizer_wrapper(model_path, eos_token_ids=eos)
    except Exception as e:  # tokenizers and sentencepiece raise their own types on damaged files
        raise CheckpointError(f"cannot read the tokenizer in {model_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_adapters(model: Model, adapter_path: Path, fuse: bool = False) -> None:
    """Apply adapters saved by ``finetune --lora`` (``fuse`` folds them into the weights)."""
    config = read_adapter_config(adapter_path)
    if not (adapter_path / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{adapter_path} has no adapters ({ADAPTER_CONFIG} and {ADAPTER_FILE})")
    apply_lora(model, config["num_layers"], config["lora_parameters"])
    weights = load_safetensors(adapter_path / ADAPTER_FILE)
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(f"the adapters in {adapter_path} do not fit this model")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    if fuse:
        fuse_lora(model)
    model.unfreeze()
    model.eval()


def read_adapter_config(adapter_path: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` that ``finetune --lora`` writes beside its adapters."""
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{adapter_path} has no adapters ({ADAPTER_CONFIG} and {ADAPTER_FILE})")
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict) or "num_layers" not in config or "lora_parameters" not in config:
            raise ValueError("it lacks num_layers or lora_parameters")
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not a valid adapter config: {e}") from None
    return config


def load(
    path_or_repo: str | Path,
    dtype: mx.Dtype | None = None,
    revision: str | None = None,
    adapter_path: str | Path | None = None,
    fuse: bool = False,
    group: mx.distributed.Group | None = None,
) -> tuple[Model, TokenizerWrapper]:
    """Load a DiffusionGemma checkpoint (local folder or hub id) and its tokenizer.

    Reads the original HF layout and MLX layouts, quantized ones included. ``adapter_path``
    applies LoRA adapters written by ``finetune --lora``; ``fuse`` folds them into the weights.
    ``group`` (from ``mx.distributed.init()``) shards the model across its ranks.
    """
    model_path = get_model_path(path_or_repo, revision)
    if adapter_path is not None and group is not None and group.size() > 1:
        raise ValueError("adapters cannot be applied to a sharded model; fuse them first (load(..., fuse=True) and save)")
    model = load_model(model_path, dtype, group)
    if adapter_path is not None:
        load_adapters(model, Path(adapter_path), fuse=fuse)
    return model, load_tokenizer(model_path, model.args)


__all__ = ["CheckpointError", "ConfigError", "get_model_path", "load", "load_config", "load_model", "load_tokenizer"]
