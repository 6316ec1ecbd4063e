"""Tiny random DiffusionGemma checkpoints and a tiny tokenizer, built offline in seconds.

The reference model comes from ``transformers`` (the ground truth); its weights are
perturbed away from their initial values (norm scales of one, layer scalars of one)
so that every parameter matters to the logits being compared.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import sentencepiece as spm
import torch

# Gemma 4 keeps <|turn> at 105 and <turn|> (an end-of-sequence id) at 106; so does this tokenizer.
SPECIAL_TOKENS = [f"<unused{i}>" for i in range(101)] + [
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|think|>",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<|turn>{{ role }}\n{{ m['content'] | trim }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Diffusion models denoise a canvas of tokens in parallel, step by step.",
    "Sudoku puzzles: 1 2 3 4 5 6 7 8 9.",
]


def build_tokenizer(out: Path, lines: list[str] | None = None, vocab_size: int = 480) -> int:
    """Train a SentencePiece tokenizer with Gemma 4's special tokens (on ``lines``, by default a tiny
    corpus); save it in HF form. Returns its size."""
    from transformers import GemmaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or CORPUS * 40), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=SPECIAL_TOKENS, byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, minloglevel=2,
    )
    staging = out / "spm"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "tokenizer.model").write_bytes(buf.getvalue())
    tokenizer = GemmaTokenizer.from_pretrained(staging)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    shutil.rmtree(staging)
    return len(tokenizer)


TINY_TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    num_experts=4, top_k_experts=2, moe_intermediate_size=32, global_head_dim=32, num_global_key_value_heads=1,
)


def build_reference_model(vocab_size: int, canvas_length: int = 16, seed: int = 0, **overrides):
    """A tiny ``DiffusionGemmaForBlockDiffusion`` with every weight and layer scalar randomized."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
    from transformers.models.gemma4 import Gemma4VisionConfig

    torch.manual_seed(seed)
    text = DiffusionGemmaTextConfig(vocab_size=vocab_size, eos_token_id=[1, 106], **{**TINY_TEXT_CONFIG, **overrides})
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand_like(b) + 0.5)
    return model


def save_checkpoint(model, tokenizer_dir: Path, out: Path, max_shard_size: str | None = None, real_style: bool = False) -> Path:
    """Save in HF layout with tokenizer files and a generation config.

    ``real_style`` rewrites config.json the way the published checkpoint writes it: the
    full-attention shape as Gemma 4 fields instead of ``per_layer_config``.
    """
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106], "pad_token_id": 0, "bos_token_id": 2}))
    if real_style:
        config = json.loads((out / "config.json").read_text())
        text = config["text_config"]
        text.pop("per_layer_config")
        text.update(global_head_dim=TINY_TEXT_CONFIG["global_head_dim"],
                    num_global_key_value_heads=TINY_TEXT_CONFIG["num_global_key_value_heads"],
                    attention_k_eq_v=True, enable_moe_block=True, use_bidirectional_attention="vision")
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
