"""IncrementalDetokenizer: streamed deltas add up to the full decode and never split a character."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from splitserve.demo_model import demo_checkpoint
from splitserve.detokenizer import IncrementalDetokenizer
from splitserve.token_bytes import TokenBytes, _byte_decoder

# Small vocabularies trained on these lines leave accented letters, CJK and emoji spread over several tokens.
TEXTS = [
    "Café crème brûlée, naïve façade, São Paulo, Ærøskøbing, Kraków.",
    "日本語のテキスト、東京と大阪。中文：你好，世界！한국어: 안녕하세요.",
    "Emoji 🙂🚀🎉👍 family 👩‍👩‍👧 flag 🇯🇵 heart ❤️ and math ∑∫√∞≈.",
    "Plain ascii words, numbers 123 4567 and code: def f(x): return x * 2",
]
SPECIALS = ["<eos>", "<sep>"]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: every byte is a symbol, so a character is as many tokens as its merges leave it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", additional_special_tokens=["<sep>"],
                                   clean_up_tokenization_spaces=False)


def _sentencepiece_style_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 style: "▁" word marks, <0xNN> byte fallback for rare characters, leading space stripped."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False)
    # ASCII-only training: every other character falls back to 2-4 byte tokens.
    trained.train_from_iterator(["".join(c for c in text if c.isascii()) for text in TEXTS], trainer=trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", additional_special_tokens=["<sep>"],
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["demo", "byte_level", "sentencepiece"])
def tokenizer_kind(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer(tokenizer_kind):
    if tokenizer_kind == "demo":
        return AutoTokenizer.from_pretrained(demo_checkpoint())
    return {"byte_level": _byte_level_bpe, "sentencepiece": _sentencepiece_style_bpe}[tokenizer_kind]()


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = next(chunk_sizes)
        deltas.append(detok.push(ids[i:i + n]))
        i += n
    return deltas + [detok.flush()]


def _one_at_a_time():
    while True:
        yield 1


def _random_chunks(seed: int):
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, 5)


def test_trained_tokenizers_split_characters_over_several_tokens(tokenizer):
    # Guards the premise of the other tests: single tokens decode to broken characters.
    ids = _encode(tokenizer, "".join(TEXTS[1:3]))
    broken = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert len(broken) > 10
    assert tokenizer.decode(ids) == "".join(TEXTS[1:3])


@pytest.mark.parametrize("chunking", ["one", "several"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode_without_split_characters(tokenizer, tokenizer_kind, text, chunking):
    ids = _encode(tokenizer, text)
    chunks = _one_at_a_time() if chunking == "one" else _random_chunks(len(text))
    deltas = _stream(IncrementalDetokenizer(tokenizer), ids, chunks)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left held back: the text ended on a whole character
    # Streamed, not emitted all at once at the end. A byte-fallback run comes out whole when it ends, since one
    # more byte could still turn all of it into U+FFFDs: the CJK line is three runs for that tokenizer.
    if not (tokenizer_kind == "sentencepiece" and text == TEXTS[1]):
        assert sum(1 for d in deltas if d) > 3


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_are_skipped_or_kept_like_decode(tokenizer, skip_special_tokens):
    eos = tokenizer.eos_token_id
    sep = tokenizer.convert_tokens_to_ids("<sep>") if "<sep>" in tokenizer.get_vocab() else eos
    ids = _encode(tokenizer, TEXTS[0]) + [sep] + _encode(tokenizer, TEXTS[2]) + [sep, sep] + _encode(
        tokenizer, TEXTS[1]) + [eos]
    for chunks in (_one_at_a_time(), _random_chunks(7)):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, ids, chunks)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert not any("\ufffd" in d for d in deltas)
    has_eos_text = tokenizer.eos_token in "".join(deltas)
    assert has_eos_text is not skip_special_tokens


def _byte_token(tokenizer, tokenizer_kind, byte: int) -> int:
    """The id of the token that is just this byte: `<0xAB>` with byte fallback, else GPT-2's char for it."""
    if tokenizer_kind == "sentencepiece":
        return tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")
    [char] = [c for c, b in _byte_decoder().items() if b == byte]
    return tokenizer.convert_tokens_to_ids(char)


