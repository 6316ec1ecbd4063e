import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import build_reference_model, build_tokenizer, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def reference_model(vocab_size):
    return build_reference_model(vocab_size)


@pytest.fixture(scope="session")
def hf_checkpoint(reference_model, tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny reference model in HF layout, sharded with an index, as the hub checkpoint is."""
    return save_checkpoint(reference_model, tokenizer_dir, tmp_path_factory.mktemp("hf"), max_shard_size="60KB")
