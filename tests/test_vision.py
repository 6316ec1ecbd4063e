"""Images in: preprocessing, the vision tower and image prompts against transformers, on a tiny random model."""

import base64
import io
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import CHAT_TEMPLATE, build_reference_model, save_checkpoint
from PIL import Image
from transformers import AutoTokenizer
from transformers.cache_utils import DynamicCache
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from mlx_diffgemma import generate, stream_generate
from mlx_diffgemma.utils import load, load_model
from mlx_diffgemma.vision import ImageError, ImageProcessor, read_image

TOL = 1e-4
MAX_SOFT_TOKENS = 70  # the smallest the reference processor allows
# The test tokenizer has no image tokens: three of its unused special tokens stand in for them.
BOI, IMAGE, EOI = "<unused6>", "<unused7>", "<unused8>"
IMAGE_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m['content'] | trim }}",
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}" + IMAGE + "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}",
)


def make_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


@pytest.fixture(scope="module")
def token_ids(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("boi", BOI), ("image", IMAGE), ("eoi", EOI))}


@pytest.fixture(scope="module")
def reference(vocab_size, token_ids):
    ref = build_reference_model(vocab_size, use_bidirectional_attention="vision")
    for config in (ref.config, ref.model.encoder.config):
        config.boi_token_id, config.image_token_id, config.eoi_token_id = token_ids["boi"], token_ids["image"], token_ids["eoi"]
    return ref


