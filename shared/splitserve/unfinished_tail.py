"""How much of the end of a decoded text later tokens can still change, read from the tokens' bytes.

A streamed delta must never be taken back, so the detokenizer holds exactly this tail. Holding "whatever ends in
U+FFFD" instead holds byte runs that can never become a character until some later token ends them, and a
random-weights model emits such runs all the time (its first text chunk came ~700 ms late at c=1). By scheme:

- byte-level BPE decodes the concatenated bytes lossily, one U+FFFD per maximal invalid subpart, so only a
  trailing proper prefix of a valid UTF-8 sequence (at most 3 bytes, shown as one U+FFFD) can still change;
- SentencePiece byte fallback decodes a whole run of `<0xAB>` tokens at once: valid UTF-8 as text, otherwise one
  U+FFFD per byte. A run with no error yet can still turn into U+FFFDs entirely, so it is held until it ends or
  has an error; a run with an error is final, but a decode window may not start inside it;
- any other tokenizer: held while the text ends in U+FFFD (nothing better is known about its bytes).
"""

from __future__ import annotations

import codecs
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

from splitserve.token_bytes import TokenBytes

REPLACEMENT_CHAR = "\ufffd"

# UTF-8's longest proper prefix of a character: a lead byte and two continuation bytes.
_MAX_PENDING_BYTES = 3
_LEAD_BYTES = (0xC2, 0xF4)  # the bytes a multi-byte character may start with

_token_bytes: "weakref.WeakKeyDictionary[object, TokenBytes]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Tail:
    held_chars: int   # trailing characters of the text that may still change
    boundary: bool    # whether a decode window may start after these tokens (no byte run is open across it)


FINAL = Tail(held_chars=0, boundary=True)


class UnfinishedTail:
    """`tail(window_ids, text)`: the part of `text` (the window's decode) that later tokens may still change."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self._bytes = _shared_token_bytes(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._skipped = {int(i) for i, t in added.items() if getattr(t, "special", False)} if skip_special_tokens \
            else set()

    def tail(self, ids: Sequence[int], text: str) -> Tail:
        kept_from_end = (i for i in reversed(ids) if i not in self._skipped)
        if self._bytes.scheme == "byte_level":
            return self._byte_level_tail(kept_from_end)
        if self._bytes.scheme == "sentencepiece":
            return self._byte_fallback_tail(kept_from_end)
        if text.endswith(REPLACEMENT_CHAR):
            return Tail(held_chars=len(text), boundary=False)
        return FINAL

    def _byte_level_tail(self, kept_from_end: Iterator[int]) -> Tail:
        data = b""
        for token_id in kept_from_end:
            data = self._bytes(token_id) + data
            if len(data) >= _MAX_PENDING_BYTES:
                break
        # A pending character starts with a lead byte; most texts end without one, and are done here.
        pending = any(_LEAD_BYTES[0] <= data[-k] <= _LEAD_BYTES[1] and _is_character_prefix(data[-k:])
                      for k in range(1, min(len(data), _MAX_PENDING_BYTES) + 1))
        return Tail(held_chars=1, boundary=False) if pending else FINAL

    def _byte_fallback_tail(self, kept_from_end: Iterator[int]) -> Tail:
        run = bytearray()
        for token_id in kept_from_end:
            byte = self._bytes.fallback_byte(token_id)
            if byte is None:
                break
            run.insert(0, byte)
        if not run:
            return FINAL
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        try:
            text = decoder.decode(bytes(run), final=False)
        except UnicodeDecodeError:
            return Tail(held_chars=0, boundary=False)  # already invalid: one U+FFFD per byte, whatever follows
        complete = not decoder.getstate()[0]
        return Tail(held_chars=len(text) if complete else len(run), boundary=False)


def _is_character_prefix(data: bytes) -> bool:
    """Whether `data` is a proper prefix of one valid UTF-8 character (so more bytes may complete it)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        return decoder.decode(data, final=False) == "" and decoder.getstate()[0] == data
    except UnicodeDecodeError:
        return False


def _shared_token_bytes(tokenizer) -> TokenBytes:
    """One TokenBytes per tokenizer: every sequence builds a detokenizer, the decoder scheme is read once."""
    try:
        found = _token_bytes.get(tokenizer)
    except TypeError:  # not weakly referenceable: build one per use
        return TokenBytes(tokenizer)
    if found is None:
        found = _token_bytes[tokenizer] = TokenBytes(tokenizer)
    return found
