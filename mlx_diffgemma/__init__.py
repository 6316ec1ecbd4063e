"""mlx-diffgemma: Google's DiffusionGemma on Apple Silicon with MLX."""

from .model import ConfigError, Model, ModelArgs
from .utils import CheckpointError, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Model", "ModelArgs", "load"]