@pytest.fixture(scope="module")
def checkpoint(reference, tokenizer_dir, tmp_path_factory):
    out = save_checkpoint(reference, tokenizer_dir, tmp_path_factory.mktemp("vision"))
    (out / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": MAX_SOFT_TOKENS}}))
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": IMAGE_TEMPLATE}))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


def reference_pixels(images):
    out = Gemma4ImageProcessorPil(max_soft_tokens=MAX_SOFT_TOKENS)(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"], out["num_soft_tokens_per_image"].tolist()


IMAGES = [make_image(0, 150, 100), make_image(1, 40, 300, "L"), make_image(2, 700, 20, "RGBA"), make_image(3, 384, 384)]


def test_preprocessing_gives_the_reference_processors_pixels():
    processor = ImageProcessor(max_soft_tokens=MAX_SOFT_TOKENS)
    pixels, positions, counts = reference_pixels(IMAGES)
    for i, image in enumerate(IMAGES):
        patches, ours = processor(read_image(image))
        n = patches.shape[0]
        assert processor.soft_tokens(patches) == counts[i]
        assert np.array_equal(patches, pixels[i, :n].numpy()), f"image {i}"
        assert np.array_equal(ours, positions[i, :n].numpy())
        assert (positions[i, n:] == -1).all()


def test_the_tower_is_loaded_only_when_the_first_image_arrives(model):
    assert model.vision is not None and model.vision.tower is None
    assert not any("vision" in name for name, _ in model.parameters().items())


def test_image_features_match_the_reference(model, reference):
    pixels, positions, counts = reference_pixels(IMAGES[:2])
    with torch.no_grad():
        expected = reference.model.encoder.get_image_features(pixels, positions).pooler_output.numpy()
    tower = model.vision.load()
    ours = np.concatenate([np.array(tower(*model.vision.processor(read_image(image)))) for image in IMAGES[:2]])
    assert ours.shape == expected.shape == (sum(counts), reference.config.text_config.hidden_size)
    assert np.abs(ours - expected).max() <= TOL


@pytest.mark.parametrize("n_images", [1, 2])
def test_denoiser_logits_of_a_prompt_with_images_match_the_reference(model, reference, token_ids, vocab_size, n_images,
                                                                      monkeypatch):
    images = IMAGES[:n_images]
    pixels, positions, counts = reference_pixels(images)
    rng = np.random.default_rng(n_images)
    ids = list(rng.integers(200, vocab_size, 3))
    for count in counts:
        ids += [token_ids["boi"]] + [token_ids["image"]] * count + [token_ids["eoi"]] + list(rng.integers(200, vocab_size, 4))
    prompt, canvas = torch.tensor([ids]), torch.tensor(rng.integers(200, vocab_size, (1, 16)))
    cache = DynamicCache(config=reference.config.text_config)
    with torch.no_grad():
        # The encoder's forward drops the image blocks' bidirectional mask it builds; generate()
        # passes it in, built as here, and so do we.
        masks = reference.model.encoder.create_masks_for_generate(
            config=reference.config, inputs_embeds=torch.empty((1, len(ids), 0)), attention_mask=torch.ones((1, len(ids))),
            past_key_values=cache, position_ids=torch.arange(len(ids))[None], mm_token_type_ids=(prompt == token_ids["image"]).long(),
        )
        reference.model.encoder(input_ids=prompt, pixel_values=pixels, image_position_ids=positions, attention_mask=masks,
                                past_key_values=cache)
        expected = reference(past_key_values=cache, decoder_input_ids=canvas).logits.numpy()
    features = mx.concatenate([model.vision.load()(*model.vision.processor(read_image(i))) for i in images])
    ours_cache = model.make_cache()
    model.encode(mx.array(prompt.numpy()), ours_cache, features)
    ours = np.array(model.denoise(mx.array(canvas.numpy()), ours_cache))
    assert np.abs(ours - expected).max() <= TOL
    causal_cache = model.make_cache()  # the image blocks' mask matters: causal attention gives other logits
    monkeypatch.setattr(model.args, "use_bidirectional_attention", None)
    model.encode(mx.array(prompt.numpy()), causal_cache, features)
    assert np.abs(np.array(model.denoise(mx.array(canvas.numpy()), causal_cache)) - expected).max() > 100 * TOL


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint)


def ask(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


def test_an_image_reaches_the_prompt_from_a_path_pil_bytes_or_a_data_uri(loaded, tmp_path):
    model, tokenizer = loaded
    buffer = io.BytesIO()
    IMAGES[0].save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    openai_part = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is it?"}]}]
    text_only = next(stream_generate(model, tokenizer, [{"role": "user", "content": "What is it?"}], max_tokens=4, seed=0))
    replies = []
    for prompt in (ask(tmp_path / "a.png"), ask(str(tmp_path / "a.png")), ask(IMAGES[0]), ask(buffer.getvalue()), ask(uri), openai_part):
        response = next(iter(reversed(list(stream_generate(model, tokenizer, prompt, max_tokens=4, seed=0)))))
        assert response.prompt_tokens == text_only.prompt_tokens + 1 + 60 + 1  # boi, 60 soft tokens, eoi
        replies.append(response.tokens)
    assert all(r == replies[0] for r in replies)


def test_a_file_that_is_not_an_image_is_one_error_line(loaded, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match=r"notes.txt is not an image Pillow can read$"):
        generate(*loaded, ask(tmp_path / "notes.txt"), max_tokens=4)


def test_a_corrupt_image_is_one_error_line(loaded, tmp_path):
    buffer = io.BytesIO()
    IMAGES[0].save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageError, match="cut.png is a damaged image") as error:
        generate(*loaded, ask(tmp_path / "cut.png"), max_tokens=4)
    assert "\n" not in str(error.value)


def test_more_images_than_fit_the_context_are_refused(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setattr(model.args, "max_position_embeddings", 100)
    two = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "image", "image": IMAGES[0]}]}]
    with pytest.raises(ImageError, match=r"2 image\(s\) take 124 tokens: .* exceed the model's context of 100"):
        generate(model, tokenizer, two, max_tokens=4)


def test_an_image_for_a_model_without_a_tower_is_refused(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setattr(model, "vision", None)
    with pytest.raises(ImageError, match="this model takes no images"):
        generate(model, tokenizer, ask(IMAGES[0]), max_tokens=4)


def test_a_checkpoint_without_tower_weights_refuses_images(checkpoint, tmp_path):
    import shutil

    for f in checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    for f in tmp_path.glob("model*.safetensors"):
        weights = mx.load(str(f))
        mx.save_safetensors(str(f), {k: v for k, v in weights.items() if "vision" not in k}, metadata={"format": "mlx"})
    (tmp_path / "model.safetensors.index.json").unlink(missing_ok=True)
    model, tokenizer = load(tmp_path)
    with pytest.raises(ImageError, match="has no vision tower weights"):
        generate(model, tokenizer, ask(IMAGES[0]), max_tokens=4)


def test_readme_images_example_runs(checkpoint, tmp_path, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Images\n.*?```python\n(.*?)```", readme, re.S).group(1)
    IMAGES[0].save(tmp_path / "photo.jpg")
    code = code.replace("google/diffusiongemma-26B-A4B-it", str(checkpoint)).replace("photo.jpg", str(tmp_path / "photo.jpg"))
    exec(code.replace("max_tokens=128", "max_tokens=8"), {})
    assert capsys.readouterr().out.strip()
