"""Token ids in, text deltas out, one sequence at a time, never splitting a UTF-8 character.

Decoding ids one by one and concatenating is wrong: byte-level BPE spreads one character over several tokens
(each decodes alone to U+FFFD) and SentencePiece-style decoders strip a leading space that is only right at
the start of the text. So each push decodes a short window of already-emitted tokens (the prefix) plus the new
ones and emits only the difference (the prefix/read-offset technique of vLLM and Hugging Face's DecodeStream).
A push costs O(window), not O(sequence). Only the end of the text that later tokens can still change is held
back (an incomplete character, an open byte-fallback run: see UnfinishedTail); the window grows until it is final.

Deltas are decoded with `clean_up_tokenization_spaces=False`: that cleanup rewrites text across token
boundaries (" ." -> "."), so it cannot be streamed; modern tokenizers leave it off.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from splitserve.unfinished_tail import FINAL, UnfinishedTail

# Prompt tokens decoded ahead of the first output token: enough for a tokenizer to see the word boundary and
# the bytes of the last character, few enough to stay cheap.
PROMPT_CONTEXT_TOKENS = 5

# Ids already behind the prefix window are dropped once this many pile up, so a long stream holds O(window).
_TRIM_AFTER = 1024


class IncrementalDetokenizer:
    """Turns one sequence's output ids into text deltas.

    With no prompt, the deltas concatenated equal `tokenizer.decode(output_ids, skip_special_tokens=...)`.
    With `prompt_token_ids`, the first delta is decoded in the prompt's context, so it carries e.g. the leading
    space a SentencePiece tokenizer drops at the start of a text (for byte-level BPE both are the same).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._tail = UnfinishedTail(tokenizer, skip_special_tokens)
        context = list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        # _ids[prefix:read] were emitted already and are decoded again for context; _ids[read:] are pending, and
        # the first `sent` characters of their text (the part before an unfinished tail) were emitted too.
        self._prefix = 0
        self._read = len(context)
        self._sent = 0
        self._prefix_text: Optional[str] = None
        # A window may start at `read` only if no byte run goes on across it (see UnfinishedTail).
        self._read_is_boundary = True

    def push(self, token_ids: Iterable[int]) -> str:
        """Appends ids; returns the new text that later ids cannot change (often "")."""
        self._ids.extend(token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Returns whatever was held back, incomplete characters as U+FFFD: the sequence has ended."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text):
            # Nothing new yet (only skipped special tokens): the window keeps its start, whose text is the context
            # a decoder needs (one that strips a leading space would strip the next word's).
            return ""
        tail = FINAL if final else self._tail.tail(self._ids[self._prefix:], text)
        stable = len(text) - tail.held_chars
        start = len(self._prefix_text) + self._sent
        delta = text[start:stable] if stable > start else ""
        if tail.held_chars:
            self._sent += len(delta)
            return delta
        if self._read_is_boundary:
            self._prefix = self._read
        self._read, self._sent, self._prefix_text = len(self._ids), 0, None
        self._read_is_boundary = tail.boundary
        if self._prefix > _TRIM_AFTER:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)
