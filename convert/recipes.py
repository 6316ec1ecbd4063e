"""Quantization recipes: which module gets which bits, as a predicate over module paths."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from mlx_diffgemma.model import is_sensitive


class ModeSpec(NamedTuple):
    """What ``mx.quantize`` accepts in one mode, and what it uses when bits or group size are not given."""

    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    default_bits: int
    default_group_size: int


# The quantization modes of MLX 0.32 (the table in ``mx.quantize``'s docstring, checked by the tests).
MODES: dict[str, ModeSpec] = {
    "affine": ModeSpec((1, 2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64),
    "mxfp4": ModeSpec((4,), (32,), 4, 32),
    "mxfp8": ModeSpec((8,), (32,), 8, 32),
    "nvfp4": ModeSpec((4,), (16,), 4, 16),
}
RECIPES = ("uniform", "mixed_2_6", "mixed_3_6", "mixed_3_8", "mixed_4_6", "mixed_4_8")
SENSITIVE_GROUP_SIZE = 64

Params = dict[str, int | str]
Predicate = Callable[[str, tuple[int, ...]], Params | None]


class RecipeError(ValueError):
    """An unknown recipe or an unsupported bits / group size / mode combination."""


def _choices(values: tuple[int, ...], default: int) -> str:
    if len(values) == 1:
        return str(values[0])
    return f"{', '.join(map(str, values[:-1]))} or {values[-1]} (default {default})"


def describe_mode(mode: str) -> str:
    """One line for errors and ``--help``, e.g. ``mxfp4 takes bits 4 and group size 32``."""
    spec = MODES[mode]
    return (f"{mode} takes bits {_choices(spec.bits, spec.default_bits)} "
            f"and group size {_choices(spec.group_sizes, spec.default_group_size)}")


def resolve_mode(mode: str, bits: int | None, group_size: int | None) -> tuple[int, int]:
    """Bits and group size for ``mode``, the mode's own defaults where not given."""
    if mode not in MODES:
        raise RecipeError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    spec = MODES[mode]
    bits = spec.default_bits if bits is None else bits
    group_size = spec.default_group_size if group_size is None else group_size
    if bits not in spec.bits or group_size not in spec.group_sizes:
        raise RecipeError(f"MLX cannot quantize {mode} at {bits} bits with group size {group_size}; {describe_mode(mode)}")
    return bits, group_size


def make_predicate(recipe: str, bits: int | None, group_size: int | None, mode: str = "affine") -> tuple[Predicate, Params]:
    """The per-module choice and the default parameters that go in the config.

    ``uniform``: every quantizable module at ``bits``. ``mixed_L_H``: the routed experts (and
    the self-conditioning MLP) at L bits in ``mode``; the sensitive modules at H-bit affine.
    Bits and group size left as ``None`` are the mode's defaults. The predicate takes a module
    path and its weight shape; ``None`` keeps the module as is (its input width does not divide
    into groups).
    """
    if recipe == "uniform":
        bits, group_size = resolve_mode(mode, bits, group_size)
        default = {"group_size": group_size, "bits": bits, "mode": mode}
        return (lambda path, shape: default if shape[-1] % group_size == 0 else None), default
    match = re.fullmatch(r"mixed_(\d)_(\d)", recipe)
    if recipe not in RECIPES or match is None:
        raise RecipeError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if bits is not None:
        raise RecipeError(f"recipe {recipe} sets its own bits; drop --q-bits")
    low, high = int(match.group(1)), int(match.group(2))
    low, group_size = resolve_mode(mode, low, group_size)
    default = {"group_size": group_size, "bits": low, "mode": mode}
    sensitive = {"group_size": SENSITIVE_GROUP_SIZE, "bits": high, "mode": "affine"}

    def predicate(path: str, shape: tuple[int, ...]) -> Params | None:
        params = sensitive if is_sensitive(path) else default
        return params if shape[-1] % params["group_size"] == 0 else None

    return predicate, default
