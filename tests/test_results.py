"""IncrementalText: streaming decodes a window per token and still equals a whole decode."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from hguard.results import IncrementalText, decode, token_bytes
from hguard.tiny import build_tokenizer

TEXT = "Zibo Garsu was born in Kalatown: café 日本 😀 and then   spaces, ünïcödé, done. " * 3


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: '▁' for spaces, byte fallback for unknown characters, and a decoder
    that strips the leading space of whatever it decodes (so a window must not start a word short)."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *bytes_])
    tokenizer.train_from_iterator(["Zibo Garsu was born in Kalatown and worked as a baker."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("make", [build_tokenizer, sentencepiece_style])
def test_incremental_text_equals_whole_decode(make):
    tokenizer = make()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    incremental = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        text = incremental.add(ids[n - 1])
        whole = decode(tokenizer, ids[:n])
        assert whole.startswith(text) and text == whole[: len(text)]
        assert len(whole.rstrip("\ufffd")) - len(text) <= 4  # at most the characters of a split one wait
    assert text == decode(tokenizer, ids)


class CleaningTokenizer:
    """A tokenizer whose decode cleans up spaces before punctuation (as WordPiece ones do)."""

    clean_up_tokenization_spaces = True

    def __init__(self) -> None:
        self.inner = build_tokenizer()

    def __call__(self, text, **kwargs):
        return self.inner(text, **kwargs)

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        text = self.inner.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is not False:
            text = text.replace(" ,", ",").replace(" .", ".")
        return text


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_whole():
    bpe = build_tokenizer()
    bpe.clean_up_tokenization_spaces = True  # a flag that BPE backends ignore: windows still agree
    assert IncrementalText(bpe).windowed
    tokenizer = CleaningTokenizer()
    ids = tokenizer("one , two . three", add_special_tokens=False)["input_ids"]
    cleaned = IncrementalText(tokenizer)
    assert not cleaned.windowed
    for token in ids:
        text = cleaned.add(token)
        assert cleaned.unchanged == 0  # a whole decode may rewrite earlier text
    assert text == decode(tokenizer, ids) == "one, two. three"


@pytest.mark.parametrize("make", [build_tokenizer, sentencepiece_style])
def test_token_bytes_rebuild_characters_split_across_tokens(make):
    tokenizer = make()
    text = "café 日本 😀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token holds part of a character
    joined = bytes(b for i in ids for b in token_bytes(tokenizer, i)).decode()
    assert joined.strip() == text  # byte-level BPE may carry a leading space
