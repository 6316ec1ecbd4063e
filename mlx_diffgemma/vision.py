"""Images in: decoding, preprocessing, and the Gemma 4 vision tower.

The tower is mlx-vlm's (``pip install 'mlx-diffgemma[vision]'``), imported and its weights
read from the checkpoint only when the first image arrives, so text-only use costs nothing.
Preprocessing follows the checkpoint's processor config as the reference processor does:
an aspect-preserving bicubic resize to at most ``max_soft_tokens * pooling_kernel_size**2``
patches, pixels rescaled to [0, 1], and patches laid out as ``(row, column, channel)``.
Each image becomes ``boi + image_token * soft_tokens + eoi`` in the prompt; the encoder
pass puts the tower's soft tokens where the image tokens are (``Model.encode``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .model import VISION_PREFIXES

EXTRA_HINT = "images need the vision extra: pip install 'mlx-diffgemma[vision]'"


class ImageError(ValueError):
    """An image that cannot be read, or a model that cannot take it."""


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageError(EXTRA_HINT) from None
    return Image, UnidentifiedImageError


def read_image(source: Any):
    """A decoded RGB ``PIL.Image`` from a path, a ``PIL.Image``, bytes or a ``data:`` URI."""
    Image, Unidentified = _pillow()
    if isinstance(source, Image.Image):
        return _rgb(source)
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "image bytes"
    elif isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ImageError("a data: URI image must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URI image is not valid base64") from None
        name = "the data: URI image"
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{source[:80]}: remote images are not fetched; pass a file, bytes or a data: URI")
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageError(f"{source}: no such image file")
        data, name = path.read_bytes(), str(source)
    else:
        raise ImageError(f"an image must be a path, a PIL.Image, bytes or a data: URI, not {type(source).__name__}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Unidentified:
        raise ImageError(f"{name} is not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name} is a damaged image ({e})") from None
    return _rgb(image)


def _rgb(image):
    """RGB, with any transparency composited onto white (as the reference processor does)."""
    Image, _ = _pillow()
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    image = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


@dataclass
class ImageProcessor:
    """The checkpoint's image preprocessing (``processor_config.json``); defaults are the reference's."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ImageProcessor":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in names})

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The largest size keeping the aspect ratio within the patch budget, each side a
        multiple of ``patch_size * pooling_kernel_size``."""
        side = self.patch_size * self.pooling_kernel_size
        budget = self.max_soft_tokens * self.pooling_kernel_size**2 * self.patch_size**2
        scale = math.sqrt(budget / (height * width))
        h, w = int(math.floor(height * scale / side)) * side, int(math.floor(width * scale / side)) * side
        if h == 0 and w == 0:
            raise ImageError(f"a {width}x{height} image is too small to resize")
        longest = self.max_soft_tokens * side  # a side of max_soft_tokens pooled cells
        if h == 0:
            h, w = side, min(width // height * side, longest)
        elif w == 0:
            h, w = min(height // width * side, longest), side
        return h, w

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Patches ``[N, patch_size**2 * 3]`` (float32) and their ``(x, y)`` positions ``[N, 2]``."""
        Image, _ = _pillow()
        if self.do_resize:
            h, w = self.target_size(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float64)  # in float64 as the reference, then float32
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            pixels = (pixels - np.array(self.image_mean)) / np.array(self.image_std)
        pixels = pixels.astype(np.float32)
        p = self.patch_size
        rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
        patches = pixels[: rows * p, : cols * p].reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        positions = np.stack([xs, ys], axis=-1).reshape(-1, 2)
        return patches.reshape(rows * cols, -1), positions

    def soft_tokens(self, patches: np.ndarray) -> int:
        return patches.shape[0] // self.pooling_kernel_size**2


class VisionTower(nn.Module):
    """mlx-vlm's Gemma 4 vision model and the projection into the text embedding space."""

    def __init__(self, vision_config: dict[str, Any], text_hidden_size: int):
        super().__init__()
        try:
            from mlx_vlm.models.gemma4.config import VisionConfig
            from mlx_vlm.models.gemma4.gemma4 import MultimodalEmbedder
            from mlx_vlm.models.gemma4.vision import VisionModel
        except ImportError:
            raise ImageError(EXTRA_HINT) from None
        config = VisionConfig.from_dict(vision_config)
        self.vision_tower = VisionModel(config)
        self.embed_vision = MultimodalEmbedder(config.hidden_size, text_hidden_size, eps=config.rms_norm_eps)

    def __call__(self, patches: np.ndarray, positions: np.ndarray) -> mx.array:
        """Soft tokens ``[patches / pooling_kernel_size**2, text hidden]`` of one image."""
        hidden = self.vision_tower(mx.array(patches)[None], mx.array(positions)[None])
        return self.embed_vision(hidden)[0]


