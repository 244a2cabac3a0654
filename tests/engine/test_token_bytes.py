"""Token bytes for logprob entries: a token's real bytes, not its decoded text's, for byte-level BPE and for
SentencePiece-style byte fallback; joined over the tokens of a text they give the text's UTF-8."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from splitserve.demo_model import build_tokenizer
from splitserve.token_bytes import TokenBytes, TokenPieces

# ü and ó are 2 bytes, 日 and 本 3, the emoji and 𝔘 4: several are split over tokens in both tokenizers below.
TEXT = "Grüße aus Kraków, 日本 🚀 𝔘 ok"


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """The demo tokenizer: GPT-2-style byte-level BPE, as Llama 3 and Qwen use."""
    path = tmp_path_factory.mktemp("byte-level")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def _sentencepiece_style():
    """Llama 2 / Mistral style: '▁' for spaces, BPE over characters, <0xAB> tokens for every byte of a character
    that is not in the vocabulary, and the decoder that turns those back into text."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["▁", *"GrüßeausKrakówok,"]
    merges = [("▁", "a"), ("▁a", "u"), ("▁au", "s"), ("o", "k"), ("▁", "ok")]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(
        [*specials, *byte_tokens, *chars, *("".join(m) for m in merges)]))}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sentencepiece():
    return _sentencepiece_style()


def test_byte_level_tokens_hold_their_bytes(byte_level):
    token_bytes = TokenBytes(byte_level)
    assert token_bytes.scheme == "byte_level"
    ids = byte_level.encode(TEXT)
    assert b"".join(token_bytes(t) for t in ids) == TEXT.encode()
    # Some tokens hold only part of a character: they show U+FFFD, but their bytes are the character's pieces.
    partial = [t for t in ids if byte_level.decode([t]).endswith("\ufffd")]
    assert partial
    for t in partial:
        assert token_bytes(t) and token_bytes(t) != "\ufffd".encode()
    for char in "本🚀𝔘":
        covering = _tokens_covering(ids, token_bytes, TEXT.encode().index(char.encode()), len(char.encode()))
        assert len(covering) >= 2, f"{char!r} is one token; the test needs it split"
        assert char.encode() in b"".join(token_bytes(t) for t in covering)
    # Special tokens are their content.
    assert token_bytes(byte_level.eos_token_id) == byte_level.eos_token.encode()


def _tokens_covering(ids, token_bytes, start, length):
    """The ids whose bytes overlap bytes [start, start + length) of the text."""
    covering, offset = [], 0
    for t in ids:
        end = offset + len(token_bytes(t))
        if offset < start + length and end > start:
            covering.append(t)
        offset = end
    return covering


def test_sentencepiece_byte_fallback_tokens_are_their_byte(sentencepiece):
    token_bytes = TokenBytes(sentencepiece)
    assert token_bytes.scheme == "sentencepiece"
    ids = sentencepiece.encode(TEXT, add_special_tokens=False)
    pieces = sentencepiece.convert_ids_to_tokens(ids)
    assert "<0xE6>" in pieces and "▁aus" in pieces  # 日 starts with 0xE6; a merged piece with its '▁'
    assert token_bytes(sentencepiece.convert_tokens_to_ids("<0xE6>")) == b"\xe6"
    assert token_bytes(sentencepiece.convert_tokens_to_ids("▁aus")) == b" aus"
    # '▁' is a space, so the text's leading space (the normaliser's, which decoding strips) is there too.
    assert b"".join(token_bytes(t) for t in ids) == (" " + TEXT).encode()
    text = (" " + TEXT).encode()
    for char in "日本🚀𝔘":  # not in the vocabulary: one <0xAB> token per byte, each showing U+FFFD alone
        covering = _tokens_covering(ids, token_bytes, text.index(char.encode()), len(char.encode()))
        assert [token_bytes(t) for t in covering] == [bytes([b]) for b in char.encode()]
        assert {sentencepiece.decode([t]) for t in covering} == {"\ufffd"}
    assert token_bytes(sentencepiece.eos_token_id) == b"</s>"


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_token_pieces_give_each_tokens_text_and_real_bytes(kind, byte_level, sentencepiece):
    # What the engine puts in logprob entries (and the tokenizer service's TokenPieces answers).
    tokenizer = byte_level if kind == "byte_level" else sentencepiece
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [TokenPieces(tokenizer)(t) for t in ids]
    assert [text for text, _ in pieces] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert any(text == "\ufffd" and data != text.encode() for text, data in pieces)
    joined = b"".join(data for _, data in pieces)
    assert joined.decode() in (TEXT, " " + TEXT)