def _random_ids(tokenizer, tokenizer_kind, rng: random.Random) -> list[int]:
    """What a random-weights model emits, with byte tokens (a quarter of the ids) over-drawn so that every kind of
    byte run shows up: complete characters, runs cut short, stray continuation bytes, specials in between."""
    specials = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<sep>")] \
        if "<sep>" in tokenizer.get_vocab() else [tokenizer.eos_token_id]
    ids = []
    for _ in range(rng.randint(1, 40)):
        pick = rng.random()
        if pick < 0.25:
            byte = rng.choice([rng.randrange(256), rng.randrange(0x80, 0xC0), rng.randrange(0xC2, 0xF5)])
            ids.append(_byte_token(tokenizer, tokenizer_kind, byte))
        elif pick < 0.3:
            ids.append(rng.choice(specials))
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_still_add_up_to_the_full_decode(tokenizer, tokenizer_kind, skip_special_tokens):
    # A random-weights model emits arbitrary ids: broken byte runs included. The stream must still match, with
    # byte fallback too, where a run turns into one U+FFFD per byte as soon as it cannot be UTF-8.
    rng = random.Random(0)
    for case in range(300):
        ids = _random_ids(tokenizer, tokenizer_kind, rng)
        chunks = _one_at_a_time() if case % 2 else _random_chunks(case)
        deltas = _stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens), ids, chunks)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


@pytest.mark.parametrize("run", [[0xFF], [0x80, 0x80], [0xE6, 0x41], [0xF0, 0x9F, 0x99, 0xFF], [0xC3, 0xE6, 0x28],
                                 [0x80, 0xE6]],
                         ids=["ff", "continuations", "cut-3-byte", "cut-4-byte", "cut-twice", "then-a-lead-byte"])
def test_a_byte_run_that_can_never_be_a_character_is_not_held(tokenizer, tokenizer_kind, run):
    head = _encode(tokenizer, "ok")
    run_ids = [_byte_token(tokenizer, tokenizer_kind, b) for b in run]
    for follower in [_byte_token(tokenizer, tokenizer_kind, 0xE6), _byte_token(tokenizer, tokenizer_kind, 0x97),
                     *_encode(tokenizer, " next")[:1], tokenizer.eos_token_id]:
        detok = IncrementalDetokenizer(tokenizer)
        emitted = "".join(detok.push([i]) for i in head + run_ids)
        # Only a lead byte at the very end may still become a character, and not in a byte-fallback run that
        # already has an error (the whole run decodes to U+FFFDs whatever follows).
        whole = tokenizer.decode(head + run_ids)
        final = whole[:-1] if 0xC2 <= run[-1] <= 0xF4 and tokenizer_kind != "sentencepiece" else whole
        assert emitted == final
        emitted += detok.push([follower])
        assert emitted.startswith(final) and emitted + detok.flush() == tokenizer.decode(
            head + run_ids + [follower], skip_special_tokens=True)


def test_incomplete_character_is_held_back_then_flushed_as_replacement(tokenizer):
    ids = _encode(tokenizer, "ok 𝔘")  # a 4-byte character no tokenizer here has seen, so it spans tokens
    head = ids[:-1]  # its last token is missing
    assert tokenizer.decode(head).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in head]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(head)
    assert not any("\ufffd" in d for d in deltas)


def test_prompt_gives_context_to_the_first_delta(tokenizer):
    prompt = _encode(tokenizer, "Say hello in Japanese:")
    output = _encode(tokenizer, "Say hello in Japanese: こんにちは 🙂 done")[len(prompt):]
    assert tokenizer.decode(prompt + output) == "Say hello in Japanese: こんにちは 🙂 done"
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    deltas = _stream(detok, output, _one_at_a_time())
    # The space before the answer belongs to the output even where a decoder strips it at the start of a text.
    assert "".join(deltas) == " こんにちは 🙂 done"
    assert not any("\ufffd" in d for d in deltas)


class _CountingTokenizer:
    """Records how many ids each decode call sees."""

    def __init__(self, inner):
        self.inner = inner
        self.sizes: list[int] = []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, **kwargs)

    def __getattr__(self, name):  # the vocabulary, for the detokenizer's byte checks
        return getattr(self.inner, name)


def test_each_push_decodes_a_window_not_the_whole_sequence(tokenizer):
    ids = _encode(tokenizer, " ".join(TEXTS) * 20)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    deltas = _stream(detok, ids, _one_at_a_time())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert len(ids) > 1500
    # The window is the last emitted tokens plus those of a character still in the making, or of a byte-fallback
    # run still open.
    token_bytes = TokenBytes(tokenizer)
    longest_run = run = 0
    for token_id in ids:
        run = run + 1 if token_bytes.fallback_byte(token_id) is not None else 0
        longest_run = max(longest_run, run)
    assert max(counting.sizes) <= 12 + longest_run < len(ids) / 10
