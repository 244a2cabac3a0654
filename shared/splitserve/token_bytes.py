"""Each token's own bytes, for logprob entries (OpenAI's `bytes`).

A token decoded alone is not its bytes: a byte-level BPE token that holds part of a UTF-8 character decodes to
U+FFFD, and so does a SentencePiece byte-fallback token (`<0xE6>`). Clients join `bytes` across tokens to
rebuild such characters, so they must be the token's real bytes. They are read from the token's vocabulary
entry, by the tokenizer's scheme (found from its decoder):

- byte-level BPE (GPT-2, Llama 3, Qwen): each character of the entry stands for one byte (GPT-2's table);
- SentencePiece-style (Llama 2, Mistral, Gemma): `<0xAB>` is the byte 0xAB, '▁' is a space, the rest is UTF-8;
- anything else (WordPiece, ...): the UTF-8 of the token's decoded text, right whenever that text is.

Added tokens (special ones included) are their content's UTF-8.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenBytes:
    """`token_bytes(token_id)` -> the token's bytes; built once per tokenizer."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i): token.content.encode() for i, token in added.items()}
        parts = _decoder_parts(tokenizer)
        types = {part.get("type") for part in parts}
        self.scheme = "byte_level" if "ByteLevel" in types else "other"
        self._byte_fallback = "ByteFallback" in types
        self._replacements: list[tuple[str, str]] = []
        for part in parts:
            if part.get("type") == "Replace" and isinstance(part.get("pattern"), dict) and "String" in part["pattern"]:
                self._replacements.append((part["pattern"]["String"], part.get("content", "")))
            elif part.get("type") == "Metaspace":
                self._replacements.append((part.get("replacement", _METASPACE), " "))
        if parts == [] and hasattr(tokenizer, "sp_model"):  # a slow SentencePiece tokenizer
            self._byte_fallback, self._replacements = True, [(_METASPACE, " ")]
        if self.scheme != "byte_level" and (self._byte_fallback or self._replacements):
            self.scheme = "sentencepiece"
        # Per id, read once: the detokenizer asks about the last few tokens of every push. At most a vocabulary.
        self._cache: dict[int, bytes] = {}
        self._fallback_cache: dict[int, int | None] = {}

    def __call__(self, token_id: int) -> bytes:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._read(token_id)
        return found

    def _read(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id]
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self.scheme == "byte_level":
                decoder = _byte_decoder()
                if all(c in decoder for c in piece):
                    return bytes(decoder[c] for c in piece)
            elif self.scheme == "sentencepiece":
                byte = self._fallback_byte(piece)
                if byte is not None:
                    return bytes([byte])
                for old, new in self._replacements:
                    piece = piece.replace(old, new)
                return piece.encode()
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def fallback_byte(self, token_id: int) -> int | None:
        """The byte a SentencePiece byte-fallback token (`<0xAB>`) stands for; None for any other token."""
        if token_id not in self._fallback_cache:
            piece = None if self.scheme != "sentencepiece" or token_id in self._added \
                else self._tokenizer.convert_ids_to_tokens(token_id)
            self._fallback_cache[token_id] = self._fallback_byte(piece) if isinstance(piece, str) else None
        return self._fallback_cache[token_id]

    def _fallback_byte(self, piece: str) -> int | None:
        match = _BYTE_TOKEN.fullmatch(piece) if self._byte_fallback else None
        return int(match.group(1), 16) if match else None


def _decoder_parts(tokenizer) -> list[dict[str, Any]]:
    """The fast tokenizer's decoder steps (a Sequence flattened), or [] when there is none to read."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return []
    try:
        state = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return []
    parts, pending = [], [state]
    while pending:
        part = pending.pop(0)
        if isinstance(part, dict) and part.get("type") == "Sequence":
            pending[:0] = part.get("decoders", [])
        elif isinstance(part, dict):
            parts.append(part)
    return parts


class TokenPieces:
    """`pieces(token_id)` -> (text, bytes) of one token on its own, for logprob entries; cached per id.

    The text is the id decoded alone, special tokens included (what OpenAI shows as `token`); the bytes are the
    token's real bytes. Logprob alternatives repeat a lot across positions, so each id is decoded once; the
    cache holds at most a vocabulary.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._token_bytes = TokenBytes(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        piece = self._cache.get(token_id)
        if piece is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self._cache[token_id] = (text, self._token_bytes(token_id))
        return piece
