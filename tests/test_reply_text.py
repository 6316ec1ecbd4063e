"""ReplyText: committed canvases become released text through mlx-lm's streaming detokenizer,
with ids, counts and text agreeing at every release."""

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_diffgemma.generate import ReplyText

TEXT = "Grüße aus 東京 🙂 and café, naïve ✓ — def add(a, b):\n    return a + b\n" * 4


class Decodes:
    """A tokenizer that counts the tokens it is asked to decode (and may decode its own way)."""

    def __init__(self, tokenizer, decode=None):
        self.inner, self.decoded, self.own = tokenizer, 0, decode

    def decode(self, ids):
        self.decoded += len(ids)
        return self.own(ids) if self.own else self.inner.decode(ids)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def stream(reply: ReplyText, ids: list[int], size: int, decode=None) -> tuple[str, list[int], bool]:
    """Commit ``ids`` in canvases of ``size``, checking every release with ``decode`` (the reply's
    tokenizer's by default); the text and tokens released."""
    decode = decode or reply.tokenizer.decode
    text, kept, stopped = "", [], False
    for start in range(0, len(ids), size):
        delta, tokens, stopped = reply.add(ids[start : start + size], finished=start + size >= len(ids))
        text, kept = text + delta, kept + tokens
        assert "\ufffd" not in delta
        assert decode(kept) == text and reply.text == text and reply.tokens[: len(kept)] == kept
        if stopped:
            break
    return text, kept, stopped


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_multi_byte_characters_split_across_canvases_stream_as_the_whole_decode(tokenizer, size):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert sum(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids) > 20  # characters split into bytes
    reply = ReplyText(tokenizer, [])
    text, kept, stopped = stream(reply, ids, size)
    assert text == tokenizer.decode(ids) == TEXT and kept == ids and not stopped
    assert reply.detokenizer is not None  # streamed to the end


def test_a_long_reply_is_not_decoded_again_at_every_canvas(tokenizer):
    ids = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    counting = Decodes(tokenizer)
    text, kept, _ = stream(ReplyText(counting, ["<never>"]), ids, 16, decode=tokenizer.decode)
    assert text == TEXT * 8 and kept == ids and len(ids) // 16 > 40
    # Each token is decoded about twice (released, and held back before that), not once per canvas.
    assert 0 < counting.decoded <= 3 * len(ids)


@pytest.mark.parametrize("stop", ["東京 🙂", "naïve", "\n    return", "✓"])
def test_a_streamed_reply_cut_at_a_stop_string_keeps_only_the_tokens_before_it(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    for size in (3, 16):
        reply = ReplyText(tokenizer, [stop, "<never>"])
        text, kept, stopped = stream(reply, ids, size)
        at = TEXT.index(stop)
        assert stopped and reply.stopped_by == stop and reply.tokens == kept == ids[: len(kept)]
        assert TEXT.startswith(text) and len(text) <= at
        # Nothing before the stop string is lost beyond the token it shares a piece with.
        assert len(tokenizer.decode(ids[: len(kept) + 1]).rstrip("\ufffd")) > at or not TEXT.startswith(
            tokenizer.decode(ids[: len(kept) + 1]))


def test_a_tokenizer_that_decodes_otherwise_than_its_detokenizer_is_decoded_whole(tokenizer):
    spelled = Decodes(tokenizer, decode=lambda ids: tokenizer.decode(ids).replace("ü", "ue"))
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    reply = ReplyText(spelled, ["add("])
    text, kept, stopped = stream(reply, ids, 5)
    assert reply.detokenizer is None and stopped
    expected = TEXT.replace("ü", "ue")
    assert text == spelled.decode(kept) and expected.startswith(text) and "add(" not in text
    assert len(text) >= expected.index("add(") - 2