class Vision:
    """What a checkpoint needs to take images; the tower is built and loaded on first use."""

    def __init__(self, model_path: Path, config: dict[str, Any], text_hidden_size: int, dtype: mx.Dtype | None = None):
        self.model_path, self.config, self.text_hidden_size, self.dtype = model_path, config, text_hidden_size, dtype
        self.image_token_id = config.get("image_token_id", 258_880)
        self.boi_token_id = config.get("boi_token_id", 255_999)
        self.eoi_token_id = config.get("eoi_token_id", 258_882)
        self.processor = ImageProcessor.from_config(processor_config(model_path))
        self.tower: VisionTower | None = None

    def load(self) -> VisionTower:
        if self.tower is not None:
            return self.tower
        from .utils import quantization_config, read_weights

        tower = VisionTower(self.config["vision_config"], self.text_hidden_size)
        weights = {k[len("model.encoder."):]: v for k, v in read_weights(self.model_path).items() if k.startswith(VISION_PREFIXES)}
        if not weights:
            raise ImageError(f"{self.model_path} has no vision tower weights (a text-only conversion): it cannot take images")
        if (quantization := quantization_config(self.config)) is not None:
            nn.quantize(
                tower, group_size=quantization.get("group_size", 64), bits=quantization.get("bits", 4),
                mode=quantization.get("mode", "affine"),
                class_predicate=lambda path, m: hasattr(m, "to_quantized") and f"{path}.scales" in weights,
            )
        expected = dict(tree_flatten(tower.parameters()))
        missing = [k for k in expected if k not in weights]
        if missing:
            raise ImageError(f"the vision tower in {self.model_path} is incomplete: {len(missing)} missing tensor(s), e.g. {missing[0]}")
        tower.load_weights([(k, weights[k]) for k in expected])  # the clipping ranges of unclipped linears are left out
        if self.dtype is not None:
            tower.set_dtype(self.dtype)
        mx.eval(tower.parameters())
        tower.eval()
        self.tower = tower
        return tower

    def expand(self, ids: list[int], counts: list[int]) -> list[int]:
        """``ids`` with the i-th image token replaced by ``boi + image_token * counts[i] + eoi``."""
        found = ids.count(self.image_token_id)
        if found != len(counts):
            raise ImageError(f"the prompt has {found} image placeholder(s) for {len(counts)} image(s)")
        out, index = [], 0
        for t in ids:
            if t == self.image_token_id:
                out += [self.boi_token_id] + [t] * counts[index] + [self.eoi_token_id]
                index += 1
            else:
                out.append(t)
        return out


def attach_images(model, prompts: list[list[int]], sources: list[list[Any]]) -> tuple[list[list[int]], mx.array]:
    """Each prompt's image placeholders expanded to its images' soft tokens, and the soft tokens
    of every image in prompt order (``Model.encode``'s ``image_features``).

    Every image is decoded and the context checked before the tower loads and runs.
    """
    vision = model.vision
    if vision is None:
        raise ImageError("this model takes no images: its checkpoint has no vision tower")
    inputs = [[vision.processor(read_image(s)) for s in row] for row in sources]
    counts = [[vision.processor.soft_tokens(patches) for patches, _ in row] for row in inputs]
    prompts = [vision.expand(ids, row) for ids, row in zip(prompts, counts)]
    context = model.args.max_position_embeddings
    for ids, row in zip(prompts, counts):
        if len(ids) > context:
            raise ImageError(f"{len(row)} image(s) take {sum(row) + 2 * len(row)} tokens: with the text, "
                             f"{len(ids)} prompt tokens exceed the model's context of {context}")
    tower = vision.load()
    return prompts, mx.concatenate([tower(patches, positions) for row in inputs for patches, positions in row])


def processor_config(model_path: Path) -> dict[str, Any]:
    """The image processor section of ``processor_config.json`` (or ``preprocessor_config.json``)."""
    from .utils import read_json

    for name in ("processor_config.json", "preprocessor_config.json"):
        if (model_path / name).is_file():
            config = read_json(model_path / name)
            return config.get("image_processor", config)
    return {}


def split_image_parts(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with each image part (``{"type": "image", "image": ...}`` or OpenAI's
    ``{"type": "image_url", "image_url": {"url": ...}}``) reduced to ``{"type": "image"}`` for
    the chat template, and the image sources in order."""
    images, out = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                source = part.get("image", part.get("url", part.get("path")))
            elif kind == "image_url":
                url = part.get("image_url")
                source = url.get("url") if isinstance(url, dict) else url
            else:
                parts.append(part)
                continue
            if source is None:
                raise ImageError("an image part has no image (expected 'image' or 'image_url.url')")
            images.append(source)
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images
