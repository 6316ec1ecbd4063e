"""Quantization recipes: which module gets which bits, as a predicate over module paths."""

from __future__ import annotations

import re
from collections.abc import Callable

from mlx_diffgemma.model import is_sensitive

# Supported (group sizes, bits) per MLX quantization mode.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "mxfp8": ((32,), (8,)),
    "nvfp4": ((16,), (4,)),
}
RECIPES = ("uniform", "mixed_2_6", "mixed_3_6", "mixed_3_8", "mixed_4_6", "mixed_4_8")
SENSITIVE_GROUP_SIZE = 64

Params = dict[str, int | str]
Predicate = Callable[[str, tuple[int, ...]], Params | None]


class RecipeError(ValueError):
    """An unknown recipe or an unsupported bits / group size / mode combination."""


def check_mode(mode: str, bits: int, group_size: int) -> None:
    if mode not in MODES:
        raise RecipeError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    sizes, widths = MODES[mode]
    if bits not in widths:
        raise RecipeError(f"{mode} quantization supports {', '.join(map(str, widths))} bits, not {bits}")
    if group_size not in sizes:
        raise RecipeError(f"{mode} quantization supports group sizes {', '.join(map(str, sizes))}, not {group_size}")


def make_predicate(recipe: str, bits: int, group_size: int, mode: str = "affine") -> tuple[Predicate, Params]:
    """The per-module choice and the default parameters that go in the config.

    ``uniform``: every quantizable module at ``bits``. ``mixed_L_H``: the routed experts (and
    the self-conditioning MLP) at L bits in ``mode``; the sensitive modules at H-bit affine.
    The predicate takes a module path and its weight shape; ``None`` keeps the module as is
    (its input width does not divide into groups).
    """
    if recipe == "uniform":
        check_mode(mode, bits, group_size)
        default = {"group_size": group_size, "bits": bits, "mode": mode}
        return (lambda path, shape: default if shape[-1] % group_size == 0 else None), default
    match = re.fullmatch(r"mixed_(\d)_(\d)", recipe)
    if recipe not in RECIPES or match is None:
        raise RecipeError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    low, high = int(match.group(1)), int(match.group(2))
    check_mode(mode, low, group_size)
    default = {"group_size": group_size, "bits": low, "mode": mode}
    sensitive = {"group_size": SENSITIVE_GROUP_SIZE, "bits": high, "mode": "affine"}

    def predicate(path: str, shape: tuple[int, ...]) -> Params | None:
        params = sensitive if is_sensitive(path) else default
        return params if shape[-1] % params["group_size"] == 0 else None

    return predicate, default
