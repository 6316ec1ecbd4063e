"""mlx-diffgemma: Google's DiffusionGemma on Apple Silicon with MLX."""

from .generate import GenerationResponse, batch_generate, generate, stream_generate
from .model import ConfigError, Model, ModelArgs
from .sampler import DiffusionSettings
from .utils import CheckpointError, load

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "DiffusionSettings", "GenerationResponse", "Model", "ModelArgs",
    "batch_generate", "generate", "load", "stream_generate",
]
