"""Checkpoint conversion and quantization to MLX format (``mlx-diffgemma convert``)."""

from .converter import DTYPES, convert
from .recipes import MODES, RECIPES, RecipeError, describe_mode

__all__ = ["DTYPES", "MODES", "RECIPES", "RecipeError", "convert", "describe_mode"]
